"""Policies, the vectorized sampler and the one-pass log-probabilities, on small HyperGrids."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor

from envs.hypergrid import HyperGrid
from gfn.policies import GFlowNet, MLPPolicy, masked_log_softmax, uniform_log_probs
from gfn.sampler import (
    Trajectories,
    _draw,
    _unique_states,
    sample_trajectories,
    trajectory_log_probs,
)


def make_gflownet(env: HyperGrid, seed: int = 0, **kwargs) -> GFlowNet:
    torch.manual_seed(seed)
    n_features = env.featurize(env.initial_states(1)).shape[-1]
    return GFlowNet(MLPPolicy(n_features, env.n_actions, hidden=32, **kwargs))


def bias_exit(gflownet: GFlowNet, exit_logit: float) -> None:
    """Make the exit logit dominate (or vanish) everywhere: a policy far from uniform."""
    with torch.no_grad():
        gflownet.policy.heads.bias[gflownet.policy.n_actions - 1] = exit_logit


# --- masked log-softmax -------------------------------------------------------------------


def test_masked_log_softmax_is_normalised_and_never_nan() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, requires_grad=True)
    mask = torch.tensor(
        [
            [True, True, True, True, True],
            [False, True, False, True, False],
            [False, False, False, False, True],  # one legal entry
            [False, False, False, False, False],  # none legal (P_B at s0)
            [True, False, False, False, False],
            [True, True, False, False, True],
        ]
    )
    log_p = masked_log_softmax(logits * 100.0, mask)  # large logits stress the normalisation
    assert not log_p.isnan().any()
    assert (log_p[~mask] == float("-inf")).all()
    assert log_p[mask].isfinite().all()
    some_legal = mask.any(dim=1)
    torch.testing.assert_close(log_p.exp().sum(dim=1)[some_legal], torch.ones(5))
    assert log_p[2, 4] == 0.0 and log_p[4, 0] == 0.0
    log_p[mask].sum().backward()
    assert logits.grad is not None and logits.grad.isfinite().all()
    assert (logits.grad[~mask] == 0).all()


def test_uniform_log_probs() -> None:
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    log_p = uniform_log_probs(mask)
    expected = torch.tensor(
        [[-torch.log(torch.tensor(2.0)), float("-inf"), -torch.log(torch.tensor(2.0))]]
    )
    torch.testing.assert_close(log_p[0:1], expected)
    assert (log_p[1] == float("-inf")).all()
    assert log_p[2, 1] == 0.0


# --- policy and GFlowNet module -----------------------------------------------------------


@pytest.mark.parametrize(("backward", "flow_head"), [("learned", True), ("uniform", False)])
def test_mlp_policy_heads(backward: str, flow_head: bool) -> None:
    policy = MLPPolicy(7, 4, hidden=16, n_layers=3, backward=backward, flow_head=flow_head)
    out = policy(torch.randn(5, 7))
    assert out.pf_logits.shape == (5, 4)
    if backward == "learned":
        assert out.pb_logits is not None and out.pb_logits.shape == (5, 3)
    else:
        assert out.pb_logits is None
    assert (out.log_flow is not None) == flow_head
    if flow_head:
        assert out.log_flow.shape == (5,)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in policy.modules())
    assert n_linear == 4  # three hidden layers and the fused heads


def test_mlp_policy_rejects_bad_enums() -> None:
    with pytest.raises(
        ValueError, match=r"^Unknown model\.backward: 'learnt'; valid: learned, unif"
    ):
        MLPPolicy(3, 2, backward="learnt")
    with pytest.raises(
        ValueError, match=r"^Unknown model\.activation: 'ReLU'; valid: relu, leaky_relu"
    ):
        MLPPolicy(3, 2, activation="ReLU")
    with pytest.raises(ValueError, match=r"^Invalid n_actions: 1; expected an int >= 2$"):
        MLPPolicy(3, 1)
    with pytest.raises(ValueError, match=r"^Invalid model\.n_layers: 0; expected an int >= 1$"):
        MLPPolicy(3, 2, n_layers=0)


def test_parameter_groups_split_log_z() -> None:
    gflownet = GFlowNet(MLPPolicy(3, 2, hidden=8), log_z_init=1.5)
    groups = gflownet.parameter_groups(log_z_lr=0.1)
    assert [g["name"] for g in groups] == ["policy", "log_z"]
    assert groups[1]["params"] == [gflownet.log_z] and groups[1]["lr"] == 0.1
    assert "lr" not in groups[0]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in gflownet.parameters()}
    assert len(in_groups) == sum(len(g["params"]) for g in groups)
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 0.1]
    assert "lr" not in gflownet.parameter_groups()[1]
    assert gflownet.log_z.item() == 1.5


# --- sampler ------------------------------------------------------------------------------


def check_consistent(env: HyperGrid, traj: Trajectories) -> None:
    """Every structural promise of `Trajectories`, checked batch-wide."""
    n_steps, batch = traj.actions.shape
    assert traj.states.shape == (n_steps + 1, batch, *env.state_shape)
    steps = torch.arange(n_steps).unsqueeze(1)  # (T, 1)
    lengths = traj.lengths
    assert (lengths >= 0).all() and (lengths <= env.max_steps).all()
    assert n_steps == int(lengths.max()) + 1
    exit_rows = steps == lengths  # (T, B)
    moves = steps < lengths
    assert (traj.actions[exit_rows] == env.stop_action).all()
    assert (traj.actions[moves] != env.stop_action).all() and (traj.actions[moves] >= 0).all()
    assert (traj.actions[steps > lengths] == -1).all()
    # Every action taken was legal where it was taken.
    for t in range(n_steps):
        acted = steps[t] <= lengths  # (B,)
        legal = env.forward_mask(traj.states[t])  # (B, A)
        taken = traj.actions[t].clamp(min=0)
        assert legal[torch.arange(batch), taken][acted].all()
        moved = steps[t] < lengths
        stepped = env.step(traj.states[t][moved], traj.actions[t][moved])
        assert torch.equal(traj.states[t + 1][moved], stepped)
    # Padding repeats the terminal state, which is s_n.
    batch_index = torch.arange(batch)
    assert torch.equal(traj.terminal_states, traj.states[lengths, batch_index])
    padding = torch.arange(n_steps + 1).unsqueeze(1) > lengths  # (T + 1, B)
    expanded = traj.terminal_states.expand(n_steps + 1, *traj.terminal_states.shape)
    assert torch.equal(traj.states[padding], expanded[padding])
    assert torch.equal(traj.states[0], env.initial_states(batch))
    torch.testing.assert_close(traj.log_rewards, env.log_reward(traj.terminal_states))
    assert torch.equal(traj.state_mask(), steps <= lengths)


@pytest.mark.parametrize(("epsilon", "temperature"), [(0.0, 1.0), (0.3, 2.0), (1.0, 1.0)])
def test_sampler_trajectories_are_consistent(epsilon: float, temperature: float) -> None:
    env = HyperGrid(ndim=3, height=4)
    gflownet = make_gflownet(env)
    traj = sample_trajectories(
        gflownet, env, 64, torch.Generator().manual_seed(1), epsilon, temperature
    )
    assert traj.actions.dtype == torch.long and traj.lengths.dtype == torch.long
    check_consistent(env, traj)
    # Ordinary tensors, not inference-mode ones: a loss may save them for backward.
    assert not any(t.is_inference() for t in vars(traj).values() if t is not None)
    weight = torch.ones((), requires_grad=True)
    (weight * traj.log_rewards).sum().backward()


def test_sampler_forces_exit_at_the_corner() -> None:
    """A policy that never wants to exit walks to the far corner and exits there."""
    env = HyperGrid(ndim=2, height=5)
    gflownet = make_gflownet(env)
    bias_exit(gflownet, -1e4)
    traj = sample_trajectories(gflownet, env, 32, torch.Generator().manual_seed(0))
    check_consistent(env, traj)
    assert (traj.lengths == env.max_steps).all()
    assert (traj.terminal_states == env.height - 1).all()


def test_sampler_reports_an_env_that_never_forces_exit() -> None:
    env = HyperGrid(ndim=2, height=5)
    env.max_steps = 3  # wrong: the grid allows 8 moves before exit is forced
    gflownet = make_gflownet(env)
    bias_exit(gflownet, -1e4)
    message = (
        "32 trajectories had not taken the exit action after env.max_steps=3 steps of "
        "HyperGrid; forward_mask must allow only exit (the last action) once max_steps "
        "actions have been taken"
    )
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        sample_trajectories(gflownet, env, 32, torch.Generator().manual_seed(0))


def test_sampler_is_reproducible_from_its_generator() -> None:
    env = HyperGrid(ndim=3, height=4)
    gflownet = make_gflownet(env)
    a = sample_trajectories(gflownet, env, 16, torch.Generator().manual_seed(3), epsilon=0.2)
    b = sample_trajectories(gflownet, env, 16, torch.Generator().manual_seed(3), epsilon=0.2)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.states, b.states)


def test_sampler_rejects_bad_exploration() -> None:
    env = HyperGrid(ndim=2, height=3)
    gflownet = make_gflownet(env)
    g = torch.Generator()
    with pytest.raises(ValueError, match=r"^Invalid epsilon: 1.5; it must lie in \[0, 1\]$"):
        sample_trajectories(gflownet, env, 4, g, epsilon=1.5)
    with pytest.raises(ValueError, match=r"^Invalid temperature: 0.0;"):
        sample_trajectories(gflownet, env, 4, g, temperature=0.0)
    with pytest.raises(ValueError, match=r"^Invalid number of trajectories: 0;"):
        sample_trajectories(gflownet, env, 0, g)


def test_draw_matches_probabilities_and_never_draws_zero() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3], [0.0, 0.0, 1.0, 0.0]]).repeat(20_000, 1)
    actions = _draw(probs, torch.Generator().manual_seed(0)).view(20_000, 2)
    counts = torch.stack([torch.bincount(actions[:, i], minlength=4) for i in range(2)])
    freq = counts.float() / 20_000
    assert counts[0, 1] == 0 and (actions[:, 1] == 2).all()
    # Standard error <= 0.0036; 5 of them.
    torch.testing.assert_close(freq[0], probs[0], atol=0.018, rtol=0.0)


def test_epsilon_one_is_uniform_over_legal_actions() -> None:
    """With epsilon = 1 the policy (here strongly biased to exit) plays no part."""
    env = HyperGrid(ndim=3, height=4)
    gflownet = make_gflownet(env)
    bias_exit(gflownet, 8.0)
    n = 20_000
    traj = sample_trajectories(gflownet, env, n, torch.Generator().manual_seed(0), epsilon=1.0)
    first = torch.bincount(traj.actions[0], minlength=env.n_actions).float() / n
    # All 4 actions are legal at s0; standard error 0.003, tolerance 5 of them.
    torch.testing.assert_close(first, torch.full((4,), 0.25), atol=0.015, rtol=0.0)
    # Pooled over every decision at a state where all 4 actions are legal, exit has rate 1/4.
    decisions = traj.state_mask()  # (T, B)
    all_legal = env.forward_mask(traj.states[:-1].flatten(0, 1)).all(dim=1).view_as(decisions)
    chosen = traj.actions[decisions & all_legal]
    exit_rate = (chosen == env.stop_action).float().mean()
    assert abs(exit_rate.item() - 0.25) < 0.01
    # Without exploration the same policy exits at once nearly always.
    greedy = sample_trajectories(gflownet, env, 2000, torch.Generator().manual_seed(0))
    assert (greedy.lengths == 0).float().mean() > 0.9


def test_temperature_reshapes_only_the_draw() -> None:
    env = HyperGrid(ndim=3, height=4)
    gflownet = make_gflownet(env)
    logits = gflownet(env.featurize(env.initial_states(1))).pf_logits[0].detach()  # (A,)
    cold = sample_trajectories(
        gflownet, env, 200, torch.Generator().manual_seed(0), temperature=1e-4
    )
    assert (cold.actions[0] == logits.argmax()).all()
    n = 20_000
    hot = sample_trajectories(gflownet, env, n, torch.Generator().manual_seed(0), temperature=2.0)
    first = torch.bincount(hot.actions[0], minlength=env.n_actions).float() / n
    torch.testing.assert_close(first, (logits / 2.0).softmax(0), atol=0.015, rtol=0.0)


# --- log-probabilities from one trunk pass ------------------------------------------------


def reference_log_probs(
    gflownet: GFlowNet, env: HyperGrid, traj: Trajectories
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A per-trajectory, per-step loop: one policy call per state, no batching tricks."""
    n_steps, batch = traj.actions.shape
    log_pf = torch.zeros(n_steps, batch)
    log_pb = torch.zeros(n_steps, batch)
    log_flows = torch.zeros(n_steps, batch)
    with torch.no_grad():
        for b in range(batch):
            n = int(traj.lengths[b])
            for t in range(n + 1):
                state = traj.states[t, b].unsqueeze(0)  # (1, D)
                out = gflownet(env.featurize(state))
                pf = out.pf_logits[0].masked_fill(~env.forward_mask(state)[0], float("-inf"))
                log_pf[t, b] = pf.log_softmax(0)[traj.actions[t, b]]
                if out.log_flow is not None:
                    log_flows[t, b] = out.log_flow[0]
                if t < n:  # P_B at s_{t+1} of the action that led there
                    nxt = traj.states[t + 1, b].unsqueeze(0)
                    legal = env.backward_mask(nxt)[0]
                    out_next = gflownet(env.featurize(nxt))
                    if out_next.pb_logits is None:
                        log_pb[t, b] = -torch.log(legal.sum().float())
                    else:
                        pb = out_next.pb_logits[0].masked_fill(~legal, float("-inf"))
                        log_pb[t, b] = pb.log_softmax(0)[traj.actions[t, b]]
    has_flow = gflownet.policy.flow_head
    return log_pf, log_pb, log_flows if has_flow else None


