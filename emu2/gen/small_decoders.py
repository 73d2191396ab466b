"""Decoders built from scratch, sized for the shapes world: UNet and VAE configs and a tiny VAE trainer.

`decoder_unet_config` and `video_decoder_unet_config` give small SDXL-shaped 2D and 3D UNets conditioned on the
visual embeddings, `decoder_scheduler_config` the official Euler settings with a recipe's overrides, and
`train_small_autoencoder` a tiny `AutoencoderKL` (no pretrained VAE is available offline for the shapes world),
with `reconstruction_psnr` to judge it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from ..lr_schedule import warmup_decay_schedule


def small_autoencoder_config(
    latent_channels: int = 4, block_out_channels: Sequence[int] = (16, 32, 32), norm_num_groups: int = 8
) -> dict:
    """A tiny SD-style VAE: 2 ** (len(blocks) - 1) down-sampling (64 px -> 16 x 16 latents by default)."""
    n = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent_channels,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "norm_num_groups": norm_num_groups,
        "sample_size": 64,
        "scaling_factor": 1.0,
    }


def train_small_autoencoder(
    images: Sequence[PIL.Image.Image],
    *,
    size: int = 64,
    steps: int = 2000,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    config: dict | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> AutoencoderKL:
    """Train a tiny `AutoencoderKL` on ``images`` (resized to ``size``): L1 + MSE reconstruction plus a small
    KL term, then ``scaling_factor`` = 1 / std of the latents, as Stable Diffusion sets it, so the UNet sees
    unit-variance latents.

    Why a VAE: its latents make a UNet step and a sampled image several times cheaper than pixel space at 64 px,
    which pays for the VAE's own training after some hundreds of decoder steps, its reconstruction error is far
    below what decoding pooled embeddings loses anyway, and it keeps the official latent-diffusion code path. Pixel
    space (``vae=None``) remains the choice for very short runs or when exact pixels matter. The measurements:
    docs/training-notes.md, "Small autoencoder".
    """
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config or small_autoencoder_config())
    data = images_to_tensor(images, size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = warmup_decay_schedule(optimizer, max(steps, 1), 0, "cosine")
    generator = torch.Generator().manual_seed(seed)
    vae.train()
    for step in range(steps):
        x = data[torch.randint(0, len(data), (min(batch_size, len(data)),), generator=generator)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"vae step {step}: loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in data.split(64)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


def images_to_tensor(images: Sequence[PIL.Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float pixels in [-1, 1] (bicubic resize), the VAE's input range."""
    pixels = np.stack([np.asarray(im.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32)
                       for im in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Sequence[PIL.Image.Image], size: int = 64) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of VAE reconstructions (posterior mode) of ``images``."""
    x = images_to_tensor(images, size)
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(64)])
    mse = (((recon.clamp(-1, 1) - x) / 2) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


def decoder_unet_config(
    vision_width: int,
    sample_size: int,
    channels: Sequence[int] = (32, 64, 64),
    attention: Sequence[bool] | None = None,
    layers_per_block: int = 1,
    in_channels: int = 3,
    spatial_conditioning: bool = False,
) -> dict:
    """A small SDXL-shaped UNet (text_time conditions, cross-attention on the visual embeddings).

    ``attention[i]``: whether level i has (self + cross) attention; default every level but the first, as SD.
    The mid block always has it. ``in_channels``: the channels denoised (3 in pixel space, else the VAE's);
    ``spatial_conditioning`` adds ``vision_width`` input channels for the embeddings laid out on their grid
    (`emu2.model.decoder.unet_input`).
    """
    time_dim, n = 32, len(channels)
    attention = _attention_levels(attention, n)
    return {
        "sample_size": sample_size, "out_channels": in_channels,
        "in_channels": in_channels + (vision_width if spatial_conditioning else 0),
        "layers_per_block": layers_per_block, "block_out_channels": list(channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": [max(1, c // 32) for c in channels],
        "cross_attention_dim": vision_width, "norm_num_groups": 8, "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": vision_width + 6 * time_dim,
    }


def video_decoder_unet_config(
    vision_width: int,
    sample_size: int,
    channels: Sequence[int] = (32, 64, 64),
    attention: Sequence[bool] | None = None,
    layers_per_block: int = 1,
    in_channels: int = 3,
) -> dict:
    """A small `UNet3DConditionModel` (temporal convolutions and attention after every spatial layer), the
    video counterpart of `decoder_unet_config`."""
    n = len(channels)
    attention = _attention_levels(attention, n)
    return {
        "sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels,
        "layers_per_block": layers_per_block, "block_out_channels": list(channels),
        "down_block_types": ["CrossAttnDownBlock3D" if a else "DownBlock3D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock3D" if a else "UpBlock3D" for a in reversed(attention)],
        "norm_num_groups": 8, "cross_attention_dim": vision_width, "attention_head_dim": max(1, min(channels) // 8),
    }


def _attention_levels(attention, n: int) -> list[bool]:
    levels = [i > 0 for i in range(n)] if attention is None else [bool(a) for a in attention]
    if len(levels) != n:
        raise ValueError(f"decoder.attention has {len(levels)} entries for {n} UNet levels (decoder.channels)")
    return levels


def decoder_scheduler_config(overrides: dict | None = None) -> dict:
    """The official Euler settings with the recipe's ``decoder.scheduler`` overrides on top."""
    from ..model.decoder import OFFICIAL_SCHEDULER_CONFIG

    return {**OFFICIAL_SCHEDULER_CONFIG, **(overrides or {})}
