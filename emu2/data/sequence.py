"""The training sequence layout: where text, image blocks and labels go in one multimodal sample.

Every sample kind (`emu2.data.kinds`) is written through `SequenceBuilder`: it appends text pieces (each marked
as a text target or as context), image blocks and videos, tokenizes the whole string *once* with the Emu2
tokenizer (so training ids equal inference ids, `emu2.processing` being the one place that knows the tokens),
and turns character spans into labels with the tokenizer's offsets.

Layout (paper appendix A.1, official-format section 5):
  ``<s>`` ... ``</s>``; an image is ``[IMG]`` + n_query x ``<image>`` + ``[/IMG]``; a video is ``[VIDEO]`` and one
  ``[IMG]`` + v_query x ``[gIMG]`` + ``[/IMG]`` block per frame.
Labels (HF convention: the model shifts): the token id where the token is a text target, -100 elsewhere.
Image slots (``<image>``/``[gIMG]``) and the structural markers ``[IMG]``, ``[/IMG]``, ``[VIDEO]`` are never text
targets: the official ``generate_image`` appends ``[IMG]`` itself, and the hidden states at ``[IMG]`` and at the
slots are used for regressing visual embeddings instead (which images are regressed is ``image_is_target``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from emu2 import processing as P

IGNORE_INDEX = -100


class SequenceError(ValueError):
    """A record that cannot be laid out as a training sequence (bad fields, wrong tokenizer, ...)."""


@dataclass
class SequenceConfig:
    """How samples are laid out. Defaults are the paper's values (section cited per field)."""

    n_query: int = 64  # visual embeddings per image: 8x8 pooled grid in pretraining (2.3.1), 256 for Chat
    v_query: int = 64  # per video frame (official-format section 3)
    image_size: int = 448  # encoder input resolution (2.2.2: 448 after the 224 warm-up of stage 1)
    max_length: int = 2048  # LLaMA context; chat data "truncated directly" at 2048 (2.3.1)
    # 1: image-text/video-text pairs, image first, caption loss only, no regression (2.2.2).
    # 2: image before or after its text, text loss + image regression (2.2.2, A.1).
    stage: int = 2
    image_after_text_prob: float = 0.5  # A.1: "placed before or after its text with a probability of 0.5"
    video_frames: int = 8  # A.1: "For each video, we randomly sample 8 frames"
    document_images: int = 8  # A.1: N = 8 images sampled per MMC4 document ...
    document_max_length: int = 1024  # ... into a sub-sequence of L = 1024 tokens
    # A.1: "each phrase before or after its coordinates with a probability of 0.7": the phrase-first order
    # (Kosmos-2's, the one `processing.tokens_to_boxes` parses) is the one drawn with probability 0.7.
    phrase_first_prob: float = 0.7
    chat_video_frames: tuple[int, ...] = (8, 12, 16)  # 2.3.1: frames per chat video drawn from 8, 12, 16
    # Emu2-Gen grounded subject-driven data (2.3.2): entities and box images are randomly dropped; the paper
    # gives no rates, these are ours.
    drop_entity_prob: float = 0.1
    drop_box_prob: float = 0.1

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise SequenceError(f"SequenceConfig.stage must be 1 or 2 (pretraining stage), got {self.stage}")


@dataclass
class Sample:
    """One built training sequence.

    input_ids: (L,) long, ``<s>`` ... ``</s>``. labels: (L,) long, token id on text targets, -100 elsewhere.
    images: (3, S, S) float tensors in the order of the ``<image>`` blocks; image_is_target: regress it or not.
    frames / frame_is_target: the same for ``[gIMG]`` blocks (video frames). kind: the sample kind.
    image_size: S (lets `collate` shape an empty image batch).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    images: list[torch.Tensor]
    image_is_target: list[bool]
    frames: list[torch.Tensor]
    frame_is_target: list[bool]
    kind: str
    image_size: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def has_targets(self) -> bool:
        """Anything to learn from: a text target or a regressed image/frame."""
        return bool((self.labels != IGNORE_INDEX).any()) or any(self.image_is_target) or any(self.frame_is_target)


def collate(samples: Sequence[Sample], pad_id: int, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a list of samples into a batch.

    Returns input_ids (B, L) long, attention_mask (B, L) long, labels (B, L) long (-100 on padding),
    images (N, 3, S, S) float32 (all samples' images in order; (0, 3, S, S) when none), image_is_target (N,)
    bool, frames (M, 3, S, S) float32, frame_is_target (M,) bool.
    """
    if not samples:
        raise SequenceError("collate needs at least one sample")
    size = image_size or max(s.image_size for s in samples)
    length = max(len(s) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : len(s)] = s.input_ids
        labels[i, : len(s)] = s.labels
        attention_mask[i, : len(s)] = 1

    def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(tensors).float() if tensors else torch.zeros(0, 3, size, size)

    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "images": stack([im for s in samples for im in s.images]),
        "image_is_target": torch.tensor([t for s in samples for t in s.image_is_target], dtype=torch.bool),
        "frames": stack([f for s in samples for f in s.frames]),
        "frame_is_target": torch.tensor([t for s in samples for t in s.frame_is_target], dtype=torch.bool),
    }


