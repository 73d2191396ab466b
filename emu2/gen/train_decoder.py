"""Visual-decoder training (paper 2.2.3 and A.3, Table 6): image autoencoding with a frozen encoder.

The decoder learns to turn the frozen vision encoder's embeddings of an image back into that image. Only the
UNet is trained: the vision encoder and the VAE are frozen. Each step (`decoder_training_step`):

1. encode the crop with the frozen encoder -> conditioning (B, Q, Dv);
2. drop it to the unconditional embeddings (zeros by default) with probability 0.1, for classifier-free
   guidance (Table 6: 10%);
3. VAE-encode the crop to latents (or use the pixels themselves in pixel space);
4. add noise with offset 0.1 (Table 6) at a uniformly drawn training timestep;
5. predict the noise with SDXL's added conditions (pooled embeddings, original size, crop, target size) and
   take the MSE to the true noise (epsilon objective);
6. AdamW step with gradient clipping 1.0 under warm-up + linear decay (Table 6).

Crops come from ratio-preserving random scaling followed by a random square crop; the source size and crop
corner are the SDXL size conditions (A.3.1). `train_small_autoencoder` trains the tiny VAE used for the
shapes world, where no pretrained VAE is available offline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL


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
    pixels = torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) for c in crops])).permute(0, 3, 1, 2)
    return {
        "pixel_values": pixels / 127.5 - 1.0,
        "original_size": torch.tensor(sizes),
        "crops_coords_top_left": torch.tensor(corners),
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
def encode_to_latents(vae: AutoencoderKL | None, pixel_values: torch.Tensor, generator=None) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, C, h, w) scaled latents; in pixel space (``vae=None``) the pixels."""
    if vae is None:
        return pixel_values
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample(generator)
    if vae.config.get("shift_factor") is not None:
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


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

    # 3-4. Frozen VAE, then forward diffusion at a random timestep: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise.
    latents = encode_to_latents(vae, pixel_values, generator).to(dtype)
    noise = offset_noise(latents, noise_offset, generator)
    alphas_cumprod = pipeline_parts.scheduler.alphas_cumprod.to(device)
    timesteps = torch.randint(0, len(alphas_cumprod), (batch_size,), generator=generator).to(device)
    a = alphas_cumprod[timesteps].to(dtype)[:, None, None, None]
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise

    # 5. Epsilon prediction with SDXL's added conditions.
    target_size = torch.tensor([height, width], device=device).expand(batch_size, 2)
    time_ids = torch.cat(
        [batch["original_size"].to(device), batch["crops_coords_top_left"].to(device), target_size], dim=1
    )
    added = {"text_embeds": embeds.mean(dim=1), "time_ids": time_ids}
    pred = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), noise.float())

    # 6. Update the UNet.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
    optimizer.step()
    if lr_scheduler is not None:
        lr_scheduler.step()
    return loss.item()


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
    size = pipeline_parts.unet.config.sample_size * _spatial_factor(pipeline_parts.vae)
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
            )
        )
        if log_every and step % log_every == 0:
            print(f"step {step}: loss {losses[-1]:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
    return losses


def _spatial_factor(vae) -> int:
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


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
    data = (
        torch.from_numpy(
            np.stack(
                [
                    np.asarray(im.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32)
                    for im in images
                ]
            )
        ).permute(0, 3, 1, 2)
        / 127.5
        - 1.0
    )
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


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Sequence[PIL.Image.Image], size: int = 64) -> float:
    """Mean PSNR (dB, pixels in [0, 1]) of VAE reconstructions (posterior mode) of ``images``."""
    x = (
        torch.from_numpy(
            np.stack(
                [
                    np.asarray(im.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32)
                    for im in images
                ]
            )
        ).permute(0, 3, 1, 2)
        / 127.5
        - 1.0
    )
    recon = torch.cat([vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(64)])
    mse = (((recon.clamp(-1, 1) - x) / 2) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean())


# ------------------------------------------------------------------------------------ recipe entry point


