"""Hyperparameter checks shared by every optimizer here: one wording for every message.

Each check raises ``ValueError("Invalid <name>: <value>; expected <what>")``, also for a value of
the wrong type (a string from the command line, a bool, a tensor), so that `train.py` shows the
refusal as one line. Ranges are written ``not low <= x < high`` rather than ``x < low or
x >= high`` so that NaN is rejected too.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence

from torch import Tensor

__all__ = [
    "check_adam",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_float",
    "check_lr",
    "keyword_parameters",
]


def check_float(
    name: str,
    value: float,
    low: float = 0.0,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = True,
) -> None:
    """`value` is a real number (not a bool or a tensor) in the interval from `low` to `high`
    (bounds closed unless open_*)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, (Tensor, bool))
    above = number and (low < value if open_low else low <= value)
    below = number and (value < high if open_high else value <= high)
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; expected a float in {interval}")


def check_lr(lr: float) -> None:
    """A learning rate: a Python float in (0, inf)."""
    check_float("lr", lr, open_low=True)


def check_betas(betas: Sequence[float]) -> None:
    """Adam's (beta1, beta2): a pair of floats in [0, 1). A wrong sequence is shown as a list,
    as a config and the command line write it (``optim.betas=[0.9]``)."""
    sequence = isinstance(betas, Sequence) and not isinstance(betas, str)
    if not sequence or len(betas) != 2:
        shown = list(betas) if sequence else betas
        raise ValueError(
            f"Invalid betas: {shown!r}; expected a pair [beta1, beta2] of floats in [0, 1)"
        )
    for i, beta in enumerate(betas):
        check_float(f"betas[{i}]", beta, 0.0, 1.0)


def check_adam(lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """The hyperparameters every Adam variant here shares: lr in (0, inf), betas a pair in
    [0, 1), eps in (0, inf), decoupled weight_decay in [0, inf)."""
    check_lr(lr)
    check_betas(betas)
    check_float("eps", eps, open_low=True)
    check_float("weight_decay", weight_decay)


def check_bool(name: str, value: object) -> None:
    """`value` is True or False (a string such as ``optim.nesterov=yes`` is refused, not taken
    as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected true or false")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}; expected one of {', '.join(choices)}")


def keyword_parameters(signature: inspect.Signature) -> list[str]:
    """The parameters of `signature` that a config key can name: those passable by keyword
    (not ``*args``, ``**kwargs`` or positional-only ones), in order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in signature.parameters.items() if p.kind in kinds]
