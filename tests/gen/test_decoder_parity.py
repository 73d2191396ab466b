"""The decoder pipeline reproduces the official Emu2-Gen images (UNet + VAE + Euler + CFG) from the fixture.

Given the prompt embeddings the official pipeline fed its UNet, and its initial noise, our pipeline must give
the official uint8 image within 1 grey level. Every size and call argument comes from the fixture's files.

Fixture note: `gen.<run>.latents` is not the initial noise its README describes but the last of the unused
noise tensors that diffusers 0.24's Euler ``step`` draws from the global RNG each step (runs seeded with
torch.manual_seed(400)); `official_initial_latents` replays that stream to recover the initial draw.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emu2.convert.gen import load_official_gen_decoder
from emu2.pipelines.visual_decoder import images_to_uint8

from ..conftest import FIXTURE, official_initial_latents

pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"official fixture not found at {FIXTURE}")


@pytest.fixture(scope="module")
def cases():
    return json.loads((FIXTURE / "cases.json").read_text())


@pytest.fixture(scope="module")
def expected():
    return load_file(str(FIXTURE / "expected.safetensors"))


@pytest.fixture(scope="module")
def pipe(cases):
    configs = cases["gen_configs"]
    state = load_file(str(FIXTURE / "gen.safetensors"))
    pipe = load_official_gen_decoder(state, configs["unet"], configs["vae"], configs["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_names():
    if not FIXTURE.is_dir():
        return []
    return sorted(json.loads((FIXTURE / "cases.json").read_text())["gen_runs"])


@pytest.mark.parametrize("run_name", _run_names())
def test_decoder_reproduces_official_image(run_name, cases, expected, pipe):
    run = cases["gen_runs"][run_name]
    prompt_embeds = expected[f"gen.{run_name}.prompt_embeds"]  # [cond, uncond]
    latents = official_initial_latents(expected[f"gen.{run_name}.latents"], run["num_inference_steps"])
    images = pipe(
        prompt_embeds[:1],
        prompt_embeds[1:],
        height=run["height"],
        width=run["width"],
        num_inference_steps=run["num_inference_steps"],
        guidance_scale=run["guidance_scale"],
        latents=latents,
        original_size=tuple(run["original_size"]),
        crops_coords_top_left=tuple(run["crop_info"]),
        output_type="np",
    ).images
    ours = images_to_uint8(images)[0].astype(np.int16)
    official = expected[f"gen.{run_name}.image_uint8"].numpy().astype(np.int16)
    assert ours.shape == official.shape
    diff = np.abs(ours - official)
    assert diff.max() <= 1, (
        f"{run_name}: max grey-level difference {diff.max()} at {np.argwhere(diff > 1)[:5]}"
    )


def test_official_loader_leaves_encoder_keys_and_names_bad_keys(cases):
    configs = cases["gen_configs"]
    state = load_file(str(FIXTURE / "gen.safetensors"))
    encoder_keys = {k for k in state if k.startswith("multimodal_encoder.")}
    assert encoder_keys, "the Gen file holds the multimodal encoder too"
    load_official_gen_decoder(state, configs["unet"], configs["vae"], configs["scheduler"])
    assert encoder_keys <= set(state)  # untouched, for the encoder loader

    dropped = next(k for k in state if k.startswith("unet."))
    broken = {k: v for k, v in state.items() if k != dropped}
    broken["vae.decoder.extra.weight"] = torch.zeros(1)
    broken["text_encoder.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        load_official_gen_decoder(broken, configs["unet"], configs["vae"], configs["scheduler"])
    for name in (dropped, "vae.decoder.extra.weight", "text_encoder.weight"):
        assert name in str(error.value)
