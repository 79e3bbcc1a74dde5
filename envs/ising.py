"""Ising: a discrete energy-based model on an L×L periodic lattice, built one spin at a time.

The GFlowNet samples spin configurations x ∈ {−1, +1}^(L²) with probability ∝ exp(−β E(x))
(as torchgfn's ``DiscreteEBM`` with its Ising energy, and gfnx's Ising; Zhang et al. 2022,
arXiv 2202.01361). States carry 0 for a spin not yet set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from envs.base import Env
from kinetic.validate import check_choice, check_float, check_int

__all__ = ["Ising"]

ORDERS = ("any", "raster")


class Ising(Env):
    r"""Spin configurations on the L×L torus, with log R(x) = −β E(x), E(x) = −xᵀ J x.

    .. code-block:: text

        state   x ∈ {−1, 0, +1}^N, N = L², 0 = unset     (long, (N,)), s0 = 0
                site i is row i // L, column i % L
        action  a < N: x_a := −1;  N ≤ a < 2N: x_{a−N} := +1  (legal where that spin is unset)
                a = 2N: stop, legal only once every spin is set (as torchgfn's DiscreteEBM)
        order   "any": any unset spin may be set next (the state DAG has 3^N states);
                "raster": spins are set in index order 0, 1, …, N−1 (a tree of 2^(N+1) − 1
                states: one trajectory per configuration)
        energy  E(x) = −xᵀ J x,  J = J_c · (P + Pᵀ),  P = P_right + P_down,
                (P_right)_{i, right(i)} = 1, (P_down)_{i, down(i)} = 1, periodic boundaries
        reward  log R(x) = −β E(x) = 2 β J_c Σ_i x_i (x_right(i) + x_down(i))

    For L ≥ 3, J is J_c on each nearest-neighbour pair of the torus and 0 elsewhere, so
    −β E(x) = K Σ_⟨ij⟩ x_i x_j over the 2N bonds with K = 2 β J_c: J_c > 0 is ferromagnetic
    (aligned spins are rewarded; the two uniform configurations are the modes), J_c < 0
    antiferromagnetic. The 2-D Ising critical point is K_c = ½ log(1 + √2) ≈ 0.4407, i.e.
    β J_c ≈ 0.2203. For L = 2 the right and left neighbours coincide and the formula counts
    that pair twice, as the matrix does.

    Exact evaluation (``enumerable``): the state DAG is enumerated when it has at most
    `max_enumerable` states: L ≤ 3 with ``order="any"`` (3×3: 19,683 states), L ≤ 4 with
    ``order="raster"`` (4×4: 131,071 states, 2^16 terminals). With ``order="any"`` a 4×4
    lattice has 3^16 ≈ 43M states and about 4.6×10^8 edges, beyond exact evaluation. For
    L ≤ `transfer_max_side`, log Z and the mean log-reward under R/Z are exact by the
    row-to-row transfer matrix (`exact_log_z`, `exact_mean_log_reward`), which
    `sampled_metrics` compares the policy's samples with.

    Args:
        L: lattice side (≥ 2). Default: 3.
        J: coupling strength J_c (finite). Default: 1.0.
        beta: inverse temperature β (finite, ≥ 0). Default: 0.2.
        order: ``"any"`` or ``"raster"`` (see above). Default: ``"any"``.
        device: where states live. Default: ``"cpu"``.
    """

    max_enumerable: int = 2_000_000  # DAG states
    max_terminals: int = 2**20  # enumerate_terminals lists at most this many configurations
    transfer_max_side: int = 10  # transfer matrices of side 2^L

    def __init__(
        self,
        L: int = 3,
        J: float = 1.0,
        beta: float = 0.2,
        order: str = "any",
        device: str | torch.device = "cpu",
    ) -> None:
        check_int("env.L", L, 2)
        check_float("env.J", J)
        check_float("env.beta", beta, 0.0)
        check_choice("env.order", order, ORDERS)
        self.L, self.J, self.beta, self.order = L, float(J), float(beta), order
        self.device = torch.device(device)
        n = L * L
        self.n_sites = n
        self.n_actions = 2 * n + 1
        self.state_shape = (n,)
        self.state_dtype = torch.long
        self.s0 = torch.zeros(n, dtype=torch.long, device=self.device)
        self.max_steps = n
        sites = torch.arange(n, device=self.device)
        self._sites = sites
        row, col = sites // L, sites % L
        self._right = row * L + (col + 1) % L  # (N,)
        self._down = (row + 1) % L * L + col  # (N,)

    def __repr__(self) -> str:
        return (
            f"Ising(L={self.L}, J={self.J}, beta={self.beta}, order={self.order!r}, "
            f"device='{self.device}')"
        )

    # --- dynamics -----------------------------------------------------------------------

    def _next_site(self, states: Tensor) -> Tensor:
        """Raster order: the one site each state may set next, as a one-hot ``(B, N)``."""
        n_set = (states != 0).sum(dim=1, keepdim=True)  # (B, 1)
        return self._sites == n_set  # (B, N)

    def forward_mask(self, states: Tensor) -> Tensor:
        """Setting an unset spin to −1 or +1; stop once all are set: bool ``(B, 2N + 1)``."""
        unset = states == 0  # (B, N)
        if self.order == "raster":
            unset = unset & self._next_site(states)
        done = ~(states == 0).any(dim=1, keepdim=True)  # (B, 1)
        return torch.cat([unset, unset, done], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        """Unsetting a set spin (the last one set, in raster order): bool ``(B, 2N)``."""
        down, up = states == -1, states == 1  # (B, N)
        if self.order == "raster":
            n_set = (states != 0).sum(dim=1, keepdim=True)  # (B, 1)
            last = self._sites == n_set - 1  # (B, N)
            down, up = down & last, up & last
        return torch.cat([down, up], dim=1)

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Set spin ``actions % N`` to −1 (``actions < N``) or +1."""
        site = (actions % self.n_sites).unsqueeze(1)  # (B, 1)
        value = torch.where(actions < self.n_sites, -1, 1).unsqueeze(1)  # (B, 1)
        return torch.where(self._sites == site, value, states)

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Unset spin ``actions % N``."""
        site = (actions % self.n_sites).unsqueeze(1)  # (B, 1)
        return torch.where(self._sites == site, 0, states)

    # --- energy, reward and features ----------------------------------------------------

    @property
    def coupling_matrix(self) -> Tensor:
        """J = J_c (P + Pᵀ), float64 ``(N, N)`` (see the class docstring)."""
        n = self.n_sites
        p = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        p.index_put_((self._sites, self._right), torch.ones(n, dtype=p.dtype), accumulate=True)
        p.index_put_((self._sites, self._down), torch.ones(n, dtype=p.dtype), accumulate=True)
        return self.J * (p + p.T)

    def bond_sums(self, states: Tensor) -> Tensor:
        """Σ_i x_i (x_right(i) + x_down(i)) of `states` ``(B, N)``, long ``(B,)``; xᵀJx is
        2 J_c times this."""
        return (states * (states[:, self._right] + states[:, self._down])).sum(dim=1)

    def energy(self, states: Tensor) -> Tensor:
        """E(x) = −xᵀ J x of configurations `states` ``(B, N)``, float32 ``(B,)``."""
        return -2.0 * self.J * self.bond_sums(states).float()

    def log_reward(self, states: Tensor) -> Tensor:
        """log R(x) = −β E(x), float32 ``(B,)``."""
        return 2.0 * self.beta * self.J * self.bond_sums(states).float()

    def featurize(self, states: Tensor) -> Tensor:
        """One-hot of each spin's value (−1, unset, +1): float32 ``(B, 3N)``."""
        return torch.nn.functional.one_hot(states + 1, 3).flatten(1).float()

    # --- exact evaluation ---------------------------------------------------------------

    @property
    def n_states(self) -> int:
        """Number of states reachable from s0 (partial configurations included)."""
        if self.order == "raster":
            return 2 ** (self.n_sites + 1) - 1
        return 3**self.n_sites

    @property
    def enumerable(self) -> bool:
        """Whether exact evaluation is affordable: at most `max_enumerable` states."""
        return self.n_states <= self.max_enumerable and 2**self.n_sites <= self.max_terminals

    def enumerate_terminals(self) -> Tensor:
        """All 2^N configurations, ``(2^N, N)``: spin i of row k is +1 where bit N−1−i of k
        is set (so row 0 is all −1, the last row all +1)."""
        if 2**self.n_sites > self.max_terminals:
            raise ValueError(
                f"{self!r} has 2^{self.n_sites} configurations, more than Ising.max_terminals"
                f" = {self.max_terminals}; exact evaluation is limited to smaller lattices"
            )
        k = torch.arange(2**self.n_sites, device=self.device).unsqueeze(1)  # (2^N, 1)
        bits = k >> (self.n_sites - 1 - self._sites) & 1  # (2^N, N)
        return 2 * bits - 1

    def _transfer(self) -> tuple[Tensor, Tensor, Tensor, float]:
        """The symmetrised row-to-row transfer matrix, its eigenpairs and its scale.

        With K = 2 β J_c, log R = K Σ_r [h(σ_r) + v(σ_r, σ_{r+1})] over rows σ_r ∈ {±1}^L
        (h: bonds inside a row, v: bonds between consecutive rows, both periodic), so
        Z = Tr(S^L) with S[σ, τ] = exp(K G[σ, τ]), G[σ, τ] = h(σ)/2 + v(σ, τ) + h(τ)/2.
        Returns G, the eigenvalues and eigenvectors of S e^(−c), and c = max K G (float64).
        """
        side = self.L
        if side > self.transfer_max_side:
            raise ValueError(
                f"{self!r}: exact log Z by transfer matrix needs L <= Ising.transfer_max_side"
                f" = {self.transfer_max_side} (the matrix has side 2^L)"
            )
        n_rows = 2**self.L
        bits = torch.arange(n_rows).unsqueeze(1) >> torch.arange(self.L - 1, -1, -1) & 1
        rows = (2 * bits - 1).double()  # (2^L, L)
        inside = (rows * rows.roll(-1, dims=1)).sum(dim=1)  # (2^L,), h(σ)
        couplings = inside.unsqueeze(1) / 2 + rows @ rows.T + inside.unsqueeze(0) / 2  # G
        exponent = 2.0 * self.beta * self.J * couplings  # (2^L, 2^L)
        scale = float(exponent.max())
        eigenvalues, eigenvectors = torch.linalg.eigh((exponent - scale).exp())
        return couplings, eigenvalues, eigenvectors, scale

    def exact_log_z(self) -> float:
        """log Z = log Σ_x R(x), exact by the transfer matrix (L ≤ `transfer_max_side`)."""
        _, eigenvalues, _, scale = self._transfer()
        top = eigenvalues.abs().max()  # the Perron eigenvalue, > 0
        return float(self.L * (scale + top.log()) + (eigenvalues / top).pow(self.L).sum().log())

    def exact_mean_log_reward(self) -> float:
        """E_{x ~ R/Z}[log R(x)] = K d log Z / dK, exact by the transfer matrix.

        d Tr(S^L)/dK = L Tr(S^(L−1) (S ∘ G)), and Tr(S^(L−1) A) = Σ_k λ_k^(L−1) q_kᵀ A q_k
        from S's eigenpairs (exact under degenerate eigenvalues too).
        """
        k = 2.0 * self.beta * self.J
        couplings, eigenvalues, q, _ = self._transfer()
        top = eigenvalues.abs().max()
        s = (q * eigenvalues) @ q.T  # (2^L, 2^L), S e^(−c)
        projected = ((s * couplings) @ q * q).sum(dim=0)  # (2^L,), q_kᵀ (S ∘ G) q_k
        numerator = self.L * ((eigenvalues / top).pow(self.L - 1) * projected).sum() / top
        return float(k * numerator / (eigenvalues / top).pow(self.L).sum())

    def sampled_metrics(
        self, samples: Tensor, log_prob_fn: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """What the policy's samples look like, against the exact answer where it is cheap.

        Returns:
            ``mean_log_reward`` of `samples` (configurations, ``(M, N)``), ``energy_per_spin``
            (mean E(x)/N) and ``abs_magnetisation`` (mean |Σ_i x_i|/N); for
            L ≤ `transfer_max_side` also ``mean_log_reward_gap``, the exact mean log-reward
            under R/Z minus the sampled one (a perfect sampler gives 0 ± the sampling error,
            std(log R)/√M), and ``exact_log_z``, to read the learned log Z against.
        """
        log_r = self.log_reward(samples).double()  # (M,)
        metrics = {
            "mean_log_reward": float(log_r.mean()),
            "energy_per_spin": float(self.energy(samples).double().mean() / self.n_sites),
            "abs_magnetisation": float(samples.sum(dim=1).abs().double().mean() / self.n_sites),
        }
        side = self.L
        if side <= self.transfer_max_side:
            exact_log_z, exact_mean = self._exact_references()
            metrics["mean_log_reward_gap"] = exact_mean - metrics["mean_log_reward"]
            metrics["exact_log_z"] = exact_log_z
        return metrics

    def _exact_references(self) -> tuple[float, float]:
        """(exact log Z, exact mean log-reward), computed on first use and kept."""
        if not hasattr(self, "_references"):
            self._references = (self.exact_log_z(), self.exact_mean_log_reward())
        return self._references
