"""`check_env`: tell an environment's author, in plain sentences, where it breaks the Env contract.

In the spirit of gymnasium's env checker: small ``check_<property>`` functions, each returning
the problems it finds as sentences (what was called, what it returned, what was expected and
the likely fix), and `check_env`, which runs them all on seeded random rollouts and raises
one `EnvCheckError` listing every problem. Exceptions raised inside the environment's own
methods propagate unchanged, so their tracebacks point at the author's code. Methods are
always called on a copy of the checker's states, so one that writes into its input is
reported (`check_inputs_unchanged`) instead of corrupting the check.

The checks are split by concept: checks.py (the ``check_<property>`` functions), rollouts.py
(the seeded random rollouts they run on), messages.py (`EnvCheckError` and the wording).
"""

from __future__ import annotations

import torch

from envs.base import Env
from envs.checker.checks import (
    check_attributes,
    check_backward_step,
    check_backward_walks,
    check_devices,
    check_enumerate_terminals,
    check_featurize,
    check_initial_states,
    check_inputs_unchanged,
    check_legal_actions,
    check_log_reward,
    check_masks,
    check_max_steps,
    check_s0_has_no_parent,
    check_step,
)
from envs.checker.continuous import check_continuous_env
from envs.checker.messages import PROBE_SIZE, EnvCheckError
from envs.checker.rollouts import Rollouts, random_rollouts
from envs.continuous import ContinuousEnv
from kinetic.validate import check_int

__all__ = [
    "EnvCheckError",
    "Rollouts",
    "check_attributes",
    "check_backward_step",
    "check_backward_walks",
    "check_continuous_env",
    "check_devices",
    "check_enumerate_terminals",
    "check_env",
    "check_featurize",
    "check_initial_states",
    "check_inputs_unchanged",
    "check_legal_actions",
    "check_log_reward",
    "check_masks",
    "check_max_steps",
    "check_s0_has_no_parent",
    "check_step",
    "random_rollouts",
]


# --- all together -------------------------------------------------------------------------


@torch.no_grad()
def check_env(env: Env | ContinuousEnv, n_trajectories: int = 64, seed: int = 0) -> None:
    """Check `env` against the `Env` contract; raise one `EnvCheckError` listing every problem.

    A `ContinuousEnv` is checked by `check_continuous_env`. Checks the attributes, then the
    outputs of `initial_states`, the masks and `step` on
    `PROBE_SIZE` copies of s0, then runs `n_trajectories` seeded random rollouts
    (`random_rollouts`) and checks on them: legal actions, `max_steps`, that no method writes
    into its input, that `backward_step` and `backward_mask` undo `step`, backward walks to
    s0, `log_reward`, `featurize`, that every output stays on the states' device and, if
    implemented, `enumerate_terminals`. It stops early
    only where later checks cannot run. Cheap: about 10 ms for an 8x8 HyperGrid.

    Raises:
        EnvCheckError: one sentence per problem, in its message and in ``.problems``.
        ConfigError: `n_trajectories` is not an int >= 1.
    """
    check_int("n_trajectories", n_trajectories, 1)
    name = type(env).__name__
    if isinstance(env, ContinuousEnv):
        check_continuous_env(env, n_trajectories, seed)
        return
    if not isinstance(env, Env):
        raise EnvCheckError(name, [
            f"{name} is not a subclass of envs.base.Env; expected class {name}(Env), which "
            "also supplies initial_states, stop_action and the optional hooks."
        ])  # fmt: skip
    # The rollouts need these; nothing after them can run without.
    problems = check_attributes(env)
    if not problems:
        problems = check_initial_states(env)
    if not problems:
        probe = env.initial_states(PROBE_SIZE)  # (4, *S)
        problems = check_masks(env, probe)
    if not problems:
        moves = env.forward_mask(probe)[:, : env.stop_action]  # (4, A - 1)
        rows = moves.any(dim=1)  # (4,), where a non-stop action is legal
        if rows.any():
            problems = check_step(env, probe[rows], moves[rows].long().argmax(dim=1))
    if problems:
        raise EnvCheckError(name, problems)

    s0_parents = check_s0_has_no_parent(env)
    problems = [*s0_parents]
    rollouts = random_rollouts(env, n_trajectories, torch.Generator().manual_seed(seed))
    problems += rollouts.problems
    devices = check_devices(env, rollouts)
    if devices:  # the checks below compare outputs across methods, so they need one device
        raise EnvCheckError(name, problems + devices)
    problems += check_legal_actions(env, rollouts)
    problems += check_max_steps(env, rollouts)
    problems += check_inputs_unchanged(env, rollouts)
    backward = check_backward_step(env, rollouts)
    problems += backward
    if not (s0_parents or backward):  # the walks presume both hold
        problems += check_backward_walks(env, rollouts, torch.Generator().manual_seed(seed + 1))
    reward = check_log_reward(env, rollouts.terminals)
    problems += reward + check_featurize(env, rollouts.states)
    terminals = None
    if getattr(env, "enumerable", True):  # an instance may declare itself too large to list
        try:
            terminals = env.enumerate_terminals()
        except NotImplementedError:  # optional: exact evaluation is off
            terminals = None
    if terminals is not None:
        listing = check_enumerate_terminals(env, terminals, rollouts)
        problems += listing
        if not (listing or reward):
            problems += check_log_reward(env, terminals, " that enumerate_terminals() listed")
    if problems:
        raise EnvCheckError(name, problems)
