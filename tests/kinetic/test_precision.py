"""Mixed precision: bf16 autocast on both tasks' losses, fp16 loss scaling, and how the non-finite
guard treats the steps the gradient scaler skips."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion.task import build_unet
from envs.hypergrid import HyperGrid
from gfn.losses import trajectory_balance
from gfn.policies import GFlowNet, MLPPolicy
from gfn.sampler import sample_trajectories, trajectory_log_probs
from kinetic import Task, TrainConfig, train
from kinetic.precision import OVERFLOW_MIN_SCALE, Precision
from kinetic.stability.guard import NonFiniteGuard
from optim import VRAdam

CONFIGS = "configs"


def test_unknown_precision_names_the_choices():
    with pytest.raises(ValueError, match=re.escape("Unknown precision: 'fp64'; valid: fp32, bf16")):
        Precision("fp64", "cpu")


def test_fp32_is_a_no_op():
    precision = Precision("fp32", "cpu")
    with precision.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32
    assert not precision.scaling and precision.scale() == 1.0 and precision.state_dict() == {}


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _gfn_loss(model: GFlowNet, env: HyperGrid, batch) -> torch.Tensor:
    log_probs = trajectory_log_probs(model, env, batch)
    return trajectory_balance(log_probs.log_pf, log_probs.log_pb, batch.log_rewards, model.log_z)


def _assert_close_grads(low: list, ref: list, rtol: float) -> None:
    for g, r in zip(low, ref, strict=True):
        assert g.dtype == torch.float32  # parameters and their gradients stay fp32
        assert (g - r).norm() <= rtol * r.norm() + 1e-6


def test_bf16_gfn_loss_and_gradients_match_fp32(device):
    """The TB loss under bf16 autocast: an fp32 scalar within bf16's rounding of the fp32 loss,
    fp32 gradients close to fp32's, and a VRAdam step whose state stays fp32."""
    torch.manual_seed(0)
    env = HyperGrid(ndim=2, height=6, device=device)
    model = GFlowNet(MLPPolicy(env.ndim * env.height, env.n_actions, hidden=64)).to(device)
    with torch.no_grad():
        model.log_z.fill_(1.0)
    batch = sample_trajectories(model, env, 64, torch.Generator(device).manual_seed(0))

    loss_fp32 = _gfn_loss(model, env, batch)
    loss_fp32.backward()
    ref = _grads(model)
    model.zero_grad()

    precision = Precision("bf16", device)
    with precision.autocast():
        loss = _gfn_loss(model, env, batch)
    precision.backward(loss, torch.optim.SGD(model.parameters()))
    assert loss.dtype == torch.float32
    loss, loss_fp32 = float(loss.detach()), float(loss_fp32.detach())
    assert abs(loss - loss_fp32) <= 0.02 * loss_fp32
    _assert_close_grads(_grads(model), ref, rtol=0.05)

    optimizer = VRAdam(model.parameters(), lr=1e-3)
    precision.step(optimizer, checked=True)
    for p in model.parameters():
        assert p.dtype == torch.float32
        assert all(s.dtype == torch.float32 for s in optimizer.state[p].values() if s.dim())


def test_bf16_ddpm_loss_and_gradients_match_fp32(device):
    """The ε-MSE of a small UNet under bf16 autocast, against the same step in fp32."""
    torch.manual_seed(0)
    model = build_unet(OmegaConf.load(f"{CONFIGS}/model/unet_tiny.yaml"), 1, 8).to(device)
    g = torch.Generator(device).manual_seed(0)
    x_t = torch.randn(32, 1, 8, 8, generator=g, device=device)
    noise = torch.randn(32, 1, 8, 8, generator=g, device=device)
    t = torch.randint(1000, (32,), generator=g, device=device)

    loss_fp32 = F.mse_loss(model(x_t, t).sample, noise)
    loss_fp32.backward()
    ref = _grads(model)
    model.zero_grad()

    precision = Precision("bf16", device)
    with precision.autocast():
        prediction = model(x_t, t).sample
        assert prediction.dtype == torch.bfloat16  # the convolutions ran in bf16
        loss = F.mse_loss(prediction.float(), noise)
    precision.backward(loss, torch.optim.SGD(model.parameters()))
    loss, loss_fp32 = float(loss.detach()), float(loss_fp32.detach())
    assert abs(loss - loss_fp32) <= 0.02 * loss_fp32
    _assert_close_grads(_grads(model), ref, rtol=0.1)


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 8, generator=g), torch.randn(32, 1, generator=g)

    def loss(self) -> torch.Tensor:
        return F.mse_loss(self.net(self.x).float(), self.y)


def _guarded_step(model, optimizer, precision, guard) -> bool:
    """One step in the loop's order; returns whether the optimizer stepped."""
    with precision.autocast():
        loss = model.loss()
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss, optimizer)
    params = list(model.parameters())
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if not guard.is_finite(loss, grad_norm, params, precision):
        precision.skip(optimizer)
        return False
    precision.step(optimizer, checked=True)
    return True


