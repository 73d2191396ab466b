"""Emu2-Gen end to end: interleaved prompt -> regressed visual embeddings -> diffusion decoder -> image.

Modes (official `EmuVisualGeneration`, official-format section 7):
- generation (any text, even ""): cond = the model's regressed embeddings of the prompt (text, images,
  grounded objects as ``<phrase>..</phrase><object>`` + box image + ``</object>`` + subject image);
  uncond = the regressed embeddings of the empty prompt.
- autoencoding (images and no text at all, as the official ``has_image and not has_text``): cond = the
  encoder's pooled embeddings of the images, one row each; uncond = the embeddings of an all-zero image in
  normalised pixel space. Pass ``""`` with the image to generate from it instead.
The unconditional embeddings are computed once per pipeline and cached, as official; the cache is dropped when the
encoder's weights change (training steps, ``load_state_dict``, ``to``). On a cold cache a short prompt and the empty
prompt are regressed as one left-padded batch of two: the regression is memory-bound, so the pair costs about one.

Sampling (``sampler``): the default is DPM-Solver++ (2M) with "trailing" timesteps at 15 steps, which `emu2 bench
generate` measures against the official 50 Euler steps (README "Benchmarks"); ``sampler="official"`` runs the
decoder's own scheduler (the official Euler, loaded with the checkpoint) at the official 50 steps, and reproduces
the official images.

    gen = Emu2GenPipeline.from_pretrained("emu2-gen")
    gen(["impressionist painting of an astronaut in a jungle"]).image
    gen([source_image, "wearing a red hat on the beach."]).image          # editing
    gen([source_image]).image                                              # autoencoding
    gen(["a red circle"], sampler="official").image                        # the official 50 Euler steps
    gen.to("cuda", torch.bfloat16)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from .. import processing as P
from .emu2 import Emu2Pipeline, as_batch
from .visual_decoder import Emu2VisualDecoderPipeline

_NULL_IMAGE, _EMPTY_PROMPT = "[NULL_IMAGE]", ""
SAMPLERS = ("dpm-solver++", "official")
DEFAULT_STEPS = {"dpm-solver++": 15, "official": 50}


def dpm_solver_scheduler(official_config) -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M) on the official noise schedule (betas, epsilon prediction), "trailing" timesteps.

    The official "leading" spacing starts K steps at t = 1000 - 1000 / K + 1 (934 for 15 steps), skipping the
    noisiest part that the official 50 steps start from (981); "trailing" starts at 999 and lands closer to them."""
    return DPMSolverMultistepScheduler.from_config(official_config, algorithm_type="dpmsolver++",
                                                   timestep_spacing="trailing")


@dataclass
class Emu2GenOutput:
    """image: the first generated image; images: all of them; prompt_embeds: (2B, Q, Dv), cond then uncond;
    nsfw_content_detected: the safety checker's flag for ``image`` (None without a checker), as official."""

    image: Image.Image
    images: list[Image.Image]
    prompt_embeds: torch.Tensor = field(repr=False)
    nsfw_content_detected: bool | None = None


def tiny_decoder_config(vision_width: int) -> dict:
    """A few-thousand-parameter UNet + VAE of the official shape (SDXL "text_time" conditions) for tests."""
    time_dim = 8
    return {
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": [32, 64],
                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                     "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
                     "attention_head_dim": [2, 4], "cross_attention_dim": vision_width, "norm_num_groups": 8,
                     "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
                     "projection_class_embeddings_input_dim": vision_width + 6 * time_dim},
        "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [16, 32], "layers_per_block": 1,
                    "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
                    "norm_num_groups": 8, "sample_size": 16, "scaling_factor": 0.13025},
    }


