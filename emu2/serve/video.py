"""Videos for `emu2 chat`, `emu2 ask` and `emu2 serve`: a folder of frames or an animated image -> a few frames
sampled uniformly.

The official demo (``Emu2/demo/frontend``) cuts a video into ``num_frames`` equal segments (8 by default) and keeps
the middle frame of each; the model sees them as one video (``[VIDEO]`` then one frame block per frame). Frames
are read with PIL only: a folder of images (sorted by name, as frame extractors number them) or an animated
GIF/WebP/APNG. Video files (mp4, ...) need a video decoder this project does not depend on: extract the frames
first, e.g. ``ffmpeg -i clip.mp4 frames/%05d.png``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageSequence

DEFAULT_NUM_FRAMES = 8  # the official demo's "Num Video Frames"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VIDEO_FILE_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """Which of ``total`` frames to keep: the middle frame of each of ``num_frames`` equal segments (the official
    demo's rule: segment = total // num_frames, frames segment // 2, segment // 2 + segment, ...), at most
    ``num_frames`` of them; every frame when there are fewer."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame; got num_frames={num_frames}")
    if total <= num_frames:
        return list(range(total))
    segment = total // num_frames
    return list(range(segment // 2, total, segment))[:num_frames]


def load_video_frames(path: str | Path, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Image.Image]:
    """``num_frames`` RGB frames sampled uniformly from a folder of frame images or an animated image file."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
        if not files:
            raise FileNotFoundError(f"no frame images ({', '.join(FRAME_SUFFIXES)}) in the folder {path}")
        return [_rgb(files[i]) for i in sample_indices(len(files), num_frames)]
    if not path.exists():
        raise FileNotFoundError(f"no video at {path}")
    if path.suffix.lower() in VIDEO_FILE_SUFFIXES:
        raise ValueError(f"{path} is a video file, which emu2 does not decode (no video library dependency); "
                         f"extract its frames to a folder first, e.g. `ffmpeg -i {path} frames/%05d.png`, and "
                         "give the folder")
    with Image.open(path) as image:
        return sample_frames(image, num_frames)


def sample_frames(image: Image.Image, num_frames: int = DEFAULT_NUM_FRAMES) -> list[Image.Image]:
    """``num_frames`` RGB frames sampled uniformly (`sample_indices`) from an opened animated image (a still
    image is a one-frame video). The server reads request videos through this too, so both sample alike."""
    keep = set(sample_indices(getattr(image, "n_frames", 1), num_frames))
    return [frame.convert("RGB") for i, frame in enumerate(ImageSequence.Iterator(image)) if i in keep]


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
