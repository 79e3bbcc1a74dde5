"""Replay buffer: round trip, ring-buffer wrap, sampling rules, and scoring replayed batches."""

from __future__ import annotations

import re

import pytest
import torch

from envs.hypergrid import HyperGrid
from gfn.policies import GFlowNet, MLPPolicy
from gfn.replay import ReplayBuffer
from gfn.sampler import Trajectories, sample_trajectories, trajectory_log_probs


@pytest.fixture
def env() -> HyperGrid:
    return HyperGrid(ndim=2, height=5)


@pytest.fixture
def gflownet(env: HyperGrid) -> GFlowNet:
    torch.manual_seed(0)
    return GFlowNet(MLPPolicy(10, env.n_actions, hidden=16, flow_head=True))


def tagged(env: HyperGrid, gflownet: GFlowNet, n: int, first_tag: int, seed: int) -> Trajectories:
    """Sampled trajectories whose log_rewards are overwritten by ids first_tag.. to trace them."""
    traj = sample_trajectories(gflownet, env, n, torch.Generator().manual_seed(seed), 0.5)
    traj.log_rewards = torch.arange(first_tag, first_tag + n, dtype=torch.float32)
    return traj


def column(traj: Trajectories, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Trajectory b without padding: states s_0..s_n and actions a_0..exit."""
    n = int(traj.lengths[b])
    return traj.states[: n + 1, b], traj.actions[: n + 1, b]


def test_round_trip(env: HyperGrid, gflownet: GFlowNet) -> None:
    buffer = ReplayBuffer(env, capacity=16)
    original = tagged(env, gflownet, 10, 0, seed=1)
    buffer.add(original)
    assert len(buffer) == 10
    batch = buffer.sample(10, torch.Generator().manual_seed(0))
    assert sorted(batch.log_rewards.long().tolist()) == list(range(10))  # no replacement
    assert batch.max_length == int(batch.lengths.max()) + 1  # trimmed to its own T
    for b, tag in enumerate(batch.log_rewards.long().tolist()):
        states, actions = column(batch, b)
        want_states, want_actions = column(original, tag)
        assert torch.equal(states, want_states) and torch.equal(actions, want_actions)
        assert torch.equal(batch.terminal_states[b], original.terminal_states[tag])
        assert batch.lengths[b] == original.lengths[tag]
    # Padding as the sampler makes it: terminal-state copies and -1 actions.
    steps = torch.arange(batch.max_length + 1).unsqueeze(1)
    padding = steps > batch.lengths
    expanded = batch.terminal_states.expand(batch.max_length + 1, *batch.terminal_states.shape)
    assert torch.equal(batch.states[padding], expanded[padding])
    assert (batch.actions[steps[:-1] > batch.lengths] == -1).all()


def test_replayed_batch_scores_like_the_original(env: HyperGrid, gflownet: GFlowNet) -> None:
    buffer = ReplayBuffer(env, capacity=8)
    original = sample_trajectories(gflownet, env, 8, torch.Generator().manual_seed(2))
    buffer.add(original)
    batch = buffer.sample(8, torch.Generator().manual_seed(0))
    # Sampling without replacement returns a permutation: compare the sorted scores.
    replayed = trajectory_log_probs(gflownet, env, batch).log_pf.sum(0).detach()
    fresh = trajectory_log_probs(gflownet, env, original).log_pf.sum(0).detach()
    torch.testing.assert_close(replayed.sort().values, fresh.sort().values)


def test_capacity_wrap_keeps_the_newest(env: HyperGrid, gflownet: GFlowNet) -> None:
    buffer = ReplayBuffer(env, capacity=5)
    buffer.add(tagged(env, gflownet, 3, 0, seed=1))
    buffer.add(tagged(env, gflownet, 4, 3, seed=2))  # wraps: ids 0 and 1 are overwritten
    assert len(buffer) == 5
    ids = buffer.sample(5, torch.Generator().manual_seed(0)).log_rewards.long()
    assert sorted(ids.tolist()) == [2, 3, 4, 5, 6]
    buffer.add(tagged(env, gflownet, 7, 10, seed=3))  # larger than the buffer: the last 5
    ids = buffer.sample(5, torch.Generator().manual_seed(0)).log_rewards.long()
    assert sorted(ids.tolist()) == [12, 13, 14, 15, 16]
    assert len(buffer) == 5


def test_wrapped_slots_hold_whole_trajectories(env: HyperGrid, gflownet: GFlowNet) -> None:
    """A short trajectory written over a long one leaves no trace of the old one."""
    buffer = ReplayBuffer(env, capacity=2)
    with torch.no_grad():
        gflownet.policy.heads.bias[env.stop_action] = -1e4  # walk to the corner
    long = sample_trajectories(gflownet, env, 2, torch.Generator().manual_seed(1))
    with torch.no_grad():
        gflownet.policy.heads.bias[env.stop_action] = 1e4  # exit at once
    short = sample_trajectories(gflownet, env, 2, torch.Generator().manual_seed(2))
    assert (long.lengths == env.max_steps).all() and (short.lengths == 0).all()
    buffer.add(long)
    buffer.add(short)
    batch = buffer.sample(2, torch.Generator().manual_seed(0))
    assert (batch.lengths == 0).all() and batch.max_length == 1
    assert batch.actions.shape == (1, 2) and (batch.actions == env.stop_action).all()
    assert (batch.states == 0).all()


def test_sampling_rules(env: HyperGrid, gflownet: GFlowNet) -> None:
    buffer = ReplayBuffer(env, capacity=8)
    message = (
        "Cannot draw 1 trajectories without replacement from a replay buffer holding 0; "
        "ask for 1 to 0"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        buffer.sample(1, torch.Generator())
    buffer.add(tagged(env, gflownet, 4, 0, seed=1))
    with pytest.raises(ValueError, match=r"^Cannot draw 5 trajectories without replacement"):
        buffer.sample(5, torch.Generator())
    message = r"^Unknown task\.replay\.priority: 'rewards'; valid: uniform"
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(env, capacity=8, priority="rewards")
    message = r"^Invalid task\.replay\.capacity: 0; expected an int >= 1$"
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(env, capacity=0)


def test_reward_priority_follows_r_to_the_alpha(env: HyperGrid, gflownet: GFlowNet) -> None:
    buffer = ReplayBuffer(env, capacity=4, priority="reward", alpha=2.0)
    traj = tagged(env, gflownet, 4, 0, seed=1)
    traj.log_rewards = torch.tensor([0.0, 0.5, 1.0, 1.5])
    buffer.add(traj)
    n = 20_000
    batch = buffer.sample(n, torch.Generator().manual_seed(0))  # with replacement
    ids = torch.bucketize(batch.log_rewards, traj.log_rewards)
    freq = torch.bincount(ids, minlength=4).float() / n
    expected = (2.0 * traj.log_rewards).softmax(0)  # R^2 / sum R^2
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0.0)
