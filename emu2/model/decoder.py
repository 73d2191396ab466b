"""Diffusion-decoder parts shared by the image and video decoders and their training (paper 2.2.3).

The decoders are SDXL-style UNets conditioned on visual embeddings (B, Q, Dv) instead of text; the pipelines that
sample them are `emu2.pipelines.visual_decoder` and `emu2.pipelines.video_decoder`, their training step
`emu2.train.stages.diffusion`. This module holds what both sides need: the official Euler scheduler settings,
the pixel-space conversions (a UNet may denoise pixels, shrunk by ``pixel_scale``, instead of VAE latents) and
spatial conditioning (the pooled embeddings laid out on their sqrt(Q) x sqrt(Q) grid as extra input channels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

# Official-format section 7: Euler, SD "scaled_linear" betas, "leading" spacing, offset 1 (981, 961, ..., 1).
OFFICIAL_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def latent_scale_factor(vae: AutoencoderKL | None, pixel_scale: int = 1) -> int:
    """Output pixels per UNet cell along a side: the VAE's down-sampling (the official pipeline computes it
    from the VAE, not a fixed 8), or in pixel space ``pixel_scale`` (the UNet denoises the image shrunk by that
    factor, and its output is enlarged back)."""
    if vae is None:
        return int(pixel_scale)
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_pixel_scale(vae, pixel_scale: int) -> None:
    if int(pixel_scale) != pixel_scale or pixel_scale < 1:
        raise ValueError(f"pixel_scale must be a positive integer, got {pixel_scale!r}")
    if vae is not None and pixel_scale != 1:
        raise ValueError("pixel_scale applies to pixel-space decoders (vae=None) only; a VAE sets its own scale")


def pixels_to_latents(pixel_values: torch.Tensor, pixel_scale: int = 1) -> torch.Tensor:
    """Pixel space: (N, 3, H, W) in [-1, 1] -> what the UNet denoises, the image averaged over
    ``pixel_scale`` x ``pixel_scale`` blocks (the inverse of `latents_to_pixels` up to the lost detail)."""
    return pixel_values if pixel_scale == 1 else F.avg_pool2d(pixel_values, pixel_scale)


def latents_to_pixels(latents: torch.Tensor, pixel_scale: int = 1) -> torch.Tensor:
    """Pixel space: the UNet's (N, 3, h, w) -> (N, 3, h * pixel_scale, w * pixel_scale), bilinear."""
    if pixel_scale == 1:
        return latents
    return F.interpolate(latents.float(), scale_factor=pixel_scale, mode="bilinear", align_corners=False).to(
        latents.dtype
    )


def embedding_map(embeds: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Spatial conditioning: (B, Q, Dv) embeddings of a sqrt(Q) x sqrt(Q) grid of image regions in row-major
    order (what `Emu2VisionEncoder.pool` makes) -> (B, Dv, height, width), each region's embedding repeated over
    the UNet cells it covers. Concatenated to the UNet's input, it tells the UNet where each embedding lies,
    which cross-attention alone cannot (keys carry no position unless the encoder mixed one in)."""
    batch, q, width_v = embeds.shape
    side = math.isqrt(q)
    if side * side != q:
        raise ValueError(f"spatial conditioning needs a square number of embeddings per image, got {q}")
    grid = embeds.transpose(1, 2).reshape(batch, width_v, side, side)
    return F.interpolate(grid, size=(height, width), mode="nearest")


def unet_input(sample: torch.Tensor, embeds: torch.Tensor, spatial_conditioning: bool) -> torch.Tensor:
    """What the UNet denoises: ``sample`` (B, C, h, w), with the `embedding_map` of ``embeds`` (B, Q, Dv)
    appended as Dv more channels when the decoder is spatially conditioned."""
    if not spatial_conditioning:
        return sample
    grid = embedding_map(embeds, sample.shape[-2], sample.shape[-1]).to(sample)
    return torch.cat([sample, grid], dim=1)


def check_spatial_conditioning(unet_config, spatial_conditioning: bool) -> None:
    """A spatially conditioned UNet takes the latents plus the embeddings (Dv = ``cross_attention_dim``)."""
    want = unet_config.out_channels + (unet_config.cross_attention_dim if spatial_conditioning else 0)
    if unet_config.in_channels != want:
        raise ValueError(
            f"the UNet takes {unet_config.in_channels} input channels but spatial_conditioning="
            f"{bool(spatial_conditioning)} needs {want} ({unet_config.out_channels} latent channels"
            + (f" + {unet_config.cross_attention_dim} embedding channels)" if spatial_conditioning else ")")
        )
