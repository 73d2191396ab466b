"""Spatial conditioning: a decoder whose UNet also takes the embeddings laid out on their grid as input channels."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

from emu2.model.decoder import embedding_map
from emu2.model.decoder_configs import decoder_scheduler_config, decoder_unet_config
from emu2.pipelines.visual_decoder import Emu2VisualDecoderPipeline
from emu2.train.stages.diffusion import decoder_loss

WIDTH, Q = 16, 4  # a 2 x 2 grid of embeddings


def _pipeline(spatial: bool) -> Emu2VisualDecoderPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(decoder_unet_config(WIDTH, 8, channels=(8, 16), spatial_conditioning=spatial))
    return Emu2VisualDecoderPipeline(unet=unet, scheduler=EulerDiscreteScheduler.from_config(decoder_scheduler_config()),
                                     spatial_conditioning=spatial)


def test_embedding_map_puts_each_embedding_over_its_region_in_row_major_order():
    embeds = torch.arange(Q, dtype=torch.float32).view(1, Q, 1).expand(1, Q, WIDTH)
    grid = embedding_map(embeds, 4, 4)
    assert grid.shape == (1, WIDTH, 4, 4)
    assert grid[0, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_embedding_map_refuses_a_non_square_count():
    with pytest.raises(ValueError, match="square"):
        embedding_map(torch.zeros(1, 3, WIDTH), 4, 4)


def test_the_unet_takes_latents_plus_embedding_channels_and_denoises_latents():
    pipe = _pipeline(spatial=True)
    assert (pipe.unet.config.in_channels, pipe.unet.config.out_channels) == (3 + WIDTH, 3)
    images = pipe(torch.randn(2, Q, WIDTH), torch.zeros(1, Q, WIDTH), num_inference_steps=2,
                  output_type="pt").images
    assert images.shape == (2, 3, 8, 8)


def test_where_an_embedding_lies_changes_the_image_only_with_spatial_conditioning():
    """Cross-attention alone is blind to the order of its keys; the grid channels are not."""
    embeds = torch.randn(1, Q, WIDTH, generator=torch.Generator().manual_seed(1))
    swapped = embeds[:, [3, 2, 1, 0]]
    for spatial, moved in ((False, False), (True, True)):
        pipe = _pipeline(spatial)
        out = [pipe(e, guidance_scale=1.0, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images for e in (embeds, swapped)]
        assert (not torch.allclose(out[0], out[1], atol=1e-5)) == moved


def test_the_setting_is_saved_and_a_mismatched_unet_is_refused(tmp_path):
    _pipeline(spatial=True).save_pretrained(tmp_path)
    assert Emu2VisualDecoderPipeline.from_pretrained(tmp_path).spatial_conditioning
    unet = UNet2DConditionModel.from_config(decoder_unet_config(WIDTH, 8, channels=(8, 16)))
    with pytest.raises(ValueError, match="input channels"):
        Emu2VisualDecoderPipeline(unet=unet, scheduler=EulerDiscreteScheduler(), spatial_conditioning=True)


def test_training_loss_reads_the_grid():
    pipe = _pipeline(spatial=True)
    batch = {"pixel_values": torch.rand(2, 3, 8, 8) * 2 - 1, "encoder_inputs": torch.randn(2, Q, WIDTH),
             "original_size": torch.tensor([[8, 8]] * 2), "crops_coords_top_left": torch.zeros(2, 2, dtype=torch.long)}
    loss = decoder_loss(pipe, batch, lambda x: x, condition_drop_prob=0.0, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and pipe.unet.conv_in.weight.grad[:, 3:].abs().sum() > 0
