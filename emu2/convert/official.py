"""Official checkpoints -> `Emu2ForCausalLM`.

The only module that knows the official key names (official-format section 2):

| part        | native Emu2 / Chat   | native Gen                            | HF (Emu2, Chat, Gen multimodal_encoder) |
|-------------|----------------------|---------------------------------------|-----------------------------------------|
| ViT         | visual.              | multimodal_encoder.visual.            | model.visual.                           |
| LLaMA       | decoder.lm.          | multimodal_encoder.decoder.lm.        | model.decoder.lm.                       |
| projections | project_up/down      | multimodal_encoder.project_up/down    | project_up/down (root)                  |

Our names: ``visual.*`` (identical below the prefix), ``language_model.*`` (a transformers LlamaForCausalLM),
``project_up.weight``, ``project_down.weight``. Rotary ``inv_freq`` buffers are recomputed, so ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import BASE_VOCAB, PAD_ID, Emu2Config
from ..model.errors import CheckpointMismatchError  # re-exported: emu2.convert's public error

_PREFIXES = (
    ("multimodal_encoder.decoder.lm.", "language_model."),
    ("multimodal_encoder.visual.", "visual."),
    ("multimodal_encoder.project_", "project_"),
    ("model.decoder.lm.", "language_model."),
    ("model.visual.", "visual."),
    ("decoder.lm.", "language_model."),
    ("visual.", "visual."),
    ("project_", "project_"),
)
_DECODER_PARTS = ("unet.", "vae.", "safety_checker.")


def official_key(key: str) -> str | None:
    """Official key -> our key; None for keys we drop (rotary caches, the Gen decoder's own parts)."""
    if key.endswith("rotary_emb.inv_freq") or key.startswith(_DECODER_PARTS):
        return None
    for old, new in _PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key  # unknown: reported as unexpected


# Our key prefix -> the official one, per layout (the inverse of _PREFIXES).
_TO_OFFICIAL = {
    "native": (("visual.", "visual."), ("language_model.", "decoder.lm."), ("project_", "project_")),
    "hf": (("visual.", "model.visual."), ("language_model.", "model.decoder.lm."), ("project_", "project_")),
}


def to_official_state_dict(model, layout: str = "native") -> dict[str, torch.Tensor]:
    """`Emu2ForCausalLM` -> its state dict under the official key names (``layout`` "native" or "hf").

    The per-layer rotary ``inv_freq`` buffers are added back: the official code (transformers 4.31) keeps them in
    its state dict and the native loader is strict, so a file without them does not load there.
    """
    if layout not in _TO_OFFICIAL:
        raise ValueError(f"layout must be one of {sorted(_TO_OFFICIAL)}, got {layout!r}")
    state = {}
    for key, value in model.state_dict().items():
        old, new = next((o, n) for o, n in _TO_OFFICIAL[layout] if key.startswith(o))
        state[new + key[len(old):]] = value
    lm_prefix = dict(_TO_OFFICIAL[layout])["language_model."]
    inv_freq = model.language_model.get_decoder().rotary_emb.inv_freq
    dtype = model.language_model.get_input_embeddings().weight.dtype  # official `.to(dtype)` casts buffers too
    for layer in range(model.config.text_config.num_hidden_layers):
        state[f"{lm_prefix}model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = inv_freq.to(dtype, copy=True)
    return state


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    # Official native .bin files are plain state dicts; weights_only refuses anything but tensors.
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def read_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an official checkpoint: one file (.bin / .pth / .safetensors) or a directory.

    A directory is read through its ``*.index*.json`` weight map when there is one (HF sharded layout; the
    Emu2-Gen ``multimodal_encoder/`` subfolder works too), else every weight file in it.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "multimodal_encoder").is_dir():
            path = path / "multimodal_encoder"
        indexes = sorted(path.glob("*.index*.json"))
        if indexes:
            files = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
            shards = [path / f for f in files]
        else:
            shards = sorted([*path.glob("*.safetensors"), *path.glob("*.bin")])
        if not shards:
            raise FileNotFoundError(f"no .safetensors/.bin weight files in {path}")
    elif path.is_file():
        shards = [path]
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(_read_file(shard))
    return state


def convert_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official keys to ours, dropping rotary caches and decoder parts."""
    converted = {}
    for key, value in official.items():
        new = official_key(key)
        if new is not None:
            converted[new] = value
    return converted


def load_official(
    path: str | Path | dict,
    config: Emu2Config,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Build `Emu2ForCausalLM` from ``config`` without allocating random weights and load an official checkpoint.

    Parameters are created on the meta device and replaced by the checkpoint's tensors (``assign``), so a bf16
    checkpoint never exists as an fp32 copy in RAM. Any missing or unexpected key raises
    `CheckpointMismatchError` listing them by name.
    """
    from ..model import Emu2ForCausalLM

    official = path if isinstance(path, dict) else read_official_state_dict(path)
    state = convert_state_dict(official)
    with torch.device("meta"):
        model = Emu2ForCausalLM(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(missing, unexpected, shapes)
    target_dtype = dtype or next(iter(state.values())).dtype
    state = {k: v.to(device=device, dtype=target_dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    _rebuild_buffers(model, device)
    model.config.dtype = target_dtype
    return model.eval()


def _rebuild_buffers(model, device) -> None:
    """Non-persistent buffers (the rotary ``inv_freq``) stay on meta after an assign-load: rebuild them from the
    module's own config, which works for any LLaMA-family backbone."""
    for module in model.modules():
        meta = [name for name, buf in module.named_buffers(recurse=False) if buf.is_meta]
        if not meta:
            continue
        with torch.device(device):
            fresh = type(module)(module.config)
        for name in meta:
            module.register_buffer(name, getattr(fresh, name), persistent=False)


def config_from_official(vision_cfg: dict, llama_config: dict, vocab_size: int, **overrides) -> Emu2Config:
    """Our config from an official ``CLIPVisionCfg`` dict and LLaMA ``config.json`` dict (sizes of any model)."""
    from transformers import LlamaConfig

    from ..config import Emu2VisionConfig

    vision = Emu2VisionConfig(
        image_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"], width=vision_cfg["width"],
        layers=vision_cfg["layers"], head_width=vision_cfg["head_width"], mlp_ratio=vision_cfg["mlp_ratio"],
    )
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "rms_norm_eps",
            "max_position_embeddings", "hidden_act", "bos_token_id", "eos_token_id")
    text = LlamaConfig(**{k: llama_config[k] for k in keep if k in llama_config}, vocab_size=vocab_size,
                       pad_token_id=PAD_ID, tie_word_embeddings=False)
    kwargs = dict(vision_config=vision, text_config=text, n_query=vision_cfg.get("n_query", 64),
                  v_query=vision_cfg.get("v_query", 64), instruct=vocab_size > BASE_VOCAB)
    kwargs.update(overrides)
    return Emu2Config(**kwargs)
