"""HyperGrid: hand-checked rewards and log Z*, masks, transitions, features, modes."""

import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from envs import Env, HyperGrid


def test_rewards_at_hand_checked_cells() -> None:
    # H = 8: |x/7 − 0.5| is 0.5, 5/14 ≈ 0.357, 3/14 ≈ 0.214, 1/14 for x = 0, 1, 2, 3 (and
    # mirrored), so the plateau (> 0.25) is x ∈ {0, 1, 6, 7} and the band (0.3, 0.4) x ∈ {1, 6}.
    env = HyperGrid(ndim=2, height=8)
    cells = torch.tensor([[0, 0], [7, 7], [1, 0], [0, 7], [1, 1], [1, 6], [6, 6], [3, 4], [1, 3]])
    expected = torch.tensor([0.6, 0.6, 0.6, 0.6, 2.6, 2.6, 2.6, 0.1, 0.1])
    torch.testing.assert_close(env.reward(cells), expected)
    torch.testing.assert_close(env.log_reward(cells), expected.log())
    assert env.log_reward(cells).dtype == torch.float32


def test_log_z_by_hand() -> None:
    # 64 cells × 0.1 + 4² plateau cells × 0.5 + 2² band cells × 2.0 = 22.4.
    env = HyperGrid(ndim=2, height=8)
    assert env.true_log_z == pytest.approx(math.log(22.4), rel=1e-12)
    # 3-D, H = 4: plateau {0, 3} (|x/3 − 0.5| = 0.5), no band: 64·0.1 + 8·0.5.
    assert HyperGrid(ndim=3, height=4).true_log_z == pytest.approx(math.log(10.4), rel=1e-12)


@pytest.mark.parametrize(("ndim", "height"), [(1, 2), (2, 8), (3, 5), (2, 11), (2, 21), (4, 6)])
def test_true_distribution_matches_enumeration(ndim: int, height: int) -> None:
    env = HyperGrid(ndim=ndim, height=height, R0=0.01, R1=1.5, R2=3.0)
    rewards = env.reward(env.enumerate_terminals(), dtype=torch.float64)
    assert env.true_log_z == pytest.approx(math.log(rewards.sum().item()), rel=1e-12)
    p_star = env.true_distribution()
    assert p_star.dtype == torch.float64
    torch.testing.assert_close(p_star, rewards / rewards.sum())
    torch.testing.assert_close(p_star.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_reward_is_exact_and_symmetric_at_height_21() -> None:
    # |x/20 − 0.5| = 0.4 exactly at x ∈ {2, 18}: outside the open band. Float32 puts x = 18
    # (0.39999998) inside, which is the asymmetry the integer test avoids.
    env = HyperGrid(ndim=1, height=21)
    modes = env.is_mode(env.enumerate_terminals()).nonzero().squeeze(1)
    assert modes.tolist() == [3, 17]
    x = env.enumerate_terminals()
    torch.testing.assert_close(env.reward(x), env.reward(20 - x))


def test_enumerate_terminals_order_and_index() -> None:
    env = HyperGrid(ndim=3, height=4)
    terminals = env.enumerate_terminals()
    assert terminals.shape == (64, 3) and terminals.dtype == torch.long
    assert terminals[:5].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 1, 0]]
    assert terminals[-1].tolist() == [3, 3, 3]
    assert torch.equal(env.state_index(terminals), torch.arange(64))
    assert torch.unique(terminals, dim=0).shape[0] == 64


def test_masks_at_corners() -> None:
    env = HyperGrid(ndim=2, height=3)
    states = torch.tensor([[0, 0], [2, 0], [1, 2], [2, 2]])
    forward = [[True, True, True], [False, True, True], [True, False, True], [False, False, True]]
    backward = [[False, False], [True, False], [True, True], [True, True]]
    assert env.forward_mask(states).tolist() == forward
    assert env.backward_mask(states).tolist() == backward
    assert env.is_initial(states).tolist() == [True, False, False, False]


def test_backward_step_inverts_step_on_random_trajectories() -> None:
    env = HyperGrid(ndim=3, height=5)
    generator = torch.Generator().manual_seed(0)
    states = env.initial_states(64)  # (B, D)
    for _ in range(env.max_steps):
        mask = env.forward_mask(states)[:, :-1]  # (B, D)
        if not mask.any():
            break
        scores = torch.rand(mask.shape, generator=generator).masked_fill(~mask, -1.0)
        actions = scores.argmax(dim=1)  # (B,), legal wherever any action is
        movable = mask.any(dim=1)
        nxt = torch.where(movable.unsqueeze(1), env.step(states, actions), states)
        assert ((nxt >= 0) & (nxt < env.height)).all()
        assert env.backward_mask(nxt)[movable, actions[movable]].all()
        assert torch.equal(env.backward_step(nxt, actions)[movable], states[movable])
        states = nxt
    assert (states == env.height - 1).all()  # max_steps increments reach the far corner


def test_stop_action_is_a_no_op_in_step() -> None:
    env = HyperGrid(ndim=2, height=4)
    states = torch.tensor([[1, 2]])
    assert torch.equal(env.step(states, torch.tensor([env.stop_action])), states)