def draw_box_image(boxes: Sequence[Sequence[float]], size: int) -> Image.Image:
    """The box image of Emu2-Gen's grounded prompt for boxes given as fractions (x1, y1, x2, y2) of the image.

    Drawn by `emu2.data.boxes.draw_box_image` (the official OpenCV outline, reproduced pixel for pixel).
    """
    from .boxes import draw_box_image as draw_pixels

    return draw_pixels([tuple(min(max(float(v), 0.0), 1.0) * (size - 1) for v in box) for box in boxes], size)


# Strings that must never reach the tokenizer from raw data: they would become Emu2 control tokens.
_GROUNDING_TOKENS = (P.GROUNDING, P.PHRASE, P.PHRASE_END, P.OBJECT, P.OBJECT_END, "</delimiter_of_multi_objects/>",
                     "<REC>")
_STRUCTURE_TOKENS = (P.IMAGE_PLACEHOLDER, P.VIDEO_PLACEHOLDER, "<s>", "</s>", P.PAD_TOKEN, P.USER, P.ASSISTANT,
                     P.BOI, P.EOI, P.IMAGE_TOKEN, P.FRAME_TOKEN, "[/gIMG]", "[EOC]", P.VIDEO_TOKEN, P.VIDEO_END)
_STRUCTURE_RE = re.compile("|".join(re.escape(t) for t in _STRUCTURE_TOKENS))
_GROUNDING_RE = re.compile("|".join([*(re.escape(t) for t in _GROUNDING_TOKENS), r"<patch_index_\d{4}>"]))


def clean_text(text: str, keep_placeholders: bool = False, keep_grounding: bool = False) -> str:
    """Remove control strings (special tokens, placeholders, ``</s>``) from raw data text.

    ``keep_placeholders``: image/video placeholders stay (chat data marks images with them).
    ``keep_grounding``: ``<phrase>``/``<object>``/coordinate tokens stay (grounded chat answers).
    """
    def structure(match: re.Match) -> str:
        keep = keep_placeholders and match.group(0) in (P.IMAGE_PLACEHOLDER, P.VIDEO_PLACEHOLDER)
        return match.group(0) if keep else ""

    text = _STRUCTURE_RE.sub(structure, text)
    return text if keep_grounding else _GROUNDING_RE.sub("", text)


@dataclass
class _Ids:
    bos: int
    eos: int
    boi: int
    eoi: int
    image: int
    frame: int
    video: int


def _special_ids(tokenizer) -> _Ids:
    ids = tokenizer.convert_tokens_to_ids([P.BOI, P.EOI, P.IMAGE_TOKEN, P.FRAME_TOKEN, P.VIDEO_TOKEN])
    if tokenizer.unk_token_id in ids:
        raise SequenceError("the tokenizer lacks Emu2's special tokens; load it with emu2.processing.load_tokenizer")
    return _Ids(tokenizer.bos_token_id, tokenizer.eos_token_id, *ids)


