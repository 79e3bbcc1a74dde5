"""Bayesian structure learning: build a DAG edge by edge; the reward is its posterior score.

DAG-GFlowNet (Deleu et al., UAI 2022, arXiv 2202.13903): a state is a directed acyclic graph over
d nodes, an action adds one edge that keeps it acyclic (or stops), every state is terminal, and
R(G) = p(D | G) p(G), so the GFlowNet samples from the posterior over graphs p(G | D). The data D
is generated here, seeded, from a random linear-Gaussian ground truth: nothing is downloaded.

The score is BGe (Geiger & Heckerman 1994, in the form of Kuipers et al. 2014): the marginal
likelihood of the data under a Normal-Wishart prior, which decomposes over nodes,
log p(D | G) = Σ_j s(j, Pa_j). The d·2^(d-1) local scores are computed once, so log R of a batch
is one gather per node. The prior over graphs is uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from envs.base import Env
from kinetic.validate import ConfigError, check_bool, check_float, check_int

__all__ = ["DAGEnv", "bge_local_scores", "erdos_renyi_linear_gaussian", "transitive_closure"]

MAX_NODES = 12  # the local-score table has d·2^(d-1) entries (24,576 at d = 12)
MAX_EXACT_NODES = 5  # 29,281 DAGs on 5 nodes; 3,781,503 on 6 and 1.1e9 on 7
N_DAGS = {1: 1, 2: 3, 3: 25, 4: 543, 5: 29_281, 6: 3_781_503, 7: 1_138_779_265}


def transitive_closure(adjacency: Tensor) -> Tensor:
    """reach[b, i, j]: a directed path of length ≥ 1 leads from i to j; bool ``(B, d, d)``.

    Repeated squaring of the boolean adjacency ``(B, d, d)``: ⌈log2 d⌉ batched matmuls.
    """
    d = adjacency.shape[-1]
    reach = adjacency.bool()
    for _ in range(max(1, math.ceil(math.log2(max(d, 2))))):
        step = torch.matmul(reach.float(), reach.float()) > 0  # (B, d, d), paths through one hop
        reach = reach | step
    return reach


def erdos_renyi_linear_gaussian(
    n_nodes: int, n_edges: float, n_samples: int, noise_std: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A random linear-Gaussian Bayesian network and data drawn from it, all from `seed`.

    The graph is Erdős–Rényi over a random node order, each of the d(d−1)/2 ordered pairs an
    edge with probability ``n_edges / (d(d−1)/2)`` (so `n_edges` is the expected edge count);
    weights are N(0, 1); x_j = Σ_i w_ij x_i + ε_j with ε_j ~ N(0, noise_std²).

    Returns:
        ``(adjacency (d, d) int64, weights (d, d) float64, data (n_samples, d) float64)``.
    """
    rng = np.random.default_rng(seed)
    n_pairs = n_nodes * (n_nodes - 1) / 2
    p_edge = min(1.0, n_edges / n_pairs) if n_pairs else 0.0
    lower = np.tril(rng.random((n_nodes, n_nodes)) < p_edge, k=-1)  # edge j -> i for j < i
    order = rng.permutation(n_nodes)
    adjacency = lower.T[np.ix_(order, order)].astype(np.int64)  # (d, d), i -> j
    weights = adjacency * rng.normal(0.0, 1.0, size=(n_nodes, n_nodes))
    data = np.zeros((n_samples, n_nodes))
    topo = sorted(range(n_nodes), key=lambda j: _depth(adjacency, j))
    for j in topo:  # parents come before children
        data[:, j] = data @ weights[:, j] + rng.normal(0.0, noise_std, size=n_samples)
    return adjacency, weights, data


def _depth(adjacency: np.ndarray, node: int) -> int:
    """Length of the longest directed path ending at `node`."""
    parents = np.flatnonzero(adjacency[:, node])
    return 0 if parents.size == 0 else 1 + max(_depth(adjacency, int(p)) for p in parents)


