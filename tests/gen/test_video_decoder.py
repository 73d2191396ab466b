"""Video decoder: per-frame cross-attention, sampling shapes, and a training step that learns."""

import subprocess
import sys

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from emu2.model.video_decoder import PerFrameCrossAttnProcessor
from emu2.pipelines.video_decoder import Emu2VideoDecoderPipeline
from emu2.train.stages.diffusion import accumulated_update, freeze_for_decoder_training, video_decoder_loss

WIDTH, Q, FRAMES = 16, 4, 3


def _pipeline(pixel_space=True):
    torch.manual_seed(0)
    unet = {
        "sample_size": 8,
        "in_channels": 3 if pixel_space else 4,
        "out_channels": 3 if pixel_space else 4,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "cross_attention_dim": WIDTH,
        "attention_head_dim": 4,
    }
    vae = (
        None
        if pixel_space
        else {
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "norm_num_groups": 4,
            "latent_channels": 4,
        }
    )
    pipe = Emu2VideoDecoderPipeline.from_configs(unet, vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frame_embeds(batch, seed=0):
    return torch.randn(batch, FRAMES, Q, WIDTH, generator=torch.Generator().manual_seed(seed))


def test_each_frame_cross_attends_to_its_own_embeddings():
    attn = Attention(query_dim=8, cross_attention_dim=WIDTH, heads=2, dim_head=4)
    hidden = torch.randn(2 * FRAMES, 5, 8)  # rows b * F + f, as the 3D UNet flattens them
    per_frame = torch.randn(2, FRAMES, Q, WIDTH)
    context = per_frame.flatten(1, 2).repeat_interleave(FRAMES, dim=0)  # what the 3D UNet passes down
    ours = PerFrameCrossAttnProcessor()(attn, hidden, context, num_frames=FRAMES)
    reference = AttnProcessor2_0()(attn, hidden, per_frame.flatten(0, 1))
    torch.testing.assert_close(ours, reference)
    self_attn = Attention(query_dim=8, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(
        PerFrameCrossAttnProcessor()(self_attn, x, None, num_frames=FRAMES), AttnProcessor2_0()(self_attn, x)
    )


def test_sampling_returns_one_image_per_frame():
    pipe = _pipeline(pixel_space=False)
    frames = pipe(_frame_embeds(2), _frame_embeds(1, 1), num_inference_steps=2, output_type="np").frames
    assert frames.shape == (2, FRAMES, 16, 16, 3) and 0 <= frames.min() and frames.max() <= 1
    clips = pipe(_frame_embeds(1), _frame_embeds(1, 1), num_inference_steps=1, output_type="pil").frames
    assert len(clips) == 1 and len(clips[0]) == FRAMES and clips[0][0].size == (16, 16)


def test_video_training_step_lowers_the_loss_on_a_fixed_clip():
    pipe = _pipeline()
    freeze_for_decoder_training(pipe)
    optimizer = torch.optim.AdamW(pipe.unet.parameters(), lr=3e-3)
    clip = torch.rand(2, FRAMES, 3, 8, 8) * 2 - 1
    embeds = _frame_embeds(2)
    losses = [
        accumulated_update(pipe.unet, [video_decoder_loss(pipe, clip, embeds, generator=torch.Generator().manual_seed(0))],
                           optimizer)
        for _ in range(10)
    ]
    assert losses[-1] < 0.7 * losses[0], losses


def test_the_video_decoder_imports_without_the_data_layer_or_training_code():
    script = ("import sys, emu2.pipelines.video_decoder; "
              "print([m for m in sys.modules if m.startswith(('emu2.data', 'emu2.train', 'webdataset'))])")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
