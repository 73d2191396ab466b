"""The one record type every benchmark reader produces, and loading its images and video frames."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


@dataclass
class EvalRecord:
    """One evaluation item. Fields a benchmark does not have keep their defaults.

    id        unique within the benchmark (question id, annotation id, ...), always a string
    question  the question / referring expression
    answers   ground truth: the annotators' answers (VQA: usually 10), one answer (GQA, video QA), or the option
              letter ("B") for multiple choice
    images    image files, in the order the prompt's image placeholders use them
    video     a video file or a folder of extracted frames (`load_frames`)
    options   multiple-choice option texts, lettered A, B, ... in order
    box       ground-truth box (x1, y1, x2, y2) in pixels (referring expressions)
    label     binary label (Hateful Memes: 1 = hateful)
    text      free text that comes with the item: a meme's overlaid text, a caption, a generation prompt
    meta      anything else the source file has that a report may want (question type, size, subject, ...)
    """

    id: str
    question: str = ""
    answers: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    video: Path | None = None
    options: list[str] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    label: int | None = None
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def require_file(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a Path, or a FileNotFoundError that names what was expected there and how to get it."""
    path = Path(path)
    if not path.is_file():
        message = f"{what} not found: expected a file at {path}"
        raise FileNotFoundError(message + (f". {hint}" if hint else ""))
    return path


def require_dir(path: str | Path, what: str, hint: str = "") -> Path:
    """``path`` as a Path, or a FileNotFoundError naming the folder that was expected."""
    path = Path(path)
    if not path.is_dir():
        message = f"{what} not found: expected a folder at {path}"
        raise FileNotFoundError(message + (f". {hint}" if hint else ""))
    return path


def read_json(path: str | Path, what: str, hint: str = "") -> Any:
    """Parse a JSON file, with errors that name the file."""
    path = require_file(path, what, hint)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} at {path} is not valid JSON: {error}") from error


def read_jsonl(path: str | Path, what: str, hint: str = "") -> list[dict]:
    """Parse a JSON-lines file (blank lines skipped), with errors that name the file and line."""
    path = require_file(path, what, hint)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{what} at {path}, line {number}, is not valid JSON: {error}") from error
    return rows


def resolve_media_path(path: Path, suffixes: Sequence[str]) -> Path:
    """``path`` itself if it exists, else the first ``path + suffix`` that does (ids often lack the extension)."""
    if path.exists():
        return path
    for suffix in suffixes:
        candidate = path.with_name(path.name + suffix)
        if candidate.exists():
            return candidate
    tried = ", ".join(path.name + s for s in suffixes)
    raise FileNotFoundError(f"media file not found: expected {path} (also tried {tried} in {path.parent}); "
                            "check the image/video folder passed to the dataset reader")


def load_images(record: EvalRecord) -> list[Image.Image]:
    """The record's images as RGB PIL images, in placeholder order."""
    images = []
    for path in record.images:
        with Image.open(resolve_media_path(Path(path), IMAGE_SUFFIXES)) as image:
            images.append(image.convert("RGB"))
    return images


def uniform_frame_indices(num_total: int, num_frames: int) -> list[int]:
    """Indices of ``num_frames`` frames spread uniformly over ``num_total``: the middle of equal segments.

    Appendix D: "16 frames are uniformly sampled". Fewer frames than asked for are all used once each.
    """
    if num_total <= 0:
        raise ValueError("the video has no frames")
    if num_total <= num_frames:
        return list(range(num_total))
    return [int((i + 0.5) * num_total / num_frames) for i in range(num_frames)]


def load_frames(record: EvalRecord, num_frames: int = 16) -> list[Image.Image]:
    """``num_frames`` uniformly sampled RGB frames of the record's video.

    ``record.video`` may be a folder of extracted frames (sorted by file name) or a video file; decoding a file
    needs PyAV (``pip install av``).
    """
    if record.video is None:
        raise ValueError(f"record {record.id} has no video")
    path = resolve_media_path(Path(record.video), VIDEO_SUFFIXES)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"the frame folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        frames = []
        for index in uniform_frame_indices(len(files), num_frames):
            with Image.open(files[index]) as image:
                frames.append(image.convert("RGB"))
        return frames
    return _decode_video(path, num_frames)


def _decode_video(path: Path, num_frames: int) -> list[Image.Image]:
    try:
        import av
    except ImportError as error:
        raise ImportError(f"decoding {path} needs PyAV: `pip install av`, or extract the frames into a folder "
                          f"named like the video ({path.with_suffix('')}/) and point the reader at it") from error
    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    return [decoded[i].convert("RGB") for i in uniform_frame_indices(len(decoded), num_frames)]
