"""Official Emu2-Gen checkpoints -> an `Emu2GenPipeline` directory (``encoder/`` + ``decoder/``).

Two sources (official-format sections 1 and 2.3):

* the native single file (``Emu2-Gen_pytorch_model.bf16.safetensors``): ``multimodal_encoder.*`` for the encoder,
  ``unet.*`` / ``vae.*`` (and ``safety_checker.*``) for the decoder. The official native loader builds the decoder
  from its ``conf/diffusion_config`` folder (``unet/config.json``, ``vae/config.json``,
  ``scheduler/scheduler_config.json``); ``decoder_config`` is that folder. Every size the weights fix (channels,
  blocks, layers, cross-attention width, time-embedding width, latent channels) is read from the file itself; the
  config only supplies what the weights do not show (head counts, norm groups, sample size, VAE scaling factor).
  Without a ``decoder_config`` the official Emu2-Gen values are used for those.
* the Hugging Face diffusers layout (BAAI/Emu2-Gen: ``multimodal_encoder/``, ``unet/``, ``vae/``, ``scheduler/``,
  ``tokenizer/``, ...): each part's own config.json is read, nothing is assumed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import Emu2Config
from .official import load_official, read_official_state_dict

if TYPE_CHECKING:  # diffusers loads on first use: importing emu2.convert stays light
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

logger = logging.getLogger(__name__)

# Official conf/diffusion_config (official-format 2.3): the SDXL body with 1792-wide visual conditioning.
OFFICIAL_UNET_CONFIG: dict = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 1792, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 3328, "flip_sin_to_cos": True, "freq_shift": 0,
    "norm_num_groups": 32, "norm_eps": 1e-5,
}
OFFICIAL_VAE_CONFIG: dict = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025,
    "force_upcast": True,
}


def is_official_gen(path: str | Path) -> bool:
    """A native Gen file (holds ``unet.*`` tensors) or an HF Emu2-Gen folder (has ``unet/``)."""
    path = Path(path)
    if path.is_dir():
        return (path / "unet").is_dir()
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return any(k.startswith("unet.") for k in handle.keys())
    return False


# ------------------------------------------------------------------------------- sizes read from the weights
def _indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def unet_sizes(state: dict[str, torch.Tensor]) -> dict:
    """The `UNet2DConditionModel` config fields that the ``unet.*`` tensors' names and shapes fix."""
    keys = [k.removeprefix("unet.") for k in state if k.startswith("unet.")]
    get = lambda key: state["unet." + key]  # noqa: E731
    downs = _indices(keys, "down_blocks.")
    attends = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in downs]
    cross = next(v for k, v in state.items() if k.startswith("unet.") and k.endswith("attn2.to_k.weight"))
    proj_in = next(v for k, v in state.items() if k.startswith("unet.") and k.endswith(".proj_in.weight"))
    sizes = {
        "in_channels": get("conv_in.weight").shape[1],
        "out_channels": get("conv_out.weight").shape[0],
        "block_out_channels": [get(f"down_blocks.{i}.resnets.0.conv2.weight").shape[0] for i in downs],
        "layers_per_block": len(_indices(keys, "down_blocks.0.resnets.")),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["CrossAttnUpBlock2D" if any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
                           else "UpBlock2D" for i in _indices(keys, "up_blocks.")],
        "transformer_layers_per_block": [
            len(_indices(keys, f"down_blocks.{i}.attentions.0.transformer_blocks.")) if a else 1
            for i, a in zip(downs, attends, strict=True)],
        "cross_attention_dim": cross.shape[1],
        "use_linear_projection": proj_in.ndim == 2,
    }
    if "add_embedding.linear_1.weight" in keys:  # SDXL "text_time": pooled embeds (Dv) + 6 time ids
        total = get("add_embedding.linear_1.weight").shape[1]
        sizes["projection_class_embeddings_input_dim"] = total
        sizes["addition_time_embed_dim"] = (total - sizes["cross_attention_dim"]) // 6
    return sizes