def _decoder_unet_config(vision_width: int, size: int, pixel_space: bool, channels: Sequence[int]) -> dict:
    """A small SDXL-shaped UNet (text_time conditions, cross-attention on the visual embeddings)."""
    time_dim = 32
    n = len(channels)
    return dict(
        sample_size=size, in_channels=3 if pixel_space else 4, out_channels=3 if pixel_space else 4,
        layers_per_block=1, block_out_channels=list(channels),
        down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
        up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"], mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=[max(1, c // 32) for c in channels], cross_attention_dim=vision_width,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=vision_width + 6 * time_dim,
    )


def _stage_images(config, limit: int) -> list[PIL.Image.Image]:
    """Images of the recipe's data sources (only the images of pairs / text-to-image samples are used)."""
    from collections import Counter

    from ..data.mixing import expand_urls, sources_from_manifest
    from ..data.shards import decode_record, read_shard

    kinds = {s.kind for stream in config.data.streams.values() for s in stream.sources}
    images: list[PIL.Image.Image] = []
    stats: Counter = Counter()
    for source in sources_from_manifest(config.data.root, config.data.split, {k: 1.0 for k in kinds}):
        for url in expand_urls(source.urls):
            for sample in read_shard(url, stats):
                record = decode_record(source.kind, sample)
                images.append(record.image)
                if len(images) >= limit:
                    return images
    return images


def train_decoder_stage(config, resume: bool = False) -> dict:
    """``stage: decoder`` of `emu2 train`: the visual decoder learns to reconstruct images from the frozen
    stage-1 encoder's pooled embeddings (paper 2.2.3 autoencoding; A.3 hyper-parameters from the recipe).

    The recipe's free-form ``decoder`` section: ``output_image_size``, ``pixel_space`` (default true: no VAE,
    the right choice for short CPU runs, see the README), ``channels``, ``cfg_drop_prob``, ``noise_offset``,
    ``max_images``. Output: a diffusers-layout `Emu2VisualDecoderPipeline` in ``output_dir`` plus
    ``metrics.jsonl``. A decoder run is short and restarts from scratch (``resume`` is not supported).
    """
    import json
    import time
    from pathlib import Path

    from ..model.decoder import Emu2VisualDecoderPipeline
    from ..pipeline import Emu2Pipeline
    from ..processing import preprocess_images

    if resume:
        raise NotImplementedError("the decoder stage does not resume; rerun it (it keeps no optimizer state)")
    opts = dict(config.decoder)
    size = int(opts.get("output_image_size", 64))
    pixel_space = bool(opts.get("pixel_space", True))
    torch.manual_seed(config.seed)
    encoder = Emu2Pipeline.from_pretrained(config.model.init_from).model.eval().requires_grad_(False)
    vision = encoder.config.vision_config
    unet_config = _decoder_unet_config(vision.width, size, pixel_space, opts.get("channels", (32, 64, 64)))
    if not pixel_space:
        raise NotImplementedError("decoder.pixel_space=false needs a trained VAE: use train_small_autoencoder")
    pipe = Emu2VisualDecoderPipeline.from_configs(unet_config)

    @torch.no_grad()
    def encode(crops):
        return encoder.encode_image(preprocess_images(crops, vision.image_size))

    with torch.no_grad():  # the official unconditional embedding: an all-zero image in normalised space
        uncond = encoder.encode_image(torch.zeros(1, 3, vision.image_size, vision.image_size))
    lr = next(iter(config.optim.lr.values())) if isinstance(config.optim.lr, dict) else config.optim.lr
    train_config = DecoderTrainingConfig(
        learning_rate=lr, weight_decay=config.optim.weight_decay, warmup_steps=config.warmup_steps,
        total_steps=config.steps, max_grad_norm=config.optim.grad_clip,
        condition_drop_prob=float(opts.get("cfg_drop_prob", 0.1)), noise_offset=float(opts.get("noise_offset", 0.1)),
    )
    images = _stage_images(config, int(opts.get("max_images", 4000)))
    batch_size = sum(stream.batch_size for stream in config.data.streams.values())
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    losses = train_decoder(pipe, images, encode, train_config, batch_size=batch_size, uncond_embeds=uncond,
                           seed=config.seed)
    with open(out / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    pipe.save_pretrained(out)
    return {"step": len(losses), "finished": True, "output_dir": str(out), "loss": losses[-1] if losses else None,
            "seconds": round(time.perf_counter() - started, 1), "images": len(images)}
