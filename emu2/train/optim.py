"""Module groups, AdamW parameter groups with per-group learning rates, and the warm-up + decay schedule.

Every recipe stage but the encoder's builds its optimizer here (`build_optimizer`; the decoder stages
`build_decoder_optimizer`) and follows the one schedule, `emu2.lr_schedule.lr_factor` (`build_scheduler`).

Groups (paper 2.2.2): ``project`` (project_up + project_down, "the linear projection layer"), ``lm``
("Multimodal Modeling") and ``visual`` ("Visual Encoder"), each with its own peak learning rate, or frozen.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..lr_schedule import warmup_decay_schedule
from .config import GROUPS, OptimSection, TrainConfig

# Wrapper prefixes that DDP/FSDP/activation checkpointing/peft put in front of the model's own names.
_WRAPPERS = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|base_model\.model)\.")


def clean_name(name: str) -> str:
    """``module.base_model.model.language_model.x`` -> ``language_model.x``."""
    previous = None
    while previous != name:
        previous, name = name, _WRAPPERS.sub(r"\1", name)
    return name


def group_of(name: str) -> str:
    """The module group of a parameter name: ``project``, ``lm`` or ``visual``."""
    top = clean_name(name).split(".", 1)[0]
    if top in ("project_up", "project_down"):
        return "project"
    if top == "language_model":
        return "lm"
    if top == "visual":
        return "visual"
    raise ValueError(f"parameter {name!r} belongs to no module group {GROUPS}")


def freeze_groups(model: nn.Module, groups: list[str]) -> None:
    """No gradients for the parameters of ``groups`` (e.g. the vision encoder in stage 2, paper 2.2.2)."""
    for name, param in model.named_parameters():
        if group_of(name) in groups:
            param.requires_grad_(False)


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay on matrices only: not on norms, biases (1-D) or embeddings (tokens, positions, CLS)."""
    name = clean_name(name)
    if param.ndim < 2:
        return False
    return not name.endswith(("embed_tokens.weight", "pos_embed", "cls_token"))


def param_groups(model: nn.Module, optim: OptimSection, default_lr: float | None = None) -> list[dict]:
    """AdamW parameter groups: one (decay, no-decay) pair per trained module group.

    Each group dict carries ``group`` (module group) and ``decay`` (bool) so that logs and tests can find it;
    parameters without ``requires_grad`` are left out (frozen groups, LoRA's frozen base weights).
    ``default_lr``: lr of groups missing from ``optim.lr`` (LoRA adapters in a group the recipe left out).
    """
    buckets: dict[tuple[str, bool], list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((group_of(name), decays(name, param)), []).append(param)
    groups = []
    for (group, decay), params in sorted(buckets.items(), key=lambda kv: (GROUPS.index(kv[0][0]), not kv[0][1])):
        lr = optim.lr.get(group, default_lr)
        if lr is None:
            raise ValueError(f"no learning rate for trained group {group!r}: set optim.lr.{group} or freeze it")
        groups.append({"params": params, "lr": lr, "weight_decay": optim.weight_decay if decay else 0.0,
                       "group": group, "decay": decay})
    if not groups:
        raise ValueError("no trainable parameters: every group is frozen")
    return groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (paper 2.2.2) over `param_groups`, with the recipe's betas, eps and weight decay."""
    o = config.optim
    default_lr = max(o.lr.values()) if config.lora.enabled and o.lr else None
    return torch.optim.AdamW(param_groups(model, o, default_lr), betas=tuple(o.betas), eps=o.eps,
                             weight_decay=o.weight_decay)


def build_decoder_optimizer(unet: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over a decoder stage's UNet (``stage: decoder`` / ``video-decoder``): its one group ``unet`` at
    ``optim.lr.unet``, with the recipe's betas, eps and weight decay as in `build_optimizer`. Every trained UNet
    weight decays (paper 2.2.3 gives one weight decay for the decoder)."""
    o = config.optim
    params = [p for p in unet.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": params, "lr": o.lr["unet"], "group": "unet", "decay": True}],
                             betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's ``schedule`` (warm-up, decay) over ``steps``, as `emu2.lr_schedule.warmup_decay_schedule`."""
    return warmup_decay_schedule(optimizer, config.steps, config.warmup_steps, config.schedule.decay)
