"""The bridge from a recipe's ``data`` section to an iterable of collated batches for the loop.

The loop takes any iterable of batches (dicts of `emu2.data.sequence.collate`: exactly the model's forward
kwargs) that has ``state_dict()``/``load_state_dict()``, and reads ``micro_batches_per_step`` of them per
optimizer step. `build_data` makes one from the recipe:

* one stream per entry of ``data.streams``, each with its own global batch size (paper Table 5 lists one per
  data type: 6144 image-text and 768 video-text pairs in stage 1), its sources mixed by weight
  (`emu2.data.shards.ShardDataset` over webdataset shards, split by rank and dataloader worker);
* every micro-step takes one batch from every stream; per-rank micro-batch = global / (ranks x accumulation).

Synthetic streams (``data.synthetic``) give random, deterministic batches for benchmarks and distributed tests.

Samples the data layer cannot use are skipped and counted (`emu2.data.shards.ShardDataset.stats`, summed over
streams in `StreamBatches.stats`); `SkippedSampleReport` is how every trainer reports those counts (as
`SkippedSamples`) and stops past ``data.max_skipped_fraction``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from emu2.data.sequence import IGNORE_INDEX, Sample, collate

from .config import StreamSection, SyntheticSection, TrainConfig

Batch = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


class TooManySkippedSamples(RuntimeError):
    """More than ``data.max_skipped_fraction`` of the samples read could not be used; the run stopped."""


@dataclass(frozen=True)
class SkippedSamples:
    """The data layer's counters (``samples``, ``skipped.<reason>``, ``read_errors``) as a trainer reports them.

    A read error (a truncated or unreadable shard) counts as one skipped sample, as does a shard cut at a member
    boundary (``truncated_shard``) or one with a corrupt member header (``corrupt_shard``): how many samples the damaged part held is unknown, so the share is a lower
    bound of what was lost.
    """

    used: int  # samples that reached a batch
    by_reason: dict[str, int]  # skipped samples per reason: bad_image, bad_json, no_targets, read_errors, ...

    @classmethod
    def from_stats(cls, stats: Mapping[str, int]) -> SkippedSamples:
        reasons = {key.removeprefix("skipped."): n for key, n in stats.items() if key.startswith("skipped.") and n}
        if stats.get("read_errors"):
            reasons["read_errors"] = stats["read_errors"]
        return cls(int(stats.get("samples", 0)), dict(sorted(reasons.items())))

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    @property
    def fraction(self) -> float:
        """Skipped share of the samples read (0 before any was read)."""
        read = self.used + self.total
        return self.total / read if read else 0.0

    def metrics(self) -> dict[str, float]:
        """``skipped``, ``skipped_fraction`` and ``skipped/<reason>`` for metrics.jsonl."""
        return {"skipped": self.total, "skipped_fraction": self.fraction,
                **{f"skipped/{reason}": n for reason, n in self.by_reason.items()}}

    def text(self) -> str:
        """``skipped 3 (bad_image 2, read_errors 1)``, for the progress bar and the log."""
        reasons = ", ".join(f"{reason} {n}" for reason, n in self.by_reason.items())
        return f"skipped {self.total}" + (f" ({reasons})" if reasons else "")

    def check(self, max_fraction: float) -> None:
        """Raise `TooManySkippedSamples` when the skipped share is above ``max_fraction``.

        Only once ``1 / max_fraction`` samples were read, so that one bad sample among the first few cannot
        stop a run on its own (with fewer, a single skip is already more than the share allows).
        """
        read = self.used + self.total
        if max_fraction >= 1 or read < (math.ceil(1 / max_fraction) if max_fraction > 0 else 1):
            return
        if self.fraction > max_fraction:
            raise TooManySkippedSamples(
                f"{self.text()} of the {read} samples read: {self.fraction:.1%}, more than "
                f"data.max_skipped_fraction={max_fraction:g}. Check the shards (read_errors: truncated or unreadable "
                "tar files; truncated_shard: a tar cut at a member boundary, without its end-of-archive blocks; "
                "corrupt_shard: a tar member header that fails its checksum, the rest of the shard lost; bad_*: "
                "samples that do not decode), or raise data.max_skipped_fraction to accept the loss")


class SkippedSampleReport:
    """The skipped-sample accounting of one run, for any trainer: what the data layer could not use, in the progress
    bar, metrics.jsonl and the summary, and the stop past ``data.max_skipped_fraction``.

        report = SkippedSampleReport(build_data(config, ...), config.data.max_skipped_fraction)
        values.update(report.update())   # each (logged) step: read the counters, stop past the threshold
        bar.set_postfix_str(f"loss {loss:.3f}" + report.postfix())
        summary.update(report.summary())  # at the end: ``skipped`` by reason, ``skipped_fraction``

    ``data``: what holds the data layer's counters (``samples``, ``skipped.<reason>``, ``read_errors``):
    `build_data`'s streams or a shard loader (their ``stats``), or the counters themselves. Data without counters
    (synthetic streams, None) reports nothing. ``gather(stats) -> stats``: how each rank's counters are summed over
    ranks; a collective, so every rank must call `update` at the same steps.
    """

    def __init__(self, data, max_fraction: float, gather: Callable[[dict], Mapping[str, int]] | None = None):
        self.data, self.max_fraction, self.gather = data, max_fraction, gather
        self.last: SkippedSamples | None = None

    def _stats(self) -> Mapping[str, int] | None:
        return self.data if isinstance(self.data, Mapping) else getattr(self.data, "stats", None)

    def update(self, check: bool = True) -> dict[str, float]:
        """Read the counters now and return their metrics.jsonl fields (`SkippedSamples.metrics`; none for data
        without counters). ``check``: raise `TooManySkippedSamples` past the threshold (`check`)."""
        stats = self._stats()
        if stats is None:
            return {}
        stats = dict(stats)
        self.last = SkippedSamples.from_stats(self.gather(stats) if self.gather is not None else stats)
        if check:
            self.check()
        return self.last.metrics()

    def check(self) -> None:
        """Raise `TooManySkippedSamples` when the counters last read are past ``max_fraction``."""
        if self.last is not None:
            self.last.check(self.max_fraction)

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields of the counters last read (none before the first `update`)."""
        return self.last.metrics() if self.last is not None else {}

    def postfix(self) -> str:
        """`` | skipped 3 (bad_image 2, read_errors 1)`` for the progress bar, or "" while nothing was skipped."""
        return f" | {self.last.text()}" if self.last is not None and self.last.total else ""

    def summary(self) -> dict:
        """Read the counters a last time (no threshold check), log them and return the summary fields ``skipped``
        (count by reason) and ``skipped_fraction``; none for data without counters."""
        self.update(check=False)
        if self.last is None:
            return {}
        log.info("%s of %d samples read", self.last.text(), self.last.used + self.last.total)
        return {"skipped": self.last.by_reason, "skipped_fraction": self.last.fraction}


