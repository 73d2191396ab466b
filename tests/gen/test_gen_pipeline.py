"""Emu2GenPipeline against the official `EmuVisualGeneration.forward` surface (tiny random encoder + decoder)."""

import numpy as np
import pytest
import torch
from PIL import Image

from emu2.pipelines.gen import Emu2GenPipeline

STEPS = dict(num_inference_steps=1)


@pytest.fixture(scope="module")
def gen():
    pipe = Emu2GenPipeline.from_preset("tiny")
    pipe.decoder.set_progress_bar_config(disable=True)
    return pipe


def image(colour):
    return Image.new("RGB", (32, 32), colour)


def unet_time_ids(gen, **call):
    """The SDXL ``time_ids`` rows the UNet received in one call."""
    seen = []
    hook = gen.decoder.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        gen(["a red circle"], **STEPS, **call)
    finally:
        hook.remove()
    return seen[0]


def test_original_size_defaults_to_the_official_1024_square_at_any_output_size(gen):
    """Official `forward(height=1024, width=1024, crop_info=[0, 0], original_size=[1024, 1024])`:
    time_ids = original_size + crop_info + [height, width], original_size not following height/width."""
    rows = unet_time_ids(gen, height=16, width=32)
    assert rows.tolist() == [[1024, 1024, 0, 0, 16, 32]] * 2  # cond and uncond rows
    assert unet_time_ids(gen, height=16, width=16, original_size=(48, 40))[0, :2].tolist() == [48, 40]


def test_official_crop_info_is_an_alias_of_crops_coords_top_left(gen):
    """Official argument name `crop_info` (list [top, left]) -> time_ids[2:4]."""
    assert unet_time_ids(gen, height=16, width=16, crop_info=[3, 5])[0, 2:4].tolist() == [3, 5]
    assert unet_time_ids(gen, height=16, width=16, crops_coords_top_left=(3, 5))[0, 2:4].tolist() == [3, 5]
    with pytest.raises(ValueError, match="crop_info"):
        gen(["x"], crop_info=[0, 0], crops_coords_top_left=(0, 0), **STEPS)


