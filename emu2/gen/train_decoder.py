"""Visual-decoder training (paper 2.2.3 and A.3, Table 6): image autoencoding with a frozen encoder.

The decoder learns to turn the frozen vision encoder's embeddings of an image back into that image. Only the
UNet is trained: the vision encoder and the VAE are frozen. Each step (`decoder_training_step`):

1. encode the crop with the frozen encoder -> conditioning (B, Q, Dv);
2. drop it to the unconditional embeddings (zeros by default) with probability 0.1, for classifier-free
   guidance (Table 6: 10%);
3. VAE-encode the crop to latents (or use the pixels themselves in pixel space, optionally shrunk by the
   pipeline's ``pixel_scale``);
4. add noise with offset 0.1 (Table 6) at a uniformly drawn training timestep;
5. predict with SDXL's added conditions (pooled embeddings, original size, crop, target size) and take the MSE
   to the scheduler's target: the noise (epsilon, the official decoder) or v (``prediction_type``
   "v_prediction", used by the small shapes-world decoders);
6. AdamW step with gradient clipping 1.0 under warm-up + linear decay (Table 6).

Steps 4-6 (`diffusion_update`) are shared with the video decoder (`emu2.model.video_decoder`).

Crops come from ratio-preserving random scaling followed by a random square crop; the source size and crop
corner are the SDXL size conditions (A.3.1). `train_small_autoencoder` trains a tiny VAE (no pretrained VAE
is available offline for the shapes world).

Full scale: `load_pretrained_decoder_unet` starts the UNet from a local SDXL-base folder with its conditioning
projections resized to the visual embeddings (as Emu2-Gen was made from SDXL), `load_frozen_vae` reads its VAE,
and `DecoderImageShards` streams crops of the recipe's webdataset shards through the data layer.

Recipe entry points (`emu2 train`): `train_decoder_stage` (``stage: decoder``) and `train_video_decoder_stage`
(``stage: video-decoder``), with resumable checkpoints (`emu2.train.checkpoint`).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.data import DataLoader, IterableDataset

from ..data.shards import DataError, ResumableLoader, ShardDataset, decode_record


@dataclass
class DecoderTrainingConfig:
    """Table 6 defaults (the peak learning rate is missing from our copy of the paper)."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 2500
    total_steps: int = 8000
    max_grad_norm: float = 1.0
    condition_drop_prob: float = 0.1
    noise_offset: float = 0.1
    max_scale: float = 1.25  # largest random up-scaling of the short side before cropping (A.3.1)
    snr_gamma: float | None = None  # Min-SNR loss weighting; None: plain MSE (the paper)


# ---------------------------------------------------------------------------------------------- data


def random_scale_and_crop(
    image: PIL.Image.Image, size: int, rng: random.Random, max_scale: float = 1.25
) -> tuple[PIL.Image.Image, tuple[int, int], tuple[int, int]]:
    """Ratio-preserving random scaling, then a random ``size`` x ``size`` crop (A.3.1).

    Returns the crop, the source image's ``original_size`` (height, width) and the crop's top-left corner
    (top, left) in the scaled image: SDXL's size and crop conditions.
    """
    width, height = image.size
    short = size * rng.uniform(1.0, max_scale)
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    scaled = image.convert("RGB").resize((new_w, new_h), PIL.Image.BICUBIC)
    top, left = rng.randint(0, new_h - size), rng.randint(0, new_w - size)
    return scaled.crop((left, top, left + size, top + size)), (height, width), (top, left)


def prepare_decoder_batch(
    images: Sequence[PIL.Image.Image],
    size: int,
    rng: random.Random,
    max_scale: float = 1.25,
    encoder_preprocess: Callable | None = None,
) -> dict:
    """Random crops of ``images`` as a training batch.

    Returns a dict: ``pixel_values`` (B, 3, size, size) float in [-1, 1] (the decoder's target),
    ``original_size`` and ``crops_coords_top_left`` (B, 2) long, and ``encoder_inputs`` (the crops as PIL
    images, or ``encoder_preprocess(crops)``) for the frozen encoder.
    """
    crops, sizes, corners = zip(*(random_scale_and_crop(im, size, rng, max_scale) for im in images))
    return crops_to_batch(crops, sizes, corners, encoder_preprocess)


def crops_to_batch(
    crops: Sequence[PIL.Image.Image],
    original_sizes: Sequence[tuple[int, int]],
    corners: Sequence[tuple[int, int]],
    encoder_preprocess: Callable | None = None,
) -> dict:
    """Square crops with their SDXL conditions -> the `prepare_decoder_batch` dict."""
    pixels = torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in crops])).permute(0, 3, 1, 2)
    return {
        "pixel_values": pixels / 127.5 - 1.0,
        "original_size": torch.tensor(list(original_sizes)),
        "crops_coords_top_left": torch.tensor(list(corners)),
        "encoder_inputs": encoder_preprocess(list(crops)) if encoder_preprocess else list(crops),
    }


# ---------------------------------------------------------------------------------------------- pieces


def drop_conditioning(
    embeds: torch.Tensor,
    drop_prob: float,
    uncond_embeds: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each sample's embeddings (B, Q, Dv) by ``uncond_embeds`` ((Q, Dv) or (1, Q, Dv); zeros when
    None) with probability ``drop_prob``, so the decoder also learns the unconditional score for
    classifier-free guidance. Returns (embeds, dropped (B,) bool)."""
    dropped = torch.rand(embeds.shape[0], generator=generator, device="cpu").to(embeds.device) < drop_prob
    uncond = (
        torch.zeros_like(embeds[:1]) if uncond_embeds is None else uncond_embeds.reshape(1, *embeds.shape[1:])
    )
    return torch.where(dropped[:, None, None], uncond.to(embeds), embeds), dropped


def offset_noise(
    latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Standard-normal noise plus a per-sample, per-channel constant of scale ``noise_offset`` (Table 6: 0.1),
    which lets the model learn to change an image's overall brightness. ``latents``: (B, C, ...)."""
    shape = latents.shape
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(latents)
    offset_shape = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    offset = torch.randn(offset_shape, generator=generator, dtype=torch.float32).to(latents)
    return noise + noise_offset * offset


