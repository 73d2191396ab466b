"""Converters from the public formats of the paper's data to our shard layouts (`emu2.data.records`).

| function                   | input                                                         | kind written          |
|----------------------------|---------------------------------------------------------------|-----------------------|
| `convert_pairs`            | LAION/CapsFusion-style jsonl, csv/tsv or parquet of (image, caption) | `pair` / `text_to_image` |
| `convert_mmc4`             | MMC4 jsonl documents (text_list, image_info/matched_text_index) | `interleaved`       |
| `convert_grit`             | GRIT/Kosmos-2 jsonl (caption, noun_chunks with normalised boxes) | `grounded` / `grounded_generation` |
| `convert_llava`            | LLaVA chat json/jsonl (conversations from human/gpt, "<image>") | `chat`              |
| `convert_instructpix2pix`  | InstructPix2Pix folders (prompt.json + *_0/*_1 images) or jsonl  | `edit`              |

Images must be local files (paths relative to ``image_root``, or ``file://``): nothing here downloads. Rows with
remote URLs, missing or unreadable images are skipped and counted. Fetch web images with img2dataset first
(its output already is the `pair` layout). Image bytes are copied as they are (PNG/JPEG/WebP) or re-encoded as PNG.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import webdataset as wds
from PIL import Image

from emu2 import processing as P
from emu2.data import kinds as K
from emu2.data.records import encode_record

_TAR = {"mtime": 0, "user": "emu2", "group": "emu2", "mode": 0o444}
IMAGE_KEYS = ("image", "path", "file", "filepath", "url", "URL", "image_url")
CAPTION_KEYS = ("caption", "text", "TEXT", "capsfusion", "caption_text")


class _Skip(Exception):
    """A row that cannot be converted; the message names the stats counter."""


class _Writer:
    """ShardWriter with deterministic tar members and a skip counter."""

    def __init__(self, out_dir: str | Path, kind: str, shard_size: int):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.pattern = str(Path(out_dir) / f"{kind}-%06d.tar")
        self.writer = wds.ShardWriter(self.pattern, maxcount=shard_size, verbose=0, **_TAR)
        self.stats: Counter = Counter()

    def write(self, record: K.Record) -> None:
        self.writer.write(encode_record(record, f"{self.stats['written']:09d}"))
        self.stats["written"] += 1

    def close(self) -> dict:
        shards = self.writer.shard
        self.writer.close()
        return {"written": self.stats.pop("written", 0), "skipped": dict(self.stats),
                "shards": [self.pattern % i for i in range(shards)]}


def read_rows(path: str | Path) -> Iterator[dict]:
    """Rows of a jsonl, json (a list), csv, tsv or parquet file (parquet needs pyarrow)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exn:
            raise ImportError(f"reading {path} needs pyarrow (pip install pyarrow), or export it to jsonl/csv") from exn
        for batch in pq.ParquetFile(path).iter_batches():
            yield from batch.to_pylist()
    elif suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a json list of rows")
        yield from rows
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield {"__bad_json__": True}


