"""Continuous GFlowNet environments: states in R^d, actions drawn from densities.

A continuous environment (Lahlou et al., ICML 2023, "A theory of continuous generative flow
networks", arXiv 2301.12594) keeps the discrete contract's shape (stateless, batched, s0 and
an exit action) but its actions are real vectors drawn from a distribution the policy
parametrises. The environment owns that distribution's geometry: which moves are legal from a
state, how raw network outputs become a density over them, how to draw from it with a seeded
generator and how to score an action, forward and backward. The framework's sampler and losses
then work with log-densities in place of log-probabilities; trajectory balance holds because
the forward and backward densities of a move are taken against the same reference measure.

Evaluation of a continuous environment compares histograms: the exact target mass of every
cell of `eval_grid` (`target_cell_masses`) against the policy's samples there
(`gfn.continuous`).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from envs.base import StateSpace
from kinetic.validate import ConfigError, check_float, check_int

__all__ = [
    "BetaMixture",
    "Box",
    "ContinuousEnv",
    "GaussianMixture",
    "Line",
    "sample_beta",
    "sample_gamma",
]

_EPS = 1e-4  # Beta samples are kept in [eps, 1 - eps], where their log-density is finite


# --- seeded draws --------------------------------------------------------------------------------


def sample_gamma(alpha: Tensor, generator: torch.Generator) -> Tensor:
    """Gamma(alpha, 1) draws, one per entry of `alpha` (> 0), from `generator` only.

    Marsaglia & Tsang (2000): for a >= 1, with d = a − 1/3, c = 1/√(9d), x ~ N(0, 1),
    v = (1 + c x)^3 and u ~ U(0, 1), accept d·v when v > 0 and
    log u < x²/2 + d − d v + d log v (acceptance >= 95%); for a < 1 draw Gamma(a + 1) and scale
    by u^(1/a). Rejected entries are redrawn (one host sync per round; rarely a second round).
    """
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(alpha)
    pending = torch.ones_like(alpha, dtype=torch.bool)
    while True:
        x = torch.empty_like(alpha).normal_(generator=generator)
        u = torch.empty_like(alpha).uniform_(generator=generator)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x * x + d - d * v + d * v.clamp_min(1e-30).log())
        take = pending & ok
        out = torch.where(take, d * v, out)
        pending = pending & ~ok
        if not bool(pending.any()):  # syncs
            break
    u = torch.empty_like(alpha).uniform_(generator=generator).clamp_min(1e-30)
    return torch.where(boost, out * u.pow(1.0 / alpha), out)


def sample_beta(a: Tensor, b: Tensor, generator: torch.Generator) -> Tensor:
    """Beta(a, b) draws as G_a / (G_a + G_b) of two Gamma draws."""
    ga, gb = sample_gamma(a, generator), sample_gamma(b, generator)
    return ga / (ga + gb)


def _pick(logits: Tensor, generator: torch.Generator) -> Tensor:
    """One mixture component per row of `logits` ``(B, K)``, by an exponential race."""
    races = torch.empty_like(logits).exponential_(generator=generator).clamp_min(1e-30)
    return (logits.softmax(dim=-1) / races).argmax(dim=-1)


class BetaMixture:
    """A mixture of K Betas on (0, 1), from raw network outputs ``(B, 3K)``: mixture logits,
    then the two concentrations, each mapped into [0.1, 10.1] by a sigmoid."""

    def __init__(self, params: Tensor) -> None:
        logits, raw_a, raw_b = params.chunk(3, dim=-1)  # (B, K) each
        self.logits = logits.log_softmax(dim=-1)
        self.a = 0.1 + 10.0 * torch.sigmoid(raw_a)
        self.b = 0.1 + 10.0 * torch.sigmoid(raw_b)

    @staticmethod
    def n_params(n_components: int) -> int:
        return 3 * n_components

    def sample(self, generator: torch.Generator) -> Tensor:
        k = _pick(self.logits, generator).unsqueeze(-1)  # (B, 1)
        a, b = self.a.gather(-1, k).squeeze(-1), self.b.gather(-1, k).squeeze(-1)
        return sample_beta(a, b, generator).clamp(_EPS, 1 - _EPS)  # (B,)

    def log_prob(self, u: Tensor) -> Tensor:
        """log density at `u` ``(B,)`` in (0, 1)."""
        u = u.clamp(_EPS, 1 - _EPS).unsqueeze(-1)  # (B, 1)
        log_beta = torch.lgamma(self.a + self.b) - torch.lgamma(self.a) - torch.lgamma(self.b)
        log_pdf = log_beta + (self.a - 1) * u.log() + (self.b - 1) * torch.log1p(-u)  # (B, K)
        return torch.logsumexp(self.logits + log_pdf, dim=-1)  # (B,)


class GaussianMixture:
    """A mixture of K Gaussians on R, from raw outputs ``(B, 3K)``: mixture logits, means
    (`scale` · tanh, so |μ| <= scale) and log standard deviations (clamped to [−5, 2])."""

    def __init__(self, params: Tensor, scale: float) -> None:
        logits, mean, log_std = params.chunk(3, dim=-1)
        self.logits = logits.log_softmax(dim=-1)
        self.mean = scale * torch.tanh(mean)
        self.log_std = log_std.clamp(-5.0, 2.0)

    @staticmethod
    def n_params(n_components: int) -> int:
        return 3 * n_components

    def sample(self, generator: torch.Generator) -> Tensor:
        k = _pick(self.logits, generator).unsqueeze(-1)
        noise = torch.empty_like(self.mean[..., 0]).normal_(generator=generator)
        mean = self.mean.gather(-1, k).squeeze(-1)
        return mean + self.log_std.gather(-1, k).squeeze(-1).exp() * noise  # (B,)

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x.unsqueeze(-1) - self.mean) / self.log_std.exp()  # (B, K)
        log_pdf = -0.5 * z * z - self.log_std - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(self.logits + log_pdf, dim=-1)


# --- the contract --------------------------------------------------------------------------------


class ContinuousEnv(StateSpace):
    """A continuous GFlowNet environment: float states ``(B, state_dim)``, real actions (the
    rest, `s0`, `max_steps`, `to` and the optional outputs, is `envs.base.StateSpace`'s).

    Attributes:
        state_dim: length of a state vector; ``state_shape = (state_dim,)``.
        action_dim: length of an action vector.
        s0: the initial state, float ``(state_dim,)``.
        max_steps: an upper bound on the moves (non-exit actions) of any trajectory.
        n_forward_params, n_backward_params: the policy's raw outputs the forward and the
            backward distribution read per state (`n_backward_params` = 0: P_B is fixed).

    A forward action is a move (an ``action_dim`` vector, applied by `step`) or the exit; the
    exit is a flag beside the vector. `backward_step(step(s, a), a) == s`.
    """

    state_dim: int
    action_dim: int
    n_forward_params: int
    n_backward_params: int
    state_dtype = torch.float32

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (self.state_dim,)

    @abstractmethod
    def featurize(self, states: Tensor) -> Tensor:
        """The policy's input, float ``(B, n_features)``."""

    @abstractmethod
    def forward_sample(
        self, states: Tensor, params: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Draw forward actions at non-terminal `states`: ``(moves (B, action_dim), exits
        (B,) bool)``; a row that exits has an arbitrary move vector."""

    @abstractmethod
    def forward_log_prob(
        self, states: Tensor, params: Tensor, moves: Tensor, exits: Tensor
    ) -> Tensor:
        """log P_F of the actions ``(moves, exits)`` at `states`, ``(B,)``: a log density for
        a move, a log probability for the exit."""

    @abstractmethod
    def backward_log_prob(self, states: Tensor, params: Tensor | None, moves: Tensor) -> Tensor:
        """log P_B of undoing `moves` from `states` (the parents are ``states − moves`` for a
        translation), ``(B,)``; `params` None: the fixed P_B."""

    @abstractmethod
    def backward_sample(
        self, states: Tensor, params: Tensor | None, generator: torch.Generator
    ) -> Tensor:
        """Draw the move that led into each non-initial state, ``(B, action_dim)``."""

    @abstractmethod
    def step(self, states: Tensor, moves: Tensor) -> Tensor:
        """Apply `moves` to `states`."""

    @abstractmethod
    def backward_step(self, states: Tensor, moves: Tensor) -> Tensor:
        """Undo `moves` from `states`: the parents."""

    @abstractmethod
    def log_reward(self, states: Tensor) -> Tensor:
        """log R of terminal states, float ``(B,)``."""

    # --- evaluation on a grid ---------------------------------------------------------------

    @property
    @abstractmethod
    def eval_grid(self) -> list[tuple[float, float, int]]:
        """The histogram the evaluation compares: ``(low, high, bins)`` per coordinate of
        `terminal_coordinates`."""

    def terminal_coordinates(self, states: Tensor) -> Tensor:
        """What a terminal state is, as histogram coordinates ``(B, len(eval_grid))``."""
        return states

    @abstractmethod
    def target_cell_masses(self) -> tuple[np.ndarray, float]:
        """The exact mass of R/Z in every cell of `eval_grid` (float64, the grid's shape),
        and the mass outside the grid."""

    @abstractmethod
    def target_density(self, points: Tensor) -> Tensor:
        """R at `points` ``(M, len(eval_grid))`` in terminal coordinates, for the kernel
        density comparison the literature reports."""

    @property
    def true_log_z(self) -> float | None:
        """log Z* = log ∫ R, where it is known in closed form."""
        return None


# --- Box -----------------------------------------------------------------------------------------


def _interval_overlap(edges: np.ndarray, low: float, high: float) -> np.ndarray:
    """Length of [edges[i], edges[i+1]] ∩ [low, high] for each cell, ``(bins,)``."""
    return np.clip(np.minimum(edges[1:], high) - np.maximum(edges[:-1], low), 0.0, None)


class Box(ContinuousEnv):
    r"""The 2-D box [0, 1]² of Lahlou et al. (2023), moved through in steps of length δ.

    .. code-block:: text

        state   s ∈ [0, 1]², s0 = (0, 0)
        s0      a move to any point of the quarter disk of radius δ (no exit): radius r = δ·u_r
                and angle θ = (π/2)·u_θ, u_r and u_θ each a mixture of Betas; its density in
                the plane is p(u_r) p(u_θ) / (δ · π/2 · r) (polar to Cartesian)
        s ≠ s0  exit with a learned probability, or move by δ(cos θ, sin θ) with θ in the
                angles that stay in the box, [arccos(min(1, (1−x)/δ)), arcsin(min(1, (1−y)/δ))],
                a Beta mixture rescaled to it (density p(u)/width, against dθ); where no angle
                fits, exit is forced (P_F(exit) = 1)
        P_B     from |s| < δ the only parent is s0 (log P_B = 0); otherwise an angle in
                [arccos(min(1, x/δ)), arcsin(min(1, y/δ))] (parents inside the box), learned
                (a Beta mixture) or uniform
        reward  R(x) = R0 + R1·∏_d 1[0.25 < |x_d − 0.5|] + R2·∏_d 1[0.3 < |x_d − 0.5| < 0.4]

    Forward and backward move densities are both against dθ (the plane for the first move and
    its certain way back), so trajectory balance holds in densities. A state is never reached
    twice by the same path of positive density, and any point of the box is terminal.

    Args:
        delta: the step radius δ, in (0, 1). Default: 0.25.
        R0, R1, R2: the reward's levels (R0 > 0). Defaults: 0.1, 0.5, 2.0.
        n_components: Beta mixture components of every move distribution (>= 1). Default: 4.
        bins: histogram cells per side for the evaluation (>= 2). Default: 100.
    """

    state_dim = 2
    action_dim = 2

    def __init__(
        self,
        delta: float = 0.25,
        R0: float = 0.1,
        R1: float = 0.5,
        R2: float = 2.0,
        n_components: int = 4,
        bins: int = 100,
        device: str | torch.device = "cpu",
    ) -> None:
        self.delta = check_float("env.delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        self.R0 = check_float("env.R0", R0, 0.0, low_open=True)
        self.R1 = check_float("env.R1", R1, 0.0)
        self.R2 = check_float("env.R2", R2, 0.0)
        self.n_components = check_int("env.n_components", n_components, 1)
        self.bins = check_int("env.bins", bins, 2)
        self.device = torch.device(device)
        self.s0 = torch.zeros(2, device=self.device)
        # Each move after the first adds at least δ to x + y <= 2.
        self.max_steps = 1 + math.floor(2.0 / self.delta)
        mix = BetaMixture.n_params(n_components)
        self.n_forward_params = 1 + mix + 2 * mix  # exit logit, angle | first radius, angle
        self.n_backward_params = mix

    def __repr__(self) -> str:
        return f"Box(delta={self.delta}, R0={self.R0}, R1={self.R1}, R2={self.R2})"

    def featurize(self, states: Tensor) -> Tensor:
        """(x, y), and whether the state is s0: float ``(B, 3)``."""
        return torch.cat([states, self.is_initial(states).unsqueeze(1).float()], dim=1)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        mix = BetaMixture.n_params(self.n_components)
        exit_logit = params[:, 0]
        angle, radius0, angle0 = params[:, 1:].split(mix, dim=1)
        return exit_logit, angle, radius0, angle0

    def _forward_angles(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """The angles of a full move that stay in the box: ``(low, high)``, each ``(B,)``."""
        low = torch.arccos(((1 - states[:, 0]) / self.delta).clamp(-1, 1))
        high = torch.arcsin(((1 - states[:, 1]) / self.delta).clamp(-1, 1))
        return low, high

    def _backward_angles(self, states: Tensor) -> tuple[Tensor, Tensor]:
        low = torch.arccos((states[:, 0] / self.delta).clamp(-1, 1))
        high = torch.arcsin((states[:, 1] / self.delta).clamp(-1, 1))
        return low, high

    def _unit(self, theta: Tensor) -> Tensor:
        return torch.stack([theta.cos(), theta.sin()], dim=1)

    def forward_sample(self, states, params, generator):
        exit_logit, angle, radius0, angle0 = self._split(params)
        initial = self.is_initial(states)
        low, high = self._forward_angles(states)
        forced = (low >= high) & ~initial  # no full move fits in the box
        u = torch.empty_like(exit_logit).uniform_(generator=generator)
        exits = ~initial & (forced | (u < torch.sigmoid(exit_logit)))
        theta = low + (high - low).clamp_min(0) * BetaMixture(angle).sample(generator)
        moves = self.delta * self._unit(theta)  # (B, 2)
        r = self.delta * BetaMixture(radius0).sample(generator)
        theta0 = 0.5 * math.pi * BetaMixture(angle0).sample(generator)
        first = r.unsqueeze(1) * self._unit(theta0)
        moves = torch.where(initial.unsqueeze(1), first, moves)
        return moves, exits

    def forward_log_prob(self, states, params, moves, exits):
        exit_logit, angle, radius0, angle0 = self._split(params)
        initial = self.is_initial(states)
        low, high = self._forward_angles(states)
        forced = (low >= high) & ~initial  # no full move fits in the box
        log_exit = torch.where(forced, 0.0, F.logsigmoid(exit_logit))
        log_stay = F.logsigmoid(-exit_logit)
        width = (high - low).clamp_min(1e-6)
        theta = torch.atan2(moves[:, 1], moves[:, 0])
        log_move = log_stay + BetaMixture(angle).log_prob((theta - low) / width) - width.log()
        # The first move, in the plane: u_r = r/δ, u_θ = θ/(π/2), Jacobian 1/(δ·π/2·r).
        r = moves.norm(dim=1).clamp_min(1e-12)
        log_first = (
            BetaMixture(radius0).log_prob(r / self.delta)
            + BetaMixture(angle0).log_prob(theta / (0.5 * math.pi))
            - math.log(self.delta * 0.5 * math.pi)
            - r.log()
        )
        log_move = torch.where(initial, log_first, log_move)
        return torch.where(exits, log_exit, log_move)

    def backward_log_prob(self, states, params, moves):
        to_s0 = states.norm(dim=1) < self.delta
        low, high = self._backward_angles(states)
        width = (high - low).clamp_min(1e-6)
        theta = torch.atan2(moves[:, 1], moves[:, 0])
        if params is None:
            log_pb = -width.log()
        else:
            log_pb = BetaMixture(params).log_prob((theta - low) / width) - width.log()
        return torch.where(to_s0, 0.0, log_pb)

    def backward_sample(self, states, params, generator):
        to_s0 = states.norm(dim=1) < self.delta
        low, high = self._backward_angles(states)
        if params is None:
            u = torch.empty_like(low).uniform_(generator=generator).clamp(_EPS, 1 - _EPS)
        else:
            u = BetaMixture(params).sample(generator)
        theta = low + (high - low).clamp_min(0) * u
        moves = self.delta * self._unit(theta)
        return torch.where(to_s0.unsqueeze(1), states, moves)

    def step(self, states, moves):
        return (states + moves).clamp(0.0, 1.0)

    def backward_step(self, states, moves):
        return (states - moves).clamp(0.0, 1.0)

    def reward(self, states: Tensor) -> Tensor:
        dist = (states - 0.5).abs()
        plateau = (dist > 0.25).all(dim=1)
        band = ((dist > 0.3) & (dist < 0.4)).all(dim=1)
        return self.R0 + self.R1 * plateau.to(states.dtype) + self.R2 * band.to(states.dtype)

    def log_reward(self, states: Tensor) -> Tensor:
        return self.reward(states).log()

    @property
    def eval_grid(self) -> list[tuple[float, float, int]]:
        return [(0.0, 1.0, self.bins)] * 2

    def target_cell_masses(self) -> tuple[np.ndarray, float]:
        """Exact: each reward term is a product over the axes of an indicator of a union of
        intervals, so a cell's integral is R0·area + R1·∏ overlap₁ + R2·∏ overlap₂."""
        edges = np.linspace(0.0, 1.0, self.bins + 1)
        area = np.diff(edges)
        plateau = _interval_overlap(edges, 0.0, 0.25) + _interval_overlap(edges, 0.75, 1.0)
        band = _interval_overlap(edges, 0.1, 0.2) + _interval_overlap(edges, 0.8, 0.9)
        mass = (
            self.R0 * np.outer(area, area)
            + self.R1 * np.outer(plateau, plateau)
            + self.R2 * np.outer(band, band)
        )
        return mass / mass.sum(), 0.0

    def target_density(self, points: Tensor) -> Tensor:
        return self.reward(points)

    @property
    def true_log_z(self) -> float:
        return math.log(self.R0 + self.R1 * 0.5**2 + self.R2 * 0.2**2)


# --- Line ----------------------------------------------------------------------------------------


class Line(ContinuousEnv):
    r"""A walk on the real line of exactly `n_steps` moves, rewarded by a Gaussian mixture.

    .. code-block:: text

        state   (x, t): position and moves taken, s0 = (init_value, 0)
        action  t < n_steps: a move Δ ∈ R, a Gaussian mixture (no exit);
                t = n_steps: exit, forced (P_F = 1)
        P_B     from t = 1 the parent is s0; otherwise a Gaussian mixture over Δ (learned) or
                N(0, 1) (fixed)
        reward  R(x) = Σ_i N(x; μ_i, σ_i²), so Z = (number of components) exactly

    Args:
        mus, sigmas: the reward's components (sigmas > 0, as many as mus). Defaults: (−2, 2),
            (0.5, 0.5).
        init_value: x at s0. Default: 0.
        n_steps: the fixed number of moves (>= 1). Default: 5.
        n_components: Gaussian mixture components of each move (>= 1). Default: 4.
        max_move: the most a component's mean moves in one step (> 0). Default: 3.
        bins: histogram cells for the evaluation (>= 2). Default: 200.
    """

    state_dim = 2
    action_dim = 1

    def __init__(
        self,
        mus: tuple[float, ...] | list[float] = (-2.0, 2.0),
        sigmas: tuple[float, ...] | list[float] = (0.5, 0.5),
        init_value: float = 0.0,
        n_steps: int = 5,
        n_components: int = 4,
        max_move: float = 3.0,
        bins: int = 200,
        device: str | torch.device = "cpu",
    ) -> None:
        mus, sigmas = list(mus), list(sigmas)
        if not mus or len(mus) != len(sigmas):
            raise ConfigError(
                f"env.mus and env.sigmas must be non-empty lists of one length, got {len(mus)} "
                f"and {len(sigmas)}"
            )
        self.mus = [check_float("env.mus", m) for m in mus]
        self.sigmas = [check_float("env.sigmas", s, 0.0, low_open=True) for s in sigmas]
        self.init_value = check_float("env.init_value", init_value)
        self.n_steps = check_int("env.n_steps", n_steps, 1)
        self.n_components = check_int("env.n_components", n_components, 1)
        self.max_move = check_float("env.max_move", max_move, 0.0, low_open=True)
        self.bins = check_int("env.bins", bins, 2)
        self.device = torch.device(device)
        self.s0 = torch.tensor([self.init_value, 0.0], device=self.device)
        self.max_steps = self.n_steps
        mix = GaussianMixture.n_params(n_components)
        self.n_forward_params = mix
        self.n_backward_params = mix
        self._mu = torch.tensor(self.mus, device=self.device)
        self._sigma = torch.tensor(self.sigmas, device=self.device)

    def __repr__(self) -> str:
        return f"Line(mus={self.mus}, sigmas={self.sigmas}, n_steps={self.n_steps})"

    def featurize(self, states: Tensor) -> Tensor:
        """x / 5 and the one-hot step count: float ``(B, 1 + n_steps + 1)``."""
        steps = torch.arange(self.n_steps + 1, device=states.device)
        one_hot = (states[:, 1:2].round() == steps).float()
        return torch.cat([states[:, :1] / 5.0, one_hot], dim=1)

    def forward_sample(self, states, params, generator):
        moves = GaussianMixture(params, self.max_move).sample(generator).unsqueeze(1)
        exits = states[:, 1] >= self.n_steps
        return moves, exits

    def forward_log_prob(self, states, params, moves, exits):
        log_move = GaussianMixture(params, self.max_move).log_prob(moves[:, 0])
        return torch.where(exits, 0.0, log_move)

    def backward_log_prob(self, states, params, moves):
        first = states[:, 1] <= 1
        if params is None:
            log_pb = -0.5 * moves[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
        else:
            log_pb = GaussianMixture(params, self.max_move).log_prob(moves[:, 0])
        return torch.where(first, 0.0, log_pb)

    def backward_sample(self, states, params, generator):
        if params is None:
            moves = torch.empty_like(states[:, 0]).normal_(generator=generator)
        else:
            moves = GaussianMixture(params, self.max_move).sample(generator)
        first = states[:, 1] <= 1
        return torch.where(first, states[:, 0] - self.init_value, moves).unsqueeze(1)

    def step(self, states, moves):
        return torch.stack([states[:, 0] + moves[:, 0], states[:, 1] + 1], dim=1)

    def backward_step(self, states, moves):
        parents = torch.stack([states[:, 0] - moves[:, 0], states[:, 1] - 1], dim=1)
        return torch.where(states[:, 1:2] <= 1, self.s0, parents)  # s0 exactly

    def log_reward(self, states: Tensor) -> Tensor:
        x = states[:, :1]
        z = (x - self._mu) / self._sigma
        log_pdf = -0.5 * z * z - self._sigma.log() - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(log_pdf, dim=1)

    def terminal_coordinates(self, states: Tensor) -> Tensor:
        return states[:, :1]

    @property
    def eval_grid(self) -> list[tuple[float, float, int]]:
        low = min(m - 5 * s for m, s in zip(self.mus, self.sigmas, strict=True))
        high = max(m + 5 * s for m, s in zip(self.mus, self.sigmas, strict=True))
        return [(low, high, self.bins)]

    def target_cell_masses(self) -> tuple[np.ndarray, float]:
        """Exact, from the components' normal CDFs."""
        low, high, bins = self.eval_grid[0]
        edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
        cdf = sum(
            torch.special.ndtr((edges - m) / s) for m, s in zip(self.mus, self.sigmas, strict=True)
        ) / len(self.mus)
        cells = torch.diff(cdf).numpy()
        return cells, float(1.0 - cells.sum())

    def target_density(self, points: Tensor) -> Tensor:
        states = torch.cat([points, torch.zeros_like(points)], dim=1)
        return self.log_reward(states).exp()

    @property
    def true_log_z(self) -> float:
        return math.log(len(self.mus))
