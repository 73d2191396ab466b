"""The model a stage trains: loaded from the previous stage (or a preset), adjusted, frozen, optionally LoRA.

Nothing here knows about distribution; `loop.train` hands the result to accelerate.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from emu2 import processing as P
from emu2.model import Emu2ForCausalLM
from emu2.model.kind import STAGE_KINDS, record_model_kind
from emu2.pipelines.emu2 import Emu2Pipeline

from .config import TrainConfig
from .optim import freeze_groups

log = logging.getLogger(__name__)

# Emu2Config fields a stage may change without touching tensor shapes.
_OVERRIDABLE = ("n_query", "v_query", "instruct", "text_loss_weight", "regression_loss_weight")


def build_model(config: TrainConfig) -> tuple[nn.Module, object]:
    """-> (model in train mode, tokenizer). The model is an `Emu2ForCausalLM`, or a peft model around one."""
    m = config.model
    if m.init_from is not None:
        pipe = Emu2Pipeline.from_pretrained(m.init_from, dtype=torch.float32)  # fp32 master weights
    else:
        pipe = Emu2Pipeline.from_preset(m.preset, seed=config.seed)
    model, tokenizer = pipe.model, pipe.tokenizer

    unknown = set(m.config_overrides) - set(_OVERRIDABLE)
    if unknown:
        raise ValueError(f"model.config_overrides may set {_OVERRIDABLE}, not {sorted(unknown)}")
    for key, value in m.config_overrides.items():
        setattr(model.config, key, value)
    if config.stage in STAGE_KINDS:  # saved with the stage output: evaluation follows what the model is
        record_model_kind(model.config, STAGE_KINDS[config.stage])
    if model.config.instruct:
        # Emu2-Chat adds [USER] and [ASSISTANT] (paper 2.3.1; a no-op when present): grow the tokenizer and the
        # embeddings.
        P.add_emu2_tokens(tokenizer, instruct=True)
    if len(tokenizer) > model.config.text_config.vocab_size:
        model.language_model.resize_token_embeddings(len(tokenizer))
    if m.image_size is not None and m.image_size != model.config.vision_config.image_size:
        resize_position_embedding(model, m.image_size)

    model.train()
    if m.activation_checkpointing:
        lm = model.language_model
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.visual.gradient_checkpointing = True
    freeze_groups(model, config.optim.freeze)
    if config.lora.enabled:
        model = add_lora(model, config)
    return model, tokenizer


def resize_position_embedding(model: Emu2ForCausalLM, image_size: int) -> None:
    """Bicubic interpolation of the ViT's patch position grid to ``image_size`` (CLS position kept)."""
    vision = model.config.vision_config
    if image_size % vision.patch_size:
        raise ValueError(f"model.image_size {image_size} is not a multiple of the patch size {vision.patch_size}")
    pos = model.visual.pos_embed.data  # (1, 1 + g*g, Dv)
    old, new = math.isqrt(pos.shape[1] - 1), image_size // vision.patch_size
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)
    model.visual.pos_embed = nn.Parameter(torch.cat([pos[:, :1], grid], dim=1))
    vision.image_size = image_size
    log.info("interpolated the vision position embedding from %dx%d to %dx%d patches", old, old, new, new)


def add_lora(model: Emu2ForCausalLM, config: TrainConfig) -> nn.Module:
    """Wrap with peft LoRA adapters; ``modules_to_save`` (the projections by default) train in full."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    frozen_projection = "project" in config.optim.freeze
    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=None if frozen_projection else (lora.modules_to_save or None),
    ))


def is_lora(model: nn.Module) -> bool:
    return type(model).__name__.startswith("Peft")


def base_model(model: nn.Module) -> Emu2ForCausalLM:
    """The `Emu2ForCausalLM` inside an (unwrapped) model, LoRA or not."""
    return model.get_base_model() if is_lora(model) else model


def merged_model(model: nn.Module) -> Emu2ForCausalLM:
    """The model to save as the stage output: LoRA adapters merged into the base weights."""
    return model.merge_and_unload() if is_lora(model) else model
