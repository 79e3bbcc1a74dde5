"""Per-step stability signals with known answers, warnings, and the monitor config boundary."""

from __future__ import annotations

import re

import pytest
import torch

from kinetic.stability.monitors import MonitorConfig, StabilityMonitor
from optim.vradam import VRAdam

SPECTRUM = torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.3, 0.2, 0.1], dtype=torch.float64)


def _quadratic(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = len(SPECTRUM)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(SPECTRUM) @ q.T


def _run(monitor: StabilityMonitor, opt, loss_fn, steps: int, start: int = 1) -> None:
    """The loop's monitor protocol: backward, grad norm, before_step, step, after_step."""
    params = monitor.params
    for step in range(start, start + steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        monitor.before_step(step)
        opt.step()
        monitor.after_step(step, loss, grad_norm)


def _gd_on_quadratic(lr: float, every: int = 1) -> dict[str, float]:
    a = _quadratic()
    x = torch.nn.Parameter(torch.ones(len(SPECTRUM), dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=lr)
    monitor = StabilityMonitor(MonitorConfig(every=every, oscillation_window=10), opt)
    loss_fn = lambda: 0.5 * x @ a @ x  # noqa: E731
    _run(monitor, opt, loss_fn, 40)
    monitor.scalars()  # the transient: the slow modes take a while to dominate below 2/lambda
    _run(monitor, opt, loss_fn, 40, start=41)
    return monitor.scalars()


@pytest.mark.parametrize("every", [1, 4])
def test_gd_above_two_over_lambda_is_flagged_as_oscillating(every):
    values = _gd_on_quadratic(lr=2.1 / 10.0, every=every)
    assert values["stability/update_cos"] == pytest.approx(-1.0, abs=1e-3)
    assert values["stability/oscillating"] == 1.0
    assert values["stability/sign_flip_frac"] > 0.99


@pytest.mark.parametrize("lr", [1.0 / 10.0, 1.5 / 10.0])
def test_gd_below_two_over_lambda_is_not(lr):
    values = _gd_on_quadratic(lr=lr)
    assert values["stability/update_cos"] > 0.9
    assert values["stability/oscillating"] == 0.0
    assert values["stability/sign_flip_frac"] < 0.05  # a coordinate may cross zero once


def test_update_to_weight_ratio_and_vradam_scalars():
    w = torch.nn.Parameter(torch.full((4,), 2.0))
    opt = VRAdam([w], lr=0.1, beta3=1.0)
    monitor = StabilityMonitor(MonitorConfig(every=1), opt)
    _run(monitor, opt, lambda: w.sum(), 2)
    values = monitor.scalars()
    # One Adam step with a constant gradient moves every coordinate by eta_t (bias-corrected).
    eta = float(opt.last_lr_tensor[0])
    weight_norm = float(torch.linalg.vector_norm(w.detach()))
    assert values["stability/update_to_weight"] == pytest.approx(2 * eta / weight_norm, rel=1e-5)
    assert values["stability/update_cos"] == pytest.approx(1.0)
    assert values["stability/eta_ratio"] == pytest.approx(eta / 0.1, rel=1e-6)
    assert values["stability/velocity_norm"] == pytest.approx(
        float(opt.last_velocity_measure[0].sqrt()), rel=1e-6
    )


def _spike_monitor(window: int = 10) -> tuple[StabilityMonitor, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.zeros(1))
    monitor = StabilityMonitor(
        MonitorConfig(window=window, spike_z=6.0, warn_every=100), torch.optim.SGD([w], lr=0.1)
    )
    return monitor, w


def test_spike_z_score_against_the_window():
    monitor, _ = _spike_monitor(window=10)
    history = [1.0, 2.0] * 5  # mean 1.5, sample std sqrt(10/36)
    for step, value in enumerate([*history, 11.0], start=1):
        monitor.after_step(step, torch.tensor(value), torch.tensor(1.0))
    values = monitor.scalars()
    std = (10 / 36) ** 0.5
    assert values["stability/loss_z"] == pytest.approx((11.0 - 1.5) / std)
    assert values["stability/grad_norm_z"] == pytest.approx(0.0)
    lines = monitor.warnings(11, values)
    assert len(lines) == 1 and lines[0].startswith("loss spike: z = 18.0 against the last 10 steps")
    assert monitor.warnings(50, values) == []  # at most once per warn_every steps
    assert len(monitor.warnings(111, values)) == 1


def test_warnings_for_oscillation_and_edge_of_stability():
    monitor, _ = _spike_monitor()
    values = {"stability/oscillating": 0.5, "stability/update_cos": -0.8}
    values |= {"stability/eos_ratio": 1.5, "stability/eos_threshold": 380.0}
    assert monitor.warnings(100, values) == [
        "oscillation: the mean cosine of the last 20 successive updates is below "
        "monitor.oscillation_cos=-0.5 (interval mean -0.800)",
        "edge of stability: sharpness is 1.50x the stability threshold 380",
    ]


def test_config_defaults_match_the_yaml():
    from omegaconf import OmegaConf

    node = OmegaConf.load("configs/monitor/default.yaml")
    assert MonitorConfig.from_dict(node) == MonitorConfig()
    off = MonitorConfig.from_dict(OmegaConf.load("configs/monitor/off.yaml"))
    assert (off.every, off.sharpness_every, off.nonfinite) == (0, 0, False)


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        ({"evry": 1}, ValueError, "Unknown key monitor.evry; valid: every, window, spike_z, "
         "oscillation_cos, oscillation_window, warn_every, sharpness, nonfinite"),
        ({"sharpness": {"iter": 3}}, ValueError,
         "Unknown key monitor.sharpness.iter; valid: every, iters"),
        ({"sharpness": 5}, TypeError,
         "Invalid monitor.sharpness: 5; expected a mapping of every, iters"),
        ({"every": -1}, ValueError, "Invalid monitor.every: -1; expected an int >= 0"),
        ({"every": 1.5}, TypeError, "Invalid monitor.every: 1.5; expected an int >= 0"),
        ({"window": 1}, ValueError, "Invalid monitor.window: 1; expected an int >= 2"),
        ({"spike_z": float("nan")}, ValueError,
         "Invalid monitor.spike_z: nan; expected a float in [0.0, inf]"),
        ({"oscillation_cos": -2}, ValueError,
         "Invalid monitor.oscillation_cos: -2; expected a float in [-1.0, 1.0]"),
        ({"oscillation_cos": "low"}, TypeError,
         "Invalid monitor.oscillation_cos: 'low'; expected a float in [-1.0, 1.0]"),
        ({"sharpness": {"iters": 0}}, ValueError,
         "Invalid monitor.sharpness.iters: 0; expected an int >= 1"),
        ({"nonfinite": {"enabled": "yes"}}, TypeError,
         "Invalid monitor.nonfinite.enabled: 'yes'; expected true or false"),
        ({"nonfinite": {"max_consecutive": 0}}, ValueError,
         "Invalid monitor.nonfinite.max_consecutive: 0; expected an int >= 1"),
    ],
)  # fmt: skip
def test_config_validation_messages(node, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        MonitorConfig.from_dict(node)
