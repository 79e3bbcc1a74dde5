"""Exact evaluation of a GFlowNet on an environment whose state DAG can be enumerated.

The sampler's terminal distribution p(x) is computed without sampling: probability mass
starts at s0 and is pushed along every legal forward edge, weighted by the policy's P_F,
in topological order; p(x) = P(reach x) · P_F(stop | x). It is compared with the target
p*(x) = R(x)/Z* over ``env.enumerate_terminals()``.

Conventions (stated once, used everywhere):

- ``l1`` is the full L1 distance Σ_x |p(x) − p*(x)|, in [0, 2]; ``tv`` = l1 / 2, in [0, 1].
  (torchgfn and several papers report the *mean* |p − p*| instead, i.e. l1 / N.)
- ``jsd`` is the Jensen–Shannon divergence in nats, ½ KL(p‖m) + ½ KL(p*‖m) with
  m = (p + p*)/2 and 0·log 0 = 0, in [0, log 2].
- ``log_z_error`` is |log Z − log Z*| for the learned log Z.
- A mode is *found* when a run has drawn it: mode counts are taken over the terminal
  states passed as ``visited``, not over the exact distribution.

The DAG (states in topological order, edges as index tensors) is built once per environment
object by a batched breadth-first search and cached, so repeated evaluation re-runs only the
policy and one vectorized mass push per DAG level. Environments are treated as immutable.

Where it runs: on the environment's device, the run's. The policy pass over every state of the
DAG (in chunks of `DEFAULT_BATCH_SIZE`) is the whole cost of an evaluation and is what a GPU does
best; the DAG's keys must live there anyway, since training marks visited terminal states with
`terminal_index` on the device without a host sync. Building the DAG syncs once per BFS level,
once per run. The mass push is float64 (probabilities of ~1e-6 states summed over ~1e5 edges),
one scatter per level: a few kernels, cheap even on GPUs with slow float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from envs.base import Env
from envs.rows import as_rows
from gfn.state_dag import (
    StateDAG,
    _cache_entry,
    _require_enumerable,
    _require_modes,
    implements,
    state_dag,
    terminal_index,
)

__all__ = [
    "StateDAG",
    "count_modes",
    "exact_metrics",
    "exact_terminal_distribution",
    "grid_pair_image",
    "jensen_shannon_divergence",
    "l1_distance",
    "log_z_error",
    "state_dag",
    "terminal_index",
    "total_variation",
    "true_terminal_distribution",
]

LogPFFn = Callable[[Tensor], Tensor]
"""``log_pf_fn(states (B, *state_shape)) -> (B, n_actions)`` masked forward log-probs."""

DEFAULT_BATCH_SIZE = 65_536

# --- exact distribution -------------------------------------------------------------------


@torch.no_grad()
def _policy_log_probs(env: Env, states: Tensor, log_pf_fn: LogPFFn, batch_size: int) -> Tensor:
    """``log_pf_fn`` over all `states` in chunks of `batch_size`: ``(N, n_actions)``."""
    chunks = []
    for start in range(0, states.shape[0], batch_size):
        batch = states[start : start + batch_size]
        out = log_pf_fn(batch)
        if not isinstance(out, Tensor) or out.shape != (batch.shape[0], env.n_actions):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"log_pf_fn must return (B, n_actions={env.n_actions}) log-probabilities, "
                f"got {got} for B={batch.shape[0]}"
            )
        chunks.append(out)
    return torch.cat(chunks)  # (N, A)


def exact_terminal_distribution(
    env: Env, log_pf_fn: LogPFFn, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[Tensor, Tensor]:
    """The terminal distribution of the forward policy, computed exactly (no sampling).

    P(reach s0) = 1; level by level, P(reach s') += P(reach s) · P_F(a | s) over the edges
    s → s' leaving that level; finally p(x) = P(reach x) · P_F(stop | x). Mass put on illegal
    actions by `log_pf_fn` is lost, so ``p.sum() < 1`` flags an unmasked policy.

    Args:
        env: an environment implementing ``enumerate_terminals``.
        log_pf_fn: ``states (B, *state_shape) -> (B, n_actions)`` masked forward
            log-probabilities (−inf on illegal actions); called under ``torch.no_grad()``
            on chunks of at most `batch_size` states (the caller picks train/eval mode).
        batch_size: the most states per `log_pf_fn` call.

    Returns:
        ``(terminals, p)``: ``env.enumerate_terminals()`` ``(T, *state_shape)`` (the cached
        tensor; do not modify it) and p, float64 ``(T,)`` aligned with it.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    dag = state_dag(env)
    log_pf = _policy_log_probs(env, dag.states, log_pf_fn, batch_size)  # (N, A)
    edge_prob = log_pf[dag.src, dag.action].double().exp()  # (E,)
    reach = torch.zeros(dag.n_states, dtype=torch.float64, device=log_pf.device)  # (N,)
    reach[0] = 1.0
    # One scatter per DAG level (not per state): parents of a level are all final by then.
    for level in range(dag.n_levels - 1):
        lo, hi = dag.edge_ptr[level], dag.edge_ptr[level + 1]
        if lo < hi:
            reach.index_add_(0, dag.dst[lo:hi], reach[dag.src[lo:hi]] * edge_prob[lo:hi])
    stop_prob = log_pf[dag.terminal_ids, env.stop_action].double().exp()  # (T,)
    return dag.terminals, reach[dag.terminal_ids] * stop_prob


def true_terminal_distribution(
    env: Env, batch_size: int = DEFAULT_BATCH_SIZE
) -> tuple[Tensor, float]:
    """The target p*(x) = R(x)/Z* over ``env.enumerate_terminals()`` and log Z*, cached.

    Returns:
        ``(p_star, log_z_star)``: float64 ``(T,)`` aligned with ``enumerate_terminals()``,
        and log Z* = logsumexp of ``env.log_reward`` over the terminals.
    """
    entry = _cache_entry(env)
    if entry.true is None:
        terminals = state_dag(env).terminals  # (T, *S)
        log_r = torch.cat(
            [
                env.log_reward(terminals[start : start + batch_size]).double()
                for start in range(0, terminals.shape[0], batch_size)
            ]
        )  # (T,)
        log_z_star = torch.logsumexp(log_r, dim=0)
        entry.true = ((log_r - log_z_star).exp(), float(log_z_star))
    return entry.true


# --- metrics ------------------------------------------------------------------------------


def _check_pair(p: Tensor, q: Tensor) -> None:
    if p.shape != q.shape:
        raise ValueError(
            f"distributions must have the same shape, got {tuple(p.shape)} and {tuple(q.shape)}"
        )


def l1_distance(p: Tensor, q: Tensor) -> Tensor:
    """Full L1 distance Σ|p − q| between distributions of the same shape, in [0, 2]."""
    _check_pair(p, q)
    return (p - q).abs().sum()


def total_variation(p: Tensor, q: Tensor) -> Tensor:
    """Total variation distance ½ Σ|p − q| = max_A |p(A) − q(A)|, in [0, 1]."""
    return 0.5 * l1_distance(p, q)


def jensen_shannon_divergence(p: Tensor, q: Tensor) -> Tensor:
    """JSD(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, in nats, in [0, log 2].

    Terms with p(x) = 0 (or q(x) = 0) contribute 0, so disjoint supports give log 2.
    """
    _check_pair(p, q)
    m = 0.5 * (p + q)
    xlogy = torch.special.xlogy
    kl_pm = (xlogy(p, p) - xlogy(p, m)).sum()
    kl_qm = (xlogy(q, q) - xlogy(q, m)).sum()
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


def grid_pair_image(left: np.ndarray, right: np.ndarray, scale: int) -> np.ndarray:
    """Two grids of probabilities (H, W) side by side on one colour scale (viridis), with a
    white column between them: an RGB image (scale·H, scale·(2W + 1), 3) in [0, 1]."""
    from matplotlib import colormaps  # imported only when an image is drawn

    top = max(float(left.max()), float(right.max())) or 1.0
    gap = np.full((left.shape[0], 1), np.nan)
    joined = np.concatenate([left, gap, right], axis=1) / top  # (H, 2W + 1)
    rgb = colormaps["viridis"](np.nan_to_num(joined))[..., :3]
    rgb[np.isnan(joined)] = 1.0
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1)


