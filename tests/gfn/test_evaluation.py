"""Exact evaluation: hand-computed terminal distributions, metrics in closed form, errors."""

import math
import re
from fractions import Fraction

import pytest
import torch
from torch import Tensor

from envs import Env, HyperGrid
from gfn.evaluation import (
    count_modes,
    exact_metrics,
    exact_terminal_distribution,
    jensen_shannon_divergence,
    l1_distance,
    log_z_error,
    state_dag,
    terminal_index,
    total_variation,
    true_terminal_distribution,
)


def uniform_policy(env: Env):
    """Uniform over legal forward actions (stop included)."""

    def log_pf(states: Tensor) -> Tensor:
        mask = env.forward_mask(states)
        return torch.zeros(mask.shape).masked_fill(~mask, -math.inf).log_softmax(dim=1)

    return log_pf


def as_tensor(values: list[Fraction]) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


# --- small non-HyperGrid environments -----------------------------------------------------


class JumpChain(Env):
    """States 0..n (shape (1,)); action i jumps by ``jumps[i]``; every state is terminal.

    With jumps (1, 3) the DAG is not graded: 3 is one jump from 0 and three from 0 via 1, 2,
    so breadth-first discovery order is not topological.
    """

    def __init__(self, n: int, jumps: tuple[int, ...], max_steps: int | None = None) -> None:
        self.n = n
        self.jumps = torch.tensor(jumps)
        self.n_actions = len(jumps) + 1
        self.state_shape = (1,)
        self.state_dtype = torch.long
        self.s0 = torch.zeros(1, dtype=torch.long)
        self.max_steps = n if max_steps is None else max_steps

    def forward_mask(self, states: Tensor) -> Tensor:
        legal = states + self.jumps <= self.n  # (B, J)
        return torch.cat([legal, torch.ones_like(legal[:, :1])], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        return states - self.jumps >= 0

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states + self.jumps[actions].unsqueeze(1)

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        return states - self.jumps[actions].unsqueeze(1)

    def log_reward(self, states: Tensor) -> Tensor:
        return states[:, 0].float()

    def featurize(self, states: Tensor) -> Tensor:
        return states.float()

    def enumerate_terminals(self) -> Tensor:
        return torch.arange(self.n + 1).unsqueeze(1)


class Ring(JumpChain):
    """A cycle: +1 modulo n. Not a DAG."""

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        return (states + 1) % self.n

    def forward_mask(self, states: Tensor) -> Tensor:
        return torch.ones(states.shape[0], 2, dtype=torch.bool)


class NoEnumeration(JumpChain):
    """A valid env that does not implement enumerate_terminals (or the mode hooks)."""

    enumerate_terminals = Env.enumerate_terminals


class SetBits(Env):
    """Fill L int8 slots (−1 = unset) with 0/1 in any order; stop only when all are set.

    Action 2i + b sets slot i to b. Terminals are listed in reverse binary order, to check that
    results follow ``enumerate_terminals()`` rather than any internal order.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.n_actions = 2 * length + 1
        self.state_shape = (length,)
        self.state_dtype = torch.int8
        self.s0 = torch.full((length,), -1, dtype=torch.int8)
        self.max_steps = length

    def forward_mask(self, states: Tensor) -> Tensor:
        unset = (states < 0).repeat_interleave(2, dim=1)  # (B, 2L)
        return torch.cat([unset, ~unset.any(dim=1, keepdim=True)], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        values = torch.tensor([0, 1], dtype=torch.int8).repeat(self.length)
        return states.repeat_interleave(2, dim=1) == values

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        out = states.clone()
        out[torch.arange(states.shape[0]), actions // 2] = (actions % 2).to(torch.int8)
        return out

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        out = states.clone()
        out[torch.arange(states.shape[0]), actions // 2] = -1
        return out

    def log_reward(self, states: Tensor) -> Tensor:
        return states.float().sum(dim=1)

    def featurize(self, states: Tensor) -> Tensor:
        return states.float()

    def enumerate_terminals(self) -> Tensor:
        codes = torch.arange(2**self.length - 1, -1, -1)
        bits = codes.unsqueeze(1) >> torch.arange(self.length - 1, -1, -1) & 1
        return bits.to(torch.int8)


# --- exact terminal distributions by hand -------------------------------------------------


def test_uniform_policy_on_2x2_grid() -> None:
    # (0,0): 3 legal actions; (0,1), (1,0): 2; (1,1): stop only. Row-major order.
    env = HyperGrid(ndim=2, height=2)
    terminals, p = exact_terminal_distribution(env, uniform_policy(env))
    assert torch.equal(terminals, env.enumerate_terminals())
    expected = as_tensor([Fraction(1, 3), Fraction(1, 6), Fraction(1, 6), Fraction(1, 3)])
    assert p.dtype == torch.float64
    torch.testing.assert_close(p, expected, atol=1e-7, rtol=0)


def test_uniform_policy_on_3x3_grid() -> None:
    # reach(1,1) = 2·(1/3·1/3) = 2/9, reach(2,1) = 1/9·1/2 + 2/9·1/3 = 7/54, reach(2,2) = 7/54.
    env = HyperGrid(ndim=2, height=3)
    _, p = exact_terminal_distribution(env, uniform_policy(env), batch_size=4)
    f = Fraction
    expected = [f(1, 3), f(1, 9), f(1, 18), f(1, 9), f(2, 27), f(7, 108), f(1, 18), f(7, 108)]
    expected.append(f(7, 54))
    assert sum(expected) == 1
    torch.testing.assert_close(p, as_tensor(expected), atol=1e-7, rtol=0)


def test_non_graded_dag() -> None:
    # 0 → {1, 3}, 1 → 2, 2 → 3: p(0) = 1/3, p(1) = 1/6, p(2) = 1/12, p(3) = 1/3 + 1/12.
    env = JumpChain(3, jumps=(1, 3))
    dag = state_dag(env)
    assert dag.level_ptr == [0, 1, 2, 3, 4]  # levels are longest paths, not BFS depths
    assert dag.states[:, 0].tolist() == [0, 1, 2, 3]
    _, p = exact_terminal_distribution(env, uniform_policy(env))
    expected = as_tensor([Fraction(1, 3), Fraction(1, 6), Fraction(1, 12), Fraction(5, 12)])
    torch.testing.assert_close(p, expected, atol=1e-7, rtol=0)


def test_stop_only_at_complete_states_and_custom_order() -> None:
    # Uniform P_F over SetBits is symmetric in values, so every sequence gets 2^-L.
    env = SetBits(3)
    terminals, p = exact_terminal_distribution(env, uniform_policy(env))
    assert torch.equal(terminals, env.enumerate_terminals())
    assert state_dag(env).n_states == 3**3
    torch.testing.assert_close(p, torch.full((8,), 1 / 8, dtype=torch.float64))
    p_star, log_z_star = true_terminal_distribution(env)
    counts = terminals.sum(dim=1).double()  # log R = number of ones
    torch.testing.assert_close(p_star, counts.exp() / counts.exp().sum())
    assert log_z_star == pytest.approx(3 * math.log(1 + math.e), rel=1e-6)


def optimal_policy(env: HyperGrid):
    """P_F matching R exactly, by brute force: uniform P_B and backward-recursed flows.

    F(s) = R(s) + Σ_{s→s'} F(s') / #parents(s'), P_F(s'|s) = F(s') / (#parents(s') F(s)),
    P_F(stop|s) = R(s) / F(s); then F(s0) = Z.
    """
    terminals = env.enumerate_terminals()  # every state; row-major, children come later
    rewards = env.reward(terminals, dtype=torch.float64).tolist()
    n_parents = (terminals > 0).sum(dim=1).tolist()
    place = [env.height ** (env.ndim - 1 - d) for d in range(env.ndim)]  # row-major strides
    flow = [0.0] * len(rewards)
    for i in reversed(range(len(rewards))):
        x = terminals[i].tolist()
        children = [i + place[d] for d in range(env.ndim) if x[d] < env.height - 1]
        flow[i] = rewards[i] + sum(flow[c] / n_parents[c] for c in children)
    log_pf = torch.full((len(rewards), env.n_actions), -math.inf, dtype=torch.float64)
    for i in range(len(rewards)):
        x = terminals[i].tolist()
        for d in range(env.ndim):
            if x[d] < env.height - 1:
                c = i + place[d]
                log_pf[i, d] = math.log(flow[c] / (n_parents[c] * flow[i]))
        log_pf[i, env.stop_action] = math.log(rewards[i] / flow[i])
    return (lambda states: log_pf[env.state_index(states)]), math.log(flow[0])


@pytest.mark.parametrize(("ndim", "height"), [(2, 3), (2, 8), (3, 4)])
def test_optimal_policy_has_zero_error(ndim: int, height: int) -> None:
    env = HyperGrid(ndim=ndim, height=height)
    log_pf_fn, log_z = optimal_policy(env)
    assert log_z == pytest.approx(env.true_log_z, rel=1e-12)
    _, p = exact_terminal_distribution(env, log_pf_fn)
    torch.testing.assert_close(p, env.true_distribution(), atol=1e-12, rtol=1e-9)
    metrics = exact_metrics(env, log_pf_fn, log_z=torch.tensor(log_z))
    assert metrics["l1"] < 1e-6 and metrics["jsd"] < 1e-9 and metrics["tv"] < 1e-6
    assert metrics["log_z_error"] < 1e-6


# --- metrics in closed form ---------------------------------------------------------------


def test_distances_in_closed_form() -> None:
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    # m = (1/4, 1/2, 1/4): KL(p‖m) = KL(q‖m) = ½ log 2.
    assert float(l1_distance(p, q)) == pytest.approx(1.0)
    assert float(total_variation(p, q)) == pytest.approx(0.5)
    assert float(jensen_shannon_divergence(p, q)) == pytest.approx(0.5 * math.log(2))
    # m = (3/4, 1/4): KL(p‖m) = log 4/3, KL(q‖m) = ½ log 4/3.
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    assert float(jensen_shannon_divergence(p, q)) == pytest.approx(0.75 * math.log(4 / 3))
    assert float(jensen_shannon_divergence(q, p)) == pytest.approx(0.75 * math.log(4 / 3))


def test_distance_bounds_and_identity() -> None:
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert float(l1_distance(p, q)) == 2.0 and float(total_variation(p, q)) == 1.0
    assert float(jensen_shannon_divergence(p, q)) == pytest.approx(math.log(2))
    r = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), 0)
    assert float(jensen_shannon_divergence(r, r)) == 0.0
    assert float(l1_distance(r, r)) == 0.0
    assert log_z_error(torch.tensor(1.5), 2.0) == pytest.approx(0.5)


def test_distance_shape_mismatch() -> None:
    msg = "distributions must have the same shape, got (3,) and (2,)"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        l1_distance(torch.ones(3), torch.ones(2))


# --- modes --------------------------------------------------------------------------------


def test_count_modes_among_visited() -> None:
    env = HyperGrid(ndim=2, height=8)
    visited = torch.tensor([[1, 1], [1, 1], [6, 1], [0, 0], [3, 3], [1, 0]])
    assert count_modes(env, visited) == (2, 2)
    assert count_modes(env, visited[:0]) == (0, 0)
    metrics = exact_metrics(env, uniform_policy(env), visited=visited)
    assert metrics["modes_found"] == 2.0 and metrics["mode_regions_found"] == 2.0
    assert metrics["n_modes"] == 4.0 and metrics["n_mode_regions"] == 4.0
    assert "log_z_error" not in metrics
    assert set(metrics) == {
        "l1", "tv", "jsd", "n_modes", "n_mode_regions", "modes_found", "mode_regions_found"
    }  # fmt: skip


def test_terminal_index() -> None:
    env = HyperGrid(ndim=3, height=5)
    states = torch.tensor([[0, 0, 0], [4, 4, 4], [1, 2, 3], [5, 0, 0], [-1, 0, 0]])
    expected = torch.cat([env.state_index(states[:3]), torch.tensor([-1, -1])])
    assert torch.equal(terminal_index(env, states), expected)
    bits = SetBits(2)
    assert terminal_index(bits, bits.enumerate_terminals().flip(0)).tolist() == [3, 2, 1, 0]


# --- errors -------------------------------------------------------------------------------


def test_env_without_enumeration() -> None:
    env = NoEnumeration(3, jumps=(1,))
    msg = (
        "exact evaluation needs NoEnumeration.enumerate_terminals(), which NoEnumeration does "
        "not implement: return every terminal state as one tensor (N, *state_shape) to get "
        "exact metrics. Sampled estimates for environments that cannot be enumerated are not "
        "available yet."
    )
    with pytest.raises(NotImplementedError, match=f"^{re.escape(msg)}$"):
        exact_metrics(env, uniform_policy(env))


def test_modes_on_env_without_mode_hooks() -> None:
    env = JumpChain(3, jumps=(1,))
    metrics = exact_metrics(env, uniform_policy(env))
    assert "n_modes" not in metrics
    msg = (
        "counting modes needs JumpChain.is_mode() and JumpChain.mode_region(), which JumpChain "
        "does not implement both of; implement them, or pass visited=None to skip mode metrics"
    )
    with pytest.raises(NotImplementedError, match=f"^{re.escape(msg)}$"):
        exact_metrics(env, uniform_policy(env), visited=torch.zeros(1, 1, dtype=torch.long))


def test_cycle_is_reported() -> None:
    with pytest.raises(ValueError, match="Ring's forward transitions contain a cycle"):
        state_dag(Ring(3, jumps=(1,)))


def test_too_small_max_steps_is_reported() -> None:
    msg = (
        "JumpChain has a trajectory of 3 non-stop actions, more than max_steps=2; max_steps "
        "must bound every trajectory"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        state_dag(JumpChain(3, jumps=(1,), max_steps=2))


def test_incomplete_enumeration_is_reported() -> None:
    env = JumpChain(3, jumps=(1,))
    env.enumerate_terminals = lambda: torch.arange(3).unsqueeze(1)  # misses state 3
    msg = (
        "JumpChain.enumerate_terminals() returned 3 states but JumpChain can stop in 4 "
        "distinct reachable states; it must list each of them exactly once; e.g. [3] is missing"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        state_dag(env)


def test_bad_policy_output_is_reported() -> None:
    env = HyperGrid(ndim=2, height=3)
    msg = "log_pf_fn must return (B, n_actions=3) log-probabilities, got (9, 2) for B=9"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        exact_terminal_distribution(env, lambda s: torch.zeros(s.shape[0], 2))


def test_dag_is_cached_per_env() -> None:
    env = HyperGrid(ndim=2, height=4)
    assert state_dag(env) is state_dag(env)
    assert state_dag(HyperGrid(ndim=2, height=4)) is not state_dag(env)


def test_the_state_dag_cache_dies_with_its_env_and_never_aliases_a_new_one():
    """The cache is keyed by the env object (a weak reference, checked by identity): a freed
    env's entry goes with it, and a new env, even at the freed one's address, builds its own."""
    import gc

    from gfn import state_dag as dags

    small = HyperGrid(ndim=2, height=3)
    assert state_dag(small).n_states == 9
    address = id(small)
    del small
    gc.collect()
    assert address not in dags._CACHE  # freed with its env
    for _ in range(50):  # new envs until one reuses an address (CPython often does at once)
        other = HyperGrid(ndim=2, height=4)
        assert state_dag(other).n_states == 16  # its own DAG, never the freed 3x3 one
        if id(other) == address:
            break
