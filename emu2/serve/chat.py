"""Chatting with an `Emu2Pipeline`: a conversation -> one prompt -> answers, whole or streamed token by token.

The server, `emu2 chat` and `emu2 ask` all go through `ChatEngine`, so the three agree on the template, the
decoding settings and where answers stop. Instruction-tuned models (Emu2-Chat, ``config.instruct``) get the
official chat template (`processing.chat_prompt`); base models (Emu2) see the conversation as one plain
interleaved prompt to continue, which is how the paper prompts them (few-shot, section 3).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import StoppingCriteriaList, TextStreamer

from .. import processing as P
from ..pipelines.emu2 import Emu2Pipeline
from .queue import CancelOnEvent

# Tokens that only the server may write: text holding them would break the image-slot bookkeeping.
RESERVED_TEXT = (P.IMAGE_PLACEHOLDER, P.VIDEO_PLACEHOLDER, P.IMAGE_TOKEN, P.FRAME_TOKEN, P.BOI, P.EOI,
                 "[/gIMG]", P.VIDEO_TOKEN)


def reserved_token_in(text: str) -> str | None:
    """The first reserved token (image slots, placeholders) found in user text, or None."""
    return next((token for token in RESERVED_TEXT if token in text), None)


MIN_TEMPERATURE = 1e-3


@dataclass
class DecodingSettings:
    """How to decode. ``temperature`` None or 0 (or below `MIN_TEMPERATURE`) means deterministic (greedy, or beam
    search when num_beams > 1); the official Emu2-Chat demo decodes with 5 beams and no sampling."""

    max_new_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    length_penalty: float | None = None
    n: int = 1
    stop: Sequence[str] = ()
    seed: int | None = None

    @property
    def sampling(self) -> bool:
        if self.temperature is None:
            return (self.top_p or self.top_k) is not None
        # Below MIN_TEMPERATURE, logits / temperature overflows to inf: that limit is greedy decoding anyway.
        return self.temperature >= MIN_TEMPERATURE

    def generate_kwargs(self) -> dict:
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                        "num_return_sequences": self.n, "do_sample": self.sampling}
        if self.sampling:
            kwargs["temperature"] = self.temperature or 1.0  # OpenAI's default temperature is 1
            if self.top_p is not None:
                kwargs["top_p"] = self.top_p
            kwargs["top_k"] = self.top_k if self.top_k is not None else 0  # transformers' default 50 is not OpenAI's
        if self.length_penalty is not None and self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        return kwargs


@dataclass
class ChatPrompt:
    """A conversation written as the model's prompt: ``text`` holds one placeholder per image and per video frame."""

    text: str
    images: list[Image.Image]
    grounding: bool = False
    num_tokens: int = 0  # what the model sees, each image's visual slots included
    frames: list[Image.Image] = field(default_factory=list)  # video frames, in order


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop": end of answer or a stop string; "length": max_new_tokens reached
    num_tokens: int


@dataclass
class StopScanner:
    """Cuts streamed text at the first stop string, holding back a tail that might begin one."""

    stops: Sequence[str]
    emit: Callable[[str], None]
    text: str = ""
    sent: int = 0
    stopped: bool = False
    hold: int = field(init=False)

    def __post_init__(self):
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, chunk: str, final: bool = False) -> None:
        if self.stopped:
            return
        self.text += chunk
        cut = _first_stop(self.text, self.stops)
        if cut is not None:
            self.stopped = True
            end = cut
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        if end > self.sent:
            self.emit(self.text[self.sent:end])
            self.sent = end


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class _CallbackStreamer(TextStreamer):
    """transformers' word-boundary streamer, sending text to a callback and dropping end/pad tokens."""

    def __init__(self, tokenizer, on_text: Callable[[str], None], drop_ids: set[int], **decode_kwargs):
        super().__init__(tokenizer, skip_prompt=True, **decode_kwargs)
        self.on_text, self.drop_ids, self.num_tokens, self.ended = on_text, drop_ids, 0, False

    def put(self, value: torch.Tensor) -> None:
        if self.next_tokens_are_prompt:  # generate first puts the (empty, embeddings-only) prompt
            return super().put(value)
        ids = [i for i in value.reshape(-1).tolist()]
        self.num_tokens += len(ids)
        self.ended = self.ended or any(i == self.tokenizer.eos_token_id for i in ids)
        super().put(torch.tensor([i for i in ids if i not in self.drop_ids], dtype=torch.long))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


def _streamed_answer(scanner: StopScanner, streamer: _CallbackStreamer, settings: DecodingSettings) -> Answer:
    """The answer a finished stream sent (``streamer.end()`` already called): its text, why it ended, its tokens."""
    scanner.feed("", final=True)
    if scanner.stopped or streamer.ended or streamer.num_tokens < settings.max_new_tokens:
        reason = "stop"
    else:
        reason = "length"
    return Answer(scanner.text[:scanner.sent].strip(), reason, streamer.num_tokens)