def _first(row: dict, keys, given: str | None) -> object:
    if given is not None:
        return row.get(given)
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def load_image_bytes(value: object, root: str | Path | None) -> bytes:
    """Encoded bytes of a local image (path, ``file://`` URL, relative to ``root``); raises _Skip otherwise."""
    if not isinstance(value, str) or not value:
        raise _Skip("no_image")
    if value.startswith(("http://", "https://", "s3://", "gs://")):
        raise _Skip("remote_image")
    path = Path(value.removeprefix("file://"))
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    try:
        data = path.read_bytes()
    except OSError:
        raise _Skip("missing_image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.load()
            if fmt in ("PNG", "JPEG", "WEBP"):
                return data
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception:  # noqa: BLE001 -- PIL raises many kinds of errors on broken files; all mean "skip it"
        raise _Skip("bad_image")


def _run(rows: Iterator[dict], writer: _Writer, convert) -> dict:
    for row in rows:
        try:
            if row.get("__bad_json__"):
                raise _Skip("bad_json")
            for record in convert(row):
                writer.write(record)
        except _Skip as skip:
            writer.stats[str(skip)] += 1
    return writer.close()


# ------------------------------------------------------------------------------------------------- pairs
def convert_pairs(table: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                  image_key: str | None = None, caption_key: str | None = None, kind: str = "pair",
                  shard_size: int = 10000) -> dict:
    """(image, caption) rows -> `pair` (or ``kind="text_to_image"``) shards ``out_dir/<kind>-000000.tar``.

    Columns default to the first present of IMAGE_KEYS / CAPTION_KEYS (LAION: URL/TEXT, CapsFusion:
    image_url/capsfusion). Relative image paths are taken from ``image_root`` (default: the table's folder).
    Returns {"written", "skipped": {reason: n}, "shards"}.
    """
    if kind not in ("pair", "text_to_image"):
        raise ValueError(f"kind must be 'pair' or 'text_to_image', got {kind!r}")
    root = image_root if image_root is not None else Path(table).parent
    cls = K.ImageTextPair if kind == "pair" else K.TextToImage

    def convert(row):
        text = _first(row, CAPTION_KEYS, caption_key)
        if not isinstance(text, str) or not text.strip():
            raise _Skip("no_caption")
        image = load_image_bytes(_first(row, IMAGE_KEYS, image_key), root)
        yield cls(image=image, text=text.strip()) if kind == "pair" else cls(text=text.strip(), image=image)

    return _run(read_rows(table), _Writer(out_dir, kind, shard_size), convert)


# -------------------------------------------------------------------------------------------------- MMC4
def convert_mmc4(jsonl: str | Path, out_dir: str | Path, image_root: str | Path, shard_size: int = 10000) -> dict:
    """MMC4 documents -> `interleaved` shards.

    Each line: {"text_list": [sentences], "image_info": [{"image_name": file under image_root,
    "matched_text_index": j}, ...]}. Missing images are dropped from their document (counted as
    ``missing_image``); documents left without images are skipped (``no_images``).
    """
    writer = _Writer(out_dir, "interleaved", shard_size)

    def convert(row):
        texts = row.get("text_list")
        if not isinstance(texts, list) or not texts:
            raise _Skip("no_text")
        images, index = [], []
        for info in row.get("image_info") or []:
            try:
                j = int(info["matched_text_index"])
                if not 0 <= j < len(texts):
                    raise _Skip("bad_text_index")
                images.append(load_image_bytes(info.get("image_name") or info.get("path"), image_root))
                index.append(j)
            except _Skip as skip:
                writer.stats[str(skip)] += 1
            except (KeyError, TypeError, ValueError):
                writer.stats["bad_image_info"] += 1
        if not images:
            raise _Skip("no_images")
        yield K.InterleavedDocument([str(t) for t in texts], images, index)

    return _run(read_rows(jsonl), writer, convert)


# -------------------------------------------------------------------------------------------------- GRIT
def convert_grit(jsonl: str | Path, out_dir: str | Path, image_root: str | Path, kind: str = "grounded",
                 use_ref_exps: bool = False, shard_size: int = 10000) -> dict:
    """GRIT / Kosmos-2 grounded captions -> `grounded` (or ``kind="grounded_generation"``) shards.

    Each line: {"caption", "noun_chunks": [[start, end, x1, y1, x2, y2, score], ...], "key" or "image"}; boxes
    normalised to [0, 1] (pixel boxes are normalised with the row's "width"/"height"). The image is
    ``image_root/<image>`` or ``image_root/<key>.jpg``. Chunks with the same span become one multi-box object.
    """
    if kind not in ("grounded", "grounded_generation"):
        raise ValueError(f"kind must be 'grounded' or 'grounded_generation', got {kind!r}")

    def convert(row):
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption:
            raise _Skip("no_caption")
        chunks = list(row.get("noun_chunks") or []) + (list(row.get("ref_exps") or []) if use_ref_exps else [])
        spans: dict[tuple[int, int], list] = {}
        try:
            width, height = float(row.get("width") or 1), float(row.get("height") or 1)
            for chunk in chunks:
                start, end, x1, y1, x2, y2 = (float(v) for v in chunk[:6])
                box = (x1, y1, x2, y2)
                if max(box) > 1.0:
                    box = (x1 / width, y1 / height, x2 / width, y2 / height)
                if not (0 <= int(start) < int(end) <= len(caption)) or not (box[2] >= box[0] and box[3] >= box[1]):
                    raise ValueError
                spans.setdefault((int(start), int(end)), []).append(tuple(min(max(v, 0.0), 1.0) for v in box))
        except (TypeError, ValueError):
            raise _Skip("bad_box")
        if not spans:
            raise _Skip("no_objects")
        objects = [K.GroundedObject(s, e, boxes) for (s, e), boxes in sorted(spans.items())]
        name = row.get("image") or row.get("path") or (f"{row['key']}.jpg" if row.get("key") else None)
        image = load_image_bytes(name, image_root)
        if kind == "grounded":
            yield K.GroundedPair(image, caption, objects)
        else:
            yield K.GroundedGeneration(image, caption, objects)

    return _run(read_rows(jsonl), _Writer(out_dir, kind, shard_size), convert)


# ------------------------------------------------------------------------------------------------- LLaVA
def convert_llava(path: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                  system: str | None = None, shard_size: int = 10000) -> dict:
    """LLaVA-style conversations -> `chat` shards.

    Each item: {"image": file or [files] (optional), "conversations": [{"from": "human"|"gpt", "value"}...]}.
    "<image>" in a human turn becomes ``[<IMG_PLH>]`` (an image given without a marker goes before the first
    question). A leading assistant turn and a trailing user turn are dropped. ``system``: the system message
    (None: the chat one; `processing.SHORT_ANSWER_SYSTEM_MESSAGE` for academic short-answer data, paper B.1).
    Video items are skipped (``video``).
    """

    def convert(row):
        if row.get("video"):
            raise _Skip("video")
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise _Skip("no_conversations")
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
        messages, expected = [], "user"
        for turn in turns:
            role = roles.get(str(turn.get("from", "")).lower())
            if role is None:
                raise _Skip("bad_role")
            if role != expected:
                if not messages and role == "assistant":
                    continue
                raise _Skip("roles_not_alternating")
            messages.append(str(turn.get("value", "")))
            expected = "assistant" if role == "user" else "user"
        if len(messages) % 2:
            messages = messages[:-1]
        if not messages:
            raise _Skip("no_conversations")
        files = row.get("image") or []
        files = [files] if isinstance(files, str) else list(files)
        for k in range(0, len(messages), 2):
            messages[k] = messages[k].replace("<image>\n", "<image>").replace("\n<image>", "<image>")
            messages[k] = messages[k].replace("<image>", P.IMAGE_PLACEHOLDER)
        markers = sum(m.count(P.IMAGE_PLACEHOLDER) for m in messages[::2])
        if markers == 0 and files:
            messages[0] = P.IMAGE_PLACEHOLDER * len(files) + messages[0]
        elif markers != len(files):
            raise _Skip("image_count_mismatch")
        images = [load_image_bytes(f, image_root) for f in files]
        yield K.Conversation(messages, images, system=system)

    return _run(read_rows(path), _Writer(out_dir, "chat", shard_size), convert)


# ---------------------------------------------------------------------------------------- InstructPix2Pix
def convert_instructpix2pix(source: str | Path, out_dir: str | Path, image_root: str | Path | None = None,
                            shard_size: int = 10000) -> dict:
    """Edit triplets -> `edit` shards.

    ``source`` is either the released folder layout (one folder per prompt with ``prompt.json`` holding
    "edit", and image pairs ``<seed>_0.jpg`` (input) / ``<seed>_1.jpg`` (edited)), or a jsonl/csv of rows with
    input ("input_image"/"input"/"source"), instruction ("edit_prompt"/"edit"/"instruction") and edited
    ("edited_image"/"output"/"edited") image paths.
    """
    source = Path(source)
    writer = _Writer(out_dir, "edit", shard_size)
    if source.is_dir():
        def rows():
            for folder in sorted(p for p in source.rglob("prompt.json")):
                try:
                    prompt = json.loads(folder.read_text(encoding="utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    yield {"__bad_json__": True}
                    continue
                for first in sorted(folder.parent.glob("*_0.*")):
                    second = next(iter(sorted(folder.parent.glob(first.name.rsplit("_0.", 1)[0] + "_1.*"))), None)
                    yield {"input": str(first), "edit": prompt.get("edit"), "output": str(second) if second else None}
        root = None
        iterator = rows()
    else:
        root = image_root if image_root is not None else source.parent
        iterator = read_rows(source)

    def convert(row):
        instruction = _first(row, ("edit_prompt", "edit", "instruction"), None)
        if not isinstance(instruction, str) or not instruction.strip():
            raise _Skip("no_instruction")
        before = load_image_bytes(_first(row, ("input_image", "input", "source"), None), root)
        after = load_image_bytes(_first(row, ("edited_image", "output", "edited"), None), root)
        yield K.ImageEdit(before, instruction.strip(), after)

    return _run(iterator, writer, convert)


CONVERTERS = {"pairs": convert_pairs, "mmc4": convert_mmc4, "grit": convert_grit, "llava": convert_llava,
              "instructpix2pix": convert_instructpix2pix}
