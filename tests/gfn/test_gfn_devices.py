"""The GFlowNet pieces on each device: sampling, the four losses, replay, the likelihood
estimator and the GNN policy give on the device what they give on the CPU (the CPU results are
checked against references in the other test files)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from envs import HyperGrid
from envs.bitseq import BitSequence
from envs.graphs import GraphBuilding
from gfn.estimators import terminal_log_probs
from gfn.gnn import GNNPolicy
from gfn.losses import LOSSES, get_loss
from gfn.policies import GFlowNet, MLPPolicy
from gfn.replay import ReplayBuffer
from gfn.sampler import sample_trajectories, trajectory_log_probs


def _gflownet(env, flow_head: bool = False) -> GFlowNet:
    torch.manual_seed(0)
    width = env.featurize(env.initial_states(1)).shape[1]
    model = GFlowNet(MLPPolicy(width, env.n_actions, hidden=32, flow_head=flow_head))
    with torch.no_grad():
        model.log_z.fill_(0.5)
    return model


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_losses_on_the_device_match_the_cpu(loss_name, device):
    """Trajectories sampled on the device, scored there and on the CPU (with the loss's own
    scorer): same loss, same gradients."""
    flows = loss_name in ("db", "subtb")
    env = HyperGrid(ndim=2, height=5).to(device)
    model = _gflownet(env, flow_head=flows).to(device)
    batch = sample_trajectories(model, env, 32, torch.Generator(device).manual_seed(0), 0.1)
    assert batch.states.device.type == device.type
    loss_fn = get_loss(loss_name)
    loss = loss_fn(loss_fn.score(model, env, batch), batch, model.log_z)
    assert loss.device.type == device.type
    loss.backward()

    cpu_env, cpu_model, cpu_batch = (
        HyperGrid(ndim=2, height=5),
        _gflownet(env, flows),
        batch.to("cpu"),
    )
    expected = loss_fn(loss_fn.score(cpu_model, cpu_env, cpu_batch), cpu_batch, cpu_model.log_z)
    expected.backward()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-6)
    for p, q in zip(model.parameters(), cpu_model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)  # log Z is unused by the flow losses
        if q.grad is not None:
            assert torch.allclose(p.grad.cpu(), q.grad, rtol=1e-3, atol=1e-5)


def test_replay_lives_on_the_env_device(device):
    env = HyperGrid(ndim=2, height=5).to(device)
    model = _gflownet(env).to(device)
    generator = torch.Generator(device).manual_seed(0)
    batch = sample_trajectories(model, env, 12, generator)
    for priority in ("uniform", "reward"):
        replay = ReplayBuffer(env, capacity=8, priority=priority)
        assert replay.states.device.type == device.type
        replay.add(batch)
        old = replay.sample(5, generator)
        assert old.states.device.type == device.type
        kept = {tuple(s) for s in batch.terminal_states[-8:].tolist()}  # the last 8 are kept
        assert all(tuple(s) in kept for s in old.terminal_states.tolist())
        assert torch.equal(old.states[-1].cpu(), old.terminal_states.cpu())  # padding rows


def test_likelihood_estimate_on_the_device_matches_the_cpu(device):
    """Bit sequences have one trajectory per string: the estimate is exact on every device."""
    env = BitSequence(n=8, k=2, n_targets=2)
    model = _gflownet(env)
    x = env.test_set[:6]
    expected = terminal_log_probs(model, env, x)
    env.to(device)
    got = terminal_log_probs(model.to(device), env, x.to(device))
    assert got.device.type == device.type
    assert torch.allclose(got.cpu(), expected, atol=1e-5)


def test_gnn_policy_on_the_device_matches_the_cpu(device):
    env = GraphBuilding(max_nodes=3)
    torch.manual_seed(0)
    policy = GNNPolicy(2, env.n_actions, env.max_nodes, hidden=16, n_layers=2, flow_head=True)
    generator = torch.Generator().manual_seed(0)
    states = sample_trajectories(GFlowNet(policy), env, 10, generator).terminal_states
    expected = policy(env.featurize(states))
    env_d, policy_d = copy.deepcopy(env).to(device), copy.deepcopy(policy).to(device)
    got = policy_d(env_d.featurize(states.to(device)))
    for g, e in zip(got, expected, strict=True):
        assert g.device.type == device.type
        assert torch.allclose(g.detach().cpu(), e.detach(), atol=1e-5)


def test_rollouts_and_the_recorded_pass_on_the_device(device):
    """On the device the static rollout draws the dynamic one's trajectories, and a batch
    scored from its sampling pass gets the loss and gradients of a fresh forward pass."""
    env = HyperGrid(ndim=3, height=5).to(device)
    model = _gflownet(env).to(device)
    dynamic = sample_trajectories(
        model, env, 64, torch.Generator(device).manual_seed(0), 0.1, record_pass=True
    )
    static = sample_trajectories(
        model, env, 64, torch.Generator(device).manual_seed(0), 0.1, rollout="static", chunk=4
    )
    for name in ("states", "actions", "lengths", "terminal_states", "log_rewards"):
        assert torch.equal(getattr(dynamic, name), getattr(static, name)), name
    assert dynamic.lengths.min() < dynamic.lengths.max()
    assert dynamic.sampling_pass is not None
    loss_fn = get_loss("tb")
    grads = []
    fresh = dataclasses.replace(dynamic, sampling_pass=None)  # no recorded pass
    for batch in (dynamic, fresh):
        model.zero_grad()
        loss = loss_fn(trajectory_log_probs(model, env, batch), batch, model.log_z)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
