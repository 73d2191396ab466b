"""The video decoder: a diffusers pipeline from per-frame visual embeddings to a clip (paper 2.2.3).

A `UNet3DConditionModel` with per-frame cross-attention (`emu2.model.video_decoder.PerFrameCrossAttnProcessor`)
denoises the clip; sampling is the image decoder's (`emu2.pipelines.visual_decoder`): Euler, classifier-free
guidance with the [cond, uncond] batch order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet3DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..model.decoder import OFFICIAL_SCHEDULER_CONFIG, check_pixel_scale, latent_scale_factor
from ..model.video_decoder import PerFrameCrossAttnProcessor
from .visual_decoder import OUTPUT_TYPES, decode_to_images, guided_denoising


@dataclass
class VideoPipelineOutput(BaseOutput):
    """``frames``: list (per clip) of lists of PIL images, (B, F, H, W, 3) float array, or (B, F, 3, H, W)
    tensor, in [0, 1], or (B, C, F, h, w) latents, as ``output_type`` asked."""

    frames: list | np.ndarray | torch.Tensor


class Emu2VideoDecoderPipeline(DiffusionPipeline):
    """Decode per-frame visual embeddings (B, F, Q, Dv) into F frames with a `UNet3DConditionModel`.

    ``vae`` is optional (None: pixel space, the UNet denoises 3-channel pixels in [-1, 1], at 1 / ``pixel_scale``
    of the output size as in `Emu2VisualDecoderPipeline`); frames are decoded independently.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae"]

    def __init__(
        self, unet: UNet3DConditionModel, scheduler, vae: AutoencoderKL | None = None, pixel_scale: int = 1
    ):
        super().__init__()
        check_pixel_scale(vae, pixel_scale)
        unet.set_attn_processor(PerFrameCrossAttnProcessor())
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(pixel_scale=int(pixel_scale))

    @classmethod
    def from_configs(
        cls,
        unet_config: dict,
        vae_config: dict | None = None,
        scheduler_config: dict | None = None,
        pixel_scale: int = 1,
    ):
        unet = UNet3DConditionModel.from_config(dict(unet_config))
        vae = AutoencoderKL.from_config(dict(vae_config)) if vae_config is not None else None
        scheduler = EulerDiscreteScheduler.from_config(dict(scheduler_config or OFFICIAL_SCHEDULER_CONFIG))
        return cls(unet=unet, scheduler=scheduler, vae=vae, pixel_scale=pixel_scale)

    @property
    def pixel_scale(self) -> int:
        return int(self.config.get("pixel_scale", 1))

    @property
    def vae_scale_factor(self) -> int:
        return latent_scale_factor(self.vae, self.pixel_scale)

    @torch.no_grad()
    def __call__(
        self,
        frame_embeds: torch.Tensor,
        negative_frame_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> VideoPipelineOutput | tuple:
        """Sample clips.

        Args:
            frame_embeds: (B, F, Q, Dv) visual embeddings, one set per frame.
            negative_frame_embeds: (B or 1, F or 1, Q, Dv) unconditional embeddings, needed when guidance > 1.
            latents: (B, C, F, height / vae_scale_factor, width / vae_scale_factor) standard-normal noise,
                before ``init_noise_sigma`` scaling.

        Long because, as every diffusers pipeline's ``__call__``, it runs the numbered sampling steps in one place.
        """
        # 0-1. Sizes and input checks.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if frame_embeds.ndim != 4:
            raise ValueError(f"frame_embeds must be (B, F, Q, Dv), got {tuple(frame_embeds.shape)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        do_cfg = guidance_scale > 1.0
        if do_cfg and negative_frame_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative_frame_embeds (or pass guidance_scale=1.0)")
        batch, num_frames = frame_embeds.shape[:2]
        device, dtype = self._execution_device, self.unet.dtype

        # 2. Conditioning: [cond, uncond], each (B, F*Q, Dv) for the per-frame processor.
        embeds = frame_embeds
        if do_cfg:
            embeds = torch.cat([embeds, negative_frame_embeds.to(embeds).expand_as(frame_embeds)])
        context = embeds.flatten(1, 2).to(device=device, dtype=dtype)
        attn_kwargs = {"num_frames": num_frames}

        # 3. Timesteps.
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. Latents (B, C, F, h, w).
        factor = self.vae_scale_factor
        shape = (batch, self.unet.config.in_channels, num_frames, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # 5. Denoise.
        def predict(model_input, t):
            return self.unet(
                model_input, t, encoder_hidden_states=context, cross_attention_kwargs=attn_kwargs
            ).sample

        latents = guided_denoising(self, latents, predict, guidance_scale, generator)

        # 6. Decode frame by frame.
        if output_type == "latent":
            frames = latents
        else:
            frames = self.decode_latents(latents)  # (B, F, 3, H, W) in [0, 1]
            if output_type != "pt":
                frames = frames.cpu().permute(0, 1, 3, 4, 2).float().numpy()
                if output_type == "pil":
                    frames = [self.numpy_to_pil(clip) for clip in frames]
        self.maybe_free_model_hooks()
        return VideoPipelineOutput(frames=frames) if return_dict else (frames,)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, F, h, w) -> (B, F, 3, H, W) in [0, 1]."""
        batch, _, num_frames = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)
        return decode_to_images(self.vae, flat, self.pixel_scale).unflatten(0, (batch, num_frames))
