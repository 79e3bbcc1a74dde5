"""GFlowNets on continuous environments (`envs.continuous.ContinuousEnv`): sampling, the
log-densities the losses score, and histogram evaluation (the task is
`gfn.task.ContinuousGFlowNetTask`).

The trajectory layout is the discrete sampler's (`gfn.sampler.Trajectories`, time-major, rows
past s_n repeating the terminal state) with real moves: ``actions`` is float
``(T, B, action_dim)``, and the exit is the row t = n_b (its move vector is unused). The
losses' inputs are the same `TrajectoryLogProbs` (log-densities for moves, log-probabilities
for exits), so tb, db, subtb and zvar apply unchanged.

Evaluation (`histogram_metrics`): N terminal samples are histogrammed on the environment's
`eval_grid` and compared with the exact target mass of each cell (plus one cell for the mass
outside the grid): ``jsd`` (nats) and ``l1`` over cells. Both have a floor from N samples alone,
``jsd_floor`` and ``l1_floor``: the same figures for N exact draws of the target's cell masses.
For literature comparison, ``jsd_kde`` is torchgfn's estimator for Box: a kernel density of
10,000 samples (exponential kernel, bandwidth 0.1) and the reward, both normalised on a
100×100 grid of points.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from envs.continuous import ContinuousEnv
from gfn.evaluation import grid_pair_image, jensen_shannon_divergence
from gfn.policies import GFlowNet
from gfn.sampler import Trajectories, TrajectoryLogProbs, _scatter_visited

__all__ = [
    "continuous_log_probs",
    "heatmap",
    "histogram_metrics",
    "sample_continuous",
]

EVAL_CHUNK = 50_000


def sample_continuous(
    gflownet: GFlowNet, env: ContinuousEnv, n: int, generator: torch.Generator
) -> Trajectories:
    """`n` trajectories from s0 with P_F, vectorized over the batch, without autograd.

    Only running trajectories are evaluated at each step; the loop syncs with the host once
    per step (whether any trajectory still runs).
    """
    with torch.inference_mode():
        current = env.initial_states(n)
        device = current.device
        states = current.new_empty((env.max_steps + 2, n, env.state_dim))
        actions = current.new_zeros((env.max_steps + 1, n, env.action_dim))
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        states[0] = current
        running = torch.arange(n, device=device)
        for t in range(env.max_steps + 1):
            params = gflownet(env.featurize(current)).pf_logits
            moves, exits = env.forward_sample(current, params, generator)
            actions[t, running] = moves
            moving = (~exits).nonzero().squeeze(1)  # syncs
            lengths[running] = torch.where(exits, t, lengths[running])  # no sync
            if moving.numel() == 0:
                break
            if t == env.max_steps:
                raise RuntimeError(
                    f"{moving.numel()} trajectories of {type(env).__name__} had not exited after "
                    f"max_steps={env.max_steps} moves"
                )
            running = running[moving]
            current = env.step(current[moving], moves[moving])
            states[t + 1, running] = current
        n_rows = t + 1
        terminal = states[lengths, torch.arange(n, device=device)]  # (n, D)
        rows = torch.arange(n_rows + 1, device=device).unsqueeze(1)
        states = torch.where((rows <= lengths).unsqueeze(2), states[: n_rows + 1], terminal)
        log_rewards = env.log_reward(terminal)
    return Trajectories(
        states.clone(), actions[:n_rows].clone(), lengths.clone(), terminal.clone(),
        log_rewards.clone(),
    )  # fmt: skip


def continuous_log_probs(
    gflownet: GFlowNet, env: ContinuousEnv, trajectories: Trajectories
) -> TrajectoryLogProbs:
    """log P_F, log P_B (densities of moves; probabilities of exits) and log F along
    `trajectories`, from one trunk pass over the visited states s_0..s_{n_b}, with autograd.

    Row t of log_pf scores the action at s_t (the exit at t = n_b); row t of log_pb scores
    undoing move t from s_{t+1} (0 at the exit and on padding), as `trajectory_log_probs`."""
    moves = trajectories.actions  # (T, B, A)
    n_steps, batch = moves.shape[:2]
    visited = trajectories.state_mask()  # (T, B)
    states = trajectories.states[:n_steps][visited]  # (N, D)
    flat_moves = moves[visited]  # (N, A)
    rows = torch.arange(n_steps, device=moves.device).unsqueeze(1)
    exits = (rows == trajectories.lengths)[visited]  # (N,)
    out = gflownet(env.featurize(states))
    flat_log_pf = env.forward_log_prob(states, out.pf_logits, flat_moves, exits)  # (N,)
    log_pf = _scatter_visited(flat_log_pf, visited)

    # P_B at s_t scores the move a_{t-1} that led into it (t >= 1); s0 has no parent.
    previous = torch.cat([torch.zeros_like(moves[:1]), moves[:-1]])[visited]  # (N, A)
    has_parent = (rows >= 1).expand(n_steps, batch)[visited]  # (N,)
    flat_log_pb = env.backward_log_prob(states, out.pb_logits, previous)
    flat_log_pb = torch.where(has_parent, flat_log_pb, 0.0)
    log_pb_states = _scatter_visited(flat_log_pb, visited)
    log_pb = torch.cat([log_pb_states[1:], log_pb_states.new_zeros(1, batch)])

    log_flows = None
    if out.log_flow is not None:
        log_flows = _scatter_visited(out.log_flow, visited)
    return TrajectoryLogProbs(log_pf, log_pb, log_flows)


def _histogram(env: ContinuousEnv, points: Tensor) -> np.ndarray:
    """Counts of `points` ``(N, d)`` per cell of `eval_grid`, then the count outside it."""
    grid = env.eval_grid
    cells = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
    inside = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    for d, (low, high, bins) in enumerate(grid):
        position = (points[:, d] - low) / (high - low) * bins
        inside &= (position >= 0) & (position <= bins)
        cells = cells * bins + position.long().clamp(0, bins - 1)
    n_cells = math.prod(bins for _, _, bins in grid)
    counts = torch.bincount(cells[inside], minlength=n_cells).double()
    outside = float((~inside).sum())
    return np.append(counts.cpu().numpy(), outside)


def _distances(counts: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(JSD, L1) between the normalised `counts` and the `target` masses."""
    p = torch.as_tensor(counts / counts.sum())
    q = torch.as_tensor(target)
    return float(jensen_shannon_divergence(p, q)), float((p - q).abs().sum())


