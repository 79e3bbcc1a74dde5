"""DAGEnv: the BGe score against its closed form, the action space against brute force, exact
evaluation over all DAGs, and training to the exact posterior."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import multigammaln

from envs.checker import check_env
from envs.dag import DAGEnv, bge_local_scores, erdos_renyi_linear_gaussian
from kinetic.errors import ConfigError


def _graph(d: int, edges: list[tuple[int, int]]) -> torch.Tensor:
    state = torch.zeros(d * d, dtype=torch.long)
    for i, j in edges:
        state[i * d + j] = 1
    return state


def _is_acyclic(adjacency: np.ndarray) -> bool:
    """Kahn's algorithm in plain Python."""
    indegree = adjacency.sum(axis=0).tolist()
    ready = [j for j, k in enumerate(indegree) if k == 0]
    seen = 0
    while ready:
        i = ready.pop()
        seen += 1
        for j in np.flatnonzero(adjacency[i]):
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(int(j))
    return seen == len(indegree)


def _normal_wishart_log_evidence(data: np.ndarray, alpha_mu: float, alpha_w: float) -> float:
    """log p(D) of the multivariate Normal-Wishart model (Geiger & Heckerman 1994), which BGe
    gives a complete DAG: written from the matrix formula, not from local scores."""
    n, d = data.shape
    t = alpha_mu * (alpha_w - d - 1) / (alpha_mu + 1)
    mean = data.mean(axis=0, keepdims=True)
    centered = data - mean
    r = t * np.eye(d) + centered.T @ centered + n * alpha_mu / (n + alpha_mu) * mean.T @ mean
    return (
        -0.5 * n * d * math.log(math.pi)
        + 0.5 * d * (math.log(alpha_mu) - math.log(n + alpha_mu))
        + multigammaln(0.5 * (n + alpha_w), d)
        - multigammaln(0.5 * alpha_w, d)
        + 0.5 * alpha_w * d * math.log(t)
        - 0.5 * (n + alpha_w) * np.linalg.slogdet(r)[1]
    )


@pytest.mark.parametrize("d", [2, 3, 5])
def test_bge_of_a_complete_dag_is_the_normal_wishart_evidence(d):
    _, _, data = erdos_renyi_linear_gaussian(d, 1.0, 40, 1.0, seed=d)
    scores = bge_local_scores(data, alpha_mu=1.0, alpha_w=d + 2.0)
    order = list(range(d))[::-1]  # any order: node order[k] has the nodes before it as parents
    total = sum(float(scores[j, sum(1 << i for i in order[:k])]) for k, j in enumerate(order))
    assert total == pytest.approx(_normal_wishart_log_evidence(data, 1.0, d + 2.0), rel=1e-10)


def test_markov_equivalent_graphs_score_the_same_and_a_v_structure_does_not():
    env = DAGEnv(n_nodes=3, n_edges=2.0, seed=1)
    chain = _graph(3, [(0, 1), (1, 2)])
    reversed_chain = _graph(3, [(2, 1), (1, 0)])
    fork = _graph(3, [(1, 0), (1, 2)])
    collider = _graph(3, [(0, 1), (2, 1)])
    scores = env.log_marginal_likelihood(torch.stack([chain, reversed_chain, fork, collider]))
    assert scores[1] == pytest.approx(float(scores[0]), abs=1e-9)
    assert scores[2] == pytest.approx(float(scores[0]), abs=1e-9)
    assert abs(float(scores[3] - scores[0])) > 1e-3
    assert float(env.log_reward64(_graph(3, []).unsqueeze(0))) == 0.0  # log R relative to ∅


@pytest.mark.parametrize("d, count", [(2, 3), (3, 25), (4, 543), (5, 29_281)])
def test_enumerates_every_dag_once(d, count):
    terminals = DAGEnv(n_nodes=d).enumerate_terminals()
    assert terminals.shape == (count, d * d)  # OEIS A003024
    assert torch.unique(terminals, dim=0).shape[0] == count


def test_forward_mask_allows_exactly_the_edges_that_keep_the_graph_acyclic():
    d = 4
    env = DAGEnv(n_nodes=d)
    states = env.enumerate_terminals()
    mask = env.forward_mask(states)
    assert mask[:, -1].all()  # stop is always legal
    for row in range(0, states.shape[0], 7):
        adjacency = states[row].view(d, d).numpy()
        for i, j in itertools.product(range(d), range(d)):
            added = adjacency.copy()
            added[i, j] = 1
            legal = i != j and adjacency[i, j] == 0 and _is_acyclic(added)
            assert bool(mask[row, i * d + j]) == legal, (adjacency, i, j)
    assert torch.equal(env.backward_mask(states), states == 1)


