"""The decoder recipe stages of `emu2 train`: ``stage: decoder`` (`train_decoder_stage`) and
``stage: video-decoder`` (`train_video_decoder_stage`), paper 2.2.3 with the A.3 hyper-parameters from the recipe.

Each reads the recipe's ``decoder`` section (`emu2.train.config.DecoderSection`), loads the frozen
stage-1 encoder, builds the decoder (a small one from scratch, `emu2.model.decoder_configs`, or SDXL-base's UNet,
`emu2.convert.sdxl`), feeds it images held in memory or streamed (`emu2.data.decoder_shards`), and hands the
runner (`emu2.train.runner`, through `_run_decoder`) the training step (`emu2.train.stages.diffusion`); `StageSampling` holds
what checkpoints must restore to resume exactly.

Batch sizes mean what they mean in the language-model stages: a stream's ``batch_size`` is what one optimizer
step consumes, split into ``gradient_accumulation_steps`` equal micro-batches (`micro_batch_sizes_per_stream`) whose
gradients add up to that of the whole batch (`emu2.train.stages.diffusion.accumulated_update`).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ...convert.sdxl import SDXL_DOWNLOAD, load_frozen_vae, load_pretrained_decoder_unet, local_model_folder
from ...data.decoder_shards import DecoderImageShards, decoder_image_loader, prepare_decoder_batch
from ...data.records import DataError, decode_record
from ...model.decoder_configs import decoder_scheduler_config, decoder_unet_config, video_decoder_unet_config
from ..config import DecoderSection
from ..data import StreamBatches, _sources, micro_batch_size
from ..optim import build_decoder_optimizer, build_scheduler
from ..runner import SingleProcess, Stage, StageSampling, StepReport, run_stage
from .diffusion import DecoderTrainingConfig, accumulated_update, decoder_loss, freeze_for_decoder_training


def _stage_records(config, limit: int, kinds_wanted: tuple[str, ...]) -> tuple[list, Counter]:
    """Up to ``limit`` records of the recipe's data sources (``data.streams``; shard urls, or the kinds of
    ``data.root``'s dataset.json), read in source order, and the data layer's counters of that reading
    (``samples``, ``skipped.<reason>``, ``read_errors``): unreadable shards and samples are skipped and counted,
    as the data layer does."""
    from ...data.mixing import expand_urls
    from ...data.records import read_shard

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
                    stats["samples"] += 1
                    if len(records) >= limit:
                        return records, stats
    if not records:
        raise ValueError(f"the recipe's data sources hold no {' or '.join(kinds_wanted)} samples")
    return records, stats


def micro_batch_sizes_per_stream(config) -> dict[str, int]:
    """Each stream's batch per micro-step: its ``batch_size`` (per optimizer step, as in the language-model
    stages) over ``gradient_accumulation_steps``; the stages run in one process. Raises if it does not divide."""
    return {name: micro_batch_size(stream, name, 1, config.gradient_accumulation_steps)
            for name, stream in config.data.streams.items()}


def _stage_setup(config, opts: DecoderSection):
    """(accelerator, frozen encoder on its device, the optimisation settings)."""
    from ...pipelines.emu2 import Emu2Pipeline

    accelerator = SingleProcess(config, config.stage)
    torch.manual_seed(config.seed)
    encoder = Emu2Pipeline.from_pretrained(config.model.init_from).model.eval().requires_grad_(False)
    encoder.to(accelerator.device)
    # The optimizer and schedule come from the recipe (`_run_decoder`); these are the step's own settings.
    train_config = DecoderTrainingConfig(
        max_grad_norm=config.optim.grad_clip,
        condition_drop_prob=opts.cfg_drop_prob, noise_offset=opts.noise_offset,
        max_scale=opts.max_scale,
        snr_gamma=opts.snr_gamma,
    )
    return accelerator, encoder, train_config


@torch.no_grad()
def _encode(encoder, images: Sequence[PIL.Image.Image], n_query: int, chunk: int = 64) -> torch.Tensor:
    """(N, n_query, Dv) embeddings, in fixed chunks (the same numbers on every run, so resumption is exact)."""
    from ...processing import preprocess_images

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


def _run_decoder(config, resume: bool, stop_after: int | None, accelerator, pipe, train_config, sampling,
                 micro_batch_loss: Callable[[], torch.Tensor], summary: dict, data_stats) -> dict:
    """What both decoder stages hand the runner (`emu2.train.runner.run_stage`): the UNet with AdamW
    (`build_decoder_optimizer`: optim.lr.unet, betas, eps, weight_decay) and the language-model stages' schedule,
    and a step of ``gradient_accumulation_steps`` micro-batches (`micro_batch_loss` draws, noises and scores one;
    each is back-propagated before the next is drawn, so one is in memory), clipped to ``optim.grad_clip``.
    ``data_stats``: the data layer's counters (the streamed data, or those of the images read into memory)."""
    freeze_for_decoder_training(pipe)
    optimizer = build_decoder_optimizer(pipe.unet, config)
    accumulation = config.gradient_accumulation_steps

    def step() -> StepReport:
        with accelerator.autocast():
            loss = accumulated_update(pipe.unet, (micro_batch_loss() for _ in range(accumulation)), optimizer,
                                      micro_batches=accumulation, max_grad_norm=train_config.max_grad_norm)
        return StepReport(loss, diverged=None if math.isfinite(loss) else f"decoder loss {loss}")

    stage = Stage(accelerator, pipe.unet, optimizer, build_scheduler(optimizer, config), step, pipe.save_pretrained,
                  state=sampling, data_stats=data_stats, summary=summary)
    return run_stage(config, stage, resume=resume, stop_after=stop_after)


