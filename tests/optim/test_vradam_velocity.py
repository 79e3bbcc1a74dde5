"""VRAdam's scale-free velocity measures: "mean" and "precond" against
closed forms, a hand-written loop, model-size invariance, and fused/reference parity."""

from __future__ import annotations

import math
import re

import pytest
import torch

from optim import VRAdam

IMPLS = ["reference", "fused"]
SCALE_FREE = ["mean", "precond"]


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net = net.to(dtype)
    net.frozen = torch.nn.Parameter(torch.randn(4, dtype=dtype), requires_grad=False)
    return net


def _groups(net: torch.nn.Module, **second) -> list[dict]:
    return [
        {"params": list(net[0].parameters()), "lr": 1e-2},
        {"params": [*net[2].parameters(), net.frozen], "lr": 3e-3, **second},
    ]


def _train(net, opt, steps: int, dtype=torch.float32) -> None:
    for i in range(steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(32, 5, generator=gen, dtype=dtype)
        y = torch.randn(32, 3, generator=gen, dtype=dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("velocity", ["sum", *SCALE_FREE])
def test_first_step_closed_form(impl, velocity):
    """Step 1: m = (1-β1) g, m̂ = g, v̂ = g²; s_t per measure, then θ1 = θ0 - η1 g/(|g|+ε)."""
    theta0 = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    g = torch.tensor([3.0, -1.0, 0.25, 1e-3], dtype=torch.float64)
    p = torch.nn.Parameter(theta0.clone())
    opt = VRAdam([p], lr=0.1, beta3=2.0, lr_cutoff=10.0, eps=1e-8, velocity=velocity, impl=impl)
    p.grad = g.clone()
    opt.step()
    direction = g / (g.abs() + 1e-8)
    s = {
        "sum": 0.01 * g.square().sum().item(),
        "mean": 0.01 * g.square().mean().item(),
        "precond": direction.square().mean().item(),  # ≈ 1: the units of g cancel
    }[velocity]
    eta = 0.1 / (1 + min(2.0 * s, 10.0))
    torch.testing.assert_close(p.detach(), theta0 - eta * direction, rtol=1e-12, atol=1e-12)
    assert opt.last_velocity_measure.item() == pytest.approx(s, rel=1e-12)
    assert opt.last_lr_tensor.item() == pytest.approx(eta, rel=1e-12)


def _hand_written(theta, curv, steps, lr, betas, beta3, cutoff, eps, wd, velocity):
    """VRAdam on f(θ) = ½ Σ c_i θ_i² in plain Python floats, with the chosen measure s_t."""
    b1, b2 = betas
    n = len(theta)
    m, v, etas = [0.0] * n, [0.0] * n, []
    for t in range(1, steps + 1):
        g = [c * x for c, x in zip(curv, theta, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        u = [
            (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps)
            for mi, vi in zip(m, v, strict=True)
        ]
        squares = [mi * mi for mi in m] if velocity == "mean" else [ui * ui for ui in u]
        s = sum(squares) / n
        eta = lr / (1 + min(beta3 * s, cutoff))
        etas.append(eta)
        theta = [x * (1 - eta * wd) - eta * ui for x, ui in zip(theta, u, strict=True)]
    return theta, etas


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("velocity", SCALE_FREE)
def test_quadratic_matches_hand_written_loop(impl, velocity):
    theta0, curv = [1.5, -0.7, 0.2, 3.0], [0.5, 2.0, 10.0, 1.0]
    beta3 = 1.0 if velocity == "mean" else 2.0
    expected, etas = _hand_written(
        theta0, curv, 60, 0.05, (0.8, 0.99), beta3, 4.0, 1e-8, 0.05, velocity
    )
    assert min(etas) < 0.05 / 1.5  # the gate is active
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    c = torch.tensor(curv, dtype=torch.float64)
    opt = VRAdam(
        [p], lr=0.05, betas=(0.8, 0.99), beta3=beta3, lr_cutoff=4.0, weight_decay=0.05,
        velocity=velocity, impl=impl,
    )  # fmt: skip
    for eta in etas:
        opt.zero_grad()
        (0.5 * (c * p**2).sum()).backward()
        opt.step()
        assert opt.last_lr_tensor.item() == pytest.approx(eta, rel=1e-12)
    torch.testing.assert_close(
        p.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("velocity", ["sum", *SCALE_FREE])
def test_measure_against_model_size(impl, velocity):
    """Ten copies of a parameter with the same gradient: "sum" grows tenfold, the others stay."""

    def measure(copies: int) -> float:
        params = [torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))]
        params += [torch.nn.Parameter(params[0].detach().clone()) for _ in range(copies - 1)]
        opt = VRAdam(params, velocity=velocity, impl=impl)
        for step in range(3):
            for p in params:
                p.grad = torch.cos(torch.arange(7, dtype=torch.float64) * (step + 1))
            opt.step()
        return opt.last_velocity_measure.item()

    ratio = measure(10) / measure(1)
    assert ratio == pytest.approx(10.0 if velocity == "sum" else 1.0, rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", ["global", "group"])
def test_mean_counts_exactly_the_elements_with_gradients(impl, norm):
    net = _mlp(torch.float64)
    opt = VRAdam(_groups(net), norm=norm, velocity="mean", impl=impl)
    _train(net, opt, 3, torch.float64)
    per_group = []
    for group in opt.param_groups:
        ms = [opt.state[p]["exp_avg"] for p in group["params"] if p in opt.state]
        per_group.append((sum(m.square().sum() for m in ms).item(), sum(m.numel() for m in ms)))
    if norm == "global":
        total = sum(s for s, _ in per_group) / sum(n for _, n in per_group)
        expected = [total, total]
    else:
        expected = [s / n for s, n in per_group]
    assert opt.last_velocity_measure.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {"velocity": "mean"},
        {"velocity": "mean", "norm": "group"},
        {"velocity": "mean", "norm_source": "grad"},
        {"velocity": "precond"},
        {"velocity": "precond", "norm": "group"},
        {"velocity": "precond", "maximize": True},
    ],
    ids=["mean", "mean-group", "mean-grad", "precond", "precond-group", "precond-maximize"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference(options, dtype):
    """100 steps, two groups of different lr (one with weight decay), a frozen parameter."""
    nets, opts = [], []
    for impl in IMPLS:
        net = _mlp(dtype)
        opts.append(VRAdam(_groups(net, weight_decay=0.1), beta3=5.0, impl=impl, **options))
        _train(net, opts[-1], 100, dtype)
        nets.append(net)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert _rel(b.detach(), a.detach()) <= tol
    assert _rel(opts[1].last_lr_tensor, opts[0].last_lr_tensor) <= tol
    assert (opts[0].last_lr_tensor < torch.tensor([1e-2, 3e-3], dtype=dtype)).all()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        if a.requires_grad:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert _rel(opts[1].state[b][key], opts[0].state[a][key]) <= tol


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "options",
    [
        {"velocity": "mean"},
        {"velocity": "mean", "norm": "group", "norm_source": "grad"},
        {"velocity": "precond", "weight_decay": 0.1},
        {"velocity": "precond", "norm": "group", "maximize": True},
    ],
)
def test_step_never_syncs_with_host(impl, options, record_ops):
    net = _mlp()
    opt = VRAdam(_groups(net), impl=impl, **options)
    _train(net, opt, 2)
    torch.nn.functional.mse_loss(net(torch.ones(4, 5)), torch.zeros(4, 3)).backward()
    with record_ops() as rec:
        opt.step()
    assert rec.ops, "the dispatch mode recorded nothing"
    assert "aten._local_scalar_dense.default" not in rec.ops


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"velocity": "rms"}, "Unknown velocity: 'rms'; valid: sum, mean, precond"),
        (
            {"velocity": "precond", "norm_source": "grad"},
            "Invalid velocity: 'precond' with norm_source='grad'; 'precond' measures Adam's "
            "step m_hat/(sqrt(v_hat)+eps), so it needs norm_source='velocity'",
        ),
    ],
)
def test_invalid_velocity(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        VRAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