def summed_stats(loaders) -> Counter:
    """The counters of several loaders (those that keep ``stats``: shard loaders; synthetic streams do not)."""
    total: Counter = Counter()
    for loader in loaders:
        total.update(getattr(loader, "stats", None) or {})
    return total


class StreamBatches:
    """Round-robin over named streams: micro-step k yields one batch of each stream, in recipe order.

    ``open_stream(name, state)`` returns an iterable of batches with ``state_dict()``, positioned at ``state``
    (None: the start). The state is exact at optimizer-step boundaries, where the loop saves it.
    """

    def __init__(self, names: list[str], open_stream: Callable[[str, dict | None], object], accumulation: int):
        self.names, self.open_stream, self.accumulation = list(names), open_stream, accumulation
        self.micro_batches_per_step = accumulation * len(self.names)
        self._states: dict[str, dict | None] = {name: None for name in self.names}
        self._loaders: dict[str, object] = {}

    def __iter__(self) -> Iterator[Batch]:
        self._loaders = {name: self.open_stream(name, self._states[name]) for name in self.names}
        iterators = {name: iter(loader) for name, loader in self._loaders.items()}
        while True:
            for name in self.names:
                try:
                    batch = next(iterators[name])
                except StopIteration:
                    raise RuntimeError(f"data stream {name!r} ran out of samples; its sources are exhausted "
                                       "(shards are repeated unless a source is empty)") from None
                yield batch

    @property
    def stats(self) -> Counter:
        """The data layer's sample and skip counters, summed over the open streams (resumed runs included)."""
        return summed_stats(self._loaders.values())

    def state_dict(self) -> dict:
        return {"streams": {name: (self._loaders[name].state_dict() if name in self._loaders else self._states[name])
                            for name in self.names}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.names) - set(state["streams"])
        if missing:
            raise ValueError(f"the saved data state has no stream(s) {sorted(missing)}; it has "
                             f"{sorted(state['streams'])} (a resumed run needs the recipe's streams)")
        self._states = {name: state["streams"][name] for name in self.names}
        self._loaders = {}


def micro_batch_size(stream: StreamSection, name: str, world_size: int, accumulation: int) -> int:
    """Per-rank batch of one micro-step: the global batch split over ranks and accumulation steps."""
    per, rest = divmod(stream.batch_size, world_size * accumulation)
    if rest or not per:
        raise ValueError(f"data.streams.{name}.batch_size={stream.batch_size} is not a positive multiple of "
                         f"world_size ({world_size}) x gradient_accumulation_steps ({accumulation})")
    return per


