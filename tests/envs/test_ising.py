"""Ising: hand-checked energies, the coupling matrix, transfer-matrix log Z against enumeration,
masks in both spin orders, the checker, and exact evaluation on the enumerable lattices."""

from __future__ import annotations

import math
import re

import pytest
import torch

from envs.checker import check_env
from envs.ising import Ising
from gfn.evaluation import exact_terminal_distribution
from gfn.policies import uniform_log_probs
from gfn.state_dag import is_enumerable, state_dag


def test_energies_at_hand_checked_configurations() -> None:
    env = Ising(L=3, J=1.5, beta=0.5)
    up = torch.ones(1, 9, dtype=torch.long)
    one_flipped = up.clone()
    one_flipped[0, 4] = -1  # the centre: its 4 bonds turn from +1 to -1
    states = torch.cat([up, -up, one_flipped])
    # 18 bonds on the 3x3 torus: x^T J x = 2 J_c * (sum over bonds of x_i x_j).
    bonds = torch.tensor([18, 18, 18 - 2 * 4])
    assert env.bond_sums(states).tolist() == bonds.tolist()
    torch.testing.assert_close(env.energy(states), -2 * 1.5 * bonds.float())
    torch.testing.assert_close(env.log_reward(states), 2 * 0.5 * 1.5 * bonds.float())
    # The 4x4 checkerboard breaks all 32 bonds.
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    board = (1 - 2 * ((rows + cols) % 2)).unsqueeze(0)
    assert Ising(L=4).bond_sums(board).tolist() == [-32]


@pytest.mark.parametrize("L", [2, 3, 4, 5])
def test_energy_is_minus_x_j_x_with_the_coupling_matrix(L: int) -> None:
    env = Ising(L=L, J=-0.7, beta=1.0)
    j = env.coupling_matrix  # (N, N)
    torch.testing.assert_close(j, j.T)
    assert torch.allclose(j.sum(dim=1), torch.full((L * L,), 4 * -0.7, dtype=torch.float64))
    if L >= 3:  # J_c on each of the 4 neighbours, 0 elsewhere
        assert set(j.unique().tolist()) == {0.0, -0.7}
    x = torch.randint(0, 2, (32, L * L), generator=torch.Generator().manual_seed(L)) * 2 - 1
    quadratic = torch.einsum("bi,ij,bj->b", x.double(), j, x.double())
    torch.testing.assert_close(env.energy(x).double(), -quadratic, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("L", "J", "beta"), [(2, 1.0, 0.3), (3, 1.0, 0.2), (3, -1.0, 0.4), (4, 0.5, 0.6), (4, 1.0, 0.0)]
)
def test_transfer_matrix_matches_enumeration(L: int, J: float, beta: float) -> None:
    env = Ising(L=L, J=J, beta=beta)
    x = env.enumerate_terminals()
    log_r = 2 * beta * J * env.bond_sums(x).double()  # (2^N,), float64
    log_z = torch.logsumexp(log_r, dim=0)
    mean_log_r = (torch.softmax(log_r, dim=0) * log_r).sum()
    assert env.exact_log_z() == pytest.approx(float(log_z), rel=1e-10, abs=1e-10)
    assert env.exact_mean_log_reward() == pytest.approx(float(mean_log_r), rel=1e-9, abs=1e-9)
    if beta == 0.0:
        assert env.exact_log_z() == pytest.approx(L * L * math.log(2), rel=1e-12)


def test_enumerate_terminals_lists_every_configuration_once() -> None:
    x = Ising(L=3).enumerate_terminals()
    assert x.shape == (512, 9) and x.dtype == torch.long
    assert x[0].tolist() == [-1] * 9 and x[-1].tolist() == [1] * 9
    assert x[1].tolist() == [-1] * 8 + [1]
    assert torch.unique(x, dim=0).shape[0] == 512


def test_masks_and_steps_in_any_order() -> None:
    env = Ising(L=2)  # N = 4: actions 0-3 set -1, 4-7 set +1, 8 stops
    s = torch.tensor([[0, 1, -1, 0], [1, 1, -1, -1]])
    forward = env.forward_mask(s)
    assert forward[0].tolist() == [True, False, False, True, True, False, False, True, False]
    assert forward[1].tolist() == [False] * 8 + [True]
    backward = [False, False, True, False, False, True, False, False]  # -1 at 2, +1 at 1
    assert env.backward_mask(s)[0].tolist() == backward
    assert env.step(s[:1], torch.tensor([3])).tolist() == [[0, 1, -1, -1]]
    assert env.step(s[:1], torch.tensor([4])).tolist() == [[1, 1, -1, 0]]
    assert env.backward_step(s[:1], torch.tensor([5])).tolist() == [[0, 0, -1, 0]]


