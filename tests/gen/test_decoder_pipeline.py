"""Decoder pipeline behaviour: guidance batch, broadcasting, schedulers, save/load, pixel space, dtypes."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel

from emu2.convert.gen import load_diffusers_gen_decoder, load_official_gen_decoder
from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline, images_to_uint8

from . import tiny

Q = 4


def _embeds(batch, seed=0):
    return torch.randn(batch, Q, tiny.WIDTH, generator=torch.Generator().manual_seed(seed))


class RecordingUNet(torch.nn.Module):
    """Wraps a UNet and keeps what each call received."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.unet, name)

    def forward(self, sample, t, encoder_hidden_states, added_cond_kwargs):
        self.calls.append(
            {"hidden": encoder_hidden_states.clone(), **{k: v.clone() for k, v in added_cond_kwargs.items()}}
        )
        return self.unet(
            sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )


@pytest.fixture
def pipe():
    return tiny.pipeline()


def test_guidance_batch_is_cond_then_uncond_with_sdxl_conditions(pipe):
    recorder = RecordingUNet(pipe.unet)
    pipe.unet = recorder
    cond, uncond = _embeds(2, 1), _embeds(2, 2)
    pipe(
        cond,
        uncond,
        num_inference_steps=2,
        original_size=(40, 30),
        crops_coords_top_left=(3, 5),
        output_type="latent",
    )
    call = recorder.calls[0]
    torch.testing.assert_close(call["hidden"], torch.cat([cond, uncond]))
    torch.testing.assert_close(call["text_embeds"], torch.cat([cond, uncond]).mean(dim=1))
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    assert call["time_ids"].tolist() == [[40, 30, 3, 5, height, width]] * 4
    assert len(recorder.calls) == 2


def test_single_uncond_row_is_shared_by_the_batch(pipe):
    recorder = RecordingUNet(pipe.unet)
    pipe.unet = recorder
    uncond = _embeds(1, 2)
    out = pipe(_embeds(3, 1), uncond, num_inference_steps=1, output_type="np").images
    assert out.shape[0] == 3
    hidden = recorder.calls[0]["hidden"]
    assert hidden.shape[0] == 6
    torch.testing.assert_close(hidden[3:], uncond.expand(3, -1, -1))


def test_without_guidance_the_unet_sees_only_the_condition(pipe):
    recorder = RecordingUNet(pipe.unet)
    pipe.unet = recorder
    cond = _embeds(2)
    pipe(cond, guidance_scale=1.0, num_inference_steps=1, output_type="latent")
    torch.testing.assert_close(recorder.calls[0]["hidden"], cond)


