"""Losses: zero at an exact optimum, non-negative, and equal to hand-written reference loops."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor, nn

from envs.bitseq import BitSequence
from envs.hypergrid import HyperGrid
from gfn.losses import (
    LOSSES,
    GFlowNetLoss,
    detailed_balance,
    detailed_balance_residuals,
    flow_matching,
    flow_matching_residuals,
    get_loss,
    log_partition_variance,
    subtrajectory_balance,
    trajectory_balance,
    trajectory_balance_residuals,
)
from gfn.policies import GFlowNet, MLPPolicy, PolicyOutput
from gfn.sampler import (
    Trajectories,
    TrajectoryLogProbs,
    sample_trajectories,
    trajectory_log_probs,
)
from gfn.scores import edge_flow_scores, exit_scores

# --- an exact optimum on a tiny grid --------------------------------------------------------


class TablePolicy(nn.Module):
    """A lookup table over HyperGrid states: forward logits and log F given per state, uniform
    P_B."""

    def __init__(self, env: HyperGrid, logits: Tensor, log_flows: Tensor) -> None:
        super().__init__()
        self.env = env
        self.logits = logits  # (N, A)
        self.log_flows = log_flows  # (N,)
        self.flow_head = True

    def forward(self, features: Tensor) -> PolicyOutput:
        states = features.view(len(features), self.env.ndim, self.env.height).argmax(dim=-1)
        index = self.env.state_index(states)  # (B,)
        return PolicyOutput(self.logits[index], None, self.log_flows[index])


def score(name: str, gflownet: GFlowNet, env: HyperGrid, traj: Trajectories) -> object:
    """What loss `name` scores, as the task computes it (`GFlowNetLoss.score`)."""
    return get_loss(name).score(gflownet, env, traj)


def optimal_gflownet(env: HyperGrid) -> tuple[GFlowNet, float]:
    """The exact optimum for uniform P_B, by brute force over all states (every one terminal).

    F(s) = R(s) + sum over children s' of F(s') P_B(s | s'); P_F(a | s) = F(s') P_B(s | s') / F(s)
    and P_F(exit | s) = R(s) / F(s). The forward logits are the log edge flows
    log F(s) + log P_F(a | s) (log-softmax gives P_F back; flow matching reads them as flows).
    Returns the GFlowNet with log Z = log F(s0), and log F(s0).
    """
    states = env.enumerate_terminals()  # (N, D)
    rewards = env.reward(states, dtype=torch.float64)  # (N,)
    flows = torch.zeros(len(states), dtype=torch.float64)
    log_pf = torch.zeros(len(states), env.n_actions, dtype=torch.float64)
    order = states.sum(dim=1).argsort(descending=True)  # children before parents
    for i in order.tolist():
        s = states[i : i + 1]
        legal = env.forward_mask(s)[0]
        inflow = {}
        for a in range(env.ndim):
            if legal[a]:
                child = env.step(s, torch.tensor([a]))
                j = int(env.state_index(child))
                n_parents = int(env.backward_mask(child).sum())
                inflow[a] = flows[j] / n_parents
        flows[i] = rewards[i] + sum(inflow.values())
        for a, f in inflow.items():
            log_pf[i, a] = math.log(f / flows[i])
        log_pf[i, env.stop_action] = math.log(rewards[i] / flows[i])
    log_z = float(flows[0].log())
    logits = log_pf + flows.log().unsqueeze(1)  # (N, A), log edge flows
    policy = TablePolicy(env, logits.float(), flows.log().float())
    return GFlowNet(policy, log_z_init=log_z), log_z


def test_losses_vanish_at_the_exact_optimum() -> None:
    env = HyperGrid(ndim=2, height=4)
    gflownet, log_z = optimal_gflownet(env)
    assert log_z == pytest.approx(env.true_log_z, abs=1e-9)
    traj = sample_trajectories(gflownet, env, 64, torch.Generator().manual_seed(0), epsilon=0.5)
    for name in LOSSES:
        loss = get_loss(name)(score(name, gflownet, env, traj), traj, gflownet.log_z)
        assert loss.item() == pytest.approx(0.0, abs=1e-9), name
    for name in LOSSES:  # the log Z each loss reports (learned, log F(s0), implied): the true one
        estimate = get_loss(name).estimate_log_z(gflownet, env)
        if name == "zvar":  # learns and implies none
            assert estimate is None
        else:
            assert float(estimate) == pytest.approx(log_z, abs=1e-5), name
    # Off by delta in log Z, trajectory balance is exactly delta^2.
    delta = 0.3
    scores = trajectory_log_probs(gflownet, env, traj)
    loss = get_loss("tb")(scores, traj, gflownet.log_z + delta)
    assert loss.item() == pytest.approx(delta**2, rel=1e-4)


def test_flow_matching_is_positive_off_the_optimum_by_a_closed_form() -> None:
    """Adding delta to the one edge flow s0 -> (1, 0): (1, 0) has s0 as its only parent, so its
    flow-matching residual is exactly delta and every other node still matches; a trajectory
    through (1, 0) scores delta^2 / (n + 1), any other 0."""
    env = HyperGrid(ndim=2, height=4)
    gflownet, _ = optimal_gflownet(env)
    traj = sample_trajectories(gflownet, env, 64, torch.Generator().manual_seed(1), epsilon=0.5)
    delta = 0.25
    gflownet.policy.logits[0, 0] += delta  # s0 = row 0, action 0: x_0 += 1
    through = (traj.states[1] == torch.tensor([1, 0])).all(dim=1) & (traj.lengths >= 1)  # (B,)
    assert 0 < int(through.sum()) < 64
    expected = (through.double() * delta**2 / (traj.lengths + 1).double()).mean()
    loss = get_loss("fm")(score("fm", gflownet, env, traj), traj, gflownet.log_z)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


# --- fm and mdb against hand-written loops on real trajectories -------------------------------


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _cell(env: HyperGrid, state: tuple[int, ...]) -> int:
    return int(env.state_index(torch.tensor([state])))


def _log_r(env: HyperGrid, state: tuple[int, ...]) -> float:
    return float(env.log_reward(torch.tensor([state])))


def reference_fm(env: HyperGrid, logits: Tensor, traj: Trajectories) -> float:
    """Flow matching by hand: parents are x - e_d for x_d > 0, children x + e_d for
    x_d < H - 1, and the forward logits are log edge flows (the last one into sf)."""
    total = 0.0
    for b in range(traj.batch_size):
        n = int(traj.lengths[b])
        path = [tuple(traj.states[t, b].tolist()) for t in range(n + 1)]
        squares = []
        for s in path[1:]:
            inflow = [
                float(logits[_cell(env, (*s[:d], s[d] - 1, *s[d + 1 :])), d])
                for d in range(env.ndim)
                if s[d] > 0
            ]
            outflow = [float(logits[_cell(env, s), d]) for d in range(env.ndim) if s[d] < 3]
            outflow.append(float(logits[_cell(env, s), env.ndim]))
            squares.append((_logsumexp(inflow) - _logsumexp(outflow)) ** 2)
        exit_flow = float(logits[_cell(env, path[-1]), env.ndim])
        squares.append((exit_flow - _log_r(env, path[-1])) ** 2)
        total += sum(squares) / len(squares)
    return total / traj.batch_size


def reference_mdb(env: HyperGrid, logits: Tensor, traj: Trajectories) -> float:
    """Modified detailed balance by hand, P_F the softmax over legal actions, P_B uniform over
    the x_d > 0 coordinates."""

    def log_pf(s: tuple[int, ...], a: int) -> float:
        legal = [d for d in range(env.ndim) if s[d] < 3] + [env.ndim]
        row = logits[_cell(env, s)]
        return float(row[a]) - _logsumexp([float(row[d]) for d in legal])

    total = 0.0
    for b in range(traj.batch_size):
        n = int(traj.lengths[b])
        path = [tuple(traj.states[t, b].tolist()) for t in range(n + 1)]
        squares = []
        for t in range(n):
            s, child, a = path[t], path[t + 1], int(traj.actions[t, b])
            log_pb = -math.log(sum(1 for d in range(env.ndim) if child[d] > 0))
            residual = (
                _log_r(env, s) + log_pf(s, a) + log_pf(child, env.ndim)
                - _log_r(env, child) - log_pb - log_pf(s, env.ndim)
            )  # fmt: skip
            squares.append(residual**2)
        total += sum(squares) / max(n, 1)
    return total / traj.batch_size


@pytest.mark.parametrize("seed", [0, 1])
def test_fm_and_mdb_match_reference_loops_on_a_random_table(seed: int) -> None:
    env = HyperGrid(ndim=2, height=4)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(env.n_terminals, env.n_actions, generator=g, dtype=torch.float64)
    gflownet = GFlowNet(TablePolicy(env, logits, torch.zeros(env.n_terminals)))
    traj = sample_trajectories(gflownet, env, 24, g)
    assert int(traj.lengths.min()) == 0 or int(traj.lengths.max()) > 2  # varied lengths
    fm = get_loss("fm")(edge_flow_scores(gflownet, env, traj), traj, gflownet.log_z)
    mdb = get_loss("mdb")(exit_scores(gflownet, env, traj), traj, gflownet.log_z)
    assert fm.item() == pytest.approx(reference_fm(env, logits, traj), rel=1e-9)
    assert mdb.item() == pytest.approx(reference_mdb(env, logits, traj), rel=1e-9)
    assert fm.item() > 0.0 and mdb.item() > 0.0
    # The deduplicated trunk pass and the one-row-per-state pass give the same scores.
    for scorer, loss in ((edge_flow_scores, fm), (exit_scores, mdb)):
        name = "fm" if scorer is edge_flow_scores else "mdb"
        plain = get_loss(name)(scorer(gflownet, env, traj, unique_states=False), traj, None)
        torch.testing.assert_close(plain, loss)


def test_flow_matching_residuals_on_padding_and_at_the_sink() -> None:
    x = random_inputs(7)
    residuals = flow_matching_residuals(
        x["log_flows"], x["log_pf"], x["log_pb"][0], x["log_rewards"], x["lengths"]
    )  # (T + 1, B)
    rows = torch.arange(7).unsqueeze(1)
    assert residuals.shape == (7, 9)
    assert (residuals[(rows == 0) | (rows > x["lengths"] + 1)] == 0).all()
    b = 0  # n = 5: the sink is row 6
    assert float(residuals[6, b]) == float(x["log_pb"][0, b] - x["log_rewards"][b])
    assert float(residuals[3, b]) == float(x["log_flows"][3, b] - x["log_pf"][3, b])
    padded = torch.cat([x["log_flows"], torch.zeros(3, 9, dtype=torch.float64)])
    torch.testing.assert_close(
        flow_matching(padded, padded, x["log_pb"][0], x["log_rewards"], x["lengths"]),
        flow_matching(
            x["log_flows"], x["log_flows"], x["log_pb"][0], x["log_rewards"], x["lengths"]
        ),
    )


def test_mdb_refuses_an_environment_where_some_state_cannot_exit() -> None:
    env = BitSequence(n=8, k=4, n_targets=2)
    torch.manual_seed(0)
    gflownet = GFlowNet(MLPPolicy(env.featurize(env.s0[None]).shape[1], env.n_actions, hidden=8))
    traj = sample_trajectories(gflownet, env, 4, torch.Generator().manual_seed(0))
    message = (
        "The 'mdb' loss needs every state to be terminal, but BitSequence forbids the exit "
        "action at 5 distinct visited state(s), e.g. [5, -1]; use 'tb', 'db', 'subtb', 'zvar' or "
        "'fm' with this environment"
    )  # s0 and the 4 distinct first words drawn; stop is legal only at full length
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        exit_scores(gflownet, env, traj)


# --- reference loops on random inputs -------------------------------------------------------


def random_inputs(seed: int, n_steps: int = 6, batch: int = 9) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, n_steps, (batch,), generator=g)
    lengths[0] = n_steps - 1  # T = max length + 1
    lengths[1] = 0
    valid = torch.arange(n_steps).unsqueeze(1) <= lengths  # (T, B)
    moves = torch.arange(n_steps).unsqueeze(1) < lengths
    log_pf = -torch.rand(n_steps, batch, generator=g, dtype=torch.float64) * 3 * valid
    log_pb = -torch.rand(n_steps, batch, generator=g, dtype=torch.float64) * 2 * moves
    log_flows = torch.randn(n_steps, batch, generator=g, dtype=torch.float64) * valid
    log_rewards = torch.randn(batch, generator=g, dtype=torch.float64)
    return {
        "log_pf": log_pf,
        "log_pb": log_pb,
        "log_flows": log_flows,
        "log_rewards": log_rewards,
        "lengths": lengths,
    }


def chain(x: dict[str, Tensor], b: int) -> tuple[list[float], list[float], list[float]]:
    """Flows of u_0..u_{n+1} (the last is log R) and the per-transition log P_F, log P_B."""
    n = int(x["lengths"][b])
    flows = [float(x["log_flows"][t, b]) for t in range(n + 1)] + [float(x["log_rewards"][b])]
    pf = [float(x["log_pf"][t, b]) for t in range(n + 1)]
    pb = [float(x["log_pb"][t, b]) for t in range(n + 1)]
    return flows, pf, pb


def reference_tb(x: dict[str, Tensor], log_z: float) -> float:
    total = 0.0
    for b in range(len(x["lengths"])):
        _, pf, pb = chain(x, b)
        total += (log_z + sum(pf) - sum(pb) - float(x["log_rewards"][b])) ** 2
    return total / len(x["lengths"])


def reference_subtb(x: dict[str, Tensor], lamda: float) -> float:
    total = 0.0
    for b in range(len(x["lengths"])):
        flows, pf, pb = chain(x, b)
        num = den = 0.0
        for i in range(len(flows)):
            for j in range(i + 1, len(flows)):
                residual = flows[i] + sum(pf[i:j]) - flows[j] - sum(pb[i:j])
                num += lamda ** (j - i) * residual**2
                den += lamda ** (j - i)
        total += num / den
    return total / len(x["lengths"])


def reference_db(x: dict[str, Tensor]) -> float:
    total = 0.0
    for b in range(len(x["lengths"])):
        flows, pf, pb = chain(x, b)
        squares = [(flows[t] + pf[t] - flows[t + 1] - pb[t]) ** 2 for t in range(len(pf))]
        total += sum(squares) / len(squares)
    return total / len(x["lengths"])


def reference_zvar(x: dict[str, Tensor]) -> float:
    estimates = []
    for b in range(len(x["lengths"])):
        _, pf, pb = chain(x, b)
        estimates.append(float(x["log_rewards"][b]) + sum(pb) - sum(pf))
    mean = sum(estimates) / len(estimates)
    return sum((e - mean) ** 2 for e in estimates) / len(estimates)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_reference_loops(seed: int) -> None:
    x = random_inputs(seed)
    log_z = torch.tensor(0.7, dtype=torch.float64)
    tb = trajectory_balance(x["log_pf"], x["log_pb"], x["log_rewards"], log_z)
    db = detailed_balance(**x)
    zvar = log_partition_variance(x["log_pf"], x["log_pb"], x["log_rewards"])
    assert tb.item() == pytest.approx(reference_tb(x, 0.7), rel=1e-12)
    assert db.item() == pytest.approx(reference_db(x), rel=1e-12)
    assert zvar.item() == pytest.approx(reference_zvar(x), rel=1e-12)
    for lamda in (0.5, 0.9, 1.0, 3.0):
        subtb = subtrajectory_balance(**x, lamda=lamda)
        assert subtb.item() == pytest.approx(reference_subtb(x, lamda), rel=1e-10), lamda
    for loss in (tb, db, zvar, subtrajectory_balance(**x)):
        assert loss.item() >= 0.0


def test_residuals_are_zero_on_padding_and_shaped() -> None:
    x = random_inputs(3)
    log_z = torch.tensor(0.0, dtype=torch.float64)
    assert trajectory_balance_residuals(
        x["log_pf"], x["log_pb"], x["log_rewards"], log_z
    ).shape == (9,)
    residuals = detailed_balance_residuals(**x)  # (T, B)
    padding = torch.arange(6).unsqueeze(1) > x["lengths"]
    assert residuals.shape == (6, 9) and (residuals[padding] == 0).all()


def test_subtb_limits() -> None:
    """lamda = 0 keeps single transitions (DB); lamda -> inf keeps the whole trajectory (TB
    with log Z = log F(s0)); the result is invariant to padding extra rows."""
    x = random_inputs(4)
    torch.testing.assert_close(subtrajectory_balance(**x, lamda=0.0), detailed_balance(**x))
    whole = trajectory_balance_residuals(x["log_pf"], x["log_pb"], x["log_rewards"], 0.0)
    tb_from_flow = (whole + x["log_flows"][0]).pow(2).mean()
    torch.testing.assert_close(
        subtrajectory_balance(**x, lamda=1e8), tb_from_flow, rtol=1e-6, atol=0.0
    )
    padded = {
        k: torch.cat([v, torch.zeros(3, 9, dtype=v.dtype)]) if v.dim() == 2 else v
        for k, v in x.items()
    }
    torch.testing.assert_close(subtrajectory_balance(**padded), subtrajectory_balance(**x))
    torch.testing.assert_close(detailed_balance(**padded), detailed_balance(**x))


def test_zvar_ignores_a_shift_of_all_log_rewards() -> None:
    x = random_inputs(5)
    base = log_partition_variance(x["log_pf"], x["log_pb"], x["log_rewards"])
    shifted = log_partition_variance(x["log_pf"], x["log_pb"], x["log_rewards"] + 4.0)
    torch.testing.assert_close(base, shifted)


def test_losses_backpropagate_through_one_trunk_pass() -> None:
    env = HyperGrid(ndim=2, height=4)
    torch.manual_seed(0)
    policy = MLPPolicy(8, env.n_actions, hidden=16, flow_head=True)
    gflownet = GFlowNet(policy)
    traj = sample_trajectories(gflownet, env, 16, torch.Generator().manual_seed(0))
    for name in LOSSES:
        gflownet.zero_grad()
        loss = get_loss(name)(score(name, gflownet, env, traj), traj, gflownet.log_z)
        loss.backward()
        grads = [p.grad for p in policy.parameters()]
        assert all(g is not None and g.isfinite().all() for g in grads), name
        assert (gflownet.log_z.grad is not None) == (name == "tb"), name


# --- losses as objects --------------------------------------------------------------------------


def test_each_loss_scores_what_it_declares_it_needs() -> None:
    """`needs` decides the scores, the flow head and the logged log Z: the log-prob losses
    score `trajectory_log_probs`, fm the edge flows, mdb the exit scores, each from the same
    trunk pass the named scorer makes."""
    env = HyperGrid(ndim=2, height=4)
    gflownet, _ = optimal_gflownet(env)
    traj = sample_trajectories(gflownet, env, 16, torch.Generator().manual_seed(3), epsilon=0.5)
    expected = {"edge_flows": edge_flow_scores, "exit_scores": exit_scores}
    for name, cls in LOSSES.items():
        loss = get_loss(name)
        scorer = next((f for need, f in expected.items() if need in cls.needs), None)
        got, want = (
            loss.score(gflownet, env, traj),
            (scorer or trajectory_log_probs)(gflownet, env, traj),
        )
        assert type(got) is type(want), name
        for field in vars(want):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None and b is None) or torch.equal(a, b), (name, field)
        assert loss.flow_head == (name in ("db", "subtb")), name
        assert ("train/log_z" in loss.scalars(gflownet)) == (name == "tb"), name


def test_a_loss_of_ones_own_is_one_class() -> None:
    """A subclass with a name registers itself; `get_loss` builds it with its keyword
    hyperparameters; an unknown need is refused when the class is defined."""

    class HalfTB(GFlowNetLoss):
        name = "half_tb_test"
        needs = frozenset({"log_probs", "log_z"})

        def __init__(self, *, weight: float = 0.5) -> None:
            self.weight = weight

        def __call__(self, scores, trajectories, log_z):
            return self.weight * trajectory_balance(
                scores.log_pf, scores.log_pb, trajectories.log_rewards, log_z
            )

    try:
        env = HyperGrid(ndim=2, height=4)
        gflownet, _ = optimal_gflownet(env)
        traj = sample_trajectories(gflownet, env, 8, torch.Generator().manual_seed(0))
        loss = get_loss("half_tb_test", weight=2.0)
        scores = loss.score(gflownet, env, traj)
        tb = get_loss("tb")(scores, traj, gflownet.log_z + 0.3)
        torch.testing.assert_close(loss(scores, traj, gflownet.log_z + 0.3), 2.0 * tb)
        with pytest.raises(TypeError, match=r"unknown \['gradients'\]; valid: log_probs"):

            class Bad(GFlowNetLoss):
                needs = frozenset({"gradients"})
    finally:
        LOSSES.pop("half_tb_test", None)


# --- registry ---------------------------------------------------------------------------------


def test_registry_errors_name_the_valid_choices() -> None:
    with pytest.raises(
        ValueError, match=r"^Unknown loss: 'TB'; valid: tb, db, subtb, zvar, fm, mdb$"
    ):
        get_loss("TB")
    message = "Unknown hyperparameter(s) lambda for loss 'subtb'; valid: lamda"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        get_loss("subtb", **{"lambda": 0.9})
    with pytest.raises(ValueError, match=r"^Unknown hyperparameter\(s\) lamda for loss 'tb'; "):
        get_loss("tb", lamda=0.9)
    with pytest.raises(ValueError, match=r"^Invalid loss\.lamda: -1; expected a float >= 0$"):
        get_loss("subtb", lamda=-1.0)
    scores = TrajectoryLogProbs(torch.zeros(2, 3), torch.zeros(2, 3), None)
    with pytest.raises(ValueError, match=r"^The 'db' loss needs log F\(s\) but the policy"):
        get_loss("db")(scores, None, torch.tensor(0.0))


def test_get_loss_passes_lamda() -> None:
    x = random_inputs(6)
    scores = TrajectoryLogProbs(x["log_pf"], x["log_pb"], x["log_flows"])

    class Batch:
        log_rewards = x["log_rewards"]
        lengths = x["lengths"]

    loss = get_loss("subtb", lamda=0.5)(scores, Batch(), torch.tensor(0.0))
    torch.testing.assert_close(loss, subtrajectory_balance(**x, lamda=0.5))