def log_z_error(log_z: float | Tensor, true_log_z: float | Tensor) -> float:
    """|log Z − log Z*| as a float (syncs with the host if given device tensors)."""
    return abs(float(log_z) - float(true_log_z))


def count_modes(env: Env, states: Tensor) -> tuple[int, int]:
    """Distinct modes and distinct mode regions among terminal `states` ``(B, *state_shape)``.

    Duplicates count once; `states` may be a batch or everything visited so far.

    Returns:
        ``(modes_found, mode_regions_found)``.
    """
    _require_modes(env)
    modes = states[env.is_mode(states)]  # (M, *S)
    n_modes = torch.unique(as_rows(modes), dim=0).shape[0]
    n_regions = torch.unique(env.mode_region(modes)).shape[0]
    return n_modes, n_regions


def exact_metrics(
    env: Env,
    log_pf_fn: LogPFFn,
    log_z: float | Tensor | None = None,
    visited: Tensor | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    target: tuple[Tensor, float] | None = None,
) -> dict[str, float]:
    """Exact distances between the sampler's terminal distribution and R/Z*, plus modes.

    Args:
        env: an environment implementing ``enumerate_terminals``.
        log_pf_fn: masked forward log-probabilities, see `exact_terminal_distribution`.
        log_z: the learned log Z; adds ``log_z_error``.
        visited: terminal states the run has drawn so far ``(M, *state_shape)``
            (duplicates allowed); adds ``modes_found`` and ``mode_regions_found``.
        batch_size: the most states per `log_pf_fn` call.
        target: ``(p_star, log_z_star)`` to compare with instead of the env's R/Z* (e.g. the
            target at one condition of a conditional environment), as
            `true_terminal_distribution` returns them.

    Returns:
        ``l1``, ``tv``, ``jsd`` (see the module docstring for conventions), the env's own
        ``distribution_metrics`` if it implements them, ``log_z_error``
        if `log_z` is given, ``n_modes`` and ``n_mode_regions`` (totals) if the env
        implements ``is_mode``/``mode_region``, and the ``*_found`` counts if `visited`
        is given.

    Raises:
        NotImplementedError: `env` lacks ``enumerate_terminals``, or `visited` is given
            and `env` lacks ``is_mode``/``mode_region``.
    """
    _require_enumerable(env)
    if visited is not None:
        _require_modes(env)
    terminals, p = exact_terminal_distribution(env, log_pf_fn, batch_size)  # (T,)
    p_star, log_z_star = target or true_terminal_distribution(env, batch_size)  # (T,)
    p_star = p_star.to(p.device)
    l1 = float(l1_distance(p, p_star))
    metrics = {"l1": l1, "tv": 0.5 * l1, "jsd": float(jensen_shannon_divergence(p, p_star))}
    if implements(env, "distribution_metrics"):
        metrics |= env.distribution_metrics(terminals, p, p_star)
    if log_z is not None:
        metrics["log_z_error"] = log_z_error(log_z, log_z_star)
    if implements(env, "is_mode") and implements(env, "mode_region"):
        entry = _cache_entry(env)
        if entry.mode_totals is None:
            entry.mode_totals = count_modes(env, state_dag(env).terminals)
        metrics["n_modes"], metrics["n_mode_regions"] = map(float, entry.mode_totals)
    if visited is not None:
        found = count_modes(env, visited)
        metrics["modes_found"], metrics["mode_regions_found"] = map(float, found)
    return metrics
