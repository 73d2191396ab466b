"""Emu2-Gen behind the server and `emu2 generate`: prompt, images and boxes -> the official input list -> images.

`Emu2GenPipeline` (`emu2.pipelines.gen`) takes the official interleaved list; this module writes that list from
what a request or command line holds:

- text with ``[<IMG_PLH>]`` where each input image goes, or, without placeholders, the images first and then
  the text (the official editing form ``[image, "wearing a red hat on the beach."]``);
- grounded objects (official grounded generation): ``"<grounding>"`` before the text, then per object
  ``"<phrase>a dog</phrase><object>"``, the box drawn on a 448x448 canvas, ``"</object>"`` and the subject
  image when one is given.
"""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .. import processing as P
from .chat import PromptTokenizer

BOX_CANVAS = 448  # the official examples draw boxes on a 448x448 canvas (official README, `draw_box`)


@dataclass
class GroundedObject:
    """An object to place: its phrase, its box (x1, y1, x2, y2 in pixels of the 448x448 canvas), its subject."""

    phrase: str
    box: tuple[float, float, float, float]
    subject: Image.Image | None = None


def check_box(box: Sequence[float], canvas: int = BOX_CANVAS) -> tuple[float, float, float, float]:
    """Raise `PromptError` unless ``box`` is x1, y1, x2, y2 with 0 <= x1 < x2 <= canvas (same for y)."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise P.PromptError(f"a box is four numbers x1, y1, x2, y2; got {box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0 <= x1 < x2 <= canvas and 0 <= y1 < y2 <= canvas):
        raise P.PromptError(f"box {x1:g},{y1:g},{x2:g},{y2:g} must satisfy 0 <= x1 < x2 <= {canvas} and "
                            f"0 <= y1 < y2 <= {canvas} (pixels of the {canvas}x{canvas} layout canvas)")
    return x1, y1, x2, y2


def draw_box(box: Sequence[float], canvas: int = BOX_CANVAS) -> Image.Image:
    """The layout image of one box: a white outline on black, as the official `draw_box` (cv2, 3 px)."""
    from ..data.boxes import draw_box_image

    return draw_box_image([tuple(box)], canvas)


def build_generation_inputs(prompt: str, images: Sequence[Image.Image] = (),
                            objects: Sequence[GroundedObject] = ()) -> list:
    """The official interleaved input for `Emu2GenPipeline` (see the module docstring for the layout)."""
    pieces = prompt.split(P.IMAGE_PLACEHOLDER)
    if len(pieces) > 1:
        if len(pieces) - 1 != len(images):
            raise P.PromptError(f"the prompt has {len(pieces) - 1} {P.IMAGE_PLACEHOLDER} placeholder(s) but "
                                f"{len(images)} image(s) were given; put one placeholder where each image goes")
        items: list = [pieces[0]]
        for image, text in zip(images, pieces[1:]):
            items += [image, text]
    else:
        items = [*images, prompt]
    if objects:
        items.insert(0, P.GROUNDING)
        for obj in objects:
            items += [f"{P.PHRASE}{obj.phrase}{P.PHRASE_END}{P.OBJECT}", draw_box(check_box(obj.box)), P.OBJECT_END]
            if obj.subject is not None:
                items.append(obj.subject)
    return [item for item in items if not (isinstance(item, str) and item == "")] or [""]


class DrawingCancelled(Exception):
    """Raised from the decoder's step callback once the request's cancel event is set: denoising stops there."""


def drawing_progress(cancel: threading.Event, emit: Callable[[str, object], None], steps: int,
                     image: Callable[[], int]):
    """The decoder's ``callback_on_step_end`` for a served request (images of chat answers and of the image
    endpoints alike): after each denoising step it raises `DrawingCancelled` once ``cancel`` is set (the client
    left, or the deadline passed), so a picture nobody waits for stops costing compute at the next step; else it
    reports ``emit("status", {"status": "drawing", "image": image(), "step": s, "steps": steps})`` (1-based)."""

    def on_step(pipe, step, t, tensors):
        if cancel.is_set():
            raise DrawingCancelled
        emit("status", {"status": "drawing", "image": image(), "step": step + 1, "steps": steps})
        return tensors

    return on_step


class ImageGenerator:
    """Sizes, prompt lengths and sampling for one `Emu2GenPipeline`."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.decoder = pipeline.decoder
        self.encoder = pipeline.encoder
        self.prompt_tokenizer = PromptTokenizer(self.encoder.tokenizer, self.encoder.model.config)
        if hasattr(self.decoder, "set_progress_bar_config"):
            self.decoder.set_progress_bar_config(disable=True)

    @property
    def size_multiple(self) -> int:
        """Output sides must be multiples of this (pixels per latent cell)."""
        return int(self.decoder.vae_scale_factor)

    @property
    def default_size(self) -> tuple[int, int]:
        side = int(self.decoder.unet.config.sample_size) * self.size_multiple
        return side, side

    def parse_size(self, size: str | None, max_side: int) -> tuple[int, int]:
        """``"WIDTHxHEIGHT"`` (or None / "auto": the decoder's default) -> (width, height); `PromptError` if bad."""
        if size in (None, "", "auto"):
            return self.default_size
        match = re.fullmatch(r"(\d{1,6})x(\d{1,6})", size.strip())
        if match is None:
            raise P.PromptError(f"size must be WIDTHxHEIGHT such as 1024x1024, or 'auto'; got {size!r}")
        width, height = int(match[1]), int(match[2])
        m = self.size_multiple
        if not (m <= width <= max_side and m <= height <= max_side) or width % m or height % m:
            raise P.PromptError(f"size {width}x{height}: each side must be a multiple of {m} between {m} and "
                                f"{max_side} (server limit --max-output-side)")
        return width, height

    def count_tokens(self, inputs: list) -> int:
        """Prompt tokens the encoder sees, each image's visual slots included."""
        return len(self.prompt_tokenizer(P.flatten_interleaved(inputs).text))

    def usage(self, inputs: list, images: int) -> dict:
        """OpenAI's image ``usage`` for ``inputs`` and ``images`` drawn (`schemas.ImageUsage`)."""
        prompt = self.count_tokens(inputs)
        slots = self.encoder.model.config.n_query
        image_tokens = slots * sum(not isinstance(part, str) for part in inputs)
        return {"input_tokens": prompt, "input_tokens_details": {"text_tokens": prompt - image_tokens,
                                                                 "image_tokens": image_tokens},
                "output_tokens": slots * images, "total_tokens": prompt + slots * images}

    def generate(self, inputs: list, n: int = 1, width: int | None = None, height: int | None = None,
                 num_inference_steps: int = 50, guidance_scale: float = 3.0, seed: int | None = None,
                 cancel: threading.Event | None = None,
                 on_event: Callable[[str, object], None] | None = None) -> list[Image.Image]:
        """``n`` images for ``inputs``; image k's noise comes from ``seed + k`` (random when seed is None).

        ``on_event(kind, value)`` gets ``("status", {"status": "running"})`` first, then per image the drawing
        steps (`drawing_progress`) and ``("image", image)`` when it is done. Once ``cancel`` is set the images
        finished so far are returned (the current one stops at its next denoising step).
        """
        emit = on_event or (lambda kind, value: None)
        cancel = cancel or threading.Event()
        images: list[Image.Image] = []
        on_step = drawing_progress(cancel, emit, num_inference_steps, lambda: len(images) + 1)
        emit("status", {"status": "running"})
        for k in range(n):
            if cancel.is_set():
                break
            generator = torch.Generator().manual_seed((seed + k) % 2**63) if seed is not None else None
            try:
                out = self.pipeline(inputs, height=height, width=width, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, generator=generator,
                                    callback_on_step_end=on_step)
            except DrawingCancelled:
                break
            images.append(out.image)
            emit("image", out.image)
        return images


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
