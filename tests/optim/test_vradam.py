"""VRAdam against hand-written references, closed forms, torch's AdamW and its own twin kernel."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch

from optim import VRAdam

IMPLS = ["reference", "fused"]


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )
    net.frozen = torch.nn.Parameter(torch.randn(4, dtype=dtype), requires_grad=False)
    return net


def _groups(net: torch.nn.Module, **second) -> list[dict]:
    """Two groups of different lr; the frozen parameter never gets a gradient."""
    return [
        {"params": list(net[0].parameters()), "lr": 1e-2},
        {"params": [*net[2].parameters(), net.frozen], "lr": 3e-3, **second},
    ]


def _train(net, opt, steps: int, dtype=torch.float32, start: int = 0, sched=None) -> None:
    for i in range(start, steps):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(32, 5, generator=gen, dtype=dtype)
        y = torch.randn(32, 3, generator=gen, dtype=dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --- the update rule itself ------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_first_step_closed_form(impl):
    """Step 1: m̂ = g and v̂ = g², so θ1 = θ0 - η1 g/(|g|+ε) with η1 from ||(1-β1) g||²."""
    theta0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([3.0, -1.0, 0.25], dtype=torch.float64)
    p = torch.nn.Parameter(theta0.clone())
    opt = VRAdam([p], lr=0.1, betas=(0.9, 0.999), beta3=2.0, lr_cutoff=10.0, eps=1e-8, impl=impl)
    p.grad = g.clone()
    opt.step()
    sq = (0.1**2) * (9.0 + 1.0 + 0.0625)  # ||(1-β1) g||² = 0.01 · 10.0625
    eta = 0.1 / (1 + min(2.0 * sq, 10.0))
    expected = theta0 - eta * g / (g.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    assert opt.last_velocity_measure.item() == pytest.approx(sq, rel=1e-12)
    assert opt.last_lr_tensor.item() == pytest.approx(eta, rel=1e-12)


def _hand_written_vradam(theta, curv, steps, lr, betas, beta3, cutoff, eps, wd):
    """VRAdam on f(θ) = ½ Σ c_i θ_i², in plain Python floats, as DESIGN.md §5 reads."""
    b1, b2 = betas
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    etas = []
    for t in range(1, steps + 1):
        g = [c * x for c, x in zip(curv, theta, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        eta = lr / (1 + min(beta3 * sum(mi * mi for mi in m), cutoff))
        etas.append(eta)
        theta = [
            x * (1 - eta * wd) - eta * (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps)
            for x, mi, vi in zip(theta, m, v, strict=True)
        ]
    return theta, etas


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_quadratic_matches_hand_written_loop(impl, wd):
    theta0 = [1.5, -0.7, 0.2, 3.0]
    curv = [0.5, 2.0, 10.0, 1.0]
    hyper = dict(lr=0.05, betas=(0.8, 0.99), beta3=0.3, cutoff=4.0, eps=1e-8, wd=wd)
    expected, etas = _hand_written_vradam(theta0, curv, 60, **hyper)
    assert min(etas) < 0.05 / 2  # the penalty is active, and the cutoff binds early on
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    c = torch.tensor(curv, dtype=torch.float64)
    opt = VRAdam(
        [p], lr=0.05, betas=(0.8, 0.99), beta3=0.3, lr_cutoff=4.0, weight_decay=wd, impl=impl
    )
    for eta in etas:
        opt.zero_grad()
        (0.5 * (c * p**2).sum()).backward()
        opt.step()
        assert opt.last_lr_tensor.item() == pytest.approx(eta, rel=1e-10)
    torch.testing.assert_close(p.detach(), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_beta3_zero_is_adamw(impl):
    """Without the penalty, VRAdam is torch's AdamW, weight decay included."""
    net_a, net_b = _mlp(torch.float64), _mlp(torch.float64)
    opt_a = VRAdam(net_a.parameters(), lr=1e-2, beta3=0.0, weight_decay=0.1, impl=impl)
    opt_b = torch.optim.AdamW(net_b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    _train(net_a, opt_a, 50, torch.float64)
    _train(net_b, opt_b, 50, torch.float64)
    for a, b in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_adam_oscillation_is_damped():
    """On a stiff quadratic where Adam at lr α0 flips direction every step, η_t drops below α0
    and VRAdam ends at a lower loss."""
    curv = torch.full((10,), 100.0, dtype=torch.float64)

    def run(make):
        p = torch.nn.Parameter(torch.linspace(0.3, 1.0, 10, dtype=torch.float64))
        opt = make([p])
        losses, cosines, etas, prev = [], [], [], None
        for _ in range(300):
            opt.zero_grad()
            loss = 0.5 * (curv * p**2).sum()
            loss.backward()
            before = p.detach().clone()
            opt.step()
            delta = p.detach() - before
            if prev is not None:
                cosines.append(torch.nn.functional.cosine_similarity(delta, prev, dim=0).item())
            prev = delta
            losses.append(loss.item())
            if isinstance(opt, VRAdam):
                etas.append(opt.last_lr_tensor.item() / 0.2)
        return sum(losses[-50:]) / 50, cosines, etas

    adam_loss, adam_cos, _ = run(lambda ps: torch.optim.Adam(ps, lr=0.2, betas=(0.5, 0.5)))
    vr_loss, _, etas = run(lambda ps: VRAdam(ps, lr=0.2, betas=(0.5, 0.5)))
    assert sum(c < 0 for c in adam_cos[-100:]) >= 90  # Adam is in a two-step oscillation
    assert sum(etas) / len(etas) < 0.5
    assert vr_loss < 0.5 * adam_loss


# --- the two implementations -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"norm": "group"}, {"norm_source": "grad"}, {"maximize": True}],
    ids=["global", "group", "grad", "maximize"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matches_reference(options, dtype):
    """200 steps, two groups of different lr (one with weight decay) and a frozen parameter."""
    nets, opts = [], []
    for impl in IMPLS:
        net = _mlp(dtype)
        opts.append(VRAdam(_groups(net, weight_decay=0.1), impl=impl, **options))
        _train(net, opts[-1], 200, dtype)
        nets.append(net)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert _rel(b.detach(), a.detach()) <= tol
    assert _rel(opts[1].last_lr_tensor, opts[0].last_lr_tensor) <= tol
    assert torch.equal(nets[0].frozen, _mlp(dtype).frozen)


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_none_is_skipped_and_not_normed(impl):
    net = _mlp(torch.float64)
    opt = VRAdam(_groups(net), impl=impl)
    _train(net, opt, 3, torch.float64)
    assert net.frozen not in opt.state
    # The global norm covers exactly the parameters that have a gradient.
    sq = sum(opt.state[p]["exp_avg"].square().sum() for p in net.parameters() if p.requires_grad)
    assert opt.last_velocity_measure.tolist() == pytest.approx([sq.item()] * 2, rel=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_norm_and_gradient_source(impl):
    net = _mlp(torch.float64)
    opt = VRAdam(_groups(net), norm="group", beta3=0.5, lr_cutoff=3.0, impl=impl)
    _train(net, opt, 3, torch.float64)
    for i, group in enumerate(opt.param_groups):
        sq = sum(opt.state[p]["exp_avg"].square().sum() for p in group["params"] if p in opt.state)
        assert opt.last_velocity_measure[i].item() == pytest.approx(sq.item(), rel=1e-12)
        eta = group["lr"] / (1 + min(0.5 * sq.item(), 3.0))
        assert opt.last_lr_tensor[i].item() == pytest.approx(eta, rel=1e-12)

    opt = VRAdam(net.parameters(), norm_source="grad", impl=impl)
    net.zero_grad()
    torch.nn.functional.mse_loss(
        net(torch.ones(2, 5, dtype=torch.float64)), torch.zeros(2, 3, dtype=torch.float64)
    ).backward()
    sq = sum(p.grad.square().sum() for p in net.parameters() if p.grad is not None)
    opt.step()
    assert opt.last_velocity_measure.item() == pytest.approx(sq.item(), rel=1e-12)


def test_auto_picks_fused_on_cpu_floats():
    p = torch.nn.Parameter(torch.ones(3))
    opt = VRAdam([p])
    p.grad = torch.ones(3)
    opt.step()
    assert opt._resolve_impl() == "fused"


# --- no host synchronisation -----------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", [{}, {"norm": "group", "weight_decay": 0.1}])
def test_step_never_syncs_with_host(impl, options, record_ops):
    net = _mlp()
    opt = VRAdam(_groups(net), impl=impl, **options)
    _train(net, opt, 2)  # state exists; the recorded step is a steady-state one
    torch.nn.functional.mse_loss(net(torch.ones(4, 5)), torch.zeros(4, 3)).backward()
    with record_ops() as rec:
        opt.step()
    assert rec.ops, "the dispatch mode recorded nothing"
    assert "aten._local_scalar_dense.default" not in rec.ops
    # The recorder does see a sync when one happens.
    with record_ops() as rec:
        opt.last_lr_tensor[0].item()
    assert "aten._local_scalar_dense.default" in rec.ops


# --- state, schedulers, AMP, compile ---------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("timing", ["exact", "lagged"])
def test_resume_from_state_dict_is_bit_exact(impl, timing):
    """The lagged timing's s_{t-1} travels in the param groups of the state dict."""
    net = _mlp()
    opt = VRAdam(_groups(net, weight_decay=0.1), impl=impl, norm_timing=timing)
    _train(net, opt, 100)

    half = _mlp()
    opt_half = VRAdam(_groups(half, weight_decay=0.1), impl=impl, norm_timing=timing)
    _train(half, opt_half, 50)
    buffer = io.BytesIO()
    torch.save({"model": half.state_dict(), "optim": opt_half.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)

    resumed = _mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt_resumed = VRAdam(_groups(resumed, weight_decay=0.1), impl=impl, norm_timing=timing)
    opt_resumed.load_state_dict(ckpt["optim"])
    _train(resumed, opt_resumed, 100, start=50)
    for a, b in zip(net.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_lr_scheduler_acts_on_alpha0(impl):
    net = _mlp(torch.float64)
    opt = VRAdam(net.parameters(), lr=1e-2, beta3=0.5, impl=impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    _train(net, opt, 12, torch.float64, sched=sched)
    alpha0 = opt.param_groups[0]["lr"]
    assert alpha0 == pytest.approx(1e-2 * 0.25)  # lr during the 12th step: 2 decays, not 3
    sq = opt.last_velocity_measure.item()
    assert opt.last_lr_tensor.item() == pytest.approx(1e-2 * 0.25 / (1 + min(0.5 * sq, 10)))


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_scaler(impl):
    """A power-of-two loss scale unscales exactly; an inf gradient skips the step."""
    plain, scaled = _mlp(), _mlp()
    opt_plain = VRAdam(plain.parameters(), impl=impl)
    opt_scaled = VRAdam(scaled.parameters(), impl=impl)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for _ in range(5):
        opt_plain.zero_grad()
        torch.nn.functional.mse_loss(plain(x), y).backward()
        opt_plain.step()
        opt_scaled.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(scaled(x), y)).backward()
        scaler.step(opt_scaled)
        scaler.update()
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    before = [p.detach().clone() for p in scaled.parameters()]
    opt_scaled.zero_grad()
    scaler.scale(torch.nn.functional.mse_loss(scaled(x), y) * math.inf).backward()
    scaler.step(opt_scaled)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, scaled.parameters(), strict=True))
    assert scaler.get_scale() == 2.0**9


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_model(impl):
    eager, compiled = _mlp(), _mlp()
    opt_eager = VRAdam(eager.parameters(), impl=impl)
    opt_compiled = VRAdam(compiled.parameters(), impl=impl)
    forward = torch.compile(compiled, backend="aot_eager")
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for fwd, opt in ((eager, opt_eager), (forward, opt_compiled)):
        for _ in range(10):
            opt.zero_grad()
            torch.nn.functional.mse_loss(fwd(x), y).backward()
            opt.step()
        assert opt.state
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "Invalid lr: 0; expected a float > 0"),
        ({"lr": -1e-3}, "Invalid lr: -0.001; expected a float > 0"),
        ({"lr": math.nan}, "Invalid lr: nan; expected a float > 0"),
        ({"betas": (1.0, 0.999)}, "Invalid betas[0]: 1; expected a float in [0, 1)"),
        ({"betas": (0.9, -0.1)}, "Invalid betas[1]: -0.1; expected a float in [0, 1)"),
        ({"beta3": -1.0}, "Invalid beta3: -1; expected a float >= 0"),
        ({"lr_cutoff": -0.5}, "Invalid lr_cutoff: -0.5; expected a float >= 0"),
        ({"eps": 0.0}, "Invalid eps: 0; expected a float > 0"),
        ({"weight_decay": -1.0}, "Invalid weight_decay: -1; expected a float >= 0"),
        ({"norm": "layer"}, "Unknown norm: 'layer'; valid: global, group"),
        (
            {"norm_source": "momentum"},
            "Unknown norm_source: 'momentum'; valid: velocity, grad",
        ),
        ({"impl": "cuda"}, "Unknown impl: 'cuda'; valid: auto, reference, fused, triton"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        VRAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
