"""Decoder training (paper A.3): only the UNet learns; guidance dropout, noise offset, SDXL crop conditions."""

import random

import numpy as np
import PIL.Image
import pytest
import torch

from emu2.data.decoder_shards import prepare_decoder_batch, random_scale_and_crop
from emu2.model.decoder_configs import decoder_scheduler_config
from emu2.train.stages.diffusion import (
    accumulated_update,
    decoder_loss,
    drop_conditioning,
    freeze_for_decoder_training,
    min_snr_weight,
    offset_noise,
    prediction_target,
)

from . import tiny

Q = 4


class FrozenEncoder(torch.nn.Module):
    """Stands in for the vision encoder: (B, 3, S, S) pixels in [-1, 1] -> (B, Q, Dv)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, tiny.WIDTH)
        self.requires_grad_(False)

    def forward(self, pixels):
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)  # (B, 4, 3)
        return self.proj(pooled)


def _images(n, seed=0, size=(20, 28)):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(n)]


def _batch(n=2, seed=0):
    # The tiny pipeline decodes 16 px images; the encoder sees the same crops as tensors.
    batch = prepare_decoder_batch(_images(n, seed), 16, random.Random(seed))
    batch["encoder_inputs"] = batch["pixel_values"]
    return batch


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def test_training_step_updates_only_the_unet():
    pipe, encoder = tiny.pipeline(), FrozenEncoder()
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-3)
    before = {
        name: _snapshot(m) for name, m in [("unet", pipe.unet), ("vae", pipe.vae), ("encoder", encoder)]
    }
    loss = accumulated_update(pipe.unet, [decoder_loss(pipe, _batch(), encoder)], optimizer)
    assert np.isfinite(loss)
    assert not _unchanged(pipe.unet, before["unet"])
    assert _unchanged(pipe.vae, before["vae"]) and _unchanged(encoder, before["encoder"])
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    assert not any(p.requires_grad or p.grad is not None for p in encoder.parameters())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {
        id(p) for p in pipe.unet.parameters()
    }


def test_loss_falls_on_a_fixed_batch():
    pipe, encoder, batch = tiny.pipeline(), FrozenEncoder(), _batch()
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=3e-3)
    # Same timesteps, noise and dropout draws every step, so the objective itself is fixed.
    losses = [
        accumulated_update(pipe.unet, [decoder_loss(pipe, batch, encoder, generator=torch.Generator().manual_seed(0))],
                           optimizer)
        for _ in range(12)
    ]
    assert losses[-1] < 0.7 * losses[0], losses


def test_condition_dropout_rate_and_replacement():
    embeds = torch.randn(20000, 2, 3)
    dropped_embeds, dropped = drop_conditioning(embeds, 0.1, generator=torch.Generator().manual_seed(0))
    assert abs(dropped.float().mean().item() - 0.1) < 0.01
    assert (dropped_embeds[dropped] == 0).all() and torch.equal(dropped_embeds[~dropped], embeds[~dropped])
    uncond = torch.randn(2, 3)
    all_dropped, _ = drop_conditioning(embeds[:5], 1.0, uncond)
    assert torch.equal(all_dropped, uncond.expand(5, 2, 3))
    assert torch.equal(drop_conditioning(embeds[:5], 0.0)[0], embeds[:5])


def test_dropped_samples_reach_the_unet_as_uncond_with_sdxl_conditions():
    pipe, encoder = tiny.pipeline(), FrozenEncoder()
    seen = {}
    forward = pipe.unet.forward

    def record(sample, t, encoder_hidden_states, added_cond_kwargs):
        seen.update(hidden=encoder_hidden_states.detach().clone(), **added_cond_kwargs)
        return forward(
            sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )

    pipe.unet.forward = record
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=1e-4)
    uncond = torch.randn(Q, tiny.WIDTH)
    batch = _batch()
    accumulated_update(pipe.unet, [decoder_loss(pipe, batch, encoder, uncond_embeds=uncond, condition_drop_prob=1.0)],
                       optimizer)
    torch.testing.assert_close(seen["hidden"], uncond.expand(2, Q, tiny.WIDTH))
    torch.testing.assert_close(seen["text_embeds"], uncond.mean(0).expand(2, -1))
    expected_ids = torch.cat(
        [batch["original_size"], batch["crops_coords_top_left"], torch.tensor([[16, 16]] * 2)], 1
    )
    assert torch.equal(seen["time_ids"], expected_ids)


def test_random_scale_keeps_aspect_ratio_and_reports_sdxl_conditions():
    image = _images(1, size=(30, 50))[0]  # 50 wide, 30 high
    for seed in range(5):
        crop, original_size, (top, left) = random_scale_and_crop(
            image, 16, random.Random(seed), max_scale=1.5
        )
        assert crop.size == (16, 16) and original_size == (30, 50)
        short = random.Random(seed).uniform(1.0, 1.5) * 16
        scaled_w, scaled_h = round(50 * short / 30), round(short)
        assert 0 <= top <= scaled_h - 16 and 0 <= left <= scaled_w - 16
        scaled = image.resize((scaled_w, scaled_h), PIL.Image.BICUBIC)
        np.testing.assert_array_equal(
            np.asarray(crop), np.asarray(scaled.crop((left, top, left + 16, top + 16)))
        )


def test_batch_pixels_are_in_minus_one_to_one():
    batch = _batch(3)
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["original_size"].tolist() == [[20, 28]] * 3


def test_noise_offset_adds_a_per_channel_constant():
    latents = torch.zeros(4, 3, 8, 8)
    plain = offset_noise(latents, 0.0, torch.Generator().manual_seed(0))
    offset = offset_noise(latents, 0.1, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant over space
    assert 0 < shift.abs().max() < 0.5


def test_prediction_targets_match_what_the_sampler_reads():
    from diffusers import EulerDiscreteScheduler

    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    a = torch.tensor([0.9, 0.5, 0.01]).view(3, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise

    def scheduler(kind):
        return EulerDiscreteScheduler.from_config(decoder_scheduler_config({"prediction_type": kind}))

    assert torch.equal(prediction_target(scheduler("epsilon"), x0, noise, a), noise)
    assert torch.equal(prediction_target(scheduler("sample"), x0, noise, a), x0)
    v = prediction_target(scheduler("v_prediction"), x0, noise, a)
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, x0)  # x_0 as v-prediction samplers recover it
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_target(scheduler("flow"), x0, noise, a)


def test_min_snr_weights_clip_the_easy_timesteps():
    from diffusers import EulerDiscreteScheduler

    alpha_bar = torch.tensor([0.999, 0.5, 0.01])  # SNR 999, 1, ~0.01
    snr = alpha_bar / (1 - alpha_bar)
    for kind, expected in [("epsilon", snr.clamp(max=5) / snr), ("v_prediction", snr.clamp(max=5) / (snr + 1)),
                           ("sample", snr.clamp(max=5))]:
        sched = EulerDiscreteScheduler.from_config(decoder_scheduler_config({"prediction_type": kind}))
        torch.testing.assert_close(min_snr_weight(sched, alpha_bar, 5.0), expected)


def test_pixel_scale_step_denoises_the_shrunk_crop_with_full_size_conditions():
    from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

    torch.manual_seed(0)
    pipe = Emu2VisualDecoderPipeline.from_configs(
        tiny.unet_config(in_channels=3, sample_size=8), None,
        decoder_scheduler_config({"prediction_type": "v_prediction"}), pixel_scale=2,
    )
    seen = {}
    forward = pipe.unet.forward

    def record(sample, t, encoder_hidden_states, added_cond_kwargs):
        seen.update(shape=tuple(sample.shape), time_ids=added_cond_kwargs["time_ids"])
        return forward(sample, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)

    pipe.unet.forward = record
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=3e-3)
    batch = _batch()  # 16 px crops
    losses = [
        accumulated_update(pipe.unet, [decoder_loss(pipe, batch, FrozenEncoder(), snr_gamma=5.0,
                                                    generator=torch.Generator().manual_seed(0))], optimizer)
        for _ in range(12)
    ]
    assert seen["shape"] == (2, 3, 8, 8) and seen["time_ids"][:, 4:].tolist() == [[16, 16]] * 2
    assert losses[-1] < 0.7 * losses[0], losses
