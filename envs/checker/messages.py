"""How `check_env` words what it finds: its error, and the helpers that describe a value, a
batch or a state in a problem's sentence (what was called, what it returned, what was expected
and the likely fix)."""

from __future__ import annotations

import torch
from torch import Tensor

from envs.base import Env
from kinetic.errors import ConfigError

PROBE_SIZE = 4  # copies of s0 the output checks call each method on, before any rollout
ROLLOUTS = " the rollouts reached"


class EnvCheckError(ConfigError):
    """`check_env` found problems: one sentence each, in ``problems`` and in the message (a
    user error: train.py refuses the run with it, exit code 2)."""

    def __init__(self, env_name: str, problems: list[str]) -> None:
        self.env_name, self.problems = env_name, list(problems)
        count = f"{len(problems)} problem{'' if len(problems) == 1 else 's'}"
        head = f"{env_name} does not meet the Env contract; check_env found {count}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


EnvCheckError.__module__ = "envs.checker"  # its public home, as tracebacks name it


def _show(x: Tensor | float, limit: int = 60) -> str:
    """A short literal for a state or a value in a message, e.g. ``[7, 6]``."""
    text = str(x.tolist()) if isinstance(x, Tensor) else str(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _which(bad: Tensor, noun: str) -> str:
    """'every <noun>' or 'some <noun>s', as `bad` holds everywhere or not."""
    return f"every {noun}" if bool(bad.all()) else f"some {noun}s"


def _states(n: int) -> str:
    return f"{n} state{'' if n == 1 else 's'}"


def _batch(states: Tensor, where: str = "") -> str:
    return f"a batch of {_states(states.shape[0])}{where}"


def _output_problems(env: Env, call: str, out: object, batch: str, n: int) -> list[str]:
    """What is wrong with what a mask or transition `call` returned for `n` states: not a
    tensor, or the wrong shape or dtype (those are what later calls rely on)."""
    if call.startswith(("forward_mask", "backward_mask")):
        backward = call.startswith("backward")
        shape, dtype, dtype_name = (n, env.n_actions - backward), torch.bool, "torch.bool"
        why = "(B, n_actions), one column per action with stop last"
        if backward:
            why = "(B, n_actions - 1): backward action a undoes forward action a, and there is no "
            why += "backward stop"
        fix, type_fix = "Return a boolean tensor, e.g. mask.bool().", ""
    else:
        shape, dtype = (n, *env.state_shape), env.state_dtype
        dtype_name, why = f"state_dtype {dtype}", "(B, *state_shape), one state per row"
        fix = "Keep states in state_dtype, e.g. next_states.to(self.state_dtype)."
        type_fix = " Return only the states; rewards come from log_reward."
    if not isinstance(out, Tensor):
        return [
            f"{call} returned a {type(out).__name__} for {batch}; expected a {dtype} tensor of "
            f"shape {shape}.{type_fix}"
        ]
    problems = []
    if tuple(out.shape) != shape:
        problems.append(
            f"{call} returned shape {tuple(out.shape)} for {batch}; expected {shape} = {why}."
        )
    if out.dtype != dtype:
        problems.append(
            f"{call} returned dtype {out.dtype} for {batch}; expected {dtype_name}. {fix}"
        )
    return problems


def _raised_on_parents(err: Exception) -> str:
    return (
        f"forward_mask(p) or step(p, b) raised {type(err).__name__}: {_show(str(err))} on parents "
        "p = backward_step(s, b) of states s met on backward walks from terminal states; "
        "expected backward_mask(s)[b] to allow only real parents, on which every method works. "
        "Make backward_mask(s)[b] False where s has no parent by b."
    )
