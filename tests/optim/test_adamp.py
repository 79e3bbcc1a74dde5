"""AdamP and SGDP against a hand-written reference of the published rule (arXiv 2006.08217)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from optim import SGDP, AdamP


def _net(seed: int = 0) -> torch.nn.Module:
    """Conv + BatchNorm (per-channel scale-invariant), Linear + LayerNorm without bias
    (scale-invariant as a whole layer only), and a plain linear head (not scale-invariant)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, bias=False),  # a bias before BN gets only rounding noise
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8, bias=False),
        torch.nn.LayerNorm(8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 3),
    ).double()


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    x = torch.randn(16, 2, 6, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(16, 3, generator=gen, dtype=torch.float64)


def _grads(net: torch.nn.Module, i: int) -> None:
    for p in net.parameters():
        p.grad = None
    x, y = _batch(i)
    torch.nn.functional.mse_loss(net(x), y).backward()


# --- the reference: one tensor at a time, straight from the paper's Algorithms 1-2 ------------


def _reference_projection(p, g, u, delta, eps):
    """Π: if |cos(g, p)| < δ/√d on every row of the channel view (else the layer view), remove
    each row's component along p̂ = p/(‖p‖+ε). Returns (update, projected)."""
    if p.dim() < 2:
        return u, False
    for rows in (p.shape[0], 1):
        pv, gv, uv = p.reshape(rows, -1), g.reshape(rows, -1), u.reshape(rows, -1)
        cos = (pv * gv).sum(1).abs() / (pv.norm(dim=1) * gv.norm(dim=1))
        if cos.max().item() < delta / math.sqrt(pv.shape[1]):
            unit = pv / (pv.norm(dim=1, keepdim=True) + eps)
            return (uv - unit * (unit * uv).sum(1, keepdim=True)).reshape(u.shape), True
    return u, False


def _reference_adamp(params, state, t, lr, betas, eps, wd, delta, wd_ratio, nesterov):
    b1, b2 = betas
    flags = []
    for p in params:
        g = p.grad
        m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[id(p)] = (m, v)
        denom = (v / (1 - b2**t)).sqrt() + eps
        first = b1 * m + (1 - b1) * g if nesterov else m
        u, projected = _reference_projection(p.detach(), g, first / denom, delta, eps)
        ratio = wd_ratio if projected else 1.0
        p.data = p.data * (1 - lr * wd * ratio) - lr / (1 - b1**t) * u
        flags.append(projected)
    return flags


def _reference_sgdp(params, state, lr, momentum, dampening, wd, nesterov, eps, delta, wd_ratio):
    flags = []
    for p in params:
        g = p.grad
        buf = momentum * state.get(id(p), torch.zeros_like(p)) + (1 - dampening) * g
        state[id(p)] = buf
        direction = g + momentum * buf if nesterov else buf
        u, projected = _reference_projection(p.detach(), g, direction, delta, eps)
        ratio = wd_ratio if projected else 1.0
        p.data = p.data * (1 - lr * wd * ratio / (1 - momentum)) - lr * u
        flags.append(projected)
    return flags


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_matches_reference(nesterov):
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1)
    net, ref = _net(), _net()
    opt = AdamP(net.parameters(), nesterov=nesterov, **hyper)
    state, flag_counts = {}, None
    for t in range(1, 26):
        _grads(net, t)
        _grads(ref, t)
        opt.step()
        flags = _reference_adamp(
            list(ref.parameters()), state, t, hyper["lr"], hyper["betas"], hyper["eps"],
            hyper["weight_decay"], hyper["delta"], hyper["wd_ratio"], nesterov,
        )  # fmt: skip
        assert [bool(opt.state[p]["projected"]) for p in net.parameters()] == flags
        flag_counts = [a + b for a, b in zip(flag_counts or [0] * len(flags), flags, strict=True)]
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert _rel(a.detach(), b.detach()) <= 1e-12
    # conv weight (channel view) and scale-invariant linear (layer view) project every step; the
    # 1-dim tensors never do; the head only when its gradient happens to be near-orthogonal.
    counts = dict(zip([n for n, _ in net.named_parameters()], flag_counts, strict=True))
    assert counts.pop("7.weight") <= 3
    assert counts == {
        "0.weight": 25, "1.weight": 0, "1.bias": 0, "4.weight": 25, "5.weight": 0, "5.bias": 0,
        "7.bias": 0,
    }  # fmt: skip


