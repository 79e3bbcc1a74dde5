"""The replay buffer through a checkpoint: a restored buffer replays what the original would."""

from __future__ import annotations

import io
import re

import pytest
import torch

from envs.hypergrid import HyperGrid
from gfn.policies import GFlowNet, MLPPolicy
from gfn.replay import ReplayBuffer
from gfn.sampler import sample_trajectories


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    ("priority", "first_adds"), [("uniform", 1), ("uniform", 3), ("reward", 3)]
)
def test_a_restored_buffer_replays_what_the_original_would(priority, first_adds):
    """`first_adds` batches of 4 into a buffer of 10: partly filled (1) or wrapped around (3)."""
    env = HyperGrid(ndim=2, height=5)
    torch.manual_seed(0)
    model = GFlowNet(MLPPolicy(10, env.n_actions, hidden=16))
    batches = [
        sample_trajectories(model, env, 4, torch.Generator().manual_seed(s), 0.5) for s in range(5)
    ]
    original = ReplayBuffer(env, capacity=10, priority=priority)
    for batch in batches[:first_adds]:
        original.add(batch)
    restored = ReplayBuffer(env, capacity=10, priority=priority)
    restored.add(batches[4])  # stale content that the restore must replace
    restored.load_state_dict(_round_trip(original.state_dict()))
    assert len(restored) == len(original)
    for buffer in (original, restored):
        buffer.add(batches[first_adds])
    for seed in range(3):
        a = original.sample(3, torch.Generator().manual_seed(seed))
        b = restored.sample(3, torch.Generator().manual_seed(seed))
        for name in ("states", "actions", "lengths", "terminal_states", "log_rewards"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("states", "actions", "lengths", "terminal_states", "log_rewards"):
        assert torch.equal(getattr(original, name), getattr(restored, name)), name


def test_a_buffer_of_another_size_is_refused():
    env = HyperGrid(ndim=2, height=5)
    state = ReplayBuffer(env, capacity=10).state_dict()
    with pytest.raises(ValueError, match=re.escape(
        "The replay buffer in the checkpoint holds 10 trajectories, this one 20 "
        "(task.replay.capacity)"
    )):  # fmt: skip
        ReplayBuffer(env, capacity=20).load_state_dict(state)
    with pytest.raises(
        ValueError, match=r"^The replay buffer's states in the checkpoint have shape"
    ):
        ReplayBuffer(HyperGrid(ndim=3, height=5), capacity=10).load_state_dict(state)
