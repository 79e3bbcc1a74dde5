"""Local search (LS-GFN): backward trajectories drawn with P_B, proposals that are complete
legal trajectories, greedy acceptance never losing reward, and Metropolis–Hastings leaving
R/Z invariant where the backtracked and rebuilt segments have the same length."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.bitseq import BitSequence
from envs.hypergrid import HyperGrid
from gfn.local_search import LocalSearch, local_search, refine, sample_backward_trajectories
from gfn.policies import GFlowNet, MLPPolicy
from gfn.sampler import PAD_ACTION, Trajectories, sample_trajectories
from kinetic.errors import ConfigError


def _model(env, seed: int = 0, backward: str = "learned") -> GFlowNet:
    torch.manual_seed(seed)
    n_features = env.featurize(env.initial_states(1)).shape[-1]
    return GFlowNet(MLPPolicy(n_features, env.n_actions, hidden=16, backward=backward))


def _assert_complete_and_legal(env, batch: Trajectories) -> None:
    """Every trajectory starts at s0, takes legal actions, exits once, ends at its terminal."""
    for b in range(batch.batch_size):
        n = int(batch.lengths[b])
        assert bool(env.is_initial(batch.states[0, b : b + 1]))
        for t in range(n):
            s, a = batch.states[t, b : b + 1], batch.actions[t, b : b + 1]
            assert bool(env.forward_mask(s)[0, a])
            assert torch.equal(env.step(s, a), batch.states[t + 1, b : b + 1])
        assert int(batch.actions[n, b]) == env.stop_action
        assert (batch.actions[n + 1 :, b] == PAD_ACTION).all()
        assert torch.equal(batch.states[n, b], batch.terminal_states[b])
        assert (batch.states[n:, b] == batch.terminal_states[b]).all()
    assert torch.allclose(batch.log_rewards, env.log_reward(batch.terminal_states))


def test_backward_trajectories_are_complete_and_follow_uniform_pb():
    env = HyperGrid(ndim=2, height=4)
    model = _model(env, backward="uniform")
    x = torch.tensor([[2, 1]]).expand(6000, 2).clone()
    batch = sample_backward_trajectories(model, env, x, torch.Generator().manual_seed(0))
    _assert_complete_and_legal(env, batch)
    assert (batch.lengths == 3).all()
    # Uniform P_B from (2, 1): the paths are the 3 orders of the moves (x, x, y), drawn with
    # probability P(first back step) · ...: (y last) 1/2, (y middle) 1/4, (y first) 1/4.
    y_step = (batch.actions[:3] == 1).float().argmax(dim=0)  # when the y move is taken
    freq = Counter(y_step.tolist())
    for when, p in {2: 0.5, 1: 0.25, 0: 0.25}.items():
        assert freq[when] / 6000 == pytest.approx(p, abs=0.03)


def test_proposals_are_complete_legal_trajectories_k_steps_from_the_end():
    env = HyperGrid(ndim=3, height=5)
    model = _model(env)
    generator = torch.Generator().manual_seed(1)
    batch = sample_trajectories(model, env, 64, generator)
    kept, proposals, accepted = local_search(model, env, batch, generator, k=2)
    _assert_complete_and_legal(env, proposals)
    _assert_complete_and_legal(env, kept)
    assert accepted.dtype == torch.bool
    taken = torch.where(accepted.unsqueeze(1), proposals.terminal_states, batch.terminal_states)
    assert torch.equal(kept.terminal_states, taken)


def test_greedy_acceptance_never_loses_reward():
    env = HyperGrid(ndim=2, height=8, R0=1e-3)
    model = _model(env, seed=2)
    generator = torch.Generator().manual_seed(2)
    batch = sample_trajectories(model, env, 128, generator)
    refined, proposals, rate = refine(
        model, env, batch, generator, LocalSearch(k=3, refinements=4, acceptance="greedy")
    )
    assert len(proposals) == 4 and 0.0 <= float(rate) <= 1.0
    assert (refined.log_rewards >= batch.log_rewards).all()
    assert refined.log_rewards.mean() > batch.log_rewards.mean()


@pytest.mark.parametrize("k", [2, 4])
def test_metropolis_hastings_leaves_the_target_invariant(k):
    """On bit sequences every trajectory has n/k steps and one parent per state, so
    backtracking K and rebuilding K keeps lengths equal and MH is exact: chains started from an
    untrained policy's samples keep their first n − K bits and end with the rest distributed as
    R(x | those bits) (K = n: as R/Z itself), which the policy is far from."""
    env = BitSequence(n=4, k=1, targets=["0110", "1111"], temperature=0.5, mode_threshold=0)
    model = _model(env, seed=3)
    generator = torch.Generator().manual_seed(3)
    n_chains = 4000
    batch = sample_trajectories(model, env, n_chains, generator)
    held, _, _ = refine(model, env, batch, generator, LocalSearch(k=k, refinements=30))
    terminals = torch.tensor(list(itertools.product((0, 1), repeat=4)))  # every 4-bit string
    reward = env.log_reward(terminals).double().exp()  # (16,)
    code = 2 ** torch.arange(3, -1, -1)  # a string's row in `terminals`
    start = torch.bincount(batch.terminal_states @ code, minlength=16).double() / n_chains
    end = torch.bincount(held.terminal_states @ code, minlength=16).double() / n_chains
    # The target: each start's prefix (its first 4 − K bits) keeps its mass, spread over the
    # strings with that prefix in proportion to R.
    prefix = torch.arange(16) >> k  # (16,)
    prefix_mass = torch.zeros(16, dtype=torch.float64).index_add_(0, prefix, start)
    prefix_reward = torch.zeros(16, dtype=torch.float64).index_add_(0, prefix, reward)
    target = prefix_mass[prefix] * reward / prefix_reward[prefix]
    assert float(target.sum()) == pytest.approx(1.0)
    l1_end = float((end - target).abs().sum())
    l1_start = float((start - target).abs().sum())
    # Sampling noise of 4,000 draws over 16 states: E[L1] ~ sqrt(2 * 16 / (pi * 4000)) ~ 0.05.
    assert l1_end < 0.1 < l1_start, (l1_start, l1_end)


def test_bad_local_search_keys_are_refused_by_name():
    env = HyperGrid(ndim=2, height=4)  # max_steps = 6
    with pytest.raises(ConfigError, match=r"task\.local_search\.k=7 is longer than any trajectory"):
        LocalSearch(k=7, refinements=1).check(env)
    with pytest.raises(ConfigError, match=r"Unknown task\.local_search\.acceptance: 'best'"):
        LocalSearch(acceptance="best").check(env)
    with pytest.raises(ConfigError, match=r"task\.local_search\.refinements"):
        LocalSearch(refinements=-1).check(env)


@pytest.mark.slow
def test_train_py_runs_local_search_and_logs_its_acceptance(tmp_path):
    """`task.local_search` from the command line: every proposal counts as a trajectory, the
    acceptance rate is logged, and the hard grid's 16 modes are found in 300 steps (plain TB
    has found about 7 after that many trajectories' worth of steps; README's benchmark)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "train.py", "env=hypergrid_hard", "task.local_search.refinements=4",
         "task.local_search.k=7", "train.steps=300", "train.eval_every=300",
         f"hydra.run.dir={tmp_path}", "logging.progress=false"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["trajectories"] == 300 * 16 * 5
    assert metrics["modes_found"] == 16, metrics
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    events.Reload()
    rates = [e.value for e in events.Scalars("train/ls_acceptance")]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)