def test_featurize_is_concatenated_one_hot() -> None:
    env = HyperGrid(ndim=3, height=4)
    features = env.featurize(torch.tensor([[0, 3, 1], [2, 2, 2]]))
    assert features.shape == (2, 12) and features.dtype == torch.float32
    assert features[0].nonzero().squeeze(1).tolist() == [0, 7, 9]
    assert features[1].nonzero().squeeze(1).tolist() == [2, 6, 10]
    assert env.featurize(env.initial_states(1)).shape[-1] == env.ndim * env.height


def test_contract_attributes() -> None:
    env = HyperGrid(ndim=4, height=20)
    assert isinstance(env, Env)
    assert env.n_actions == 5 and env.stop_action == 4 and env.n_backward_actions == 4
    assert env.state_shape == (4,) and env.state_dtype == torch.long
    assert env.max_steps == 4 * 19
    assert torch.equal(env.initial_states(3), torch.zeros(3, 4, dtype=torch.long))


def test_modes_and_regions() -> None:
    env = HyperGrid(ndim=2, height=8)
    terminals = env.enumerate_terminals()
    modes = terminals[env.is_mode(terminals)]
    assert modes.tolist() == [[1, 1], [1, 6], [6, 1], [6, 6]]
    assert (env.reward(modes) >= env.R0 + env.R1 + env.R2 - 1e-6).all()
    # Bit d of the region is set when x_d is in the upper half.
    assert env.mode_region(modes).tolist() == [0, 2, 1, 3]
    big = HyperGrid(ndim=4, height=20)  # band {3, 4, 15, 16} per axis: 4^4 modes, 2^4 corners
    big_modes = big.enumerate_terminals()[big.is_mode(big.enumerate_terminals())]
    assert big_modes.shape[0] == 256
    assert torch.unique(big.mode_region(big_modes)).tolist() == list(range(16))


def _msg(text: str) -> str:
    return f"^{re.escape(text)}$"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ndim": 0}, ValueError, "Invalid env.ndim: 0; expected an int >= 1"),
        ({"height": 1}, ValueError, "Invalid env.height: 1; expected an int >= 2"),
        ({"ndim": 2.0}, ValueError, "Invalid env.ndim: 2.0; expected an int >= 1"),
        ({"height": True}, ValueError, "Invalid env.height: True; expected an int >= 2"),
        ({"R0": 0.0}, ValueError, "Invalid env.R0: 0; expected a float > 0"),
        ({"R0": float("nan")}, ValueError, "Invalid env.R0: nan; expected a float > 0"),
        ({"R1": -0.5}, ValueError, "Invalid env.R1: -0.5; expected a float >= 0"),
        ({"R2": float("inf")}, ValueError, "Invalid env.R2: inf; expected a float >= 0"),
        ({"R2": "2"}, ValueError, "Invalid env.R2: '2'; expected a float >= 0"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=_msg(message)):
        HyperGrid(**kwargs)


def test_enumeration_refuses_huge_grids() -> None:
    env = HyperGrid(ndim=8, height=20)
    with pytest.raises(ValueError, match=re.escape("more than HyperGrid.max_enumerable")):
        env.enumerate_terminals()


# Every HyperGrid preset in configs/env: states, modes, the share of R/Z the modes hold and the
# share the corner plateaus (R >= R0 + R1) hold, as its YAML comment states them; the test
# recomputes them by enumerating the grid.
PRESETS = {
    "hypergrid": (64, 4, 0.464286, 0.785714),
    "hypergrid_hard": (4096, 16, 0.243857, 0.976599),
    "hypergrid_hard_32x32": (1024, 36, 0.447887, 0.996180),
    "hypergrid_hard_16x16x16x16": (65536, 16, 0.018651, 0.971364),
}
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "env"


def test_every_hypergrid_preset_is_listed() -> None:
    assert sorted(p.stem for p in CONFIGS.glob("hypergrid*.yaml")) == sorted(PRESETS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_modes_and_their_mass_by_enumeration(preset: str) -> None:
    path = CONFIGS / f"{preset}.yaml"
    cfg = OmegaConf.load(path)
    env = instantiate(cfg)
    assert isinstance(env, HyperGrid)
    n_states, n_modes, mass, plateau_mass = PRESETS[preset]
    terminals = env.enumerate_terminals()
    rewards = env.reward(terminals, dtype=torch.float64)  # (N,)
    modes = env.is_mode(terminals)
    assert terminals.shape[0] == n_states
    assert int(modes.sum()) == n_modes
    assert float(rewards[modes].sum() / rewards.sum()) == pytest.approx(mass, abs=1e-6)
    plateaus = rewards >= env.R0 + env.R1
    assert float(rewards[plateaus].sum() / rewards.sum()) == pytest.approx(plateau_mass, abs=1e-6)
    # The comment at the top of the YAML states the same numbers.
    text = " ".join(line.lstrip("# ") for line in path.read_text().splitlines())
    assert f"{n_modes} modes" in text and f"{100 * mass:.1f}% of the mass" in text
    assert f"plateaus hold {100 * plateau_mass:.1f}%" in text
