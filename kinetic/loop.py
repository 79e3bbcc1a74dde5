"""The one training loop. A task plugs in a batch and its loss, an evaluation and its images.

Each step reads top to bottom in phases: batch -> loss -> backward -> guard -> clip -> monitors
-> step -> schedule -> log -> evaluate; a checkpoint at the end (and when the guard stops a run).
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from kinetic.checkpoint import save_checkpoint
from kinetic.logging import RunLogger
from kinetic.schedule import build_schedule
from kinetic.stability.guard import NonFiniteError, NonFiniteGuard
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor, velocity_scalars


class Task(Protocol):
    """What the loop needs from a task (GFlowNet, DDPM, ...).

    Optional hooks, used when a task defines them: `after_step(step)` runs after every optimizer
    step (e.g. an EMA of the weights); `lr_schedule(optimizer)` returns the task's own LR
    scheduler in place of `cfg.train.lr_schedule`; `progress_keys` names the evaluation metrics
    shown beside the progress bar; `probe_loss(step)` returns a loss for the sharpness probe
    (default: `loss(step)` with the task's `generator` state restored afterwards).
    """

    model: torch.nn.Module
    items_per_step: int  # trajectories or images consumed by one step, for throughput
    items_name: str  # "trajectories", "images"

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer (e.g. log Z with its own learning rate)."""

    def loss(self, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Make a batch and return its loss and extra scalars to log (device tensors)."""

    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluation metrics, logged under `eval/`."""

    def images(self, step: int) -> dict[str, np.ndarray]:
        """Images to log at evaluation, (H, W, 3) in [0, 1]; may be empty."""

    def state_dict(self) -> dict[str, Any]: ...


def _build_monitors(
    cfg: DictConfig, task: Task, optimizer: torch.optim.Optimizer
) -> tuple[StabilityMonitor | None, NonFiniteGuard | None]:
    """The stability monitor and the non-finite guard from `cfg.monitor` (None when off or
    absent, so that `monitor=off` costs nothing)."""
    node = cfg.get("monitor")
    if node is None:
        return None, None
    mc = MonitorConfig.from_dict(node)
    monitor = None
    if mc.every > 0 or mc.sharpness_every > 0:
        monitor = StabilityMonitor(mc, optimizer, interval=cfg.train.log_every)
    guard = None
    if mc.nonfinite:
        guard = NonFiniteGuard(task.model.named_parameters(), mc.max_consecutive)
    return monitor, guard


def _probe_loss(task: Task, step: int) -> Tensor:
    """A fresh loss graph for the sharpness probe, drawn without moving the run's random streams.

    A task may define `probe_loss(step)` with no side effects (the GFlowNet task does);
    otherwise this calls `task.loss(step)` and restores `task.generator` and torch's global CPU
    generator afterwards, so the training batches are the ones an unprobed run would draw; other
    side effects of that `task.loss` call remain.
    """
    if hasattr(task, "probe_loss"):
        return task.probe_loss(step)
    generator = getattr(task, "generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    global_state = torch.random.get_rng_state()
    try:
        return task.loss(step)[0]
    finally:
        torch.random.set_rng_state(global_state)
        if saved is not None:
            generator.set_state(saved)


def _checkpoint(
    task: Task, optimizer: torch.optim.Optimizer, cfg: DictConfig, logger: RunLogger, step: int
) -> Path:
    path = Path(logger.run_dir) / "checkpoint.pt"
    save_checkpoint(
        path,
        model=task.state_dict(),
        optimizer=optimizer.state_dict(),
        step=step,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    return path


def train(
    task: Task,
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    logger: RunLogger,
) -> dict[str, float]:
    """Run `cfg.train.steps` optimisation steps; returns the final metrics (also in metrics.json).

    `cfg.train`: steps, log_every, eval_every, clip_grad_norm (0 = off), lr_schedule
    (constant | linear | cosine) and warmup_steps. `cfg.monitor` (optional): the stability
    monitors and the non-finite guard (kinetic/stability/). The resolved `cfg`
    goes into the checkpoint written at the end.

    A step whose loss or gradients are not finite is skipped when the guard is on: no optimizer
    step, no schedule step, no `after_step`, and the step number does not advance, so the next
    iteration draws a new batch for the same step. Raises `NonFiniteError` (after writing a
    checkpoint) once `monitor.nonfinite.max_consecutive` steps in a row were skipped.
    """
    tc = cfg.train
    if hasattr(task, "lr_schedule"):
        schedule = task.lr_schedule(optimizer)
    else:
        schedule = build_schedule(optimizer, tc.lr_schedule, tc.warmup_steps, tc.steps)
    after_step = getattr(task, "after_step", None)
    progress_keys = getattr(task, "progress_keys", ())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    monitor, guard = _build_monitors(cfg, task, optimizer)
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    eval_time = 0.0  # excluded from the throughput
    window_start, window_eval = start, 0.0
    step = 1
    while step <= tc.steps:
        # Batch: sample one and score it.
        loss, extras = task.loss(step)

        # Backward, then the gradient norm (a device tensor: no sync). The norm is a pass over
        # every gradient, so it is skipped on steps where nothing (clip, guard, monitor, log)
        # needs it.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logging_step = step % tc.log_every == 0 or step == tc.steps
        if tc.clip_grad_norm > 0 or logging_step or guard is not None or monitor is not None:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )

        # Guard: skip a non-finite step before it touches the parameters (one host sync).
        if guard is not None and not guard.is_finite(loss, grad_norm, params):
            logger.scalars(step, {"stability/nonfinite_skips": float(guard.total_skips)})
            if guard.exhausted:
                path = _checkpoint(task, optimizer, cfg, logger, step - 1)
                raise NonFiniteError(guard.stop_message(step, str(path)))
            continue

        # Clip.
        if tc.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, tc.clip_grad_norm, grad_norm)

        # Step (the monitor remembers theta_{t-1} just before it), schedule, task hooks.
        if monitor is not None:
            monitor.before_step(step)
        lr = optimizer.param_groups[0]["lr"]  # this step's alpha_0, before the schedule moves it
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        logger.progress(1)

        # Monitors: update cosine, sign flips, spikes (device ops, no sync); the sharpness
        # probe when due (syncs, 2 * iters Hessian-vector products).
        stability: dict[str, float] = {}
        if monitor is not None:
            monitor.after_step(step, loss, grad_norm)
            if monitor.probe_due(step):
                stability |= monitor.probe(functools.partial(_probe_loss, task, step))

        # Log: float() syncs with the device, so only every log_every steps.
        if logging_step:
            now = time.perf_counter()
            steps_in_window = (step - 1) % tc.log_every + 1
            rate = (
                steps_in_window * task.items_per_step / max(now - window_start - window_eval, 1e-9)
            )
            scalars = {"train/loss": loss.detach(), "train/grad_norm": grad_norm, **extras}
            scalars["train/lr"] = lr
            scalars |= {f"optim/{k}": v for k, v in velocity_scalars(optimizer, lr).items()}
            scalars = {k: float(v) for k, v in scalars.items()}
            scalars[f"perf/{task.items_name}_per_sec"] = rate
            if monitor is not None:
                stability |= monitor.scalars()
            if guard is not None:
                stability["stability/nonfinite_skips"] = float(guard.total_skips)
            logger.scalars(step, scalars | stability)
            logger.postfix(loss=scalars["train/loss"])
            window_start, window_eval = now, 0.0
        if monitor is not None and stability:
            for line in monitor.warnings(step, stability):
                logger.warn(step, line)

        # Evaluate (not counted in the training throughput).
        if step % tc.eval_every == 0 or step == tc.steps:
            eval_start = time.perf_counter()
            metrics = task.evaluate(step)
            logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            for tag, image in task.images(step).items():
                logger.image(step, f"eval/{tag}", image)
            logger.postfix(**{k: metrics[k] for k in progress_keys if k in metrics})
            spent = time.perf_counter() - eval_start
            eval_time += spent
            window_eval += spent
        step += 1

    # Checkpoint, and the final metrics.
    wall = time.perf_counter() - start
    items = tc.steps * task.items_per_step
    final = {
        **metrics,
        "loss": float(loss.detach()),
        "steps": float(tc.steps),
        task.items_name: float(items),
        f"{task.items_name}_per_sec": items / max(wall - eval_time, 1e-9),
        "wall_time_s": wall,
    }
    if guard is not None:
        final["nonfinite_skips"] = float(guard.total_skips)
    logger.write_metrics(final)
    _checkpoint(task, optimizer, cfg, logger, tc.steps)
    if not math.isfinite(final["loss"]):
        raise FloatingPointError(f"training ended with a non-finite loss ({final['loss']})")
    return final
