"""The sample kinds of Emu2's training data and how each becomes a `Sample` (paper 2.2.1, 2.3, A.1, C.1).

A record is the decoded content of one data sample (PIL images, strings). `build_sample(record, tokenizer,
config, rng)` lays it out with `SequenceBuilder`; all randomness comes from ``rng`` (a `random.Random`), so a
record built twice with equally seeded generators gives the same sample.

| kind                  | record                | layout (stage 2 unless noted)                                         |
|-----------------------|-----------------------|-----------------------------------------------------------------------|
| `pair`                | `ImageTextPair`       | image before/after caption (p=0.5); stage 1: image first, no regression |
| `video_pair`          | `VideoTextPair`       | ``[VIDEO]`` + 8 sampled frames before/after caption                    |
| `interleaved`         | `InterleavedDocument` | MMC4: N=8 images with their sentences, L=1024, each image before/after |
| `video_interleaved`   | `VideoDocument`       | storyboard: clips (``[VIDEO]`` + frames) before/after their sentences   |
| `grounded`            | `GroundedPair`        | image, ``<grounding>``, caption with phrase/box (phrase first p=0.7)    |
| `text`                | `Text`                | language only; an optional unscored ``context`` before the text       |
| `chat`                | `Conversation`        | chat template; only answers and their ``</s>`` supervised              |
| `text_to_image`       | `TextToImage`         | caption then image; only the image regressed                          |
| `edit`                | `ImageEdit`           | source image, instruction, edited image; only the last regressed      |
| `grounded_generation` | `GroundedGeneration`  | ``<grounding>`` caption with phrase + box image + object image, image  |
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image

from emu2 import processing as P
from emu2.data.sequence import (
    Sample,
    SequenceBuilder,
    SequenceConfig,
    SequenceError,
    clean_text,
    draw_box_image,
)

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) as fractions of the image


@dataclass
class ImageTextPair:
    image: Image.Image
    text: str
    kind = "pair"


@dataclass
class VideoTextPair:
    frames: list[Image.Image]
    text: str
    kind = "video_pair"


@dataclass
class InterleavedDocument:
    """MMC4 layout: sentences, images, and for each image the index of its matched sentence.

    ``image_position``: "random" (paper A.1: before or after its sentence, p=0.5), "before" or "after" (for
    documents whose text refers to the image next to it, such as few-shot episodes).
    ``unscored``: indices of ``texts`` the model reads but the loss does not score (a sentence nothing before it
    can predict, e.g. the first answer that uses a made-up word).
    """

    texts: list[str]
    images: list[Image.Image]
    image_text_index: list[int]
    image_position: str = "random"
    unscored: tuple[int, ...] = ()
    kind = "interleaved"


@dataclass
class VideoDocument:
    """Interleaved video-text (YT-Storyboard): clips of frames, each matched to a sentence."""

    texts: list[str]
    clips: list[list[Image.Image]]
    clip_text_index: list[int]
    image_position: str = "random"
    kind = "video_interleaved"


@dataclass
class GroundedObject:
    """A phrase ``caption[start:end]`` and its box(es), fractions of the image."""

    start: int
    end: int
    boxes: list[Box]


@dataclass
class GroundedPair:
    image: Image.Image
    caption: str
    objects: list[GroundedObject]
    kind = "grounded"


@dataclass
class Text:
    """Language-only data. ``context``: text before ``text`` that the loss does not score (the part of a document
    nothing earlier can predict, e.g. the first telling of a list that ``text`` repeats); empty for plain text.
    ``unscored``: ``(start, end)`` character spans of ``text`` that are read but not scored, for such parts
    inside it."""

    text: str
    context: str = ""
    unscored: tuple[tuple[int, int], ...] = ()
    kind = "text"


@dataclass
class Conversation:
    """Alternating user/assistant messages (user first, assistant last).

    Messages mark images with ``[<IMG_PLH>]`` (filled from ``images`` in order) and one video with ``[VIDEO]``
    (filled with frames sampled from ``frames``). ``system``: None -> the chat system message (paper B.1).
    """

    messages: list[str]
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)
    system: str | None = None
    kind = "chat"


@dataclass
class TextToImage:
    text: str
    image: Image.Image
    kind = "text_to_image"


@dataclass
class ImageEdit:
    source: Image.Image
    instruction: str
    edited: Image.Image
    kind = "edit"


@dataclass
class GroundedGeneration:
    """A grounded caption, the whole image, and one subject image per object (None: crop it from the image)."""

    image: Image.Image
    caption: str
    objects: list[GroundedObject]
    object_images: list[Image.Image | None] = field(default_factory=list)
    kind = "grounded_generation"


Record = (ImageTextPair | VideoTextPair | InterleavedDocument | VideoDocument | GroundedPair | Text | Conversation
          | TextToImage | ImageEdit | GroundedGeneration)
KINDS: dict[str, type] = {cls.kind: cls for cls in Record.__args__}


def build_sample(record: Record, tokenizer, config: SequenceConfig, rng: random.Random) -> Sample:
    """Lay out one record as a training `Sample` (see the module table)."""
    builder = _BUILDERS.get(type(record))
    if builder is None:
        raise SequenceError(f"no sequence layout for {type(record).__name__}; expected one of {sorted(KINDS)}")
    return builder(record, SequenceBuilder(tokenizer, config), config, rng)


# ------------------------------------------------------------------------------------------- pretraining
def _visual_after_text(config: SequenceConfig, rng: random.Random, position: str = "random") -> bool:
    if position == "before":
        return False
    if position == "after":
        return True
    if position != "random":
        raise SequenceError(f"image_position must be 'random', 'before' or 'after', got {position!r}")
    # Stage 1 always puts the image first (captioning); stage 2 draws the side (A.1).
    return config.stage == 2 and rng.random() < config.image_after_text_prob


def _sample_frames(frames: Sequence, count: int, rng: random.Random) -> list:
    """``count`` frames drawn at random, kept in time order (A.1: "randomly sample 8 frames")."""
    if len(frames) <= count:
        return list(frames)
    return [frames[i] for i in sorted(rng.sample(range(len(frames)), count))]


def _uniform_frames(frames: Sequence, count: int) -> list:
    """``count`` frames uniformly spaced in time (2.3.1, chat video)."""
    if len(frames) <= count:
        return list(frames)
    step = len(frames) / count
    return [frames[int(step * i + step / 2)] for i in range(count)]


def _build_pair(record: ImageTextPair, b: SequenceBuilder, config: SequenceConfig, rng: random.Random) -> Sample:
    regress = config.stage == 2
    text = clean_text(record.text).strip()
    if _visual_after_text(config, rng):
        b.add_text(text, target=True)
        b.add_image(record.image, target=regress)
    else:
        b.add_image(record.image, target=regress)
        b.add_text(text, target=True)
    return b.finish(record.kind, end_is_target=True)


def _build_video_pair(record: VideoTextPair, b: SequenceBuilder, config: SequenceConfig,
                      rng: random.Random) -> Sample:
    regress = config.stage == 2
    frames = _sample_frames(record.frames, config.video_frames, rng)
    text = clean_text(record.text).strip()
    if _visual_after_text(config, rng):
        b.add_text(text, target=True)
        b.add_video(frames, target=regress)
    else:
        b.add_video(frames, target=regress)
        b.add_text(text, target=True)
    return b.finish(record.kind, end_is_target=True)


def _build_document(texts: Sequence[str], visuals: Sequence, text_index: Sequence[int], position: str,
                    add_visual, b: SequenceBuilder, config: SequenceConfig, rng: random.Random, kind: str,
                    unscored: Sequence[int] = ()) -> Sample:
    """Shared by MMC4 and storyboard documents: N visuals with their sentences, each before/after its text;
    the sentences in ``unscored`` are read, not scored."""
    if len(visuals) != len(text_index):
        raise SequenceError(f"{kind}: {len(visuals)} visuals but {len(text_index)} matched text indices")
    if any(not 0 <= j < len(texts) for j in [*text_index, *unscored]):
        raise SequenceError(f"{kind}: a matched or unscored text index is outside the {len(texts)} sentences")
    order = sorted(range(len(visuals)), key=lambda i: (text_index[i], i))
    first_text = 0
    if len(order) > config.document_images:
        # A.1: sample N images with their sentences; a contiguous run keeps the text between them coherent.
        start = rng.randrange(len(order) - config.document_images + 1)
        order = order[start:start + config.document_images]
        first_text = text_index[order[0]]
    by_text: dict[int, list[int]] = {}
    for i in order:
        by_text.setdefault(text_index[i], []).append(i)
    regress = config.stage == 2
    previous_was_text = False
    for j in range(first_text, len(texts)):
        before, after = [], []
        for i in by_text.get(j, []):
            (after if _visual_after_text(config, rng, position) else before).append(i)
        for i in before:
            add_visual(visuals[i], regress)
            previous_was_text = False
        sentence = clean_text(texts[j]).strip()
        if sentence:
            b.add_text((" " if previous_was_text else "") + sentence, target=j not in unscored)
            previous_was_text = True
        for i in after:
            add_visual(visuals[i], regress)
            previous_was_text = False
    return b.finish(kind, end_is_target=True, max_length=config.document_max_length)


def _build_interleaved(record: InterleavedDocument, b: SequenceBuilder, config: SequenceConfig,
                       rng: random.Random) -> Sample:
    return _build_document(record.texts, record.images, record.image_text_index, record.image_position,
                           lambda im, t: b.add_image(im, target=t), b, config, rng, record.kind, record.unscored)


def _build_video_document(record: VideoDocument, b: SequenceBuilder, config: SequenceConfig,
                          rng: random.Random) -> Sample:
    def add_clip(clip, target):
        b.add_video(_sample_frames(clip, config.video_frames, rng), target=target)

    return _build_document(record.texts, record.clips, record.clip_text_index, record.image_position,
                           add_clip, b, config, rng, record.kind)


def _object_tokens(boxes: Sequence[Box]) -> str:
    """``<object>`` + 4 coordinate tokens per box (several joined by Kosmos-2's delimiter) + ``</object>``."""
    inner = [P.box_to_tokens(box, 1.0, 1.0)[len(P.OBJECT):-len(P.OBJECT_END)] for box in boxes]
    return P.OBJECT + "</delimiter_of_multi_objects/>".join(inner) + P.OBJECT_END


def _checked_objects(caption: str, objects: Sequence[GroundedObject], kind: str) -> list[GroundedObject]:
    """Objects sorted by position, overlapping spans dropped (the first one wins)."""
    kept, last_end = [], -1
    for obj in sorted(objects, key=lambda o: (o.start, o.end)):
        if not (0 <= obj.start < obj.end <= len(caption)) or not obj.boxes:
            raise SequenceError(f"{kind}: object span ({obj.start}, {obj.end}) is outside the caption or has no box")
        if obj.start >= last_end:
            kept.append(obj)
            last_end = obj.end
    return kept


def _build_grounded(record: GroundedPair, b: SequenceBuilder, config: SequenceConfig, rng: random.Random) -> Sample:
    # Kosmos-2 layout: the image first, then <grounding> (an instruction, not a target) and the caption whose
    # phrases carry their boxes. Phrase/box order drawn per object (A.1).
    b.add_image(record.image, target=config.stage == 2)
    b.add_text(P.GROUNDING, target=False)
    parts, cursor = [], 0
    for obj in _checked_objects(record.caption, record.objects, record.kind):
        phrase = clean_text(record.caption[obj.start:obj.end]).strip()
        parts.append(clean_text(record.caption[cursor:obj.start]))
        phrase_tokens = f"{P.PHRASE}{phrase}{P.PHRASE_END}"
        box_tokens = _object_tokens(obj.boxes)
        first = rng.random() < config.phrase_first_prob
        parts.append(phrase_tokens + box_tokens if first else box_tokens + phrase_tokens)
        cursor = obj.end
    parts.append(clean_text(record.caption[cursor:]))
    b.add_text("".join(parts).strip(), target=True)
    return b.finish(record.kind, end_is_target=True)


def _text_parts(text: str, unscored: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
    """``text`` cut at its unscored character spans: (part, scored) in order."""
    parts, cursor = [], 0
    for start, end in sorted((int(a), int(b)) for a, b in unscored):
        if not cursor <= start < end <= len(text):
            raise SequenceError(f"text: unscored span ({start}, {end}) is outside the text or overlaps another")
        parts += [(text[cursor:start], True), (text[start:end], False)]
        cursor = end
    return [*parts, (text[cursor:], True)]


def _build_text(record: Text, b: SequenceBuilder, config: SequenceConfig, rng: random.Random) -> Sample:
    parts = _text_parts(record.text, record.unscored)
    if record.context:  # read, not scored; one space between it and the scored text
        b.add_text(clean_text(record.context).rstrip() + " ", target=False)
        parts[0] = (parts[0][0].lstrip(), parts[0][1])
        parts[-1] = (parts[-1][0].rstrip(), parts[-1][1])
    for part, scored in parts:
        b.add_text(clean_text(part), target=scored)
    return b.finish(record.kind, end_is_target=True)


# ------------------------------------------------------------------------------------------------ chat
def _build_chat(record: Conversation, b: SequenceBuilder, config: SequenceConfig, rng: random.Random) -> Sample:
    if b.tokenizer.convert_tokens_to_ids(P.USER) in (None, b.tokenizer.unk_token_id):
        raise SequenceError("chat samples need [USER]/[ASSISTANT]: load the tokenizer with instruct=True")
    if len(record.messages) < 2 or len(record.messages) % 2:
        raise SequenceError("a conversation needs user/assistant pairs ending with an answer; "
                            f"got {len(record.messages)} messages")
    # User turns keep their image placeholders and the video marker (held as NUL while cleaning, since
    # clean_text removes a literal [VIDEO]); both keep grounding tokens (referring expressions, boxes).
    messages = [
        clean_text(m.replace(P.VIDEO_TOKEN, _VIDEO_MARK), keep_placeholders=True, keep_grounding=True).strip()
        if k % 2 == 0 else clean_text(m, keep_grounding=True).strip()
        for k, m in enumerate(record.messages)
    ]
    n_images = sum(m.count(P.IMAGE_PLACEHOLDER) for m in messages)
    n_videos = sum(m.count(_VIDEO_MARK) for m in messages)
    if n_images != len(record.images) or n_videos > 1 or (n_videos == 1) != bool(record.frames):
        raise SequenceError(f"chat: {n_images} image placeholder(s) for {len(record.images)} image(s) and "
                            f"{n_videos} [VIDEO] marker(s) for {len(record.frames)} frame(s); expected one "
                            "placeholder per image and one marker when frames are given")
    frames = _uniform_frames(record.frames, rng.choice(config.chat_video_frames)) if record.frames else []
    system = P.CHAT_SYSTEM_MESSAGE if record.system is None else record.system

    # The template is processing.chat_prompt's: answer k starts after the prompt of the messages before it.
    full = P.chat_prompt(messages[:-1], system=system) + " " + messages[-1]
    images = iter(record.images)
    cursor = 0
    for k in range(1, len(messages), 2):
        start = full.index(messages[k], len(P.chat_prompt(messages[:k], system=system)))
        _add_chat_context(b, full[cursor:start], images, frames)
        b.add_text(messages[k], target=True)
        cursor = start + len(messages[k])
        if full.startswith("</s>", cursor):  # the </s> closing an answer is supervised with it (2.3.1)
            b.add_text("</s>", target=True)
            cursor += len("</s>")
    _add_chat_context(b, full[cursor:], images, frames)
    return b.finish(record.kind, end_is_target=True)


_VIDEO_MARK = "\0"
_CHAT_VISUAL_RE = re.compile(f"({re.escape(P.IMAGE_PLACEHOLDER)}|{_VIDEO_MARK})")


def _add_chat_context(b: SequenceBuilder, text: str, images, frames: list) -> None:
    """Context text with its images and video (never regressed: Emu2-Chat has only the text loss)."""
    for piece in _CHAT_VISUAL_RE.split(text):
        if piece == P.IMAGE_PLACEHOLDER:
            b.add_image(next(images), target=False)
        elif piece == _VIDEO_MARK:
            b.add_video(frames, target=False)
        else:
            b.add_text(piece, target=False)


# ---------------------------------------------------------------------------------------------- generation
def _build_text_to_image(record: TextToImage, b: SequenceBuilder, config: SequenceConfig,
                         rng: random.Random) -> Sample:
    b.add_text(clean_text(record.text).strip(), target=False)
    b.add_image(record.image, target=True)
    return b.finish(record.kind, end_is_target=False)


def _build_edit(record: ImageEdit, b: SequenceBuilder, config: SequenceConfig, rng: random.Random) -> Sample:
    # C.1: "<s>[IMG]origin[/IMG]instruct editing prompt[IMG]edited[/IMG]</s>"
    b.add_image(record.source, target=False)
    b.add_text(clean_text(record.instruction).strip(), target=False)
    b.add_image(record.edited, target=True)
    return b.finish(record.kind, end_is_target=False)


def _crop(image: Image.Image, box: Box) -> Image.Image:
    w, h = image.size
    x1, y1, x2, y2 = box
    left, top = int(x1 * w), int(y1 * h)
    return image.crop((left, top, max(round(x2 * w), left + 1), max(round(y2 * h), top + 1)))


def _build_grounded_generation(record: GroundedGeneration, b: SequenceBuilder, config: SequenceConfig,
                               rng: random.Random) -> Sample:
    # Official Emu2-Gen prompt: "<grounding>" + caption where each object reads
    # <phrase>p</phrase><object>[box image]</object>[object image]; then the whole image (2.3.2).
    if record.object_images and len(record.object_images) != len(record.objects):
        raise SequenceError(f"grounded_generation: {len(record.objects)} objects but "
                            f"{len(record.object_images)} object images")
    subject = dict(zip(map(id, record.objects), record.object_images or [None] * len(record.objects)))
    b.add_text(P.GROUNDING, target=False)
    cursor = 0
    for obj in _checked_objects(record.caption, record.objects, record.kind):
        b.add_text(clean_text(record.caption[cursor:obj.start]), target=False)
        phrase = clean_text(record.caption[obj.start:obj.end])
        cursor = obj.end
        if rng.random() < config.drop_entity_prob:
            b.add_text(phrase, target=False)
            continue
        b.add_text(f"{P.PHRASE}{phrase.strip()}{P.PHRASE_END}", target=False)
        if rng.random() >= config.drop_box_prob:
            b.add_text(P.OBJECT, target=False)
            b.add_image(draw_box_image(obj.boxes, config.image_size), target=False)
            b.add_text(P.OBJECT_END, target=False)
        image = subject[id(obj)]
        b.add_image(image if image is not None else _crop(record.image, obj.boxes[0]), target=False)
    b.add_text(clean_text(record.caption[cursor:]), target=False)
    b.add_image(record.image, target=True)
    return b.finish(record.kind, end_is_target=False)


_BUILDERS = {
    ImageTextPair: _build_pair,
    VideoTextPair: _build_video_pair,
    InterleavedDocument: _build_interleaved,
    VideoDocument: _build_video_document,
    GroundedPair: _build_grounded,
    Text: _build_text,
    Conversation: _build_chat,
    TextToImage: _build_text_to_image,
    ImageEdit: _build_edit,
    GroundedGeneration: _build_grounded_generation,
}