def test_the_environment_passes_the_checker():
    check_env(DAGEnv(n_nodes=4), seed=0)
    check_env(DAGEnv(n_nodes=7, exact=False), seed=0)


def test_the_true_posterior_is_normalised_bge_and_edge_marginals_sum_it():
    env = DAGEnv(n_nodes=3, seed=2)
    terminals = env.enumerate_terminals()
    p = env.true_distribution()
    log_ml = env.log_marginal_likelihood(terminals)
    assert p.sum() == pytest.approx(1.0)
    assert torch.allclose(p, torch.softmax(log_ml, dim=0))
    marginals = env.edge_marginals(terminals, p)
    by_hand = sum(float(p[k]) * float(terminals[k, 0 * 3 + 1]) for k in range(len(p)))
    assert float(marginals[0, 1]) == pytest.approx(by_hand)
    metrics = env.distribution_metrics(terminals, p, p)
    assert metrics == {"edge_marginal_error": 0.0, "edge_marginal_max_error": 0.0}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            {"n_nodes": 6, "exact": True},
            "env.exact=true needs env.n_nodes <= 5, got 6: there are 3,781,503 DAGs",
        ),
        ({"n_nodes": 8, "exact": True}, "env.exact=true needs env.n_nodes <= 5, got 8"),
        ({"n_nodes": 13}, "env.n_nodes"),
        ({"noise_std": 0.0}, "env.noise_std"),
        ({"alpha_w": 5.0}, "env.alpha_w"),
        ({"n_edges": 11.0}, "env.n_edges"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        DAGEnv(**kwargs)


def test_sampled_metrics_for_large_graphs():
    env = DAGEnv(n_nodes=6, exact=False, seed=3)
    truth = env.true_graph.flatten().unsqueeze(0)
    reversed_one = truth.clone().view(1, 6, 6)
    i, j = (reversed_one[0] == 1).nonzero()[0].tolist()
    reversed_one[0, i, j], reversed_one[0, j, i] = 0, 1
    metrics = env.sampled_metrics(torch.cat([truth, reversed_one.view(1, -1)]), lambda x: x)
    assert metrics["expected_shd"] == pytest.approx(0.5)  # 0 and 1 (a reversal counts once)


@pytest.mark.slow
def test_dag_preset_learns_the_exact_posterior(tmp_path):
    """`python train.py env=dag` as README states it (mdb, epsilon 0.2, replay; 3,000 steps)
    reaches L1 < 0.1 over all 29,281 DAGs, and writes the data it scored."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "train.py", "env=dag", f"hydra.run.dir={tmp_path}",
         "logging.progress=false"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["l1"] < 0.1, metrics
    env = DAGEnv()
    assert np.array_equal(np.load(tmp_path / "data.npy"), env.data)
    assert np.array_equal(np.load(tmp_path / "true_graph.npy"), env.true_graph.numpy())


def test_the_forward_mask_is_computed_once_per_batch_and_never_stale(monkeypatch):
    """featurize and the sampler both ask for the mask of the same batch: one closure per
    step; another batch, or the same tensor changed in place, gets its own mask."""
    import envs.dag as dag
    from gfn.policies import GFlowNet, MLPPolicy
    from gfn.sampler import sample_trajectories

    env = DAGEnv(n_nodes=4, seed=0)
    calls = []
    closure = dag.transitive_closure
    monkeypatch.setattr(dag, "transitive_closure", lambda a: calls.append(1) or closure(a))
    torch.manual_seed(0)
    width = env.featurize(env.initial_states(1)).shape[-1]
    gflownet = GFlowNet(MLPPolicy(width, env.n_actions, hidden=16))
    calls.clear()
    batch = sample_trajectories(gflownet, env, 8, torch.Generator().manual_seed(0))
    assert len(calls) == batch.max_length  # one per step (featurize's and the mask's)

    def fresh_mask(states):
        env._last_mask = None
        return env.forward_mask(states)

    states = batch.terminal_states.clone()
    mask = env.forward_mask(states)
    assert torch.equal(mask, fresh_mask(states.clone()))
    other = env.initial_states(8)
    assert torch.equal(env.forward_mask(other), fresh_mask(other.clone()))
    states.zero_()  # in place: the kept mask no longer describes it
    assert torch.equal(env.forward_mask(states), fresh_mask(states.clone()))
