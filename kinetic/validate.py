"""Range checks for config values: the helpers every task uses, and the run's own keys.

Each `check_*` function validates one value and returns it, raising `ConfigError` whose message
names the key, the value and what is valid, e.g. ``Invalid train.steps: 0; expected an int >=
1``; tasks check their own keys with them. `check_run_keys` and `validate_train` check the
run's root keys and `train` group; `kinetic.configure.validate_config` checks a whole composed
config with them and with what the chosen task registered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kinetic.errors import ConfigError

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_probability",
    "check_run_keys",
    "validate_train",
]


def _interval(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    """`in [low, high)`, `>= low`, ... (ints as they are, floats in %g)."""
    show = (lambda v: str(v)) if isinstance(low, int) or isinstance(high, int) else "{:g}".format
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"in {left}{show(low)}, {show(high)}{right}"
    if low is not None:
        return f"{'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {show(high)}"
    return "finite"


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (either bound may be None); bools are refused."""
    expected = f"expected an int {_interval(low, high, False, False)}".rstrip()
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
    expected = f"expected a float {_interval(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
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
    if not isinstance(value, bool):
        raise ConfigError(f"Invalid {key}: {value!r}; expected true or false")
    return value


def _get(node: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    return node.get(key, default)


# --- groups -------------------------------------------------------------------------------


def check_run_keys(cfg: Mapping[str, Any]) -> None:
    """The root keys: seed, threads, and the run-lifecycle keys resume, overwrite, debug."""
    check_int("seed", cfg.get("seed", 0), 0, 2**63 - 1)
    check_int("threads", cfg.get("threads", 1), 1)
    resume = cfg.get("resume")
    if resume is not None and (not isinstance(resume, str) or not resume):
        raise ConfigError(
            f"Invalid resume: {resume!r}; expected auto (the latest checkpoint of the run "
            "directory) or the path of a checkpoint file"
        )
    overwrite = check_bool("overwrite", cfg.get("overwrite", False))
    check_bool("debug", cfg.get("debug", False))
    if resume is not None and overwrite:
        raise ConfigError(
            f"resume={resume} and overwrite=true contradict each other: resume continues the "
            "run in the run directory, overwrite starts a new one there; pass one of them"
        )


def validate_train(node: Mapping[str, Any], lr_schedules: Sequence[str] | None) -> None:
    """`train`: steps, intervals (eval_every and checkpoint_every: 0 = never), clipping, the LR
    schedule (one of the task's `lr_schedules`; None: not checked here) and its warm-up,
    checkpointing."""
    steps = check_int("train.steps", _get(node, "steps"), 1)
    check_int("train.log_every", _get(node, "log_every"), 1)
    check_int("train.eval_every", _get(node, "eval_every"), 0)
    check_int("train.checkpoint_every", _get(node, "checkpoint_every", 0), 0)
    check_int("train.keep_checkpoints", _get(node, "keep_checkpoints", 1), 1)
    check_float("train.clip_grad_norm", _get(node, "clip_grad_norm", 0.0), 0.0)
    if lr_schedules is not None:
        check_choice("train.lr_schedule", _get(node, "lr_schedule"), lr_schedules)
    check_int("train.warmup_steps", _get(node, "warmup_steps", 0), 0, steps)
