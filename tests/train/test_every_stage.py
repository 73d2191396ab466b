"""What the one runner promises every training stage (`emu2.train.runner`), checked on each of them through
`emu2.train.train` and the files a run writes: the language-model stages (stage 1 here), the encoder
pre-training, the image decoder and the video decoder.

- the recipe's ``optim.betas``, ``optim.eps``, ``optim.weight_decay`` are in the optimizer, and the learning
  rate follows ``schedule`` (warm-up, decay);
- a loss that stops being finite stops the run before the update, naming the last good checkpoint;
- a run interrupted after a checkpoint and resumed ends bit-equal to one that was not interrupted;
- damaged data is counted by reason, and past ``data.max_skipped_fraction`` the run stops.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emu2.lr_schedule import lr_factor
from emu2.train import TrainingDiverged, train
from emu2.train.checkpoint import list_checkpoints, verify
from emu2.train.config import load_config
from emu2.train.data import TooManySkippedSamples
from emu2.train.metrics import read_metrics

from ..conftest import cut_before_sample, write_damaged_pair_shards, write_tiny_world
from .conftest import tiny_config

SIZE = 16  # the test world's image side
STAGES = ["lm", "encoder", "decoder", "video-decoder"]
DECODER = [f"decoder.output_image_size={SIZE}", "decoder.pixel_scale=2", "decoder.channels=[8,16]",
           "decoder.attention=[false,true]"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16 px shapes world (8 samples of every kind) and a random tiny model, the decoders' frozen encoder."""
    return write_tiny_world(tmp_path_factory.mktemp("every-stage"), SIZE)


def stage_config(stage: str, world, out, *overrides):
    """A 4-step run of ``stage`` on the tiny presets; ``overrides`` apply last."""
    common = ["steps=4", *overrides]
    if stage == "lm":
        return tiny_config("shapes-stage1", out, world / "data", batch_size=2, overrides=common)
    if stage == "encoder":
        return tiny_config("shapes-encoder", out, world / "data", batch_size=2,
                           overrides=["encoder.attribute_pool=16", *common])
    recipe, stream = {"decoder": ("shapes-decoder", "images"), "video-decoder": ("shapes-video-decoder", "clips")}[stage]
    extra = ["decoder.num_frames=4"] if stage == "video-decoder" else []
    return load_config(recipe, [
        f"output_dir={out}", f"model.init_from={world / 'encoder'}", f"data.root={world / 'data'}",
        "log.progress=false", "log.tensorboard=false", "log.every=1", "checkpoint.every=1000",
        f"data.streams.{stream}.batch_size=2", *DECODER, *extra, *common])


def trained_group(config) -> str:
    """The parameter group whose learning rate the test follows: the one group the stage trains first."""
    return next(g for g in ("lm", "visual", "unet") if g in config.optim.lr and g not in config.optim.freeze)


def output_tensors(out) -> dict:
    """Every tensor of a finished stage's output directory, by file and name."""
    return {f"{path.relative_to(out)}:{name}": tensor for path in sorted(out.rglob("*.safetensors"))
            if "checkpoints" not in path.parts for name, tensor in load_file(path).items()}


