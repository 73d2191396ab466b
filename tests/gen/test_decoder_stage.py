"""The decoder recipe stages (`emu2 train shapes-decoder`, `shapes-video-decoder`): exact resumption from
atomic checkpoints (with gradient accumulation too), outputs that load and sample, and a video decoder that
learns on shapes clips."""

import json

import pytest
import torch

from emu2.model.decoder_configs import decoder_scheduler_config, video_decoder_unet_config
from emu2.pipelines.video_decoder import Emu2VideoDecoderPipeline
from emu2.train import train
from emu2.train.config import load_config
from emu2.train.stages.diffusion import accumulated_update, freeze_for_decoder_training, video_decoder_loss

from ..conftest import write_tiny_world

SIZE = 16  # the test world's image side; the UNets work at SIZE / 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16 px shapes world (8 samples of every kind) and a random tiny stage-1 model as the frozen encoder."""
    return write_tiny_world(tmp_path_factory.mktemp("decoder-stage"), SIZE)


def _config(recipe, world, out, *overrides):
    common = [
        f"output_dir={out}", f"model.init_from={world / 'encoder'}", f"data.root={world / 'data'}", "steps=4",
        "log.progress=false", "log.tensorboard=false", "log.every=1", "checkpoint.every=1000",
        f"decoder.output_image_size={SIZE}", "decoder.pixel_scale=2", "decoder.channels=[8,16]",
        "decoder.attention=[false,true]",
    ]
    return load_config(recipe, [*common, *overrides])


def _image_config(world, out, *overrides):
    return _config("shapes-decoder", world, out, "data.streams.images.batch_size=2", *overrides)


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _unet_state(out):
    from safetensors.torch import load_file

    return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_accumulated_decoder_run_logs_optimizer_steps_and_resumes_exactly(world, tmp_path):
    """batch_size 4 per optimizer step, in gradient_accumulation_steps=2 micro-batches of 2."""
    accumulate = ("data.streams.images.batch_size=4", "gradient_accumulation_steps=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(_image_config(world, straight, *accumulate))["finished"]
    assert train(_image_config(world, resumed, *accumulate), stop_after=2)["step"] == 2
    assert (resumed / "checkpoints" / "step-00000002" / "manifest.json").is_file()
    assert train(_image_config(world, resumed, *accumulate), resume=True)["finished"]

    assert [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert _losses(resumed) == _losses(straight)
    a, b = _unet_state(straight), _unet_state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_size_that_accumulation_does_not_divide_is_refused(world, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=2 is not a positive multiple .* gradient_accumulation_steps \(3\)"):
        train(_image_config(world, tmp_path, "gradient_accumulation_steps=3"))


def test_resume_falls_back_past_a_corrupted_checkpoint(world, tmp_path):
    out = tmp_path / "run"
    train(_image_config(world, out, "checkpoint.every=1", "checkpoint.keep_last=3"), stop_after=3)
    (out / "checkpoints" / "step-00000003" / "optimizer.pt").write_bytes(b"torn write")
    with pytest.warns(RuntimeWarning, match="step-00000003"):
        result = train(_image_config(world, out, "checkpoint.every=1", "checkpoint.keep_last=3"), resume=True)
    assert result["finished"] and [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text()
                                    .splitlines()] == [1, 2, 3, 4]


def test_decoder_stage_output_autoencodes_at_the_output_size(world, tmp_path):
    from PIL import Image

    from emu2.pipelines.emu2 import Emu2Pipeline
    from emu2.pipelines.gen import Emu2GenPipeline
    from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

    out = tmp_path / "decoder"
    train(_image_config(world, out, "decoder.scheduler.prediction_type=v_prediction", "decoder.snr_gamma=5"))
    decoder = Emu2VisualDecoderPipeline.from_pretrained(out)
    assert decoder.pixel_scale == 2 and decoder.unet.config.sample_size == SIZE // 2
    assert decoder.scheduler.config.prediction_type == "v_prediction"
    decoder.set_progress_bar_config(disable=True)
    gen = Emu2GenPipeline(Emu2Pipeline.from_pretrained(world / "encoder"), decoder)
    image = gen([Image.new("RGB", (SIZE, SIZE), (200, 30, 30))], num_inference_steps=2).image
    assert image.size == (SIZE, SIZE)


def test_unknown_decoder_options_are_named(world, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'pixel_scale'"):
        train(_image_config(world, tmp_path, "decoder.pixel_scal=2"))
    with pytest.raises(ValueError, match="cache_embeddings needs decoder.max_scale"):
        train(_image_config(world, tmp_path, "decoder.cache_embeddings=true", "decoder.max_scale=1.2"))


def _video_config(world, out, *overrides):
    return _config("shapes-video-decoder", world, out, "data.streams.clips.batch_size=2", "decoder.num_frames=4",
                   *overrides)


def test_video_decoder_stage_trains_resumes_and_samples_frames(world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(_video_config(world, straight))["finished"]
    train(_video_config(world, resumed), stop_after=1)
    assert train(_video_config(world, resumed), resume=True)["finished"]
    assert _losses(resumed) == _losses(straight)

    pipe = Emu2VideoDecoderPipeline.from_pretrained(straight)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.pixel_scale == 2
    width = pipe.unet.config.cross_attention_dim
    embeds = torch.randn(2, 4, 4, width)  # (B, F, v_query, Dv)
    frames = pipe(embeds, torch.zeros(1, 1, 4, width), num_inference_steps=2, output_type="np").frames
    assert frames.shape == (2, 4, SIZE, SIZE, 3)
    clips = pipe(embeds[:1], torch.zeros(1, 1, 4, width), num_inference_steps=1, output_type="pil").frames
    assert len(clips) == 1 and len(clips[0]) == 4 and clips[0][0].size == (SIZE, SIZE)


def test_video_decoder_stage_accumulates_micro_batches(world, tmp_path):
    out = tmp_path / "video"
    result = train(_video_config(world, out, "gradient_accumulation_steps=2", "steps=2"))
    assert result["finished"] and len(_losses(out)) == 2


def test_video_decoder_learns_a_fixed_batch_of_shapes_clips(world):
    from collections import Counter

    from emu2.data.records import decode_record, read_shard
    from emu2.train.stages.decoder import clip_tensor

    shard = next((world / "data" / "train").glob("video_pair-*.tar"))
    clips = [decode_record("video_pair", s).frames[:4] for s, _ in zip(read_shard(str(shard), Counter()), range(2))]
    frames = torch.stack([clip_tensor(c, SIZE) for c in clips])  # (2, 4, 3, 16, 16)
    torch.manual_seed(0)
    pipe = Emu2VideoDecoderPipeline.from_configs(
        video_decoder_unet_config(8, SIZE // 2, (8, 16), (False, True)),
        scheduler_config=decoder_scheduler_config({"prediction_type": "v_prediction"}), pixel_scale=2,
    )
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=3e-3)
    embeds = torch.randn(2, 4, 2, 8, generator=torch.Generator().manual_seed(1))
    losses = [
        accumulated_update(pipe.unet, [video_decoder_loss(pipe, frames, embeds, generator=torch.Generator().manual_seed(0))],
                           optimizer)
        for _ in range(15)
    ]
    assert losses[-1] < 0.6 * losses[0], losses