@pytest.mark.parametrize(
    ("backward", "flow_head", "epsilon", "unique_states"),
    [
        ("learned", True, 0.0, True),
        ("learned", True, 0.0, False),
        ("uniform", False, 0.0, True),
        ("uniform", False, 0.0, False),
        ("learned", True, 1.0, True),
    ],
)
def test_log_probs_match_a_per_trajectory_loop(
    backward: str, flow_head: bool, epsilon: float, unique_states: bool
) -> None:
    """The batched pass equals the loop; with epsilon = 1 it still scores the policy's P_F."""
    env = HyperGrid(ndim=3, height=4)
    gflownet = make_gflownet(env, backward=backward, flow_head=flow_head)
    traj = sample_trajectories(gflownet, env, 12, torch.Generator().manual_seed(2), epsilon)
    scores = trajectory_log_probs(gflownet, env, traj, unique_states=unique_states)
    log_pf, log_pb, log_flows = reference_log_probs(gflownet, env, traj)
    torch.testing.assert_close(scores.log_pf, log_pf)
    torch.testing.assert_close(scores.log_pb, log_pb)
    if flow_head:
        torch.testing.assert_close(scores.log_flows, log_flows)
    else:
        assert scores.log_flows is None
    assert scores.log_pf.requires_grad
    if epsilon == 1.0:  # not the exploration distribution's log-probs
        uniform = uniform_log_probs(env.forward_mask(traj.states[0]))[0, traj.actions[0]]
        assert not torch.allclose(scores.log_pf[0], uniform)