def bge_local_scores(
    data: np.ndarray, alpha_mu: float = 1.0, alpha_w: float | None = None
) -> Tensor:
    """BGe local scores s(j, Pa) of every node j and every parent set Pa ⊆ V \\ {j}.

    With N samples of d variables, prior mean 0, T = t·I and t = α_μ(α_w − d − 1)/(α_μ + 1)
    (Kuipers et al. 2014, eq. 2 and 3), R = T + S_N + N α_μ/(N + α_μ) · x̄ x̄ᵀ, and k = |Pa|:
        s(j, Pa) = ½(log α_μ − log(N + α_μ)) + log Γ(½(N + α_w − d + k + 1))
                   − log Γ(½(α_w − d + k + 1)) − ½ N log π + ½(α_w − d + 2k + 1) log t
                   + ½(N + α_w − d + k) log|R_Pa,Pa| − ½(N + α_w − d + k + 1) log|R_Pa∪j|.
    Summed over the nodes of any DAG it is log p(D | G); on a complete DAG that is the
    Normal-Wishart marginal likelihood of the data, and Markov-equivalent DAGs score the same.

    Returns:
        float64 ``(d, 2^d)``: entry ``[j, mask]`` is s(j, {i : bit i of mask}); masks that
        contain j itself are -inf (never read).
    """
    n, d = data.shape
    alpha_w = float(d + 2) if alpha_w is None else float(alpha_w)
    t = alpha_mu * (alpha_w - d - 1) / (alpha_mu + 1)
    x = torch.as_tensor(data, dtype=torch.float64)
    mean = x.mean(dim=0, keepdim=True)  # (1, d)
    centered = x - mean
    r = t * torch.eye(d, dtype=torch.float64) + centered.T @ centered
    r = r + (n * alpha_mu / (n + alpha_mu)) * (mean.T @ mean)  # (d, d)

    masks = torch.arange(2**d)  # (M,)
    members = (masks.unsqueeze(1) >> torch.arange(d)) & 1  # (M, d), bit i of each mask
    sizes = members.sum(dim=1)  # (M,)
    # log|R_S,S| of every subset S, batched: R restricted to S, identity elsewhere.
    keep = members.bool()
    sub = torch.where(keep.unsqueeze(1) & keep.unsqueeze(2), r, 0.0)  # (M, d, d)
    sub = sub + torch.diag_embed((~keep).double())
    logdet = torch.linalg.slogdet(sub).logabsdet  # (M,)

    k = torch.arange(d, dtype=torch.float64)  # number of parents
    gamma = (
        0.5 * (math.log(alpha_mu) - math.log(n + alpha_mu))
        + torch.lgamma(0.5 * (n + alpha_w - d + k + 1))
        - torch.lgamma(0.5 * (alpha_w - d + k + 1))
        - 0.5 * n * math.log(math.pi)
        + 0.5 * (alpha_w - d + 2 * k + 1) * math.log(t)
    )  # (d,)
    scores = torch.full((d, 2**d), float("-inf"), dtype=torch.float64)
    for j in range(d):
        parents = masks[(members[:, j] == 0)]  # (2^(d-1),) sets without j
        kj = sizes[parents]
        with_j = parents | (1 << j)
        scores[j, parents] = (
            gamma[kj]
            + 0.5 * (n + alpha_w - d + kj) * logdet[parents]
            - 0.5 * (n + alpha_w - d + kj + 1) * logdet[with_j]
        )
    return scores


