"""The one training loop. A task plugs in a batch and its loss, an evaluation and its images."""

from __future__ import annotations

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


class Task(Protocol):
    """What the loop needs from a task (GFlowNet, DDPM, ...).

    Optional hooks, used when a task defines them: `after_step(step)` runs after every optimizer
    step (e.g. an EMA of the weights); `lr_schedule(optimizer)` returns the task's own LR
    scheduler in place of `cfg.train.lr_schedule`; `progress_keys` names the evaluation metrics
    shown beside the progress bar.
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


def _optimizer_scalars(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """VRAdam's eta_t / alpha_0 and ||m_t|| of the first group, when the optimizer exposes them."""
    eta = getattr(optimizer, "last_lr_tensor", None)
    sq = getattr(optimizer, "last_velocity_sq_norm", None)
    if eta is None or sq is None:
        return {}
    alpha0 = optimizer.param_groups[0]["lr"]
    return {
        "optim/eta": eta[0],
        "optim/eta_ratio": eta[0] / alpha0,
        "optim/velocity_norm": sq[0].sqrt(),
    }


def train(
    task: Task,
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    logger: RunLogger,
) -> dict[str, float]:
    """Run `cfg.train.steps` optimisation steps; returns the final metrics (also in metrics.json).

    `cfg.train`: steps, log_every, eval_every, clip_grad_norm (0 = off), lr_schedule
    (constant | linear | cosine) and warmup_steps. The resolved `cfg` goes into the checkpoint
    written at the end.
    """
    tc = cfg.train
    if hasattr(task, "lr_schedule"):
        schedule = task.lr_schedule(optimizer)
    else:
        schedule = build_schedule(optimizer, tc.lr_schedule, tc.warmup_steps, tc.steps)
    after_step = getattr(task, "after_step", None)
    progress_keys = getattr(task, "progress_keys", ())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    metrics: dict[str, float] = {}
    start = time.perf_counter()
    eval_time = 0.0  # excluded from the throughput
    window_start, window_eval = start, 0.0
    for step in range(1, tc.steps + 1):
        # Sample a batch and score it.
        loss, extras = task.loss(step)
        # Backward, then the gradient norm (a device tensor: no sync), clipped when asked; the
        # norm is a pass over every gradient, so it is skipped on steps that neither clip nor log.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        logging_step = step % tc.log_every == 0 or step == tc.steps
        if tc.clip_grad_norm > 0 or logging_step:
            grads = [p.grad for p in params if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads)
        if tc.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, tc.clip_grad_norm, grad_norm)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            after_step(step)
        logger.progress(1)

        # Log: float() syncs with the device, so only every log_every steps.
        if logging_step:
            now = time.perf_counter()
            steps_in_window = (step - 1) % tc.log_every + 1
            rate = (
                steps_in_window * task.items_per_step / max(now - window_start - window_eval, 1e-9)
            )
            scalars = {"train/loss": loss.detach(), "train/grad_norm": grad_norm, **extras}
            scalars["train/lr"] = optimizer.param_groups[0]["lr"]
            scalars |= _optimizer_scalars(optimizer)
            scalars = {k: float(v) for k, v in scalars.items()}
            scalars[f"perf/{task.items_name}_per_sec"] = rate
            logger.scalars(step, scalars)
            logger.postfix(loss=scalars["train/loss"])
            window_start, window_eval = now, 0.0

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
    logger.write_metrics(final)
    save_checkpoint(
        Path(logger.run_dir) / "checkpoint.pt",
        model=task.state_dict(),
        optimizer=optimizer.state_dict(),
        step=tc.steps,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    if not math.isfinite(final["loss"]):
        raise FloatingPointError(f"training ended with a non-finite loss ({final['loss']})")
    return final
