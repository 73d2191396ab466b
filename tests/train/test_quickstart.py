"""The quickstart's stage chain and its time-sliced stages (the full 20-minute run is measured, not tested)."""

from __future__ import annotations

import json

import pytest

from emu2.train.quickstart import LM_STAGES, PROBE_STEPS, STAGES, STAGES_WITHOUT_LM, train_stage

TINY = ["model.preset=tiny-chat", "model.image_size=null", "model.activation_checkpointing=false",
        "mixed_precision=no", "log.progress=false", "data.max_length=256", "data.shuffle_buffer=4",
        "data.num_workers=0"]


@pytest.mark.parametrize("stages", [STAGES, STAGES_WITHOUT_LM])
def test_the_stages_run_in_the_papers_order_each_from_an_earlier_stage(stages):
    """Both stand-ins by default (the LM stages, which teach copying, included); `--no-lm-stage` drops them."""
    names = [name for name, *_ in stages]
    assert [n for n in names if n not in LM_STAGES] == ["encoder", "stage1", "stage2", "decoder", "chat", "gen"]
    for index, (name, _recipe, init_from, _share) in enumerate(stages):
        assert init_from is None or init_from in names[:index], name
    chain = {name: init_from for name, _recipe, init_from, _share in stages}
    assert chain["stage1"] == "encoder"  # stage 1 starts from the pre-trained encoder ...
    if "lm" in chain:  # ... which trained the vision side of the LM stages' output: both stand-ins
        assert names[:2] == ["lm", "lm-long"] and chain["lm"] is None and chain["lm-long"] == "lm"
        assert chain["encoder"] == "lm-long"  # short rows first (copying), then long packed ones
    else:
        assert chain["encoder"] is None and "lm-long" not in chain
    # every stage has a share; those after the LM stages split what they leave
    assert abs(sum(share for name, *_, share in stages if name not in LM_STAGES) - 1.0) < 1e-9
    assert all(share > 0 for *_, share in stages)
    assert any(name == "lm" for name, *_ in STAGES)  # the default


def test_the_encoder_stage_fills_its_time_share_from_a_timed_probe(shapes_dir, tmp_path):
    overrides = [*TINY, "data.streams.pairs.batch_size=4"]
    for run in ("short", "longer"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "data").symlink_to(shapes_dir, target_is_directory=True)

    short = train_stage("encoder", "shapes-encoder", None, 0.0, tmp_path / "short", overrides)
    assert short["step"] == PROBE_STEPS + 1  # no time left after the probe: one step past it

    longer = train_stage("encoder", "shapes-encoder", None, 40 * short["seconds_per_step"] + short["seconds"],
                          tmp_path / "longer", overrides)
    assert longer["step"] > 4 * PROBE_STEPS
    rows = [json.loads(line) for line in (tmp_path / "longer" / "encoder" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == longer["step"] and all(row["step_seconds"] > 0 for row in rows)
    assert (tmp_path / "longer" / "encoder" / "config.json").is_file()  # a model directory stage 1 can start from


def test_a_stage_an_interrupted_run_left_unfinished_is_trained_again(shapes_dir, tmp_path):
    (tmp_path / "data").symlink_to(shapes_dir, target_is_directory=True)
    overrides = [*TINY, "data.streams.pairs.batch_size=4"]
    from emu2.train import load_config, train

    interrupted = load_config("shapes-encoder", [*overrides, f"output_dir={tmp_path / 'encoder'}",
                                                 f"data.root={tmp_path / 'data'}", "checkpoint.every=1"])
    train(interrupted, stop_after=2)  # checkpoints, no model directory: what a killed quickstart leaves
    result = train_stage("encoder", "shapes-encoder", None, 0.0, tmp_path, overrides)
    assert result["finished"] and (tmp_path / "encoder" / "config.json").is_file()


def test_a_stage_that_overran_is_absorbed_by_the_stages_after_it():
    from emu2.train.quickstart import stage_seconds

    shares = [0.5, 0.25, 0.25]
    assert stage_seconds(0.5, shares, 1000.0) == 500.0
    # The first stage took 600 s instead of 500: the other two split the 400 s left, not 250 s each.
    assert stage_seconds(0.25, shares[1:], 400.0) == 200.0
    assert stage_seconds(0.25, shares[2:], 200.0) == 200.0
    assert stage_seconds(0.25, shares[1:], -30.0) == 0.0  # past the deadline: probe steps only


def test_the_lm_stage_stops_at_its_recipes_steps_when_its_share_would_allow_more(shapes_dir, tmp_path):
    (tmp_path / "data").symlink_to(shapes_dir, target_is_directory=True)
    result = train_stage("lm", "shapes-lm", None, 3600.0, tmp_path, [*TINY, "steps=8", "data.streams.text.batch_size=2"],
                          capped=True)
    assert result["step"] == 8
    assert (tmp_path / "lm" / "config.json").is_file()  # a model directory stage 1 can start from


def test_the_quickstart_leaves_a_gen_directory_every_verb_reads_and_says_how_to_use_it(tmp_path):
    """`emu2-gen/` = the Gen stage's model + the decoder stage's UNet, in `Emu2GenPipeline`'s layout; the decoder
    records the world's image size as its SDXL size condition (official checkpoints keep 1024)."""
    from emu2.pipelines.gen import Emu2GenPipeline
    from emu2.train.quickstart import assemble_gen_directory, usage_commands

    tiny = Emu2GenPipeline.from_preset("tiny")
    tiny.encoder.save_pretrained(tmp_path / "gen")
    tiny.decoder.save_pretrained(tmp_path / "decoder")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"seed": 0, "image_size": 48}))
    target = assemble_gen_directory(tmp_path)
    loaded = Emu2GenPipeline.from_pretrained(target)
    assert loaded.decoder.config.original_size == [48, 48]
    assert tiny.decoder.config.get("original_size") is None  # what an official decoder has: (1024, 1024)
    text = usage_commands(tmp_path)
    assert f"--model {tmp_path / 'chat'}" in text and f"--gen-model {tmp_path / 'emu2-gen'}" in text
    assert f"emu2 generate --model {target}" in text


