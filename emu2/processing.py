"""Tokens, placeholders, the chat template and box coordinates: how Emu2 writes multimodal input as text.

This is the one place that knows the official sequence format (official-format sections 4-5). Training data,
evaluation prompts and the server all build their token sequences through here.

Placeholders used in prompt strings:
  ``[<IMG_PLH>]`` one image  -> ``[IMG]`` + ``<image>`` x n_query + ``[/IMG]``
  ``[<VID_PLH>]`` one frame  -> ``[IMG]`` + ``[gIMG]`` x v_query + ``[/IMG]`` (``[gIMG]`` is the frame slot)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where pixels are made: the CLI reads this module's names for its --help
    import torch

IMAGE_PLACEHOLDER = "[<IMG_PLH>]"
VIDEO_PLACEHOLDER = "[<VID_PLH>]"
BOI, EOI = "[IMG]", "[/IMG]"
IMAGE_TOKEN = "<image>"
FRAME_TOKEN = "[gIMG]"
VIDEO_TOKEN = "[VIDEO]"
VIDEO_END = "[/VIDEO]"  # only a marker in interleaved input lists; never reaches the text (official behaviour)
PAD_TOKEN = "[PAD]"
USER, ASSISTANT = "[USER]", "[ASSISTANT]"
GROUNDING, PHRASE, PHRASE_END, OBJECT, OBJECT_END = "<grounding>", "<phrase>", "</phrase>", "<object>", "</object>"
NUM_PATCH_INDEX_TOKENS = 257
# Coordinates are quantised to 0..COORD_BINS (the official README: "coordinates run from 0 to 224"); the
# vocabulary holds 257 index tokens of which 225 are used this way.
COORD_BINS = 224

# Official order of `additional_special_tokens`: ids 32001.. follow from it (official-format section 4).
SPECIAL_TOKENS: tuple[str, ...] = (
    BOI, EOI, IMAGE_TOKEN, FRAME_TOKEN, "[/gIMG]", "[EOC]", VIDEO_TOKEN, GROUNDING, PHRASE, PHRASE_END,
    OBJECT, OBJECT_END, "</delimiter_of_multi_objects/>", "<REC>",
    *(f"<patch_index_{k:04d}>" for k in range(NUM_PATCH_INDEX_TOKENS)),
)
INSTRUCT_TOKENS: tuple[str, str] = (USER, ASSISTANT)

# Paper appendix B.1: two system messages for the two kinds of instruction data.
CHAT_SYSTEM_MESSAGE = "You are a helpful assistant, dedicated to delivering comprehensive and meticulous responses."
SHORT_ANSWER_SYSTEM_MESSAGE = "You are a helpful assistant, dedicated to provide concise and efficient answers."

# Official `EmuModel.generate` / `EmuChatGeneration.forward` decoding defaults (official-format section 6.2), shared
# by the pipeline and the command line (which must not import torch to answer --help).
OFFICIAL_DECODING = {"num_beams": 5, "length_penalty": -1.0, "max_new_tokens": 10}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PromptError(ValueError):
    """A prompt that does not fit the images, videos or template given with it."""


DEFAULT_TOKENIZER = Path(__file__).parent / "assets" / "llama_tokenizer"  # the LLaMA SentencePiece model
# LLaMA's tokenizer design with 1,024 pieces learned from the shapes world (`emu2.data.shapes.tokenizer`).
SHAPES_TOKENIZER = Path(__file__).parent / "assets" / "shapes_tokenizer"


PRESET_TOKENIZERS = {"shapes": SHAPES_TOKENIZER}  # every other preset: LLaMA's


def preset_tokenizer(preset: str) -> Path:
    """The packaged tokenizer a named preset's vocabulary is sized for."""
    return PRESET_TOKENIZERS.get(preset, DEFAULT_TOKENIZER)