@dataclass
class SequenceBuilder:
    """Accumulates one sample's pieces; `finish` tokenizes once and lays out labels and visuals.

    Pieces are concatenated with no separator (as the official input lists are); put spaces in the text.
    """

    tokenizer: object
    config: SequenceConfig
    _parts: list[str] = field(default_factory=list)
    _length: int = 0
    _target_spans: list[tuple[int, int]] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    image_is_target: list[bool] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)
    frame_is_target: list[bool] = field(default_factory=list)

    def _append(self, text: str) -> tuple[int, int]:
        start = self._length
        self._parts.append(text)
        self._length += len(text)
        return start, self._length

    def add_text(self, text: str, target: bool) -> None:
        """Text (already expanded: no placeholders). ``target``: its tokens are supervised."""
        if not text:
            return
        span = self._append(text)
        if target:
            self._target_spans.append(span)

    def add_image(self, image: Image.Image | torch.Tensor, target: bool) -> None:
        """An image block ``[IMG]<image>*n_query[/IMG]``; ``target``: its embeddings are regressed."""
        self.images.append(self._pixels(image))
        self.image_is_target.append(bool(target))
        self._append(P.expand_placeholders(P.IMAGE_PLACEHOLDER, self.config.n_query, self.config.v_query))

    def add_video(self, frames: Sequence[Image.Image | torch.Tensor], target: bool) -> None:
        """``[VIDEO]`` then one ``[IMG][gIMG]*v_query[/IMG]`` block per frame (paper A.1)."""
        if not frames:
            raise SequenceError("a video needs at least one frame")
        for frame in frames:
            self.frames.append(self._pixels(frame))
            self.frame_is_target.append(bool(target))
        text = P.VIDEO_TOKEN + P.VIDEO_PLACEHOLDER * len(frames)
        self._append(P.expand_placeholders(text, self.config.n_query, self.config.v_query))

    def _pixels(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            size = self.config.image_size
            if tuple(image.shape) != (3, size, size):
                raise SequenceError(f"image tensor must be (3, {size}, {size}), got {tuple(image.shape)}")
            return image
        return P.preprocess_image(image, self.config.image_size)

    def finish(self, kind: str, end_is_target: bool, max_length: int | None = None) -> Sample:
        """Tokenize, label, cut to ``max_length`` (default config.max_length) and append ``</s>``.

        ``end_is_target``: the closing ``</s>`` is a text target (when the sample ends a supervised text).
        A cut never splits an image block or a video; the ``</s>`` after a cut is not a target (the text did
        not end there).
        """
        ids_of = _special_ids(self.tokenizer)
        text = "".join(self._parts)
        encoded = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids: list[int] = list(encoded["input_ids"])
        offsets = encoded["offset_mapping"]
        if not ids or ids[0] != ids_of.bos:
            ids, offsets = [ids_of.bos, *ids], [(0, 0), *offsets]
        # A SentencePiece word token carries the space before it: count whitespace before a target as its own.
        spans = []
        for start, end in self._target_spans:
            while start > 0 and text[start - 1].isspace():
                start -= 1
            spans.append((start, end))
        structural = {ids_of.bos, ids_of.boi, ids_of.eoi, ids_of.image, ids_of.frame, ids_of.video}
        labels = [IGNORE_INDEX] * len(ids)
        for i, (token, (start, end)) in enumerate(zip(ids, offsets)):
            if token in structural or end <= start:
                continue
            while start < end - 1 and text[start].isspace():
                start += 1
            if any(s <= start < e for s, e in spans):
                labels[i] = token

        blocks = _visual_blocks(ids, ids_of)
        n_images = sum(kind_ == "image" for kind_, _, _ in blocks)
        n_frames = sum(n for kind_, _, n in blocks if kind_ == "video")
        if n_images != len(self.images) or n_frames != len(self.frames):
            raise SequenceError(
                f"{kind}: the tokenized text has {n_images} image block(s) and {n_frames} frame block(s) but "
                f"{len(self.images)} image(s) and {len(self.frames)} frame(s) were added; raw text must not "
                "contain Emu2 control tokens (use clean_text)"
            )

        limit = min(max_length or self.config.max_length, self.config.max_length)
        truncated = len(ids) + 1 > limit
        if truncated:
            cut = max(limit - 1, 1)
            for _, (start, end), _ in blocks:
                if start < cut < end:
                    cut = start
            ids, labels = ids[:cut], labels[:cut]
            kept_images = sum(1 for k, (s, e), _ in blocks if k == "image" and e <= cut)
            kept_frames = sum(n for k, (s, e), n in blocks if k == "video" and e <= cut)
            del self.images[kept_images:], self.image_is_target[kept_images:]
            del self.frames[kept_frames:], self.frame_is_target[kept_frames:]
        ids.append(ids_of.eos)
        labels.append(ids_of.eos if end_is_target and not truncated else IGNORE_INDEX)
        return Sample(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            images=list(self.images),
            image_is_target=list(self.image_is_target),
            frames=list(self.frames),
            frame_is_target=list(self.frame_is_target),
            kind=kind,
            image_size=self.config.image_size,
        )


def _visual_blocks(ids: list[int], ids_of: _Ids) -> list[tuple[str, tuple[int, int], int]]:
    """Token ranges [start, end) that a cut must not split: ("image", range, 1) or ("video", range, n_frames)."""
    blocks: list[tuple[str, tuple[int, int], int]] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == ids_of.boi and i + 1 < n and ids[i + 1] == ids_of.image:
            end = i + 1
            while end < n and ids[end] == ids_of.image:
                end += 1
            end = end + 1 if end < n and ids[end] == ids_of.eoi else end
            blocks.append(("image", (i, end), 1))
            i = end
        elif ids[i] == ids_of.video:
            end, frames = i + 1, 0
            while end + 1 < n and ids[end] == ids_of.boi and ids[end + 1] == ids_of.frame:
                end += 1
                while end < n and ids[end] == ids_of.frame:
                    end += 1
                end = end + 1 if end < n and ids[end] == ids_of.eoi else end
                frames += 1
            blocks.append(("video", (i, end), frames))
            i = end
        elif ids[i] == ids_of.boi and i + 1 < n and ids[i + 1] == ids_of.frame:
            # a frame block outside [VIDEO] (chat prompts may write frames without it): keep it whole
            end = i + 1
            while end < n and ids[end] == ids_of.frame:
                end += 1
            end = end + 1 if end < n and ids[end] == ids_of.eoi else end
            blocks.append(("video", (i, end), 1))
            i = end
        else:
            i += 1
    return blocks
