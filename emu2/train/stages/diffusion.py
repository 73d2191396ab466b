"""The decoder stages' training step (paper 2.2.3 and A.3, Table 6): image autoencoding with a frozen encoder.

The decoder learns to turn the frozen vision encoder's embeddings of an image back into that image. Only the
UNet is trained: the vision encoder and the VAE are frozen. Each step:

1. encode the crop with the frozen encoder -> conditioning (B, Q, Dv);
2. drop it to the unconditional embeddings (zeros by default) with probability 0.1, for classifier-free
   guidance (Table 6: 10%);
3. VAE-encode the crop to latents (or use the pixels themselves in pixel space, optionally shrunk by the
   pipeline's ``pixel_scale``);
4. add noise with offset 0.1 (Table 6) at a uniformly drawn training timestep;
5. predict with SDXL's added conditions (pooled embeddings, original size, crop, target size) and take the MSE
   to the scheduler's target: the noise (epsilon, the official decoder) or v (``prediction_type``
   "v_prediction", used by the small shapes-world decoders);
6. AdamW step with gradient clipping 1.0 (Table 6); the optimizer and its warm-up + decay schedule are the
   recipe's, as in every stage (`emu2.train.stages.decoder`).

Steps 1-5 are `decoder_loss`, step 6 `accumulated_update`: a step may accumulate the gradients of several
equal-sized micro-batches (the recipe's ``gradient_accumulation_steps``; the paper's global batch of 2,048 does
not fit one device) with equal weights, which is one batch of all their samples since the MSE is a per-sample
mean. Steps 4-5 (`diffusion_loss`) and 6 are shared with the video decoder (`video_decoder_loss`): its clip's
frames are VAE-encoded (or kept as pixels) one by one and stacked as (B, C, F, h, w) latents, and the 3D UNet is
conditioned on every frame's embeddings, flattened to (B, F*Q, Dv), which the pipeline's per-frame
cross-attention splits back per frame.

The crops and their SDXL size conditions (A.3.1) come from `emu2.data.decoder_shards`; the small UNet configs
from `emu2.model.decoder_configs`, SDXL-base parts from a local folder from `emu2.convert.sdxl`; the stages
that run this step in the shared runner, with resumable checkpoints, are `emu2.train.stages.decoder`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ...model.decoder import pixels_to_latents, unet_input


@dataclass
class DecoderTrainingConfig:
    """The training step's own settings, Table 6 defaults; the optimizer and its schedule come from the recipe
    (`emu2.train.optim.build_decoder_optimizer`)."""

    max_grad_norm: float = 1.0
    condition_drop_prob: float = 0.1
    noise_offset: float = 0.1
    max_scale: float = 1.25  # largest random up-scaling of the short side before cropping (A.3.1)
    snr_gamma: float | None = None  # Min-SNR loss weighting; None: plain MSE (the paper)


# ---------------------------------------------------------------------------------------------- pieces


def drop_conditioning(
    embeds: torch.Tensor,
    drop_prob: float,
    uncond_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's embeddings (B, Q, Dv) by ``uncond_embeds`` ((Q, Dv) or (1, Q, Dv); zeros when
    None) with probability ``drop_prob``, so the decoder also learns the unconditional score for
    classifier-free guidance. Returns (embeds, dropped (B,) bool)."""
    dropped = torch.rand(embeds.shape[0], generator=generator, device="cpu").to(embeds.device) < drop_prob
    uncond = (
        torch.zeros_like(embeds[:1]) if uncond_embeds is None else uncond_embeds.reshape(1, *embeds.shape[1:])
    )
    return torch.where(dropped[:, None, None], uncond.to(embeds), embeds), dropped


