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
  ``config.json`` (Emu2 / Chat root, Gen ``multimodal_encoder/``) holds the official HF `EmuConfig` fields with
  this model's sizes, and Emu2-Gen's ``model_index.json`` names the official components. The repos' remote code
  (``configuration_emu.py``, ``modeling_emu.py``, ``modeling_llama.py``, ``visual.py``, ``constants.py`` and
  ``pipeline_emu2_gen.py``) is not written: it is the official code itself, which fine-tuning does not change;
  copy it from the official repo next to the weights.

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
# The library versions the official HF files record (their remote code is pinned to transformers 4.31).
_OFFICIAL_TRANSFORMERS, _OFFICIAL_DIFFUSERS = "4.31.0", "0.21.2"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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


def official_hf_config(model) -> dict:
    """The ``config.json`` of the official HF repos (BAAI/Emu2, Emu2-Chat, Emu2-Gen ``multimodal_encoder``: the
    remote-code `EmuConfig`, LLaMA fields at the top level plus ``vision_config``) for ``model``'s sizes.

    Long because it writes the official file's fields one per line, in its order."""
    from ..model.kind import model_kind

    config, text, vision = model.config, model.config.text_config, model.config.vision_config
    if text.model_type != "llama":
        raise ValueError(f"the official Emu2 code runs a LLaMA language model; this one is {text.model_type!r}")
    if vision.stem != "patch":
        raise ValueError(f"the official EVA-CLIP embeds patches with one convolution; this encoder's stem is "
                         f"{vision.stem!r}, which the official code cannot build")
    rope = dict(getattr(text, "rope_parameters", None) or {})
    theta = rope.pop("rope_theta", getattr(text, "rope_theta", 10000.0))
    kind = model_kind(config) or ("chat" if config.instruct else "base")
    version = "chat" if kind == "chat" else "base"  # the Gen encoder is the base model (official-format 2.2)
    dtype = model.language_model.get_input_embeddings().weight.dtype
    return {
        "architectures": ["EmuForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_emu.EmuConfig",
                     "AutoModelForCausalLM": "modeling_emu.EmuForCausalLM"},
        "model_version": version,  # "chat" turns on the HF chat template in the official remote code
        "d_model": vision.width,
        "vocab_size": text.vocab_size,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "hidden_act": text.hidden_act,
        "initializer_range": text.initializer_range,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": theta,
        "rope_scaling": rope if rope.get("rope_type", "default") != "default" else None,
        "pretraining_tp": 1,
        "attention_bias": text.attention_bias,
        "attention_dropout": text.attention_dropout,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id,
        "pad_token_id": text.pad_token_id,
        "torch_dtype": _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")),
        "transformers_version": _OFFICIAL_TRANSFORMERS,
        "vision_config": {
            "eva_model_name": "eva-clip-E-14-plus",
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.layers,
            "head_width": vision.head_width,
            "mlp_ratio": vision.mlp_ratio,
            "intermediate_size": vision.mlp_hidden_size,
            "layer_norm_eps": vision.layer_norm_eps,
            "qkv_bias": True,
            "postnorm": vision.postnorm,
            "drop_path_rate": 0,
            "n_query": config.n_query,
            "v_query": config.v_query,
            # As the official repos: xformers attention for Emu2 and Emu2-Gen, eager for Emu2-Chat (official-format 3).
            "xattn": version != "chat",
        },
    }


def official_gen_model_index(decoder) -> dict:
    """BAAI/Emu2-Gen ``model_index.json``: the official pipeline class and its components (official-format 1);
    an absent safety checker / feature extractor is ``[null, null]``, as diffusers writes a missing part."""
    def part(name, library, cls):
        return [library, cls] if getattr(decoder, name, None) is not None else [None, None]

    return {
        "_class_name": "EmuVisualGenerationPipeline",
        "_diffusers_version": _OFFICIAL_DIFFUSERS,
        "feature_extractor": part("feature_extractor", "transformers", "CLIPImageProcessor"),
        "multimodal_encoder": ["transformers_modules.modeling_emu", "EmuForCausalLM"],
        "safety_checker": part("safety_checker", "stable_diffusion", "StableDiffusionSafetyChecker"),
        "scheduler": ["diffusers", type(decoder.scheduler).__name__],
        "tokenizer": ["transformers", "LlamaTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": part("vae", "diffusers", "AutoencoderKL"),
    }


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


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
    from ..pipelines.emu2 import Emu2Pipeline
    from ..pipelines.gen import Emu2GenPipeline

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

    config = official_hf_config(model)  # before any weight is written: refuses a model the official code can't run
    state = to_official_state_dict(model, "hf")
    if decoder is None:
        _save_shards(state, out, "model{suffix}.safetensors", "model.safetensors.index.json", max_shard_size)
        _write_json(out / "config.json", config)
        encoder.tokenizer.save_pretrained(out)
    else:
        _save_shards(state, out / "multimodal_encoder", f"model.{_GEN_VARIANT}{{suffix}}.safetensors",
                     f"model.safetensors.index.{_GEN_VARIANT}.json", max_shard_size)
        _write_json(out / "multimodal_encoder" / "config.json", config)
        _write_json(out / "model_index.json", official_gen_model_index(decoder))
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
