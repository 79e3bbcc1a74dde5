"""HyperGrid: walk on an ``ndim``-dimensional grid of side ``height`` and stop anywhere.

The standard GFlowNet benchmark (Bengio et al., 2021, arXiv 2106.04399; torchgfn's
``HyperGrid``): each non-stop action increments one coordinate, every state is terminal,
and the reward has a plateau in each corner with a higher band inside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from envs.base import ConditionalEnv, Env
from kinetic.validate import ConfigError, check_float, check_int

__all__ = ["ConditionalHyperGrid", "HyperGrid"]


class HyperGrid(Env):
    r"""The ``height``\ :sup:`ndim` grid, built from the origin one unit step at a time.

    .. code-block:: text

        state   x ∈ {0, …, H−1}^D                     (long, (D,)), s0 = 0
        action  d < D: x_d += 1 (illegal at x_d = H−1);  d = D: stop (always legal)
        reward  R(x) = R0 + R1·∏_d 1[0.25 < |x_d/(H−1) − 0.5|]
                          + R2·∏_d 1[0.3 < |x_d/(H−1) − 0.5| < 0.4]

    The band tests are evaluated in exact integer arithmetic (``2|2x−(H−1)| > H−1`` and
    ``3(H−1) < 5|2x−(H−1)| < 4(H−1)``), so the reward is symmetric under ``x_d ↦ H−1−x_d``.
    torchgfn compares in float32 and agrees with this for every height except H ≡ 1 (mod 10)
    (11, 21, …), where float rounding drops one cell of the R2 band on one side.

    A mode is a state in the R2 band (reward R0 + R1 + R2, the maximum); the 2^D corners of
    the grid are the mode regions (``mode_region`` sets bit d when ``x_d`` is in the upper
    half). Terminal states are enumerated in row-major order: the flat index of ``x`` is
    ``Σ_d x_d · H^(D−1−d)`` (see `state_index`).

    Args:
        ndim: number of dimensions D (≥ 1). Default: 2.
        height: grid side H, the number of values per coordinate (≥ 2). Default: 8.
        R0: base reward everywhere (finite, > 0, so log R is finite). Default: 0.1.
        R1: extra reward on the corner plateaus (finite, ≥ 0). Default: 0.5.
        R2: extra reward on the bands inside the plateaus (finite, ≥ 0). Default: 2.0.
        device: where states live. Default: ``"cpu"``.
    """

    max_enumerable: int = 10_000_000

    def __init__(
        self,
        ndim: int = 2,
        height: int = 8,
        R0: float = 0.1,
        R1: float = 0.5,
        R2: float = 2.0,
        device: str | torch.device = "cpu",
    ) -> None:
        check_int("env.ndim", ndim, 1)
        check_int("env.height", height, 2)
        check_float("env.R0", R0, 0.0, low_open=True)
        check_float("env.R1", R1, 0.0)
        check_float("env.R2", R2, 0.0)
        self.ndim = ndim
        self.height = height
        self.R0, self.R1, self.R2 = float(R0), float(R1), float(R2)
        self.device = torch.device(device)

        self.n_actions = ndim + 1
        self.state_shape = (ndim,)
        self.state_dtype = torch.long
        self.s0 = torch.zeros(ndim, dtype=torch.long, device=self.device)
        self.max_steps = ndim * (height - 1)
        self._coords = torch.arange(max(ndim, height), device=self.device)
        # Lookup tables that keep the per-step methods to one or two operators each (the
        # sampler calls them on a few rows at every step, where operator count is the cost).
        self._one_hot = torch.eye(height, device=self.device)  # (H, H), row x = one-hot of x
        # (D + 1, D): row d adds 1 to coordinate d, row D (stop) is 0
        self._increments = torch.eye(ndim + 1, ndim, dtype=torch.long, device=self.device)
        # Row-major place values H^(D-1-d), for flat state indices.
        self._place = height ** torch.arange(ndim - 1, -1, -1, device=self.device)  # (D,)

    def __repr__(self) -> str:
        return (
            f"HyperGrid(ndim={self.ndim}, height={self.height}, R0={self.R0}, R1={self.R1}, "
            f"R2={self.R2}, device='{self.device}')"
        )

    # --- dynamics -----------------------------------------------------------------------

    def forward_mask(self, states: Tensor) -> Tensor:
        """Increments are legal below ``height − 1``; stop always: bool ``(B, ndim + 1)``."""
        return F.pad(states < self.height - 1, (0, 1), value=True)  # (B, D + 1)

    def backward_mask(self, states: Tensor) -> Tensor:
        """Decrementing coordinate d is legal above 0: bool ``(B, ndim)``."""
        return states > 0  # (B, D)

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Increment coordinate ``actions`` ``(B,)`` of `states` ``(B, D)``."""
        return states + self._increments[actions]

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Decrement coordinate ``actions`` ``(B,)`` of `states` ``(B, D)``."""
        return states - self._increments[actions]

    # --- reward and features ------------------------------------------------------------

    def reward(self, states: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """R(x) of `states` ``(B, D)`` as `dtype` ``(B,)``; see the class docstring."""
        span = self.height - 1
        dist = (2 * states - span).abs()  # (B, D), 2(H−1)·|x/(H−1) − 0.5|
        plateau = (2 * dist > span).all(dim=1)  # (B,)
        band = ((5 * dist > 3 * span) & (5 * dist < 4 * span)).all(dim=1)  # (B,)
        return self.R0 + self.R1 * plateau.to(dtype) + self.R2 * band.to(dtype)

    def log_reward(self, states: Tensor) -> Tensor:
        """log R(x), float32 ``(B,)``."""
        return self.reward(states).log()

    def featurize(self, states: Tensor) -> Tensor:
        """One-hot of each coordinate, concatenated: float32 ``(B, ndim * height)``."""
        return self._one_hot[states].flatten(1)  # (B, D·H)

    # --- exact evaluation ---------------------------------------------------------------

    @property
    def n_terminals(self) -> int:
        """Number of terminal states, ``height ** ndim``."""
        return self.height**self.ndim

    def state_index(self, states: Tensor) -> Tensor:
        """Row-major flat index of `states` ``(B, D)`` in `enumerate_terminals`, long ``(B,)``."""
        return (states * self._place).sum(dim=1)

    def enumerate_terminals(self) -> Tensor:
        """All ``height ** ndim`` states, row-major (last coordinate fastest), ``(N, D)``."""
        if self.n_terminals > self.max_enumerable:
            raise ValueError(
                f"{self!r} has {self.n_terminals} terminal states, more than "
                f"HyperGrid.max_enumerable = {self.max_enumerable}; exact evaluation is "
                "limited to grids with at most that many states"
            )
        flat = torch.arange(self.n_terminals, device=self.device)  # (N,)
        return flat.unsqueeze(1) // self._place % self.height  # (N, D)

    def true_distribution(self) -> Tensor:
        """The target R(x)/Z over `enumerate_terminals`, float64 ``(N,)``."""
        rewards = self.reward(self.enumerate_terminals(), dtype=torch.float64)  # (N,)
        return rewards / rewards.sum()

    @property
    def true_log_z(self) -> float:
        """log Z* = log Σ_x R(x), in closed form (`tempered_log_z` at β = 1)."""
        return self.tempered_log_z(1.0)

    def tempered_log_z(self, beta: float) -> float:
        """log Σ_x R(x)^β in closed form: R takes three values, on cells counted per axis
        (the band, the plateau around it, the rest), each a product over the D axes."""
        span = self.height - 1
        dist = (2 * torch.arange(self.height) - span).abs()  # (H,)
        n_plateau = int((2 * dist > span).sum()) ** self.ndim
        n_band = int(((5 * dist > 3 * span) & (5 * dist < 4 * span)).sum()) ** self.ndim
        levels = (
            (self.height**self.ndim - n_plateau, self.R0),
            (n_plateau - n_band, self.R0 + self.R1),
            (n_band, self.R0 + self.R1 + self.R2),
        )
        return math.log(sum(count * value**beta for count, value in levels if count))

    # --- modes --------------------------------------------------------------------------

    def is_mode(self, states: Tensor) -> Tensor:
        """States in the R2 band (reward R0 + R1 + R2), bool ``(B,)``."""
        span = self.height - 1
        dist = (2 * states - span).abs()  # (B, D)
        return ((5 * dist > 3 * span) & (5 * dist < 4 * span)).all(dim=1)

    def mode_region(self, states: Tensor) -> Tensor:
        """Corner of each state: bit d set when x_d is in the upper half, long ``(B,)``."""
        upper = (2 * states > self.height - 1).long()  # (B, D)
        return (upper << self._coords[: self.ndim]).sum(dim=1)


class ConditionalHyperGrid(HyperGrid, ConditionalEnv):
    r"""HyperGrid whose reward is tempered by a condition β, drawn per trajectory.

    .. code-block:: text

        condition  c = (β,), β ~ U[beta_min, beta_max] for each training trajectory
        reward     log R(x | β) = β · log R(x)   (R of `HyperGrid`)

    β < 1 flattens the target towards uniform, β > 1 sharpens it onto the modes; one
    conditional GFlowNet learns them all, with log Z(β). Evaluation is exact for each of the
    held-out `eval_betas` (L1, JSD and |log Z(β) − log Z*(β)| each). `log_reward` is the
    reward at β = 1.

    Args:
        beta_min, beta_max: the range training conditions are drawn from, 0 < min <= max.
            Default: 0.5 and 2.0.
        eval_betas: the conditions evaluation scores, each inside the range. Default:
            (0.5, 0.75, 1.0, 1.5, 2.0).
        ndim, height, R0, R1, R2, device: as `HyperGrid`.
    """

    condition_dim = 1

    def __init__(
        self,
        ndim: int = 2,
        height: int = 8,
        R0: float = 0.1,
        R1: float = 0.5,
        R2: float = 2.0,
        beta_min: float = 0.5,
        beta_max: float = 2.0,
        eval_betas: tuple[float, ...] | list[float] = (0.5, 0.75, 1.0, 1.5, 2.0),
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(ndim, height, R0, R1, R2, device)
        self.beta_min = check_float("env.beta_min", beta_min, 0.0, low_open=True)
        self.beta_max = check_float("env.beta_max", beta_max, self.beta_min)
        if isinstance(eval_betas, (int, float)) or len(eval_betas) == 0:
            raise ConfigError(
                f"Invalid env.eval_betas: {eval_betas!r}; expected a non-empty list of floats"
            )
        for beta in eval_betas:
            if not self.beta_min <= check_float("env.eval_betas", beta) <= self.beta_max:
                raise ConfigError(
                    f"Invalid env.eval_betas: {beta:g} lies outside the training range "
                    f"[env.beta_min, env.beta_max] = [{self.beta_min:g}, {self.beta_max:g}]"
                )
        self.eval_betas = tuple(float(beta) for beta in eval_betas)

    def __repr__(self) -> str:
        return (
            super()
            .__repr__()
            .replace("HyperGrid(", "ConditionalHyperGrid(", 1)
            .replace(", device", f", beta_min={self.beta_min}, beta_max={self.beta_max}, device")
        )

    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """β ~ U[beta_min, beta_max], float32 ``(n, 1)``."""
        u = torch.rand(n, 1, generator=generator, device=self.s0.device)
        return self.beta_min + (self.beta_max - self.beta_min) * u

    def conditional_log_reward(self, states: Tensor, conditions: Tensor) -> Tensor:
        """β · log R(x), float ``(B,)``."""
        return conditions[:, 0] * self.log_reward(states)

    def eval_conditions(self) -> Tensor:
        """`eval_betas` as ``(K, 1)``."""
        return torch.tensor(self.eval_betas, device=self.s0.device).unsqueeze(1)

    def condition_label(self, condition: Tensor) -> str:
        return f"beta={float(condition[0]):g}"