class Emu2GenPipeline:
    """The multimodal encoder (`Emu2Pipeline`) and the visual decoder (`Emu2VisualDecoderPipeline`) together."""

    def __init__(self, encoder: Emu2Pipeline, decoder: Emu2VisualDecoderPipeline):
        width = encoder.model.config.vision_config.width
        if decoder.unet.config.cross_attention_dim != width:
            raise ValueError(f"decoder cross_attention_dim {decoder.unet.config.cross_attention_dim} != encoder "
                             f"vision width {width}: the decoder was trained for another encoder")
        self.encoder, self.decoder = encoder, decoder
        self._uncond: dict[str, torch.Tensor] = {}
        self._uncond_weights: tuple = ()

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        decoder_device: str | torch.device | None = None, **encoder_kwargs) -> Emu2GenPipeline:
        """A directory with ``encoder/`` (an `Emu2Pipeline` directory) and ``decoder/`` (diffusers layout).

        ``encoder_kwargs`` go to the encoder's ``from_pretrained``: e.g. ``load_in_4bit=True`` quantizes its
        language model as the official demo's ``--generate-quantize`` (the UNet and VAE stay unquantized), and
        ``device_map="auto"`` spreads it over the GPUs. The decoder (UNet, VAE, safety checker) is not split: it
        goes whole to ``decoder_device``, by default, when ``device_map`` is given, to the device of the
        encoder's ``project_down``, where the regressed embeddings come out (the official multi-GPU example
        likewise moves the UNet and VAE to one GPU by hand)."""
        path = Path(path)
        for part in ("encoder", "decoder"):
            if not (path / part).is_dir():
                raise FileNotFoundError(f"{path} is not an Emu2-Gen directory: no {part}/ folder")
        decoder = Emu2VisualDecoderPipeline.from_pretrained(path / "decoder", dtype=dtype)
        encoder = Emu2Pipeline.from_pretrained(path / "encoder", dtype=dtype, **encoder_kwargs)
        if decoder_device is None and encoder_kwargs.get("device_map") is not None:
            decoder_device = encoder.model.project_down.weight.device
        if decoder_device is not None:
            decoder.to(decoder_device)
        return cls(encoder, decoder)

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """``kwargs`` go to the encoder's `save_pretrained` (e.g. ``max_shard_size``)."""
        path = Path(path)
        self.encoder.save_pretrained(path / "encoder", **kwargs)
        self.decoder.save_pretrained(path / "decoder")

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0) -> Emu2GenPipeline:
        """Random encoder of a preset and a tiny random decoder: smoke tests and examples."""
        encoder = Emu2Pipeline.from_preset(name, seed=seed)
        torch.manual_seed(seed)
        config = tiny_decoder_config(encoder.model.config.vision_config.width)
        return cls(encoder, Emu2VisualDecoderPipeline.from_configs(config["unet"], config["vae"]))

    def to(self, *args, **kwargs) -> Emu2GenPipeline:
        """``torch.nn.Module.to`` arguments (device and/or dtype) for the encoder and the decoder together."""
        self.encoder.model.to(*args, **kwargs)
        self.decoder.to(*args, **kwargs)
        self._uncond.clear()  # cached on the old device / in the old dtype
        return self

    # ------------------------------------------------------------------------------------- conditioning
    @staticmethod
    def _autoencode_images(inputs) -> list[Image.Image] | None:
        # Images alone (no text, no nested prompt lists): a batch of prompts is a list of lists.
        items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        if items and all(isinstance(item, Image.Image) for item in items):
            return list(items)
        return None

    def _weights_version(self) -> tuple:
        """What the unconditional embeddings depend on: the encoder's parameters (which tensors, on which device,
        in which dtype, and their in-place version counters, bumped by optimizer steps and ``load_state_dict``)
        and the tokenizer."""
        model = self.encoder.model
        return (id(model), id(self.encoder.tokenizer),
                *((id(p), p._version, p.device, p.dtype) for p in model.parameters()))

    def _cached_uncond(self, key: str) -> torch.Tensor | None:
        version = self._weights_version()
        if version != self._uncond_weights:
            self._uncond.clear()
            self._uncond_weights = version
        return self._uncond.get(key)

    @torch.no_grad()
    def conditioning(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cond ``(B, Q, Dv)``, uncond ``(1, Q, Dv)``): see the module docstring for the two modes; B is the
        number of images when autoencoding, else the number of prompts (1 for one interleaved list)."""
        model = self.encoder.model
        images = self._autoencode_images(inputs)
        if images is not None:
            size = model.config.vision_config.image_size
            pixels = P.preprocess_images(images, size).to(self.encoder.device, model.dtype)
            cond = model.encode_image(pixels)
            uncond = self._cached_uncond(_NULL_IMAGE)
            if uncond is None:  # every all-zero image has the same embeddings
                uncond = self._uncond[_NULL_IMAGE] = model.encode_image(torch.zeros_like(pixels[:1]))
            return cond, uncond
        uncond = self._cached_uncond(_EMPTY_PROMPT)
        if uncond is not None:
            return self.encoder.regress_image_embeddings(inputs), uncond
        # The classifier-free guidance pair in one batch (official: two `generate_image` calls). Left-padding the
        # empty prompt to the prompt's length costs a prefill of that many rows, and a prefill row costs about a
        # tenth of a cached step on a CPU (README "Benchmarks"), so only prompts up to 4 x n_query tokens are paired.
        pair = self.encoder.encode_interleaved([*as_batch(inputs), [_EMPTY_PROMPT]])
        if pair["input_ids"].shape[1] <= 4 * model.config.n_query:
            both = model.regress_image_embeddings(**pair)
            cond, uncond = both[:-1], both[-1:]
        else:
            cond = self.encoder.regress_image_embeddings(inputs)
            uncond = self.encoder.regress_image_embeddings([_EMPTY_PROMPT])
        self._uncond[_EMPTY_PROMPT] = uncond
        return cond, uncond

    # ------------------------------------------------------------------------------------------- sample
    def __call__(
        self,
        inputs,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float = 3.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        crop_info: tuple[int, int] | None = None,
        sampler: str = "dpm-solver++",
        callback_on_step_end=None,
    ) -> Emu2GenOutput:
        """Generate an image from an interleaved prompt (official defaults: guidance 3.0, ``original_size``
        (1024, 1024) whatever the output size, crop (0, 0)).

        ``sampler``: "dpm-solver++" (default, 15 steps; see `dpm_solver_scheduler`) or "official" (the decoder's
        own scheduler, the official Euler, 50 steps); ``num_inference_steps`` overrides the sampler's steps.
        ``crop_info`` is the official name of ``crops_coords_top_left``. Autoencoding several images gives one
        output each; ``image`` is the first, as the official pipeline returns. ``callback_on_step_end`` goes to the
        decoder (`Emu2VisualDecoderPipeline`: progress after each denoising step, or cancelling by raising).
        """
        if crop_info is not None and crops_coords_top_left is not None:
            raise ValueError("crop_info is the official name of crops_coords_top_left: pass one of them")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        crop = tuple(crop_info if crop_info is not None else crops_coords_top_left or (0, 0))
        scheduler = self.decoder.scheduler if sampler == "official" else dpm_solver_scheduler(
            self.decoder.scheduler.config)
        cond, uncond = self.conditioning(inputs)
        out = self.decoder(
            cond, uncond, height=height, width=width, num_inference_steps=num_inference_steps or DEFAULT_STEPS[sampler],
            guidance_scale=guidance_scale, generator=generator, latents=latents, original_size=original_size,
            crops_coords_top_left=crop, output_type="pil", scheduler=scheduler,
            callback_on_step_end=callback_on_step_end,
        )
        flags = out.nsfw_content_detected
        return Emu2GenOutput(image=out.images[0], images=out.images,
                             prompt_embeds=torch.cat([cond, uncond.expand_as(cond)]),
                             nsfw_content_detected=None if flags is None else flags[0])
