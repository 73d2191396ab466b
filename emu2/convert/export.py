"""Our model directories -> the official layouts, so a fine-tuned model runs with the official code.

    emu2 convert runs/chat-sft --to official-native --out export/     # Emu2-Chat_pytorch_model.bin
    emu2 convert runs/gen --to official-hf --out export/Emu2-Gen       # multimodal_encoder/, unet/, vae/, ...

* ``official-native`` (official-format 1): one file, the state dict the official ``from_pretrained`` loads with
  ``strict=True``. Emu2 / Emu2-Chat: ``{Emu2,Emu2-Chat}_pytorch_model[.bf16].bin`` (a torch file, as the official
  loader's default ``use_safetensors=False`` reads); Emu2-Gen: ``Emu2-Gen_pytorch_model[.bf16].safetensors`` with
  ``multimodal_encoder.*``, ``unet.*``, ``vae.*`` (and ``safety_checker.*`` when the decoder has one).
* ``official-hf``: the weights of the BAAI/Emu2, Emu2-Chat and Emu2-Gen repos. Emu2 / Chat: safetensors shards +
  ``model.safetensors.index.json`` with the HF names. Emu2-Gen: ``multimodal_encoder/`` shards named for the
  ``bf16`` variant that the official pipeline loads (``model.bf16-0000N-of-0000M.safetensors`` +
  ``model.safetensors.index.bf16.json``), the diffusers folders ``unet/`` and ``vae/`` (variant ``bf16``),
  ``scheduler/``, ``tokenizer/``, and ``safety_checker/`` + ``feature_extractor/`` when present. The variant
  name is the one the official loader asks for; the tensors keep the model's dtype.
  The repos' remote code and their ``config.json`` / ``model_index.json`` are not written: fine-tuning does not
  change them, copy them from the official repo.

Tensors are written as they are (no dtype change), so official -> ours -> official is bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .official import to_official_state_dict

FORMATS = ("official-native", "official-hf")
_GEN_VARIANT = "bf16"  # official: DiffusionPipeline.from_pretrained(..., variant="bf16")


def _dtype_tag(state: dict[str, torch.Tensor]) -> str:
    return ".bf16" if next(iter(state.values())).dtype == torch.bfloat16 else ""


def _save_shards(state: dict[str, torch.Tensor], out: Path, pattern: str, index_name: str,
                 max_shard_size: str | int) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern=pattern, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, str(out / filename), metadata={"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (out / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _decoder_state(decoder) -> dict[str, torch.Tensor]:
    state = {}
    for name in ("unet", "vae", "safety_checker"):
        module = getattr(decoder, name, None)
        if module is not None:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def export_official(source: str | Path, out: str | Path, to: str, max_shard_size: str | int = "10GB") -> list[Path]:
    """Write the model directory ``source`` (an `Emu2Pipeline` or `Emu2GenPipeline` directory) in the official
    layout ``to`` ("official-native" or "official-hf") under ``out``; returns the files written."""
    from ..gen.pipeline import Emu2GenPipeline
    from ..pipeline import Emu2Pipeline

    if to not in FORMATS:
        raise ValueError(f"unknown official format {to!r}; choose one of {FORMATS}")
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: give a new directory for the exported model")
    is_gen = (source / "encoder").is_dir() and (source / "decoder").is_dir()
    if is_gen:
        gen = Emu2GenPipeline.from_pretrained(source)
        encoder, decoder = gen.encoder, gen.decoder
    else:
        encoder, decoder = Emu2Pipeline.from_pretrained(source), None
    model = encoder.model
    out.mkdir(parents=True, exist_ok=True)

    if to == "official-native":
        state = to_official_state_dict(model, "native")
        if decoder is None:
            name = "Emu2-Chat" if model.config.instruct else "Emu2"
            path = out / f"{name}_pytorch_model{_dtype_tag(state)}.bin"
            torch.save(state, path)
        else:
            state = {"multimodal_encoder." + k: v for k, v in state.items()} | _decoder_state(decoder)
            path = out / f"Emu2-Gen_pytorch_model{_dtype_tag(state)}.safetensors"
            save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
        return [path]

    state = to_official_state_dict(model, "hf")
    if decoder is None:
        _save_shards(state, out, "model{suffix}.safetensors", "model.safetensors.index.json", max_shard_size)
        encoder.tokenizer.save_pretrained(out)
    else:
        _save_shards(state, out / "multimodal_encoder", f"model.{_GEN_VARIANT}{{suffix}}.safetensors",
                     f"model.safetensors.index.{_GEN_VARIANT}.json", max_shard_size)
        encoder.tokenizer.save_pretrained(out / "tokenizer")
        for name in ("unet", "vae"):
            if getattr(decoder, name, None) is not None:
                getattr(decoder, name).save_pretrained(out / name, variant=_GEN_VARIANT)
        if getattr(decoder, "safety_checker", None) is not None:
            decoder.safety_checker.save_pretrained(out / "safety_checker")
        decoder.scheduler.save_pretrained(out / "scheduler")
        if getattr(decoder, "feature_extractor", None) is not None:
            decoder.feature_extractor.save_pretrained(out / "feature_extractor")
    return sorted(p for p in out.rglob("*") if p.is_file())
