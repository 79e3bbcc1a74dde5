"""VRAdam's velocity measures s_t and the gate eta_t = alpha_0 / (1 + min(beta3 s_t, alpha_1)).

Every implementation of VRAdam (reference loop, fused CPU, Triton) reduces each param group to a
sum of squares and hands it here, so the gate is written once. Nothing here builds a tensor from
host data: hyperparameters enter as Python scalars (kernel arguments), so an LR scheduler that
changes ``lr`` every step costs no host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from optim.validation import ConfigError, check_choice

__all__ = [
    "NORMS",
    "NORM_SOURCES",
    "NORM_TIMINGS",
    "VELOCITIES",
    "GroupTensors",
    "check_options",
    "learning_rates",
    "measures",
]

NORMS = ("global", "group")
NORM_SOURCES = ("velocity", "grad")
VELOCITIES = ("sum", "mean", "precond")
NORM_TIMINGS = ("exact", "lagged")


@dataclass
class GroupTensors:
    """The tensors of one param group that have a gradient this step, with its hyperparameters.

    `hyper`: lr, beta1, beta2, beta3, lr_cutoff, eps, weight_decay, maximize (Python scalars).
    `state`: the group's own state (the lagged mode keeps s_{t-1} there as ``"velocity_measure"``).
    `numel` and `reduce` describe sharded parameters (see :mod:`optim.sharding`): the tensors
    are then this rank's shards, `numel` the group's global element count, and `reduce` sums the
    stacked per-group partial sums over the shards on the device; both None when unsharded.
    """

    hyper: dict
    state: dict = field(default_factory=dict)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    state_steps: list[Tensor] = field(default_factory=list)
    numel: int | None = None
    reduce: Callable[[Tensor], Tensor] | None = None


def check_options(norm: str, norm_source: str, velocity: str, norm_timing: str) -> None:
    """Validate VRAdam's enum options (one message style for the class and the functional)."""
    check_choice("norm", norm, NORMS)
    check_choice("norm_source", norm_source, NORM_SOURCES)
    check_choice("velocity", velocity, VELOCITIES)
    if velocity == "precond" and norm_source != "velocity":
        raise ConfigError(
            f"Invalid velocity: 'precond' with norm_source={norm_source!r}; 'precond' measures "
            "Adam's step m_hat/(sqrt(v_hat)+eps), so it needs norm_source='velocity'"
        )
    check_choice("norm_timing", norm_timing, NORM_TIMINGS)


def accumulation_dtype(groups: list[GroupTensors]) -> torch.dtype:
    """float64 when any parameter is float64 (float64 runs stay exact to float64), else float32."""
    wide = any(p.dtype == torch.float64 for g in groups for p in g.params)
    return torch.float64 if wide else torch.float32


def home_device(groups: list[GroupTensors]) -> torch.device:
    """The device of the first parameter: where eta_t and s_t live."""
    return next(g.params[0].device for g in groups if g.params)


def measures(
    groups: list[GroupTensors], sums: list[Tensor | None], *, norm: str, velocity: str
) -> list[Tensor]:
    """s_t per group from per-group sums of squares (None: a group without gradients).

    "mean" and "precond" divide by the number of elements that entered the sum (a Python int).
    Sharded groups sum their partial sums over the shards first, with one all-reduce.
    """
    dtype, device = accumulation_dtype(groups), home_device(groups)
    parts = [
        torch.zeros((), dtype=dtype, device=device)
        if s is None
        else s.to(device, dtype, non_blocking=True)
        for s in sums
    ]
    reduce = next((g.reduce for g in groups if g.reduce is not None), None)
    if reduce is not None:
        parts = list(reduce(torch.stack(parts)).unbind())
    counts = [sum(p.numel() for p in g.params) if g.numel is None else g.numel for g in groups]
    if norm == "global":
        total = torch.stack(parts).sum()
        if velocity != "sum":
            total = total / max(sum(counts), 1)
        return [total] * len(groups)
    if velocity == "sum":
        return parts
    return [s / max(n, 1) for s, n in zip(parts, counts, strict=True)]


def gate(measure: Tensor, hyper: dict) -> Tensor:
    """eta_t = alpha_0 / (1 + min(beta3 s, alpha_1)) for one group, hyperparameters as scalars."""
    return hyper["lr"] / (torch.clamp(measure * hyper["beta3"], max=hyper["lr_cutoff"]) + 1.0)


def learning_rates(
    groups: list[GroupTensors], sums: list[Tensor | None], *, norm: str, velocity: str
) -> tuple[Tensor, Tensor]:
    """(eta_t, s_t), each a (n_groups,) device tensor, from per-group sums of squares."""
    s = measures(groups, sums, norm=norm, velocity=velocity)
    eta = [gate(si, g.hyper) for si, g in zip(s, groups, strict=True)]
    return torch.stack(eta), torch.stack(s)