def test_raster_order_sets_the_next_site_and_unsets_the_last() -> None:
    env = Ising(L=2, order="raster")
    s = torch.tensor([[0, 0, 0, 0], [1, -1, 0, 0], [1, -1, 1, 1]])
    forward = env.forward_mask(s)
    assert forward[0].nonzero().squeeze(1).tolist() == [0, 4]
    assert forward[1].nonzero().squeeze(1).tolist() == [2, 6]
    assert forward[2].nonzero().squeeze(1).tolist() == [8]
    backward = env.backward_mask(s)
    assert backward[0].tolist() == [False] * 8
    assert backward[1].nonzero().squeeze(1).tolist() == [1]  # spin 1 is -1: action 1 set it
    assert backward[2].nonzero().squeeze(1).tolist() == [7]  # spin 3 is +1: action 4 + 3


@pytest.mark.parametrize(
    ("L", "order"), [(2, "any"), (3, "any"), (3, "raster"), (4, "raster"), (5, "any")]
)
def test_check_env_is_clean(L: int, order: str) -> None:
    check_env(Ising(L=L, J=1.0, beta=0.3, order=order), seed=L)


@pytest.mark.parametrize(("L", "order", "n_states"), [(3, "any", 3**9), (4, "raster", 2**17 - 1)])
def test_exact_evaluation_of_the_uniform_policy(L: int, order: str, n_states: int) -> None:
    """Uniform P_F picks each sign with probability 1/2 whatever the order: p(x) = 2^-N."""
    env = Ising(L=L, order=order)
    assert is_enumerable(env) and env.n_states == n_states
    terminals, p = exact_terminal_distribution(
        env, lambda s: uniform_log_probs(env.forward_mask(s))
    )
    assert state_dag(env).n_states == n_states and terminals.shape[0] == 2 ** (L * L)
    torch.testing.assert_close(p, torch.full_like(p, 2.0 ** -(L * L)))


def test_larger_lattices_are_not_enumerated() -> None:
    assert not is_enumerable(Ising(L=4))  # 3^16 states
    assert not is_enumerable(Ising(L=5, order="raster"))  # 2^26 states
    message = (
        "Ising(L=5, J=1.0, beta=0.2, order='any', device='cpu') has 2^25 configurations, more "
        "than Ising.max_terminals = 1048576; exact evaluation is limited to smaller lattices"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Ising(L=5).enumerate_terminals()


def test_sampled_metrics_of_the_ground_state() -> None:
    env = Ising(L=4, J=1.0, beta=0.25)
    samples = torch.ones(10, 16, dtype=torch.long)
    metrics = env.sampled_metrics(samples, lambda x: torch.zeros(len(x)))
    assert metrics["mean_log_reward"] == pytest.approx(2 * 0.25 * 32)
    assert metrics["energy_per_spin"] == pytest.approx(-2 * 32 / 16)
    assert metrics["abs_magnetisation"] == 1.0
    assert metrics["mean_log_reward_gap"] == pytest.approx(env.exact_mean_log_reward() - 16.0)
    assert metrics["exact_log_z"] == env.exact_log_z()
    assert "mean_log_reward_gap" not in Ising(L=11).sampled_metrics(
        torch.ones(2, 121, dtype=torch.long), lambda x: x
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"L": 1}, ValueError, "Invalid env.L: 1; expected an int >= 2"),
        ({"L": 3.0}, ValueError, "Invalid env.L: 3.0; expected an int >= 2"),
        ({"beta": -0.1}, ValueError, "Invalid env.beta: -0.1; expected a float >= 0"),
        ({"J": float("nan")}, ValueError, "Invalid env.J: nan; expected a finite float"),
        ({"order": "random"}, ValueError, "Unknown env.order: 'random'; valid: any, raster"),
    ],
)
def test_bad_arguments_name_the_key_and_the_valid_values(kwargs, error, message) -> None:
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        Ising(**kwargs)
