"""VRAdam's Triton kernels, run by Triton's CPU interpreter (TRITON_INTERPRET=1) on CPU tensors.

Run by tests/optim/test_vradam_triton.py in a subprocess: Triton decorates its own library
functions (``tl.sum``...) when it is first imported, and reads TRITON_INTERPRET then, so the
variable must be set before anything in the process imports triton (torch.compile does).
The interpreter executes each program with numpy, so these tests use few small tensors and a
block of 32 elements: every tensor here is shorter than, or not a multiple of, the block, and a
0-dim parameter (log Z's shape) is among them.
"""

from __future__ import annotations

import math

import pytest
import torch

from optim import VRAdam
from optim import vradam_triton as vt

SHAPES = [(7, 5), (5,), (3, 11), ()]  # 35, 5, 33 and 1 elements: none a multiple of 32
STEPS = 50


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    if not vt.available():
        pytest.skip("triton is not installed")
    if not vt.interpreted():
        pytest.skip("run with TRITON_INTERPRET=1 (tests/optim/test_vradam_triton.py does)")
    monkeypatch.setattr(vt, "BLOCK", 32)


def _problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    """Parameters, and the curvatures and targets of the loss that `_grads` differentiates."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    curv = [torch.rand(s, generator=gen) * 3 + 0.1 for s in SHAPES]
    target = [torch.randn(s, generator=gen) for s in SHAPES]
    return params, curv, target


def _groups(params, **second):
    return [
        {"params": params[:2], "lr": 2e-2},
        {"params": params[2:], "lr": 5e-3, "betas": (0.8, 0.99), "weight_decay": 0.1, **second},
    ]


def _grads(params, curv, target) -> None:
    """New gradient tensors (as backward after zero_grad(set_to_none=True) would give)."""
    for p, c, t in zip(params, curv, target, strict=True):
        x = p.detach().float()  # f = sum 0.5 c (x - t)^2 + 0.1 x^3
        p.grad = (c * (x - t) + 0.3 * x * x).to(p.dtype)


def _run(impl: str, options: dict, dtype=torch.float32, steps: int = STEPS):
    params, curv, target = _problem(dtype)
    opt = VRAdam(_groups(params), impl=impl, beta3=3.0, **options)
    etas = []
    for _ in range(steps):
        _grads(params, curv, target)
        opt.step()
        etas.append(opt.last_lr_tensor.clone())
    return params, opt, torch.stack(etas)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


OPTIONS = [
    {},
    {"velocity": "mean"},
    {"velocity": "precond"},
    {"norm": "group"},
    {"norm": "group", "velocity": "precond", "maximize": True},
    {"norm_source": "grad", "velocity": "mean"},
    {"maximize": True, "weight_decay": 0.05},
    {"norm_timing": "lagged"},
    {"norm_timing": "lagged", "velocity": "precond", "norm": "group"},
]
OPTION_IDS = ["-".join(map(str, o.values())) or "sum" for o in OPTIONS]
CASES = [
    *(f"test_triton_matches_reference[{i}]" for i in OPTION_IDS),
    *(f"test_lagged_matches_hand_written_loop[{i}]" for i in ("reference", "fused", "triton")),
    *(f"test_low_precision_weights_keep_fp32_moments[{d}]" for d in ("float16", "bfloat16")),
    "test_tables_are_cached_while_storage_stays",
    "test_triton_refuses_cpu_tensors_without_the_interpreter",
    "test_step_builds_no_host_data[exact]",
    "test_step_builds_no_host_data[lagged]",
]


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
def test_triton_matches_reference(options):
    """50 steps, two groups of different lr/betas/weight decay, fp32: parameters, moments, eta_t
    and s_t within 1e-6 relative of the reference loop."""
    ref_params, ref_opt, ref_etas = _run("reference", options)
    tri_params, tri_opt, tri_etas = _run("triton", options)
    assert (ref_etas[1:] < torch.tensor([2e-2, 5e-3])).any()  # the gate is active
    assert _rel(tri_etas, ref_etas) <= 1e-6
    assert _rel(tri_opt.last_velocity_measure, ref_opt.last_velocity_measure) <= 1e-6
    for a, b in zip(tri_params, ref_params, strict=True):
        assert a.shape == b.shape
        assert _rel(a.detach(), b.detach()) <= 1e-6
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert _rel(tri_opt.state[a][key], ref_opt.state[b][key]) <= 1e-6


def _hand_written_lagged(theta, curv, steps, lr, betas, beta3, cutoff, eps, wd):
    """Lagged VRAdam on f = sum 0.5 c_i theta_i^2 in Python floats: step t is gated by
    s_{t-1} = ||m_{t-1}||^2 (s_0 = 0), then s_t is measured after the step."""
    b1, b2 = betas
    m, v, s, etas = [0.0] * len(theta), [0.0] * len(theta), 0.0, []
    for t in range(1, steps + 1):
        g = [c * x for c, x in zip(curv, theta, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        eta = lr / (1 + min(beta3 * s, cutoff))
        etas.append(eta)
        theta = [
            x * (1 - eta * wd) - eta * (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps)
            for x, mi, vi in zip(theta, m, v, strict=True)
        ]
        s = sum(mi * mi for mi in m)
    return theta, etas


@pytest.mark.parametrize("impl", ["reference", "fused", "triton"])
def test_lagged_matches_hand_written_loop(impl):
    theta0, curv = [1.5, -0.7, 0.2, 3.0], [0.5, 2.0, 10.0, 1.0]
    hyper = dict(lr=0.05, betas=(0.8, 0.99), beta3=0.3, cutoff=4.0, eps=1e-8, wd=0.05)
    expected, etas = _hand_written_lagged(theta0, curv, STEPS, **hyper)
    assert etas[0] == 0.05 and min(etas) < 0.05 / 2  # step 1 ungated, then the gate acts
    dtype = torch.float32 if impl == "triton" else torch.float64
    tol = 1e-6 if impl == "triton" else 1e-12
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=dtype))
    c = torch.tensor(curv, dtype=dtype)
    opt = VRAdam(
        [p], lr=0.05, betas=(0.8, 0.99), beta3=0.3, lr_cutoff=4.0, weight_decay=0.05,
        norm_timing="lagged", impl=impl,
    )  # fmt: skip
    for eta in etas:
        p.grad = c * p.detach()
        opt.step()
        assert opt.last_lr_tensor.item() == pytest.approx(eta, rel=tol)
    assert _rel(p.detach(), torch.tensor(expected, dtype=torch.float64)) <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_weights_keep_fp32_moments(dtype):
    """bf16/fp16 weights: m and v in fp32; each step is the fp32 rule applied to the stored
    weight and rounded once, as a reference loop on an fp32 copy rounded after each step."""
    if dtype == torch.bfloat16:
        pytest.skip(
            "Triton's CPU interpreter converts float32 to bfloat16 by truncation (1.0 + 0.75 ulp "
            "stores 1.0), not round-to-nearest-even as compiled Triton and torch do; bf16 weights "
            "are checked on CUDA only"
        )
    params, curv, target = _problem(dtype)
    opt = VRAdam(_groups(params), impl="triton", beta3=3.0)
    shadow = [torch.nn.Parameter(p.detach().float()) for p in params]
    ref = VRAdam(_groups(shadow), impl="reference", beta3=3.0)
    for _ in range(10):
        _grads(params, curv, target)
        for s, p in zip(shadow, params, strict=True):
            s.grad = p.grad.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            for s in shadow:
                s.copy_(s.to(dtype).float())
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    for p, s in zip(params, shadow, strict=True):
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), s.detach(), rtol=ulp, atol=1e-6)


def test_tables_are_cached_while_storage_stays():
    params, curv, target = _problem()
    opt = VRAdam(_groups(params), impl="triton")
    _grads(params, curv, target)
    opt.step()
    plan = opt._workspace["triton_plan"]
    for p in params:  # gradients written in place: same storage, same tables
        p.grad.mul_(0.5)
    opt.step()
    assert opt._workspace["triton_plan"] is plan
    _grads(params, curv, target)  # new gradient tensors: the tables follow them
    opt.step()
    assert opt._workspace["triton_plan"] is not plan


def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(vt, "interpreted", lambda: False)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"^VRAdam impl='triton' runs on CUDA tensors; got cpu "):
        VRAdam([p], impl="triton").step()


@pytest.mark.parametrize("timing", ["exact", "lagged"])
def test_step_builds_no_host_data(timing, record_ops):
    """As tests/optim/test_no_host_data.py, for the Triton path: with gradients written in place
    (static storage, as CUDA-graph capture needs) and an LR schedule moving lr before every
    step, a steady step neither builds a tensor from host data nor reads one back."""
    params, curv, target = _problem()
    opt = VRAdam(_groups(params), impl="triton", velocity="precond", norm_timing=timing)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
    _grads(params, curv, target)
    for t in range(3):
        for p, c in zip(params, curv, strict=True):
            p.grad.copy_(c * torch.cos(p.detach() * (t + 1)))
        if t < 2:
            opt.step()
            sched.step()
    with record_ops() as rec, torch.device("meta"):
        opt.step()
    assert rec.ops, "the dispatch mode recorded nothing"
    assert "aten.lift_fresh.default" not in rec.ops
    assert "aten._local_scalar_dense.default" not in rec.ops
    assert rec.devices == {"cpu"}
