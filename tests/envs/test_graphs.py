"""GraphBuilding: hand-checked rewards, masks, transitions, exact parent sets, features."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from envs.graphs import GraphBuilding
from gfn.evaluation import exact_metrics, exact_terminal_distribution, true_terminal_distribution
from gfn.policies import uniform_log_probs
from gfn.state_dag import state_dag

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HYD, OXY = 0, 1  # the node types H and O (default valences 1 and 2)


def graph(env: GraphBuilding, types: list[int], edges: list[tuple[int, int]]) -> torch.Tensor:
    """One state ``(N + M,)`` from slot types and an edge list."""
    state = env.s0.clone()
    state[: len(types)] = torch.tensor(types)
    for i, j in edges:
        i, j = min(i, j), max(i, j)
        state[env.max_nodes + j * (j - 1) // 2 + i] = 1
    return state


def tiny() -> GraphBuilding:
    return GraphBuilding(max_nodes=4, n_node_types=2)


def test_layout_and_sizes() -> None:
    env = tiny()
    assert (env.n_actions, env.n_backward_actions, env.state_shape) == (2 + 6 + 1, 8, (10,))
    assert env.max_steps == 10 and env.stop_action == 8
    assert env.s0.tolist() == [-1] * 4 + [0] * 6
    pairs = list(zip(env.edge_i.tolist(), env.edge_j.tolist(), strict=True))
    assert pairs == [(0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]  # colex
    assert env.n_states == 1 + 2 + 4 * 2 + 8 * 8 + 16 * 64 == 1099


def test_rewards_by_hand() -> None:
    env = tiny()  # valences H=1, O=2; log R = -2·Σ|deg − valence| + 0.5·#triangles
    cases = [
        (graph(env, [HYD], []), -2.0),  # lone H: mismatch 1
        (graph(env, [OXY], []), -4.0),  # lone O: mismatch 2
        (graph(env, [HYD, HYD], [(0, 1)]), 0.0),  # H–H, saturated
        (graph(env, [HYD, OXY, HYD], [(0, 1), (1, 2)]), 0.0),  # water
        (graph(env, [OXY, HYD, HYD], [(0, 1), (0, 2)]), 0.0),  # water, O in slot 0
        (graph(env, [OXY, OXY, OXY], [(0, 1), (1, 2), (0, 2)]), 0.5),  # O₃ ring: one triangle
        (graph(env, [HYD, HYD, HYD], [(0, 1), (1, 2), (0, 2)]), -6.0 + 0.5),  # H₃ ring: 3 × 1
        (graph(env, [OXY] * 4, [(0, 1), (1, 2), (2, 3), (0, 3)]), 0.0),  # O₄ ring, no triangle
        (graph(env, [OXY] * 4, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]), -8.0 + 2.0),
        (graph(env, [HYD, OXY, OXY, HYD], [(0, 1), (1, 2), (2, 3)]), 0.0),  # H–O–O–H
        (graph(env, [HYD, HYD, HYD, HYD], [(0, 1), (2, 3)]), 0.0),  # two H–H
        # O in slot 2 is one edge short, H in slot 3 too: mismatch 2.
        (graph(env, [HYD, OXY, OXY, HYD], [(0, 1), (1, 2)]), -4.0),
    ]
    states = torch.stack([s for s, _ in cases])
    expected = torch.tensor([r for _, r in cases])
    torch.testing.assert_close(env.log_reward(states), expected)
    assert env.log_reward(states).dtype == torch.float32
    assert env.is_mode(states).tolist() == [r >= 0 for _, r in cases]


def test_modes_counted_by_hand() -> None:
    # Saturated labelled graphs on <= 4 slots: H–H (1), water (3 slots for O), O₃ (1),
    # H–O–O–H (6 type layouts x 2 ways to attach the H's), two H–H (3 matchings),
    # O₄ (3 rings).
    env = tiny()
    terminals = env.enumerate_terminals()
    modes = terminals[env.is_mode(terminals)]
    assert modes.shape[0] == 1 + 3 + 1 + 12 + 3 + 3
    assert torch.unique(env.mode_region(modes)).numel() == 6
    p_star, _ = true_terminal_distribution(env)  # aligned with enumerate_terminals()
    assert p_star[env.is_mode(terminals)].sum().item() == pytest.approx(0.483, abs=1e-3)
    metrics = exact_metrics(env, lambda s: uniform_log_probs(env.forward_mask(s)))
    assert (metrics["n_modes"], metrics["n_mode_regions"]) == (23.0, 6.0)


def test_masks_at_s0_and_full() -> None:
    env = tiny()
    s0 = env.initial_states(2)
    assert env.forward_mask(s0).tolist() == [[True, True] + [False] * 6 + [False]] * 2
    assert not env.backward_mask(s0).any()
    complete = [(i, j) for j in range(4) for i in range(j)]
    full = graph(env, [HYD, OXY, OXY, HYD], complete).unsqueeze(0)
    assert env.forward_mask(full).tolist() == [[False] * 8 + [True]]
    assert env.backward_mask(full).tolist() == [[False, False] + [True] * 6]
    # Four isolated nodes: the last one (an H) can go; its column is type H's.
    isolated = graph(env, [OXY, OXY, OXY, HYD], []).unsqueeze(0)
    assert env.forward_mask(isolated).tolist() == [[False, False] + [True] * 6 + [True]]
    assert env.backward_mask(isolated).tolist() == [[True, False] + [False] * 6]
    # Three nodes, edge (0, 2): edges among slots 0..2 except (0, 2) are open; slot 3 is not.
    three = graph(env, [HYD, OXY, OXY], [(0, 2)]).unsqueeze(0)
    assert env.forward_mask(three).tolist() == [
        [True, True, True, False, True] + [False] * 3 + [True]
    ]
    assert env.backward_mask(three).tolist() == [[False, False, False, True, False] + [False] * 3]


def test_step_and_backward_step_invert_on_random_trajectories() -> None:
    env = GraphBuilding(max_nodes=5, n_node_types=3)
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(256)
    states = env.initial_states(256)
    history = []
    for _ in range(env.max_steps):
        mask = env.forward_mask(states)  # (B, A); drawn uniformly, stop included
        actions = torch.multinomial(mask.float(), 1, generator=generator).squeeze(1)
        moving = actions != env.stop_action
        children = torch.where(moving.unsqueeze(1), env.step(states, actions), states)
        moved = actions[moving]
        assert env.backward_mask(children[moving])[torch.arange(len(moved)), moved].all()
        assert torch.equal(env.backward_step(children[moving], moved), states[moving])
        assert torch.equal(env.n_nodes(children) - env.n_nodes(states), (actions < 3).long())
        history.append(actions)
        states = children
    # Walk every trajectory back to s0 by undoing its actions in reverse.
    for actions in reversed(history):
        moving = actions != env.stop_action
        assert env.backward_mask(states)[rows[moving], actions[moving]].all()
        states = torch.where(moving.unsqueeze(1), env.backward_step(states, actions), states)
    assert env.is_initial(states).all()


def test_backward_mask_admits_exactly_the_parents() -> None:
    # Brute force on the tiny DAG: {(parent, a) : step(parent, a) = s} for every state s,
    # from the forward edges, against backward_mask / backward_step at s.
    env = tiny()
    dag = state_dag(env)
    keys = [tuple(s) for s in dag.states.tolist()]
    by_forward: dict[tuple, set] = {k: set() for k in keys}
    for src, dst, a in zip(dag.src.tolist(), dag.dst.tolist(), dag.action.tolist(), strict=True):
        by_forward[keys[dst]].add((keys[src], a))
    mask = env.backward_mask(dag.states)  # (S, A - 1)
    rows, actions = mask.nonzero(as_tuple=True)
    parents = env.backward_step(dag.states[rows], actions)
    by_backward: dict[tuple, set] = {k: set() for k in keys}
    for row, a, parent in zip(rows.tolist(), actions.tolist(), parents.tolist(), strict=True):
        by_backward[keys[row]].add((tuple(parent), a))
    assert by_backward == by_forward
    assert sum(len(v) for v in by_forward.values()) == dag.src.numel() == 3322


def test_enumeration_matches_the_dag() -> None:
    env = tiny()
    terminals = env.enumerate_terminals()
    assert terminals.shape == (env.n_terminals, 10) and terminals.dtype == torch.long
    assert torch.unique(terminals, dim=0).shape[0] == 1098
    assert terminals[0].tolist() == [0, -1, -1, -1] + [0] * 6
    assert terminals[-1].tolist() == [1, 1, 1, 1] + [1] * 6
    start = time.perf_counter()
    dag = state_dag(GraphBuilding(max_nodes=4, n_node_types=2))  # checks terminals vs DAG
    assert time.perf_counter() - start < 2.0
    assert (dag.n_states, dag.n_levels) == (1099, 11)


def test_exact_distribution_of_the_uniform_policy_sums_to_one() -> None:
    env = tiny()
    _, p = exact_terminal_distribution(env, lambda s: uniform_log_probs(env.forward_mask(s)))
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)  # float32 log-probs
    assert (p > 0).all()
    _, log_z = true_terminal_distribution(env)
    assert log_z == pytest.approx(
        torch.logsumexp(env.log_reward(env.enumerate_terminals()).double(), 0).item()
    )


def test_featurize() -> None:
    env = tiny()
    states = torch.stack(
        [
            env.s0,
            graph(env, [HYD, OXY, HYD], [(0, 1), (1, 2)]),
            graph(env, [OXY], []),
            env.s0,
            graph(env, [OXY, OXY, HYD, OXY], [(0, 3), (1, 2)]),
        ]
    )
    data = env.featurize(states)
    assert data.num_graphs == 5
    assert data.ptr.tolist() == [0, 0, 3, 4, 4, 8]
    assert data.n_nodes.tolist() == [0, 3, 1, 0, 4]
    assert data.batch.tolist() == [1, 1, 1, 2, 4, 4, 4, 4]
    assert data.x.dtype == torch.float32
    assert data.x.argmax(1).tolist() == [HYD, OXY, HYD, OXY, OXY, OXY, HYD, OXY]
    assert data.x.sum(1).tolist() == [1.0] * 8
    edges = {tuple(e) for e in data.edge_index.t().tolist()}
    assert edges == {(0, 1), (1, 0), (1, 2), (2, 1), (4, 7), (7, 4), (5, 6), (6, 5)}
    empty = env.featurize(env.initial_states(3))
    assert (empty.x.shape, empty.edge_index.shape, empty.num_graphs) == ((0, 2), (2, 0), 3)


def test_configs_build_and_enumerate() -> None:
    for name, n_states in (("graphs_tiny", 1099), ("graphs", 33_867)):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            cfg = compose(config_name="config", overrides=[f"env={name}"])
        env = instantiate(cfg.env, _convert_="all")
        assert isinstance(env, GraphBuilding) and env.enumerable
        assert env.n_states == n_states
    big = GraphBuilding(max_nodes=6, n_node_types=2)
    assert not big.enumerable
    with pytest.raises(ValueError, match=r"more than GraphBuilding\.max_enumerable"):
        big.enumerate_terminals()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_nodes": 0}, ValueError, "Invalid env.max_nodes: 0; expected an int >= 1"),
        ({"n_node_types": 2.0}, ValueError, "Invalid env.n_node_types: 2.0; expected an int >= 1"),
        (
            {"valences": [1]},
            ValueError,
            "Invalid env.valences: [1]; expected env.n_node_types=2 ints >= 0",
        ),
        (
            {"valence_penalty": -1.0},
            ValueError,
            "Invalid env.valence_penalty: -1; expected a float >= 0",
        ),
        (
            {"triangle_bonus": float("nan")},
            ValueError,
            "Invalid env.triangle_bonus: nan; expected a finite float",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        GraphBuilding(**kwargs)
