"""Per-step stability signals with known answers, warnings, and the monitor config boundary."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kinetic.errors import ConfigError
from kinetic.stability.monitors import (
    MonitorConfig,
    SharpnessConfig,
    StabilityMonitor,
    spike_z_scores,
    velocity_scalars,
)
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
    # VRAdam's gate is the loop's optim/ scalars, not repeated under stability/.
    assert not any("eta" in k or "velocity" in k for k in values)
    velocity = {k: float(v) for k, v in velocity_scalars(opt, 0.1).items()}
    assert velocity["eta"] == pytest.approx(eta, rel=1e-6)
    assert velocity["eta_ratio"] == pytest.approx(eta / 0.1, rel=1e-6)
    # two steps with gradient 1: m_2 = 1 - beta1^2 in each of the 4 coordinates
    assert velocity["velocity_norm"] == pytest.approx((1 - 0.9**2) * 2.0, rel=1e-6)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


# Recorded from default-config runs (seed 0): the loss of an 8x8 HyperGrid run (VRAdam) at its
# first 60 steps and around step 2,900 (converged, numerical noise near 1e-10; a standard-
# deviation z-score over 50 steps reaches 6.8 there); and AdamW at lr 0.03 with a constant
# schedule: its first 60 steps, and steps 541-606, where a loss that had collapsed to 1e-11
# jumps to O(1) for good at step 596 (loss and gradient norm).
HG_START = _floats(
    "3.68, 3.4, 3.19, 2.32, 4.55, 2.59, 3, 5.22, 5.13, 3.5, 2.23, 0.861, 2.99, 3.15, 3.48, "
    "0.992, 1.04, 1.25, 2.47, 1.67, 1.07, 1.65, 1.39, 0.827, 1.25, 2.51, 0.393, 1.02, 0.884, "
    "0.626, 0.28, 0.699, 1.11, 0.367, 0.68, 0.659, 0.172, 0.538, 0.597, 0.269, 0.265, 0.2, "
    "0.421, 0.393, 0.254, 0.325, 0.138, 0.373, 0.243, 0.14, 0.164, 0.176, 0.147, 0.073, 0.0669, "
    "0.219, 0.0707, 0.267, 0.0989, 0.073"
)
HG_CONVERGED = _floats(
    "2.53e-12, 1.14e-10, 1.52e-10, 9.59e-11, 4.44e-11, 8.02e-11, 1.99e-10, 5.32e-11, 1.58e-12, "
    "6.46e-11, 6.47e-11, 4.68e-11, 6.75e-11, 4.62e-11, 3.7e-11, 8.06e-11, 6.16e-11, 4.35e-11, "
    "1.07e-11, 7.29e-11, 2.46e-11, 1.25e-10, 1.02e-10, 8.12e-11, 3.42e-10, 1.49e-11, 4.99e-11, "
    "7.35e-11, 4.64e-11, 1.38e-10, 5.31e-11, 1.58e-11, 1.08e-10, 1.21e-10, 9.31e-11, 8.9e-11, "
    "7.32e-11, 3.31e-11, 8.08e-11, 8.84e-11, 9.98e-12, 7.53e-11, 7.44e-11, 2.33e-11, 3.44e-11, "
    "7.31e-11, 8.69e-12, 1.1e-10, 9.62e-11, 1.77e-11, 6.41e-12, 3.65e-11, 4.54e-10, 1.35e-10, "
    "1.39e-10, 1.54e-10, 2.72e-11, 4.05e-10, 1.07e-10, 9.82e-11, 4.61e-12, 1.69e-10, 1.6e-10, "
    "2.62e-12, 5.15e-11, 2.59e-11, 9.06e-11, 1.44e-10, 7.05e-11, 4.8e-11, 3.75e-11, 4.44e-11, "
    "2.8e-11, 4.59e-11, 9.2e-11, 2.01e-12, 8.4e-11, 3.73e-10, 1.51e-11, 5.55e-11, 8.53e-11, "
    "3.77e-11, 9.33e-11, 4.49e-11, 5.78e-11, 5.06e-11, 1.28e-10, 8.25e-11, 3.69e-11, 1.63e-11, "
    "3.11e-12, 2.11e-10, 1.16e-11, 2.09e-12, 6.28e-11, 4.24e-11, 7.18e-11, 4.73e-11, 2.32e-10, "
    "1.29e-11, 1.61e-10, 9.18e-11, 4.7e-11, 3.63e-11, 6.67e-11, 1.26e-10, 3.16e-11, 1.54e-10, "
    "2.23e-11, 3.29e-10, 2.82e-10, 1.84e-11, 3.21e-11, 2.62e-10, 1.45e-10, 1.11e-10, 3.46e-11, "
    "9.64e-11, 5.95e-12, 1.62e-11"
)
DIV_START = _floats(
    "3.68, 2.21, 0.307, 0.891, 0.934, 0.792, 0.646, 0.395, 0.596, 0.264, 0.0925, 0.0853, 0.219, "
    "0.125, 44.2, 1.23e+03, 0.424, 0.307, 0.556, 0.0851, 0.0729, 0.269, 0.381, 0.133, 0.315, "
    "0.212, 0.277, 0.215, 0.235, 0.346, 0.203, 0.254, 0.16, 0.0613, 0.105, 0.115, 0.229, 0.236, "
    "0.297, 0.267, 0.39, 0.199, 0.134, 0.523, 0.062, 0.211, 0.183, 0.355, 0.337, 0.201, 0.211, "
    "0.308, 0.0812, 0.157, 0.285, 0.0899, 0.0758, 0.173, 0.0988, 0.0364"
)
DIV_BLOW_UP = _floats(
    "3.1e-11, 3.9e-11, 1.05e-11, 3.23e-11, 2.57e-11, 9.17e-13, 2.11e-11, 8.26e-12, 1.65e-11, "
    "1.39e-11, 1.07e-11, 8.04e-12, 4.2e-12, 1.59e-11, 9.34e-12, 6.42e-12, 6.49e-12, 2.86e-12, "
    "6.89e-12, 1.37e-11, 3.26e-12, 9.11e-12, 6.27e-12, 9.33e-12, 1e-11, 7.19e-12, 1.32e-11, "
    "5.65e-12, 1.43e-11, 7.58e-12, 9.28e-12, 3.26e-11, 1.12e-11, 3.39e-11, 4.55e-13, 3.74e-11, "
    "3.08e-12, 1.56e-11, 3.17e-11, 6.64e-12, 1.96e-11, 3.66e-12, 2.49e-11, 3.09e-12, 1.96e-11, "
    "2.31e-12, 1.38e-11, 6.9e-12, 6.51e-12, 8.35e-12, 8.85e-12, 1.82e-11, 2.13e-12, 2.04e-12, "
    "1.97e-12, 9.16, 2.38, 0.181, 1.28, 0.5, 0.791, 0.714, 1.18, 0.522, 0.289, 1.57"
)
DIV_START_GRAD = _floats(
    "3.68, 10.1, 4.62, 9.34, 14.8, 8.02, 8.6, 1.76, 9.5, 3.86, 0.833, 1.69, 4.14, 2.49, 104, "
    "2.54e+03, 4.19, 3.15, 5.03, 1.09, 2.23, 1.71, 3.16, 3.28, 4.17, 1.46, 1.51, 4.99, 6.79, "
    "1.87, 3.86, 5.92, 2.46, 1.26, 2.99, 3.75, 7.82, 1.57, 4.04, 3.21, 6.6, 1.77, 4.12, 11.7, "
    "1.87, 6.64, 6.08, 9.05, 5.71, 4.21, 5.4, 8.55, 0.737, 6.15, 8.86, 3.06, 2.91, 6.65, 5, "
    "1.87"
)
DIV_BLOW_UP_GRAD = _floats(
    "3.03e-05, 6.37e-05, 3.38e-05, 4.12e-05, 6.08e-05, 3.1e-06, 5.55e-05, 2.16e-05, 2.51e-05, "
    "2.72e-05, 3.17e-05, 1.86e-05, 1.56e-05, 5.67e-05, 3.48e-05, 1.98e-05, 2.6e-05, 9.24e-06, "
    "1.63e-05, 3.68e-05, 7.73e-06, 4.13e-05, 2.6e-05, 3.25e-05, 3.71e-05, 9.5e-06, 3.85e-05, "
    "3.57e-05, 5.48e-05, 3.33e-05, 2.35e-05, 8.11e-05, 3.17e-05, 7.71e-05, 4.1e-06, 8.54e-05, "
    "1.22e-05, 4.64e-05, 5.65e-05, 2.71e-05, 7.24e-05, 1.94e-05, 7.2e-05, 9.75e-06, 6.67e-05, "
    "1.11e-05, 4.79e-05, 3.59e-05, 3.29e-05, 3.31e-05, 1.25e-05, 4.51e-05, 6.93e-06, 1.72e-05, "
    "5.38e-06, 44.4, 27, 4.76, 10.6, 9.35, 7.2, 15.1, 5.84, 11.5, 2.17, 8.77"
)


def _spike_monitor(**overrides) -> StabilityMonitor:
    w = torch.nn.Parameter(torch.zeros(1))
    cfg = MonitorConfig(**({"window": 50, "warn_every": 100} | overrides))
    return StabilityMonitor(cfg, torch.optim.SGD([w], lr=0.1), interval=500)


def _feed(monitor: StabilityMonitor, losses, grad_norms=None) -> dict[str, float]:
    """Record a loss (and gradient-norm) sequence as the loop would; the signals over it."""
    grad_norms = [1.0] * len(losses) if grad_norms is None else grad_norms
    for step, (loss, norm) in enumerate(zip(losses, grad_norms, strict=True), start=1):
        monitor.after_step(step, torch.tensor(loss), torch.tensor(norm))
    return monitor.scalars()


def _std_z_max(x: list[float], window: int = 50) -> float:
    """The largest (x_t - mean) / std over the `window` steps before t (the plain z-score)."""
    t = torch.tensor(x, dtype=torch.float64)
    return max(
        float((t[i] - t[i - window : i].mean()) / t[i - window : i].std())
        for i in range(window, len(t))
    )


def test_spike_z_scores_closed_form_on_a_log_scale():
    """History 1, 2, 4, 8: lower median 2, |log(x / 2)| = ln2 x (1, 0, 1, 2), so MAD = ln 2;
    the next value 2^10 lies 9 ln 2 above the median: z = 9 / 1.4826 (asinh is a log here,
    x / eps >= 5,000)."""
    x = torch.tensor([[1.0], [2.0], [4.0], [8.0], [1024.0]], dtype=torch.float64)
    z, reference = spike_z_scores(x, window=4, last=1, floor=1e-4, reference=torch.zeros(1))
    assert float(z[0, 0]) == pytest.approx(9 / 1.4826, rel=1e-6)
    assert float(reference[0]) == 2.0  # the largest window median so far


def test_spike_z_scores_below_the_noise_floor_are_flat():
    """With a reference loss of 1 and floor 1e-4 (eps = 1e-4), values near 1e-10 sit on the
    linear part of asinh (s = x / eps): the MAD is ~1e-6, so sigma is the smallest one (0.1),
    and a jump from the median 1e-10 to 1e-7 scores (1e-7 - 1e-10) / 1e-4 / 0.1 = 0.01; a jump
    to 1 (asinh(1e4) = ln(2e4) = 9.9) is a spike."""
    history = [1e-10, 3e-10, 2e-10, 1e-10]
    for last, expected in ((1e-7, (1e-7 - 1e-10) / 1e-4 / 0.1), (1.0, math.log(2e4) / 0.1)):
        x = torch.tensor([*history, last], dtype=torch.float64)[:, None]
        z, _ = spike_z_scores(x, window=4, last=1, floor=1e-4, reference=torch.ones(1))
        assert float(z[0, 0]) == pytest.approx(expected, rel=1e-3)


def test_spike_z_scores_of_a_negative_loss():
    x = torch.tensor([-5.0, -4.0, -6.0, -5.0, -5.5, 50.0], dtype=torch.float64)[:, None]
    z, _ = spike_z_scores(x, window=4, last=2, floor=1e-4, reference=torch.zeros(1))
    assert abs(float(z[0, 0])) < 1.0 and float(z[1, 0]) > 8.0


def test_monitor_reports_the_closed_form_z_score():
    monitor = _spike_monitor(window=4, spike_steps=1, spike_z=6.0)
    values = _feed(monitor, [1.0, 2.0, 4.0, 8.0, 1024.0])
    assert values["stability/loss_z"] == pytest.approx(9 / 1.4826, rel=1e-5)
    assert values["stability/grad_norm_z"] == 0.0  # a constant gradient norm
    lines = monitor.warnings(5, values)
    assert lines == [
        "loss spike: robust z >= 6.1 (log scale) for 1 step against the last 4 steps "
        "(monitor.spike_z=6)"
    ]
    assert monitor.warnings(50, values) == []  # at most once per warn_every steps
    assert len(monitor.warnings(105, values)) == 1


def test_converged_hypergrid_noise_is_not_a_spike():
    """The recorded converged loss that the plain z-score flags is quiet: on a log scale its
    spread is steady, and it lies far below the noise floor of a run that started near 1."""
    assert _std_z_max(HG_CONVERGED) > 6.0  # what used to warn
    values = _feed(_spike_monitor(), HG_START + HG_CONVERGED)
    assert values["stability/loss_z"] < 4.0
    assert _spike_monitor().warnings(180, values) == []


def test_noise_floor_silences_a_burst_at_1e_10():
    """Converged noise at 1e-10 with a three-step burst to 1e-7: noise for a run whose loss
    started at 1 (floor 1e-4), a spike on a pure log scale (floor 0)."""
    g = torch.Generator().manual_seed(0)
    start = (torch.randn(60, generator=g, dtype=torch.float64) * 0.3).exp().tolist()  # ~1
    noise = (torch.randn(120, generator=g, dtype=torch.float64) * 0.5).exp() * 1e-10
    noise[100:103] = 1e-7
    losses = start + noise.tolist()
    assert _feed(_spike_monitor(), losses)["stability/loss_z"] < 1.0
    assert _feed(_spike_monitor(spike_floor=0.0), losses)["stability/loss_z"] > 8.0


def test_a_single_outlying_batch_is_not_a_spike_two_in_a_row_are():
    """Heavy-tailed losses: lognormal noise with one batch 10,000x the median scores high for
    one step only; spike_steps=2 needs two such steps in a row."""
    g = torch.Generator().manual_seed(1)
    losses = ((torch.randn(120, generator=g, dtype=torch.float64) * 0.7).exp() * 0.1).tolist()
    one = [*losses[:100], 1000.0, *losses[101:]]
    two = [*losses[:100], 1000.0, 1000.0, *losses[102:]]
    assert _feed(_spike_monitor(spike_steps=1), one)["stability/loss_z"] > 8.0
    assert _feed(_spike_monitor(), one)["stability/loss_z"] < 8.0
    assert _feed(_spike_monitor(), two)["stability/loss_z"] > 8.0


def test_adamw_blow_up_at_lr_0_03_warns():
    """The recorded blow-up at step 596 is far past the threshold, for the loss and the
    gradient norm alike."""
    monitor = _spike_monitor()
    values = _feed(monitor, DIV_START + DIV_BLOW_UP, DIV_START_GRAD + DIV_BLOW_UP_GRAD)
    assert values["stability/loss_z"] > 50.0
    assert values["stability/grad_norm_z"] > 50.0
    lines = monitor.warnings(126, values)
    assert [line.split(":")[0] for line in lines] == ["loss spike", "gradient norm spike"]


def test_warnings_for_oscillation_and_edge_of_stability():
    monitor = _spike_monitor()
    values = {"stability/oscillating": 0.5, "stability/update_cos": -0.8}
    values |= {"stability/eos_ratio": 1.5, "stability/eos_threshold": 380.0}
    assert monitor.warnings(100, values) == [
        "oscillation: the mean cosine of 20 successive updates fell below "
        "monitor.oscillation_cos=-0.5 for 50% of this interval's update pairs "
        "(mean cosine over all of the interval's pairs: -0.800)",
        "edge of stability: sharpness is 1.50x the stability threshold 380",
    ]


def test_config_defaults_match_the_yaml():
    from omegaconf import OmegaConf

    node = OmegaConf.load("configs/monitor/default.yaml")
    assert MonitorConfig.from_dict(node) == MonitorConfig()
    off = MonitorConfig.from_dict(OmegaConf.load("configs/monitor/off.yaml"))
    assert (off.every, off.sharpness.every, off.nonfinite.enabled) == (0, 0, False)


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        ({"evry": 1}, ConfigError, "Unknown key monitor.evry; valid: every, window, spike_z, "
         "spike_steps, spike_floor, oscillation_cos, oscillation_window, warn_every, sharpness, "
         "nonfinite"),
        ({"spike_steps": 0}, ConfigError, "Invalid monitor.spike_steps: 0; expected an int >= 1"),
        ({"spike_floor": 2.0}, ConfigError,
         "Invalid monitor.spike_floor: 2; expected a float in [0, 1]"),
        ({"sharpness": {"iter": 3}}, ConfigError,
         "Unknown key monitor.sharpness.iter; valid: every, iters"),
        ({"sharpness": 5}, ConfigError,
         "Invalid monitor.sharpness: 5; expected a mapping of every, iters"),
        ({"every": -1}, ConfigError, "Invalid monitor.every: -1; expected an int >= 0"),
        ({"every": 1.5}, ConfigError, "Invalid monitor.every: 1.5; expected an int >= 0"),
        ({"window": 1}, ConfigError, "Invalid monitor.window: 1; expected an int >= 2"),
        ({"spike_z": float("nan")}, ConfigError,
         "Invalid monitor.spike_z: nan; expected a float in [0, inf]"),
        ({"oscillation_cos": -2}, ConfigError,
         "Invalid monitor.oscillation_cos: -2; expected a float in [-1, 1]"),
        ({"oscillation_cos": "low"}, ConfigError,
         "Invalid monitor.oscillation_cos: 'low'; expected a float in [-1, 1]"),
        ({"sharpness": {"iters": 0}}, ConfigError,
         "Invalid monitor.sharpness.iters: 0; expected an int >= 1"),
        ({"nonfinite": {"enabled": "yes"}}, ConfigError,
         "Invalid monitor.nonfinite.enabled: 'yes'; expected true or false"),
        ({"nonfinite": {"max_consecutive": 0}}, ConfigError,
         "Invalid monitor.nonfinite.max_consecutive: 0; expected an int >= 1"),
    ],
)  # fmt: skip
def test_config_validation_messages(node, error, message):
    """One error type (a ValueError) and one wording, that of every checked key."""
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        MonitorConfig.from_dict(node)


def test_probe_leaves_out_the_threshold_when_the_lr_is_negligible():
    """GD on the quadratic: c = 2, so the threshold is 2 / lr while lr is not negligible; at the
    end of a decay (lr 1e-9 of a run that started at 0.1) only the eigenvalues are reported."""
    a = _quadratic()
    x = torch.nn.Parameter(torch.ones(len(SPECTRUM), dtype=torch.float64))
    opt = torch.optim.SGD([x], lr=0.1)
    monitor = StabilityMonitor(MonitorConfig(sharpness=SharpnessConfig(every=1, iters=30)), opt)
    loss_fn = lambda: 0.5 * x @ a @ x  # noqa: E731
    _run(monitor, opt, loss_fn, 1)
    values = monitor.probe(loss_fn)
    assert values["stability/eos_threshold"] == pytest.approx(2 / 0.1)
    assert values["stability/eos_ratio"] == pytest.approx(10.0 / 20.0, rel=0.01)
    for lr, shown in ((1e-3, True), (1e-9, False)):
        opt.param_groups[0]["lr"] = lr
        _run(monitor, opt, loss_fn, 1, start=2)
        values = monitor.probe(loss_fn)
        assert values["stability/sharpness"] == pytest.approx(10.0, rel=0.01)
        assert ("stability/eos_threshold" in values) is shown
        assert ("stability/eos_ratio" in values) is shown