def _kde_jsd(env: ContinuousEnv, points: Tensor, bandwidth: float = 0.1, side: int = 100) -> float:
    """torchgfn's Box estimator: an exponential-kernel density of `points` and the reward,
    each normalised over a side×side grid of points spanning the eval grid; their JSD."""
    axes = [torch.linspace(low, high, side, dtype=torch.float64) for low, high, _ in env.eval_grid]
    mesh = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(axes))
    x = points.double().cpu()
    density = torch.cat(
        [torch.exp(-torch.cdist(chunk, x) / bandwidth).sum(dim=1) for chunk in mesh.split(1000)]
    )
    target = env.target_density(mesh.float().to(env.s0.device)).double().cpu()
    p, q = density / density.sum(), target / target.sum()
    return float(jensen_shannon_divergence(p, q))


def histogram_metrics(
    env: ContinuousEnv, terminals: Tensor, generator: torch.Generator, kde_samples: int = 10_000
) -> dict[str, float]:
    """The histogram evaluation of the module docstring, from terminal states ``(N, D)``."""
    points = env.terminal_coordinates(terminals)
    counts = _histogram(env, points)
    masses, outside = env.target_cell_masses()
    target = np.append(masses.reshape(-1), outside)
    jsd, l1 = _distances(counts, target)
    # The floor: N exact draws of the cell masses (only the cells matter to a histogram).
    n = int(counts.sum())
    cells = torch.multinomial(
        torch.as_tensor(target), n, replacement=True, generator=generator
    )  # (N,)
    floor_counts = torch.bincount(cells, minlength=target.size).double().numpy()
    jsd_floor, l1_floor = _distances(floor_counts, target)
    metrics = {"jsd": jsd, "l1": l1, "jsd_floor": jsd_floor, "l1_floor": l1_floor}
    if len(env.eval_grid) == 2:
        metrics["jsd_kde"] = _kde_jsd(env, points[:kde_samples])
    return metrics


def heatmap(env: ContinuousEnv, terminals: Tensor, scale: int = 3) -> np.ndarray | None:
    """For a 2-D grid: the sample histogram (left) beside the target masses (right), one
    colour scale, the second coordinate pointing up: RGB."""
    if len(env.eval_grid) != 2:
        return None
    shape = tuple(bins for _, _, bins in env.eval_grid)
    counts = _histogram(env, env.terminal_coordinates(terminals))[:-1].reshape(shape)
    learned = counts / max(counts.sum(), 1.0)
    target = env.target_cell_masses()[0]
    return grid_pair_image(learned.T[::-1], target.T[::-1], scale)  # rows: y, top row highest
