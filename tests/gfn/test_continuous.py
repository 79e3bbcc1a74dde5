"""Continuous GFlowNets (Box, Line): seeded Beta draws against their moments, densities that
integrate to one, forward and backward densities on one measure (the importance-sampling
identity recovers the closed-form Z), exact target cell masses, the histogram evaluation
against its floor, and the refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from envs.checker import check_env
from envs.continuous import BetaMixture, Box, Line, sample_beta
from gfn.continuous import continuous_log_probs, histogram_metrics, sample_continuous
from gfn.losses import get_loss
from gfn.policies import GFlowNet, MLPPolicy, PolicyOutput
from gfn.sampler import Trajectories
from gfn.task import ContinuousGFlowNetTask
from kinetic.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


class ConstantPolicy(torch.nn.Module):
    """Raw parameters independent of the state: every Beta mixture uniform (a = b = 1) and,
    for Box, exit with probability sigmoid(-1); for Line, moves N(0, 1)."""

    def __init__(self, env) -> None:
        super().__init__()
        self.params = torch.zeros(env.n_forward_params)
        if isinstance(env, Box):
            self.params.fill_(math.log(0.9 / 9.1))  # sigmoid -> 0.09: a = b = 0.1 + 0.9 = 1
            k = env.n_components
            for start in range(1, env.n_forward_params, 3 * k):
                self.params[start : start + k] = 0.0  # equal mixture weights
            self.params[0] = -1.0

    def forward(self, features):
        return PolicyOutput(self.params.expand(features.shape[0], -1), None, None)


@pytest.mark.parametrize("a, b", [(0.3, 0.7), (2.0, 5.0), (0.5, 0.5), (8.0, 1.5)])
def test_seeded_beta_draws_match_the_beta_distribution(a, b):
    n = 40_000
    x = sample_beta(torch.full((n,), a), torch.full((n,), b), torch.Generator().manual_seed(0))
    assert stats.kstest(x.numpy(), stats.beta(a, b).cdf).pvalue > 1e-3
    again = sample_beta(torch.full((n,), a), torch.full((n,), b), torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_a_beta_mixture_density_is_scipys_and_integrates_to_one():
    torch.manual_seed(0)
    u = torch.linspace(1e-4, 1 - 1e-4, 20_001)
    mixture_params = torch.randn(1, 9).expand(u.numel(), 9)
    log_p = BetaMixture(mixture_params).log_prob(u)
    weights = mixture_params[0, :3].softmax(dim=0).numpy()
    a = (0.1 + 10 * torch.sigmoid(mixture_params[0, 3:6])).numpy()
    b = (0.1 + 10 * torch.sigmoid(mixture_params[0, 6:])).numpy()
    by_scipy = sum(
        w * stats.beta(ai, bi).pdf(u.numpy()) for w, ai, bi in zip(weights, a, b, strict=True)
    )
    assert np.allclose(log_p.exp().numpy(), by_scipy, rtol=1e-4)
    assert float(torch.trapezoid(log_p.exp().double(), u.double())) == pytest.approx(1.0, abs=2e-3)


def test_box_forward_densities_integrate_to_one():
    """The first move (a density on the quarter disk) and a later move (exit + angles)."""
    env = Box(delta=0.25)
    torch.manual_seed(1)
    params = torch.randn(1, env.n_forward_params)
    # First move: integrate over the plane on a fine grid of the quarter disk's square.
    side = torch.linspace(0, 0.25, 801)[1:] - 0.25 / 1600  # cell midpoints
    x, y = torch.meshgrid(side, side, indexing="ij")
    moves = torch.stack([x.flatten(), y.flatten()], dim=1)
    inside = moves.norm(dim=1) < 0.25
    s0 = env.initial_states(int(inside.sum()))
    no_exit = torch.zeros(s0.shape[0], dtype=torch.bool)
    log_p = env.forward_log_prob(s0, params.expand(s0.shape[0], -1), moves[inside], no_exit)
    assert float(log_p.double().exp().sum() * (0.25 / 800) ** 2) == pytest.approx(1.0, abs=0.02)
    # A later move from s = (0.85, 0.4): exit, or an angle of a full step that stays inside,
    # θ in [arccos(0.15 / 0.25), π/2].
    s = torch.tensor([[0.85, 0.4]])
    low, high = math.acos(0.6), math.pi / 2
    theta = torch.linspace(low, high, 20_001)
    states = s.expand(theta.numel(), 2)
    steps = 0.25 * torch.stack([theta.cos(), theta.sin()], dim=1)
    no_exit = torch.zeros(theta.numel(), dtype=torch.bool)
    p_move = env.forward_log_prob(states, params.expand(theta.numel(), -1), steps, no_exit).exp()
    p_exit = env.forward_log_prob(s, params, steps[:1], torch.tensor([True])).exp()
    total = float(torch.trapezoid(p_move.double(), theta.double()) + p_exit.double())
    assert total == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize(
    "env, tolerance", [(Box(delta=0.5), 0.1), (Box(delta=0.25), 0.15), (Line(), 0.1)], ids=repr
)
def test_importance_sampling_recovers_the_closed_form_z(env, tolerance):
    """E_{τ ~ P_F}[R(x) P_B(τ | x) / P_F(τ)] = ∫ R = Z for any P_F and a P_B on the same
    measure: a missing Jacobian (−log r of the first move, ~1.5 nats on average here) or a
    mismatched reference measure shifts the estimate. The weights are heavy-tailed (far
    corners need many steps), so log-mean-exp is biased low by up to ~0.1 at δ = 0.25."""
    model = ConstantPolicy(env)
    batch = sample_continuous(model, env, 200_000, torch.Generator().manual_seed(2))
    scores = continuous_log_probs(model, env, batch)
    log_w = batch.log_rewards.double() + scores.log_pb.sum(0).double() - scores.log_pf.sum(0)
    estimate = float(torch.logsumexp(log_w, dim=0) - math.log(log_w.numel()))
    assert estimate == pytest.approx(env.true_log_z, abs=tolerance)


@torch.no_grad()
def test_continuous_log_probs_match_a_state_by_state_loop():
    env = Box()
    torch.manual_seed(3)
    policy = MLPPolicy(3, env.n_forward_params, hidden=16, n_backward_outputs=env.n_backward_params)
    model = GFlowNet(policy)
    batch = sample_continuous(model, env, 16, torch.Generator().manual_seed(3))
    scores = continuous_log_probs(model, env, batch)
    for b in range(16):
        n = int(batch.lengths[b])
        pf = pb = 0.0
        for t in range(n + 1):
            s = batch.states[t, b : b + 1]
            out = model(env.featurize(s))
            move = batch.actions[t, b : b + 1]
            pf += float(env.forward_log_prob(s, out.pf_logits, move, torch.tensor([t == n])))
            if t < n:
                child = batch.states[t + 1, b : b + 1]
                pb += float(env.backward_log_prob(child, model(env.featurize(child)).pb_logits,
                                                  move))  # fmt: skip
        assert float(scores.log_pf[:, b].sum()) == pytest.approx(pf, abs=1e-4)
        assert float(scores.log_pb[:, b].sum()) == pytest.approx(pb, abs=1e-4)


def test_box_cell_masses_are_the_reward_integrated_over_each_cell():
    env = Box(bins=10)
    masses, outside = env.target_cell_masses()
    fine = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000  # 100 midpoints per cell
    x, y = torch.meshgrid(fine, fine, indexing="ij")
    reward = env.reward(torch.stack([x.flatten(), y.flatten()], dim=1)).view(1000, 1000)
    by_quadrature = reward.view(10, 100, 10, 100).sum(dim=(1, 3)).numpy()
    assert outside == 0.0
    assert np.allclose(masses, by_quadrature / by_quadrature.sum(), atol=1e-12)
    assert math.exp(env.true_log_z) == pytest.approx(float(reward.mean()))


def test_line_cell_masses_are_the_mixture_integrated_over_each_cell():
    env = Line(mus=[-1.0, 3.0], sigmas=[0.5, 1.0], bins=40)
    masses, outside = env.target_cell_masses()
    low, high, bins = env.eval_grid[0]
    x = torch.linspace(low, high, bins * 200 + 1, dtype=torch.float64)
    density = 0.5 * (stats.norm(-1, 0.5).pdf(x.numpy()) + stats.norm(3, 1.0).pdf(x.numpy()))
    density = torch.as_tensor(density)
    cells = [float(torch.trapezoid(density[i * 200 : i * 200 + 201], x[i * 200 : i * 200 + 201]))
             for i in range(bins)]  # fmt: skip
    assert np.allclose(masses, cells, atol=1e-8)
    assert outside == pytest.approx(1 - sum(cells), abs=1e-8)


def test_exact_samples_score_at_the_floor_and_a_wrong_sampler_does_not():
    env = Box(bins=20)
    masses, _ = env.target_cell_masses()
    generator = torch.Generator().manual_seed(4)
    cells = torch.multinomial(
        torch.as_tensor(masses.reshape(-1)), 50_000, replacement=True, generator=generator
    )
    corner = torch.stack([cells // 20, cells % 20], dim=1).double()
    points = (corner + torch.rand(50_000, 2, generator=generator, dtype=torch.float64)) / 20
    exact = histogram_metrics(env, points.float(), generator)
    assert exact["jsd"] < 1.5 * exact["jsd_floor"] + 1e-3
    uniform = histogram_metrics(env, torch.rand(50_000, 2, generator=generator), generator)
    assert uniform["jsd"] > 10 * uniform["jsd_floor"]


def test_the_continuous_envs_pass_the_checker():
    check_env(Box(), seed=0)
    check_env(Box(delta=0.9), seed=1)
    check_env(Line(), seed=0)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: Box(delta=0.0), "Invalid env.delta: 0; expected a float in (0, 1)"),
        (lambda: Box(delta=1.0), "Invalid env.delta: 1; expected a float in (0, 1)"),
        (lambda: Box(R0=0.0), "Invalid env.R0: 0"),
        (lambda: Line(mus=[0.0], sigmas=[1.0, 2.0]), "env.mus and env.sigmas must be"),
        (lambda: Line(sigmas=[0.5, -1.0]), "Invalid env.sigmas: -1"),
        (lambda: Line(n_steps=0), "Invalid env.n_steps: 0"),
    ],
)
def test_bad_arguments_are_refused_by_name(make, words):
    with pytest.raises(ConfigError) as caught:
        make()
    assert words in str(caught.value)


def test_what_continuous_actions_rule_out_is_refused_by_name():
    env = Box()
    model = GFlowNet(MLPPolicy(3, env.n_forward_params, n_backward_outputs=env.n_backward_params))
    with pytest.raises(ConfigError, match=r"loss=fm is not available on the continuous"):
        ContinuousGFlowNetTask(env, model, get_loss("fm"))
    with pytest.raises(ConfigError, match=r"task\.epsilon and task\.temperature"):
        ContinuousGFlowNetTask(env, model, get_loss("tb"), epsilon=0.1)


@pytest.mark.slow
def test_line_trains_to_its_target_and_box_writes_its_samples(tmp_path):
    line = tmp_path / "line"
    done = subprocess.run(
        [sys.executable, "train.py", "env=line", "train.steps=600", "train.eval_every=600",
         "task.eval_samples=20000", f"hydra.run.dir={line}", "logging.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads((line / "metrics.json").read_text())
    # An untrained policy (moves ~N(0, 1) around 0) puts most mass between the modes: JSD ~0.3.
    assert metrics["jsd"] < 0.05, metrics
    box = tmp_path / "box"
    done = subprocess.run(
        [sys.executable, "train.py", "env=box", "train.steps=20", "train.eval_every=20",
         "task.eval_samples=3000", f"hydra.run.dir={box}", "logging.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "jsd_floor=" in done.stdout and "jsd_kde=" in done.stdout
    samples = np.load(box / "samples.npy")
    assert samples.shape == (3000, 2) and (samples >= 0).all() and (samples <= 1).all()


@torch.no_grad()
def test_continuous_batches_of_different_lengths_concatenate_and_score_as_their_parts():
    """The task samples an evaluation in chunks: joined, the batches keep every trajectory
    and its log-densities (padding moves are zero and score nothing)."""
    env = Box()
    model = ConstantPolicy(env)
    parts = [sample_continuous(model, env, n, torch.Generator().manual_seed(n)) for n in (64, 2)]
    assert parts[0].max_length != parts[1].max_length
    joined = Trajectories.concatenate(parts)
    assert joined.actions.shape == (max(p.max_length for p in parts), 66, 2)
    short = min(parts, key=lambda p: p.max_length)
    offset = 0 if short is parts[0] else 64
    pad = joined.actions[short.max_length :, offset : offset + short.batch_size]
    assert torch.equal(pad, torch.zeros_like(pad))
    whole = continuous_log_probs(model, env, joined).log_pf.sum(dim=0)
    separate = torch.cat([continuous_log_probs(model, env, p).log_pf.sum(dim=0) for p in parts])
    assert torch.allclose(whole, separate)
