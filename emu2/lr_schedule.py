"""The one learning-rate schedule of every training stage: linear warm-up, then cosine, linear or no decay.

Paper 2.2.2 (language-model stages) and Table 6 (visual decoder) both warm the rate up linearly and then decay it;
one definition serves every recipe stage (`emu2.train.optim.build_scheduler`) and a hand-written loop alike, so
both follow the same rates for the same numbers. It sits below every package (pure torch) so that any can import
it.
"""

from __future__ import annotations

import math

import torch

DECAYS = ("cosine", "linear", "constant")


def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Multiplier of the peak lr before optimizer step ``step + 1`` (``step`` updates done so far).

    Linear warm-up from 0 over ``warmup`` steps, then ``cosine`` or ``linear`` decay to zero at ``total``
    (``constant``: stay at the peak).
    """
    if step < warmup:
        return step / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_decay_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                          decay: str = "cosine") -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_factor` applied to every parameter group's peak lr (so groups keep their ratio, paper 2.2.2); step it
    once per optimizer step."""
    if decay not in DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; expected one of {DECAYS}")

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup_steps, decay)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
