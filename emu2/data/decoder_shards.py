"""Decoder training crops (paper A.3.1), from images in memory or streamed from the recipe's webdataset shards.

`random_scale_and_crop` scales an image keeping its ratio and cuts a random square crop, recording SDXL's size
and crop conditions; `prepare_decoder_batch` / `crops_to_batch` make a batch of such crops. `DecoderImageShards`
turns each image of the shards into one; `decoder_image_loader` batches them in dataloader workers with a
resumable stream position.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch.utils.data import DataLoader, IterableDataset

from .records import DataError, decode_record
from .shards import ResumableLoader, ShardDataset


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
