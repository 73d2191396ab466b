"""95 % confidence intervals beside every evaluation figure."""

import pytest

from emu2.eval.intervals import format_interval, mean_interval, wilson_interval, with_interval


def test_wilson_interval_matches_the_textbook_value():
    # 80 of 100: the Wilson score interval is [0.7112, 0.8666] (centre (p + z^2/2n) / (1 + z^2/n)).
    low, high = wilson_interval(80, 100)
    assert low == pytest.approx(0.7112, abs=1e-4) and high == pytest.approx(0.8666, abs=1e-4)


def test_wilson_interval_is_not_empty_at_zero_or_all_successes():
    low, high = wilson_interval(0, 200)
    assert low == 0.0 and 0.01 < high < 0.03
    low, high = wilson_interval(200, 200)
    assert high == 1.0 and 0.97 < low < 0.99


def test_interval_narrows_with_more_items():
    small, large = wilson_interval(10, 20), wilson_interval(100, 200)
    assert large[1] - large[0] < small[1] - small[0]


def test_mean_interval_of_fractions_is_centred_on_the_mean():
    scores = [0.0, 0.5, 1.0, 0.5] * 50
    low, high = mean_interval(scores)
    assert low < 0.5 < high and (high - 0.5) == pytest.approx(0.5 - low)


def test_with_interval_uses_wilson_for_zero_one_scores_and_formats_as_percent():
    cell = with_interval([1.0] * 3 + [0.0] * 1)
    assert cell["value"] == 0.75 and cell["n"] == 4
    assert cell["ci95"] == [round(b, 4) for b in wilson_interval(3, 4)]
    assert format_interval(cell) == f"75.0 [{100 * cell['ci95'][0]:.1f}, {100 * cell['ci95'][1]:.1f}]"


def test_intervals_refuse_empty_input():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        mean_interval([])
