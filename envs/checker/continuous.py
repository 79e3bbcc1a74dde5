"""`check_continuous_env`: the `check_env` of continuous environments, in the same words.

Seeded random rollouts with random distribution parameters (as an untrained policy would give)
check what the sampler and the losses rely on: attributes, features, that every trajectory
exits within ``max_steps``, finite forward log-densities of drawn actions, `backward_step`
undoing `step`, a finite backward log-density of the move that was taken (P_B must reach the
true parent), backward walks to s0, finite log-rewards, and target cell masses that sum to 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from envs.checker.messages import EnvCheckError
from envs.continuous import ContinuousEnv

__all__ = ["check_continuous_env"]


def _attributes(env: ContinuousEnv) -> list[str]:
    problems = []
    for name, low in (("state_dim", 1), ("action_dim", 1), ("max_steps", 1),
                      ("n_forward_params", 1), ("n_backward_params", 0)):  # fmt: skip
        value = getattr(env, name, None)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            problems.append(f"{name} is {value!r}; expected an int >= {low}")
    s0 = getattr(env, "s0", None)
    if not (isinstance(s0, Tensor) and s0.is_floating_point() and s0.shape == env.state_shape):
        problems.append(f"s0 is {s0!r}; expected a float tensor of shape (state_dim,)")
    return problems


def _finite(values: Tensor, n: int) -> bool:
    return isinstance(values, Tensor) and values.shape == (n,) and bool(values.isfinite().all())


@torch.no_grad()
def check_continuous_env(env: ContinuousEnv, n_trajectories: int = 64, seed: int = 0) -> None:
    """Check `env` against the `ContinuousEnv` contract; raise one `EnvCheckError` listing
    every problem found (see the module docstring)."""
    name = type(env).__name__
    problems = _attributes(env)
    if problems:
        raise EnvCheckError(name, problems)
    generator = torch.Generator(device=env.s0.device).manual_seed(seed)

    def params(n: int, width: int) -> Tensor:
        return torch.randn(n, width, generator=generator, device=env.s0.device)

    current = env.initial_states(n_trajectories)
    features = env.featurize(current)
    shaped = isinstance(features, Tensor) and features.dim() == 2
    if not (shaped and features.shape[0] == n_trajectories and bool(features.isfinite().all())):
        problems.append("featurize(initial_states(n)) must return a finite float (n, F) tensor")
    terminals = []
    for t in range(env.max_steps + 1):
        n = current.shape[0]
        forward = params(n, env.n_forward_params)
        moves, exits = env.forward_sample(current, forward, generator)
        if not _finite(env.forward_log_prob(current, forward, moves, exits), n):
            problems.append(
                f"forward_log_prob of the actions forward_sample drew at step {t} is not a "
                "finite (B,) tensor: every drawn action must have a finite log-density"
            )
        terminals.append(current[exits])
        stay = ~exits
        if not bool(stay.any()):
            break
        if t == env.max_steps:
            problems.append(
                f"{int(stay.sum())} of {n_trajectories} trajectories had not exited after "
                f"max_steps={env.max_steps} moves; forward_sample must force the exit by then"
            )
            break
        parents, moves = current[stay], moves[stay]
        children = env.step(parents, moves)
        back = env.backward_step(children, moves)
        if not torch.allclose(back, parents, atol=1e-5):
            problems.append(f"backward_step(step(s, a), a) differs from s at step {t}")
        checks = [("the fixed P_B", None)]
        if env.n_backward_params:
            checks.append(("a learned P_B", params(children.shape[0], env.n_backward_params)))
        for label, p in checks:
            log_pb = env.backward_log_prob(children, p, moves)
            if not _finite(log_pb, children.shape[0]):
                problems.append(
                    f"backward_log_prob with {label} of the move just taken (step {t}) is not "
                    "finite: P_B must give the true parent a finite log-density"
                )
        current = children
    if problems:
        raise EnvCheckError(name, problems)

    x = torch.cat(terminals)
    log_r = env.log_reward(x)
    if not _finite(log_r, x.shape[0]):
        problems.append("log_reward of the terminal states reached is not a finite (B,) tensor")
    # Walk back from the terminal states to s0 with the fixed P_B.
    walking = x
    for _ in range(env.max_steps + 1):
        walking = walking[~env.is_initial(walking)]
        if walking.shape[0] == 0:
            break
        moves = env.backward_sample(walking, None, generator)
        walking = env.backward_step(walking, moves)
    else:
        problems.append(
            f"backward walks with backward_sample did not reach s0 within max_steps="
            f"{env.max_steps} backward steps"
        )
    masses, outside = env.target_cell_masses()
    shape = tuple(bins for _, _, bins in env.eval_grid)
    total = float(np.sum(masses)) + outside
    if masses.shape != shape or not math.isclose(total, 1.0, abs_tol=1e-6):
        problems.append(
            f"target_cell_masses() gives shape {masses.shape} summing to {total:.6f} with the "
            f"outside mass; expected the eval_grid's shape {shape} and a total of 1"
        )
    if problems:
        raise EnvCheckError(name, problems)
