"""The image decoder of Emu2-Gen: a diffusers pipeline from visual embeddings to images (paper 2.2.3;
official-format sections 2.3 and 7).

An SDXL-style UNet denoises latents conditioned on visual embeddings (B, Q, Dv) instead of text: the
embeddings are the cross-attention context, and their mean over Q is the pooled "text_embeds" of SDXL's
"text_time" added conditions. Where the embeddings come from is not this module's business: Emu2-Gen regresses them with the
language model (`Emu2ForCausalLM.regress_image_embeddings`), autoencoding takes them straight from the vision
encoder. The unconditional embeddings for classifier-free guidance are passed in the same way.

    pipe = Emu2VisualDecoderPipeline.from_pretrained("emu2-gen/decoder")   # official weights: emu2.convert.gen
    images = pipe(cond_embeds, uncond_embeds, height=1024, width=1024).images

Another sampler for one call (``pipe.scheduler`` stays the official Euler; `Emu2GenPipeline` defaults to
DPM-Solver++ at 15 steps, see `emu2.pipelines.gen.dpm_solver_scheduler`):
    pipe(cond_embeds, uncond_embeds, num_inference_steps=15, scheduler=dpm_solver_scheduler(pipe.scheduler.config))
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..model.decoder import (
    OFFICIAL_SCHEDULER_CONFIG,
    check_pixel_scale,
    check_spatial_conditioning,
    latent_scale_factor,
    latents_to_pixels,
    unet_input,
)

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Official `EmuVisualGeneration.forward(original_size=[1024, 1024])`: the SDXL size condition does not follow
# the requested height/width. A decoder trained at other sizes should be called with its training size.
OFFICIAL_ORIGINAL_SIZE = (1024, 1024)


def decode_to_images(vae: AutoencoderKL | None, latents: torch.Tensor, pixel_scale: int = 1) -> torch.Tensor:
    """(N, C, h, w) final latents -> (N, 3, H, W) images in [0, 1] (pixel space: the latents, enlarged by
    ``pixel_scale``)."""
    if vae is None:
        images = latents_to_pixels(latents, pixel_scale)
    else:
        # The official pipelines decode in the VAE's dtype (bf16) and ignore force_upcast; fp16
        # overflows in the SDXL VAE, so only that case is decoded in fp32.
        vae_dtype = vae.dtype
        upcast = vae_dtype == torch.float16 and vae.config.get("force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        # The VAE may sit on another device than the UNet (a pipeline spread over GPUs, as the official demo's
        # hook on `vae.decode` allows).
        latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        if vae.config.get("shift_factor") is not None:
            latents = latents + vae.config.shift_factor
        images = vae.decode(latents).sample
        if upcast:
            vae.to(vae_dtype)
    return (images / 2 + 0.5).clamp(0, 1)


def guided_denoising(pipe, latents: torch.Tensor, predict, guidance_scale: float, generator=None,
                     callback_on_step_end=None, scheduler=None) -> torch.Tensor:
    """The sampling loop of both decoders: ``scheduler``'s timesteps (default ``pipe.scheduler``; ``set_timesteps``
    already called), classifier-free guidance over the [cond, uncond] batch when ``guidance_scale > 1``.

    ``latents``: already scaled by ``init_noise_sigma``; ``predict(model_input, t)``: the UNet's output for the
    (doubled, when guiding) scaled model input; ``callback_on_step_end(pipe, step, t, {"latents": latents})``
    after each step, as diffusers pipelines call it (it may return replacement latents). Returns the final latents.
    """
    do_cfg = guidance_scale > 1.0
    scheduler = scheduler or pipe.scheduler
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(pipe.progress_bar(scheduler.timesteps)):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
        noise_pred = predict(model_input, t)
        if do_cfg:
            noise_cond, noise_uncond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if callback_on_step_end is not None:
            latents = (callback_on_step_end(pipe, i, t, {"latents": latents}) or {}).get("latents", latents)
    return latents


class Emu2VisualDecoderPipeline(DiffusionPipeline):
    """Decode visual embeddings (B, Q, Dv) into images with a conditional UNet, Euler sampling and CFG.

    Components: ``unet`` (`UNet2DConditionModel`, ``cross_attention_dim`` = Dv, ``addition_embed_type``
    "text_time"), ``scheduler`` (any diffusers scheduler; official Euler by default), ``vae``
    (`AutoencoderKL`, or None for pixel-space diffusion: the UNet then denoises 3-channel pixels in [-1, 1]),
    and optionally the official ``safety_checker`` + ``feature_extractor`` (flagged images become black).
    ``pixel_scale`` (pixel space only, saved in ``model_index.json``): the UNet works at 1 / ``pixel_scale`` of the
    output size and its result is enlarged bilinearly (the shapes-world decoder: 32 px UNet, 64 px images).
    ``original_size`` (saved in ``model_index.json``): the SDXL size condition used when a call gives none; None
    means the official (1024, 1024). A decoder trained on images of another size records its own, so sampling
    conditions it as it was trained.
    ``spatial_conditioning`` (saved in ``model_index.json``; the official decoder has none): the UNet also takes
    the embeddings laid out on their grid as extra input channels (`unet_input`), so its ``in_channels`` is the
    latent channels plus Dv and its ``out_channels`` the latent channels.
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components: ClassVar[list[str]] = ["vae", "safety_checker", "feature_extractor"]

    def __init__(self, unet, scheduler, vae=None, safety_checker=None, feature_extractor=None, pixel_scale: int = 1,
                 original_size: Sequence[int] | None = None, spatial_conditioning: bool = False):
        super().__init__()
        check_pixel_scale(vae, pixel_scale)
        check_spatial_conditioning(unet.config, spatial_conditioning)
        self.register_modules(
            unet=unet,
            scheduler=scheduler,
            vae=vae,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
        )
        self.register_to_config(pixel_scale=int(pixel_scale),
                                original_size=None if original_size is None else [int(v) for v in original_size],
                                spatial_conditioning=bool(spatial_conditioning))

    @classmethod
    def from_configs(
        cls,
        unet_config: Mapping,
        vae_config: Mapping | None = None,
        scheduler_config: Mapping | None = None,
        dtype: torch.dtype | None = None,
        pixel_scale: int = 1,
        spatial_conditioning: bool = False,
    ) -> Emu2VisualDecoderPipeline:
        """Randomly initialised pipeline from config dicts (diffusers kwargs, like cases.json
        ``gen_configs``). ``vae_config=None`` gives pixel-space diffusion; ``scheduler_config=None`` the
        official Euler settings.
        """
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        vae = AutoencoderKL.from_config(dict(vae_config)) if vae_config is not None else None
        scheduler = EulerDiscreteScheduler.from_config(dict(scheduler_config or OFFICIAL_SCHEDULER_CONFIG))
        pipe = cls(unet=unet, scheduler=scheduler, vae=vae, pixel_scale=pixel_scale,
                   spatial_conditioning=spatial_conditioning)
        return pipe.to(dtype=dtype) if dtype not in (None, torch.float32) else pipe

    @property
    def vae_scale_factor(self) -> int:
        """Output pixels per UNet cell along a side (`latent_scale_factor`)."""
        return latent_scale_factor(self.vae, self.pixel_scale)

    @property
    def pixel_scale(self) -> int:
        return int(self.config.get("pixel_scale", 1))

    @property
    def spatial_conditioning(self) -> bool:
        return bool(self.config.get("spatial_conditioning", False))

    @property
    def latent_channels(self) -> int:
        """Channels of what is denoised (the UNet's output; its input adds Dv with spatial conditioning)."""
        return int(self.unet.config.out_channels)

    @property
    def denoising_device(self) -> torch.device:
        """Where latents and conditions are made: the UNet's device (official: latents drawn on `unet.device`).
        diffusers' ``_execution_device`` is the first non-CPU component in name order (the safety checker before
        the UNet), which is another device when the parts are spread over several; it is right only under its
        offloading hooks, which leave the UNet's weights elsewhere between calls."""
        return self._execution_device if hasattr(self.unet, "_hf_hook") else self.unet.device

    @torch.no_grad()
    def __call__(
        self,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        scheduler=None,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Sample images conditioned on visual embeddings.

        Args:
            prompt_embeds: (B, Q, Dv) conditional visual embeddings (regressed by Emu2, or encoded images).
            negative_prompt_embeds: (B or 1, Q, Dv) unconditional embeddings for classifier-free guidance;
                required when ``guidance_scale > 1``, a single row is shared by the whole batch.
            height, width: output size in pixels; default ``unet.config.sample_size * vae_scale_factor``.
            generator: seeds the initial noise (one per prompt, or one for the batch).
            latents: (B, C, height / vae_scale_factor, width / vae_scale_factor) initial standard-normal
                latents, before ``init_noise_sigma`` scaling; drawn from ``generator`` when None.
            original_size, crops_coords_top_left: SDXL size conditions (height, width) and (top, left);
                ``original_size`` defaults to the pipeline's recorded one, else the official (1024, 1024) whatever
                the output size (official-format section 7).
            output_type: "pil" (list of PIL images), "np" (B, H, W, 3) float in [0, 1], "pt" (B, 3, H, W)
                float in [0, 1], or "latent" (the final latents, undecoded).
            callback_on_step_end: ``callback(pipe, step, t, {"latents": latents})`` after each denoising step
                (diffusers' convention): progress reports, or cancelling by raising.
            scheduler: a diffusers scheduler for this call only (default ``self.scheduler``, the official Euler),
                so one loaded pipeline serves several samplers; its state is reset by ``set_timesteps``.

        Returns:
            `StableDiffusionPipelineOutput(images, nsfw_content_detected)`: the safety checker's flag per image
            (None without a checker); the tuple ``(images, nsfw_content_detected)`` when ``return_dict`` is False.

        Long because, as every diffusers pipeline's ``__call__``, it runs the numbered sampling steps in one place.
        """
        # 0. Default size from the UNet, as diffusers pipelines do.
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        original_size = tuple(original_size or self.config.get("original_size") or OFFICIAL_ORIGINAL_SIZE)

        # 1. Check inputs.
        do_cfg = guidance_scale > 1.0
        self.check_inputs(prompt_embeds, negative_prompt_embeds, height, width, do_cfg, latents, output_type)
        batch_size = prompt_embeds.shape[0]
        device, dtype = self.denoising_device, self.unet.dtype

        # 2. Conditioning: the CFG batch is [cond, uncond], in that order, as the official pipeline stacks it.
        encoder_hidden_states, added_cond_kwargs = self.prepare_conditioning(
            prompt_embeds,
            negative_prompt_embeds if do_cfg else None,
            original_size,
            crops_coords_top_left,
            (height, width),
            device,
            dtype,
        )

        # 3. Timesteps.
        scheduler = scheduler or self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)

        # 4. Initial latents, scaled by the scheduler's init_noise_sigma.
        latents = self.prepare_latents(batch_size, height, width, generator, latents, device, dtype, scheduler)

        # 5. Denoise.
        def predict(model_input, t):
            return self.unet(
                unet_input(model_input, encoder_hidden_states, self.spatial_conditioning), t,
                encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
            ).sample

        latents = guided_denoising(self, latents, predict, guidance_scale, generator, callback_on_step_end,
                                   scheduler)

        # 6. Decode (and run the safety checker when one is loaded).
        has_nsfw = None
        if output_type == "latent":
            images = latents
        else:
            images = self.decode_latents(latents)  # (B, 3, H, W) in [0, 1]
            images, has_nsfw = self.run_safety_checker(images)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)  # uint8 via round(x * 255), as the official code
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, has_nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=has_nsfw)

    def check_inputs(
        self, prompt_embeds, negative_prompt_embeds, height, width, do_cfg, latents, output_type
    ):
        if prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (B, Q, Dv), got shape {tuple(prompt_embeds.shape)}")
        width_expected = self.unet.config.cross_attention_dim
        if prompt_embeds.shape[-1] != width_expected:
            raise ValueError(
                f"prompt_embeds have width {prompt_embeds.shape[-1]} but the UNet's cross_attention_dim is "
                f"{width_expected}; pass vision-width embeddings (after project_down), not LM hidden states"
            )
        if do_cfg:
            if negative_prompt_embeds is None:
                raise ValueError(
                    "guidance_scale > 1 needs negative_prompt_embeds (the unconditional embeddings: Emu2-Gen "
                    "regresses them from the empty prompt, autoencoding encodes an all-zero image); "
                    "or pass guidance_scale=1.0 to sample without guidance"
                )
            b, b_neg = prompt_embeds.shape[0], negative_prompt_embeds.shape[0]
            if negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:] or b_neg not in (1, b):
                raise ValueError(
                    f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must be (1 or {b}, "
                    f"{', '.join(map(str, prompt_embeds.shape[1:]))}) to match prompt_embeds"
                )
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        if latents is not None:
            shape = (prompt_embeds.shape[0], self.latent_channels, height // factor, width // factor)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for this call, got {tuple(latents.shape)}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")

    def prepare_conditioning(
        self,
        prompt_embeds,
        negative_prompt_embeds,
        original_size,
        crops_coords_top_left,
        target_size,
        device,
        dtype,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> encoder_hidden_states (B or 2B, Q, Dv) and the SDXL added conditions for it.

        text_embeds (2B, Dv) is the mean over Q; time_ids (2B, 6) = original_size + crop + target size.
        """
        embeds = prompt_embeds
        if negative_prompt_embeds is not None:
            uncond = negative_prompt_embeds.expand(prompt_embeds.shape[0], -1, -1)
            embeds = torch.cat([prompt_embeds, uncond.to(prompt_embeds)])
        embeds = embeds.to(device=device, dtype=dtype)
        time_ids = torch.tensor([*original_size, *crops_coords_top_left, *target_size], device=device)
        added = {"text_embeds": embeds.mean(dim=1), "time_ids": time_ids.repeat(embeds.shape[0], 1)}
        return embeds, added

    def prepare_latents(self, batch_size, height, width, generator, latents, device, dtype,
                        scheduler=None) -> torch.Tensor:
        """-> (B, C, h, w) initial latents times the scheduler's init_noise_sigma (which depends on set_timesteps)."""
        if latents is None:
            factor = self.vae_scale_factor
            shape = (batch_size, self.latent_channels, height // factor, width // factor)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype)
        return latents * (scheduler or self.scheduler).init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) images in [0, 1] (pixel space: the latents are the image,
        enlarged by ``pixel_scale``)."""
        return decode_to_images(self.vae, latents, self.pixel_scale)

    def run_safety_checker(self, images: torch.Tensor) -> tuple[torch.Tensor, list[bool] | None]:
        """Official post-processing when a checker is loaded: flagged images become black.

        Returns the images and one flag per image (None without a checker), as the official pipeline does."""
        if self.safety_checker is None:
            return images, None
        array = images.cpu().permute(0, 2, 3, 1).float().numpy()
        checker_input = self.feature_extractor(self.numpy_to_pil(array), return_tensors="pt")
        pixel_values = checker_input.pixel_values.to(self.safety_checker.device, self.safety_checker.dtype)
        _, has_nsfw = self.safety_checker(images=array, clip_input=pixel_values)
        flagged = torch.tensor(has_nsfw, dtype=torch.bool, device=images.device)
        images = torch.where(flagged[:, None, None, None], torch.zeros_like(images), images)
        return images, [bool(flag) for flag in has_nsfw]


def images_to_uint8(images: np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]) -> np.ndarray:
    """Pipeline output ("np", "pt" or "pil") -> (B, H, W, 3) uint8, rounding as the official code does."""
    if isinstance(images, torch.Tensor):
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
    if isinstance(images, np.ndarray):
        return (images * 255).round().astype(np.uint8)
    return np.stack([np.asarray(image.convert("RGB")) for image in images])
