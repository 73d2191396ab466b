"""`Emu2Pipeline`: model + tokenizer, taking the official interleaved inputs (strings, PIL images, videos).

    pipe = Emu2Pipeline.from_pretrained("my-emu2")
    pipe.generate([image, "Describe the image in details:"])            # official defaults: 5 beams, 10 tokens
    pipe.chat([[image, "What is in the image?"]], max_new_tokens=512)   # Emu2-Chat template
    pipe.regress_image_embeddings(["a red circle on a white background"])  # (1, n_query, Dv) for the decoder
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from . import processing as P
from .model import Emu2ForCausalLM


def _as_batch(inputs) -> list:
    """One interleaved input (str / image / list of items) or a batch of them -> a list of inputs."""
    if isinstance(inputs, (str,)) or not isinstance(inputs, (list, tuple)):
        return [inputs]
    if inputs and all(isinstance(x, (list, tuple)) and not P._is_video(x) for x in inputs):
        return list(inputs)
    return [inputs]


# Official `EmuModel.generate` / `EmuChatGeneration.forward` defaults (official-format section 6.2).
OFFICIAL_GENERATE_DEFAULTS = {"num_beams": 5, "length_penalty": -1.0, "max_new_tokens": 10}


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
        from .config import Emu2Config

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
        flat = [P.flatten_interleaved(item) for item in _as_batch(inputs)]
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