def vae_sizes(state: dict[str, torch.Tensor]) -> dict:
    """The `AutoencoderKL` config fields that the ``vae.*`` tensors' names and shapes fix."""
    keys = [k.removeprefix("vae.") for k in state if k.startswith("vae.")]
    get = lambda key: state["vae." + key]  # noqa: E731
    downs = _indices(keys, "encoder.down_blocks.")
    return {
        "in_channels": get("encoder.conv_in.weight").shape[1],
        "out_channels": get("decoder.conv_out.weight").shape[0],
        "latent_channels": get("decoder.conv_in.weight").shape[1],
        "block_out_channels": [get(f"encoder.down_blocks.{i}.resnets.0.conv2.weight").shape[0] for i in downs],
        "layers_per_block": len(_indices(keys, "encoder.down_blocks.0.resnets.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(downs),
        "up_block_types": ["UpDecoderBlock2D"] * len(downs),
    }


def _read_json(folder: Path | None, *names: str) -> dict | None:
    if folder is None:
        return None
    for name in names:
        if (folder / name).is_file():
            return {k: v for k, v in json.loads((folder / name).read_text()).items() if not k.startswith("_")}
    return None


def decoder_configs(state: dict[str, torch.Tensor], decoder_config: str | Path | None = None) -> dict:
    """unet / vae / scheduler / safety_checker configs for a native Gen state dict: the official
    ``conf/diffusion_config`` folder's (or the official values), with every size replaced by the file's."""
    folder = Path(decoder_config) if decoder_config is not None else None
    if folder is not None and not folder.is_dir():
        raise FileNotFoundError(f"--decoder-config {folder} is not a folder (expected the official "
                                "conf/diffusion_config layout: unet/config.json, vae/config.json, scheduler/)")
    unet = _read_json(folder and folder / "unet", "config.json") or dict(OFFICIAL_UNET_CONFIG)
    vae = _read_json(folder and folder / "vae", "config.json") or dict(OFFICIAL_VAE_CONFIG)
    configs = {
        "unet": {**unet, **unet_sizes(state)},
        "vae": {**vae, **vae_sizes(state)} if any(k.startswith("vae.") for k in state) else None,
        "scheduler": _read_json(folder and folder / "scheduler", "scheduler_config.json", "config.json"),
        "safety_checker": None,
    }
    if any(k.startswith("safety_checker.") for k in state):
        checker = _read_json(folder and folder / "safety_checker", "config.json")
        if checker is None:
            raise FileNotFoundError("the checkpoint holds safety_checker.* weights: pass --decoder-config with "
                                    "safety_checker/config.json (the official conf/diffusion_config folder)")
        configs["safety_checker"] = checker
    heads, blocks = configs["unet"].get("attention_head_dim"), len(configs["unet"]["block_out_channels"])
    if isinstance(heads, list) and len(heads) != blocks:
        raise ValueError(f"the UNet in the file has {blocks} blocks but the decoder config gives attention_head_dim "
                         f"{heads}: pass --decoder-config with the checkpoint's own unet/config.json")
    return configs


# ------------------------------------------------------------------------------------------ the conversion
def load_official_gen(
    path: str | Path,
    config: Emu2Config,
    tokenizer=None,
    decoder_config: str | Path | None = None,
    dtype: torch.dtype | None = None,
):
    """An official Emu2-Gen checkpoint (native file or HF folder) -> `Emu2GenPipeline`, all weights loaded.

    ``config``: the multimodal encoder's (its sizes are checked against the file); ``tokenizer``: defaults to
    the HF folder's ``tokenizer/`` when there is one, else the packaged LLaMA tokenizer. ``dtype`` None keeps
    the stored dtype.
    """
    from .. import processing as P
    from ..pipelines.emu2 import Emu2Pipeline
    from ..pipelines.gen import Emu2GenPipeline

    path = Path(path)
    if path.is_dir():
        if not (path / "multimodal_encoder").is_dir():
            raise FileNotFoundError(f"{path} has unet/ but no multimodal_encoder/: not the Emu2-Gen HF layout")
        encoder_state = read_official_state_dict(path / "multimodal_encoder")
        dtype = dtype or next(iter(encoder_state.values())).dtype
        decoder = load_diffusers_gen_decoder(path, dtype=dtype,
                                             with_safety_checker=(path / "safety_checker").is_dir())
        if tokenizer is None and (path / "tokenizer").is_dir():
            tokenizer = P.load_tokenizer(path / "tokenizer", instruct=config.instruct)
    else:
        state = read_official_state_dict(path)
        dtype = dtype or state["unet.conv_in.weight"].dtype
        configs = decoder_configs(state, decoder_config)
        decoder = load_official_gen_decoder(state, configs["unet"], configs["vae"], configs["scheduler"],
                                            safety_checker_config=configs["safety_checker"], dtype=dtype)
        encoder_state = {k: v for k, v in state.items() if k.startswith("multimodal_encoder.")}
    model = load_official(encoder_state, config, dtype=dtype)
    tokenizer = tokenizer or P.load_tokenizer(instruct=config.instruct)
    return Emu2GenPipeline(Emu2Pipeline(model, tokenizer), decoder)


def load_official_gen_decoder(
    state_dict: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_config: Mapping | None,
    scheduler_config: Mapping | None = None,
    *,
    safety_checker_config: Mapping | None = None,
    dtype: torch.dtype = torch.float32,
) -> Emu2VisualDecoderPipeline:
    """Build the decoder from a native Emu2-Gen state dict (``unet.*``, ``vae.*``; official-format 1, 2.3).

    ``multimodal_encoder.*`` keys are the encoder's and are skipped (``state_dict`` is not modified).
    ``safety_checker.*`` keys are ignored unless ``safety_checker_config`` (a `transformers.CLIPConfig`
    dict) is given, in which case the official checker and its CLIP feature extractor are loaded too. Any missing or
    unexpected key raises a ValueError that names it.
    """
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    pipe = Emu2VisualDecoderPipeline.from_configs(unet_config, vae_config, scheduler_config)
    parts = {"unet": pipe.unet}
    if pipe.vae is not None:
        parts["vae"] = pipe.vae
    if safety_checker_config is not None:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPConfig, CLIPImageProcessor

        checker = StableDiffusionSafetyChecker(CLIPConfig(**safety_checker_config))
        # Official feature extractor = CLIPImageProcessor defaults (224 short side, centre crop, CLIP stats).
        pipe.register_modules(safety_checker=checker, feature_extractor=CLIPImageProcessor())
        parts["safety_checker"] = checker

    ignored = ("multimodal_encoder.", "safety_checker.")
    by_part: dict[str, dict[str, torch.Tensor]] = {name: {} for name in parts}
    unexpected = []
    for key, tensor in state_dict.items():
        name, _, rest = key.partition(".")
        if name in by_part:
            by_part[name][rest] = tensor
        elif not key.startswith(ignored):
            unexpected.append(key)
    missing = []
    for name, module in parts.items():
        # Non-persistent buffers (CLIP position_ids) are not in the official files: compare state_dict keys.
        expected = set(module.state_dict())
        missing += [f"{name}.{k}" for k in sorted(expected - set(by_part[name]))]
        unexpected += [f"{name}.{k}" for k in sorted(set(by_part[name]) - expected)]
    if missing or unexpected:
        raise ValueError(
            "official Gen decoder weights do not match the configs: "
            f"missing {_first(missing)} ({len(missing)} in all), "
            f"unexpected {_first(unexpected)} ({len(unexpected)} in all); "
            "check that unet_config/vae_config are the checkpoint's (official-format section 2.3)"
        )
    for name, module in parts.items():
        module.load_state_dict(by_part[name], strict=True)
    if safety_checker_config is None and any(k.startswith("safety_checker.") for k in state_dict):
        logger.info("safety_checker.* weights ignored (pass safety_checker_config to load the checker)")
    return pipe.to(dtype=dtype) if dtype != torch.float32 else pipe


def load_diffusers_gen_decoder(
    path: str | Path,
    *,
    variant: str | None = "bf16",
    dtype: torch.dtype | None = None,
    with_safety_checker: bool = False,
) -> Emu2VisualDecoderPipeline:
    """Load the decoder from a local HF diffusers layout (BAAI/Emu2-Gen: ``unet/``, ``vae/``, ``scheduler/``).

    Only those subfolders are read, so the repo's ``multimodal_encoder/`` and ``tokenizer/`` (remote code) are
    left to the encoder loader. ``variant`` picks ``diffusion_pytorch_model.<variant>.safetensors``;
    nothing is downloaded.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from ..model.decoder import OFFICIAL_SCHEDULER_CONFIG
    from ..pipelines.visual_decoder import Emu2VisualDecoderPipeline

    path = Path(path)
    if not (path / "unet").is_dir():
        raise FileNotFoundError(
            f"{path} has no unet/ folder; expected a local diffusers layout (unet/, vae/, scheduler/)"
        )
    load = {"local_files_only": True, "dtype": dtype}
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", variant=_variant(path / "unet", variant), **load
    )
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(
            path, subfolder="vae", variant=_variant(path / "vae", variant), **load
        )
    if (path / "scheduler").is_dir():
        scheduler = EulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
    else:
        scheduler = EulerDiscreteScheduler.from_config(OFFICIAL_SCHEDULER_CONFIG)
    extras = {}
    if with_safety_checker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        extras["safety_checker"] = StableDiffusionSafetyChecker.from_pretrained(
            path / "safety_checker", local_files_only=True, dtype=dtype
        )
        extras["feature_extractor"] = CLIPImageProcessor.from_pretrained(path / "feature_extractor")
    return Emu2VisualDecoderPipeline(unet=unet, scheduler=scheduler, vae=vae, **extras)


def _first(keys: list[str], n: int = 20) -> str:
    return str(keys[:n]) + (" ..." if len(keys) > n else "")


def _variant(folder: Path, variant: str | None) -> str | None:
    """The requested weight variant if its file is there, else the plain file (our saves have none)."""
    if variant and any(
        f.name.split(".")[-2:-1] == [variant] for f in folder.glob("diffusion_pytorch_model*")
    ):
        return variant
    return None
