"""Environments on a device: `Env.to` moves what `__init__` made, every built-in method stays on
its input's device, and `check_env` names a method that leaves it."""

from __future__ import annotations

import re
from collections import namedtuple

import pytest
import torch

from envs import HyperGrid
from envs.bitseq import BitSequence
from envs.checker import EnvCheckError, check_env
from envs.continuous import Box, Line
from envs.dag import DAGEnv
from envs.graphs import GraphBuilding
from envs.hypergrid import ConditionalHyperGrid
from gfn.continuous import continuous_log_probs, sample_continuous
from gfn.evaluation import exact_metrics
from gfn.policies import GFlowNet, MLPPolicy, masked_log_softmax
from gfn.sampler import sample_trajectories, trajectory_log_probs

Pair = namedtuple("Pair", "a b")


class _Attributes(HyperGrid):
    """A HyperGrid carrying tensors in every kind of container `Env.to` must reach."""

    def __init__(self) -> None:
        super().__init__(ndim=2, height=3)
        self.table = [torch.zeros(2), (torch.ones(1), 3)]
        self.lookup = {"w": torch.arange(3), "name": "x"}
        self.pair = Pair(torch.zeros(1), torch.ones(1))
        self.net = torch.nn.Linear(2, 2)
        self.label = "grid"


def test_to_moves_every_tensor_attribute_and_returns_the_env():
    env = _Attributes()
    assert env.to("meta") is env
    meta = torch.device("meta")
    assert env.device == meta and env.s0.device == meta and env._coords.device == meta
    assert env.table[0].device == meta and env.table[1][0].device == meta
    assert env.table[1][1] == 3 and env.lookup["name"] == "x" and env.label == "grid"
    assert env.lookup["w"].device == meta
    assert isinstance(env.pair, Pair) and env.pair.b.device == meta
    assert env.net.weight.device == meta


ENVS = {
    "hypergrid": lambda: HyperGrid(ndim=2, height=4),
    "bitseq": lambda: BitSequence(n=8, k=4, n_targets=2),
    "graphs": lambda: GraphBuilding(max_nodes=3),
    "dag": lambda: DAGEnv(n_nodes=3),
    "conditional_hypergrid": lambda: ConditionalHyperGrid(height=4),
}


@pytest.mark.parametrize("name", list(ENVS))
def test_built_in_envs_run_on_the_device_they_are_moved_to(name, device):
    """Built on the CPU, moved with `to`: the checker (every method's output on the states'
    device) passes, and a rollout, its log-probs and its rewards live on the device."""
    env = ENVS[name]().to(device)
    check_env(env)
    assert env.initial_states(3).device.type == device.type
    if name == "graphs":
        return  # its policy is the GNN, tested on devices in tests/gfn
    torch.manual_seed(0)
    features = env.featurize(env.initial_states(1)).shape[1]
    conditions = env.condition_dim
    policy = MLPPolicy(features + conditions, env.n_actions, hidden=16)
    model = GFlowNet(policy, condition_dim=conditions).to(device)
    batch = sample_trajectories(model, env, 8, torch.Generator(device).manual_seed(0))
    log_probs = trajectory_log_probs(model, env, batch)
    for tensor in (batch.states, batch.actions, batch.log_rewards, log_probs.log_pf):
        assert tensor.device.type == device.type


def test_exact_evaluation_follows_the_env_to_its_device(device):
    """The DAG is built where the env lives, and rebuilt when the env moves."""
    env = HyperGrid(ndim=2, height=4)
    model = GFlowNet(MLPPolicy(8, env.n_actions, hidden=16))

    def log_pf(states):
        return masked_log_softmax(model(env.featurize(states)).pf_logits, env.forward_mask(states))

    on_cpu = exact_metrics(env, log_pf)
    env.to(device)
    model.to(device)
    on_device = exact_metrics(env, log_pf)
    assert on_device["l1"] == pytest.approx(on_cpu["l1"], abs=1e-5)


class _LeavesTheDevice(HyperGrid):
    """A HyperGrid whose log_reward returns its tensor on another device (meta)."""

    def log_reward(self, states):
        return super().log_reward(states).to("meta")


def test_check_env_names_a_method_that_leaves_the_device():
    message = (
        "_LeavesTheDevice does not meet the Env contract; check_env found 1 problem:\n"
        "  - log_reward(states) returned a tensor on meta for states on cpu; expected it on the "
        "states' device. Create new tensors there, e.g. torch.zeros(n, device=states.device) or "
        "torch.zeros_like(states); tensors set in __init__ follow env.to(device)."
    )
    with pytest.raises(EnvCheckError, match=f"^{re.escape(message)}$"):
        check_env(_LeavesTheDevice())


@pytest.mark.parametrize("make", [Box, Line], ids=["box", "line"])
def test_continuous_envs_run_on_the_device_they_are_moved_to(make, device):
    env = make().to(device)
    check_env(env)
    torch.manual_seed(0)
    features = env.featurize(env.initial_states(1)).shape[1]
    policy = MLPPolicy(features, env.n_forward_params, hidden=16,
                       n_backward_outputs=env.n_backward_params)  # fmt: skip
    model = GFlowNet(policy).to(device)
    batch = sample_continuous(model, env, 8, torch.Generator(device).manual_seed(0))
    log_probs = continuous_log_probs(model, env, batch)
    for tensor in (batch.states, batch.actions, batch.log_rewards, log_probs.log_pf):
        assert tensor.device.type == device.type
