"""`emu2 bench generate` on a tiny Gen pipeline: its cases run and its comparisons are the stated ones."""

import pytest

from emu2.bench.generate import run, twelve_shot_prompt
from emu2.bench.regression import bench_config
from emu2.pipelines.emu2 import Emu2Pipeline
from emu2.pipelines.gen import Emu2GenPipeline


@pytest.fixture(scope="module")
def report():
    gen = Emu2GenPipeline.from_preset("tiny")
    gen.decoder.set_progress_bar_config(disable=True)
    return run(repeats=1, gen=gen)


def test_twelve_shot_prompt_is_about_1000_tokens_for_the_benchmark_model():
    from emu2.model import Emu2ForCausalLM
    from emu2.processing import load_tokenizer

    encoder = Emu2Pipeline(Emu2ForCausalLM(bench_config()), load_tokenizer())
    prompt = twelve_shot_prompt()
    assert sum(not isinstance(item, str) for item in prompt) == 12
    assert 900 <= encoder.encode_interleaved(prompt)["input_ids"].shape[1] <= 1100


def test_bench_reports_a_short_and_a_12_shot_case_with_image_differences(report):
    assert set(report["cases"]) == {"short", "12_shot"}
    for case in report["cases"].values():
        assert case["official_s"] > 0 and case["ours_s"] > 0
        assert case["official_first_call_s"] > case["official_s"]
        assert {"max_grey_diff", "mean_grey_diff", "psnr_db", "own_clip_i"} <= set(case["ours_vs_official"])


def test_ours_with_the_official_sampler_reproduces_the_official_algorithms_image(report):
    for case in report["cases"].values():
        assert case["ours_official_sampler_vs_official"]["max_grey_diff"] <= 1
