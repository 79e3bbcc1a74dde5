"""The one place where a refused value is checked and worded: `ConfigError` and the checks.

Every refused value, from the command line or from Python, raises `ConfigError` (a
`ValueError`) with one wording: ``Invalid <key>: <value>; expected <what is allowed>``, or for
a choice ``Unknown <key>: <value>; valid: <choices>``, the key named by its config path (e.g.
``train.steps``, ``task.replay.fraction``; an optimizer's by its argument name, which is its
`optim.<key>`). A value of the wrong type (a string from the command line, a bool, a tensor)
is refused in the same words. Ranges are tested so that NaN is refused too.

This module sits in the lowest layer (optim/), so that the optimizers, the core (kinetic/,
which re-exports it as `kinetic.validate` and `kinetic.errors`) and the tasks all check with
it. `train.py` shows a `ConfigError` as one line and exits with code 2.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from torch import Tensor

__all__ = [
    "ConfigError",
    "check_adam",
    "check_betas",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_lr",
    "check_probability",
    "keyword_parameters",
]


class ConfigError(ValueError):
    """A refused value: the message names the key, the value, what is allowed and so the fix.

    A subclass of `ValueError`, so code that catches the standard type keeps working.
    """


def _interval(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    """` in [low, high)`, ` >= low`, ... (ints as they are, floats in %g); "" without bounds."""
    show = (lambda v: str(v)) if isinstance(low, int) or isinstance(high, int) else "{:g}".format
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f" in {left}{show(low)}, {show(high)}{right}"
    if low is not None:
        return f" {'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {show(high)}"
    return ""


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (either bound may be None); bools are refused."""
    expected = f"expected an int{_interval(low, high, False, False)}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Invalid {key}: {value!r}; {expected}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"Invalid {key}: {value}; {expected}")
    return value


def check_float(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite float within the bounds (open or closed); NaN and inf are refused
    unless a bound is infinite (`high=math.inf, high_open=False` accepts inf)."""
    expected = f"expected a float{_interval(low, high, low_open, high_open)}"
    if low is None and high is None:
        expected = "expected a finite float"
    if isinstance(value, bool | Tensor) or not isinstance(value, numbers.Real):
        raise ConfigError(f"Invalid {key}: {value!r}; {expected}")
    value = float(value)
    inside = not math.isnan(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if inside and math.isinf(value) and not (high == math.inf and not high_open and value > 0):
        inside = False
    if not inside:
        raise ConfigError(f"Invalid {key}: {value:g}; {expected}")
    return value


def check_probability(key: str, value: Any, *, high_open: bool = False) -> float:
    """A probability in [0, 1] (or [0, 1) with `high_open`)."""
    return check_float(key, value, 0.0, 1.0, high_open=high_open)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of `choices` (compared with ==)."""
    if value not in choices:
        raise ConfigError(f"Unknown {key}: {value!r}; valid: {', '.join(str(c) for c in choices)}")
    return value


def check_bool(key: str, value: Any) -> bool:
    """True or False (a string such as ``optim.nesterov=yes`` is refused, not taken as true)."""
    if not isinstance(value, bool):
        raise ConfigError(f"Invalid {key}: {value!r}; expected true or false")
    return value


def check_lr(lr: float) -> None:
    """A learning rate: a Python float in (0, inf)."""
    check_float("lr", lr, 0.0, low_open=True)


def check_betas(betas: Sequence[float]) -> None:
    """Adam's (beta1, beta2): a pair of floats in [0, 1). A wrong sequence is shown as a list,
    as a config and the command line write it (``optim.betas=[0.9]``)."""
    sequence = isinstance(betas, Sequence) and not isinstance(betas, str)
    if not sequence or len(betas) != 2:
        shown = list(betas) if sequence else betas
        raise ConfigError(
            f"Invalid betas: {shown!r}; expected a pair [beta1, beta2] of floats in [0, 1)"
        )
    for i, beta in enumerate(betas):
        check_float(f"betas[{i}]", beta, 0.0, 1.0, high_open=True)


def check_adam(lr: float, betas: Sequence[float], eps: float, weight_decay: float) -> None:
    """The hyperparameters every Adam variant here shares: lr in (0, inf), betas a pair in
    [0, 1), eps in (0, inf), decoupled weight_decay in [0, inf)."""
    check_lr(lr)
    check_betas(betas)
    check_float("eps", eps, 0.0, low_open=True)
    check_float("weight_decay", weight_decay, 0.0)


def keyword_parameters(signature: inspect.Signature) -> list[str]:
    """The parameters of `signature` that a config key can name: those passable by keyword
    (not ``*args``, ``**kwargs`` or positional-only ones), in order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in signature.parameters.items() if p.kind in kinds]
