"""Configs of diffusion decoders built from scratch, sized for the shapes world.

`decoder_unet_config` and `video_decoder_unet_config` give small SDXL-shaped 2D and 3D UNets conditioned on the
visual embeddings, `decoder_scheduler_config` the official Euler settings with a recipe's overrides, and
`small_autoencoder_config` a tiny SD-style `AutoencoderKL` (the recipes' ``vae`` may name a folder holding one).
"""

from __future__ import annotations

from collections.abc import Sequence

from .decoder import OFFICIAL_SCHEDULER_CONFIG


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
    return {**OFFICIAL_SCHEDULER_CONFIG, **(overrides or {})}