def train_decoder_stage(config, resume: bool = False, stop_after: int | None = None) -> dict:
    """``stage: decoder`` of `emu2 train`: the visual decoder learns to reconstruct images from the frozen
    stage-1 encoder's pooled embeddings (paper 2.2.3 autoencoding; A.3 hyper-parameters from the recipe).

    Full scale (``emu2-decoder``): SDXL-base's UNet from a local folder (``decoder.unet_init``, adapted by
    `load_pretrained_decoder_unet`), trained on the latents of its frozen VAE (``pixel_space: false``) over
    streamed shards (``streaming: true``). Shapes scale (``shapes-decoder``): a small pixel-space UNet from
    scratch over images held in memory. The recipe's ``decoder`` section is `emu2.train.config.DecoderSection`.
    Output: a diffusers-layout `Emu2VisualDecoderPipeline` (unet/, scheduler/, and vae/ in latent space) in
    ``output_dir``, ``metrics.jsonl``, ``checkpoints/`` (``resume=True`` continues the last valid one
    exactly, data position included; ``stop_after``: checkpoint and return once that step is done) and, with
    ``unet_init``, ``unet_init.json`` listing the re-initialised weights.
    """
    from ...processing import preprocess_images

    opts = config.decoder  # validated with the recipe (emu2.train.config)
    accelerator, encoder, train_config = _stage_setup(config, opts)
    vision = encoder.config.vision_config
    if opts.encoder_image_size is not None and opts.encoder_image_size != vision.image_size:
        raise ValueError(f"decoder.encoder_image_size is {opts.encoder_image_size} but the encoder in "
                         f"model.init_from={config.model.init_from} takes {vision.image_size} px images: point "
                         "init_from at the matching stage-1 model or change encoder_image_size")
    pipe, reinitialised = _stage_decoder(opts, vision.width, opts.output_image_size)
    pipe.to(accelerator.device).set_progress_bar_config(disable=True)
    uncond = _null_embeddings(encoder, encoder.config.n_query)
    summary = {"reinitialised": _record_unet_init(config, reinitialised, vision.width)} if opts.unet_init else {}
    if opts.streaming:
        next_batch, sampling, data_stats = _streamed_images(config, train_config, vision.image_size)
        cached = None
    else:
        next_batch, sampling, data_stats, cached = _images_in_memory(config, train_config, encoder)
        summary["images"] = data_stats["samples"]

    def encode(inputs):
        if cached is not None:
            return cached[inputs]
        pixels = inputs if isinstance(inputs, torch.Tensor) else preprocess_images(inputs, vision.image_size)
        return encoder.encode_image(pixels.to(accelerator.device))

    def micro_batch_loss() -> torch.Tensor:
        return decoder_loss(pipe, next_batch(), encode, uncond_embeds=uncond,
                            condition_drop_prob=train_config.condition_drop_prob,
                            noise_offset=train_config.noise_offset, generator=sampling.generator,
                            snr_gamma=train_config.snr_gamma)

    return _run_decoder(config, resume, stop_after, accelerator, pipe, train_config, sampling, micro_batch_loss,
                        summary, data_stats)


def _record_unet_init(config, reinitialised: dict, width: int) -> list[str]:
    """``output_dir/unet_init.json`` and the log: which weights of ``decoder.unet_init`` were re-initialised for
    the encoder's ``width`` (their pretrained and new shapes). Returns their names."""
    import json

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet_init.json").write_text(json.dumps(
        {"unet_init": config.decoder.unet_init,
         "reinitialised": {k: {"pretrained": list(a), "now": list(b)} for k, (a, b) in reinitialised.items()}},
        indent=1))
    logging.getLogger(__name__).info("UNet from %s; %d weights re-initialised for width %d: %s",
                                     config.decoder.unet_init, len(reinitialised), width, ", ".join(reinitialised))
    return list(reinitialised)