def test_channel_view_comes_first():
    """The LayerNorm'd linear is scale-invariant only as a whole: its channel view must not
    trigger, its layer view must; the conv weight triggers on the channel view already."""
    net = _net()
    _grads(net, 0)
    for module, rows in ((net[0], 4), (net[4], 1)):
        w, g = module.weight.detach(), module.weight.grad
        for view_rows in (w.shape[0], 1):
            cos = torch.nn.functional.cosine_similarity(
                g.reshape(view_rows, -1), w.reshape(view_rows, -1), dim=1
            ).abs()
            fires = bool(cos.max() < 0.1 / math.sqrt(w.numel() // view_rows))
            assert fires == (view_rows == rows or view_rows == 1)


@pytest.mark.parametrize(("nesterov", "dampening"), [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_sgdp_matches_reference(nesterov, dampening):
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, eps=1e-8, delta=0.1, wd_ratio=0.1)
    net, ref = _net(), _net()
    opt = SGDP(net.parameters(), nesterov=nesterov, dampening=dampening, **hyper)
    state, projected = {}, 0
    for t in range(1, 26):
        _grads(net, t)
        _grads(ref, t)
        opt.step()
        flags = _reference_sgdp(
            list(ref.parameters()), state, hyper["lr"], hyper["momentum"], dampening,
            hyper["weight_decay"], nesterov, hyper["eps"], hyper["delta"], hyper["wd_ratio"],
        )  # fmt: skip
        assert [bool(opt.state[p]["projected"]) for p in net.parameters()] == flags
        projected += sum(flags)
    assert projected >= 2 * 25  # conv and the LayerNorm'd linear, every step
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        assert _rel(a.detach(), b.detach()) <= 1e-12


def test_without_projection_they_are_adamw_and_sgd():
    """With delta so small that nothing is ever projected: AdamP is AdamW, SGDP is torch's SGD."""
    pairs = [
        (
            lambda ps: AdamP(ps, lr=1e-2, weight_decay=0.1, delta=1e-300),
            lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=False),
        ),
        (
            lambda ps: SGDP(ps, lr=0.05, momentum=0.9, nesterov=True, delta=1e-300),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, foreach=False),
        ),
    ]
    for make, make_torch in pairs:
        net, ref = _net(), _net()
        opt, opt_ref = make(net.parameters()), make_torch(ref.parameters())
        for t in range(20):
            _grads(net, t)
            _grads(ref, t)
            opt.step()
            opt_ref.step()
        assert not any(bool(s["projected"]) for s in opt.state.values())
        for a, b in zip(net.parameters(), ref.parameters(), strict=True):
            assert _rel(a.detach(), b.detach()) <= 1e-12


def test_unknown_group_keys_are_ignored():
    net = _net()
    opt = AdamP([{"params": list(net.parameters()), "beta3": 0.1, "lr": 3e-3}])
    _grads(net, 0)
    opt.step()
    assert opt.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize("make", [AdamP, SGDP])
def test_step_never_syncs_with_host(make, record_ops):
    net = _net()
    opt = make(net.parameters(), weight_decay=0.1)
    _grads(net, 0)
    opt.step()
    _grads(net, 1)
    with record_ops() as rec:
        opt.step()
    assert rec.ops and "aten._local_scalar_dense.default" not in rec.ops


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (AdamP, {"lr": math.nan}, "Invalid lr: nan; expected a float > 0"),
        (AdamP, {"betas": (0.9, 1.0)}, "Invalid betas[1]: 1; expected a float in [0, 1)"),
        (AdamP, {"eps": 0.0}, "Invalid eps: 0; expected a float > 0"),
        (AdamP, {"weight_decay": -1.0}, "Invalid weight_decay: -1; expected a float >= 0"),
        (AdamP, {"delta": 0.0}, "Invalid delta: 0; expected a float > 0"),
        (AdamP, {"wd_ratio": 1.5}, "Invalid wd_ratio: 1.5; expected a float in [0, 1]"),
        (SGDP, {"lr": -0.1}, "Invalid lr: -0.1; expected a float > 0"),
        (SGDP, {"momentum": 1.0}, "Invalid momentum: 1; expected a float in [0, 1)"),
        (SGDP, {"dampening": -0.1}, "Invalid dampening: -0.1; expected a float in [0, 1]"),
        (
            SGDP,
            {"nesterov": True, "momentum": 0.0},
            "Invalid nesterov=True with momentum=0.0, dampening=0.0; "
            "Nesterov momentum needs momentum > 0 and dampening = 0",
        ),
    ],
)
def test_invalid_hyperparameters(make, kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make([torch.nn.Parameter(torch.ones(2))], **kwargs)
