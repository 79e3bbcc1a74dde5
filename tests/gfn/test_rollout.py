"""The two rollouts (dynamic and static lockstep), the static step under torch.compile, and the
loss scored from the sampling pass, each against an independent answer: the other rollout,
the sampler without deduplication, autograd's own backward, a fresh forward pass."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from envs.bitseq import BitSequence
from envs.continuous import Box
from envs.dag import DAGEnv
from envs.graphs import GraphBuilding
from envs.hypergrid import ConditionalHyperGrid, HyperGrid
from envs.ising import Ising
from gfn.gnn import GNNPolicy
from gfn.losses import get_loss
from gfn.policies import GFlowNet, MLPActivations, MLPPolicy
from gfn.sampler import (
    Trajectories,
    compile_static_steps,
    sample_trajectories,
    static_steps,
    trajectory_log_probs,
)
from gfn.task import RECORD_PASS_MIN_BATCH, ContinuousGFlowNetTask, GFlowNetTask
from kinetic.errors import ConfigError

FIELDS = ("states", "actions", "lengths", "terminal_states", "log_rewards", "conditions")


def mlp_gflownet(env, seed: int = 0, **kwargs) -> GFlowNet:
    torch.manual_seed(seed)
    n_features = env.featurize(env.initial_states(1)).shape[-1] + env.condition_dim
    return GFlowNet(
        MLPPolicy(n_features, env.n_actions, hidden=32, **kwargs), condition_dim=env.condition_dim
    )


def assert_same(a: Trajectories, b: Trajectories) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if x is None or y is None:
            assert x is None and y is None, name
        else:
            assert torch.equal(x, y), name


ENVS = {
    "hypergrid": lambda: HyperGrid(ndim=3, height=5),
    "conditional_hypergrid": lambda: ConditionalHyperGrid(ndim=2, height=6),
    "bitseq": lambda: BitSequence(n=16, k=4, n_targets=4),
    "dag": lambda: DAGEnv(n_nodes=4, seed=1),
    "ising": lambda: Ising(L=3),
}


# --- static and dynamic rollouts draw the same trajectories ---------------------------------


@pytest.mark.parametrize("name", list(ENVS))
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_static_rollout_draws_the_dynamic_rollouts_trajectories(name: str, chunk: int) -> None:
    env = ENVS[name]()
    gflownet = mlp_gflownet(env)
    for seed, (epsilon, temperature) in enumerate([(0.0, 1.0), (0.3, 2.0)]):
        kwargs = dict(epsilon=epsilon, temperature=temperature)
        dynamic = sample_trajectories(
            gflownet, env, 64, torch.Generator().manual_seed(seed), **kwargs
        )
        static = sample_trajectories(
            gflownet, env, 64, torch.Generator().manual_seed(seed), rollout="static", chunk=chunk,
            **kwargs,
        )  # fmt: skip
        assert_same(dynamic, static)
        if name not in ("bitseq", "ising"):  # (those fill every slot: one length)
            assert dynamic.lengths.min() < dynamic.lengths.max()  # several lengths


def test_static_rollout_on_a_graph_env_with_a_gnn() -> None:
    env = GraphBuilding(max_nodes=4, n_node_types=2)
    torch.manual_seed(0)
    gflownet = GFlowNet(GNNPolicy(2, env.n_actions, env.max_nodes, hidden=16, n_layers=2))
    dynamic = sample_trajectories(gflownet, env, 32, torch.Generator().manual_seed(3))
    static = sample_trajectories(
        gflownet, env, 32, torch.Generator().manual_seed(3), rollout="static", chunk=4
    )
    assert_same(dynamic, static)


def test_static_rollout_from_given_start_states() -> None:
    env = HyperGrid(ndim=2, height=6)
    gflownet = mlp_gflownet(env)
    start = torch.tensor([[0, 0], [2, 3], [5, 5], [4, 0]]).repeat(8, 1)  # (32, 2), one at the top
    dynamic = sample_trajectories(
        gflownet, env, 32, torch.Generator().manual_seed(0), start_states=start
    )
    static = sample_trajectories(
        gflownet, env, 32, torch.Generator().manual_seed(0), start_states=start, rollout="static"
    )
    assert_same(dynamic, static)
    assert torch.equal(static.states[0], start)


def test_deduplicated_sampling_draws_what_the_undeduplicated_sampler_draws() -> None:
    # Batch 256 from s0: early steps share their states, so the policy runs on far fewer rows.
    env = HyperGrid(ndim=4, height=6)
    gflownet = mlp_gflownet(env)
    rows = []
    forward = gflownet.policy.forward
    gflownet.policy.forward = lambda x: rows.append(x.shape[0]) or forward(x)
    deduplicated = sample_trajectories(gflownet, env, 256, torch.Generator().manual_seed(0))
    n_deduplicated, rows[:] = sum(rows), []
    plain = sample_trajectories(
        gflownet, env, 256, torch.Generator().manual_seed(0), unique_states=False
    )
    assert_same(deduplicated, plain)
    assert sum(rows) == (plain.lengths + 1).sum() - 255  # s0 is evaluated once even so
    assert n_deduplicated < 0.8 * sum(rows)


def test_rollout_and_chunk_are_refused_in_words() -> None:
    env = HyperGrid(ndim=2, height=4)
    gflownet = mlp_gflownet(env)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(
        ValueError, match=re.escape("Invalid rollout: 'lockstep'; valid: dynamic, static")
    ):
        sample_trajectories(gflownet, env, 4, generator, rollout="lockstep")
    with pytest.raises(ValueError, match="Invalid chunk: 0"):
        sample_trajectories(gflownet, env, 4, generator, rollout="static", chunk=0)
    with pytest.raises(ConfigError, match="compile_rollout compiles the static rollout"):
        GFlowNetTask(env, gflownet, compile_rollout=True)


# --- the static step compiles whole --------------------------------------------------------


@pytest.mark.parametrize("name", ["hypergrid", "bitseq", "conditional_hypergrid"])
def test_static_steps_trace_into_one_graph_without_breaks(name: str) -> None:
    env = ENVS[name]()
    gflownet = mlp_gflownet(env)
    n = 8
    states = env.initial_states(n)
    done = torch.zeros(n, dtype=torch.bool)
    races = torch.rand(4, n, env.n_actions) + 0.1  # (k, n, A)
    conditions = env.sample_conditions(n, torch.Generator()) if env.condition_dim else None
    explanation = torch._dynamo.explain(static_steps)(
        gflownet, env, states, done, races, conditions, 0.1, 1.0
    )
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_static_rollout_draws_the_dynamic_rollouts_trajectories() -> None:
    env = HyperGrid(ndim=3, height=5)
    gflownet = mlp_gflownet(env)
    steps_fn = compile_static_steps(torch.device("cpu"))
    for seed in range(3):  # the chunk graph compiles once and serves every call
        dynamic = sample_trajectories(gflownet, env, 32, torch.Generator().manual_seed(seed))
        static = sample_trajectories(
            gflownet, env, 32, torch.Generator().manual_seed(seed), rollout="static",
            steps_fn=steps_fn, chunk=4,
        )  # fmt: skip
        assert_same(dynamic, static)


# --- the loss scored from the sampling pass -------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_replayed_pass_backpropagates_as_autograd_does(activation: str) -> None:
    torch.manual_seed(0)
    policy = MLPPolicy(12, 5, hidden=16, n_layers=3, flow_head=True, activation=activation)
    policy = policy.double()
    x, y = torch.randn(7, 12, dtype=torch.double), torch.randn(3, 12, dtype=torch.double)
    with torch.no_grad():
        _, first = policy.record(x)
        _, second = policy.record(y)
    weights = torch.randn(10, 5, dtype=torch.double)

    def loss(out):
        return (out.pf_logits * weights).sum() + out.pb_logits.pow(2).sum() + out.log_flow.sum()

    replayed = torch.autograd.grad(
        loss(policy.replay(MLPActivations.cat([first, second]))), list(policy.parameters())
    )
    expected = torch.autograd.grad(loss(policy(torch.cat([x, y]))), list(policy.parameters()))
    for got, want in zip(replayed, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_name", ["tb", "db", "subtb"])
@pytest.mark.parametrize("name", ["hypergrid", "conditional_hypergrid", "bitseq"])
def test_loss_from_the_sampling_pass_equals_a_fresh_forward_pass(name: str, loss_name: str):
    env = ENVS[name]()
    loss = get_loss(loss_name)
    gflownet = mlp_gflownet(env, flow_head=loss.flow_head)
    batch = sample_trajectories(
        gflownet, env, 64, torch.Generator().manual_seed(0), epsilon=0.2, record_pass=True
    )
    assert batch.sampling_pass is not None
    params = list(gflownet.parameters())

    def loss_and_grads(trajectories: Trajectories):
        log_z = gflownet.log_z_of(trajectories.conditions)
        value = loss(trajectory_log_probs(gflownet, env, trajectories), trajectories, log_z)
        return value, torch.autograd.grad(value, params, allow_unused=True)

    fresh = dataclasses.replace(batch, sampling_pass=None)  # no recorded pass
    calls = []
    forward = gflownet.policy.forward
    gflownet.policy.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    value, grads = loss_and_grads(batch)
    assert calls == []  # scored from the pass: the policy did not run again
    want, want_grads = loss_and_grads(fresh)
    assert len(calls) == 1
    # float32, and the two passes group the rows differently: equal to rounding.
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads, want_grads, strict=True):
        if expected is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_a_stale_or_foreign_sampling_pass_is_not_used() -> None:
    env = HyperGrid(ndim=2, height=5)
    gflownet = mlp_gflownet(env)
    batch = sample_trajectories(
        gflownet, env, 16, torch.Generator().manual_seed(0), record_pass=True
    )
    recorded = batch.sampling_pass
    assert recorded.serves(gflownet)
    assert not recorded.serves(mlp_gflownet(env))  # another policy
    assert not recorded.serves(torch.nn.Sequential(gflownet))  # a wrapper (as DDP is)
    assert Trajectories.concatenate([batch, batch]).sampling_pass is None
    with torch.no_grad():
        gflownet.policy.heads.bias.add_(1.0)  # what an optimizer step does
    assert not recorded.serves(gflownet)
    # Scored again, the stale batch gets the updated policy's log-probs.
    fresh = dataclasses.replace(batch, sampling_pass=None)
    torch.testing.assert_close(
        trajectory_log_probs(gflownet, env, batch).log_pf,
        trajectory_log_probs(gflownet, env, fresh).log_pf,
    )


def test_the_task_records_its_on_policy_batches_only() -> None:
    env = HyperGrid(ndim=2, height=5)
    sampled = []

    def task_of(batch_size: int) -> GFlowNetTask:
        task = GFlowNetTask(env, mlp_gflownet(env), batch_size=batch_size)
        sample = task.sample
        task.sample = lambda *args, **kwargs: sampled.append(kwargs) or sample(*args, **kwargs)
        return task

    task = task_of(RECORD_PASS_MIN_BATCH)
    task.loss(1)
    assert sampled[-1]["record_pass"] is True
    task.loss(2, torch.nn.Sequential(task.model))  # scored through a wrapper: no recording
    assert sampled[-1]["record_pass"] is False
    task_of(RECORD_PASS_MIN_BATCH - 1).loss(1)  # too small a batch for the recording to pay
    assert sampled[-1]["record_pass"] is False


def test_a_continuous_environment_refuses_the_static_rollout() -> None:
    env = Box()
    policy = MLPPolicy(
        env.featurize(env.initial_states(1)).shape[-1], env.n_forward_params,
        n_backward_outputs=env.n_backward_params,
    )  # fmt: skip
    message = "task.rollout=static applies to discrete actions; a continuous environment (Box)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        ContinuousGFlowNetTask(env, GFlowNet(policy), get_loss("tb"), rollout="static")