@torch.no_grad()
def encode_to_latents(
    vae: AutoencoderKL | None, pixel_values: torch.Tensor, generator=None, pixel_scale: int = 1
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents; in pixel space (``vae=None``) the pixels, averaged
    over ``pixel_scale`` x ``pixel_scale`` blocks (`emu2.model.decoder.pixels_to_latents`)."""
    if vae is None:
        from ..model.decoder import pixels_to_latents

        return pixels_to_latents(pixel_values, pixel_scale)
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator)
    if vae.config.get("shift_factor") is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, as the sampler (``scheduler.config.prediction_type``) reads it:
    "epsilon" (the noise; the official decoder), "v_prediction" (v = sqrt(a) noise - sqrt(1 - a) x_0) or
    "sample" (x_0). ``alpha_bar``: the cumulative alpha of each sample's timestep, broadcastable to latents."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r} (epsilon, v_prediction or sample)")


def freeze_for_decoder_training(parts) -> None:
    """Only the UNet learns (A.3): freeze the VAE, put the UNet in training mode."""
    if parts.vae is not None:
        parts.vae.requires_grad_(False).eval()
    parts.unet.requires_grad_(True).train()


def configure_decoder_optimizer(
    unet: torch.nn.Module, config: DecoderTrainingConfig | None = None
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the UNet with linear warm-up to the peak rate, then linear decay to zero (Table 6)."""
    config = config or DecoderTrainingConfig()
    optimizer = torch.optim.AdamW(
        [p for p in unet.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    warmup, total = config.warmup_steps, max(config.total_steps, config.warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / (total - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------- step


def decoder_training_step(
    pipeline_parts,
    batch: dict,
    encode_fn: Callable[[object], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    lr_scheduler=None,
    uncond_embeds: torch.Tensor | None = None,
    condition_drop_prob: float = 0.1,
    noise_offset: float = 0.1,
    max_grad_norm: float = 1.0,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> float:
    """One optimisation step of the visual decoder; returns the loss.

    Args:
        pipeline_parts: anything with ``.unet``, ``.vae`` (None for pixel space) and ``.scheduler`` (its
            ``alphas_cumprod`` define the noise schedule), e.g. an `Emu2VisualDecoderPipeline`.
        batch: `prepare_decoder_batch` output (``pixel_values``, ``original_size``, ``crops_coords_top_left``,
            ``encoder_inputs``).
        encode_fn: the frozen vision encoder, ``encode_fn(batch["encoder_inputs"]) -> (B, Q, Dv)``; it runs
            under ``torch.no_grad``, so it receives no gradient.
        optimizer: over the UNet's parameters only (`configure_decoder_optimizer`).
    """
    unet, vae = pipeline_parts.unet, pipeline_parts.vae
    device, dtype = unet.device, unet.dtype
    pixel_values = batch["pixel_values"].to(device)
    batch_size, height, width = pixel_values.shape[0], pixel_values.shape[-2], pixel_values.shape[-1]

    # 1-2. Frozen encoder, then classifier-free-guidance dropout.
    with torch.no_grad():
        embeds = encode_fn(batch["encoder_inputs"]).to(device=device, dtype=dtype)
    embeds, _ = drop_conditioning(embeds, condition_drop_prob, uncond_embeds, generator)

    # 3. Frozen VAE (pixel space: the pixels, shrunk by the pipeline's pixel_scale).
    latents = encode_to_latents(vae, pixel_values, generator, pixel_scale_of(pipeline_parts)).to(dtype)

    # 4-6. Noise, the UNet's prediction with SDXL's added conditions, the update.
    target_size = torch.tensor([height, width], device=device).expand(batch_size, 2)
    time_ids = torch.cat(
        [batch["original_size"].to(device), batch["crops_coords_top_left"].to(device), target_size], dim=1
    )
    added = {"text_embeds": embeds.mean(dim=1), "time_ids": time_ids}

    def predict(noisy, timesteps):
        return unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    return diffusion_update(
        pipeline_parts, latents, predict, optimizer, lr_scheduler=lr_scheduler, noise_offset=noise_offset,
        max_grad_norm=max_grad_norm, generator=generator, snr_gamma=snr_gamma,
    )


def diffusion_update(
    pipeline_parts,
    latents: torch.Tensor,
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    lr_scheduler=None,
    noise_offset: float = 0.1,
    max_grad_norm: float = 1.0,
    generator: torch.Generator | None = None,
    snr_gamma: float | None = None,
) -> float:
    """Steps 4-6, shared by the image and the video decoder: offset noise at a uniformly drawn training timestep
    (x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise), the UNet's prediction ``predict(x_t, timesteps)``, MSE to the
    scheduler's target (`prediction_target`), and the clipped AdamW update. ``latents``: (B, C, ...) clean
    latents. ``snr_gamma``: Min-SNR loss weighting (each sample's MSE weighted as if its target were x_0 with
    weight min(SNR, gamma)); None: the plain MSE of the paper. A non-finite loss returns before touching the
    weights (the caller stops the run)."""
    device, dtype = latents.device, latents.dtype
    noise = offset_noise(latents, noise_offset, generator)
    alphas_cumprod = pipeline_parts.scheduler.alphas_cumprod.to(device)
    timesteps = torch.randint(0, len(alphas_cumprod), (latents.shape[0],), generator=generator).to(device)
    a = alphas_cumprod[timesteps].to(dtype).view(-1, *([1] * (latents.ndim - 1)))
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = prediction_target(pipeline_parts.scheduler, latents, noise, a)
    if snr_gamma is None:
        loss = F.mse_loss(predict(noisy, timesteps).float(), target.float())
    else:
        per_sample = (predict(noisy, timesteps).float() - target.float()).pow(2).flatten(1).mean(1)
        loss = (per_sample * min_snr_weight(pipeline_parts.scheduler, a.flatten().float(), snr_gamma)).mean()
    if not torch.isfinite(loss):
        return loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(pipeline_parts.unet.parameters(), max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.item()


def min_snr_weight(scheduler, alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for the scheduler's prediction type: min(SNR, gamma)
    divided by SNR (epsilon), by SNR + 1 (v) or by 1 (x_0), with SNR = a / (1 - a)."""
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.get("prediction_type", "epsilon")
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1) if kind == "v_prediction" else clipped


def pixel_scale_of(parts) -> int:
    """Pixel-space decoders may run their UNet below the output size (`Emu2VisualDecoderPipeline.pixel_scale`)."""
    return int(getattr(parts, "pixel_scale", 1)) if getattr(parts, "vae", None) is None else 1


def train_decoder(
    pipeline_parts,
    images: Sequence[PIL.Image.Image],
    encode_fn: Callable,
    config: DecoderTrainingConfig | None = None,
    *,
    batch_size: int = 8,
    uncond_embeds: torch.Tensor | None = None,
    encoder_preprocess: Callable | None = None,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """A plain loop over `decoder_training_step` for small runs (the shapes world); returns the losses."""
    config = config or DecoderTrainingConfig()
    freeze_for_decoder_training(pipeline_parts)
    optimizer, lr_scheduler = configure_decoder_optimizer(pipeline_parts.unet, config)
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    size = pipeline_parts.unet.config.sample_size * _spatial_factor(pipeline_parts)
    losses = []
    for step in range(config.total_steps):
        batch = prepare_decoder_batch(
            rng.sample(list(images), min(batch_size, len(images))),
            size,
            rng,
            config.max_scale,
            encoder_preprocess,
        )
        losses.append(
            decoder_training_step(
                pipeline_parts,
                batch,
                encode_fn,
                optimizer,
                lr_scheduler=lr_scheduler,
                uncond_embeds=uncond_embeds,
                condition_drop_prob=config.condition_drop_prob,
                noise_offset=config.noise_offset,
                max_grad_norm=config.max_grad_norm,
                generator=generator,
                snr_gamma=config.snr_gamma,
            )
        )
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {losses[-1]:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
    return losses


def _spatial_factor(parts) -> int:
    from ..model.decoder import latent_scale_factor

    return latent_scale_factor(parts.vae, pixel_scale_of(parts))


# ---------------------------------------------------------------------------------------------- small VAE


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

    Why a VAE rather than pixel space for the shapes world (64 px, flat colours), measured on CPU with one
    thread, batch 16 (a 4.2M-parameter UNet, block widths 32/64/128):
    - this default VAE (242k parameters, 16 x 16 x 4 latents) reaches 25.6 dB reconstruction PSNR after 800
      steps (4.7 CPU-min) and 27.3 dB after 2,000 (11.6 CPU-min); a 2x VAE (32 x 32 x 4) is no better per
      minute (26.4 dB after 8.3 CPU-min);
    - a UNet training step then costs 0.25 CPU-s (0.21 UNet + 0.04 VAE encode) against 1.27 CPU-s in pixel
      space (64 x 64 x 3 with one more down level; 3.56 without), and sampling 25 guided steps 0.6 against
      1.9 CPU-s per image.
    The VAE is paid back after about 700 decoder steps, its error is far below what decoding 64 pooled
    embeddings loses anyway, and the shapes-world decoder keeps the official latent-diffusion code path.
    Pixel space (``vae=None``) remains the choice for very short runs or when exact pixels matter.
    """
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config or small_autoencoder_config())
    data = images_to_tensor(images, size)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1)))
    )
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


# ------------------------------------------------------------------- full scale: pretrained SDXL parts

_SDXL_DOWNLOAD = (
    "hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir checkpoints/sdxl-base-1.0 unet/config.json "
    "unet/diffusion_pytorch_model.safetensors vae/config.json vae/diffusion_pytorch_model.safetensors"
)


def local_model_folder(path: str | Path, option: str) -> Path:
    """``path`` as an existing local directory. Decoder training never downloads: a hub id (or any path that is not
    a directory) is an error that says how to fetch the weights and what to pass instead."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    raise FileNotFoundError(
        f"{option}={str(path)!r} is not a local directory. Decoder training reads local files only and downloads "
        f"nothing, so a hub id is not accepted here: download the model first, e.g. `{_SDXL_DOWNLOAD}`, and pass "
        f"the folder ({option}=checkpoints/sdxl-base-1.0)."
    )


def _weights_variant(folder: Path) -> str | None:
    """None when ``folder`` has plain diffusers weights, else the variant its files carry (e.g. "fp16")."""
    plain = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
    if any((folder / name).is_file() for name in plain):
        return None
    for file in sorted(folder.glob("diffusion_pytorch_model*")):
        match = re.fullmatch(r"diffusion_pytorch_model(?:-\d+-of-\d+)?\.(\w+)\.(?:safetensors|bin)", file.name)
        if match:
            return match.group(1)
    return None


def _component(folder: Path, name: str, option: str) -> tuple[Path, str | None]:
    """(folder, subfolder) of a diffusers component: ``folder/name`` (a pipeline checkout) or ``folder`` itself."""
    if (folder / name / "config.json").is_file():
        return folder, name
    if (folder / "config.json").is_file():
        return folder, None
    raise FileNotFoundError(f"{option}={str(folder)!r} has neither {name}/config.json (a diffusers pipeline folder "
                            f"such as an SDXL-base checkout) nor config.json (the {name} folder itself)")


def visual_embedding_unet_config(config, vision_width: int, sample_size: int | None = None) -> dict:
    """An SDXL-style UNet config with its conditioning resized to visual embeddings Dv wide (SDXL-base ->
    Emu2-Gen: cross_attention_dim 2048 -> 1792, projection_class_embeddings_input_dim 2816 -> 3328)."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    if config.get("addition_embed_type") != "text_time" or config.get("encoder_hid_dim_type") is not None:
        raise ValueError(
            "decoder.unet_init is not an SDXL-style UNet: Emu2's decoder needs addition_embed_type 'text_time' "
            f"(got {config.get('addition_embed_type')!r}) and the embeddings fed straight into cross-attention "
            f"(encoder_hid_dim_type null, got {config.get('encoder_hid_dim_type')!r})"
        )
    config["cross_attention_dim"] = vision_width
    config["projection_class_embeddings_input_dim"] = vision_width + 6 * config["addition_time_embed_dim"]
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


def load_pretrained_decoder_unet(
    path: str | Path, vision_width: int, sample_size: int | None = None
) -> tuple[UNet2DConditionModel, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """An SDXL-style UNet from a local folder, adapted to decode visual embeddings (paper 2.2.3).

    Emu2-Gen's decoder is SDXL-base with "the dimension of the projection layers in cross-attention modules"
    adjusted to the visual embeddings (official-format 2.3): ``cross_attention_dim`` becomes the vision width Dv
    (SDXL: 2048, Emu2-Gen: 1792) and the pooled ``text_embeds`` of the "text_time" conditions become the mean
    embedding, Dv wide (SDXL: 1280), so ``projection_class_embeddings_input_dim`` = Dv + 6 x
    ``addition_time_embed_dim`` (Emu2-Gen: 3328). Every weight keeps SDXL's value except those whose shape
    changes, which start from PyTorch's default initialisation as in a UNet built from its config: each
    ``attn2.to_k.weight`` and ``attn2.to_v.weight`` (the keys and values computed from the embeddings) and
    ``add_embedding.linear_1.weight`` (its bias keeps SDXL's values). Nothing else changes.

    Args:
        path: a local diffusers folder with ``unet/`` (an SDXL-base checkout) or the UNet folder itself;
            read with ``local_files_only`` (`local_model_folder` rejects hub ids).
        vision_width: Dv, the frozen encoder's embedding width.
        sample_size: the UNet's default latent side (output size / VAE factor); None keeps the pretrained one.

    Returns:
        (unet in float32, {re-initialised key: (pretrained shape, new shape)}), the keys sorted.
    """
    folder, subfolder = _component(local_model_folder(path, "decoder.unet_init"), "unet", "decoder.unet_init")
    pretrained = UNet2DConditionModel.from_pretrained(
        folder, subfolder=subfolder, local_files_only=True, dtype=torch.float32,
        variant=_weights_variant(folder / (subfolder or "")),
    )
    config = visual_embedding_unet_config(pretrained.config, vision_width, sample_size)
    with torch.device("meta"):  # no memory and no initialisation for the weights that SDXL provides
        unet = UNet2DConditionModel.from_config(config)
    state = pretrained.state_dict()
    del pretrained
    changed = {key: (tuple(state[key].shape), tuple(target.shape))
               for key, target in unet.state_dict().items() if target.shape != state[key].shape}
    for key in sorted(changed):
        module_name, leaf = key.rsplit(".", 1)
        module = unet.get_submodule(module_name).to_empty(device="cpu")
        module.reset_parameters()
        state[key] = module.state_dict()[leaf]
    unet.load_state_dict(state, strict=True, assign=True)
    return unet, dict(sorted(changed.items()))


def load_frozen_vae(path: str | Path) -> AutoencoderKL:
    """A local `AutoencoderKL` (a pipeline folder's ``vae/``, or a VAE folder such as SDXL's or one saved from
    `train_small_autoencoder`) in float32, frozen: it only turns crops into latents (paper 2.2.3)."""
    folder, subfolder = _component(local_model_folder(path, "decoder.vae"), "vae", "decoder.vae")
    vae = AutoencoderKL.from_pretrained(folder, subfolder=subfolder, local_files_only=True, dtype=torch.float32,
                                        variant=_weights_variant(folder / (subfolder or "")))
    return vae.requires_grad_(False).eval()


def _stage_vae(opts: dict) -> AutoencoderKL | None:
    """The recipe's VAE: None in pixel space, else ``decoder.vae``, or the ``vae/`` of the ``decoder.unet_init``
    checkout (its sibling when unet_init names the ``unet/`` folder itself)."""
    if bool(opts.get("pixel_space", True)):
        if opts.get("vae") is not None:
            raise ValueError("decoder.vae is set but decoder.pixel_space is true: set pixel_space: false to train on "
                             "the VAE's latents, or drop decoder.vae")
        return None
    if opts.get("vae") is not None:
        return load_frozen_vae(opts["vae"])
    if opts.get("unet_init") is not None:
        root = local_model_folder(opts["unet_init"], "decoder.unet_init")
        candidate = root / "vae" if (root / "unet").is_dir() else root.parent / "vae"
        if (candidate / "config.json").is_file():
            return load_frozen_vae(candidate)
    raise ValueError(
        "decoder.pixel_space is false, so the UNet learns on VAE latents, but no VAE was found: set decoder.vae to a "
        "local AutoencoderKL folder (an SDXL-base checkout or its vae/, or a VAE saved from train_small_autoencoder "
        "with save_pretrained), or point decoder.unet_init at a folder that has a vae/ subfolder "
        f"(e.g. `{_SDXL_DOWNLOAD}`)"
    )


# ----------------------------------------------------------------------------- streaming image shards


class DecoderImageShards(ShardDataset):
    """The recipe's image shards as decoder training crops, streamed.

    Everything but what a sample becomes is `emu2.data.shards.ShardDataset`'s: shard splitting per rank and
    worker, shuffling, mixing by weight, the resumable position, and bad samples (unreadable shards, undecodable
    images) skipped and counted in ``stats``. A sample here is the image's ratio-preserving random crop
    (`random_scale_and_crop`; its rng is seeded by the sample's identity, so a resumed run crops alike), the
    image's real ``original_size`` (height, width) and the crop corner: SDXL's conditions (A.3.1). Images whose
    short side is below ``min_image_size`` are skipped as ``skipped.too_small`` (A.3.1 filters small images).
    """

    KINDS = ("pair", "text_to_image")

    def __init__(self, sources: Sequence, size: int, *, max_scale: float = 1.25, min_image_size: int = 0,
                 seed: int = 0, shuffle_buffer: int = 1000):
        for source in sources:
            if source.kind not in self.KINDS:
                raise ValueError(f"data source {source.name} has kind {source.kind!r}; the decoder stage reads "
                                 f"{' or '.join(self.KINDS)}")
        super().__init__(sources, tokenizer=None, config=None, seed=seed, shuffle_buffer=shuffle_buffer,
                         rank=0, world_size=1)
        self.size, self.max_scale, self.min_image_size = size, max_scale, min_image_size

    def _build(self, source, raw: dict) -> tuple | None:
        """-> (crop, original_size, crop corner), or None (counted) for a sample that cannot be used."""
        shard = Path(str(raw.get("__url__"))).name
        rng = random.Random(f"{self.seed}:{source.name}:{raw.get('__epoch__', 0)}:{shard}:{raw.get('__key__')}")
        try:
            image = decode_record(source.kind, raw).image
            if min(image.size) < self.min_image_size:
                self.stats["skipped.too_small"] += 1
                return None
            return random_scale_and_crop(image, self.size, rng, self.max_scale)
        except DataError as exn:
            self.stats[f"skipped.{exn.reason}"] += 1
        except Exception as exn:  # noqa: BLE001 -- as the data layer: odd data (a 0-pixel image) must not stop training
            self.stats[f"skipped.{type(exn).__name__}"] += 1
        return None


class _CropBatches(IterableDataset):
    """`crops_to_batch` batches made in each dataloader worker, tagged with that worker's stream position (the
    protocol of `emu2.data.shards.ResumableLoader`)."""

    def __init__(self, dataset: DecoderImageShards, batch_size: int, encoder_image_size: int):
        super().__init__()
        self.dataset, self.batch_size, self.encoder_image_size = dataset, batch_size, encoder_image_size

    def __iter__(self):
        from ..processing import preprocess_images

        items: list = []
        for item, worker in self.dataset._samples():
            items.append(item)
            if len(items) == self.batch_size:
                crops, sizes, corners = zip(*items)
                batch = crops_to_batch(crops, sizes, corners, lambda c: preprocess_images(c, self.encoder_image_size))
                state = {**self.dataset._stream.state_dict(), "stats": dict(self.dataset.stats)}
                yield batch, [], worker, state
                items = []


def _as_is(item):
    return item


def decoder_image_loader(
    dataset: DecoderImageShards,
    batch_size: int,
    encoder_image_size: int,
    num_workers: int = 0,
    state: dict | None = None,
) -> ResumableLoader:
    """Endless `prepare_decoder_batch`-style batches of ``dataset`` (``encoder_inputs``: (B, 3, S, S) pixels
    preprocessed for the encoder), decoded in ``num_workers`` processes; ``state`` (a saved ``state_dict()``)
    resumes just after the batch it was saved at (same seed and ``num_workers`` needed)."""
    if state is not None:
        dataset.load_state_dict(state, num_workers=max(num_workers, 1))
    loader = DataLoader(
        _CropBatches(dataset, batch_size, encoder_image_size), batch_size=None, num_workers=num_workers,
        collate_fn=_as_is, prefetch_factor=2 if num_workers else None, pin_memory=torch.cuda.is_available(),
    )
    return ResumableLoader(dataset, loader, max(num_workers, 1), state)


# ------------------------------------------------------------------------------------ recipe entry point

# The recipe's free-form ``decoder`` section (both stages). Keys not listed raise an error naming the closest one.
IMAGE_OPTIONS = {
    "output_image_size": "image side in pixels (the shapes world: 64; paper: 1024)",
    "pixel_space": "true: no VAE, the UNet denoises pixels (default); false: VAE latents (decoder.vae)",
    "unet_init": "local diffusers folder (SDXL-base checkout with unet/, or a UNet folder) to start from; its "
                 "cross-attention and pooled-embedding projections are resized to the vision width "
                 "(load_pretrained_decoder_unet); null: a small UNet from scratch (channels, attention, ...)",
    "vae": "local AutoencoderKL folder (SDXL's vae/, or a train_small_autoencoder save) for pixel_space: false; "
           "default: the vae/ next to unet_init",
    "pixel_scale": "pixel space: the UNet works at output_image_size / pixel_scale, outputs are enlarged (1)",
    "channels": "UNet block widths, e.g. [32, 64, 64]",
    "attention": "per UNet level: cross-attention there or not (default: every level but the first)",
    "layers_per_block": "resnet (+ attention) layers per UNet level (1)",
    "scheduler": "overrides of the official Euler scheduler config (prediction_type, beta_schedule, ...)",
    "cfg_drop_prob": "embeddings replaced by the unconditional ones with this probability (Table 6: 0.1)",
    "noise_offset": "Table 6: 0.1",
    "snr_gamma": "Min-SNR loss weighting gamma (null: the plain MSE of the paper)",
    "max_scale": "largest random up-scaling before the random crop (A.3.1; 1.0: no crop augmentation)",
    "cache_embeddings": "encode every training image once up front (needs max_scale 1.0; not with streaming)",
    "max_images": "how many training images are read from the shards into memory (4000; not with streaming)",
    "streaming": "true: stream the shards in batches (DecoderImageShards, data.num_workers processes), the "
                 "position saved in checkpoints; false: read max_images images into memory (default)",
    "encoder_image_size": "the encoder's input size; checked against model.init_from's (paper: 448)",
    "min_image_size": "images whose short side is smaller are skipped (A.3.1; default 0)",
    "gradient_checkpointing": "recompute UNet activations in the backward pass (SDXL at 1024 px needs it)",
}
VIDEO_OPTIONS = {
    **{k: IMAGE_OPTIONS[k] for k in ("output_image_size", "pixel_scale", "channels", "attention",
                                     "layers_per_block", "scheduler", "cfg_drop_prob", "noise_offset",
                                     "snr_gamma")},
    "num_frames": "frames per clip (default: every frame of the first clip)",
    "n_query": "embeddings per frame (default: the model's v_query, what Emu2 regresses per video frame)",
    "max_clips": "how many training clips are read and encoded up front (256)",
    "pixel_space": "must be true: the video decoder stage trains in pixel space only",
}


def decoder_unet_config(
    vision_width: int,
    sample_size: int,
    channels: Sequence[int] = (32, 64, 64),
    attention: Sequence[bool] | None = None,
    layers_per_block: int = 1,
    in_channels: int = 3,
) -> dict:
    """A small SDXL-shaped UNet (text_time conditions, cross-attention on the visual embeddings).

    ``attention[i]``: whether level i has (self + cross) attention; default every level but the first, as SD.
    The mid block always has it.
    """
    time_dim, n = 32, len(channels)
    attention = _attention_levels(attention, n)
    return {
        "sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels,
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


def _stage_records(config, limit: int, kinds_wanted: tuple[str, ...]) -> list:
    """Up to ``limit`` records of the recipe's data sources (``data.streams``; shard urls, or the kinds of
    ``data.root``'s dataset.json), read in source order. Unreadable shards and samples are skipped, as the
    data layer does."""
    from collections import Counter

    from ..data.mixing import expand_urls
    from ..data.shards import read_shard
    from ..train.data import _sources

    records: list = []
    stats: Counter = Counter()
    for name, stream in config.data.streams.items():
        for source in _sources(config, name, stream):
            if source.kind not in kinds_wanted:
                raise ValueError(f"data source {source.name} has kind {source.kind!r}; this stage reads "
                                 f"{' or '.join(kinds_wanted)}")
            for url in expand_urls(source.urls):
                for sample in read_shard(url, stats):
                    try:
                        records.append(decode_record(source.kind, sample))
                    except DataError as exn:
                        stats[f"skipped.{exn.reason}"] += 1
                        continue
                    if len(records) >= limit:
                        return records
    if not records:
        raise ValueError(f"the recipe's data sources hold no {' or '.join(kinds_wanted)} samples")
    return records


class StageSampling:
    """What a decoder stage draws at random or reads next, in one place so checkpoints can resume it exactly:
    ``rng`` picks the in-memory samples and crops, ``generator`` the guidance dropout, noise and timesteps, and
    ``data`` (streaming: `emu2.train.data.StreamBatches`) the position in the shards."""

    def __init__(self, seed: int, data=None):
        self.rng, self.generator, self.data = random.Random(seed), torch.Generator().manual_seed(seed), data

    def state_dict(self) -> dict:
        state = {"rng": self.rng.getstate(), "generator": self.generator.get_state()}
        return state if self.data is None else {**state, "data": self.data.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.generator.set_state(state["generator"])
        if self.data is not None:
            if "data" not in state:
                raise ValueError("the checkpoint has no data position: it was written by an in-memory run "
                                 "(decoder.streaming: false); resume it with the same setting")
            self.data.load_state_dict(state["data"])


def _options(config, known: dict) -> dict:
    import difflib

    opts = dict(config.decoder)
    for key in opts:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            raise ValueError(f"unknown decoder option {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (known: {', '.join(known)})")
    size, scale = int(opts.get("output_image_size", 64)), int(opts.get("pixel_scale", 1))
    if scale < 1 or size % scale:
        raise ValueError(f"decoder.pixel_scale {scale} must divide decoder.output_image_size {size}")
    if scale != 1 and not bool(opts.get("pixel_space", True)):
        raise ValueError("decoder.pixel_scale applies to pixel space only; with pixel_space: false the VAE sets the "
                         "scale: drop decoder.pixel_scale")
    if opts.get("streaming") and opts.get("cache_embeddings"):
        raise ValueError("decoder.streaming reads each image once, as it comes: set decoder.cache_embeddings: false")
    return opts


def _stage_setup(config, opts: dict):
    """(accelerator, frozen encoder on its device, the optimisation settings)."""
    from accelerate import Accelerator

    from ..pipeline import Emu2Pipeline
    from ..train.loop import _has_device

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not _has_device())
    if accelerator.num_processes > 1:
        raise NotImplementedError("the decoder stages run in one process (launch them without accelerate)")
    torch.manual_seed(config.seed)
    encoder = Emu2Pipeline.from_pretrained(config.model.init_from).model.eval().requires_grad_(False)
    encoder.to(accelerator.device)
    lr = next(iter(config.optim.lr.values())) if isinstance(config.optim.lr, dict) else config.optim.lr
    train_config = DecoderTrainingConfig(
        learning_rate=lr, weight_decay=config.optim.weight_decay, warmup_steps=config.warmup_steps,
        total_steps=config.steps, max_grad_norm=config.optim.grad_clip,
        condition_drop_prob=float(opts.get("cfg_drop_prob", 0.1)), noise_offset=float(opts.get("noise_offset", 0.1)),
        max_scale=float(opts.get("max_scale", 1.25)),
        snr_gamma=None if opts.get("snr_gamma") is None else float(opts["snr_gamma"]),
    )
    return accelerator, encoder, train_config


@torch.no_grad()
def _encode(encoder, images: Sequence[PIL.Image.Image], n_query: int, chunk: int = 64) -> torch.Tensor:
    """(N, n_query, Dv) embeddings, in fixed chunks (the same numbers on every run, so resumption is exact)."""
    from ..processing import preprocess_images

    size = encoder.config.vision_config.image_size
    device = next(encoder.parameters()).device
    return torch.cat([
        encoder.encode_image(preprocess_images(list(images[i:i + chunk]), size).to(device), n_query)
        for i in range(0, len(images), chunk)
    ])


@torch.no_grad()
def _null_embeddings(encoder, n_query: int) -> torch.Tensor:
    """The official unconditional embedding: an all-zero image in normalised space -> (Q, Dv)."""
    size = encoder.config.vision_config.image_size
    device = next(encoder.parameters()).device
    return encoder.encode_image(torch.zeros(1, 3, size, size, device=device), n_query)[0]


def _run_stage(config, resume: bool, stop_after: int | None, accelerator, pipe, train_config, sampling,
               step_fn: Callable, summary: dict) -> dict:
    """The loop both decoder stages share: AdamW + warm-up/decay over the UNet, `step_fn(optimizer, schedule)`
    per step, metrics.jsonl, atomic verified checkpoints (`emu2.train.checkpoint`: UNet, optimizer, schedule,
    step, RNG states and ``sampling``) and, once finished, the pipeline saved to ``output_dir``."""
    import time
    from pathlib import Path

    from ..train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from ..train.loop import TrainingDiverged
    from ..train.metrics import MetricsWriter, progress_bar

    freeze_for_decoder_training(pipe)
    optimizer, schedule = configure_decoder_optimizer(pipe.unet, train_config)
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    start = 0
    if resume:
        start = load_checkpoint(checkpoints, accelerator, pipe.unet, optimizer, schedule, sampling)["step"]
    elif list_checkpoints(checkpoints):
        raise FileExistsError(f"{checkpoints} already holds checkpoints: pass --resume to continue that run, or "
                              "set output_dir to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(config.to_yaml())
    metrics = MetricsWriter(out, tensorboard=config.log.tensorboard, resume_step=start if resume else None)
    bar = progress_bar(config.steps, start, config.log.progress, config.stage)
    step, loss, started = start, None, time.perf_counter()
    try:
        while step < config.steps and (stop_after is None or step < stop_after):
            began = time.perf_counter()
            lr = schedule.get_last_lr()[0]
            with accelerator.autocast():
                loss = step_fn(optimizer, schedule)
            if not math.isfinite(loss):
                raise TrainingDiverged(f"step {step + 1}: decoder loss {loss}; stopped before updating the weights")
            step += 1
            values = {"loss": loss, "lr": lr, "step_seconds": time.perf_counter() - began}
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update(1)
            if step % config.log.every == 0 or step == config.steps or step == start + 1:
                metrics.log(step, values)
            if step % config.checkpoint.every == 0 or step == config.steps or step == stop_after:
                save_checkpoint(checkpoints, step, accelerator, pipe.unet, optimizer, schedule, sampling, {},
                                config.checkpoint.keep_last)
    finally:
        bar.close()
        metrics.close()
    finished = step >= config.steps
    if finished:
        pipe.save_pretrained(out)
    return {"step": step, "finished": finished, "output_dir": str(out), "loss": loss if step > start else None,
            "seconds": round(time.perf_counter() - started, 1), **summary}


def train_decoder_stage(config, resume: bool = False, stop_after: int | None = None) -> dict:
    """``stage: decoder`` of `emu2 train`: the visual decoder learns to reconstruct images from the frozen
    stage-1 encoder's pooled embeddings (paper 2.2.3 autoencoding; A.3 hyper-parameters from the recipe).

    Full scale (``emu2-decoder``): SDXL-base's UNet from a local folder (``decoder.unet_init``, adapted by
    `load_pretrained_decoder_unet`), trained on the latents of its frozen VAE (``pixel_space: false``) over
    streamed shards (``streaming: true``). Shapes scale (``shapes-decoder``): a small pixel-space UNet from
    scratch over images held in memory. The recipe's free-form ``decoder`` section is described by
    `IMAGE_OPTIONS`. Output: a diffusers-layout `Emu2VisualDecoderPipeline` (unet/, scheduler/, and vae/ in latent
    space) in ``output_dir``, ``metrics.jsonl``, ``checkpoints/`` (``resume=True`` continues the last valid one
    exactly, data position included; ``stop_after``: checkpoint and return once that step is done) and, with
    ``unet_init``, ``unet_init.json`` listing the re-initialised weights.
    """
    import json
    import logging
    from collections import Counter

    from ..processing import preprocess_images
    from ..train.data import StreamBatches, _sources

    opts = _options(config, IMAGE_OPTIONS)
    size = int(opts.get("output_image_size", 64))
    accelerator, encoder, train_config = _stage_setup(config, opts)
    vision = encoder.config.vision_config
    if opts.get("encoder_image_size") is not None and int(opts["encoder_image_size"]) != vision.image_size:
        raise ValueError(f"decoder.encoder_image_size is {opts['encoder_image_size']} but the encoder in "
                         f"model.init_from={config.model.init_from} takes {vision.image_size} px images: point "
                         "init_from at the matching stage-1 model or change encoder_image_size")
    pipe, reinitialised = _stage_decoder(opts, vision.width, size)
    pipe.to(accelerator.device).set_progress_bar_config(disable=True)
    uncond = _null_embeddings(encoder, encoder.config.n_query)
    summary: dict = {}
    if opts.get("unet_init") is not None:
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "unet_init.json").write_text(json.dumps(
            {"unet_init": str(opts["unet_init"]),
             "reinitialised": {k: {"pretrained": list(a), "now": list(b)} for k, (a, b) in reinitialised.items()}},
            indent=1))
        logging.getLogger(__name__).info("UNet from %s; %d weights re-initialised for width %d: %s", opts["unet_init"],
                                         len(reinitialised), vision.width, ", ".join(reinitialised))
        summary["reinitialised"] = list(reinitialised)

    def encode(inputs):
        if cached is not None:
            return cached[inputs]
        pixels = inputs if isinstance(inputs, torch.Tensor) else preprocess_images(inputs, vision.image_size)
        return encoder.encode_image(pixels.to(accelerator.device))

    cached = None
    if opts.get("streaming", False):
        loaders: dict = {}

        def open_stream(name: str, state: dict | None):
            stream = config.data.streams[name]
            shards = DecoderImageShards(
                _sources(config, name, stream), size, max_scale=train_config.max_scale,
                min_image_size=int(opts.get("min_image_size", 0)), seed=config.seed,
                shuffle_buffer=config.data.shuffle_buffer,
            )
            loaders[name] = decoder_image_loader(shards, stream.batch_size, vision.image_size,
                                                 config.data.num_workers, state)
            return loaders[name]

        data = StreamBatches(list(config.data.streams), open_stream, accumulation=1)
        sampling = StageSampling(config.seed, data)
        batches = None

        def next_batch() -> dict:
            nonlocal batches
            batches = batches or iter(data)  # opened on first use, so after a checkpoint restored the position
            parts = [next(batches) for _ in config.data.streams]  # one batch of every stream
            summary["data"] = dict(sum((loader.stats for loader in loaders.values()), Counter()))
            return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    else:
        min_size = int(opts.get("min_image_size", 0))
        records = _stage_records(config, int(opts.get("max_images", 4000)), DecoderImageShards.KINDS)
        images = [r.image for r in records if min(r.image.size) >= min_size]
        if not images:
            raise ValueError(f"none of the {len(records)} images read has a short side of decoder.min_image_size "
                             f"{min_size} px or more")
        batch_size = sum(stream.batch_size for stream in config.data.streams.values())
        sampling = StageSampling(config.seed)
        summary["images"] = len(images)
        if opts.get("cache_embeddings", False):
            if train_config.max_scale != 1.0:
                raise ValueError("decoder.cache_embeddings needs decoder.max_scale: 1.0 (random crops change the "
                                 "input)")
            cached = _encode(encoder, [im.convert("RGB").resize((size, size), PIL.Image.BICUBIC) for im in images],
                             encoder.config.n_query)

        def next_batch() -> dict:
            index = sampling.rng.sample(range(len(images)), min(batch_size, len(images)))
            batch = prepare_decoder_batch([images[i] for i in index], size, sampling.rng, train_config.max_scale)
            if cached is not None:
                batch["encoder_inputs"] = torch.tensor(index)
            return batch

    def step_fn(optimizer, schedule):
        return decoder_training_step(
            pipe, next_batch(), encode, optimizer, lr_scheduler=schedule, uncond_embeds=uncond,
            condition_drop_prob=train_config.condition_drop_prob, noise_offset=train_config.noise_offset,
            max_grad_norm=train_config.max_grad_norm, generator=sampling.generator, snr_gamma=train_config.snr_gamma,
        )

    return _run_stage(config, resume, stop_after, accelerator, pipe, train_config, sampling, step_fn, summary)


def _stage_decoder(opts: dict, vision_width: int, size: int):
    """The pipeline the decoder stage trains and its re-initialised UNet weights ({} unless ``unet_init``):
    SDXL's UNet (``unet_init``) or a small one from scratch, on pixels or on the frozen VAE's latents."""
    from diffusers import EulerDiscreteScheduler

    from ..model.decoder import Emu2VisualDecoderPipeline, latent_scale_factor

    vae, pixel_scale = _stage_vae(opts), int(opts.get("pixel_scale", 1))
    factor = latent_scale_factor(vae, pixel_scale)
    if size % factor:
        raise ValueError(f"decoder.output_image_size {size} must be a multiple of the VAE's down-sampling {factor}")
    channels = 3 if vae is None else vae.config.latent_channels
    reinitialised: dict = {}
    if opts.get("unet_init") is not None:
        unet, reinitialised = load_pretrained_decoder_unet(opts["unet_init"], vision_width, size // factor)
        if unet.config.in_channels != channels:
            fix = ("set decoder.pixel_space: false (a pretrained UNet denoises VAE latents) and decoder.vae"
                   if vae is None else "give decoder.vae the VAE this UNet was trained with")
            raise ValueError(f"decoder.unet_init's UNet takes {unet.config.in_channels}-channel inputs but the "
                             f"{'pixels' if vae is None else 'VAE latents'} have {channels} channels: {fix}")
    else:
        unet = UNet2DConditionModel.from_config(decoder_unet_config(
            vision_width, size // factor, opts.get("channels", (32, 64, 64)), opts.get("attention"),
            int(opts.get("layers_per_block", 1)), in_channels=channels))
    if opts.get("gradient_checkpointing", False):
        unet.enable_gradient_checkpointing()
    scheduler = EulerDiscreteScheduler.from_config(decoder_scheduler_config(opts.get("scheduler")))
    return Emu2VisualDecoderPipeline(unet=unet, scheduler=scheduler, vae=vae, pixel_scale=pixel_scale), reinitialised


def _clip_tensor(frames: Sequence[PIL.Image.Image], size: int) -> torch.Tensor:
    """A clip's frames -> (F, 3, size, size) in [-1, 1]."""
    array = np.stack([np.asarray(f.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32)
                      for f in frames])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_video_decoder_stage(config, resume: bool = False, stop_after: int | None = None) -> dict:
    """``stage: video-decoder`` (paper 2.2.3, video decoder): a 3D UNet (`Emu2VideoDecoderPipeline`, per-frame
    cross-attention) learns to reconstruct clips from the frozen stage-1 encoder's per-frame embeddings.

    Reads ``video_pair`` samples (their frames; the text is unused), encodes every frame of up to ``max_clips``
    clips once (``n_query`` embeddings per frame, the model's v_query by default), then trains like
    `train_decoder_stage` (same loop, checkpoints and resumption). ``decoder`` options: `VIDEO_OPTIONS`.
    """
    from ..model.video_decoder import Emu2VideoDecoderPipeline, video_decoder_training_step

    opts = _options(config, VIDEO_OPTIONS)
    if not bool(opts.get("pixel_space", True)):
        raise NotImplementedError("the video decoder stage trains in pixel space only: set decoder.pixel_space: true")
    size, pixel_scale = int(opts.get("output_image_size", 64)), int(opts.get("pixel_scale", 1))
    accelerator, encoder, train_config = _stage_setup(config, opts)
    vision = encoder.config.vision_config
    n_query = int(opts.get("n_query", encoder.config.v_query))
    clips = [r.frames for r in _stage_records(config, int(opts.get("max_clips", 256)), ("video_pair",))]
    num_frames = int(opts.get("num_frames", len(clips[0])))
    clips = [c[:num_frames] for c in clips if len(c) >= num_frames]
    if not clips:
        raise ValueError(f"no training clip has {num_frames} frames")
    unet_config = video_decoder_unet_config(vision.width, size // pixel_scale, opts.get("channels", (32, 64, 64)),
                                            opts.get("attention"), int(opts.get("layers_per_block", 1)))
    pipe = Emu2VideoDecoderPipeline.from_configs(unet_config, None, decoder_scheduler_config(opts.get("scheduler")),
                                                 pixel_scale=pixel_scale).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    frames = torch.stack([_clip_tensor(c, size) for c in clips])  # (N, F, 3, S, S)
    embeds = _encode(encoder, [f for c in clips for f in c], n_query).unflatten(0, (len(clips), num_frames))
    uncond = _null_embeddings(encoder, n_query).repeat(num_frames, 1)  # (F * Q, Dv): whole clips are dropped
    batch_size = sum(stream.batch_size for stream in config.data.streams.values())
    sampling = StageSampling(config.seed)

    def step_fn(optimizer, schedule):
        index = torch.tensor(sampling.rng.sample(range(len(clips)), min(batch_size, len(clips))))
        return video_decoder_training_step(
            pipe, frames[index].to(accelerator.device), embeds[index], optimizer, lr_scheduler=schedule,
            uncond_embeds=uncond, condition_drop_prob=train_config.condition_drop_prob,
            noise_offset=train_config.noise_offset, max_grad_norm=train_config.max_grad_norm,
            generator=sampling.generator, snr_gamma=train_config.snr_gamma,
        )

    return _run_stage(config, resume, stop_after, accelerator, pipe, train_config, sampling, step_fn,
                      {"clips": len(clips), "num_frames": num_frames, "n_query": n_query})
