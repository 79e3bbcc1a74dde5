"""Stability monitors: cheap per-step signals of oscillation and spikes, and a periodic sharpness
probe, logged under `stability/` with rate-limited console warnings.

Per step (device tensors only, no host sync): the cosine between successive updates u_t and
u_{t-1} (persistently negative = a two-step oscillation), the fraction of coordinates whose
update changed sign, ||u_t|| / ||theta_{t-1}||, robust z-scores of the loss and the gradient norm
against a rolling window (spikes; see `spike_z_scores`), and VRAdam's eta_t / alpha_0 and
||m_t||. Every `sharpness.every` steps: lambda_max of the Hessian and of the preconditioned
Hessian against the stability threshold (kinetic/stability/sharpness.py). The non-finite guard
lives in kinetic/stability/guard.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from kinetic.stability.sharpness import preconditioner, sharpness
from optim.protocol import VelocityGated
from optim.validation import ConfigError, check_bool, check_float, check_int

__all__ = [
    "MonitorConfig",
    "NonfiniteConfig",
    "SharpnessConfig",
    "StabilityMonitor",
    "spike_z_scores",
]


@dataclass
class SharpnessConfig:
    """`monitor.sharpness`: the periodic sharpness probe (kinetic/stability/sharpness.py)."""

    every: int = 1500  # steps between probes (top Hessian eigenvalues); 0 = off
    iters: int = 10  # power iterations per eigenvalue (2 x iters Hessian-vector products)


@dataclass
class NonfiniteConfig:
    """`monitor.nonfinite`: the non-finite guard (kinetic/stability/guard.py)."""

    enabled: bool = True  # skip a step whose loss or gradients are NaN/Inf (1 host sync per step)
    max_consecutive: int = 10  # consecutive skipped steps after which the run stops


@dataclass
class MonitorConfig:
    """The `monitor` config group: the one source of its keys, types and defaults, which Hydra
    checks the composed config against (configs/monitor/*.yaml are presets on top) and the
    monitors read. `validate()` checks the ranges; `from_dict` builds one from a mapping."""

    every: int = 5  # update cosine, sign flips, update/weight on steps k-1 and k of every k
    # steps; loss / grad-norm spikes every step; 0 = no per-step signals
    window: int = 50  # steps in the rolling window of the loss / grad-norm spike z-scores
    # Robust z-score that counts as a spike: (s - median) / (1.4826 MAD) over the window, with
    # s = asinh(x / eps) ~ log x (GFlowNet losses are heavy-tailed).
    spike_z: float = 8.0
    spike_steps: int = 2  # consecutive steps above spike_z that make a spike (1: any outlier)
    # Noise floor eps: this share of the largest window median so far; changes below it do not
    # count (a converged loss wandering near 1e-10 is quiet).
    spike_floor: float = 1e-4
    oscillation_cos: float = -0.5  # window-mean update cosine below which the run oscillates
    oscillation_window: int = 20  # measured updates in that mean (persistent, not one step)
    warn_every: int = 100  # steps: at most one console warning per signal in this many steps
    sharpness: SharpnessConfig = field(default_factory=SharpnessConfig)
    nonfinite: NonfiniteConfig = field(default_factory=NonfiniteConfig)

    def validate(self) -> MonitorConfig:
        """Raise `ConfigError` naming the key on a value out of range (or of the wrong type);
        returns self."""
        check_int("monitor.every", self.every, 0)
        check_int("monitor.window", self.window, 2)
        check_float("monitor.spike_z", self.spike_z, 0.0, math.inf)
        check_int("monitor.spike_steps", self.spike_steps, 1)
        check_float("monitor.spike_floor", self.spike_floor, 0.0, 1.0)
        check_float("monitor.oscillation_cos", self.oscillation_cos, -1.0, 1.0)
        check_int("monitor.oscillation_window", self.oscillation_window, 1)
        check_int("monitor.warn_every", self.warn_every, 1)
        check_int("monitor.sharpness.every", self.sharpness.every, 0)
        check_int("monitor.sharpness.iters", self.sharpness.iters, 1)
        check_bool("monitor.nonfinite.enabled", self.nonfinite.enabled)
        check_int("monitor.nonfinite.max_consecutive", self.nonfinite.max_consecutive, 1)
        return self

    @classmethod
    def from_dict(cls, node: Mapping[str, Any]) -> MonitorConfig:
        """A validated `MonitorConfig` from a `monitor` mapping (an OmegaConf node or a dict);
        missing keys take the defaults, an unknown key is refused naming the valid ones."""
        _check_keys(node, cls, "monitor.")
        sub = {}
        for name, schema in (("sharpness", SharpnessConfig), ("nonfinite", NonfiniteConfig)):
            child = node.get(name, {})
            if not isinstance(child, Mapping):
                raise ConfigError(
                    f"Invalid monitor.{name}: {child!r}; expected a mapping of "
                    f"{', '.join(f.name for f in fields(schema))}"
                )
            _check_keys(child, schema, f"monitor.{name}.")
            sub[name] = schema(**child)
        top = {key: value for key, value in node.items() if key not in sub}
        return cls(**top, **sub).validate()


def _check_keys(node: Mapping, schema: type, where: str) -> None:
    valid = [f.name for f in fields(schema)]
    for key in node:
        if key not in valid:
            raise ConfigError(f"Unknown key {where}{key}; valid: {', '.join(valid)}")


_COLUMNS = ("uu", "pp", "dd", "loss", "grad_norm", "paired")  # one ring row per measured step


def velocity_scalars(optimizer: torch.optim.Optimizer, alpha0: float) -> dict[str, Tensor]:
    """VRAdam's eta_t, eta_t / alpha_0 and ||m_t|| of the first group, as device tensors ({} for
    an optimizer without a velocity gate). `alpha0`: the group's lr of the step just taken,
    read before a schedule moved it."""
    if not isinstance(optimizer, VelocityGated) or optimizer.last_lr_tensor is None:
        return {}
    eta, sq = optimizer.last_lr_tensor, optimizer.last_velocity_measure
    return {"eta": eta[0], "eta_ratio": eta[0] / alpha0, "velocity_norm": sq[0].sqrt()}


def _sum_sq(tensors: list[Tensor]) -> Tensor:
    """sum ||x||^2 over a list of tensors (one foreach norm), a 0-d device tensor."""
    return torch.stack(torch._foreach_norm(tensors)).square().sum()


# The step size below which the edge-of-stability threshold is not reported: this share of the
# run's largest lr. VRAdam's gate alone shrinks eta_t at most 1 + lr_cutoff times (11 by default).
NEGLIGIBLE_LR = 1e-3
_MAD_TO_STD = 1.4826  # sigma = 1.4826 * MAD for a normal distribution
# The smallest robust sigma on the log scale: without it a flat window (a deterministic loss,
# or one pinned at the floor) would make any wiggle infinitely significant. With spike_z = 8,
# a jump smaller than e^(8 * 0.1) = 2.2x is never a spike.
_MIN_LOG_SIGMA = 0.1


def spike_z_scores(
    x: Tensor, window: int, last: int, floor: float, reference: Tensor
) -> tuple[Tensor, Tensor]:
    """Robust z-scores of the `last` rows of `x` (m, C), each against the `window` rows before
    it, on the scale s = asinh(x / eps); and the updated `reference` (C,).

    z = (s_t - median(s)) / max(1.4826 * MAD(s), 0.1) over the window. For x >> eps, s is
    log(2 x / eps): a log scale, on which the heavy-tailed losses of GFlowNets (a batch with one
    rare trajectory can score 100x the median) have a steady spread, so z compares ratios, not
    differences, and one outlier in the window does not inflate the scale as it inflates a
    standard deviation. For |x| << eps, s is linear and flat: variations below the noise floor
    eps = floor * reference (reference: the largest |window median| so far, per column) do not
    count, so a converged loss wandering between 1e-12 and 1e-9 is quiet. asinh is defined for
    zero and negative values too. Needs m >= window + last.
    """
    history = x.unfold(0, window, 1)[-last - 1 : -1]  # (last, C, window)
    median = history.median(dim=2).values  # (last, C); the lower median, so asinh commutes
    # A non-finite median (guard off) must not poison the reference for the rest of the run.
    finite = median.abs().nan_to_num(nan=0.0, posinf=0.0)
    reference = torch.maximum(reference, finite.cummax(dim=0).values)  # (last, C)
    eps = (floor * reference).clamp_min(torch.finfo(x.dtype).tiny)  # (last, C)
    center = torch.asinh(median / eps)  # (last, C)
    mad = (torch.asinh(history / eps[..., None]) - center[..., None]).abs().median(dim=2).values
    z = (torch.asinh(x[-last:] / eps) - center) / (_MAD_TO_STD * mad).clamp_min(_MIN_LOG_SIGMA)
    return z, reference[-1]


class StabilityMonitor:
    """Per-step stability signals of one optimizer, and the periodic sharpness probe.

    The loop calls `before_step(step)` just before `optimizer.step()` (to remember theta_{t-1}),
    `after_step(step, loss, grad_norm)` after it, `scalars()` on logging steps (the one host sync)
    and `probe(loss_fn)` when `probe_due(step)`. The update signals are measured on steps k-1
    and k of each block of `every = k` steps (a cosine needs two consecutive updates); the loss
    and gradient norm, for the spike z-scores, on every step.

    Per step the monitor only writes one row of raw quantities (||u_t||^2, ||u_{t-1}||^2,
    ||u_t - u_{t-1}||^2, loss, gradient norm) into a device ring; the cosines, window means and
    z-scores are computed from the ring, vectorised, when `scalars()` is called: on CPU a few
    dozen tiny ops per step would cost more than the passes over the parameters.
    `interval`: the most steps between two `scalars()` calls (it sizes the ring).
    """

    def __init__(
        self, cfg: MonitorConfig, optimizer: torch.optim.Optimizer, interval: int = 100
    ) -> None:
        self.cfg = cfg
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("StabilityMonitor: the optimizer has no trainable parameters")
        p0 = self.params[0]
        # Signals in the parameters' precision, at least float32 (as torch's gradient norms).
        device, dtype = p0.device, torch.promote_types(p0.dtype, torch.float32)
        self.n_coords = sum(p.numel() for p in self.params)
        # Two parameter-sized buffers (the memory cost of the monitor), swapped every measured
        # step: `scratch` takes theta_{t-1} before the step and turns into -u_t after it;
        # `neg_update` then holds -u_t and `scratch` -u_{t-1} until the next `before_step`.
        self.scratch = [torch.zeros_like(p) for p in self.params]
        self.neg_update = [torch.zeros_like(p) for p in self.params]
        self.update_step = -1  # the step whose update `neg_update` holds
        self.pair_step = -1  # the last step whose update and its predecessor are both held
        self.prev_sq = torch.zeros((), dtype=dtype, device=device)  # ||u_{t-1}||^2
        self.one = torch.ones((), dtype=dtype, device=device)
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.alpha0: float | None = None  # the first group's lr of the last step
        self.alpha0_max = 0.0  # the largest first-group lr so far (or the schedule's base)
        self.spike_reference = torch.zeros(2, dtype=dtype, device=device)  # see spike_z_scores
        # The ring of raw rows: the current interval plus the look-back of both windows.
        self.capacity = (
            interval + cfg.window + cfg.spike_steps + cfg.oscillation_window * max(cfg.every, 1)
        )
        self.rows = torch.zeros(self.capacity, len(_COLUMNS), dtype=dtype, device=device)
        self.n_rows = 0  # rows written over the run
        self.n_reported = 0  # rows already summarised by `scalars()`
        self.last_warned: dict[str, int] = {}
        self.probe_seed = 0

    # -- per step ------------------------------------------------------------------------------

    def measures(self, step: int) -> bool:
        """Whether `step`'s update is recorded (the cosine needs two consecutive updates)."""
        every = self.cfg.every
        return every > 0 and (step % every == 0 or step % every == every - 1)

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        """Remember the first group's base learning rate of this step (before a schedule moves
        it) and, on measured steps, theta_{t-1} (a device copy)."""
        group = self.optimizer.param_groups[0]
        self.alpha0 = float(group["lr"])
        self.alpha0_max = max(self.alpha0_max, self.alpha0, float(group.get("initial_lr", 0.0)))
        if self.measures(step):
            torch._foreach_copy_(self.scratch, self.params)

    @torch.no_grad()
    def after_step(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Record step `step`'s raw signals on the device (no host sync); `grad_norm` pre-clip.

        Every step: one ring row (loss and gradient norm for the spike z-scores; a stack and a
        copy). On measured steps also: the copy in `before_step`, one in-place subtraction and,
        on the second step of a pair, one subtraction and one foreach norm (about six passes
        over the parameters in all).
        """
        if self.cfg.every == 0:
            return
        uu = pp = dd = flag = self.zero
        if self.measures(step):
            torch._foreach_sub_(self.scratch, self.params)  # theta_{t-1} - theta_t = -u_t
            paired = step % self.cfg.every == 0 and self.update_step == step - 1
            if paired:  # ||u_t||^2 and ||u_t - u_{t-1}||^2 in one foreach call
                diff = torch._foreach_sub(self.scratch, self.neg_update)
                norms = torch.stack(torch._foreach_norm([*self.scratch, *diff]))  # (2 n,)
                uu, dd = norms.view(2, -1).square().sum(dim=1).unbind()
                pp, flag = self.prev_sq, self.one
            else:
                uu = _sum_sq(self.scratch)
            self.scratch, self.neg_update = self.neg_update, self.scratch
            self.prev_sq, self.update_step = uu, step
            self.pair_step = step if paired else -1
        row = torch.stack((uu, pp, dd, loss.detach().reshape(()), grad_norm, flag))
        self.rows[self.n_rows % self.capacity] = row  # (stack promotes, the copy casts)
        self.n_rows += 1

    # -- logging -------------------------------------------------------------------------------

    def _chronological(self) -> Tensor:
        """The ring's rows in the order they were written, oldest first: (m, n_columns)."""
        m = min(self.n_rows, self.capacity)
        start = self.n_rows - m
        index = [(start + j) % self.capacity for j in range(m)]
        return self.rows[torch.tensor(index, device=self.rows.device)]

    def _interval_signals(self, new: int) -> Tensor:
        """From the ring: over the `new` rows since the last report, the mean update cosine,
        the share of oscillating update pairs, and the largest loss and gradient-norm spike
        scores.

        A pair oscillates when the mean cosine of the last `oscillation_window` pairs ending at
        it is below `oscillation_cos` (persistently negative, not one bad step). A step's spike
        score is the smallest robust z-score (`spike_z_scores`, each step against the `window`
        steps before it) of the `spike_steps` steps ending at it: a single outlying batch, which
        heavy-tailed losses produce now and then, scores low; a loss that stays up scores high.
        Selecting the paired rows syncs with the host; this runs on logging steps only.
        """
        rows = self._chronological()  # (m, C)
        m = rows.shape[0]
        uu, pp, dd, x = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3:5]
        paired = rows[:, 5] > 0  # (m,)
        recent = torch.arange(m, device=rows.device) >= m - new  # (m,)
        # Polarisation: <a, b> = (|a|^2 + |b|^2 - |a - b|^2) / 2.
        cos = (uu + pp - dd) * 0.5 * (uu * pp).clamp_min(1e-30).rsqrt()  # (m,)
        pair_cos, pair_recent = cos[paired], recent[paired]  # (n_pairs,)
        n_recent = pair_recent.sum()
        mean_cos = (pair_cos * pair_recent).sum() / n_recent.clamp_min(1)
        oscillating = torch.zeros((), dtype=rows.dtype, device=rows.device)
        w = self.cfg.oscillation_window
        if pair_cos.shape[0] >= w:
            below = pair_cos.unfold(0, w, 1).mean(dim=1) < self.cfg.oscillation_cos
            oscillating = (below & pair_recent[w - 1 :]).sum() / n_recent.clamp_min(1)
        window, k = self.cfg.window, self.cfg.spike_steps
        z_max = torch.zeros(2, dtype=rows.dtype, device=rows.device)
        scored = min(new, m - window - (k - 1))  # recent rows with a full window and k-1 before
        if scored > 0:
            z, self.spike_reference = spike_z_scores(
                x, window, scored + k - 1, self.cfg.spike_floor, self.spike_reference
            )  # (scored + k - 1, 2)
            z_max = z.unfold(0, k, 1).amin(dim=2).amax(dim=0).clamp_min(0.0)
        parts = [mean_cos, oscillating.to(rows.dtype), n_recent.to(rows.dtype)]
        return torch.cat([torch.stack(parts), z_max])

    def _pair_signals(self) -> Tensor:
        """At a logging step: the share of coordinates whose update changed sign between the last
        two steps, and ||u_t|| / ||theta_t||. Three more passes, so only when logged."""
        # sign(u_t) * u_{t-1} < 0 exactly where the sign flipped (no underflow of a product).
        opposed = torch._foreach_clamp_max(
            torch._foreach_mul(torch._foreach_sign(self.neg_update), self.scratch), 0.0
        )
        flips = torch.stack(torch._foreach_norm(opposed, 0)).sum() / self.n_coords
        ratio = self.prev_sq.sqrt() / _sum_sq(self.params).sqrt().clamp_min(1e-30)
        return torch.stack([flips, ratio]).to(self.rows.dtype)

    def scalars(self) -> dict[str, float]:
        """The signals since the last call, as floats (one host sync).

        Over the interval: update_cos (mean), oscillating (share of update pairs, see
        `_interval_signals`), loss_z and grad_norm_z (largest spike scores); at the last
        measured step:
        sign_flip_frac and update_to_weight (||u_t|| / ||theta_t||). (VRAdam's eta_t / alpha_0
        and ||m_t|| are the loop's `optim/` scalars, `velocity_scalars`, logged with or without
        the monitors.) Call it right after `after_step` (the sign flips read the update
        buffers).
        """
        new = min(self.n_rows - self.n_reported, self.capacity)
        self.n_reported = self.n_rows
        values, names = [], []
        if new > 0:
            values.append(self._interval_signals(new))
            names += ["update_cos", "oscillating", "", "loss_z", "grad_norm_z"]
        if self.pair_step == self.update_step >= 0:  # both updates still in the buffers
            values.append(self._pair_signals())
            names += ["sign_flip_frac", "update_to_weight"]
        if not values:
            return {}
        flat = torch.cat(values).tolist()  # the host sync
        out = {f"stability/{k}": v for k, v in zip(names, flat, strict=True) if k}
        if new > 0 and flat[2] == 0:  # no paired update in the interval: no cosine
            del out["stability/update_cos"]
        return out

    def warnings(self, step: int, values: Mapping[str, float]) -> list[str]:
        """Console lines for signals past their threshold, at most one per signal per
        `warn_every` steps. `values`: what `scalars()` or `probe()` returned."""
        cfg = self.cfg
        found: list[tuple[str, str]] = []
        if values.get("stability/oscillating", 0.0) > 0.0:
            found.append(("oscillation", (
                f"oscillation: the mean cosine of {cfg.oscillation_window} successive updates "
                f"fell below monitor.oscillation_cos={cfg.oscillation_cos:g} for "
                f"{values['stability/oscillating']:.0%} of this interval's update pairs "
                "(mean cosine over all of the interval's pairs: "
                f"{values['stability/update_cos']:.3f})"
            )))  # fmt: skip
        steps = "1 step" if cfg.spike_steps == 1 else f"{cfg.spike_steps} steps in a row"
        for key, what in (("loss_z", "loss"), ("grad_norm_z", "gradient norm")):
            z = values.get(f"stability/{key}", 0.0)
            if z > cfg.spike_z:
                found.append((key, (
                    f"{what} spike: robust z >= {z:.1f} (log scale) for {steps} against the "
                    f"last {cfg.window} steps (monitor.spike_z={cfg.spike_z:g})"
                )))  # fmt: skip
        ratio = values.get("stability/eos_ratio", 0.0)
        if ratio > 1.0:
            found.append(("eos", (
                f"edge of stability: sharpness is {ratio:.2f}x the stability threshold "
                f"{values['stability/eos_threshold']:.4g}"
            )))  # fmt: skip
        lines = []
        for signal, text in found:
            last = self.last_warned.get(signal)
            if last is None or step - last >= cfg.warn_every:
                self.last_warned[signal] = step
                lines.append(text)
        return lines

    # -- sharpness -----------------------------------------------------------------------------

    def probe_due(self, step: int) -> bool:
        every = self.cfg.sharpness.every
        return every > 0 and step % every == 0

    def probe(self, loss_fn: Callable[[], Tensor]) -> dict[str, float]:
        """lambda_max of H and of the optimizer's preconditioned H, and the latter's ratio to
        the stability threshold (host floats; this syncs, and costs 2 * sharpness.iters
        Hessian-vector products). `loss_fn` builds a fresh loss graph at the current parameters.

        The threshold c / eta and the ratio are left out (not applicable) while the step size
        eta is negligible (`NEGLIGIBLE_LR` of the run's largest lr, e.g. the end of a cosine
        schedule): the threshold grows without bound there and says nothing about the run.
        """
        pre = preconditioner(self.optimizer)
        self.probe_seed += 1
        top, top_pre = sharpness(
            loss_fn, self.params, self.cfg.sharpness.iters, seed=self.probe_seed, precond=pre
        )
        values = {"stability/sharpness": top, "stability/precond_sharpness": top_pre}
        if pre.eta0 > NEGLIGIBLE_LR * self.alpha0_max:
            threshold = pre.constant / pre.eta0
            values |= {
                "stability/eos_threshold": threshold,
                "stability/eos_ratio": top_pre / threshold,
            }
        return values

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that carries from one step to the next: the ring of raw rows and its
        counters, the two update buffers and which steps they hold, ||u_{t-1}||^2, the last and
        the largest alpha_0, the spike scores' reference, the warning times and the probe seed.
        Two parameter-sized copies (the update buffers) plus the ring."""
        return {
            "rows": self.rows.clone(),
            "n_rows": self.n_rows,
            "n_reported": self.n_reported,
            "scratch": [t.clone() for t in self.scratch],
            "neg_update": [t.clone() for t in self.neg_update],
            "update_step": self.update_step,
            "pair_step": self.pair_step,
            "prev_sq": self.prev_sq.clone(),
            "alpha0": self.alpha0,
            "alpha0_max": self.alpha0_max,
            "spike_reference": self.spike_reference.clone(),
            "last_warned": dict(self.last_warned),
            "probe_seed": self.probe_seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` into a monitor built with the same config, optimizer and
        logging interval; raises ValueError when the ring or the parameters differ in shape."""
        if tuple(state["rows"].shape) != tuple(self.rows.shape):
            raise ValueError(
                f"The stability monitor's ring in the checkpoint has shape "
                f"{tuple(state['rows'].shape)}, this one {tuple(self.rows.shape)}: monitor.window, "
                "monitor.every, monitor.oscillation_window or train.log_every changed"
            )
        shapes = [tuple(p.shape) for p in self.params]
        for key in ("scratch", "neg_update"):
            if [tuple(t.shape) for t in state[key]] != shapes:
                raise ValueError(
                    f"The stability monitor's {key} in the checkpoint do not fit the model"
                )
        with torch.no_grad():
            self.rows.copy_(state["rows"])
            torch._foreach_copy_(self.scratch, [t.to(self.rows.device) for t in state["scratch"]])
            torch._foreach_copy_(
                self.neg_update, [t.to(self.rows.device) for t in state["neg_update"]]
            )
            self.prev_sq = state["prev_sq"].to(self.prev_sq)
            self.spike_reference = state["spike_reference"].to(self.spike_reference)
        self.n_rows, self.n_reported = int(state["n_rows"]), int(state["n_reported"])
        self.update_step, self.pair_step = int(state["update_step"]), int(state["pair_step"])
        self.alpha0, self.alpha0_max = state["alpha0"], float(state["alpha0_max"])
        self.last_warned = {str(k): int(v) for k, v in state["last_warned"].items()}
        self.probe_seed = int(state["probe_seed"])
