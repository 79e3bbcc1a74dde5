"""GNNPolicy: shapes and finiteness with padding and empty graphs, batch-order invariance,
the config builder, and a GFlowNet that samples, scores and evaluates exactly with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from envs import HyperGrid
from envs.graphs import GraphBuilding
from gfn.evaluation import exact_terminal_distribution
from gfn.gnn import GNNPolicy, build_gnn_policy
from gfn.losses import get_loss
from gfn.policies import GFlowNet, masked_log_softmax
from gfn.sampler import sample_trajectories, trajectory_log_probs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def mixed_states(env: GraphBuilding) -> torch.Tensor:
    """Two s0, then graphs after 1, 2, ..., max_steps random moves (the last is complete)."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.linspace(1, env.max_steps, 14).round().long().flip(0)  # (14,)
    current = env.initial_states(14)
    for t in range(env.max_steps):
        mask = env.forward_mask(current)[:, :-1]
        moving = (lengths > t) & mask.any(dim=1)  # (14,)
        mask = torch.where(moving.unsqueeze(1), mask, True)
        actions = torch.multinomial(mask.float(), 1, generator=generator).squeeze(1)
        current = torch.where(moving.unsqueeze(1), env.step(current, actions), current)
    return torch.cat([env.initial_states(2), current])


def policy(env: GraphBuilding, **kwargs) -> GNNPolicy:
    torch.manual_seed(0)
    return GNNPolicy(2, env.n_actions, env.max_nodes, hidden=16, n_layers=2, **kwargs)


@pytest.mark.parametrize(
    ("backward", "flow_head"), [("learned", False), ("learned", True), ("uniform", False)]
)
def test_shapes_and_finite_on_empty_and_full_graphs(backward: str, flow_head: bool) -> None:
    env = GraphBuilding(max_nodes=4, n_node_types=2)
    states = mixed_states(env)
    assert env.n_nodes(states)[:3].tolist() == [0, 0, 4]
    assert not env.forward_mask(states[2:3])[:, :-1].any()  # s0 twice, then the complete graph
    out = policy(env, backward=backward, flow_head=flow_head)(env.featurize(states))
    assert out.pf_logits.shape == (16, env.n_actions) and torch.isfinite(out.pf_logits).all()
    if backward == "learned":
        assert out.pb_logits.shape == (16, env.n_actions - 1)
        assert torch.isfinite(out.pb_logits).all()
    else:
        assert out.pb_logits is None
    if flow_head:
        assert out.log_flow.shape == (16,) and torch.isfinite(out.log_flow).all()
    else:
        assert out.log_flow is None
    # A batch of s0 only (no nodes, no edges at all) works too.
    out = policy(env, flow_head=True)(env.featurize(env.initial_states(3)))
    assert out.pf_logits.shape == (3, env.n_actions) and torch.isfinite(out.pf_logits).all()
    torch.testing.assert_close(out.pf_logits[0], out.pf_logits[2])


def test_invariant_to_batch_order_and_company() -> None:
    env = GraphBuilding(max_nodes=5, n_node_types=3)
    model = GNNPolicy(3, env.n_actions, 5, hidden=16, n_layers=3, flow_head=True)
    states = mixed_states(env)
    out = model(env.featurize(states))
    perm = torch.randperm(len(states), generator=torch.Generator().manual_seed(0))
    permuted = model(env.featurize(states[perm]))
    for a, b in zip(out, permuted, strict=True):
        torch.testing.assert_close(a[perm], b)
    # Each graph alone gives what it gave in the batch (padding and neighbours play no part).
    for k in (0, 2, 5):
        alone = model(env.featurize(states[k : k + 1]))
        for a, b in zip(out, alone, strict=True):
            torch.testing.assert_close(a[k : k + 1], b)


def test_edge_logits_follow_the_slots() -> None:
    # Swapping the types of slots 0 and 1 (no edges) swaps the logits of pairs (0, 2), (1, 2).
    env = GraphBuilding(max_nodes=3, n_node_types=2)
    model = policy(env)
    states = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    logits = model(env.featurize(states)).pf_logits[:, 2:5]  # pairs (0,1), (0,2), (1,2)
    torch.testing.assert_close(logits[0], logits[1][[0, 2, 1]])


def test_gflownet_samples_scores_and_evaluates() -> None:
    env = GraphBuilding(max_nodes=4, n_node_types=2)
    model = GFlowNet(policy(env))
    batch = sample_trajectories(model, env, 32, torch.Generator().manual_seed(0))
    assert env.n_nodes(batch.terminal_states).min() >= 1
    log_probs = trajectory_log_probs(model, env, batch)
    loss = get_loss("tb")(log_probs, batch, model.log_z)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    unique = trajectory_log_probs(model, env, batch, unique_states=False)
    torch.testing.assert_close(unique.log_pf, log_probs.log_pf)
    torch.testing.assert_close(unique.log_pb, log_probs.log_pb)

    def log_pf(states: torch.Tensor) -> torch.Tensor:
        out = model(env.featurize(states))
        return masked_log_softmax(out.pf_logits, env.forward_mask(states))

    _, p = exact_terminal_distribution(env, log_pf)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_build_from_config() -> None:
    cfg = OmegaConf.load(CONFIGS / "model" / "gnn.yaml")
    assert cfg.name == "gnn"
    env = GraphBuilding(max_nodes=4, n_node_types=3)
    model = build_gnn_policy(cfg, env, flow_head=True)
    assert (model.n_types, model.n_pairs, model.max_nodes) == (3, 6, 4)
    assert model.flow_head and model.backward == cfg.backward
    assert model.embed.in_features == 3
    message = (
        "model=gnn needs a graph environment (featurize returning a torch-geometric Batch and "
        "a max_nodes attribute, like envs.graphs.GraphBuilding); got HyperGrid, whose "
        "featurize returns Tensor"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_gnn_policy(cfg, HyperGrid())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"n_actions": 6},
            "Invalid n_actions: 6 for max_nodes=4; it must be n_node_types + 6 "
            "(slot pairs) + 1 (stop) with n_node_types >= 1",
        ),
        ({"hidden": 0}, "Invalid model.hidden: 0; expected an int >= 1"),
        ({"n_layers": -1}, "Invalid model.n_layers: -1; expected an int >= 0"),
        ({"backward": "tied"}, "Unknown model.backward: 'tied'; valid: learned, uniform"),
    ],
)
def test_invalid_arguments(kwargs: dict, message: str) -> None:
    args = {"n_node_features": 2, "n_actions": 9, "max_nodes": 4} | kwargs
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GNNPolicy(**args)