def _streamed_images(config, train_config, encoder_image_size: int):
    """``decoder.streaming``: (next micro-batch, sampling state with the shard position, the data counters).
    Each micro-batch holds one batch of every stream."""
    micro_batch_sizes = micro_batch_sizes_per_stream(config)

    def open_stream(name: str, state: dict | None):
        shards = DecoderImageShards(
            _sources(config, name, config.data.streams[name]), config.decoder.output_image_size,
            max_scale=train_config.max_scale, min_image_size=config.decoder.min_image_size, seed=config.seed,
            shuffle_buffer=config.data.shuffle_buffer,
        )
        return decoder_image_loader(shards, micro_batch_sizes[name], encoder_image_size, config.data.num_workers,
                                    state)

    data = StreamBatches(list(config.data.streams), open_stream, config.gradient_accumulation_steps)
    batches = None

    def next_batch() -> dict:
        nonlocal batches
        batches = batches or iter(data)  # opened on first use, so after a checkpoint restored the position
        parts = [next(batches) for _ in config.data.streams]
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    return next_batch, StageSampling(config.seed, data), data


def _images_in_memory(config, train_config, encoder):
    """Up to ``decoder.max_images`` images read into memory: (next micro-batch, sampling state, the data
    counters, and with ``decoder.cache_embeddings`` every image's embeddings, else None)."""
    opts, size = config.decoder, config.decoder.output_image_size
    records, stats = _stage_records(config, opts.max_images, DecoderImageShards.KINDS)
    images = [r.image for r in records if min(r.image.size) >= opts.min_image_size]
    stats["samples"] -= len(records) - len(images)
    stats["skipped.too_small"] += len(records) - len(images)  # as DecoderImageShards counts them
    if not images:
        raise ValueError(f"none of the {len(records)} images read has a short side of decoder.min_image_size "
                         f"{opts.min_image_size} px or more")
    batch_size = sum(micro_batch_sizes_per_stream(config).values())
    sampling = StageSampling(config.seed)
    cached = None
    if opts.cache_embeddings:  # validation: only with max_scale 1.0, whose inputs never change
        cached = _encode(encoder, [im.convert("RGB").resize((size, size), PIL.Image.BICUBIC) for im in images],
                         encoder.config.n_query)

    def next_batch() -> dict:
        index = sampling.rng.sample(range(len(images)), min(batch_size, len(images)))
        batch = prepare_decoder_batch([images[i] for i in index], size, sampling.rng, train_config.max_scale)
        if cached is not None:
            batch["encoder_inputs"] = torch.tensor(index)
        return batch

    return next_batch, sampling, stats, cached


