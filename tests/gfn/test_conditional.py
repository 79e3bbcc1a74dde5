"""Conditional GFlowNets: the condition reaches the policy, the reward and log Z(c), and the
per-condition exact evaluation matches a hand-written sum over paths."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from envs.checker import check_env
from envs.hypergrid import ConditionalHyperGrid
from gfn.local_search import LocalSearch
from gfn.losses import get_loss
from gfn.policies import GFlowNet, MLPPolicy, masked_log_softmax
from gfn.replay import ReplayBuffer
from gfn.sampler import sample_trajectories, trajectory_log_probs
from gfn.task import GFlowNetTask
from kinetic.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _model(env: ConditionalHyperGrid, seed: int = 0) -> GFlowNet:
    torch.manual_seed(seed)
    n_features = env.featurize(env.initial_states(1)).shape[-1] + env.condition_dim
    policy = MLPPolicy(n_features, env.n_actions, hidden=16, n_layers=2)
    return GFlowNet(policy, log_z_init=0.5, condition_dim=env.condition_dim)


def test_true_log_z_is_the_sum_over_all_states_of_the_tempered_reward():
    env = ConditionalHyperGrid(ndim=2, height=7, R0=0.2)
    for beta in (0.5, 1.0, 1.7):
        brute = sum(
            float(env.reward(torch.tensor([[x, y]]), torch.float64)) ** beta
            for x, y in itertools.product(range(7), repeat=2)
        )
        assert env.tempered_log_z(beta) == pytest.approx(math.log(brute), rel=1e-12)


def test_the_conditional_env_passes_the_checker_and_draws_conditions_in_range():
    env = ConditionalHyperGrid()
    check_env(env, seed=0)
    betas = env.sample_conditions(10_000, torch.Generator().manual_seed(0))
    assert betas.shape == (10_000, 1)
    assert float(betas.min()) >= 0.5 and float(betas.max()) <= 2.0
    assert float(betas.mean()) == pytest.approx(1.25, abs=0.02)


def test_sampled_trajectories_carry_their_condition_and_its_tempered_reward():
    env = ConditionalHyperGrid(height=5)
    batch = sample_trajectories(_model(env), env, 64, torch.Generator().manual_seed(1))
    assert batch.conditions.shape == (64, 1)
    expected = batch.conditions[:, 0] * env.log_reward(batch.terminal_states)
    assert torch.allclose(batch.log_rewards, expected)


@torch.no_grad()
def test_log_probs_see_each_trajectorys_condition():
    """trajectory_log_probs against a loop that evaluates the policy one state at a time."""
    env = ConditionalHyperGrid(height=4)
    model = _model(env)
    batch = sample_trajectories(model, env, 12, torch.Generator().manual_seed(2))
    scores = trajectory_log_probs(model, env, batch)
    for b in range(batch.batch_size):
        c = batch.conditions[b : b + 1]
        total_pf, total_pb = 0.0, 0.0
        for t in range(int(batch.lengths[b]) + 1):
            s = batch.states[t, b : b + 1]
            out = model(torch.cat([env.featurize(s), c], dim=1))
            a = int(batch.actions[t, b])
            total_pf += float(masked_log_softmax(out.pf_logits, env.forward_mask(s))[0, a])
            if t < int(batch.lengths[b]):
                nxt = batch.states[t + 1, b : b + 1]
                out_next = model(torch.cat([env.featurize(nxt), c], dim=1))
                log_pb = masked_log_softmax(out_next.pb_logits, env.backward_mask(nxt))
                total_pb += float(log_pb[0, a])
        assert float(scores.log_pf[:, b].sum()) == pytest.approx(total_pf, abs=1e-5)
        assert float(scores.log_pb[:, b].sum()) == pytest.approx(total_pb, abs=1e-5)


def _p_terminal_by_paths(env, model, beta: float) -> dict[tuple[int, ...], float]:
    """P_T(x | beta) of every state, by recursion over paths from s0 (no DAG, no batching)."""
    c = torch.tensor([[beta]])

    @functools.cache
    def log_pf(state: tuple[int, ...]) -> tuple[float, ...]:
        s = torch.tensor([state])
        out = model(torch.cat([env.featurize(s), c], dim=1))
        return tuple(masked_log_softmax(out.pf_logits, env.forward_mask(s))[0].tolist())

    @functools.cache
    def reach(state: tuple[int, ...]) -> float:
        if not any(state):
            return 1.0
        total = 0.0
        for d, x in enumerate(state):
            if x > 0:
                parent = (*state[:d], x - 1, *state[d + 1 :])
                total += reach(parent) * math.exp(log_pf(parent)[d])
        return total

    states = itertools.product(range(env.height), repeat=env.ndim)
    return {s: reach(s) * math.exp(log_pf(s)[-1]) for s in states}


@torch.no_grad()
def test_per_condition_metrics_match_a_sum_over_paths():
    env = ConditionalHyperGrid(height=4, eval_betas=[0.5, 2.0])
    model = _model(env, seed=3)
    task = GFlowNetTask(env, model, "tb", batch_size=4)
    metrics = task.evaluate(0)
    for beta in (0.5, 2.0):
        p = _p_terminal_by_paths(env, model, beta)
        rewards = {s: float(env.reward(torch.tensor([s]), torch.float64)) ** beta for s in p}
        z = sum(rewards.values())
        l1 = sum(abs(p[s] - rewards[s] / z) for s in p)
        assert metrics[f"l1@beta={beta:g}"] == pytest.approx(l1, rel=1e-6)
        log_z = float(model.log_z_net(torch.tensor([[beta]])))
        assert metrics[f"log_z_error@beta={beta:g}"] == pytest.approx(abs(log_z - math.log(z)))
    assert metrics["l1"] == pytest.approx((metrics["l1@beta=0.5"] + metrics["l1@beta=2"]) / 2)
    assert metrics["l1_max"] == max(metrics["l1@beta=0.5"], metrics["l1@beta=2"])


def test_tb_trains_log_z_of_c_and_the_scalar_is_left_out():
    env = ConditionalHyperGrid(height=4)
    model = _model(env)
    groups = model.parameter_groups(log_z_lr=0.1)
    assert all(p is not model.log_z for p in groups[1]["params"])
    task = GFlowNetTask(env, model, "tb", batch_size=8)
    loss, scalars = task.loss(0)
    loss.backward()
    assert model.log_z.grad is None
    assert all(p.grad is not None for p in model.log_z_net.parameters())
    assert scalars["train/log_z"].shape == ()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"eval_betas": [0.5, 3.0]}, "env.eval_betas: 3 lies outside the training range"),
        ({"eval_betas": []}, "Invalid env.eval_betas: []"),
        ({"beta_min": 0.0}, "Invalid env.beta_min: 0"),
        ({"beta_min": 2.0, "beta_max": 1.0}, "Invalid env.beta_max: 1"),
    ],
)
def test_bad_conditions_are_refused_by_name(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ConditionalHyperGrid(**kwargs)


def test_what_a_condition_rules_out_is_refused_by_name():
    env = ConditionalHyperGrid(height=4)
    with pytest.raises(ConfigError, match=r"loss=fm is not available on the conditional"):
        GFlowNetTask(env, _model(env), get_loss("fm"))


def test_replayed_and_locally_searched_trajectories_keep_their_condition():
    """Replayed trajectories come back with the condition they were drawn under, and their
    reward under it; a checkpointed buffer restores them; local search keeps them too."""
    env = ConditionalHyperGrid(height=5)
    model = _model(env)
    generator = torch.Generator().manual_seed(5)
    batch = sample_trajectories(model, env, 32, generator)
    buffer = ReplayBuffer(env, 64)
    buffer.add(batch)
    replayed = buffer.sample(32, generator)
    expected = replayed.conditions[:, 0] * env.log_reward(replayed.terminal_states)
    assert torch.allclose(replayed.log_rewards, expected)
    drawn = {tuple(c.tolist()) for c in batch.conditions}
    assert {tuple(c.tolist()) for c in replayed.conditions} == drawn
    restored = ReplayBuffer(env, 64)
    restored.load_state_dict(buffer.state_dict())
    assert torch.equal(restored.conditions, buffer.conditions)
    with pytest.raises(ValueError, match="lacks conditions"):
        buffer.add(dataclasses.replace(batch, conditions=None))
    task = GFlowNetTask(
        env, model, "tb", batch_size=8, replay=ReplayBuffer(env, 32), replay_fraction=0.5,
        local_search=LocalSearch(k=2, refinements=1),
    )  # fmt: skip
    for step in range(3):
        loss, _ = task.loss(step)
        assert torch.isfinite(loss)
    stored = task.replay.conditions[: len(task.replay)]
    assert float(stored.min()) >= 0.5 and float(stored.max()) <= 2.0


@pytest.mark.slow
def test_the_preset_learns_every_held_out_condition(tmp_path):
    done = subprocess.run(
        [sys.executable, "train.py", "env=conditional_hypergrid", "train.steps=1500",
         f"hydra.run.dir={tmp_path}", "logging.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "l1@beta=0.5=" in done.stdout and "log_z_error@beta=2=" in done.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # An untrained policy is at L1 ~1 at every beta; 1,500 steps reach ~0.03 mean.
    for beta in ("0.5", "0.75", "1", "1.5", "2"):
        assert metrics[f"l1@beta={beta}"] < 0.15, metrics
        assert metrics[f"log_z_error@beta={beta}"] < 0.5, metrics