class PromptTokenizer:
    """Tokenizes prompts (placeholders expanded to visual slots) from request threads.

    It holds a private copy of the tokenizer behind a lock: a transformers fast tokenizer used by two threads at
    once (here, and the model thread encoding with padding) can fail with "Already borrowed".
    """

    def __init__(self, tokenizer, config):
        self._tokenizer, self._config, self._lock = copy.deepcopy(tokenizer), config, threading.Lock()
        # The most characters of text one token stands for: the longest vocabulary string (byte-fallback pieces
        # such as "<0x0A>" are longer than the one byte they cover, which only loosens the bound below).
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.max_token_chars = max(len(piece) for piece in pieces if piece is not None)

    def max_text_chars(self, max_tokens: int) -> int:
        """Text longer than this tokenizes to more than ``max_tokens`` tokens, so it can be refused untokenized.

        Every token covers at most `max_token_chars` characters, and LLaMA's normalization (spaces to "▁", one
        "▁" prepended) never shortens text, so n characters take at least n / max_token_chars tokens.
        """
        return max_tokens * self.max_token_chars

    def __call__(self, text: str) -> list[int]:
        expanded = P.expand_placeholders(text, self._config.n_query, self._config.v_query)
        with self._lock:
            return self._tokenizer(expanded).input_ids


class ChatEngine:
    """Prompts and answers for one `Emu2Pipeline` (any preset; instruct models use the chat template)."""

    def __init__(self, pipeline: Emu2Pipeline):
        self.pipeline = pipeline
        self.tokenizer = pipeline.tokenizer
        self.config = pipeline.model.config
        self.prompt_tokenizer = PromptTokenizer(pipeline.tokenizer, self.config)

    @property
    def instruct(self) -> bool:
        return bool(self.config.instruct)

    # ------------------------------------------------------------------------------------------- prompt
    def build_prompt(self, turns: Sequence[Sequence], system: str | None = P.CHAT_SYSTEM_MESSAGE,
                     grounding: bool = False, template: bool | None = None) -> ChatPrompt:
        """Turns user, assistant, ..., user (each an interleaved list of strings, PIL images and videos as lists of
        frames, as `processing.flatten_interleaved` takes them) -> prompt.

        ``template``: use the chat template (default: when the model is instruction-tuned); without it the turns
        are concatenated as one plain prompt to continue (few-shot prompting). Raises `PromptError` for a
        conversation the template cannot hold (even number of turns) or text holding reserved image tokens.
        """
        flat = [P.flatten_interleaved(list(turn)) for turn in turns]
        images = [im for f in flat for im in f.images]
        frames = [fr for f in flat for fr in f.frames]
        if self.instruct if template is None else template:
            text = P.chat_prompt([f.text for f in flat], system=system, grounding=grounding)
        else:
            text = "".join(f.text for f in flat)
        ids = self.prompt_tokenizer(text)
        if (ids.count(self.config.image_token_id) != len(images) * self.config.n_query
                or ids.count(self.config.frame_token_id) != len(frames) * self.config.v_query):
            raise P.PromptError(f"the prompt text contains a reserved image token ({', '.join(RESERVED_TEXT)}); "
                                "send images as images, not as tokens")
        return ChatPrompt(text, images, grounding, len(ids), frames)

    # ------------------------------------------------------------------------------------------ answers
    def answer(self, prompt: ChatPrompt, settings: DecodingSettings,
               cancel: threading.Event | None = None) -> list[Answer]:
        """``settings.n`` answers to ``prompt`` (beam search returns the n best beams)."""
        ids = self._generate(prompt, settings, cancel)
        return [self._finish(row, settings, prompt.grounding) for row in ids.tolist()]

    def stream(self, prompt: ChatPrompt, settings: DecodingSettings, on_text: Callable[[str], None],
               cancel: threading.Event | None = None) -> Answer:
        """One answer, ``on_text`` called with each new piece of text as it is decoded (greedy or sampling)."""
        if settings.n != 1 or settings.num_beams != 1:
            raise P.PromptError("streaming needs n = 1 and num_beams = 1 (beam search only knows its answer "
                                "at the end)")
        scanner = StopScanner(list(settings.stop), on_text)
        streamer = _CallbackStreamer(self.tokenizer, scanner.feed, self._drop_ids(),
                                     skip_special_tokens=not prompt.grounding)
        self._generate(prompt, settings, cancel, streamer=streamer)
        return _streamed_answer(scanner, streamer, settings)

    # -------------------------------------------------------------------------------------------- steps
    def _generate(self, prompt: ChatPrompt, settings: DecodingSettings, cancel: threading.Event | None,
                  **extra) -> torch.Tensor:
        kwargs = settings.generate_kwargs() | extra
        if settings.stop:
            kwargs |= {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer}
        if cancel is not None:
            kwargs["stopping_criteria"] = StoppingCriteriaList([CancelOnEvent(cancel)])
        if settings.seed is not None:
            torch.manual_seed(settings.seed)  # one model thread, so the global generator is ours alone
        batch = self.pipeline.encode([prompt.text], prompt.images, prompt.frames)
        return self.pipeline.model.generate_text(**batch, **kwargs)  # (n, T) new tokens, pad after the end

    def _drop_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}

    def _finish(self, row: list[int], settings: DecodingSettings, grounding: bool) -> Answer:
        eos = self.tokenizer.eos_token_id
        ended = eos in row
        row = row[:row.index(eos)] if ended else row
        row = [i for i in row if i not in self._drop_ids()]
        # Grounded answers keep their coordinate tokens (official README: decode without skipping specials).
        text = self.tokenizer.decode(row, skip_special_tokens=not grounding)
        cut = _first_stop(text, settings.stop)
        if cut is not None:
            text, ended = text[:cut], True
        reason = "stop" if ended or len(row) < settings.max_new_tokens else "length"
        return Answer(text.strip(), reason, len(row) + int(ended and cut is None))