def test_safety_checker_flag_is_returned_as_official_nsfw_content_detected(gen):
    """Official output `EmuVisualGenerationPipelineOutput(image, nsfw_content_detected=has_nsfw_concept[0])`,
    None without a checker."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    assert gen(["a red circle"], **STEPS).nsfw_content_detected is None
    clip = CLIPConfig(vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "image_size": 224, "patch_size": 32},
                      projection_dim=8)
    checker = StableDiffusionSafetyChecker(clip)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # every image is over the threshold
    flagged = Emu2GenPipeline(gen.encoder, gen.decoder.__class__(unet=gen.decoder.unet, scheduler=gen.decoder.scheduler,
                                                                  vae=gen.decoder.vae, safety_checker=checker,
                                                                  feature_extractor=CLIPImageProcessor()))
    flagged.decoder.set_progress_bar_config(disable=True)
    out = flagged(["a red circle"], **STEPS)
    assert out.nsfw_content_detected is True and not np.asarray(out.image).any()


def test_autoencoding_runs_on_any_images_without_text_as_official(gen):
    """Official `_prepare_and_encode_inputs`: `if has_image and not has_text` -> cond = encode_image of all the
    images; any string, even "", switches to generation."""
    model = gen.encoder.model
    two = [image("red"), image("blue")]
    cond, _ = gen.conditioning(two)
    from emu2.processing import preprocess_images

    expected = model.encode_image(preprocess_images(two, model.config.vision_config.image_size))
    assert torch.allclose(cond, expected)
    assert len(gen(two, **STEPS).images) == 2
    generated, _ = gen.conditioning([image("red"), ""])
    assert torch.allclose(generated, gen.encoder.regress_image_embeddings([image("red"), ""]))


def test_to_moves_encoder_and_decoder_like_the_official_pipe_to():
    """Official README: `pipe.to("cuda")` moves the whole Gen pipeline; here dtype, which a CPU can test."""
    gen = Emu2GenPipeline.from_preset("tiny")
    gen.decoder.set_progress_bar_config(disable=True)
    assert gen.to(torch.bfloat16) is gen
    assert gen.encoder.model.dtype == torch.bfloat16 and gen.decoder.unet.dtype == torch.bfloat16
    assert gen(["a red circle"], height=16, width=16, **STEPS).prompt_embeds.dtype == torch.bfloat16


def regression_batches(gen):
    """Record the batch size of every LM regression the pipeline runs."""
    model, sizes = gen.encoder.model, []
    original = model.regress_image_embeddings

    def recording(input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        return original(input_ids, **kwargs)

    model.regress_image_embeddings = recording
    return sizes


def test_cold_cache_regresses_the_guidance_pair_in_one_batch_equal_to_two_regressions():
    gen = Emu2GenPipeline.from_preset("tiny")
    separate = (gen.encoder.regress_image_embeddings([image("red"), "a red circle"]),
                gen.encoder.regress_image_embeddings([""]))
    sizes = regression_batches(gen)
    cond, uncond = gen.conditioning([image("red"), "a red circle"])
    assert sizes == [2]
    torch.testing.assert_close(cond, separate[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(uncond, separate[1], atol=1e-5, rtol=0)


def test_unconditional_embeddings_are_reused_until_the_encoder_weights_change():
    """Official `negative_prompt` cache, dropped when the weights it was computed with change."""
    gen = Emu2GenPipeline.from_preset("tiny")
    sizes = regression_batches(gen)
    _, first = gen.conditioning(["a red circle"])
    _, again = gen.conditioning(["a blue square"])
    assert sizes == [2, 1] and again is first
    with torch.no_grad():
        gen.encoder.model.project_down.weight.mul_(2.0)  # as an optimizer step would, in place
    _, after = gen.conditioning(["a red circle"])
    assert sizes == [2, 1, 2]
    torch.testing.assert_close(after, gen.encoder.regress_image_embeddings([""]))
    assert not torch.allclose(after, first)


def unet_calls(gen, **call):
    calls = []
    hook = gen.decoder.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        gen(["a red circle"], height=16, width=16, **call)
    finally:
        hook.remove()
    return len(calls)


def test_default_sampler_is_dpm_solver_at_15_steps_and_official_is_50_euler_steps(gen):
    from emu2.pipelines.gen import DEFAULT_STEPS

    assert DEFAULT_STEPS == {"dpm-solver++": 15, "official": 50}
    assert unet_calls(gen) == 15
    assert unet_calls(gen, sampler="official") == 50
    assert unet_calls(gen, sampler="official", num_inference_steps=3) == 3
    assert type(gen.decoder.scheduler).__name__ == "EulerDiscreteScheduler"  # the loaded scheduler is untouched
    with pytest.raises(ValueError, match="sampler must be one of"):
        gen(["a red circle"], sampler="ddim")


def test_long_prompt_on_a_cold_cache_is_regressed_apart_from_the_empty_prompt():
    """Padding the empty prompt to a long prompt's length would cost more than its own regression."""
    gen = Emu2GenPipeline.from_preset("tiny")
    sizes = regression_batches(gen)
    gen.conditioning([image("red"), "a", image("blue"), "b", image("green"), "c", image("red"), "d", image("blue")])
    assert sizes == [1, 1]


def test_a_batch_of_prompts_gives_one_image_each_as_drawn_alone(gen):
    """``[[prompt], [prompt]]`` is a batch of text prompts (not images to autoencode); with one generator per
    prompt each image is the one that prompt gives alone."""
    prompts = ["a red circle", "two blue squares"]
    batch = gen([[p] for p in prompts], height=16, width=16, **STEPS,
                generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert len(batch) == 2
    for i, prompt in enumerate(prompts):
        alone = gen([prompt], height=16, width=16, **STEPS, generator=torch.Generator().manual_seed(i)).image
        assert np.abs(np.asarray(alone, dtype=int) - np.asarray(batch[i], dtype=int)).max() <= 1
