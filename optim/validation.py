"""Hyperparameter checks shared by every optimizer here: one wording for every message.

Each check raises ``ValueError("Invalid <name>: <value>; expected <what>")``. Ranges are written
``not low <= x < high`` rather than ``x < low or x >= high`` so that NaN is rejected too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

__all__ = ["check_betas", "check_choice", "check_float", "check_lr"]


def check_float(
    name: str,
    value: float,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = True,
) -> None:
    """`value` is a float in the interval from `low` to `high` (bounds closed unless open_*)."""
    above = low < value if open_low else low <= value
    below = value < high if open_high else value <= high
    if isinstance(value, (Tensor, bool)) or not (above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; expected a float in {interval}")


def check_lr(lr: float) -> None:
    """A learning rate: a Python float in (0, inf)."""
    check_float("lr", lr, open_low=True)


def check_betas(betas: Sequence[float]) -> None:
    """Adam's (beta1, beta2): a pair of floats in [0, 1)."""
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
    for i, beta in enumerate(betas):
        check_float(f"betas[{i}]", beta, 0.0, 1.0)


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(choices)}")
