"""WebDataset shards -> `Sample`s: the shard layout of each kind, decoding, and the training dataset.

Shard layout (one tar member per field, ``<key>.<field>``; keys hold no dots). Images may be ``jpg``, ``jpeg``,
``png`` or ``webp``; numbered images (``0.png``, ``1.png``, ...) are read in numeric order.

| kind                  | members                                                                               |
|-----------------------|---------------------------------------------------------------------------------------|
| `pair`, `text_to_image` | ``jpg``/``png`` image, ``txt`` caption (the img2dataset layout)                     |
| `video_pair`          | ``txt`` caption, frames ``0.jpg`` .. ``K.jpg``                                          |
| `interleaved`         | ``json`` {"texts": [...], "image_text_index": [j per image], "image_position"?}, images ``0.jpg``.. |
| `video_interleaved`   | ``json`` {"texts": [...], "clips": [{"frames": n, "text_index": j}], ...}, frames of all clips ``0.jpg``.. |
| `grounded`            | ``jpg``/``png`` image, ``json`` {"caption": str, "objects": [{"span": [s, e], "boxes": [[x1, y1, x2, y2]]}]} |
| `text`                | ``txt``                                                                               |
| `chat`                | ``json`` {"messages": [user, assistant, ...], "system"?}, images ``0.jpg``.. then video frames |
| `edit`                | ``json`` {"instruction": str}, ``0.jpg`` source, ``1.jpg`` edited                       |
| `grounded_generation` | as `grounded`, plus optional object images ``0.png``.. (one per object)                 |

Boxes are fractions of the image. In chat messages ``[<IMG_PLH>]`` marks an image and ``[VIDEO]`` the video.
A ``json`` may carry a "meta" field for bookkeeping; readers ignore it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from emu2.data import kinds as K
from emu2.data.mixing import MixedStream, Source, StreamPosition, source_stream
from emu2.data.sequence import Sample, SequenceConfig, SequenceError, collate

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_NUMBERED = re.compile(r"^(\d+)\.(jpg|jpeg|png|webp)$")
log = logging.getLogger(__name__)


class DataError(ValueError):
    """A sample whose bytes or fields do not fit its kind's layout; ``reason`` names the stats counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------------------------ reading
