"""The training dataset over WebDataset shards: mixing, shuffling, augmentation, decoding into `Sample`s, and the
resumable loader. The shard layout of each kind, and reading and writing records, are in `emu2.data.records`.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emu2.data import kinds as K
from emu2.data.mixing import MixedStream, Source, StreamPosition, source_stream
from emu2.data.records import DataError, decode_record, read_shard
from emu2.data.sequence import Sample, SequenceConfig, SequenceError, collate


# ------------------------------------------------------------------------------------------- augmentation
@dataclass
class Augmentation:
    """Optional random resized crop for training images (off by default).

    Applied only to kinds whose text does not describe geometry (pairs, documents, videos, text-to-image);
    grounded and edit samples keep their exact pixels. Frames of one video share one crop.
    """

    crop_scale: tuple[float, float] = (0.8, 1.0)  # fraction of the image area kept
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    kinds: tuple[str, ...] = ("pair", "text_to_image", "interleaved", "video_pair", "video_interleaved")

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height * rng.uniform(*self.crop_scale)
        ratio = rng.uniform(*self.crop_ratio)
        w = max(1, min(width, round((area * ratio) ** 0.5)))
        h = max(1, min(height, round((area / ratio) ** 0.5)))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        return left, top, left + w, top + h

    def apply(self, record: K.Record, rng: random.Random) -> K.Record:
        if record.kind not in self.kinds:
            return record

        def crop(images: list[Image.Image]) -> list[Image.Image]:
            if not images:
                return images
            box = self.crop_box(*images[0].size, rng)
            return [im.crop(box) for im in images]

        if isinstance(record, (K.ImageTextPair, K.TextToImage)):
            record.image = crop([record.image])[0]
        elif isinstance(record, K.VideoTextPair):
            record.frames = crop(record.frames)
        elif isinstance(record, K.InterleavedDocument):
            record.images = [crop([im])[0] for im in record.images]
        elif isinstance(record, K.VideoDocument):
            record.clips = [crop(clip) for clip in record.clips]
        return record


# ------------------------------------------------------------------------------------------------ dataset
class ShardDataset(IterableDataset):
    """An endless (or one-pass) stream of `Sample`s mixed from several shard sources.

    Each reader (rank x dataloader worker) reads a disjoint part of every source (`mixing.source_stream`),
    shuffles it through ``shuffle_buffer`` samples, draws the source of each sample by weight, decodes it and
    lays it out with `kinds.build_sample`. The order depends only on ``seed`` and the reader layout.
    Bad samples are skipped and counted in ``stats``; ``state_dict``/``load_state_dict`` resume in-process
    iteration (with a DataLoader use `make_dataloader`, which tracks every worker).
    """

    def __init__(self, sources: Sequence[Source], tokenizer, config: SequenceConfig, *, seed: int = 0,
                 shuffle_buffer: int = 1000, repeat: bool = True, rank: int | None = None,
                 world_size: int | None = None, augmentation: Augmentation | None = None):
        super().__init__()
        for source in sources:
            if source.kind not in K.KINDS:
                raise ValueError(f"source {source.name!r} has unknown kind {source.kind!r}; "
                                 f"expected one of {sorted(K.KINDS)}")
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if ready else 0) if rank is None else rank
            world_size = (dist.get_world_size() if ready else 1) if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
        self.sources, self.tokenizer, self.config = list(sources), tokenizer, config
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat
        self.rank, self.world_size, self.augmentation = rank, world_size, augmentation
        self.stats: Counter = Counter()
        self._resume: dict = {}
        self._stream: MixedStream | None = None

    # -- state
    def _position(self) -> tuple[int, int, StreamPosition]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return worker, workers, StreamPosition(self.rank * workers + worker, self.world_size * workers)

    def state_dict(self) -> dict:
        """Position of the in-process stream: samples consumed per source, mixing step, stats."""
        stream_state = self._stream.state_dict() if self._stream else self._resume.get("0", {})
        return _state(self, 1, {"0": {**stream_state, "stats": dict(self.stats)}})

    def load_state_dict(self, state: dict, num_workers: int = 1) -> None:
        """Restore a position saved by `state_dict` (or by the loader, with its ``num_workers``)."""
        expected = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": num_workers}
        saved = {k: state.get(k) for k in expected}
        if saved != expected:
            raise ValueError(f"the data state was saved with {saved} but this run has {expected}; resume with "
                             "the same seed, world size and number of dataloader workers")
        self._resume = dict(state["workers"])
        self._stream = None

    # -- iteration
    def __iter__(self) -> Iterator[Sample]:
        for sample, _ in self._samples():
            yield sample

    def _samples(self) -> Iterator[tuple[Sample, int]]:
        worker, _, position = self._position()
        saved = self._resume.get(str(worker), {})
        scratch: Counter = Counter()  # replaying the resumed part must not count its errors twice
        sink = {"stats": scratch}

        def open_stream(source: Source) -> Iterator[dict]:
            return source_stream(source, lambda url: read_shard(url, sink["stats"]), position, self.seed,
                                 self.repeat, self.shuffle_buffer)

        self._stream = MixedStream(self.sources, open_stream, self.seed, position, saved)
        self.stats = Counter(saved.get("stats", {}))
        sink["stats"] = self.stats
        for source, raw in self._stream:
            sample = self._build(source, raw)
            if sample is not None:
                self.stats["samples"] += 1
                self.stats[f"samples.{source.kind}"] += 1
                yield sample, worker

    def _build(self, source: Source, raw: dict) -> Sample | None:
        shard = os.path.basename(str(raw.get("__url__")))  # not the full path: moving the data keeps the layouts
        rng = random.Random(f"{self.seed}:{source.name}:{raw.get('__epoch__', 0)}:{shard}:{raw.get('__key__')}")
        try:
            record = decode_record(source.kind, raw)
            if self.augmentation is not None:
                record = self.augmentation.apply(record, rng)
            sample = K.build_sample(record, self.tokenizer, self.config, rng)
        except DataError as exn:
            self.stats[f"skipped.{exn.reason}"] += 1
            return None
        except (SequenceError, StopIteration):
            self.stats["skipped.bad_record"] += 1
            return None
        except Exception as exn:  # noqa: BLE001 -- odd data (a 0-pixel image, ...) must not stop training
            self.stats[f"skipped.{type(exn).__name__}"] += 1
            return None
        if not sample.has_targets:
            self.stats["skipped.no_targets"] += 1
            return None
        return sample


def _state(dataset: ShardDataset, num_workers: int, workers: dict) -> dict:
    return {"version": 1, "seed": dataset.seed, "rank": dataset.rank, "world_size": dataset.world_size,
            "num_workers": num_workers, "workers": workers}


# --------------------------------------------------------------------------------------------- dataloader
class _Batches(IterableDataset):
    """Batches built inside each worker, tagged with that worker's stream state after the batch.

    ``pack_length``: each row holds consecutive samples whole, as many as fit in that many tokens (`pack`); a
    sample that does not fit starts the next row. The state a batch carries is the stream's just before that
    sample, so a resumed run reads it again and no sample is lost or repeated.
    """

    def __init__(self, dataset: ShardDataset, batch_size: int, pad_id: int, drop_last: bool,
                 pack_length: int | None = None):
        super().__init__()
        self.dataset, self.batch_size, self.pad_id, self.drop_last = dataset, batch_size, pad_id, drop_last
        self.pack_length = pack_length

    def __iter__(self):
        rows: list[list[Sample]] = []
        row: list[Sample] = []
        length, worker, state = 0, 0, None
        for sample, worker in self.dataset._samples():
            if self.pack_length is None:
                rows.append([sample])
                if len(rows) == self.batch_size:
                    yield self._tagged(rows, worker, self._state())
                    rows = []
                continue
            if row and length + len(sample) > self.pack_length:
                rows.append(row)
                row, length = [], 0
                if len(rows) == self.batch_size:
                    yield self._tagged(rows, worker, state)  # the state before ``sample``, which is not in it
                    rows = []
            row.append(sample)
            length += len(sample)
            state = self._state()  # only packing needs it per sample: the next one may not fit
        rows += [row] if row else []
        if rows and not self.drop_last:
            yield self._tagged(rows, worker, state or self._state())

    def _state(self) -> dict:
        stream = self.dataset._stream
        return {**(stream.state_dict() if stream else {}), "stats": dict(self.dataset.stats)}

    def _tagged(self, rows: list[list[Sample]], worker: int, state: dict):
        batch = [pack(row) for row in rows]
        return collate(batch, self.pad_id, self.dataset.config.image_size), [s.kind for s in batch], worker, state


def pack(samples: Sequence[Sample]) -> Sample:
    """Samples one after another in one sequence (each keeps its ``<s>`` ... ``</s>``, labels and images in order),
    as language-model pre-training packs documents: later ones attend to earlier ones and positions run on, so
    the model trains at every position up to the row's length. The kind is the first sample's."""
    if len(samples) == 1:
        return samples[0]
    return Sample(torch.cat([s.input_ids for s in samples]), torch.cat([s.labels for s in samples]),
                  [im for s in samples for im in s.images], [t for s in samples for t in s.image_is_target],
                  [f for s in samples for f in s.frames], [t for s in samples for t in s.frame_is_target],
                  samples[0].kind, max(s.image_size for s in samples))


def _unbatched(item):
    return item


class ResumableLoader:
    """Iterates collated batches (dicts of `collate`) from a DataLoader and remembers every worker's position.

    ``state_dict()`` after consuming a batch, saved with the checkpoint, restores the stream to just after it
    (`make_dataloader(..., state=...)`). ``stats``: samples and skip counters summed over workers.
    ``last_kinds``: the kinds of the samples of the last batch.
    """

    def __init__(self, dataset: ShardDataset, loader: DataLoader, num_workers: int, state: dict | None):
        self.dataset, self.loader, self.num_workers = dataset, loader, num_workers
        self._workers: dict = dict(state["workers"]) if state else {}
        self.last_kinds: list[str] = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for batch, batch_kinds, worker, state in self.loader:
            self._workers[str(worker)] = state
            self.last_kinds = batch_kinds
            yield batch

    def state_dict(self) -> dict:
        return _state(self.dataset, self.num_workers, dict(self._workers))

    @property
    def stats(self) -> Counter:
        total: Counter = Counter()
        for state in self._workers.values():
            total.update(state.get("stats", {}))
        return total


def make_dataloader(dataset: ShardDataset, batch_size: int, pad_id: int, num_workers: int = 0,
                    state: dict | None = None, drop_last: bool = False, prefetch_factor: int = 2,
                    pin_memory: bool = False, pack_length: int | None = None) -> ResumableLoader:
    """A DataLoader over ``dataset`` yielding `collate` batches, resumable from ``state``.

    ``pad_id``: the tokenizer's pad id ([PAD] = 32000). Restoring needs the same seed, world size and
    ``num_workers`` as when the state was saved. ``pack_length``: rows of consecutive samples up to that many
    tokens (`pack`) instead of one sample a row; ``batch_size`` then counts rows.
    """
    if state is not None:
        dataset.load_state_dict(state, num_workers=max(num_workers, 1))
    loader = DataLoader(
        _Batches(dataset, batch_size, pad_id, drop_last, pack_length), batch_size=None, num_workers=num_workers,
        collate_fn=_unbatched, prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
    )
    return ResumableLoader(dataset, loader, max(num_workers, 1), state)