def offset_noise(
    latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard-normal noise plus a per-sample, per-channel constant of scale ``noise_offset`` (Table 6: 0.1),
    which lets the model learn to change an image's overall brightness. ``latents``: (B, C, ...)."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(latents)
    offset_shape = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    offset = torch.randn(offset_shape, generator=generator, dtype=torch.float32).to(latents)
    return noise + noise_offset * offset


@torch.no_grad()
def encode_to_latents(
    vae: AutoencoderKL | None, pixel_values: torch.Tensor, generator=None, pixel_scale: int = 1
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents; in pixel space (``vae=None``) the pixels, averaged
    over ``pixel_scale`` x ``pixel_scale`` blocks (`emu2.model.decoder.pixels_to_latents`)."""
    if vae is None:
        return pixels_to_latents(pixel_values, pixel_scale)
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator)
    if vae.config.get("shift_factor") is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as the sampler (``scheduler.config.prediction_type``) reads it:
    "epsilon" (the noise; the official decoder), "v_prediction" (v = sqrt(a) noise - sqrt(1 - a) x_0) or
    "sample" (x_0). ``alpha_bar``: the cumulative alpha of each sample's timestep, broadcastable to latents."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction or sample)")


def freeze_for_decoder_training(parts) -> None:
    """Only the UNet learns (A.3): freeze the VAE, put the UNet in training mode."""
    if parts.vae is not None:
        parts.vae.requires_grad_(False).eval()
    parts.unet.requires_grad_(True).train()


# ---------------------------------------------------------------------------------------------- step


def decoder_loss(
    pipeline_parts,
    batch: dict,
    encode_fn: Callable[[object], torch.Tensor],
    *,
    uncond_embeds: torch.Tensor | None = None,
    condition_drop_prob: float = 0.1,
    noise_offset: float = 0.1,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 1-5 on one (micro-)batch: the scalar loss, with its graph (``uncond_embeds``: what dropped samples are
    conditioned on, zeros when None; ``noise`` and ``timesteps`` as in `diffusion_loss`)."""
    unet, vae = pipeline_parts.unet, pipeline_parts.vae
    device, dtype = unet.device, unet.dtype
    pixel_values = batch["pixel_values"].to(device)
    batch_size, height, width = pixel_values.shape[0], pixel_values.shape[-2], pixel_values.shape[-1]

    # 1-2. Frozen encoder, then classifier-free-guidance dropout.
    with torch.no_grad():
        embeds = encode_fn(batch["encoder_inputs"]).to(device=device, dtype=dtype)
    embeds, _ = drop_conditioning(embeds, condition_drop_prob, uncond_embeds, generator)

    # 3. Frozen VAE (pixel space: the pixels, shrunk by the pipeline's pixel_scale).
    latents = encode_to_latents(vae, pixel_values, generator, pixel_scale_of(pipeline_parts)).to(dtype)

    # 4-5. Noise, the UNet's prediction with SDXL's added conditions, the MSE.
    target_size = torch.tensor([height, width], device=device).expand(batch_size, 2)
    time_ids = torch.cat(
        [batch["original_size"].to(device), batch["crops_coords_top_left"].to(device), target_size], dim=1
    )
    added = {"text_embeds": embeds.mean(dim=1), "time_ids": time_ids}

    spatial = bool(getattr(pipeline_parts, "spatial_conditioning", False))

    def predict(noisy, timesteps):
        return unet(unet_input(noisy, embeds, spatial), timesteps, encoder_hidden_states=embeds,
                    added_cond_kwargs=added).sample

    return diffusion_loss(
        pipeline_parts, latents, predict, noise_offset=noise_offset, generator=generator, snr_gamma=snr_gamma,
        noise=noise, timesteps=timesteps,
    )


def diffusion_loss(
    pipeline_parts,
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    noise_offset: float = 0.1,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Steps 4-5, shared by the image and the video decoder: offset noise at a uniformly drawn training timestep
    (x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise), the UNet's prediction ``predict(x_t, timesteps)`` and the MSE to
    the scheduler's target (`prediction_target`), a mean over samples. ``latents``: (B, C, ...) clean latents.
    ``snr_gamma``: Min-SNR loss weighting (each sample's MSE weighted as if its target were x_0 with weight
    min(SNR, gamma)); None: the plain MSE of the paper. ``noise`` (like ``latents``) and ``timesteps`` (B,) long:
    given, they are used instead of drawing them from ``generator`` (fixed-noise comparisons)."""
    device, dtype = latents.device, latents.dtype
    if noise is None:
        noise = offset_noise(latents, noise_offset, generator)
    alphas_cumprod = pipeline_parts.scheduler.alphas_cumprod.to(device)
    if timesteps is None:
        timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(device)
    noise = noise.to(latents)
    a = alphas_cumprod[timesteps].to(dtype).view(-1, *([1] * (latents.ndim - 1)))
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = prediction_target(pipeline_parts.scheduler, latents, noise, a)
    if snr_gamma is None:
        return F.mse_loss(predict(noisy, timesteps).float(), target.float())
    per_sample = (predict(noisy, timesteps).float() - target.float()).pow(2).flatten(1).mean(1)
    return (per_sample * min_snr_weight(pipeline_parts.scheduler, a.flatten().float(), snr_gamma)).mean()


def accumulated_update(
    unet: torch.nn.Module,
    losses: Iterable[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    micro_batches: int = 1,
    max_grad_norm: float = 1.0,
) -> float:
    """Step 6 with gradient accumulation: one clipped AdamW update from the scalar losses
    of ``micro_batches`` equal-sized micro-batches, each back-propagated with weight 1 / ``micro_batches``. The
    loss is a per-sample mean, so the gradient is that of one batch of all their samples. ``losses`` may be lazy
    (a generator computing each micro-batch's loss when asked), so only one micro-batch's activations are alive at
    a time. The losses are summed on their device and read once per step (one host sync, not one per micro-batch).
    Returns their mean; when it is not finite the gradients are dropped and it returns before touching the
    weights (the caller stops the run)."""
    optimizer.zero_grad(set_to_none=True)
    total, count = None, 0
    for loss in losses:
        (loss / micro_batches).backward()
        total = loss.detach().double() if total is None else total + loss.detach().double()
        count += 1
    if count != micro_batches:
        raise ValueError(f"accumulated_update got {count} losses for micro_batches={micro_batches}")
    mean = total.item() / micro_batches
    if not math.isfinite(mean):
        optimizer.zero_grad(set_to_none=True)
        return mean
    torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
    optimizer.step()
    return mean


def min_snr_weight(scheduler, alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction type: min(SNR, gamma)
    divided by SNR (epsilon), by SNR + 1 (v) or by 1 (x_0), with SNR = a / (1 - a)."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.get("prediction_type", "epsilon")
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped


def pixel_scale_of(parts) -> int:
    """Pixel-space decoders may run their UNet below the output size (`Emu2VisualDecoderPipeline.pixel_scale`)."""
    return int(getattr(parts, "pixel_scale", 1)) if getattr(parts, "vae", None) is None else 1


# ---------------------------------------------------------------------------------------------- video


def video_decoder_loss(
    pipeline_parts,
    frames: torch.Tensor,
    frame_embeds: torch.Tensor,
    *,
    uncond_embeds: torch.Tensor | None = None,
    condition_drop_prob: float = 0.1,
    noise_offset: float = 0.1,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> torch.Tensor:
    """The scalar loss of one (micro-)batch of clips, with its graph: MSE to the scheduler's target (epsilon by
    default) on noised clips, the noising being the image decoder's (`diffusion_loss`).
    frames (B, F, 3, H, W) in [-1, 1]; frame_embeds (B, F, Q, Dv) from the frozen encoder; uncond_embeds
    (F*Q, Dv) for guidance dropout (whole clips are dropped; zeros when None)."""
    unet, vae = pipeline_parts.unet, pipeline_parts.vae
    device, dtype = unet.device, unet.dtype
    batch, num_frames = frames.shape[:2]

    context = frame_embeds.flatten(1, 2).to(device=device, dtype=dtype)
    context, _ = drop_conditioning(context, condition_drop_prob, uncond_embeds, generator)

    flat = encode_to_latents(vae, frames.flatten(0, 1).to(device), generator, pixel_scale_of(pipeline_parts))
    latents = flat.unflatten(0, (batch, num_frames)).permute(0, 2, 1, 3, 4).to(dtype)  # (B, C, F, h, w)

    def predict(noisy, timesteps):
        return unet(
            noisy, timesteps, encoder_hidden_states=context, cross_attention_kwargs={"num_frames": num_frames}
        ).sample

    return diffusion_loss(
        pipeline_parts, latents, predict, noise_offset=noise_offset, generator=generator, snr_gamma=snr_gamma
    )
