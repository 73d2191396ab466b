"""The full-scale decoder stage (`emu2 train emu2-decoder`) on tiny stand-ins: an SDXL-like local folder whose
UNet has another cross-attention width than the encoder, its frozen VAE, and streamed image shards of real,
varied sizes (paper 2.2.3, A.3.1)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from emu2.train import train
from emu2.train.config import load_config

from . import tiny

SIZE = 16  # output side; the tiny VAE halves it
SDXL_TEXT_WIDTH, SDXL_POOLED_WIDTH = 24, 12  # stand-ins for SDXL's 2048 / 1280, both != the encoder's width
SIZES = [(40, 24), (24, 32), (30, 30), (17, 50), (64, 20), (22, 22), (36, 18)]  # (width, height), all >= 16
TOO_SMALL = (12, 30)



def _sdxl_like_unet_config() -> dict:
    return {**tiny.unet_config(), "cross_attention_dim": SDXL_TEXT_WIDTH,
            "projection_class_embeddings_input_dim": SDXL_POOLED_WIDTH + 6 * tiny.TIME_DIM}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """sdxl/{unet,vae} (save_pretrained), a tiny stage-1 encoder, and two pair shards: images of the SIZES, one
    too small, one whose bytes are not an image."""
    import webdataset as wds
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from emu2.data.kinds import ImageTextPair
    from emu2.data.records import encode_record
    from emu2.pipelines.emu2 import Emu2Pipeline

    root = tmp_path_factory.mktemp("decoder-full-scale")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(_sdxl_like_unet_config()).save_pretrained(root / "sdxl" / "unet")
    AutoencoderKL.from_config(tiny.vae_config()).save_pretrained(root / "sdxl" / "vae")
    Emu2Pipeline.from_preset("tiny").save_pretrained(root / "encoder")
    rng = np.random.default_rng(0)
    samples = [encode_record(ImageTextPair(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "x"),
                             f"{i:04d}") for i, (w, h) in enumerate([*SIZES, TOO_SMALL])]
    samples.append({"__key__": "broken", "jpg": b"not an image", "txt": "x"})
    (root / "shards").mkdir()
    for shard, part in enumerate((samples[:5], samples[5:])):
        with wds.TarWriter(str(root / "shards" / f"pairs-{shard}.tar")) as writer:
            for sample in part:
                writer.write(sample)
    return root


def _config(world, out, *overrides):
    """The packaged full-scale recipe, shrunk: only sizes, step counts and paths change."""
    return load_config("emu2-decoder", [
        f"output_dir={out}", f"model.init_from={world / 'encoder'}", f"decoder.unet_init={world / 'sdxl'}",
        f"data.streams.images.sources=[{{kind: pair, urls: '{world / 'shards'}/pairs-{{0..1}}.tar'}}]",
        "data.streams.images.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "steps=4",
        "gradient_accumulation_steps=1",  # the recipe splits 2,048 into 256 micro-batches
        "mixed_precision=no", "optim.lr.unet=1e-3", "schedule.warmup_steps=1", "checkpoint.every=1000",
        "log.progress=false", "log.tensorboard=false", "log.every=1", f"decoder.output_image_size={SIZE}",
        "decoder.encoder_image_size=56", "decoder.min_image_size=16", *overrides,
    ])


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def test_sdxl_unet_takes_the_vision_width_and_only_the_resized_projections_are_reinitialised(world):
    from emu2.convert.sdxl import load_pretrained_decoder_unet

    unet, reinitialised = load_pretrained_decoder_unet(world / "sdxl", vision_width=64, sample_size=SIZE // 2)
    expected = {k for k in _weights(world / "sdxl" / "unet")
                if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) or k == "add_embedding.linear_1.weight"}
    assert set(reinitialised) == expected and len(expected) == 9  # 4 cross-attention blocks x (k, v) + 1
    assert reinitialised["add_embedding.linear_1.weight"] == ((32, SDXL_POOLED_WIDTH + 24), (32, 64 + 24))
    assert all(new[1] == 64 for key, (_, new) in reinitialised.items() if "attn2" in key)
    assert (unet.config.cross_attention_dim, unet.config.projection_class_embeddings_input_dim) == (64, 88)
    assert unet.config.sample_size == SIZE // 2
    before, after = _weights(world / "sdxl" / "unet"), unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in reinitialised)  # biases included
    assert all(after[k].std() > 0 for k in reinitialised)  # freshly initialised, not left empty
    embeds = torch.randn(1, 4, 64)
    added = {"text_embeds": embeds.mean(1), "time_ids": torch.tensor([[30, 40, 0, 0, SIZE, SIZE]])}
    assert unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=embeds, added_cond_kwargs=added).sample.shape == (
        1, 4, 8, 8)


def test_full_scale_stage_trains_only_the_unet_on_vae_latents_and_saves_a_pipeline_that_generates(world, tmp_path):
    from emu2.pipelines.emu2 import Emu2Pipeline
    from emu2.pipelines.gen import Emu2GenPipeline
    from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

    out = tmp_path / "decoder"
    result = train(_config(world, out))
    assert result["finished"] and all(np.isfinite(_losses(out))) and len(_losses(out)) == 4
    report = json.loads((out / "unet_init.json").read_text())
    assert sorted(report["reinitialised"]) == sorted(result["reinitialised"]) and len(result["reinitialised"]) == 9
    assert result["skipped"]["bad_image"] >= 1 and result["skipped"]["too_small"] >= 1

    pretrained, trained = _weights(world / "sdxl" / "unet"), _weights(out / "unet")
    kept = [k for k in pretrained if k not in report["reinitialised"]]
    assert sum(not torch.equal(pretrained[k], trained[k]) for k in kept) > len(kept) // 2  # the UNet learnt
    vae_before, vae_after = _weights(world / "sdxl" / "vae"), _weights(out / "vae")
    assert all(torch.equal(vae_before[k], vae_after[k]) for k in vae_before)  # the VAE is frozen

    decoder = Emu2VisualDecoderPipeline.from_pretrained(out)
    assert decoder.vae is not None and decoder.vae_scale_factor == 2 and decoder.unet.config.sample_size == SIZE // 2
    decoder.set_progress_bar_config(disable=True)
    gen = Emu2GenPipeline(Emu2Pipeline.from_pretrained(world / "encoder"), decoder)
    image = gen([Image.new("RGB", (SIZE, SIZE), (200, 30, 30))], num_inference_steps=2).image
    assert image.size == (SIZE, SIZE)


def test_streamed_run_interrupted_and_resumed_equals_an_uninterrupted_one(world, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    overrides = ("steps=5", "data.streams.images.batch_size=3")  # batches cross shard and epoch boundaries
    assert train(_config(world, straight, *overrides))["finished"]
    assert train(_config(world, resumed, *overrides), stop_after=2)["step"] == 2
    data = torch.load(resumed / "checkpoints" / "step-00000002" / "rank-0.pt", weights_only=True)["data"]
    assert data["rng"] and data["data"]["streams"]["images"]["workers"]["0"]["step"] > 0  # the shard position
    assert train(_config(world, resumed, *overrides), resume=True)["finished"]
    assert _losses(resumed) == _losses(straight)
    a, b = _weights(straight / "unet"), _weights(resumed / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streamed_batches_carry_each_images_real_size_and_skip_bad_or_small_ones(world):
    from emu2.data.decoder_shards import DecoderImageShards, decoder_image_loader
    from emu2.data.mixing import Source

    source = Source("images.0.pair", "pair", str(world / "shards" / "pairs-{0..1}.tar"))
    shards = DecoderImageShards([source], SIZE, max_scale=1.25, min_image_size=16, seed=0, shuffle_buffer=1)
    loader = decoder_image_loader(shards, batch_size=len(SIZES), encoder_image_size=56)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (len(SIZES), 3, SIZE, SIZE)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["encoder_inputs"].shape == (len(SIZES), 3, 56, 56)
    # SDXL's original_size is (height, width) of the stored image, whatever its shape.
    assert sorted(map(tuple, batch["original_size"].tolist())) == sorted((h, w) for w, h in SIZES)
    for (h, w), (top, left) in zip(batch["original_size"].tolist(), batch["crops_coords_top_left"].tolist()):
        scaled_h, scaled_w = max(SIZE, round(h * SIZE * 1.25 / min(h, w))), max(SIZE, round(w * SIZE * 1.25 / min(h, w)))
        assert 0 <= top <= scaled_h - SIZE and 0 <= left <= scaled_w - SIZE
    assert loader.stats["skipped.too_small"] == 1 and loader.stats["skipped.bad_image"] == 1


def test_a_small_autoencoder_directory_serves_as_the_vae_of_a_decoder_from_scratch(world, tmp_path):
    from diffusers import AutoencoderKL

    from emu2.model.decoder_configs import small_autoencoder_config
    from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

    vae = AutoencoderKL.from_config(small_autoencoder_config(block_out_channels=(8, 16), norm_num_groups=4))
    vae.register_to_config(scaling_factor=0.7)  # the saved decoder must keep this VAE's own factor
    vae.save_pretrained(tmp_path / "small-vae")
    out = tmp_path / "decoder"
    result = train(_config(world, out, "decoder.unet_init=null", f"decoder.vae={tmp_path / 'small-vae'}",
                           "decoder.streaming=false", "decoder.channels=[8,16]", "decoder.attention=[false,true]",
                           "decoder.gradient_checkpointing=false", "steps=2"))
    assert result["finished"] and "reinitialised" not in result
    decoder = Emu2VisualDecoderPipeline.from_pretrained(out)
    assert decoder.vae.config.scaling_factor == vae.config.scaling_factor and decoder.unet.config.in_channels == 4


def test_unet_init_may_name_the_unet_folder_itself_and_the_vae_beside_it_is_used(world, tmp_path):
    from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

    out = tmp_path / "decoder"
    assert train(_config(world, out, f"decoder.unet_init={world / 'sdxl' / 'unet'}", "steps=1"))["finished"]
    assert Emu2VisualDecoderPipeline.from_pretrained(out).vae is not None


@pytest.mark.parametrize("override", ["decoder.unet_init=stabilityai/stable-diffusion-xl-base-1.0",
                                      "decoder.vae=madebyollin/sdxl-vae-fp16-fix"])
def test_hub_ids_are_refused_with_how_to_download_the_weights(world, tmp_path, override):
    with pytest.raises(FileNotFoundError, match=r"is not a local directory.*downloads nothing.*hf download"):
        train(_config(world, tmp_path / "run", override))


def test_latent_space_without_a_vae_says_where_to_find_one(world, tmp_path):
    from diffusers import UNet2DConditionModel

    UNet2DConditionModel.from_config(_sdxl_like_unet_config()).save_pretrained(tmp_path / "unet-only" / "unet")
    with pytest.raises(ValueError, match=r"no VAE was found: set decoder.vae"):
        train(_config(world, tmp_path / "run", f"decoder.unet_init={tmp_path / 'unet-only'}"))
    with pytest.raises(ValueError, match=r"pixel_space: false"):  # SDXL's UNet denoises latents, not pixels
        train(_config(world, tmp_path / "run", "decoder.pixel_space=true"))
    with pytest.raises(ValueError, match=r"encoder_image_size is 448.*takes 56"):
        train(_config(world, tmp_path / "run", "decoder.encoder_image_size=448"))


def test_the_shard_position_of_a_streamed_run_follows_the_data_layer(world):
    """Resuming the loader from a saved state continues with exactly the batches that followed it."""
    from emu2.data.decoder_shards import DecoderImageShards, decoder_image_loader
    from emu2.data.mixing import Source

    def loader(state=None):
        source = Source("images.0.pair", "pair", str(world / "shards" / "pairs-{0..1}.tar"))
        return decoder_image_loader(DecoderImageShards([source], SIZE, min_image_size=16, seed=3, shuffle_buffer=3),
                                    batch_size=3, encoder_image_size=56, state=state)

    first = loader()
    iterator = iter(first)
    next(iterator)
    state = first.state_dict()
    expected = [next(iterator) for _ in range(3)]
    again = iter(loader(state))
    for batch in expected:
        other = next(again)
        assert all(torch.equal(batch[k], other[k]) for k in batch)
    assert Counter(first.stats)["samples"] > 0


def test_sdxl_base_config_becomes_the_official_emu2_gen_unet_shapes():
    """Official-format 2.3: Emu2-Gen's UNet is SDXL-base's with cross_attention_dim 1792 and
    add_embedding.linear_1 [1280, 3328]; only the 140 cross-attention k/v projections and that layer change."""
    from diffusers import UNet2DConditionModel

    from emu2.convert.sdxl import visual_embedding_unet_config

    sdxl_base = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the fields that differ from defaults
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    with torch.device("meta"):
        before = UNet2DConditionModel.from_config(sdxl_base).state_dict()
        after = UNet2DConditionModel.from_config(visual_embedding_unet_config(sdxl_base, 1792)).state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape}
    assert after["add_embedding.linear_1.weight"].shape == (1280, 3328)
    assert len(changed) == 141 and changed == {
        k for k in before if k.endswith(("attn2.to_k.weight", "attn2.to_v.weight"))} | {"add_embedding.linear_1.weight"}
    assert all(after[k].shape[1] == 1792 for k in changed if "attn2" in k)
