"""What one request may ask of the server, and the only way request images and videos are read (data: and file://
URLs).

Every limit is a field of `ServeLimits` with its help text; `emu2 serve` turns each into a ``--flag``. An image is
checked before it costs memory: the base64 length before decoding, the file size before reading, and the
pixel count from the header before the pixels are decoded (a 10 KB PNG can hold a 50000x50000 image).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from .schemas import APIError
from .video import DEFAULT_NUM_FRAMES, sample_frames, sample_indices

# Decoders we let request bytes reach; PIL's rarer plugins are more attack surface than they are worth here.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
VIDEO_FORMATS = ("GIF", "WEBP", "PNG")  # the animated formats PIL reads (APNG is PNG)


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServeLimits:
    """Per-request limits; a request over one gets a 4xx JSON error naming the limit and its flag."""

    max_images: int = _limit(8, "images in one request (chat messages, or generation inputs and subjects)")
    max_image_pixels: int = _limit(4096 * 4096, "width x height of one input image, read from its header")
    max_image_bytes: int = _limit(16 * 2**20, "bytes of one input image file (after base64 decoding)")
    max_request_bytes: int = _limit(64 * 2**20, "bytes of one request body (413 above)")
    max_videos: int = _limit(4, "videos in one request (chat video_url / video parts)")
    max_video_frames: int = _limit(256, "frames one input video may hold (an animated image's frames, or a "
                                        "video part's frame list), checked before decoding")
    video_frames: int = _limit(DEFAULT_NUM_FRAMES, "frames the model sees of each video, sampled uniformly as "
                                                   "the official demo does (its default 8)")
    max_prompt_tokens: int = _limit(
        2048, "tokens of the prompt the model sees: text plus each image's visual slots (256 per image for "
              "Emu2-Chat, 64 for Emu2/Emu2-Gen)")
    max_tokens: int = _limit(1024, "cap on max_tokens (new tokens of one answer)")
    default_max_tokens: int = _limit(512, "max_tokens when a request gives none (the official demo's 512)")
    max_n: int = _limit(4, "cap on n (answers or images per request)")
    max_num_beams: int = _limit(8, "cap on the num_beams extension")
    max_inference_steps: int = _limit(100, "cap on num_inference_steps of image generation (and of images in "
                                           "chat answers)")
    max_answer_images: int = _limit(4, "cap on the max_images extension: images in one chat answer "
                                       '(modalities ["text", "image"]); also its default')
    max_output_side: int = _limit(2048, "largest width or height of a generated image")
    max_queue: int = _limit(16, "requests waiting for the model beyond those it is running (429 when full)")
    timeout: float = _limit(300.0, "seconds from arrival to the end of a request, queueing included (504 after)")
    max_batch_size: int = _limit(
        16, "chat answers decoded together in one batch (1: one request at a time); beam search and n > 1 run "
            "alone")
    max_batch_tokens: int = _limit(8192, "prompt tokens prefilled together when answers join a batch")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("request limits")
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            group.add_argument(flag, type=type(f.default), default=f.default, dest=f"limit_{f.name}",
                               help=f"{f.metadata['help']} (default: %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeLimits:
        return cls(**{f.name: getattr(args, f"limit_{f.name}") for f in fields(cls)})

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    def inference_steps(self, requested: int | None) -> int:
        """Denoising steps of an image request: ``requested``, or the official 50 capped by the server; a 400
        naming ``--max-inference-steps`` past the cap."""
        steps = requested or min(50, self.max_inference_steps)
        if steps > self.max_inference_steps:
            raise APIError(400, f"num_inference_steps is {steps}, above this server's cap of "
                                f"{self.max_inference_steps} (server limit --max-inference-steps)",
                           "num_inference_steps", "too_many_steps")
        return steps


# ---------------------------------------------------------------------------------------------------- images
_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,", re.IGNORECASE)


def load_image_url(url: str, limits: ServeLimits, allowed_dir: Path | None, param: str) -> Image.Image:
    """A ``data:`` URL (base64) or a ``file://`` URL under ``allowed_dir`` -> RGB PIL image, or a 4xx `APIError`.

    Nothing is fetched from the network: http(s) URLs are refused with a message saying what to send instead.
    """
    return decode_image_bytes(_url_bytes(url, limits, allowed_dir, param, "image"), limits, param)


def load_video_url(url: str, limits: ServeLimits, allowed_dir: Path | None, param: str) -> list[Image.Image]:
    """An animated GIF/WebP/PNG as a ``data:`` or allowed ``file://`` URL -> ``limits.video_frames`` RGB frames
    sampled uniformly (`emu2.serve.video.sample_frames`, the official demo's rule), or a 4xx `APIError`."""
    data = _url_bytes(url, limits, allowed_dir, param, "video")
    try:
        video = _open_within_limits(data, limits, param, VIDEO_FORMATS, "video", "video_too_large")
        width, height = video.size
        total = getattr(video, "n_frames", 1)
        if total > limits.max_video_frames:
            raise APIError(400, f"the video has {total} frames, more than {limits.max_video_frames} (server limit "
                                f"{ServeLimits.flag('max_video_frames')}); send fewer frames", param,
                           "too_many_frames")
        # Sampling decodes every frame of an animated image, so its frames together are held to what the most
        # images one request may hold would cost.
        budget = limits.max_image_pixels * limits.max_images
        if width * height * total > budget:
            raise APIError(400, f"the video's {total} frames of {width}x{height} hold more than {budget} pixels "
                                f"in all (server limits {ServeLimits.flag('max_image_pixels')} x "
                                f"{ServeLimits.flag('max_images')}); send fewer or smaller frames", param,
                           "video_too_large")
        frames = sample_frames(video, limits.video_frames)
    except APIError:
        raise
    except Exception as error:  # noqa: BLE001 - PIL raises many types on bad input, DecompressionBombError too
        raise APIError(400, f"could not decode the video ({type(error).__name__}): send an animated GIF, WebP or "
                            "PNG (this server decodes no mp4 or other video files), or the frames as "
                            '{"type": "video", "video": [image URLs]}', param, "invalid_video") from None
    if not frames:
        raise APIError(400, "the video holds no frames", param, "empty_video")
    return frames


def load_video_frame_urls(urls: list[str], limits: ServeLimits, allowed_dir: Path | None,
                          param: str) -> list[Image.Image]:
    """A video given as its frames' image URLs, in order -> ``limits.video_frames`` of them sampled uniformly as
    the official demo samples a video (only those are decoded), or a 4xx `APIError`."""
    if not urls:
        raise APIError(400, "a video needs at least one frame: the video list is empty", param, "empty_video")
    if len(urls) > limits.max_video_frames:
        raise APIError(400, f"the video has {len(urls)} frames, more than {limits.max_video_frames} (server limit "
                            f"{ServeLimits.flag('max_video_frames')}); send fewer frames", param, "too_many_frames")
    return [load_image_url(urls[k], limits, allowed_dir, f"{param}[{k}]")
            for k in sample_indices(len(urls), limits.video_frames)]


def _url_bytes(url: str, limits: ServeLimits, allowed_dir: Path | None, param: str, what: str) -> bytes:
    if not isinstance(url, str):
        raise APIError(400, f"{what} URL must be a string", param, "invalid_image_url")
    scheme = url[:16].split(":", 1)[0].lower()
    if scheme == "data":
        return _decode_data_url(url, limits, param)
    if scheme == "file":
        return _read_file_url(url, limits, allowed_dir, param)
    raise APIError(400, f"{what} URLs must be data: URLs (data:image/png;base64,...) or file:// URLs under the "
                        "server's --allowed-dir; this server fetches nothing from the network",
                   param, "unsupported_image_url")


def _decode_data_url(url: str, limits: ServeLimits, param: str) -> bytes:
    match = _DATA_URL.match(url[:256])
    if match is None:
        raise APIError(400, "malformed data URL: expected data:image/<format>;base64,<base64 data>",
                       param, "invalid_image_url")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
        raise APIError(400, f"image is larger than {limits.max_image_bytes} bytes "
                            f"(server limit {ServeLimits.flag('max_image_bytes')})", param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "the data URL's base64 payload does not decode (invalid characters or padding)",
                       param, "invalid_base64") from None


def _read_file_url(url: str, limits: ServeLimits, allowed_dir: Path | None, param: str) -> bytes:
    if allowed_dir is None:
        raise APIError(403, "file:// image URLs are disabled on this server: send the image as a data: URL, or "
                            "start the server with --allowed-dir DIR to allow files under DIR",
                       param, "file_urls_disabled")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise APIError(400, "file URLs must look like file:///absolute/path.png (no host, query or fragment)",
                       param, "invalid_image_url")
    raw = unquote(parts.path)
    if "\x00" in raw or ".." in Path(raw).parts:
        raise APIError(403, "file URL paths may not contain '..' components", param, "path_not_allowed")
    root = allowed_dir.resolve()
    path = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        resolved = path.resolve(strict=True)  # follows symlinks: a link pointing outside is caught below
    except (OSError, RuntimeError):
        resolved = None
    if resolved is None or not resolved.is_relative_to(root):
        # One message for "outside" and "missing", so the server does not reveal which files exist elsewhere.
        raise APIError(403, "file URL is not a file under the server's --allowed-dir", param, "path_not_allowed")
    if not resolved.is_file():
        raise APIError(400, "file URL does not name a regular file", param, "invalid_image_url")
    if resolved.stat().st_size > limits.max_image_bytes:
        raise APIError(400, f"image file is larger than {limits.max_image_bytes} bytes "
                            f"(server limit {ServeLimits.flag('max_image_bytes')})", param, "image_too_large")
    return resolved.read_bytes()


def _open_within_limits(data: bytes, limits: ServeLimits, param: str, formats, noun: str, code: str) -> Image.Image:
    """``Image.open`` of file bytes (not yet decoded) after the byte limit, then the header's pixel count against
    the pixel limit (per frame for a video); a 400 `APIError` with ``code`` when either is passed."""
    if len(data) > limits.max_image_bytes:
        raise APIError(400, f"{noun} is larger than {limits.max_image_bytes} bytes "
                            f"(server limit {ServeLimits.flag('max_image_bytes')})", param, code)
    image = Image.open(io.BytesIO(data), formats=formats)
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise APIError(400, f"{noun} is {width}x{height} = {width * height} pixels, more than "
                            f"{limits.max_image_pixels} (server limit {ServeLimits.flag('max_image_pixels')})",
                       param, code)
    return image


def decode_image_bytes(data: bytes, limits: ServeLimits, param: str) -> Image.Image:
    """Image file bytes -> RGB PIL image, checking the pixel count from the header before decoding."""
    try:
        image = _open_within_limits(data, limits, param, IMAGE_FORMATS, "image", "image_too_large")
        image.load()
        return image.convert("RGB")
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(400, f"image has more than {limits.max_image_pixels} pixels "
                            f"(server limit {ServeLimits.flag('max_image_pixels')})", param, "image_too_large") from None
    except Exception as error:  # noqa: BLE001 - PIL raises many types on bad input (OSError, SyntaxError, struct.error, ...)
        raise APIError(400, f"could not decode the image ({type(error).__name__}); send a PNG, JPEG, WEBP, GIF "
                            "or BMP file", param, "invalid_image") from None