def _stage_decoder(opts: DecoderSection, vision_width: int, size: int):
    """The pipeline the decoder stage trains and its re-initialised UNet weights ({} unless ``unet_init``):
    SDXL's UNet (``unet_init``) or a small one from scratch, on pixels or on the frozen VAE's latents."""
    from diffusers import EulerDiscreteScheduler

    from ...model.decoder import latent_scale_factor
    from ...pipelines.visual_decoder import Emu2VisualDecoderPipeline

    vae, pixel_scale = _stage_vae(opts), opts.pixel_scale
    factor = latent_scale_factor(vae, pixel_scale)
    if size % factor:
        raise ValueError(f"decoder.output_image_size {size} must be a multiple of the VAE's down-sampling {factor}")
    channels = 3 if vae is None else vae.config.latent_channels
    reinitialised: dict = {}
    if opts.unet_init is not None:
        unet, reinitialised = load_pretrained_decoder_unet(opts.unet_init, vision_width, size // factor)
        if unet.config.in_channels != channels:
            fix = ("set decoder.pixel_space: false (a pretrained UNet denoises VAE latents) and decoder.vae"
                   if vae is None else "give decoder.vae the VAE this UNet was trained with")
            raise ValueError(f"decoder.unet_init's UNet takes {unet.config.in_channels}-channel inputs but the "
                             f"{'pixels' if vae is None else 'VAE latents'} have {channels} channels: {fix}")
    else:
        unet = UNet2DConditionModel.from_config(decoder_unet_config(
            vision_width, size // factor, opts.channels, opts.attention,
            opts.layers_per_block, in_channels=channels, spatial_conditioning=opts.spatial_conditioning))
    if opts.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    scheduler = EulerDiscreteScheduler.from_config(decoder_scheduler_config(opts.scheduler))
    pipe = Emu2VisualDecoderPipeline(unet=unet, scheduler=scheduler, vae=vae, pixel_scale=pixel_scale,
                                     spatial_conditioning=opts.spatial_conditioning)
    return pipe, reinitialised


def _stage_vae(opts: DecoderSection) -> AutoencoderKL | None:
    """The recipe's VAE: None in pixel space, else ``decoder.vae``, or the ``vae/`` of the ``decoder.unet_init``
    checkout (its sibling when unet_init names the ``unet/`` folder itself)."""
    if opts.pixel_space:  # validation refuses decoder.vae with it
        return None
    if opts.vae is not None:
        return load_frozen_vae(opts.vae)
    if opts.unet_init is not None:
        root = local_model_folder(opts.unet_init, "decoder.unet_init")
        candidate = root / "vae" if (root / "unet").is_dir() else root.parent / "vae"
        if (candidate / "config.json").is_file():
            return load_frozen_vae(candidate)
    raise ValueError(
        "decoder.pixel_space is false, so the UNet learns on VAE latents, but no VAE was found: set decoder.vae to a "
        "local AutoencoderKL folder (an SDXL-base checkout or its vae/, or any AutoencoderKL saved with "
        "save_pretrained), or point decoder.unet_init at a folder that has a vae/ subfolder "
        f"(e.g. `{SDXL_DOWNLOAD}`)"
    )


def clip_tensor(frames: Sequence[PIL.Image.Image], size: int) -> torch.Tensor:
    """A clip's frames -> (F, 3, size, size) in [-1, 1]."""
    array = np.stack([np.asarray(f.convert("RGB").resize((size, size), PIL.Image.BICUBIC), np.float32)
                      for f in frames])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_video_decoder_stage(config, resume: bool = False, stop_after: int | None = None) -> dict:
    """``stage: video-decoder`` (paper 2.2.3, video decoder): a 3D UNet (`Emu2VideoDecoderPipeline`, per-frame
    cross-attention) learns to reconstruct clips from the frozen stage-1 encoder's per-frame embeddings.

    Reads ``video_pair`` samples (their frames; the text is unused), encodes every frame of up to ``max_clips``
    clips once (``n_query`` embeddings per frame, the model's v_query by default), then trains like
    `train_decoder_stage` (same loop, checkpoints and resumption). ``decoder`` options: `emu2.train.config.DecoderSection`.
    """
    from ...pipelines.video_decoder import Emu2VideoDecoderPipeline
    from .diffusion import video_decoder_loss

    opts = config.decoder  # validated with the recipe (emu2.train.config)
    batch_size = sum(micro_batch_sizes_per_stream(config).values())
    size, pixel_scale = opts.output_image_size, opts.pixel_scale
    accelerator, encoder, train_config = _stage_setup(config, opts)
    vision = encoder.config.vision_config
    n_query = opts.n_query or encoder.config.v_query
    records, stats = _stage_records(config, opts.max_clips, ("video_pair",))
    num_frames = opts.num_frames or len(records[0].frames)
    clips = [r.frames[:num_frames] for r in records if len(r.frames) >= num_frames]
    stats["samples"] -= len(records) - len(clips)
    stats["skipped.too_few_frames"] += len(records) - len(clips)
    if not clips:
        raise ValueError(f"no training clip has {num_frames} frames")
    unet_config = video_decoder_unet_config(vision.width, size // pixel_scale, opts.channels,
                                            opts.attention, opts.layers_per_block)
    pipe = Emu2VideoDecoderPipeline.from_configs(unet_config, None, decoder_scheduler_config(opts.scheduler),
                                                 pixel_scale=pixel_scale).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    frames = torch.stack([clip_tensor(c, size) for c in clips])  # (N, F, 3, S, S)
    embeds = _encode(encoder, [f for c in clips for f in c], n_query).unflatten(0, (len(clips), num_frames))
    uncond = _null_embeddings(encoder, n_query).repeat(num_frames, 1)  # (F * Q, Dv): whole clips are dropped
    sampling = StageSampling(config.seed)

    def micro_batch_loss():
        index = torch.tensor(sampling.rng.sample(range(len(clips)), min(batch_size, len(clips))))
        return video_decoder_loss(
            pipe, frames[index].to(accelerator.device), embeds[index], uncond_embeds=uncond,
            condition_drop_prob=train_config.condition_drop_prob, noise_offset=train_config.noise_offset,
            generator=sampling.generator, snr_gamma=train_config.snr_gamma,
        )

    return _run_decoder(config, resume, stop_after, accelerator, pipe, train_config, sampling, micro_batch_loss,
                        {"clips": len(clips), "num_frames": num_frames, "n_query": n_query}, stats)
