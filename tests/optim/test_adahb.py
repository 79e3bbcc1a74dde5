"""Adaptive heavy-ball SGD and Adam against hand-written loops and Polyak's closed form."""

from __future__ import annotations

import math
import re

import pytest
import torch

from optim import AdaHBAdam, AdaHBSGD
from optim.adahb import heavy_ball_momentum


def _momentum(lr, dg, dx, previous, delta):
    if dx == 0:
        return previous
    return min(max((1 - min(math.sqrt(lr * dg / dx), 1.0)) ** 2, 0.0), 1 - delta)


def _hand_written_sgd(x, curv, steps, lr, delta, wd):
    """Heavy ball x+ = x - α g + β_k (x - x_prev) on f = ½ Σ c_i x_i² (+ L2), Python floats."""
    prev_g = None
    move = [0.0] * len(x)
    beta, betas = 0.0, []
    for _ in range(steps):
        g = [c * xi + wd * xi for c, xi in zip(curv, x, strict=True)]
        if prev_g is not None:
            dg = math.sqrt(sum((a - b) ** 2 for a, b in zip(g, prev_g, strict=True)))
            dx = math.sqrt(sum(d * d for d in move))
            beta = _momentum(lr, dg, dx, beta, delta)
        betas.append(beta)
        move = [-lr * gi + beta * d for gi, d in zip(g, move, strict=True)]
        x = [xi + d for xi, d in zip(x, move, strict=True)]
        prev_g = g
    return x, betas


def _hand_written_adam(x, curv, steps, lr, beta2, delta, eps, wd):
    n = len(x)
    prev_g, move = None, [0.0] * n
    m, v = [0.0] * n, [0.0] * n
    beta, prod, betas = 0.0, 1.0, []
    for t in range(1, steps + 1):
        g = [c * xi for c, xi in zip(curv, x, strict=True)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        P = [math.sqrt(vi / (1 - beta2**t)) + eps for vi in v]
        if prev_g is not None:
            dg = math.sqrt(sum((a - b) ** 2 / p for a, b, p in zip(g, prev_g, P, strict=True)))
            dx = math.sqrt(sum(d * d * p for d, p in zip(move, P, strict=True)))
            beta = _momentum(lr, dg, dx, beta, delta)
        betas.append(beta)
        prod *= beta
        m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g, strict=True)]
        new = [
            xi * (1 - lr * wd) - lr * mi / (1 - prod) / p for xi, mi, p in zip(x, m, P, strict=True)
        ]
        move = [a - b for a, b in zip(new, x, strict=True)]
        x, prev_g = new, g
    return x, betas


def _run(opt, p, curv, steps):
    betas = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (curv * p**2).sum()).backward()
        opt.step()
        betas.append(opt.last_momentum.item())
    return betas


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_sgd_matches_hand_written_loop(wd):
    x0, curv = [1.0, -2.0, 0.5], [1.0, 4.0, 20.0]
    expected, betas = _hand_written_sgd(x0, curv, 40, 0.02, 0.05, wd)
    assert min(betas[1:]) > 0 and max(betas) < 0.95  # the momentum adapts, below its cap
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = AdaHBSGD([p], lr=0.02, delta=0.05, weight_decay=wd)
    got = _run(opt, p, torch.tensor(curv, dtype=torch.float64), 40)
    assert got == pytest.approx(betas, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_matches_hand_written_loop(wd):
    x0, curv = [1.0, -2.0, 0.5], [1.0, 4.0, 20.0]
    expected, betas = _hand_written_adam(x0, curv, 40, 0.05, 0.99, 0.01, 1e-8, wd)
    assert len(set(betas[1:])) > 10  # the momentum does change from step to step
    p = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    opt = AdaHBAdam([p], lr=0.05, beta2=0.99, delta=0.01, weight_decay=wd)
    got = _run(opt, p, torch.tensor(curv, dtype=torch.float64), 40)
    assert got == pytest.approx(betas, rel=1e-10, abs=1e-14)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))


