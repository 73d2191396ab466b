"""`Emu2Pipeline`: model + tokenizer, taking the official interleaved inputs (strings, PIL images, videos).

    pipe = Emu2Pipeline.from_pretrained("my-emu2")
    pipe.generate([image, "Describe the image in details:"])            # official defaults: 5 beams, 10 tokens
    pipe.chat([[image, "What is in the image?"]], max_new_tokens=512)   # Emu2-Chat template
    pipe.regress_image_embeddings(["a red circle on a white background"])  # (1, n_query, Dv) for the decoder
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .. import processing as P
from ..model import Emu2ForCausalLM
from ..model.interleaved import InterleavedImage, iter_interleaved


def as_batch(inputs) -> list:
    """One interleaved input (str / image / list of items) or a batch of them -> a list of inputs."""
    if isinstance(inputs, (str,)) or not isinstance(inputs, (list, tuple)):
        return [inputs]
    if inputs and all(isinstance(x, (list, tuple)) and not P._is_video(x) for x in inputs):
        return list(inputs)
    return [inputs]


OFFICIAL_GENERATE_DEFAULTS = P.OFFICIAL_DECODING


def _official_kwargs(kwargs: dict) -> dict:
    """transformers ``generate`` arguments with the official defaults filled in and official names mapped.

    ``min_len`` (official) became ``min_length`` under transformers 4.31, which counted the dummy BOS it put
    before generated tokens when given only embeddings: ``min_len`` k means at least k - 1 new tokens.
    """
    kwargs = dict(kwargs)
    min_len = kwargs.pop("min_len", None)
    if min_len is not None and min_len > 1:
        kwargs.setdefault("min_new_tokens", int(min_len) - 1)
    for key, value in OFFICIAL_GENERATE_DEFAULTS.items():
        kwargs.setdefault(key, value)
    if kwargs["num_beams"] == 1:
        kwargs.pop("length_penalty")  # a beam-search knob: transformers warns when it is set without beams
    return kwargs


class Emu2Pipeline:
    """Prompting an `Emu2ForCausalLM` with interleaved text, images and videos."""

    def __init__(self, model: Emu2ForCausalLM, tokenizer):
        config = model.config
        wanted = {P.BOI: config.boi_token_id, P.EOI: config.eoi_token_id, P.IMAGE_TOKEN: config.image_token_id,
                  P.FRAME_TOKEN: config.frame_token_id}
        got = dict(zip(wanted, tokenizer.convert_tokens_to_ids(list(wanted))))
        if got != wanted:
            raise ValueError(f"the tokenizer ({len(tokenizer)} tokens) does not fit the model: its special token ids "
                             f"are {got}, the model's config expects {wanted}")
        self.model = model
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, **kwargs) -> Emu2Pipeline:
        """A directory written by `save_pretrained` (config.json, safetensors weights, tokenizer files)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not an emu2 model directory (no config.json); "
                                    "official checkpoints are converted with `emu2 convert`")
        model = Emu2ForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        if device is not None:
            model = model.to(device)
        tokenizer_dir = path if (path / "tokenizer_config.json").is_file() else P.DEFAULT_TOKENIZER
        return cls(model.eval(), P.load_tokenizer(tokenizer_dir, instruct=model.config.instruct))

    @classmethod
    def from_preset(cls, name: str, seed: int = 0, **overrides) -> Emu2Pipeline:
        """Randomly initialised model of a named preset, with the packaged tokenizer its vocabulary is sized for
        (LLaMA's; the shapes world's for `shapes`)."""
        from ..config import Emu2Config

        torch.manual_seed(seed)
        config = Emu2Config.from_preset(name, **overrides)
        return cls(Emu2ForCausalLM(config).eval(), P.load_tokenizer(P.preset_tokenizer(name), instruct=config.instruct))

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        self.model.save_pretrained(path, **kwargs)
        self.tokenizer.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------------------------------------- encoding
    def encode(self, prompts: Sequence[str], images: Sequence = (), frames: Sequence = ()) -> dict:
        """Prompt strings with placeholders + the visuals they stand for -> model inputs (left-padded batch).

        Returns input_ids/attention_mask (B, L), images (N, 3, S, S), frames (M, 3, S, S) on the model device.
        """
        text = "".join(prompts)
        P.check_placeholder_counts(text, len(images), len(frames))
        cfg = self.model.config
        expanded = [P.expand_placeholders(p, cfg.n_query, cfg.v_query) for p in prompts]
        batch = self.tokenizer(expanded, return_tensors="pt", padding=True)
        size = cfg.vision_config.image_size
        dtype = self.model.dtype

        def pixels(visuals):
            tensors = [v if isinstance(v, torch.Tensor) else P.preprocess_image(v, size) for v in visuals]
            return torch.stack(tensors).to(self.device, dtype) if tensors else None

        return {
            "input_ids": batch["input_ids"].to(self.device),
            "attention_mask": batch["attention_mask"].to(self.device),
            "images": pixels(images),
            "frames": pixels(frames),
        }

    def encode_interleaved(self, inputs) -> dict:
        """Official-style inputs (one, or a batch of lists of str / PIL / video frame lists) -> model inputs."""
        flat = [P.flatten_interleaved(item) for item in as_batch(inputs)]
        return self.encode([f.text for f in flat], [im for f in flat for im in f.images],
                           [fr for f in flat for fr in f.frames])

    # ------------------------------------------------------------------------------------------ outputs
    def generate(self, inputs, skip_special_tokens: bool = True, **generate_kwargs) -> list[str]:
        """Text continuation of each input; ``generate_kwargs`` go to transformers ``generate``.

        Official defaults (`EmuModel.generate`): 5 beams, ``length_penalty`` -1 (favours short answers),
        ``max_new_tokens`` 10, no sampling. The official ``min_len`` is accepted too (see `_official_kwargs`).
        """
        ids = self.model.generate_text(**self.encode_interleaved(inputs), **_official_kwargs(generate_kwargs))
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens)

    def chat(self, messages: Sequence, system: str | None = None, grounding: bool = False, **kwargs) -> str:
        """Emu2-Chat answer to one conversation: messages (user, assistant, ..., user), each a string or an
        interleaved list. See `chat_batch` for the arguments."""
        return self.chat_batch([messages], system=system, grounding=grounding, **kwargs)[0]

    def chat_batch(self, conversations: Sequence[Sequence], system: str | None = None, grounding: bool = False,
                   template: str = "native", skip_special_tokens: bool | None = None, **generate_kwargs) -> list[str]:
        """`chat` for a batch of conversations, decoded together (left padding).

        As official `EmuChatGeneration.forward`: ``is_grounding`` is an alias of ``grounding``; ``system=None``
        picks the official system message (the short-answer one when grounding; none for ``template="hf"``,
        the Hugging Face remote code's ``[USER]: ..[ASSISTANT]:``), ``system=""`` drops it; decoding defaults are
        the official ones (`generate`). Grounded answers keep their coordinate tokens unless
        ``skip_special_tokens`` is given (the official README decodes them with ``skip_special_tokens=False``).
        """
        grounding = bool(generate_kwargs.pop("is_grounding", grounding))
        if system is None and template == "native":
            system = P.SHORT_ANSWER_SYSTEM_MESSAGE if grounding else P.CHAT_SYSTEM_MESSAGE
        prompts, images, frames = [], [], []
        for messages in conversations:
            flat = [P.flatten_interleaved(m) for m in messages]
            prompts.append(P.chat_prompt([f.text for f in flat], system=system, grounding=grounding,
                                         template=template))
            images += [im for f in flat for im in f.images]
            frames += [fr for f in flat for fr in f.frames]
        ids = self.model.generate_text(**self.encode(prompts, images, frames), **_official_kwargs(generate_kwargs))
        skip = not grounding if skip_special_tokens is None else skip_special_tokens
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=skip)
        return [t.replace(self.tokenizer.eos_token, "").replace(self.tokenizer.pad_token, "").strip() for t in texts]

    def regress_image_embeddings(self, inputs) -> torch.Tensor:
        """The visual embeddings of the image that follows each input: ``(B, n_query, Dv)`` (Emu2-Gen)."""
        return self.model.regress_image_embeddings(**self.encode_interleaved(inputs))

    # ------------------------------------------------------------------------------------ interleaved
    def stream_interleaved(self, inputs, decoder=None, max_images: int = 4, max_new_tokens: int = 256,
                           do_sample: bool = False, stop: Sequence[str] = (), decoder_kwargs: dict | None = None,
                           **kwargs) -> Iterator[tuple[int, str | InterleavedImage]]:
        """`generate_interleaved` as it happens: yields ``(row, part)``, text deltas (str) and finished images
        (`InterleavedImage`), in order per row. Text never includes a stop string or what follows it. The
        generator's return value (``StopIteration.value``) is `iter_interleaved`'s: one `InterleavedSequence`
        per row (finish reasons, generated positions)."""
        from transformers import StopStringCriteria

        stop = [s for s in ([stop] if isinstance(stop, str) else stop) if s]
        if stop:
            kwargs["stopping_criteria"] = [*kwargs.get("stopping_criteria", ()),
                                           StopStringCriteria(self.tokenizer, stop)]
        draw = self._image_decoder(decoder, decoder_kwargs or {})
        batch = self.encode_interleaved(inputs)
        segments = [_TextSegment(self.tokenizer, stop) for _ in range(batch["input_ids"].shape[0])]
        events = iter_interleaved(self.model, **batch, max_new_tokens=max_new_tokens, max_images=max_images,
                                  do_sample=do_sample, **kwargs)
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                sequences = done.value
                break
            segment = segments[event.row]
            if event.token is not None:
                delta = segment.add(event.token)
                if delta:
                    yield event.row, delta
                continue
            rest = segment.close()
            if rest:
                yield event.row, rest
            yield event.row, InterleavedImage(event.image, draw(event.image) if draw else None)
        for row, segment in enumerate(segments):
            rest = segment.close()
            if rest:
                yield row, rest
        return sequences

    def generate_interleaved(self, inputs, decoder=None, max_images: int = 4, max_new_tokens: int = 256,
                             do_sample: bool = False, stop: Sequence[str] = (),
                             stream: Callable[[int, str | InterleavedImage], None] | None = None,
                             decoder_kwargs: dict | None = None, **kwargs) -> list[list[str | InterleavedImage]]:
        """Continue each input with text and images from the one model: per input, its ordered parts.

        Parts are text segments (str) and `InterleavedImage` (the regressed embeddings ``(Q, Dv)``, and the
        picture when ``decoder`` is given: an `Emu2VisualDecoderPipeline`, guided by the regressed embeddings
        of the empty prompt as Emu2-Gen, or any callable ``(1, Q, Dv) embeddings -> PIL image``).
        ``stream(row, part)`` gets text deltas and each finished image as they come. ``max_images`` /
        ``max_new_tokens`` bound the images and the text tokens per input; ``stop`` strings end an input's
        answer. Other keywords (temperature, top_p, top_k, logits_processor, force_image_at, generator) go to
        `emu2.model.interleaved.iter_interleaved`; ``decoder_kwargs`` (num_inference_steps, guidance_scale,
        generator, ...) to the decoder pipeline.
        """
        parts: list[list] = [[] for _ in as_batch(inputs)]
        for row, part in self.stream_interleaved(inputs, decoder, max_images, max_new_tokens, do_sample, stop,
                                                 decoder_kwargs, **kwargs):
            if stream is not None:
                stream(row, part)
            if isinstance(part, str) and parts[row] and isinstance(parts[row][-1], str):
                parts[row][-1] += part
            else:
                parts[row].append(part)
        return parts

    def _image_decoder(self, decoder, decoder_kwargs: dict):
        """``decoder`` -> a function ``(Q, Dv) embeddings -> PIL image``, or None."""
        if decoder is None:
            return None
        from .visual_decoder import Emu2VisualDecoderPipeline

        if isinstance(decoder, Emu2VisualDecoderPipeline):
            uncond = []

            def draw(embeddings):
                if not uncond and decoder_kwargs.get("guidance_scale", 3.0) > 1.0:
                    uncond.append(self.regress_image_embeddings([""]))  # official Emu2-Gen's unconditional input
                return decoder(embeddings[None], uncond[0] if uncond else None, **decoder_kwargs).images[0]

            return draw
        if not callable(decoder):
            raise TypeError(f"decoder must be an Emu2VisualDecoderPipeline or a callable (1, Q, Dv) -> PIL image; "
                            f"got {type(decoder).__name__}")
        return lambda embeddings: decoder(embeddings[None])


class _TextSegment:
    """Token ids of the text since the last image -> text deltas that never split a character or show a stop
    string (a tail that might begin one is held back until it cannot)."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False

    def _text(self) -> tuple[str, bool]:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text[:min(hits)], True) if hits else (text, False)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text, self.stopped = self._text()
        end = len(text) if self.stopped else len(text) - self.hold
        if not self.stopped and text.endswith("\ufffd"):  # half of a multi-byte character
            return ""
        delta, self.sent = text[self.sent:end], max(self.sent, end)
        return delta

    def close(self) -> str:
        """The rest of this segment; the next text starts a new one (after an image)."""
        text = self._text()[0] if self.ids and not self.stopped else ""
        rest = text[self.sent:] if text else ""
        self.ids, self.sent = [], 0
        return rest
