"""The shard format: reading WebDataset tar shards, and each kind's records to and from tar members.

Shard layout (one tar member per field, ``<key>.<field>``; keys hold no dots). Images may be ``jpg``, ``jpeg``,
``png`` or ``webp``; numbered images (``0.png``, ``1.png``, ...) are read in numeric order.

| kind                  | members                                                                               |
|-----------------------|---------------------------------------------------------------------------------------|
| `pair`, `text_to_image` | ``jpg``/``png`` image, ``txt`` caption (the img2dataset layout)                     |
| `video_pair`          | ``txt`` caption, frames ``0.jpg`` .. ``K.jpg``                                          |
| `interleaved`         | ``json`` {"texts": [...], "image_text_index": [j per image], "image_position"?, "unscored"?: [j]}, images ``0.jpg``.. |
| `video_interleaved`   | ``json`` {"texts": [...], "clips": [{"frames": n, "text_index": j}], ...}, frames of all clips ``0.jpg``.. |
| `grounded`            | ``jpg``/``png`` image, ``json`` {"caption": str, "objects": [{"span": [s, e], "boxes": [[x1, y1, x2, y2]]}]} |
| `text`                | ``txt``; optional ``context.txt`` (read before it, not scored) and ``json`` {"unscored": [[start, end]]} |
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
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence

from PIL import Image

from emu2.data import kinds as K

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
            unscored = _json(sample).get("unscored", []) if "json" in sample else []
            return K.Text(_text(sample), _text(sample, "context.txt") if "context.txt" in sample else "",
                          tuple((int(a), int(b)) for a, b in unscored))
        value = _json(sample)
        if kind == "interleaved":
            return K.InterleavedDocument(list(value["texts"]), _numbered_images(sample),
                                         [int(j) for j in value["image_text_index"]],
                                         value.get("image_position", "random"),
                                         tuple(int(j) for j in value.get("unscored", [])))
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
        doc = {"unscored": [list(span) for span in record.unscored]} if record.unscored else {}
    elif isinstance(record, K.InterleavedDocument):
        numbered(record.images)
        doc = {"texts": record.texts, "image_text_index": record.image_text_index,
               "image_position": record.image_position, **({"unscored": list(record.unscored)} if record.unscored else {})}
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
