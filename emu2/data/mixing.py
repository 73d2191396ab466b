"""Sources, shard lists, worker/rank splitting and weighted mixing: the deterministic order of the data stream.

Everything here decides *which raw sample comes next*; nothing decodes. The order is a pure function of the
seed, the sources, the rank/world size and the dataloader worker, so a stream can be resumed by replaying the
recorded number of samples consumed per source (`MixedStream.state_dict`).
"""

from __future__ import annotations

import glob
import os
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import braceexpand


@dataclass
class Source:
    """One set of shards holding samples of one kind, and its mixing weight.

    ``urls``: a path, a glob (``data/pair-*.tar``), a brace list (``data/pair-{000000..000009}.tar``) or a list
    of those. ``weight``: relative probability that the next sample comes from this source.
    """

    name: str
    kind: str
    urls: str | list[str]
    weight: float = 1.0


def expand_urls(urls: str | list[str]) -> list[str]:
    """Brace lists and globs -> the sorted, de-duplicated list of shard paths (raises when nothing matches)."""
    patterns = [urls] if isinstance(urls, str) else list(urls)
    found: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if any(c in url for c in "*?[") and "://" not in url and not url.startswith("pipe:"):
                found.extend(sorted(glob.glob(os.path.expanduser(url))))
            else:
                found.append(url)
    shards = sorted(dict.fromkeys(found))
    if not shards:
        raise FileNotFoundError(f"no shards match {urls!r}; give a path, a glob or a brace list of .tar files")
    return shards


@dataclass(frozen=True)
class StreamPosition:
    """Who reads: global worker ``index`` of ``count`` (rank-major: rank * num_workers + dataloader worker)."""

    index: int = 0
    count: int = 1


def source_stream(source: Source, read_shard: Callable[[str], Iterator[dict]], position: StreamPosition, seed: int,
                  repeat: bool, shuffle_buffer: int) -> Iterator[dict]:
    """Raw samples of one source for one reader, shuffled, tagged with ``__epoch__``.

    Shards are shuffled per epoch (same order for every reader), then split by reader: reader i takes shards
    i, i + count, ... When there are fewer shards than readers, every reader reads all shards and keeps every
    count-th sample instead (same partition, more reading). Readers' parts are disjoint and together complete.
    """
    shards = expand_urls(source.urls)
    rng = random.Random(f"{seed}:{source.name}:shuffle:{position.index}")

    def epochs() -> Iterator[dict]:
        epoch = 0
        while True:
            order = list(shards)
            random.Random(f"{seed}:{source.name}:shards:{epoch}").shuffle(order)
            by_shard = len(order) >= position.count
            mine = order[position.index::position.count] if by_shard else order
            seen = 0
            index = 0
            for shard in mine:
                for sample in read_shard(shard):
                    if not by_shard:
                        index += 1
                        if (index - 1) % position.count != position.index:
                            continue
                    sample["__epoch__"] = epoch
                    seen += 1
                    yield sample
            epoch += 1
            if not repeat or seen == 0:
                return

    return shuffled(epochs(), shuffle_buffer, rng)


def shuffled(items: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``buffer_size`` items (webdataset-style, deterministic per rng)."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        k = rng.randrange(buffer_size)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


class MixedStream:
    """Interleave several source streams, drawing the source of each sample by weight.

    The draw for step t depends only on (seed, reader, t), so the stream is resumed from
    ``{"step": t, "consumed": {source: n}}`` by fast-forwarding each source by its n samples. An exhausted
    source (``repeat=False``) drops out and the remaining weights are renormalised.
    """

    def __init__(self, sources: list[Source], open_stream: Callable[[Source], Iterator[dict]], seed: int,
                 position: StreamPosition, state: dict | None = None):
        if not sources:
            raise ValueError("mixing needs at least one source")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if any(s.weight < 0 for s in sources) or sum(s.weight for s in sources) <= 0:
            raise ValueError(f"source weights must be >= 0 with a positive sum, got {[s.weight for s in sources]}")
        self.sources, self.seed, self.position = sources, seed, position
        state = state or {}
        unknown = set(state.get("consumed", {})) - set(names)
        if unknown:
            raise ValueError(f"the saved data state names sources {sorted(unknown)} that are not configured {names}")
        self.step = int(state.get("step", 0))
        self.consumed = Counter({n: int(state.get("consumed", {}).get(n, 0)) for n in names})
        self._streams = []
        for source in sources:
            stream = open_stream(source)
            # fast-forward: replay without decoding (a restored run continues exactly where the saved one was)
            for _ in islice(stream, self.consumed[source.name]):
                pass
            self._streams.append(stream)
        self._active = [s.weight > 0 for s in sources]

    def state_dict(self) -> dict:
        return {"step": self.step, "consumed": dict(self.consumed)}

    def _draw(self) -> int:
        u = random.Random(f"{self.seed}:mix:{self.position.index}:{self.step}").random()
        total = sum(s.weight for s, a in zip(self.sources, self._active) if a)
        acc = 0.0
        last = 0
        for i, (source, active) in enumerate(zip(self.sources, self._active)):
            if not active:
                continue
            acc += source.weight / total
            last = i
            if u < acc:
                return i
        return last

    def __iter__(self) -> Iterator[tuple[Source, dict]]:
        while any(self._active):
            i = self._draw()
            try:
                sample = next(self._streams[i])
            except StopIteration:
                self._active[i] = False
                continue
            self.step += 1
            self.consumed[self.sources[i].name] += 1
            yield self.sources[i], sample


def sources_from_manifest(path: str | os.PathLike, split: str = "train",
                          weights: dict[str, float] | None = None) -> list[Source]:
    """The sources of one split of a dataset manifest (``dataset.json``, as `emu2.data.shapes` writes it).

    ``weights``: kind -> mixing weight; kinds left out are not used. Default: every kind, weight 1.
    """
    import json

    path = os.fspath(path)
    manifest_path = os.path.join(path, "dataset.json") if os.path.isdir(path) else path
    with open(manifest_path) as f:
        manifest = json.load(f)
    root = os.path.dirname(os.path.abspath(manifest_path))
    if split not in manifest["splits"]:
        raise KeyError(f"{manifest_path} has splits {sorted(manifest['splits'])}, not {split!r}")
    kinds = manifest["splits"][split]
    unknown = set(weights or {}) - set(kinds)
    if unknown:
        raise KeyError(f"split {split!r} of {manifest_path} has no kinds {sorted(unknown)}; it has {sorted(kinds)}")
    return [Source(f"{split}/{kind}", kind, os.path.join(root, entry["urls"]), (weights or {}).get(kind, 1.0))
            for kind, entry in sorted(kinds.items()) if weights is None or kind in weights]