def load_tokenizer(path: str | Path = DEFAULT_TOKENIZER, instruct: bool = False):
    """The LLaMA tokenizer (or one built the same way, as the shapes world's) with Emu2's special tokens.

    Special tokens strip the whitespace on both sides, as the official slow tokenizer (transformers 4.31) did,
    so ids match the official ones (`tests/test_official_parity.py`). ``instruct`` adds [USER]/[ASSISTANT]
    (Emu2-Chat). A directory that already holds our saved tokenizer (with the tokens) is loaded as is. The
    default is the LLaMA tokenizer shipped with the package (no download).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), legacy=True)
    add_emu2_tokens(tokenizer, instruct, source=path)
    tokenizer.padding_side = "left"  # official: left padding for batched generation
    tokenizer.truncation_side = "left"
    return tokenizer


def add_emu2_tokens(tokenizer, instruct: bool, source: object = "the tokenizer") -> None:
    """Add Emu2's special tokens (and [PAD]) in the official order, and [USER]/[ASSISTANT] if ``instruct``;
    the ones already there are kept. A tokenizer holding only some of the base tokens is an error."""
    from transformers import AddedToken

    wanted = [*SPECIAL_TOKENS, *(INSTRUCT_TOKENS if instruct else ())]
    vocab = tokenizer.get_vocab()  # builds a dict each call: once, not per token
    missing = [t for t in wanted if t not in vocab]
    if not missing:
        return
    if len(missing) != len(wanted) and missing != list(INSTRUCT_TOKENS):
        raise PromptError(f"{source} has only some of the Emu2 special tokens; missing {missing[:5]}")

    def tok(s: str):
        return AddedToken(s, lstrip=True, rstrip=True, special=True, normalized=False)

    extra = {"additional_special_tokens": [tok(t) for t in missing]}
    if tokenizer.pad_token is None:
        extra["pad_token"] = tok(PAD_TOKEN)
    tokenizer.add_special_tokens(extra, replace_extra_special_tokens=False)


def expand_placeholders(text: str, n_query: int, v_query: int) -> str:
    """Replace every image/frame placeholder by its token block."""
    image_block = BOI + IMAGE_TOKEN * n_query + EOI
    frame_block = BOI + FRAME_TOKEN * v_query + EOI
    return text.replace(IMAGE_PLACEHOLDER, image_block).replace(VIDEO_PLACEHOLDER, frame_block)


@dataclass
class InterleavedPrompt:
    """An interleaved input flattened to one prompt string and the visuals its placeholders stand for."""

    text: str  # with [<IMG_PLH>] / [<VID_PLH>] placeholders
    images: list[Image.Image]
    frames: list[Image.Image]


def flatten_interleaved(items: Sequence) -> InterleavedPrompt:
    """The official input list: strings, PIL images, and videos as lists of frames (or "[VIDEO]" ... "[/VIDEO]").

    Strings are concatenated with no separator. An image adds ``[<IMG_PLH>]``. A list/tuple of images is one
    video: "[VIDEO]" then one ``[<VID_PLH>]`` per frame. Inside "[VIDEO]" ... "[/VIDEO]" images are frames.
    """
    if isinstance(items, (str, Image.Image)):
        items = [items]
    text, images, frames, in_video = [], [], [], False
    for item in items:
        if isinstance(item, str):
            if item == VIDEO_TOKEN:
                in_video = True
                text.append(item)
            elif item == VIDEO_END:
                in_video = False
            else:
                text.append(item)
        elif isinstance(item, Image.Image):
            if in_video:
                frames.append(item)
                text.append(VIDEO_PLACEHOLDER)
            else:
                images.append(item)
                text.append(IMAGE_PLACEHOLDER)
        elif _is_video(item):
            text.append(VIDEO_TOKEN + VIDEO_PLACEHOLDER * len(item))
            frames.extend(item)
        else:
            raise PromptError(
                f"interleaved input items must be str, PIL.Image or a non-empty list of PIL images (a video); "
                f"got {type(item).__name__}"
            )
    return InterleavedPrompt("".join(text), images, frames)


def _is_video(item) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and all(isinstance(f, Image.Image) for f in item)


def check_placeholder_counts(text: str, num_images: int, num_frames: int = 0) -> None:
    """Raise a clear error when a prompt's placeholders do not match the visuals given."""
    n_img, n_vid = text.count(IMAGE_PLACEHOLDER), text.count(VIDEO_PLACEHOLDER)
    if n_img != num_images or n_vid != num_frames:
        raise PromptError(
            f"the prompt has {n_img} image placeholder(s) {IMAGE_PLACEHOLDER} and {n_vid} video-frame placeholder(s) "
            f"{VIDEO_PLACEHOLDER}, but {num_images} image(s) and {num_frames} frame(s) were given; "
            "put one placeholder where each image/frame goes"
        )


CHAT_TEMPLATES = ("native", "hf")


def chat_prompt(messages: Sequence[str], system: str | None = CHAT_SYSTEM_MESSAGE, grounding: bool = False,
                template: str = "native") -> str:
    """An Emu2-Chat prompt for alternating user/assistant turns (official-format section 5).

    ``messages`` has odd length, starting and ending with a user turn. ``template``:
      - "native" (official `EmuChatGeneration`):
        ``<system> [USER]: u1 [ASSISTANT]: a1</s>[USER]: u2 [ASSISTANT]:`` (+ ``<grounding>`` when grounding);
      - "hf" (the Hugging Face hub remote code's ``build_input_ids``): ``<system>[USER]: u1[ASSISTANT]:``, no
        spaces, one user turn, no grounding flag; the hub code's system message is empty, so pass ``system=None``
        (or "") to reproduce its prompts.
    """
    if template not in CHAT_TEMPLATES:
        raise PromptError(f"unknown chat template {template!r}; expected one of {CHAT_TEMPLATES}")
    if len(messages) % 2 != 1:
        raise PromptError(f"chat needs an odd number of messages (user, assistant, ..., user); got {len(messages)}")
    if template == "hf":
        if len(messages) != 1 or grounding:
            raise PromptError("the Hugging Face remote-code template holds one user turn and no grounding flag; "
                              "use template='native' for conversations or grounding")
        return f"{system or ''}{USER}: {messages[0]}{ASSISTANT}:"
    parts = [system or "", f" {USER}: ", messages[0]]
    for i in range(1, len(messages), 2):
        parts += [f" {ASSISTANT}: ", messages[i], f"</s>{USER}: ", messages[i + 1]]
    parts.append(f" {ASSISTANT}:")
    if grounding:
        parts.append(GROUNDING)
    return "".join(parts)