def build_data(config: TrainConfig, model_config, tokenizer, rank: int = 0, world_size: int = 1) -> StreamBatches:
    """The recipe's streams for this rank. ``model_config``: the `Emu2Config` (n_query, v_query, image size)."""
    data, accumulation = config.data, config.gradient_accumulation_steps
    sizes = {name: micro_batch_size(s, name, world_size, accumulation) for name, s in data.streams.items()}

    if data.synthetic is not None:
        def open_synthetic(name: str, state: dict | None):
            return SyntheticStream(data.synthetic, model_config, sizes[name], rank, world_size,
                                   seed=f"{config.seed}:{name}", state=state)

        return StreamBatches(list(data.streams), open_synthetic, accumulation)

    from emu2.data.sequence import SequenceConfig
    from emu2.data.shards import Augmentation, ShardDataset, make_dataloader

    sequence = SequenceConfig(n_query=model_config.n_query, v_query=model_config.v_query,
                              image_size=model_config.vision_config.image_size, max_length=data.max_length,
                              **data.sequence)
    sources = {name: _sources(config, name, s) for name, s in data.streams.items()}

    augmentation = Augmentation(**data.augmentation) if data.augmentation is not None else None

    def open_shards(name: str, state: dict | None):
        dataset = ShardDataset(sources[name], tokenizer, sequence, seed=config.seed,
                               shuffle_buffer=data.shuffle_buffer, rank=rank, world_size=world_size,
                               augmentation=augmentation)
        return make_dataloader(dataset, sizes[name], tokenizer.pad_token_id, num_workers=data.num_workers,
                               state=state, pin_memory=torch.cuda.is_available(),
                               pack_length=data.max_length if data.packing else None)

    return StreamBatches(list(data.streams), open_shards, accumulation)


def _sources(config: TrainConfig, name: str, stream: StreamSection) -> list:
    from emu2.data.mixing import Source, sources_from_manifest

    root = config.data.root
    out = []
    for i, s in enumerate(stream.sources):
        if s.urls is None:
            (found,) = sources_from_manifest(root, config.data.split, weights={s.kind: s.weight})
            urls = found.urls
        else:
            urls = s.urls if root is None or "://" in s.urls or os.path.isabs(s.urls) else os.path.join(root, s.urls)
        out.append(Source(f"{name}.{i}.{s.kind}", s.kind, urls, s.weight))
    return out


class SyntheticStream:
    """Random sequences ``<s> ([IMG] <image>*Q [/IMG])*k text </s>`` with text targets and regressed images.

    Sample ``i`` depends only on (seed, i), and micro-step ``m`` of rank ``r`` holds samples
    ``m*G + r*b ... m*G + r*b + b - 1`` (G = b x ranks): a run on N ranks sees the same global batches as a
    single process accumulating N micro-batches. Lengths vary (seq_len/2 .. seq_len) so padding and token
    counting matter.
    """

    def __init__(self, synthetic: SyntheticSection, model_config, batch_size: int, rank: int, world_size: int,
                 seed: str, state: dict | None = None):
        self.synthetic, self.batch_size, self.rank, self.world_size = synthetic, batch_size, rank, world_size
        self.n_query, self.image_size = model_config.n_query, model_config.vision_config.image_size
        self.image_token = model_config.image_token_id
        self.boi, self.eoi = model_config.boi_token_id, model_config.eoi_token_id
        text = model_config.text_config
        self.pad = text.pad_token_id  # text ids are drawn below it: the tokenizer's pieces
        self.bos, self.eos = text.bos_token_id, text.eos_token_id
        self.seed = int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16)  # < 2^32: seed * 1e6 + i fits int64
        self.micro_step = int((state or {}).get("micro_step", 0))
        vision = 2 + self.n_query
        if synthetic.seq_len < 3 + synthetic.images * vision:
            raise ValueError(f"data.synthetic.seq_len={synthetic.seq_len} cannot hold {synthetic.images} image(s) of "
                             f"{self.n_query} embeddings plus text")

    def sample(self, index: int) -> Sample:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        s = self.synthetic
        length = int(torch.randint(s.seq_len // 2, s.seq_len + 1, (1,), generator=g))
        visual = [self.boi, *[self.image_token] * self.n_query, self.eoi] * s.images
        text_len = max(1, length - 2 - len(visual))
        text = torch.randint(3, self.pad, (text_len,), generator=g).tolist()  # 0-2: unk, bos, eos
        ids = torch.tensor([self.bos, *visual, *text, self.eos])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[1 + len(visual):] = ids[1 + len(visual):]
        images = [torch.randn(3, self.image_size, self.image_size, generator=g) for _ in range(s.images)]
        return Sample(ids, labels, images, [s.regress] * s.images, [], [], "synthetic", self.image_size)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            first = (self.micro_step * self.world_size + self.rank) * self.batch_size
            batch = collate([self.sample(first + j) for j in range(self.batch_size)], self.pad, self.image_size)
            self.micro_step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step}
