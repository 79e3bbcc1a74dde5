"""Range checks for config values: the helpers every task uses, and the run's own keys.

Each `check_*` function validates one value and returns it, raising `ConfigError` whose message
names the key, the value and what is valid, e.g. ``Invalid train.steps: 0; expected an int >=
1``; tasks check their own keys with them. They are `optim.validation`'s (the one checks module
of every layer), re-exported here for the layers above the optimizers. `check_run_keys` and
`validate_train` check the run's root keys and `train` group;
`kinetic.configure.validate_config` checks a whole composed config with them and with what the
chosen task registered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from optim.validation import (
    ConfigError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_probability,
)

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_probability",
    "check_run_keys",
    "validate_train",
]


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
