"""Learning-rate schedules (a multiplier on every group's base lr, so on VRAdam's alpha_0)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from optim.validation import check_choice, check_int

SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, name: str, warmup_steps: int, total_steps: int) -> float:
    """The factor on the base lr after `step` optimizer steps: a linear warm-up over
    `warmup_steps`, then constant, or a linear or cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "constant":
        return 1.0
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"Unknown lr schedule: {name!r}; available: {', '.join(SCHEDULES)}")


def build_schedule(
    optimizer: Optimizer, name: str, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A `LambdaLR` following `lr_multiplier`; its arguments checked as `train.lr_schedule` and
    `train.warmup_steps` (the command line checks them, in the same words, before the run)."""
    check_choice("train.lr_schedule", name, SCHEDULES)
    check_int("train.warmup_steps", warmup_steps, 0, total_steps)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, name, warmup_steps, total_steps))