@pytest.mark.parametrize("stage", STAGES)
def test_the_optimizer_has_the_recipes_betas_eps_and_weight_decay_and_follows_its_schedule(stage, world, tmp_path):
    config = stage_config(stage, world, tmp_path, "optim.betas=[0.8,0.95]", "optim.eps=1e-5",
                          "optim.weight_decay=0.02", "schedule.warmup_steps=1", "schedule.decay=linear",
                          "checkpoint.every=1")
    train(config)
    state = torch.load(tmp_path / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    assert state["param_groups"]
    assert all((tuple(g["betas"]), g["eps"]) == ((0.8, 0.95), 1e-5) for g in state["param_groups"])
    assert any(g["weight_decay"] == 0.02 for g in state["param_groups"])
    group = trained_group(config)
    rates = [row[f"lr/{group}"] for row in read_metrics(tmp_path)]
    peak = config.optim.lr[group]
    assert rates == pytest.approx([peak * lr_factor(k, 4, 1, "linear") for k in range(4)])


@pytest.mark.parametrize("stage", STAGES)
def test_a_loss_that_is_not_finite_stops_the_run_before_the_update(stage, world, tmp_path):
    config = stage_config(stage, world, tmp_path, "checkpoint.every=1", "checkpoint.keep_last=10")
    config.optim.lr = {group: 1e30 for group in config.optim.lr}  # the first update blows the weights up
    with pytest.raises(TrainingDiverged, match="stopped before updating the weights") as err:
        train(config)
    saved = [step for step, _ in list_checkpoints(tmp_path / "checkpoints")]
    assert saved and f"step {saved[0] + 1}:" in str(err.value)  # the failing step is the one after the last save
    assert f"step-{saved[0]:08d}" in str(err.value) and verify(tmp_path / "checkpoints" / f"step-{saved[0]:08d}") is None
    assert not output_tensors(tmp_path)  # a run that stopped writes no stage output


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_interrupted_and_resumed_ends_bit_equal_to_an_uninterrupted_one(stage, world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(stage_config(stage, world, straight))["finished"]
    first = train(stage_config(stage, world, resumed), stop_after=2)
    assert (first["step"], first["finished"]) == (2, False) and not output_tensors(resumed)
    with pytest.raises(FileExistsError, match="--resume"):
        train(stage_config(stage, world, resumed))  # a fresh run never overwrites checkpoints
    assert train(stage_config(stage, world, resumed), resume=True)["finished"]

    assert [r["loss"] for r in read_metrics(resumed)] == [r["loss"] for r in read_metrics(straight)]
    a, b = output_tensors(straight), output_tensors(resumed)
    assert a and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def damaged_source(stage: str, world, root) -> str:
    """A data source for ``stage`` with damaged samples: caption pairs with two images that are not images and a
    shard cut inside a sample (`write_damaged_pair_shards`), or, for the video decoder, four copies of a video
    shard cut before its fourth sample."""
    if stage == "video-decoder":
        for copy in "abcd":
            shutil.copy(next((world / "data" / "train").glob("video_pair-*.tar")), root / f"video-{copy}.tar")
            cut_before_sample(root / f"video-{copy}.tar", 3)
        return f"{{kind: video_pair, urls: '{root}/video-{{a,b,c,d}}.tar'}}"
    return f"{{kind: pair, urls: '{write_damaged_pair_shards(root, SIZE)}/{{mixed,cut}}.tar'}}"


def damaged_config(stage: str, world, root, out, *overrides):
    stream = {"lm": "pairs", "encoder": "pairs", "decoder": "images", "video-decoder": "clips"}[stage]
    extra = (["encoder.contrastive=1.0", "encoder.attributes=0.0", "encoder.word_projection=false"]
             if stage == "encoder" else [])
    if stage == "video-decoder":
        extra.append("decoder.num_frames=2")  # frames of the cut shard's clips
    return stage_config(stage, world, out, f"data.streams.{stream}.sources=[{damaged_source(stage, world, root)}]",
                        *extra, *overrides)


@pytest.mark.parametrize("stage", STAGES)
def test_damaged_data_is_counted_by_reason_and_stops_the_run_past_the_threshold(stage, world, tmp_path):
    summary = train(damaged_config(stage, world, tmp_path, tmp_path / "run", "data.max_skipped_fraction=1.0"))
    assert summary["skipped"] and summary["skipped_fraction"] > 0.1
    last = read_metrics(tmp_path / "run")[-1]
    assert all(last[f"skipped/{reason}"] == count for reason, count in summary["skipped"].items())
    with pytest.raises(TooManySkippedSamples, match=r"data\.max_skipped_fraction=0\.1\b"):
        train(damaged_config(stage, world, tmp_path, tmp_path / "strict", "data.max_skipped_fraction=0.1"))


def test_stages_of_different_mixed_precision_run_one_after_another_in_one_process(world, tmp_path):
    """The quickstart trains its LM stages in bf16 and the encoder stage in fp32 in one process; accelerate keeps
    one mixed-precision setting per process, so this runs in a fresh interpreter."""
    import subprocess
    import sys

    script = "\n".join([
        "import sys, torch",
        "from pathlib import Path",
        "from emu2.train import train",
        "from tests.train.test_every_stage import stage_config",
        "world, out = Path(sys.argv[1]), Path(sys.argv[2])",
        "torch.set_num_threads(1)",
        "for stage, precision in [('lm', 'bf16'), ('encoder', 'no'), ('decoder', 'no'), ('lm', 'bf16')]:",
        "    config = stage_config(stage, world, out / f'{len(list(out.iterdir()))}-{stage}', 'steps=1', f'mixed_precision={precision}')",
        "    assert train(config)['finished'], stage",
    ])
    run = subprocess.run([sys.executable, "-c", script, str(world), str(tmp_path)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