class _EndRecordingTarInfo(tarfile.TarInfo):
    """A TarInfo that records, on the archive, why reading ended. Past the first member, tarfile ends an archive
    without a word at the first header it cannot read: the all-zero block of a complete archive, but also no bytes
    at all (a shard cut at a member boundary), part of a block (cut inside a header) or a block that fails its
    checksum (a corrupt header in mid-shard, all the samples after it lost). The reason tells these apart, for
    plain and compressed shards alike (tarfile decompresses before it reads headers)."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exn:
            tar.end_reason = exn
            raise


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members, never samples


def _members(stream, name: str, damage: list) -> Iterator[dict]:
    """``{"fname", "data"}`` of each regular member, as webdataset's tar iterator gives them. What stops it early
    goes to ``damage`` as (stats key, message): the read error, or ``skipped.truncated_shard`` /
    ``skipped.corrupt_shard`` if the archive did not end at its end-of-archive block (raised instead, either would
    lose the sample that webdataset's grouping holds until the members run out)."""
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndRecordingTarInfo) as tar:
            for info in tar:
                if info.isreg() and not _META.match(info.name):
                    yield {"fname": info.name, "data": tar.extractfile(info).read()}
            reason = getattr(tar, "end_reason", None)
    except Exception as exn:  # noqa: BLE001 -- a truncated/corrupt/unreadable tar: the caller counts it
        damage.append(("read_errors", str(exn)))
        return
    if isinstance(reason, tarfile.InvalidHeaderError):
        damage.append(("skipped.corrupt_shard", f"{name}: a corrupt tar header at byte {tar.offset} ({reason}): "
                                                   "the samples after it are lost"))
    elif isinstance(reason, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        damage.append(("skipped.truncated_shard", f"{name}: the shard ends without the tar end-of-archive block, at "
                                                  f"byte {tar.offset} (cut at a member boundary?): the samples after "
                                                  "the cut are lost"))


def read_shard(url: str, stats: Counter) -> Iterator[dict]:
    """Samples (dicts of member bytes with ``__key__``/``__url__``) of one tar; damage counted, not raised.

    A tar that is truncated inside a member, or unreadable, yields the samples before the damage and counts one
    ``read_errors``. A tar cut exactly at a member boundary, or with a corrupt member header, reads to tarfile as
    a complete shorter archive: how it ended is checked (`_EndRecordingTarInfo`), and it counts one
    ``skipped.truncated_shard`` or ``skipped.corrupt_shard`` (how many samples were lost is unknown).
    """
    import webdataset as wds

    def stop(exn: Exception) -> bool:
        stats["read_errors"] += 1
        return False

    damage: list[tuple[str, str]] = []
    try:
        with wds.gopen(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in _members(stream, url, damage))
            yield from wds.tariterators.group_by_keys(files, handler=stop)
        for key, message in damage:
            stats[key] += 1
            if key != "read_errors":
                log.warning("%s", message)
    except Exception:  # noqa: BLE001 -- a truncated/corrupt tar or a missing file: count it, go to the next shard
        stats["read_errors"] += 1


def _image(data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        return image.convert("RGB")  # forces a full decode: truncated files fail here, not later
    except Exception as exn:
        raise DataError("bad_image", f"cannot decode image: {exn}") from exn


def _json(sample: dict) -> dict:
    if "json" not in sample:
        raise DataError("bad_record", "missing json member")
    try:
        value = json.loads(sample["json"])
    except Exception as exn:
        raise DataError("bad_json", f"invalid json: {exn}") from exn
    if not isinstance(value, dict):
        raise DataError("bad_json", "the json member must hold an object")
    return value


def _text(sample: dict, name: str = "txt") -> str:
    if name not in sample:
        raise DataError("bad_record", f"missing {name} member")
    try:
        return sample[name].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise DataError("bad_text", f"{name} is not utf-8") from exn


def _main_image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return _image(sample[ext])
    raise DataError("bad_record", f"missing image member (one of {IMAGE_EXTENSIONS})")


def _numbered_images(sample: dict) -> list[Image.Image]:
    numbered = sorted((int(m.group(1)), k) for k in sample if (m := _NUMBERED.match(k)))
    if [n for n, _ in numbered] != list(range(len(numbered))):
        raise DataError("bad_record", f"numbered images must run 0..n-1, got {[k for _, k in numbered]}")
    return [_image(sample[k]) for _, k in numbered]


def _objects(value: dict) -> list[K.GroundedObject]:
    try:
        return [K.GroundedObject(int(o["span"][0]), int(o["span"][1]), [tuple(map(float, b)) for b in o["boxes"]])
                for o in value.get("objects", [])]
    except (KeyError, TypeError, ValueError, IndexError) as exn:
        raise DataError("bad_record", f"objects must be [{{'span': [s, e], 'boxes': [[x1, y1, x2, y2]]}}]: {exn}")


def decode_record(kind: str, sample: dict) -> K.Record:
    """One raw shard sample -> the record of its kind (raises `DataError` naming what is wrong)."""
    try:
        if kind in ("pair", "text_to_image"):
            cls = K.ImageTextPair if kind == "pair" else K.TextToImage
            return cls(image=_main_image(sample), text=_text(sample))
        if kind == "video_pair":
            return K.VideoTextPair(frames=_numbered_images(sample), text=_text(sample))
        if kind == "text":
            return K.Text(_text(sample), _text(sample, "context.txt") if "context.txt" in sample else "")
        value = _json(sample)
        if kind == "interleaved":
            return K.InterleavedDocument(list(value["texts"]), _numbered_images(sample),
                                         [int(j) for j in value["image_text_index"]],
                                         value.get("image_position", "random"))
        if kind == "video_interleaved":
            frames, clips, index = _numbered_images(sample), [], []
            for clip in value["clips"]:
                clips.append(frames[sum(len(c) for c in clips):][: int(clip["frames"])])
                index.append(int(clip["text_index"]))
            if sum(len(c) for c in clips) != len(frames):
                raise DataError("bad_record", f"clips declare {sum(int(c['frames']) for c in value['clips'])} "
                                              f"frames but the sample has {len(frames)}")
            return K.VideoDocument(list(value["texts"]), clips, index, value.get("image_position", "random"))
        if kind == "grounded":
            return K.GroundedPair(_main_image(sample), str(value["caption"]), _objects(value))
        if kind == "grounded_generation":
            return K.GroundedGeneration(_main_image(sample), str(value["caption"]), _objects(value),
                                        _numbered_images(sample))
        if kind == "chat":
            messages = [str(m) for m in value["messages"]]
            visuals = _numbered_images(sample)
            n_images = sum(m.count(K.P.IMAGE_PLACEHOLDER) for m in messages)
            return K.Conversation(messages, visuals[:n_images], visuals[n_images:], value.get("system"))
        if kind == "edit":
            visuals = _numbered_images(sample)
            if len(visuals) != 2:
                raise DataError("bad_record", f"an edit sample needs images 0 (source) and 1 (edited), got {len(visuals)}")
            return K.ImageEdit(visuals[0], str(value["instruction"]), visuals[1])
    except (KeyError, TypeError, ValueError) as exn:
        if isinstance(exn, DataError):
            raise
        raise DataError("bad_record", f"{kind} sample {sample.get('__key__')}: {exn!r}") from exn
    raise ValueError(f"unknown sample kind {kind!r}; expected one of {sorted(K.KINDS)}")


# ------------------------------------------------------------------------------------------------ writing
def _image_member(image: Image.Image | bytes) -> tuple[str, bytes]:
    """(extension, bytes): PIL images become PNG; encoded bytes are kept and their format sniffed."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "png", buffer.getvalue()
    data = bytes(image)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", data
    if data[:3] == b"\xff\xd8\xff":
        return "jpg", data
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", data
    raise DataError("bad_image", "image bytes are not PNG, JPEG or WebP")


def encode_record(record: K.Record, key: str, meta: dict | None = None) -> dict:
    """A record -> the webdataset sample dict of its kind's layout (for ShardWriter/TarWriter).

    Images may be PIL images (written as PNG) or already-encoded file bytes (kept as they are).
    ``meta`` goes into the json member's "meta" field.
    """
    if "." in key:
        raise ValueError(f"sample keys must not contain '.', got {key!r} (webdataset splits members at dots)")
    out: dict = {"__key__": key}
    doc: dict = {}

    def numbered(images: Sequence) -> None:
        for i, image in enumerate(images):
            ext, data = _image_member(image)
            out[f"{i}.{ext}"] = data

    def main(image) -> None:
        ext, data = _image_member(image)
        out[ext] = data

    def objects(objs: Sequence[K.GroundedObject]) -> list:
        return [{"span": [o.start, o.end], "boxes": [list(b) for b in o.boxes]} for o in objs]

    if isinstance(record, (K.ImageTextPair, K.TextToImage)):
        main(record.image)
        out["txt"] = record.text
    elif isinstance(record, K.VideoTextPair):
        numbered(record.frames)
        out["txt"] = record.text
    elif isinstance(record, K.Text):
        out["txt"] = record.text
        if record.context:
            out["context.txt"] = record.context
    elif isinstance(record, K.InterleavedDocument):
        numbered(record.images)
        doc = {"texts": record.texts, "image_text_index": record.image_text_index,
               "image_position": record.image_position}
    elif isinstance(record, K.VideoDocument):
        numbered([f for clip in record.clips for f in clip])
        doc = {"texts": record.texts, "image_position": record.image_position,
               "clips": [{"frames": len(c), "text_index": j} for c, j in zip(record.clips, record.clip_text_index)]}
    elif isinstance(record, K.GroundedPair):
        main(record.image)
        doc = {"caption": record.caption, "objects": objects(record.objects)}
    elif isinstance(record, K.GroundedGeneration):
        main(record.image)
        numbered([im for im in record.object_images if im is not None])
        doc = {"caption": record.caption, "objects": objects(record.objects)}
    elif isinstance(record, K.Conversation):
        numbered([*record.images, *record.frames])
        doc = {"messages": record.messages}
        if record.system is not None:
            doc["system"] = record.system
    elif isinstance(record, K.ImageEdit):
        numbered([record.source, record.edited])
        doc = {"instruction": record.instruction}
    else:
        raise TypeError(f"cannot encode {type(record).__name__}; expected one of the records in emu2.data.kinds")
    if meta:
        doc["meta"] = meta
    if doc:
        out["json"] = json.dumps(doc, sort_keys=True, ensure_ascii=False)
    return out


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
    """Batches built inside each worker, tagged with that worker's stream state after the batch."""

    def __init__(self, dataset: ShardDataset, batch_size: int, pad_id: int, drop_last: bool):
        super().__init__()
        self.dataset, self.batch_size, self.pad_id, self.drop_last = dataset, batch_size, pad_id, drop_last

    def __iter__(self):
        batch: list[Sample] = []
        worker = 0
        for sample, worker in self.dataset._samples():
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._tagged(batch, worker)
                batch = []
        if batch and not self.drop_last:
            yield self._tagged(batch, worker)

    def _tagged(self, batch: list[Sample], worker: int):
        state = {**self.dataset._stream.state_dict(), "stats": dict(self.dataset.stats)}
        return collate(batch, self.pad_id, self.dataset.config.image_size), [s.kind for s in batch], worker, state


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
                    pin_memory: bool = False) -> ResumableLoader:
    """A DataLoader over ``dataset`` yielding `collate` batches, resumable from ``state``.

    ``pad_id``: the tokenizer's pad id ([PAD] = 32000). Restoring needs the same seed, world size and
    ``num_workers`` as when the state was saved.
    """
    if state is not None:
        dataset.load_state_dict(state, num_workers=max(num_workers, 1))
    loader = DataLoader(
        _Batches(dataset, batch_size, pad_id, drop_last), batch_size=None, num_workers=num_workers,
        collate_fn=_unbatched, prefetch_factor=prefetch_factor if num_workers else None, pin_memory=pin_memory,
    )
    return ResumableLoader(dataset, loader, max(num_workers, 1), state)