def test_unique_states_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    states = torch.randint(0, 3, (200, 2, 3), generator=g)  # (N, 2, 3), many repeats
    unique, inverse = _unique_states(states)
    assert torch.equal(unique[inverse], states)
    assert len(unique) == len(torch.unique(states.flatten(1), dim=0))
    assert len(_unique_states(states.bool())[0]) <= 64
    floats = states.float()  # floating-point states are not deduplicated
    same, identity = _unique_states(floats)
    assert same is floats and torch.equal(identity, torch.arange(200))


def test_unique_states_gradients_equal_the_plain_pass() -> None:
    env = HyperGrid(ndim=2, height=4)
    gflownet = make_gflownet(env, flow_head=True)
    traj = sample_trajectories(gflownet, env, 64, torch.Generator().manual_seed(0))
    grads = []
    for unique_states in (True, False):
        gflownet.zero_grad()
        scores = trajectory_log_probs(gflownet, env, traj, unique_states=unique_states)
        (scores.log_pf.sum() - 2 * scores.log_pb.sum() + scores.log_flows.pow(2).sum()).backward()
        grads.append([p.grad.clone() for p in gflownet.policy.parameters()])
    for with_unique, plain in zip(*grads, strict=True):
        torch.testing.assert_close(with_unique, plain)


def test_log_probs_gradients_are_finite() -> None:
    env = HyperGrid(ndim=2, height=4)
    gflownet = make_gflownet(env, flow_head=True)
    traj = sample_trajectories(gflownet, env, 32, torch.Generator().manual_seed(0))
    scores = trajectory_log_probs(gflownet, env, traj)
    (scores.log_pf.sum() - scores.log_pb.sum() + scores.log_flows.sum()).backward()
    for p in gflownet.parameters():
        assert p.grad is None or p.grad.isfinite().all()


def test_concatenate_pads_to_the_longest() -> None:
    env = HyperGrid(ndim=2, height=5)
    gflownet = make_gflownet(env)
    g = torch.Generator().manual_seed(0)
    bias_exit(gflownet, 8.0)
    short = sample_trajectories(gflownet, env, 3, g)
    bias_exit(gflownet, -1e4)
    long = sample_trajectories(gflownet, env, 5, g)
    both = Trajectories.concatenate([short, long])
    assert both.batch_size == 8 and both.max_length == long.max_length
    check_consistent(env, both)
    torch.testing.assert_close(both.log_rewards[:3], short.log_rewards)
