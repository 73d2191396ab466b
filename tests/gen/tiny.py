"""Tiny decoder configs shared by the tests/gen tests (random weights, built in milliseconds)."""

from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline

WIDTH = 16  # Dv: cross_attention_dim
TIME_DIM = 4


def unet_config(in_channels: int = 4, sample_size: int = 8) -> dict:
    return {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "layers_per_block": 1,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "attention_head_dim": [2, 2],
        "cross_attention_dim": WIDTH,
        "norm_num_groups": 4,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_DIM,
        "projection_class_embeddings_input_dim": WIDTH + 6 * TIME_DIM,
    }


def vae_config() -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4,
        "sample_size": 16,
        "scaling_factor": 0.13025,
    }


def pipeline(pixel_space: bool = False, seed: int = 0) -> Emu2VisualDecoderPipeline:
    import torch

    torch.manual_seed(seed)
    if pixel_space:
        pipe = Emu2VisualDecoderPipeline.from_configs(unet_config(in_channels=3, sample_size=16), None)
    else:
        pipe = Emu2VisualDecoderPipeline.from_configs(unet_config(), vae_config())
    pipe.set_progress_bar_config(disable=True)
    return pipe