def test_bad_inputs_say_what_is_wrong(pipe):
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(_embeds(1), num_inference_steps=1)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        pipe(torch.zeros(1, Q, tiny.WIDTH + 1), torch.zeros(1, Q, tiny.WIDTH + 1), num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(_embeds(1), _embeds(1), latents=torch.zeros(1, 4, 3, 3), num_inference_steps=1)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        pipe(_embeds(2), _embeds(3), num_inference_steps=1)


def test_generator_makes_noise_reproducible(pipe):
    def sample(seed):
        return pipe(
            _embeds(1),
            _embeds(1, 1),
            num_inference_steps=2,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).images

    torch.testing.assert_close(sample(0), sample(0))
    assert not torch.allclose(sample(0), sample(1))


def test_step_callback_sees_each_step_and_its_latents_are_used(pipe):
    seen = []

    def on_step(pipeline, step, t, tensors):
        seen.append((pipeline, step))
        return {"latents": torch.zeros_like(tensors["latents"])}

    final = pipe(_embeds(1), _embeds(1, 1), num_inference_steps=3, output_type="latent",
                 callback_on_step_end=on_step).images
    assert seen == [(pipe, 0), (pipe, 1), (pipe, 2)]
    assert torch.count_nonzero(final) == 0  # the last step's replacement is what comes out


def test_output_types(pipe):
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    args = (_embeds(2), _embeds(1, 1))
    kwargs = {"num_inference_steps": 1, "generator": torch.Generator().manual_seed(0)}
    pil = pipe(*args, output_type="pil", **kwargs).images
    kwargs["generator"].manual_seed(0)
    array = pipe(*args, output_type="np", **kwargs).images
    kwargs["generator"].manual_seed(0)
    tensor = pipe(*args, output_type="pt", return_dict=False, **kwargs)[0]
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (side, side)
    assert array.shape == (2, side, side, 3) and 0 <= array.min() and array.max() <= 1
    assert tensor.shape == (2, 3, side, side)
    np.testing.assert_array_equal(images_to_uint8(pil), images_to_uint8(array))
    np.testing.assert_array_equal(images_to_uint8(tensor), images_to_uint8(array))


def test_dpm_solver_swaps_in_and_agrees_with_euler(pipe):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    args = (_embeds(1), _embeds(1, 1))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # the diffusers swap
    fast = pipe(*args, latents=latents, num_inference_steps=20, output_type="np").images
    assert fast.shape == (1, 16, 16, 3) and np.isfinite(fast).all()

    # Both solve the same probability-flow ODE, so from the same noise they meet as steps grow. "trailing"
    # spacing starts both at t = 999 ("leading" starts DPM-Solver lower, at a different point of the ODE).
    config = {**pipe.scheduler.config, "timestep_spacing": "trailing"}
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    euler = pipe(*args, latents=latents, num_inference_steps=50, output_type="latent").images
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(config)
    dpm = pipe(*args, latents=latents, num_inference_steps=25, output_type="latent").images
    assert (dpm - euler).norm() / euler.norm() < 0.03


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = Emu2VisualDecoderPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    def public(config):
        return {k: v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    latents = torch.randn(1, 4, 8, 8)
    args = {"num_inference_steps": 2, "latents": latents, "output_type": "np"}
    np.testing.assert_array_equal(
        pipe(_embeds(1), _embeds(1, 1), **args).images, loaded(_embeds(1), _embeds(1, 1), **args).images
    )


def test_pixel_space_pipeline_denoises_pixels_and_round_trips(tmp_path):
    pipe = tiny.pipeline(pixel_space=True)
    assert pipe.vae is None and pipe.vae_scale_factor == 1
    images = pipe(_embeds(2), _embeds(1, 1), num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    pipe.save_pretrained(tmp_path)
    loaded = Emu2VisualDecoderPipeline.from_pretrained(tmp_path)
    assert loaded.vae is None


def test_pixel_scale_denoises_a_smaller_image_and_enlarges_it(tmp_path):
    from emu2.model.decoder import latents_to_pixels, pixels_to_latents

    torch.manual_seed(0)
    pipe = Emu2VisualDecoderPipeline.from_configs(tiny.unet_config(in_channels=3, sample_size=8), None, pixel_scale=2)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 2
    noise = torch.randn(1, 3, 8, 8)
    args = {"num_inference_steps": 2, "latents": noise}
    small = pipe(_embeds(1), _embeds(1, 1), output_type="latent", **args).images
    images = pipe(_embeds(1), _embeds(1, 1), output_type="pt", **args).images
    assert small.shape == (1, 3, 8, 8) and images.shape == (1, 3, 16, 16)  # default size: 8 px UNet x 2
    torch.testing.assert_close(images, (latents_to_pixels(small, 2) / 2 + 0.5).clamp(0, 1))
    flat = torch.rand(1, 3, 1, 1).expand(1, 3, 16, 16) * 2 - 1  # flat colours survive the round trip exactly
    torch.testing.assert_close(latents_to_pixels(pixels_to_latents(flat, 2), 2), flat)

    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["pixel_scale"] == 2
    loaded = Emu2VisualDecoderPipeline.from_pretrained(tmp_path)
    assert loaded.pixel_scale == 2
    torch.testing.assert_close(loaded(_embeds(1), _embeds(1, 1), output_type="pt", **args).images, images)
    with pytest.raises(ValueError, match="pixel_scale"):
        Emu2VisualDecoderPipeline.from_configs(tiny.unet_config(), tiny.vae_config(), pixel_scale=2)


def test_bf16_pipeline_runs(pipe):
    pipe.to(dtype=torch.bfloat16)
    images = pipe(_embeds(1), _embeds(1, 1), num_inference_steps=2, output_type="pt").images
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()


def test_official_state_dict_loads_and_safety_checker_is_optional(pipe):
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    state["multimodal_encoder.project_up.weight"] = torch.zeros(2, 2)
    state["safety_checker.concept_embeds"] = torch.zeros(17, 8)
    loaded = load_official_gen_decoder(state, tiny.unet_config(), tiny.vae_config())
    assert loaded.safety_checker is None
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_official_safety_checker_blacks_out_flagged_images(pipe):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    clip = {
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        "projection_dim": 8,
    }
    checker = StableDiffusionSafetyChecker(CLIPConfig(**clip))
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every image is over the threshold
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state |= {f"vae.{k}": v for k, v in pipe.vae.state_dict().items()}
    state |= {f"safety_checker.{k}": v for k, v in checker.state_dict().items()}
    loaded = load_official_gen_decoder(
        state, tiny.unet_config(), tiny.vae_config(), safety_checker_config=clip
    )
    loaded.set_progress_bar_config(disable=True)
    images = loaded(_embeds(1), _embeds(1, 1), num_inference_steps=1, output_type="np").images
    assert images.max() == 0


def test_loads_hf_diffusers_layout_with_bf16_variant(pipe, tmp_path):
    pipe.unet.to(torch.bfloat16).save_pretrained(tmp_path / "unet", variant="bf16")
    pipe.vae.to(torch.bfloat16).save_pretrained(tmp_path / "vae", variant="bf16")
    pipe.scheduler.save_pretrained(tmp_path / "scheduler")
    (tmp_path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "EmuVisualGenerationPipeline",
                "multimodal_encoder": ["emu2", "EmuForCausalLM"],
                "tokenizer": ["transformers", "LlamaTokenizerFast"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            }
        )
    )
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    loaded = load_diffusers_gen_decoder(tmp_path, variant="bf16", dtype=torch.bfloat16)
    assert isinstance(loaded.unet, UNet2DConditionModel) and isinstance(loaded.vae, AutoencoderKL)
    assert loaded.unet.dtype == torch.bfloat16
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[k], v)
    assert loaded.scheduler.config.timestep_spacing == "leading"
