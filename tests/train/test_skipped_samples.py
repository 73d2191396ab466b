"""Samples the data layer skips are reported by reason (metrics.jsonl, the summary, the CLI's last line) and a
run whose skipped share passes ``data.max_skipped_fraction`` stops with a message naming it."""

import json

import pytest

from emu2.train import train
from emu2.train.cli import main
from emu2.train.config import ConfigError
from emu2.train.data import SkippedSampleReport, SkippedSamples, TooManySkippedSamples, build_data
from emu2.train.metrics import read_metrics
from emu2.train.model import build_model

from ..conftest import cut_before_sample, write_converted_pair_shard, write_damaged_pair_shards
from .conftest import tiny_config


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    return write_damaged_pair_shards(tmp_path_factory.mktemp("damaged"))


def _config(out, shards, *overrides):
    stream = f"{{pairs: {{batch_size: 2, sources: [{{kind: pair, urls: '{shards}/{{mixed,cut}}.tar'}}]}}}}"
    return tiny_config("shapes-stage1", out, overrides=[f"data.streams={stream}", "steps=4", *overrides],
                       batch_size=2)


def test_skipped_counts_are_reported_by_reason_in_metrics_and_summary(damaged_shards, tmp_path):
    summary = train(_config(tmp_path, damaged_shards, "data.max_skipped_fraction=1.0"))
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    last = records[-1]
    assert last["skipped/bad_image"] >= 1 and last["skipped/read_errors"] >= 1
    reasons = {k.removeprefix("skipped/"): v for k, v in last.items() if k.startswith("skipped/")}
    assert last["skipped"] == sum(reasons.values()) and 0 < last["skipped_fraction"] < 1
    assert summary["skipped"] == reasons and summary["skipped_fraction"] == last["skipped_fraction"]


def test_a_run_past_the_skipped_threshold_stops_with_a_message(damaged_shards, tmp_path):
    with pytest.raises(TooManySkippedSamples, match=r"skipped \d+ \(bad_image \d+.*more than "
                                                    r"data\.max_skipped_fraction=0\.1\b"):
        train(_config(tmp_path, damaged_shards, "data.max_skipped_fraction=0.1"))
    assert read_metrics(tmp_path)[-1]["skipped_fraction"] > 0.1  # the counts that stopped it were logged


def test_the_train_command_exits_with_the_reason_when_too_many_samples_are_skipped(damaged_shards, tmp_path):
    import yaml

    recipe = tmp_path / "damaged.yaml"
    recipe.write_text(yaml.safe_dump(_config(tmp_path / "run", damaged_shards).to_dict()))
    with pytest.raises(SystemExit) as stopped:
        main([str(recipe), "data.max_skipped_fraction=0.1"])
    assert str(stopped.value).startswith("emu2 train: skipped ") and "\n" not in str(stopped.value)


def test_a_complete_run_prints_the_skipped_counts_in_its_summary_line(damaged_shards, tmp_path, capsys):
    import yaml

    recipe = tmp_path / "damaged.yaml"
    recipe.write_text(yaml.safe_dump(_config(tmp_path / "run", damaged_shards).to_dict()))
    assert main([str(recipe), "data.max_skipped_fraction=1.0"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"]["bad_image"] >= 1


def test_read_errors_count_as_skipped_samples_and_the_text_names_each_reason():
    skipped = SkippedSamples.from_stats({"samples": 8, "samples.pair": 8, "skipped.bad_image": 1, "read_errors": 1})
    assert skipped.by_reason == {"bad_image": 1, "read_errors": 1}
    assert skipped.fraction == pytest.approx(0.2)
    assert skipped.text() == "skipped 2 (bad_image 1, read_errors 1)"


def test_one_skip_among_the_first_samples_does_not_stop_a_run():
    SkippedSamples.from_stats({"samples": 3, "skipped.bad_image": 1}).check(0.01)  # 4 read: too few to judge 1%
    with pytest.raises(TooManySkippedSamples):
        SkippedSamples.from_stats({"samples": 98, "skipped.bad_image": 2}).check(0.01)
    SkippedSamples.from_stats({"samples": 0, "skipped.bad_image": 5}).check(1.0)  # 1.0: never stops


def test_a_skipped_fraction_outside_0_1_is_refused():
    with pytest.raises(ConfigError, match=r"data\.max_skipped_fraction must be in \[0, 1\]"):
        tiny_config("shapes-stage1", "unused", overrides=["data.max_skipped_fraction=1.5", "data.root=/x"])


def test_any_consumer_of_build_data_gets_the_skipped_counts_for_its_bar_metrics_and_summary(damaged_shards, tmp_path):
    config = _config(tmp_path, damaged_shards)
    model, tokenizer = build_model(config)
    streams = build_data(config, model.config, tokenizer)
    report = SkippedSampleReport(streams, max_fraction=1.0)
    batches = iter(streams)
    for _ in range(4):
        next(batches)
        values = report.update()
    assert values["skipped/bad_image"] >= 1 and values["skipped"] == report.last.total
    assert report.postfix().startswith(" | skipped ") and "bad_image" in report.postfix()
    summary = report.summary()
    assert summary["skipped"]["bad_image"] >= 1 and 0 < summary["skipped_fraction"] < 1


def test_a_report_stops_once_the_skipped_share_passes_its_threshold():
    report = SkippedSampleReport({"samples": 98, "skipped.bad_image": 2}, max_fraction=0.01)
    with pytest.raises(TooManySkippedSamples, match=r"data\.max_skipped_fraction=0\.01"):
        report.update()
    assert report.update(check=False)["skipped_fraction"] == pytest.approx(0.02)  # read, but not judged


def test_a_report_over_data_without_counters_reports_nothing():
    report = SkippedSampleReport(None, max_fraction=0.0)
    assert report.update() == {} and report.postfix() == "" and report.summary() == {}


def test_a_shard_cut_at_a_member_boundary_is_reported_as_a_truncated_shard(tmp_path):
    shard = write_converted_pair_shard(tmp_path / "data", count=6)
    cut_before_sample(shard, 3)
    stream = f"{{pairs: {{batch_size: 2, sources: [{{kind: pair, urls: '{shard}'}}]}}}}"
    config = tiny_config("shapes-stage1", tmp_path / "run", batch_size=2,
                         overrides=[f"data.streams={stream}", "steps=3", "data.max_skipped_fraction=1.0"])
    summary = train(config)
    assert read_metrics(tmp_path / "run")[-1]["skipped/truncated_shard"] >= 1
    assert summary["skipped"]["truncated_shard"] >= 1
    # Each read of the shard gives 3 samples and 1 skip: 25% lost, past 10%.
    with pytest.raises(TooManySkippedSamples, match=r"skipped \d+ \(truncated_shard \d+\)"):
        train(tiny_config("shapes-stage1", tmp_path / "stopped", batch_size=2,
                          overrides=[f"data.streams={stream}", "steps=6", "data.max_skipped_fraction=0.1"]))


