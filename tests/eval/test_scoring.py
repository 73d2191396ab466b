"""Benchmark numbers from records and predictions: the metric each benchmark uses (Table 9)."""

import pytest

from emu2.eval.datasets import EvalRecord
from emu2.eval.scoring import (
    score_exact_match,
    score_grounding,
    score_hateful_memes,
    score_multiple_choice,
    score_vqa,
    yes_score,
)


def test_score_vqa_averages_vqa_accuracy():
    records = [EvalRecord(id="1", answers=["2"] * 3 + ["3"] * 7), EvalRecord(id="2", answers=["yes"] * 10)]
    # "two" -> 0.9 (3 of 10 say "2"); "no" -> 0: mean 0.45
    assert score_vqa(["two", "no"], records) == pytest.approx(0.45)


def test_score_exact_match_accepts_any_listed_answer():
    records = [EvalRecord(id="1", answers=["dance"]), EvalRecord(id="2", answers=["man"])]
    assert score_exact_match(["Dance.", "woman"], records) == 0.5


def test_yes_score_reads_probabilities_or_yes_no():
    assert [yes_score(a) for a in ["0.83", "1", "yes", "No.", "maybe"]] == [0.83, 1.0, 1.0, 0.0, 0.5]


def test_score_hateful_memes_is_roc_auc_over_yes_scores():
    records = [EvalRecord(id=str(i), label=label) for i, label in enumerate([0, 0, 1, 1])]
    # yes scores 0.1, 0.4, 0.35, 0.8: 3 of the 4 (positive, negative) pairs ranked right
    assert score_hateful_memes(["0.1", "0.4", "0.35", "0.8"], records) == pytest.approx(0.75)


def test_score_multiple_choice_uses_the_option_letter():
    records = [EvalRecord(id="1", options=["One", "Two"], answers=["B"]),
               EvalRecord(id="2", options=["cat", "dog"], answers=["A"])]
    assert score_multiple_choice(["B", "dog"], records) == 0.5


def test_score_grounding_reads_coordinate_tokens_in_image_pixels():
    # image 448 x 224; tokens 0, 0, 112, 224 of 224 bins -> (0, 0, 224, 224) pixels, the ground truth exactly
    record = EvalRecord(id="1", box=(0.0, 0.0, 224.0, 224.0), meta={"width": 448, "height": 224})
    answer = "<phrase>the dog</phrase><object><patch_index_0000><patch_index_0000>" \
             "<patch_index_0112><patch_index_0224></object>"
    assert score_grounding([answer], [record]) == 1.0
    assert score_grounding(["no box here"], [record]) == 0.0


def test_test_split_records_without_ground_truth_are_refused():
    with pytest.raises(ValueError, match="scored by the benchmark's server"):
        score_vqa(["yes"], [EvalRecord(id="1")])
