"""Bit sequences: write n bits k at a time; the reward peaks at a hidden set of target strings.

The synthetic sequence task of trajectory balance (Malkin et al., 2022, arXiv 2201.13259, §5.2),
in its append-only (autoregressive) form: every terminal string has exactly one trajectory, so
log P_T(x) of a policy is exact, which is what the test-set rank correlation needs. The targets,
the held-out test set, the Hamming reward and the mode threshold follow the public
reimplementation of that setup by Tiapkin et al. (arXiv 2310.12934, ``bitseq/run.py``); the
prepend/insert variants of Madan et al. (SubTB, arXiv 2209.12782) are not implemented here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from envs.base import Env
from kinetic.errors import ConfigError
from kinetic.validate import check_float, check_int

__all__ = ["TARGET_WORDS", "BitSequence", "rankdata", "spearman_correlation"]

# The literature builds every target from these 8-bit words (Malkin et al., 2022, §5.2).
TARGET_WORDS = ("00000000", "11111111", "11110000", "00001111", "00111100")
_MAX_WORD_BITS = 16  # 2^16 + 1 actions; beyond that the one-hot features stop being sensible


class BitSequence(Env):
    r"""Strings of ``n`` bits, appended ``k`` bits (one word) at a time, rewarded near targets.

    .. code-block:: text

        state   w ∈ {−1, 0, …, 2^k − 1}^(n/k)   (long, (n/k,)); slot i holds word i or −1
                (empty); the filled slots are a prefix; s0 = all −1
        action  a < 2^k: write word a into the first empty slot (legal until the string is full)
                a = 2^k: stop, legal only when all n/k slots are full (and then the only action)
        bits    word w is its k bits, most significant first; x = the n bits, slot by slot
        reward  log R(x) = −min_{m ∈ M} d_H(x, m) / T         (d_H: Hamming distance)

    Every trajectory has exactly n/k word actions and one stop, and every state has one parent
    (``backward_mask`` allows only removing the last word), so P_B = 1 and
    log P_T(x) = Σ_t log P_F(w_t | w_<t) + log P_F(stop | x) exactly.

    Targets M (Malkin et al., 2022): ``n_targets`` distinct strings, each n/8 words drawn
    uniformly from `TARGET_WORDS` with a ``torch.Generator`` seeded by ``seed`` (duplicates
    redrawn, as torchgfn does). The held-out test set (Tiapkin et al., arXiv 2310.12934): for
    every target m and every i ∈ {0, …, n − 1}, m with i distinct random bits flipped, so
    |test| = |M|·n and its strings lie at every distance from their target; drawn from the same
    generator after the targets. ``sampled_metrics`` reports the Spearman correlation between
    log P_T and log R on it, the literature's measure of how well P_T follows R.

    A target counts as found (``mode_hits``) by a string within Hamming distance
    ``mode_threshold`` (δ) of it, boundary included. At the literature's size (n = 120, k = 8,
    |M| = 60) δ = 30 and T = 1/2 (Tiapkin et al.'s reward exponent β = 2 on log R = −d), where
    a uniform string is within δ of a given target with probability 2e-8. At the default
    n = 32 the tails are fatter: 48,000 uniform strings (3,000 steps of 16) come within n/4 = 8
    bits of every target, so the default δ is 3 (probability 1.3e-6 per uniform string and
    target: such a run finds about 6 % of the targets). The default T = 1 is what the default
    trainer (on-policy TB, batch 16) learns in 3,000 steps: at T = 1/2 it collapses onto a few
    targets (8 of 16 found, test Spearman 0.60), at T = 1 it finds 15 or 16 of 16 (Spearman
    0.94, seeds 0-2).

    Args:
        n: number of bits (>= 1, a multiple of k, and of 8 unless `targets` is given).
            Default: 32.
        k: bits per word (1 <= k <= 16); there are 2^k word actions plus stop. Default: 4.
        n_targets: |M|, the number of targets drawn (1 <= n_targets <= 5^(n/8)). Default: 16,
            or len(targets) when `targets` is given.
        seed: seeds the targets and the test set (not the training run). Default: 0.
        temperature: T > 0 in log R = −d/T. Default: 1.0.
        mode_threshold: δ, in bits (0 <= δ <= n); the default suits n = 32. Default: 3.
        targets: explicit target strings of '0'/'1' characters (length n, distinct) instead
            of drawn ones, e.g. for tiny hand-checked tasks. Default: None.
        device: where states live. Default: ``"cpu"``.
    """

    eval_chunk: int = 4096  # test strings per log_prob_fn call in `sampled_metrics`

    def __init__(
        self,
        n: int = 32,
        k: int = 4,
        n_targets: int | None = None,
        seed: int = 0,
        temperature: float = 1.0,
        mode_threshold: int = 3,
        targets: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        n = check_int("env.n", n, 1)
        k = check_int("env.k", k, 1, _MAX_WORD_BITS)
        if n % k != 0:
            raise ConfigError(f"Invalid env.n: {n}; expected a multiple of env.k={k}")
        seed = check_int("env.seed", seed, -(2**63), 2**64 - 1)
        check_float("env.temperature", temperature, 0.0, low_open=True)
        mode_threshold = check_int("env.mode_threshold", mode_threshold, 0, n)
        self.n, self.k, self.seed = n, k, seed
        self.temperature = float(temperature)
        self.mode_threshold = mode_threshold
        self.device = torch.device(device)

        self.n_words = n // k
        self.n_actions = 2**k + 1
        self.state_shape = (self.n_words,)
        self.state_dtype = torch.long
        self.s0 = torch.full((self.n_words,), -1, dtype=torch.long, device=self.device)
        self.max_steps = self.n_words
        self._shifts = torch.arange(k - 1, -1, -1, device=self.device)  # (k,), MSB first
        self._words = torch.arange(2**k, device=self.device)  # (2^k,)
        # Lookup tables indexed by a slot's value, −1 (empty) reading the last row, which keep
        # the per-step methods to one or two operators each.
        # Slot encoding: word w -> one-hot at w + 1, empty -> one-hot at 0.
        self._one_hot = torch.eye(2**k + 1, device=self.device).roll(-1, dims=0)
        # Forward mask by the last slot: a word -> full (stop only), empty -> every word.
        masks = torch.zeros(2**k + 1, self.n_actions, dtype=torch.bool, device=self.device)
        masks[:-1, -1] = True
        masks[-1, :-1] = True
        self._forward_masks = masks  # (2^k + 1, 2^k + 1)

        generator = torch.Generator(device="cpu").manual_seed(seed)
        if targets is None:
            if n % 8 != 0:
                raise ConfigError(
                    f"BitSequence n must be a multiple of 8 (the length of the target words) "
                    f"when targets are drawn, got n={n}; pass targets=[...] for other lengths"
                )
            n_max = 5 ** (n // 8)
            n_targets = check_int("env.n_targets", 16 if n_targets is None else n_targets, 1, n_max)
            bits = self._draw_targets(n_targets, generator)
        else:
            bits = self._parse_targets(targets)
            if n_targets is not None and n_targets != bits.shape[0]:
                raise ConfigError(
                    f"BitSequence n_targets={n_targets} disagrees with the {bits.shape[0]} "
                    "targets given; leave n_targets unset when passing targets"
                )
        self.n_targets = bits.shape[0]
        self.targets = bits.to(self.device)  # (|M|, n), 0/1 long
        self._targets_float = self.targets.float()
        self.test_set = self.states_from_bits(self._draw_test_set(generator).to(self.device))

    def __repr__(self) -> str:
        return (
            f"BitSequence(n={self.n}, k={self.k}, n_targets={self.n_targets}, seed={self.seed}, "
            f"temperature={self.temperature}, mode_threshold={self.mode_threshold}, "
            f"device='{self.device}')"
        )

    # --- targets and test set -----------------------------------------------------------

    def _draw_targets(self, n_targets: int, generator: torch.Generator) -> Tensor:
        """`n_targets` distinct strings of n/8 words from `TARGET_WORDS`, long ``(|M|, n)``."""
        words = torch.tensor([[int(c) for c in w] for w in TARGET_WORDS])  # (5, 8)
        picks = torch.randint(len(TARGET_WORDS), (n_targets, self.n // 8), generator=generator)
        while True:  # redraw later duplicates; rare unless n_targets is close to 5^(n/8)
            _, inverse = torch.unique(picks, dim=0, return_inverse=True)  # (|M|,)
            rows = torch.arange(n_targets)
            first = torch.full((n_targets,), n_targets).scatter_reduce(0, inverse, rows, "amin")
            duplicate = first[inverse] != rows  # (|M|,)
            n_dup = int(duplicate.sum())
            if n_dup == 0:
                return words[picks].flatten(1)  # (|M|, n)
            picks[duplicate] = torch.randint(
                len(TARGET_WORDS), (n_dup, self.n // 8), generator=generator
            )

    def _parse_targets(self, targets: Sequence[str]) -> Tensor:
        if isinstance(targets, str) or len(targets) == 0:
            raise ConfigError(
                f"BitSequence targets must be a non-empty list of bit strings, got {targets!r}"
            )
        for target in targets:
            if not isinstance(target, str) or len(target) != self.n or set(target) - {"0", "1"}:
                raise ConfigError(
                    f"BitSequence targets must be strings of n={self.n} '0'/'1' characters, "
                    f"got {target!r}"
                )
        if len(set(targets)) != len(targets):
            raise ConfigError(f"BitSequence targets must be distinct, got {list(targets)!r}")
        return torch.tensor([[int(c) for c in target] for target in targets], dtype=torch.long)

    def _draw_test_set(self, generator: torch.Generator) -> Tensor:
        """Target m with i distinct bits flipped, for every m and i < n: ``(|M|·n, n)``.

        Row ``m·n + i`` is target m with i flips, so it lies at distance exactly i from m.
        """
        targets = self.targets.cpu().repeat_interleave(self.n, dim=0)  # (|M|·n, n)
        n_flips = torch.arange(self.n).repeat(self.n_targets)  # (|M|·n,), 0..n−1 per target
        # A uniform random ranking of the n positions per row; flip the n_flips lowest ranked.
        keys = torch.rand(targets.shape, generator=generator)  # (|M|·n, n)
        ranks = keys.argsort(dim=1).argsort(dim=1)  # (|M|·n, n)
        return targets ^ (ranks < n_flips.unsqueeze(1)).long()

    # --- dynamics -----------------------------------------------------------------------

    def lengths(self, states: Tensor) -> Tensor:
        """Number of words written, long ``(B,)``."""
        return (states >= 0).sum(dim=1)

    def forward_mask(self, states: Tensor) -> Tensor:
        """Words while a slot is empty, stop once all are full: bool ``(B, 2^k + 1)``."""
        return self._forward_masks[states[:, -1]]  # the last slot fills last

    def backward_mask(self, states: Tensor) -> Tensor:
        """Only the last written word can be removed: bool ``(B, 2^k)``, all False at s0."""
        last = states.gather(1, (self.lengths(states) - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
        return last == self._words  # (B, 2^k); −1 (s0) matches no word

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Write word ``actions`` ``(B,)`` into the first empty slot of `states` ``(B, n/k)``.

        A full string (no legal word) gets its last word overwritten, not an index error: the
        static rollout steps finished trajectories and drops the result."""
        slot = self.lengths(states).clamp(max=self.n_words - 1).unsqueeze(1)  # (B, 1)
        return states.scatter(1, slot, actions.unsqueeze(1))

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Erase the last word (the one ``actions`` ``(B,)`` names) of `states` ``(B, n/k)``."""
        slot = (self.lengths(states) - 1).unsqueeze(1)  # (B, 1)
        return states.scatter(1, slot, -1)

    # --- bits, distances, reward --------------------------------------------------------

    def bits(self, states: Tensor) -> Tensor:
        """The n bits of complete strings ``(B, n/k)``, long ``(B, n)``, MSB of each word first.

        Empty slots (−1) come out as ones; only complete strings have a meaning here.
        """
        return ((states.unsqueeze(-1) >> self._shifts) & 1).flatten(1)  # (B, n)

    def states_from_bits(self, bits: Tensor) -> Tensor:
        """Complete states ``(B, n/k)`` of bit strings ``(B, n)``; the inverse of `bits`."""
        return (bits.view(-1, self.n_words, self.k) << self._shifts).sum(dim=-1)

    def distances(self, states: Tensor) -> Tensor:
        """Hamming distance from each complete string to each target, long ``(B, |M|)``."""
        x = self.bits(states).float()  # (B, n)
        m = self._targets_float  # (|M|, n)
        # d(x, m) = |x| + |m| − 2 x·m; one matmul, exact in float32 for n < 2^24.
        d = x.sum(dim=1, keepdim=True) + m.sum(dim=1) - 2.0 * (x @ m.T)  # (B, |M|)
        return d.round().long()

    def min_distance(self, states: Tensor) -> Tensor:
        """min over targets of the Hamming distance, long ``(B,)``."""
        return self.distances(states).min(dim=1).values

    def log_reward(self, states: Tensor) -> Tensor:
        """log R(x) = −min_m d_H(x, m) / T of complete strings, float32 ``(B,)``."""
        return self.min_distance(states).float() / -self.temperature

    def featurize(self, states: Tensor) -> Tensor:
        """One-hot of each slot over {empty, word 0, …, word 2^k − 1}: ``(B, n/k·(2^k + 1))``."""
        return self._one_hot[states].flatten(1)  # (B, n/k·(2^k + 1))

    # --- evaluation ---------------------------------------------------------------------

    def mode_hits(self, states: Tensor) -> Tensor:
        """Targets within ``mode_threshold`` bits of each complete string: bool ``(B, |M|)``."""
        return self.distances(states) <= self.mode_threshold

    def sampled_metrics(
        self, samples: Tensor, log_prob_fn: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """Test-set rank correlation of log P_T with log R, and what the samples look like.

        Returns:
            ``spearman_test``: Spearman correlation between log P_T(x) (from `log_prob_fn`,
            called on at most `eval_chunk` strings at a time) and log R(x) over the test set;
            ``mean_log_reward``, ``mean_distance`` (to the nearest target, in bits) and
            ``near_target_fraction`` (share within ``mode_threshold``) of `samples`; and
            ``targets_hit``, the targets these samples come within ``mode_threshold`` of.
        """
        log_p = []
        for chunk in self.test_set.split(self.eval_chunk):
            out = log_prob_fn(chunk)
            if not isinstance(out, Tensor) or out.shape != (chunk.shape[0],):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(
                    f"log_prob_fn must return log P_T of shape (M,) for M={chunk.shape[0]} "
                    f"strings, got {got}"
                )
            log_p.append(out)
        log_r = self.log_reward(self.test_set)  # (|M|·n,)
        spearman = spearman_correlation(torch.cat(log_p).to(log_r.device), log_r)
        distances = self.distances(samples)  # (N, |M|)
        nearest = distances.min(dim=1).values.float()  # (N,)
        hits = distances <= self.mode_threshold  # (N, |M|)
        return {
            "spearman_test": float(spearman),
            "mean_log_reward": float(nearest.mean() / -self.temperature),
            "mean_distance": float(nearest.mean()),
            "near_target_fraction": float(hits.any(dim=1).float().mean()),
            "targets_hit": float(hits.any(dim=0).sum()),
        }


# --- rank correlation ---------------------------------------------------------------------


def rankdata(values: Tensor) -> Tensor:
    """Ranks 1..N of `values` ``(N,)``, ties sharing their average rank, float64 ``(N,)``.

    scipy.stats.rankdata's "average" method: one sort, then each run of equal values gets the
    mean of the ranks it spans.
    """
    sorted_values, order = values.sort(stable=True)  # (N,)
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )  # (N,), (G,)
    last = counts.cumsum(0).double()  # (G,), the highest rank in each run
    average = last - (counts.double() - 1) / 2  # (G,), mean of first..last
    return average.new_empty(values.shape).scatter_(0, order, average[inverse])


def spearman_correlation(x: Tensor, y: Tensor) -> Tensor:
    """Spearman's rank correlation of `x` and `y` ``(N,)``: Pearson's r of their average
    ranks, float64 scalar in [−1, 1]; NaN when either is constant (as scipy.stats.spearmanr).
    """
    if x.dim() != 1 or x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(
            f"spearman_correlation needs two 1-D tensors of one length >= 2, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.square().sum() * ry.square().sum()).sqrt()