def test_fp16_scaler_overflows_are_skipped_without_counting_as_divergence():
    """From a scale far too large, the scaled fp16 gradients overflow: each such step is skipped
    with the parameters untouched, halves the scale, and does not count towards the guard's
    limit; once the scale fits, steps apply with the gradients at their true scale."""
    torch.manual_seed(0)
    model = _Regression()
    precision = Precision("fp16", "cpu")
    init_scale = 2.0**40
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    guard = NonFiniteGuard(model.named_parameters(), max_consecutive=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    skipped = 0
    while True:
        before = [p.detach().clone() for p in model.parameters()]
        if _guarded_step(model, optimizer, precision, guard):
            break
        skipped += 1
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert precision.scale() == init_scale / 2**skipped
        assert guard.consecutive == 0 and guard.total_skips == 0 and not guard.exhausted
    assert skipped >= 10 and guard.overflow_skips == skipped

    # The applied step is plain SGD on the true gradient (checked against fp32 autograd).
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(before.pop(0))
    reference = _Regression()
    reference.load_state_dict(model.state_dict())
    reference.loss().backward()
    expected = [p.detach() - 0.1 * p.grad for p in reference.parameters()]
    optimizer.zero_grad()
    assert _guarded_step(model, optimizer, precision, guard)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.allclose(p, e, rtol=0, atol=2e-3)


def test_fp16_nonfinite_loss_still_counts_as_divergence():
    model = _Regression()
    model.y[0] = float("nan")
    precision = Precision("fp16", "cpu")
    guard = NonFiniteGuard(model.named_parameters(), max_consecutive=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not _guarded_step(model, optimizer, precision, guard)
    assert guard.consecutive == 1 and guard.overflow_skips == 0
    assert not _guarded_step(model, optimizer, precision, guard)
    assert guard.exhausted and guard.culprit.startswith("loss")


def test_fp16_overflow_at_unit_scale_counts_as_divergence():
    """Gradients that overflow with no scaling left to remove are not the scaler's business."""
    model = _Regression()
    with torch.no_grad():
        model.net[2].weight.fill_(3e4)  # fp16 activation gradients overflow at any scale >= 1
    precision = Precision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=OVERFLOW_MIN_SCALE)
    guard = NonFiniteGuard(model.named_parameters(), max_consecutive=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not _guarded_step(model, optimizer, precision, guard)
    assert guard.consecutive == 1 and guard.overflow_skips == 0


def test_fp16_without_guard_lets_the_scaler_skip():
    """Without the guard's check, `step(checked=False)` leaves the decision to GradScaler.step."""
    model = _Regression()
    precision = Precision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with precision.autocast():
        loss = model.loss()
    precision.backward(loss, optimizer)
    precision.step(optimizer, checked=False)
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    assert precision.scale() == 2.0**39
    state = precision.state_dict()
    restored = Precision("fp16", "cpu")
    restored.load_state_dict(state)
    assert restored.scale() == 2.0**39


class _RegressionTask(Task):
    """Least squares through an fp16-autocast MLP, for the loop end to end."""

    items_per_step = 32

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.net = _Regression()
        self.model = self.net.net
        self.after: list[int] = []

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, step, model):
        return self.net.loss(), {}

    def after_step(self, step):
        self.after.append(step)

    def evaluate(self, step):
        return {}

    def state_dict(self):
        return self.model.state_dict()


def test_the_loop_in_fp16_skips_overflows_and_finishes_every_step():
    """train() with a scale far too large: the first steps overflow and are skipped (no
    after_step, not counted as non-finite), then all `steps` steps apply and the loss falls."""
    task = _RegressionTask()
    precision = Precision("fp16", "cpu")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.05)
    first = float(task.loss(0, task.model)[0].detach())
    metrics = train(task, optimizer, TrainConfig(steps=30, eval_every=0), precision=precision)
    assert metrics["overflow_skips"] >= 10 and metrics["nonfinite_skips"] == 0
    assert task.after == list(range(1, 31))  # each applied step once, skipped ones never
    assert metrics["loss"] < first
    assert precision.scale() < 2.0**40


def test_the_loop_autocasts_the_loss_in_bf16():
    task = _RegressionTask()
    seen = []
    original = task.net.loss

    def loss(step, model):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(), {}

    task.loss = loss
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.05)
    train(task, optimizer, TrainConfig(steps=3, eval_every=0), precision="bf16")
    assert seen == [True] * 3
    assert all(p.dtype == torch.float32 for p in task.model.parameters())


def test_bf16_on_a_cpu_without_bf16_instructions_warns_in_one_line(monkeypatch):
    import kinetic.precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: False)
    assert Precision("bf16", "cpu").warning() == (
        "precision=bf16 on this CPU (no AVX512-BF16 or AMX) is emulated: a DDPM step measured "
        "18x slower than fp32; use precision=fp32"
    )
    assert Precision("fp32", "cpu").warning() is None
    monkeypatch.setattr(precision_module, "cpu_has_bf16", lambda: True)
    assert Precision("bf16", "cpu").warning() is None


def test_bf16_detection_sees_an_instruction_set_without_bf16():
    """oneDNN restricted to AVX2 (no AVX512-BF16, no AMX) has no native bf16, on any x86 CPU."""
    import platform
    import subprocess
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ONEDNN_MAX_CPU_ISA=AVX2 restricts x86 CPUs only")
    code = "from kinetic.precision import cpu_has_bf16; print(cpu_has_bf16())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
