"""Chat answers with images: ``"modalities": ["text", "image"]`` on ``POST /v1/chat/completions``.

The chat model writes the answer with the interleaved loop (`emu2.model.interleaved`): text tokens, and where it
writes ``[IMG]`` (or where the request asks for an image) ``n_query`` regressed visual embeddings, which the
server's visual decoder (``--gen-model``'s, or ``--decoder DIR``) turns into a picture. The answer's content is
then a list of OpenAI content parts in order, the same shape the API takes as input:

    {"type": "text", "text": "A story: "}
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}

Request fields (extensions, beside OpenAI's ``modalities``):

- ``modalities``: ``["text"]`` (the default: a text answer, ``content`` a string) or ``["text", "image"]``;
  any other value is refused, as before;
- ``max_images``: images in one answer (cap: ``--max-answer-images``; default: the cap, or fewer when the model's
  positions cannot hold that many after the prompt and ``max_tokens``);
- ``image_at``: start an image once the answer holds this many text tokens (``[0]``: the answer opens with an
  image), at most ``max_images`` positions, each at most ``max_tokens``;
- ``num_inference_steps`` (default 50, cap ``--max-inference-steps``), ``guidance_scale`` (default 3.0) for the
  decoder; ``seed`` seeds the text sampling and the decoder's noise.

Streaming sends OpenAI chunks: a text delta is ``delta.content`` as a string; a finished image is one chunk whose
``delta.content`` is a list holding one ``image_url`` part. Chunks with an empty delta carry the extension
``"emu2"`` object (ignored by OpenAI clients): ``{"status": "queued", "ahead": k}`` when the request waits for the
model, ``{"status": "running"}`` when it starts, ``{"status": "drawing", "image": i, "step": s, "steps": n}``
after each denoising step of image i (1-based).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import processing as P
from .chat import ChatPrompt, DecodingSettings
from .generation import DrawingCancelled, drawing_progress, png_base64
from .limits import ServeLimits
from .queue import CancelOnEvent
from .schemas import APIError

# The values of ``modalities`` this server honours, and whether each asks for images.
OUTPUT_MODALITIES = {frozenset({"text"}): False, frozenset({"text", "image"}): True}
IMAGE_FIELDS = ("max_images", "image_at", "num_inference_steps", "guidance_scale")


def wants_images(request, has_decoder: bool) -> bool:
    """Whether the chat request opts in to images in the answer; a 400 for a value the server cannot honour.

    Cheap (no model work): runs on the event loop.
    """
    modalities = request.modalities
    chosen = OUTPUT_MODALITIES.get(frozenset(modalities)) if modalities is not None else False
    if chosen is None or (modalities is not None and len(set(modalities)) != len(modalities)):
        raise APIError(400, f"'modalities' is not supported with the value {modalities!r}: this server does not "
                            'do output modalities other than text and image; send ["text"] or ["text", "image"]',
                       "modalities", "unsupported_parameter")
    if not chosen:
        given = [name for name in IMAGE_FIELDS if getattr(request, name) is not None]
        if given:
            raise APIError(400, f"{given[0]} is about images in the answer: add \"modalities\": [\"text\", "
                                "\"image\"] to the request", given[0], "invalid_parameter")
        return False
    if not has_decoder:
        raise APIError(400, "this server cannot draw images in chat answers: it has no visual decoder (start it "
                            "with --gen-model DIR or --decoder DIR), so send modalities [\"text\"]",
                       "modalities", "no_image_decoder")
    if request.grounding:
        raise APIError(400, "grounding answers are text with box tokens: drop grounding or modalities image",
                       "grounding", "invalid_parameter")
    return True


@dataclass
class ImageAnswerSettings:
    """How a chat answer draws its images."""

    max_images: int
    image_at: tuple[int, ...] = ()
    num_inference_steps: int = 50
    guidance_scale: float = 3.0


@dataclass
class InterleavedAnswer:
    """One answer: ``parts`` its OpenAI content parts in order, ``num_tokens`` the positions generated (each
    image counts its ``[IMG]``, ``n_query`` slots and ``[/IMG]``)."""

    parts: list[dict]
    finish_reason: str
    num_tokens: int


class InterleavedChat:
    """Answers of one chat `Emu2Pipeline` with images drawn by one visual decoder."""

    def __init__(self, pipeline, decoder):
        self.pipeline, self.decoder = pipeline, decoder
        width = pipeline.model.project_down.out_features
        unet = getattr(decoder, "unet", None)
        expected = getattr(getattr(unet, "config", None), "cross_attention_dim", width)
        if expected != width:
            raise ValueError(f"the visual decoder takes {expected}-wide embeddings but the chat model regresses "
                             f"{width}-wide ones: give a decoder trained for this model (--decoder DIR)")
        if hasattr(decoder, "set_progress_bar_config"):
            decoder.set_progress_bar_config(disable=True)

    @property
    def positions(self) -> int | None:
        return getattr(self.pipeline.model.config.text_config, "max_position_embeddings", None)

    # ------------------------------------------------------------------------------------------ checks
    def settings(self, request, prompt: ChatPrompt, decoding: DecodingSettings,
                 limits: ServeLimits) -> ImageAnswerSettings:
        """The request's image settings checked against the limits and the model's positions (400s)."""
        slots = self.pipeline.model.config.n_query + 2  # [IMG], the visual slots, [/IMG]
        max_images = request.max_images
        if max_images is None:  # as many as the cap allows and the model's positions hold
            room = (self.positions or 1 << 62) - prompt.num_tokens - decoding.max_new_tokens - 1
            max_images = max(0, min(limits.max_answer_images, room // slots))
        if max_images > limits.max_answer_images:
            raise APIError(400, f"max_images is {max_images}, above this server's cap of {limits.max_answer_images}"
                                " (server limit --max-answer-images)", "max_images", "max_images_too_large")
        image_at = tuple(sorted(set(request.image_at or ())))
        if len(image_at) > max_images:
            raise APIError(400, f"image_at asks for {len(image_at)} images but max_images is {max_images}",
                           "image_at", "too_many_images")
        if image_at and image_at[-1] > decoding.max_new_tokens:
            raise APIError(400, f"image_at {image_at[-1]} is past the answer's max_tokens "
                                f"({decoding.max_new_tokens}): no image would be drawn there", "image_at",
                           "invalid_image_at")
        steps = limits.inference_steps(request.num_inference_steps)
        if decoding.num_beams != 1:
            raise APIError(400, "answers with images are decoded greedily or by sampling: drop num_beams",
                           "num_beams", "invalid_parameter")
        longest = prompt.num_tokens + decoding.max_new_tokens + 1 + max_images * slots
        if self.positions is not None and longest > self.positions:
            raise APIError(400, f"the prompt ({prompt.num_tokens} tokens) + max_tokens ({decoding.max_new_tokens})"
                                f" + max_images ({max_images}) x {slots} image positions = {longest} is more than "
                                f"the model's {self.positions} positions: lower max_tokens or max_images",
                           "max_images", "context_length_exceeded")
        guidance = 3.0 if request.guidance_scale is None else request.guidance_scale
        return ImageAnswerSettings(max_images, image_at, steps, guidance)

    # ------------------------------------------------------------------------------------------ answers
    def answer(self, prompt: ChatPrompt, decoding: DecodingSettings, drawing: ImageAnswerSettings,
               cancel: threading.Event | None = None,
               on_event: Callable[[str, object], None] | None = None) -> list[InterleavedAnswer]:
        """``decoding.n`` answers with images (a batch of the same prompt; n > 1 needs sampling).

        ``on_event(kind, value)`` gets ``("text", delta)``, ``("image", part)`` and ``("status", progress)`` as
        they come (used for streaming, where n is 1).
        """
        emit = on_event or (lambda kind, value: None)
        cancel = cancel or threading.Event()
        drawn = [0]
        on_step = drawing_progress(cancel, emit, drawing.num_inference_steps, lambda: drawn[0] + 1)
        seed = decoding.seed
        generator = torch.Generator(self.pipeline.device).manual_seed(seed) if seed is not None else None
        noise = torch.Generator().manual_seed(seed) if seed is not None else None
        kwargs = {"temperature": decoding.temperature or 1.0, "top_p": decoding.top_p,
                  "top_k": decoding.top_k} if decoding.sampling else {}
        events = self.pipeline.stream_interleaved(
            [_prompt_items(prompt)] * decoding.n, decoder=self.decoder, max_images=drawing.max_images,
            max_new_tokens=decoding.max_new_tokens, do_sample=decoding.sampling, stop=list(decoding.stop),
            force_image_at=list(drawing.image_at), generator=generator,
            stopping_criteria=[CancelOnEvent(cancel)],
            decoder_kwargs={"num_inference_steps": drawing.num_inference_steps,
                            "guidance_scale": drawing.guidance_scale, "generator": noise,
                            "callback_on_step_end": on_step}, **kwargs)
        parts: list[list[dict]] = [[] for _ in range(decoding.n)]
        sequences = None
        emit("status", {"status": "running"})
        try:
            while True:
                try:
                    row, part = next(events)
                except StopIteration as done:
                    sequences = done.value
                    break
                if isinstance(part, str):
                    emit("text", part)
                    if parts[row] and parts[row][-1]["type"] == "text":
                        parts[row][-1]["text"] += part
                    else:
                        parts[row].append({"type": "text", "text": part})
                else:
                    drawn[0] += 1
                    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                      + png_base64(part.image)}}
                    emit("image", image)
                    parts[row].append(image)
        except DrawingCancelled:
            pass  # the client left or the deadline passed: nobody reads what was made so far
        answers = []
        for row, content in enumerate(parts):
            sequence = sequences[row] if sequences else None
            reason = "length" if sequence is not None and sequence.finish_reason == "length" else "stop"
            answers.append(InterleavedAnswer(_trimmed(content), reason,
                                             len(sequence.token_ids) if sequence is not None else 0))
        return answers


_VISUAL = re.compile(re.escape(P.IMAGE_PLACEHOLDER) + "|" + re.escape(P.VIDEO_TOKEN) + "(?:"
                     + re.escape(P.VIDEO_PLACEHOLDER) + ")+")


def _prompt_items(prompt: ChatPrompt) -> list:
    """The chat prompt as the official interleaved list: its text split at each image's placeholder and at each
    video ("[VIDEO]" and its frame placeholders, which become the list of its frames)."""
    images, frames = iter(prompt.images), iter(prompt.frames)
    items: list = []
    start = 0
    for match in _VISUAL.finditer(prompt.text):
        items.append(prompt.text[start:match.start()])
        if match.group() == P.IMAGE_PLACEHOLDER:
            items.append(next(images))
        else:
            items.append([next(frames) for _ in range(match.group().count(P.VIDEO_PLACEHOLDER))])
        start = match.end()
    items.append(prompt.text[start:])
    return [item for item in items if not (isinstance(item, str) and item == "")]


def _trimmed(parts: list[dict]) -> list[dict]:
    """Parts with the answer's outer whitespace stripped (as text answers are) and empty text parts dropped."""
    if parts and parts[0]["type"] == "text":
        parts[0]["text"] = parts[0]["text"].lstrip()
    if parts and parts[-1]["type"] == "text":
        parts[-1]["text"] = parts[-1]["text"].rstrip()
    return [p for p in parts if p["type"] != "text" or p["text"].strip()]