def test_auto_precision_takes_bf16_on_a_cpu_only_where_it_is_measured_faster(monkeypatch):
    import torch

    import emu2.train.quickstart as quickstart

    assert quickstart.resolve_precision("fp32") == "no" and quickstart.resolve_precision("bf16") == "bf16"
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    if torch.cuda.is_available() or not supported:
        pytest.skip("the timing decides only on a CPU with bf16 kernels")
    monkeypatch.setattr(quickstart, "cpu_bf16_speedup", lambda: 0.6)
    assert quickstart.resolve_precision("auto") == "no"
    monkeypatch.setattr(quickstart, "cpu_bf16_speedup", lambda: 1.5)
    assert quickstart.resolve_precision("auto") == "bf16"



def test_an_lm_stage_its_share_stopped_short_is_said():
    from emu2.train.quickstart import short_lm_note

    assert short_lm_note(1500, 1500) is None
    note = short_lm_note(700, 1500)
    assert note is not None and "700 of its recipe's 1,500 steps" in note and "--budget" in note


def test_a_run_whose_finished_stages_were_chained_otherwise_is_refused_not_continued(tmp_path):
    """An earlier emu2 trained the LM from the encoder's output; continuing that run would start stage 1 from an
    encoder directory without the trained LM."""
    from emu2.train.quickstart import check_reused_chain

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "train_config.yaml").write_text(f"model:\n  init_from: {tmp_path / 'encoder'}\n")
    todo = [stage for stage in STAGES if stage[0] not in ("lm", "encoder")]
    with pytest.raises(ValueError, match="trained from .*encoder.*chains it from a random preset"):
        check_reused_chain(tmp_path, STAGES, todo)
    (tmp_path / "lm" / "train_config.yaml").write_text("model:\n  init_from: null\n")
    check_reused_chain(tmp_path, STAGES, todo)  # the chain this build runs: continued


def test_a_cpu_slower_than_the_reference_is_told_the_budget_that_matches_it():
    from emu2.train.quickstart import slow_cpu_note

    assert slow_cpu_note(1.1, 20) is None
    note = slow_cpu_note(1.73, 20)
    assert note is not None and "1.7x slower" in note and "--budget 35" in note


def test_the_evaluation_reserve_grows_with_the_lm_stages_step_time(capsys):
    from emu2.train.quickstart import EVAL_RESERVE_S, REFERENCE_LM_STEP_S, scale_eval_reserve

    def after_lm(step_seconds: float) -> tuple[dict, float]:
        report = {}
        return report, scale_eval_reserve(report, step_seconds, started=0.0, budget_minutes=20)

    report, deadline = after_lm(REFERENCE_LM_STEP_S / 2)  # a faster machine keeps the measured reserve
    assert report["eval_reserve_s"] == EVAL_RESERVE_S and deadline == 1200 - EVAL_RESERVE_S
    assert capsys.readouterr().out == ""
    report, deadline = after_lm(2 * REFERENCE_LM_STEP_S)
    assert report["eval_reserve_s"] == 2 * EVAL_RESERVE_S and deadline == 1200 - 2 * EVAL_RESERVE_S
    assert "2.0x slower" in capsys.readouterr().out
    report, _ = after_lm(10 * REFERENCE_LM_STEP_S)
    assert report["eval_reserve_s"] == 3 * EVAL_RESERVE_S  # at most 3x
