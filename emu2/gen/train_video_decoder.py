"""Video-decoder training step (paper 2.2.3): the image decoder's noising, loss and update
(`emu2.gen.train_decoder`) over clips, for the 3D UNet of `emu2.model.video_decoder.Emu2VideoDecoderPipeline`.

The clip's frames are VAE-encoded (or kept as pixels) one by one and stacked as (B, C, F, h, w) latents; the
UNet is conditioned on every frame's embeddings, flattened to (B, F*Q, Dv), which the pipeline's per-frame
cross-attention splits back per frame.
"""

from __future__ import annotations

import torch

from .train_decoder import (
    diffusion_loss,
    drop_conditioning,
    encode_to_latents,
    pixel_scale_of,
)


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