def test_one_dim_quadratic_gives_polyaks_momentum():
    """f = ½ L x²: h_k = |L Δx| / |Δx| = L exactly, so β_k = (1 - √(αL))² from step 2 on."""
    L, lr = 3.0, 0.01
    p = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdaHBSGD([p], lr=lr)
    betas = _run(opt, p, torch.tensor([L], dtype=torch.float64), 30)
    assert betas[0] == 0.0  # no previous iterate on the first step
    assert betas[1:] == pytest.approx([(1 - math.sqrt(lr * L)) ** 2] * 29, rel=1e-12)
    assert opt.last_curvature.item() == pytest.approx(L, rel=1e-12)


def test_adam_curvature_is_preconditioned():
    """In 1-D, h_k = L / P_k with Adam's preconditioner P_k = √v̂_k + ε."""
    L, lr = 3.0, 0.01
    p = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    opt = AdaHBAdam([p], lr=lr, beta2=0.9)
    _run(opt, p, torch.tensor([L], dtype=torch.float64), 5)
    state = opt.state[p]
    P = (state["exp_avg_sq"] / (1 - 0.9**5)).sqrt() + 1e-8
    assert opt.last_curvature.item() == pytest.approx((L / P).item(), rel=1e-10)
    assert state["momentum"].item() == pytest.approx((1 - math.sqrt(lr * L / P.item())) ** 2)


def test_momentum_rule_edges():
    prev = torch.tensor(0.3, dtype=torch.float64)
    zero = torch.tensor(0.0, dtype=torch.float64)
    # No move: keep the previous momentum.
    beta, h = heavy_ball_momentum(0.1, torch.tensor(4.0, dtype=torch.float64), zero, prev, 0.01)
    assert (beta.item(), h.item()) == (0.3, 0.0)
    # Flat along the move: capped at 1 - delta.
    beta, _ = heavy_ball_momentum(0.1, zero, torch.tensor(1.0, dtype=torch.float64), prev, 0.01)
    assert beta.item() == pytest.approx(0.99)
    # Curvature beyond 1/alpha: no momentum (not the literal formula's return towards 1).
    sq = torch.tensor(1.0, dtype=torch.float64)
    beta, h = heavy_ball_momentum(0.1, 900 * sq, sq, prev, 0.01)
    assert (beta.item(), h.item()) == (0.0, pytest.approx(30.0))


def test_groups_have_their_own_momentum():
    a = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = AdaHBSGD([{"params": [a]}, {"params": [b], "lr": 0.04, "beta3": 0.1}], lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        (0.5 * a**2 + 0.5 * b**2).sum().backward()
        opt.step()
    assert opt.last_momentum.tolist() == pytest.approx([0.81, 0.64], rel=1e-12)
    assert opt.state[b]["momentum"].item() == pytest.approx(0.64, rel=1e-12)


@pytest.mark.parametrize("make", [AdaHBSGD, AdaHBAdam])
def test_step_never_syncs_with_host(make, record_ops):
    net = torch.nn.Linear(4, 2)
    opt = make(net.parameters(), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.ones(3, 4)).square().sum().backward()
        if _ == 2:
            with record_ops() as rec:
                opt.step()
        else:
            opt.step()
    assert rec.ops and "aten._local_scalar_dense.default" not in rec.ops


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (AdaHBSGD, {"lr": 0.0}, "Invalid lr: 0; expected a float > 0"),
        (AdaHBSGD, {"delta": 0.0}, "Invalid delta: 0; expected a float in (0, 1]"),
        (AdaHBSGD, {"delta": math.nan}, "Invalid delta: nan; expected a float in (0, 1]"),
        (
            AdaHBSGD,
            {"weight_decay": -1.0},
            "Invalid weight_decay: -1; expected a float >= 0",
        ),
        (AdaHBAdam, {"beta2": 1.0}, "Invalid beta2: 1; expected a float in [0, 1)"),
        (AdaHBAdam, {"eps": -1.0}, "Invalid eps: -1; expected a float > 0"),
    ],
)
def test_invalid_hyperparameters(make, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make([torch.nn.Parameter(torch.ones(2))], **kwargs)
