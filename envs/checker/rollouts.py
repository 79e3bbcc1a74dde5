"""The states `check_env` checks: seeded random rollouts from s0, and the tensor helpers that
compare and pick states in them. Every method is called on a copy of the checker's states
(`_call`), so one that writes into its input cannot corrupt the check."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from envs.base import Env
from envs.checker.messages import ROLLOUTS, _batch, _output_problems
from envs.rows import as_rows, row_keys


def _call(method: Callable[..., object], states: Tensor, *args: Tensor) -> object:
    """``method(states, *args)`` on a copy of `states`, which the checker keeps using."""
    return method(states.clone(), *args)


def _rows(states: Tensor) -> Tensor:
    """States ``(B, *S)`` as rows ``(B, D)``; bools as uint8 (so torch.unique can sort them)."""
    rows = states.reshape(states.shape[0], math.prod(states.shape[1:]))
    return rows.to(torch.uint8) if rows.dtype == torch.bool else rows


def _same(a: Tensor, b: Tensor) -> Tensor:
    """Which rows of two state batches ``(B, *S)`` are equal, bool ``(B,)``; floats to rounding."""
    equal = torch.isclose(a, b) if a.is_floating_point() else a == b
    return equal.reshape(a.shape[0], math.prod(a.shape[1:])).all(dim=1)


def _keys(rows: Tensor) -> Tensor:
    """A 64-bit hash of each row ``(B, D)``, long ``(B,)`` (envs/rows.py; floats by their bits):
    cheaper than torch.unique(dim=0). Callers compare matched rows."""
    return row_keys(as_rows(rows))


def _smallest(*columns: Tensor) -> int:
    """Index of the lexicographically smallest row of `columns` side by side, each ``(B, k)``:
    a stable example for a message, whatever order the rollouts met the rows in."""
    dtype = torch.float64 if any(c.is_floating_point() for c in columns) else torch.long
    rows = torch.cat([c.to(dtype) for c in columns], dim=1)  # (B, Σk)
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    return int((inverse == 0).nonzero()[0, 0])


def _example(states: Tensor, bad: Tensor) -> Tensor:
    """The smallest of the `bad` rows of `states`."""
    return states[bad][_smallest(_rows(states[bad]))]


# --- random rollouts ----------------------------------------------------------------------


@dataclass
class Rollouts:
    """What seeded random rollouts from s0 met, in the order they met it.

    Attributes:
        states: every state visited, s0 and the final states included, ``(V, *state_shape)``.
        masks: ``forward_mask`` of each, bool ``(V, n_actions)``.
        depths: the number of non-stop actions each was reached with, long ``(V,)``.
        parents, actions, children: every transition taken, ``(E, *S)``, long ``(E,)``,
            ``(E, *S)``, with ``children = step(parents, actions)``.
        terminals: the state of each trajectory that took stop, ``(N, *S)``.
        problems: a malformed mask or state met on the way, which cut the rollouts short.
    """

    states: Tensor
    masks: Tensor
    depths: Tensor
    parents: Tensor
    actions: Tensor
    children: Tensor
    terminals: Tensor
    problems: list[str]


def random_rollouts(env: Env, n: int, generator: torch.Generator) -> Rollouts:
    """`n` trajectories from s0 taking uniformly random legal non-stop actions, vectorized.

    Trajectory b takes stop, where it is legal beside other actions, with probability b / n,
    so trajectory 0 goes as deep as the environment lets it and ``max_steps`` gets tested.
    A trajectory also ends where no action is legal, or after ``max_steps`` non-stop actions
    (`check_legal_actions` and `check_max_steps` report those).
    """
    stop, current = env.stop_action, env.initial_states(n)  # (n, *S)
    device = current.device
    p_stop = torch.arange(n, device=device) / n  # (n,)
    running = torch.arange(n, device=device)  # (B,), the trajectory of each current state
    states, masks, depths = [current[:0]], [], [running[:0]]
    parents, actions, children, terminals = [current[:0]], [running[:0]], [current[:0]], []
    problems: list[str] = []
    for depth in range(env.max_steps + 1):
        mask = _call(env.forward_mask, current)  # (B, A)
        problems = _output_problems(
            env, "forward_mask(states)", mask, _batch(current, ROLLOUTS), current.shape[0]
        )
        if problems:
            break
        states.append(current)
        masks.append(mask)
        depths.append(torch.full_like(running, depth))
        moves = mask[:, :stop]  # (B, A - 1)
        can_move = moves.any(dim=1) & (depth < env.max_steps)  # (B,)
        draw = torch.rand(current.shape[0], generator=generator).to(device)  # (B,)
        stops = mask[:, stop] & (~can_move | (draw < p_stop[running]))  # (B,)
        terminals.append(current[stops])
        go = can_move & ~stops  # (B,)
        if not go.any():
            break
        scores = torch.rand(moves.shape, generator=generator).to(device)  # (B, A - 1)
        action = scores.masked_fill(~moves, -1.0).argmax(dim=1)[go]  # (B',)
        parent = current[go]  # (B', *S)
        child = _call(env.step, parent, action)
        problems = _output_problems(
            env, "step(states, actions)", child, _batch(parent, ROLLOUTS), parent.shape[0]
        )
        if problems:
            break
        parents.append(parent)
        actions.append(action)
        children.append(child)
        current, running = child, running[go]
    return Rollouts(
        states=torch.cat(states),
        masks=torch.cat(masks)
        if masks
        else torch.zeros(0, env.n_actions, dtype=torch.bool, device=device),
        depths=torch.cat(depths),
        parents=torch.cat(parents),
        actions=torch.cat(actions),
        children=torch.cat(children),
        terminals=torch.cat([current[:0], *terminals]),
        problems=problems,
    )
