"""BitSequence: hand-checked rewards, dynamics, seeded targets and test set, modes, Spearman."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from envs import Env
from envs.bitseq import TARGET_WORDS, BitSequence, rankdata, spearman_correlation

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "env"


def tiny() -> BitSequence:
    """n = 4 bits, 2 per word, two known targets."""
    return BitSequence(n=4, k=2, targets=["0000", "0111"], temperature=0.5, mode_threshold=1)


def from_strings(env: BitSequence, strings: list[str]) -> torch.Tensor:
    return env.states_from_bits(torch.tensor([[int(c) for c in s] for s in strings]))


# --- reward ---------------------------------------------------------------------------------


def test_rewards_at_hand_checked_strings() -> None:
    # Hamming distances to (0000, 0111), by hand: 0000 (0, 3), 1111 (4, 1), 0110 (2, 1),
    # 1000 (1, 4), 1100 (2, 3), 0101 (2, 1). log R = −min / T with T = 1/2.
    env = tiny()
    x = from_strings(env, ["0000", "1111", "0110", "1000", "1100", "0101"])
    assert x.tolist() == [[0, 0], [3, 3], [1, 2], [2, 0], [3, 0], [1, 1]]  # MSB first
    assert env.distances(x).tolist() == [[0, 3], [4, 1], [2, 1], [1, 4], [2, 3], [2, 1]]
    assert env.min_distance(x).tolist() == [0, 1, 1, 1, 2, 1]
    log_r = env.log_reward(x)
    assert log_r.dtype == torch.float32
    assert log_r.tolist() == [0.0, -2.0, -2.0, -2.0, -4.0, -2.0]


def test_bits_round_trip_and_word_order() -> None:
    env = BitSequence(n=12, k=3, targets=["0" * 12])
    states = torch.tensor([[5, 0, 7, 2], [1, 6, 3, 4]])
    bits = env.bits(states)
    assert bits[0].tolist() == [1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1, 0]
    assert torch.equal(env.states_from_bits(bits), states)


def test_distances_match_a_direct_count() -> None:
    env = BitSequence(n=24, k=3, n_targets=7, seed=3)
    x = env.test_set
    direct = (env.bits(x).unsqueeze(1) != env.targets).sum(dim=-1)  # (B, |M|)
    assert torch.equal(env.distances(x), direct)


# --- dynamics -------------------------------------------------------------------------------


def test_stop_is_legal_only_at_full_length() -> None:
    env = BitSequence(n=8, k=2, n_targets=2)
    s = env.initial_states(3)
    assert env.is_initial(s).all() and not env.backward_mask(s).any()
    for length in range(env.n_words + 1):
        mask = env.forward_mask(s)  # (3, 5)
        full = length == env.n_words
        assert mask[:, -1].eq(full).all()  # stop iff full
        assert mask[:, :-1].eq(not full).all()  # then it is the only legal action
        assert env.lengths(s).eq(length).all()
        if not full:
            s = env.step(s, torch.tensor([0, 1, 3]))
    assert s.tolist() == [[0] * 4, [1] * 4, [3] * 4]


def test_backward_step_inverts_step_on_random_trajectories() -> None:
    env = BitSequence(n=24, k=3, n_targets=5)
    g = torch.Generator().manual_seed(0)
    s = env.initial_states(64)
    for _ in range(env.max_steps):
        a = torch.randint(2**env.k, (64,), generator=g)
        assert env.forward_mask(s).gather(1, a.unsqueeze(1)).all()
        nxt = env.step(s, a)
        back = env.backward_mask(nxt)  # (64, 2^k)
        assert back.sum(dim=1).eq(1).all()  # one parent: the last word
        assert back.gather(1, a.unsqueeze(1)).all()
        assert torch.equal(env.backward_step(nxt, a), s)
        s = nxt
    assert env.forward_mask(s)[:, -1].all() and env.lengths(s).eq(env.n_words).all()


def test_featurize_is_one_hot_with_an_empty_class() -> None:
    env = tiny()
    s = env.step(env.initial_states(1), torch.tensor([2]))  # [2, −1]
    f = env.featurize(s)
    assert f.shape == (1, 2 * 5) and f.dtype == torch.float32
    assert f.view(2, 5).tolist() == [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]


# --- targets and test set -------------------------------------------------------------------


def test_targets_and_test_set_follow_the_seed() -> None:
    a, b, c = BitSequence(seed=0), BitSequence(seed=0), BitSequence(seed=1)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.test_set, b.test_set)
    assert not torch.equal(a.targets, c.targets)
    assert not torch.equal(a.test_set, c.test_set)


def test_targets_are_distinct_strings_of_the_literature_words() -> None:
    env = BitSequence(n=16, k=4, n_targets=25, seed=0)  # all 5^2 possible targets
    assert env.targets.shape == (25, 16)
    assert torch.unique(env.targets, dim=0).shape[0] == 25
    words = {"".join(map(str, w)) for w in env.targets.view(-1, 8).tolist()}
    assert words <= set(TARGET_WORDS)


def test_test_set_holds_each_target_at_every_distance() -> None:
    env = BitSequence(n=16, k=4, n_targets=3, seed=2)
    assert env.test_set.shape == (3 * 16, 4)
    own = env.distances(env.test_set).view(3, 16, 3)  # [m, i, m']
    for m in range(3):
        assert own[m, :, m].tolist() == list(range(16))  # row m·n + i: i bits from target m


# --- modes ----------------------------------------------------------------------------------


def test_mode_hits_at_the_threshold_boundary() -> None:
    env = BitSequence(n=8, k=4, targets=["00000000", "11110000"], mode_threshold=2)
    # distances to (00000000, 11110000): 2 and 2; 3 and 7; 0 and 4; 6 and 2; 4 and 4
    x = from_strings(env, ["11000000", "00000111", "00000000", "11111100", "11001100"])
    assert env.mode_hits(x).tolist() == [
        [True, True],
        [False, False],
        [True, False],
        [False, True],
        [False, False],
    ]
    exact = BitSequence(n=8, k=4, targets=["00000000", "11110000"], mode_threshold=0)
    assert exact.mode_hits(x).tolist()[2] == [True, False]
    assert not exact.mode_hits(x)[[0, 1, 3, 4]].any()


# --- metrics --------------------------------------------------------------------------------


def test_rankdata_averages_ties() -> None:
    ranks = rankdata(torch.tensor([10.0, 20.0, 20.0, 5.0, 20.0]))
    assert ranks.dtype == torch.float64
    assert ranks.tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


def test_spearman_against_hand_computed_ranks() -> None:
    # No ties: ρ = 1 − 6 Σd² / (n(n² − 1)) = 1 − 6·2/60 = 0.8.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert float(spearman_correlation(x, torch.tensor([1.0, 3.0, 2.0, 4.0]))) == pytest.approx(0.8)
    # Ties: ranks of y = (1, 2.5, 2.5, 4); centred (−1.5, 0, 0, 1.5) against (−1.5, −.5, .5, 1.5)
    # gives 4.5 / √(5 · 4.5) = √0.9.
    rho = spearman_correlation(x, torch.tensor([1.0, 2.0, 2.0, 3.0]))
    assert float(rho) == pytest.approx(math.sqrt(0.9), rel=1e-12)
    assert float(spearman_correlation(x, -(x**3))) == pytest.approx(-1.0)
    assert math.isnan(float(spearman_correlation(x, torch.ones(4))))


def test_spearman_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(6, (200,), generator=g).float()
    y = x + torch.randint(8, (200,), generator=g).float()
    expected = stats.spearmanr(x.numpy(), y.numpy()).statistic
    assert float(spearman_correlation(x, y)) == pytest.approx(expected, rel=1e-12)


def test_sampled_metrics_on_hand_checked_samples() -> None:
    env = tiny()
    samples = from_strings(env, ["0000", "1111", "1100", "0111"])  # distances 0, 1, 2, 0
    metrics = env.sampled_metrics(samples, env.log_reward)  # log P_T ∝ R: a perfect sampler
    assert metrics["spearman_test"] == pytest.approx(1.0)
    assert metrics["mean_distance"] == pytest.approx(0.75)
    assert metrics["mean_log_reward"] == pytest.approx(-1.5)
    assert metrics["near_target_fraction"] == pytest.approx(0.75)  # δ = 1
    assert metrics["targets_hit"] == 2.0
    reverse = env.sampled_metrics(samples, lambda x: -env.log_reward(x))
    assert reverse["spearman_test"] == pytest.approx(-1.0)


def test_sampled_metrics_rejects_a_bad_log_prob_fn() -> None:
    env = tiny()
    msg = "log_prob_fn must return log P_T of shape (M,) for M=8 strings, got (8, 1)"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        env.sampled_metrics(env.test_set, lambda x: torch.zeros(x.shape[0], 1))


# --- construction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "msg"),
    [
        ({"n": 30, "k": 4}, ValueError, "Invalid env.n: 30; expected a multiple of env.k=4"),
        ({"k": 0}, ValueError, "Invalid env.k: 0; expected an int in [1, 16]"),
        ({"n": 0}, ValueError, "Invalid env.n: 0; expected an int >= 1"),
        ({"n": 4.0}, ValueError, "Invalid env.n: 4.0; expected an int >= 1"),
        (
            {"n": 12, "k": 4},
            ValueError,
            "BitSequence n must be a multiple of 8 (the length of the target words) when "
            "targets are drawn, got n=12; pass targets=[...] for other lengths",
        ),
        (
            {"n": 8, "n_targets": 6},
            ValueError,
            "Invalid env.n_targets: 6; expected an int in [1, 5]",
        ),
        (
            {"temperature": 0.0},
            ValueError,
            "Invalid env.temperature: 0; expected a float > 0",
        ),
        (
            {"mode_threshold": 33},
            ValueError,
            "Invalid env.mode_threshold: 33; expected an int in [0, 32]",
        ),
        (
            {"n": 4, "k": 2, "targets": ["0101", "01"]},
            ValueError,
            "BitSequence targets must be strings of n=4 '0'/'1' characters, got '01'",
        ),
        (
            {"n": 4, "k": 2, "targets": ["0101", "0101"]},
            ValueError,
            "BitSequence targets must be distinct, got ['0101', '0101']",
        ),
        (
            {"n": 4, "k": 2, "targets": ["0101"], "n_targets": 2},
            ValueError,
            "BitSequence n_targets=2 disagrees with the 1 targets given; leave n_targets unset "
            "when passing targets",
        ),
    ],
)
def test_invalid_arguments_name_the_argument_and_range(kwargs, error, msg) -> None:
    with pytest.raises(error, match=f"^{re.escape(msg)}$"):
        BitSequence(**kwargs)


@pytest.mark.parametrize(
    ("name", "n", "k", "n_targets"), [("bitseq", 32, 4, 16), ("bitseq_120", 120, 8, 60)]
)
def test_configs_build_the_environment(name: str, n: int, k: int, n_targets: int) -> None:
    env = instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    assert isinstance(env, BitSequence) and isinstance(env, Env)
    assert (env.n, env.k, env.n_targets) == (n, k, n_targets)
    assert (env.n_actions, env.max_steps) == (2**k + 1, n // k)
    assert env.test_set.shape == (n_targets * n, n // k)
