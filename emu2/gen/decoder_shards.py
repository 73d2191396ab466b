"""Decoder training crops streamed from the recipe's webdataset shards, through the data layer.

`DecoderImageShards` turns each image of the shards into a random crop with its SDXL size conditions (A.3.1);
`decoder_image_loader` batches them in dataloader workers with a resumable stream position.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..data.records import DataError, decode_record
from ..data.shards import ResumableLoader, ShardDataset
from .train_decoder import crops_to_batch, random_scale_and_crop


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