# ----------------------------------------------------------------------------------------------- images
def preprocess_image(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> normalised pixels ``(3, size, size) float32``.

    Official preprocessing: bicubic resize to a square (aspect ratio not kept), scale to [0, 1], CLIP mean/std.
    """
    if not isinstance(image, Image.Image):
        raise PromptError(f"expected a PIL image, got {type(image).__name__}")
    import torch

    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def preprocess_images(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """A list of PIL images -> ``(N, 3, size, size) float32`` (``(0, 3, size, size)`` when empty)."""
    import torch

    if not images:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess_image(im, size) for im in images])


def pixels_to_pil(pixels: torch.Tensor) -> Image.Image:
    """Undo ``preprocess_image``: ``(3, H, W)`` normalised pixels -> PIL RGB image."""
    import torch

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    array = ((pixels.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(array)


# ------------------------------------------------------------------------------------------------ boxes
_PATCH_RE = re.compile(r"<patch_index_(\d{4})>")
MULTI_OBJECT_DELIMITER = "</delimiter_of_multi_objects/>"
_GROUNDED_RE = re.compile(
    r"<phrase>(?P<phrase>.*?)</phrase>\s*<object>(?P<coords>(?:\s*(?:<patch_index_\d{4}>|"
    + re.escape(MULTI_OBJECT_DELIMITER) + r"))+)\s*</object>",
    re.DOTALL,
)


def _coordinate(index: str) -> float:
    """A coordinate token's index -> fraction of the image side; the 32 tokens past 224 clamp to the edge."""
    return min(int(index), COORD_BINS) / COORD_BINS


def coordinate_token(value: float, extent: float) -> str:
    """One coordinate (pixels, 0..extent) -> ``<patch_index_k>``, k = round(value / extent * 224)."""
    k = int(round(min(max(value / extent, 0.0), 1.0) * COORD_BINS))
    return f"<patch_index_{k:04d}>"


def box_to_tokens(box: Sequence[float], width: float, height: float) -> str:
    """Pixel box (x1, y1, x2, y2) -> ``<object>`` + four coordinate tokens + ``</object>``."""
    x1, y1, x2, y2 = box
    if not (x2 >= x1 and y2 >= y1):
        raise PromptError(f"box must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; got {tuple(box)}")
    coords = (coordinate_token(x1, width), coordinate_token(y1, height),
              coordinate_token(x2, width), coordinate_token(y2, height))
    return OBJECT + "".join(coords) + OBJECT_END


def grounded_phrase(phrase: str, box: Sequence[float], width: float, height: float) -> str:
    """``<phrase>a man</phrase><object>...</object>``: a phrase and its box."""
    return f"{PHRASE}{phrase}{PHRASE_END}" + box_to_tokens(box, width, height)


def tokens_to_boxes(text: str, width: float = 1.0, height: float = 1.0) -> list[tuple[str, tuple[float, ...]]]:
    """Parse ``<phrase>..</phrase><object>boxes</object>`` spans back to (phrase, pixel box) pairs.

    An object holds one box (four coordinate tokens) or several joined by ``</delimiter_of_multi_objects/>``
    (the official special token, as our grounded data writes them); each box gives one pair, in order. Boxes
    come back in the units of ``width``/``height`` (default: fractions of the image); coordinate tokens past
    ``<patch_index_0224>`` clamp to the image edge. A box without exactly four coordinates is skipped.
    """
    found = []
    for match in _GROUNDED_RE.finditer(text):
        phrase = match.group("phrase").strip()
        for part in match.group("coords").split(MULTI_OBJECT_DELIMITER):
            ks = _PATCH_RE.findall(part)
            if len(ks) != 4:
                continue
            x1, y1, x2, y2 = (_coordinate(k) for k in ks)
            found.append((phrase, (x1 * width, y1 * height, x2 * width, y2 * height)))
    return found


def parse_box(text: str, width: float = 1.0, height: float = 1.0) -> tuple[float, ...] | None:
    """The first four coordinate tokens in ``text`` as a box (for answers without a phrase), or None.

    Tokens past ``<patch_index_0224>`` clamp to the image edge."""
    ks = _PATCH_RE.findall(text)[:4]
    if len(ks) < 4:
        return None
    x1, y1, x2, y2 = (_coordinate(k) for k in ks)
    return (x1 * width, y1 * height, x2 * width, y2 * height)