class DAGEnv(Env):
    r"""DAGs over ``n_nodes`` nodes, built one edge at a time, rewarded by their BGe posterior.

    .. code-block:: text

        state   adjacency A ∈ {0, 1}^(d×d), flattened (long, (d²,)); A[i, j] = 1: edge i → j;
                s0 = the empty graph
        action  a = i·d + j < d²: add i → j (legal when i ≠ j, A[i, j] = 0 and j does not
                reach i, so the graph stays acyclic);  a = d²: stop (always legal)
        reward  log R(G) = Σ_j s(j, Pa_j) − Σ_j s(j, ∅): the BGe log marginal likelihood
                (uniform prior) relative to the empty graph's, so log R(s0) = 0

    Every state is terminal, so `mdb` (the loss DAG-GFlowNet trains with) applies. The data is
    drawn from a seeded Erdős–Rényi linear-Gaussian network (`erdos_renyi_linear_gaussian`):
    ``true_graph`` holds its adjacency and ``data`` the samples the score is computed from. For
    d ≤ 5 the posterior is exact over all DAGs (29,281 at d = 5): the evaluation reports L1 and
    JSD over them and ``edge_marginal_error``, the mean over ordered pairs of
    |P(i → j) − P*(i → j)|. Samples of every evaluation give `sampled_metrics` (the expected
    structural Hamming distance to the true graph), all that larger graphs are evaluated by.

    Args:
        n_nodes: d, in [2, 12]. Default: 5.
        n_edges: expected number of edges of the ground-truth graph, in [0, d(d−1)/2]; None:
            d (capped there). Default: None.
        n_samples: observations in the dataset (≥ 2). Default: 100.
        noise_std: standard deviation of each node's Gaussian noise (> 0). Default: 1.0.
        seed: seeds the ground-truth graph, its weights and the data (not the run). Default: 0.
        alpha_mu: the BGe prior's α_μ (> 0). Default: 1.0.
        alpha_w: the BGe prior's α_w (> d + 1); None: d + 2. Default: None.
        exact: enumerate every DAG for exact evaluation; None: when d ≤ 5. Default: None.
        device: where states live. Default: ``"cpu"``.
    """

    summary_keys = ("edge_marginal_error", "expected_shd")

    def __init__(
        self,
        n_nodes: int = 5,
        n_edges: float | None = None,
        n_samples: int = 100,
        noise_std: float = 1.0,
        seed: int = 0,
        alpha_mu: float = 1.0,
        alpha_w: float | None = None,
        exact: bool | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        d = check_int("env.n_nodes", n_nodes, 2, MAX_NODES)
        if n_edges is None:
            n_edges = min(d, d * (d - 1) / 2)
        check_float("env.n_edges", n_edges, 0.0, d * (d - 1) / 2)
        check_int("env.n_samples", n_samples, 2)
        check_float("env.noise_std", noise_std, 0.0, low_open=True)
        check_int("env.seed", seed, 0)
        check_float("env.alpha_mu", alpha_mu, 0.0, low_open=True)
        if alpha_w is None:
            alpha_w = d + 2.0
        check_float("env.alpha_w", alpha_w, d + 1.0, low_open=True)
        if exact is None:
            exact = d <= MAX_EXACT_NODES
        elif check_bool("env.exact", exact) and d > MAX_EXACT_NODES:
            count = f"{N_DAGS[d]:,}" if d in N_DAGS else "over 1e9"
            raise ConfigError(
                f"env.exact=true needs env.n_nodes <= {MAX_EXACT_NODES}, got {d}: there are "
                f"{count} DAGs on {d} nodes; set env.exact=false (sampled evaluation)"
            )
        self.n_nodes, self.n_edges, self.n_samples = d, float(n_edges), n_samples
        self.noise_std, self.seed = float(noise_std), seed
        self.alpha_mu, self.alpha_w = float(alpha_mu), float(alpha_w)
        self.exact = bool(exact)
        self.device = torch.device(device)

        adjacency, weights, data = erdos_renyi_linear_gaussian(
            d, n_edges, n_samples, noise_std, seed
        )
        self.data = data  # (N, d) float64 numpy: what the score is computed from
        self.true_weights = weights
        self.true_graph = torch.as_tensor(adjacency, device=self.device)  # (d, d)
        self.local_scores = bge_local_scores(data, self.alpha_mu, self.alpha_w).to(self.device)
        self.score_gains = self.local_scores - self.local_scores[:, :1]  # (d, 2^d), s(j, ∅) = 0

        self.n_actions = d * d + 1
        self.state_shape = (d * d,)
        self.state_dtype = torch.long
        self.s0 = torch.zeros(d * d, dtype=torch.long, device=self.device)
        self.max_steps = d * (d - 1) // 2
        self._bits = 2 ** torch.arange(d, device=self.device)  # (d,)
        self._eye = torch.eye(d, dtype=torch.bool, device=self.device).flatten()  # (d²,)
        self._last_mask: tuple[Tensor, int | None, Tensor] | None = None  # states, version, mask

    def __repr__(self) -> str:
        return (
            f"DAGEnv(n_nodes={self.n_nodes}, n_edges={self.n_edges}, n_samples={self.n_samples}, "
            f"noise_std={self.noise_std}, seed={self.seed})"
        )

    def data_files(self) -> dict[str, Tensor]:
        """``data`` (the scored observations, ``(N, d)``) and ``true_graph`` (its adjacency)."""
        return {"data": torch.as_tensor(self.data), "true_graph": self.true_graph}

    @property
    def enumerable(self) -> bool:
        """Whether the evaluation enumerates every DAG (``exact``, d ≤ 5)."""
        return self.exact

    # --- dynamics -----------------------------------------------------------------------

    def _square(self, states: Tensor) -> Tensor:
        return states.view(-1, self.n_nodes, self.n_nodes)  # (B, d, d)

    def forward_mask(self, states: Tensor) -> Tensor:
        """Adding i → j is legal when absent, i ≠ j and j does not reach i; stop always.

        `featurize` needs the same mask, and the sampler asks for both on the same batch at
        every step: the last result is kept and returned again for the same, unmodified
        `states` tensor, so the transitive closure runs once per step."""
        # (Inference tensors, the sampler's, keep no version counter; nothing changes them.)
        version = None if states.is_inference() else states._version
        last = self._last_mask
        if last is not None and last[0] is states and last[1] == version:
            return last[2]
        reach = transitive_closure(self._square(states))  # (B, d, d)
        creates_cycle = reach.transpose(1, 2).flatten(1)  # (B, d²): j reaches i
        legal = (states == 0) & ~creates_cycle & ~self._eye  # (B, d²)
        mask = torch.cat([legal, torch.ones_like(legal[:, :1])], dim=1)  # (B, d² + 1)
        self._last_mask = (states, version, mask)
        return mask

    def backward_mask(self, states: Tensor) -> Tensor:
        """Removing any present edge is legal: bool ``(B, d²)``."""
        return states == 1

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Add edge ``actions`` ``(B,)`` (index i·d + j)."""
        return states.scatter(1, actions.unsqueeze(1), 1)

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Remove edge ``actions`` ``(B,)``."""
        return states.scatter(1, actions.unsqueeze(1), 0)

    # --- reward and features ------------------------------------------------------------

    def parent_masks(self, states: Tensor) -> Tensor:
        """Bitmask of each node's parents, long ``(B, d)``."""
        return (self._square(states) * self._bits.view(1, -1, 1)).sum(dim=1)  # (B, d)

    def log_reward(self, states: Tensor) -> Tensor:
        """log p(D | G) under BGe (uniform prior), float32 ``(B,)``; float64 in
        `log_reward64`."""
        return self.log_reward64(states).float()

    def log_reward64(self, states: Tensor) -> Tensor:
        """log p(D | G) − log p(D | ∅), float64 ``(B,)``: a sum of local-score gains. The
        offset leaves the posterior as it is and keeps log R (and log Z) near 0, where float32
        resolves it finely (log p(D | G) itself is of order −N·d)."""
        masks = self.parent_masks(states)  # (B, d)
        return self.score_gains.gather(1, masks.T).sum(dim=0)  # (B,)

    def log_marginal_likelihood(self, states: Tensor) -> Tensor:
        """log p(D | G) itself, float64 ``(B,)``."""
        return self.log_reward64(states) + self.local_scores[:, 0].sum()

    def featurize(self, states: Tensor) -> Tensor:
        """The adjacency and the legal additions (the closure is what the policy needs to
        know which edges close a cycle), float32 ``(B, 2·d²)``."""
        legal = self.forward_mask(states)[:, :-1]
        return torch.cat([states.float(), legal.float()], dim=1)

    # --- exact evaluation ---------------------------------------------------------------

    def enumerate_terminals(self) -> Tensor:
        """Every DAG on d ≤ 5 nodes, ``(N, d²)`` (29,281 at d = 5), in increasing order of the
        off-diagonal adjacency bits read as an integer."""
        if not self.exact:
            raise ValueError(
                f"{self!r} enumerates DAGs only with exact evaluation (n_nodes <= "
                f"{MAX_EXACT_NODES}); it has env.exact=false"
            )
        d = self.n_nodes
        off = (~self._eye).nonzero().squeeze(1)  # (d(d-1),) off-diagonal positions
        codes = torch.arange(2 ** off.numel(), device=self.device)  # (2^(d(d-1)),)
        bits = (codes.unsqueeze(1) >> torch.arange(off.numel(), device=self.device)) & 1
        states = torch.zeros(codes.numel(), d * d, dtype=torch.long, device=self.device)
        states[:, off] = bits
        acyclic = ~transitive_closure(self._square(states)).diagonal(dim1=1, dim2=2).any(dim=1)
        return states[acyclic]

    def true_distribution(self) -> Tensor:
        """The posterior p(G | D) over `enumerate_terminals`, float64 ``(N,)``."""
        log_r = self.log_reward64(self.enumerate_terminals())
        return (log_r - torch.logsumexp(log_r, dim=0)).exp()

    def edge_marginals(self, terminals: Tensor, p: Tensor) -> Tensor:
        """P(i → j) under the distribution `p` ``(N,)`` over DAGs `terminals`: ``(d, d)``."""
        return (p.unsqueeze(1) * terminals.to(p.dtype)).sum(dim=0).view(self.n_nodes, -1)

    def distribution_metrics(
        self, terminals: Tensor, p: Tensor, p_star: Tensor
    ) -> dict[str, float]:
        """``edge_marginal_error``: the mean over the d(d−1) ordered pairs of |P(i → j) −
        P*(i → j)|; ``edge_marginal_max_error``: the largest of them."""
        errors = (self.edge_marginals(terminals, p) - self.edge_marginals(terminals, p_star)).abs()
        off = errors.flatten()[~self._eye]
        return {
            "edge_marginal_error": float(off.mean()),
            "edge_marginal_max_error": float(off.max()),
        }

    def sampled_metrics(
        self, samples: Tensor, log_prob_fn: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """``mean_log_reward`` of the samples and ``expected_shd``, the mean structural
        Hamming distance to the ground-truth graph (a reversed edge counts once): what graphs
        too large to enumerate are evaluated by, beside the exact metrics otherwise."""
        square = self._square(samples)
        truth = self.true_graph.unsqueeze(0)
        skeleton = (square + square.transpose(1, 2)).clamp(max=1)
        true_skeleton = (truth + truth.transpose(1, 2)).clamp(max=1)
        missing_or_extra = (skeleton != true_skeleton).sum(dim=(1, 2)) // 2
        reversed_ = ((square != truth) & (skeleton == true_skeleton) & (skeleton == 1)).sum(
            dim=(1, 2)
        ) // 2
        shd = (missing_or_extra + reversed_).double()
        return {
            "mean_log_reward": float(self.log_reward64(samples).mean()),  # relative to ∅
            "expected_shd": float(shd.mean()),
        }
