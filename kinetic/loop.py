"""The one training loop. A task plugs in a batch and its loss, an evaluation and its images.

`train(task, optimizer, TrainConfig(...))` runs it from Python; train.py runs it from a composed
config. Each step reads top to bottom in phases: batch -> loss -> backward -> guard -> clip ->
step -> schedule -> monitors -> log -> evaluate -> callbacks -> checkpoint. With a run
directory, a checkpoint holds everything the next step depends on (kinetic/resume.py), is written
every `checkpoint_every` steps, after the last step, when the guard stops a run and when a
`StopRequest` (SIGTERM/Ctrl-C) asks for one; `resume=` continues from one exactly.

The run lives on the device of the task's model; `precision` (kinetic/precision.py) puts the
batch and loss phase under autocast and, for fp16, scales the loss. Host syncs in a step, the
only ones (on CUDA each stalls the device until its queue drains): the guard's one finite check;
the task's own (a GFlowNet sampler's per-step exit check and its count of visited states);
every `log_every` steps the logged scalars; the sharpness probe when due; in fp16 without
the guard, `GradScaler.step`'s overflow check; under torchrun, one check after step 1 that the
ranks hold the same parameters and, with a `StopRequest`, one all-reduce of its flag per step
(a signal may reach the ranks at different steps; they stop after the same one).
`benchmarks/gpu_check.py` checks this list on a GPU.
"""

from __future__ import annotations

import functools
import math
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kinetic import distributed
from kinetic.checkpoint import Checkpoints
from kinetic.config import TrainConfig
from kinetic.interrupt import RunInterrupted, StopRequest
from kinetic.logging import RunLogger
from kinetic.precision import Precision
from kinetic.resume import capture_training_state, rank_state, restore_training_state
from kinetic.stability.guard import NonFiniteError, NonFiniteGuard
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor, velocity_scalars
from kinetic.task import Task

# The monitors a run gets unless told otherwise: configs/monitor/default.yaml's.
DEFAULT_MONITOR = MonitorConfig()


class NullLogger:
    """The logger of a run that writes no files: no TensorBoard, no metrics.json, no checkpoint
    (`run_dir` is None); stability warnings still go to stderr."""

    run_dir: Path | None = None

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def image(self, step: int, tag: str, image: np.ndarray) -> None: ...
    def progress(self, steps: int) -> None: ...
    def postfix(self, **values: float) -> None: ...
    def write_metrics(self, metrics: dict[str, float]) -> None: ...

    def warn(self, step: int, message: str) -> None:
        print(f"warning: step {step}: {message}", file=sys.stderr)


def _build_monitors(
    monitor: MonitorConfig | None, task: Task, optimizer: torch.optim.Optimizer, interval: int
) -> tuple[StabilityMonitor | None, NonFiniteGuard | None]:
    """The stability monitor and the non-finite guard (None when off, so that `monitor=None`
    or `monitor=off` costs nothing)."""
    if monitor is None:
        return None, None
    stability = None
    if monitor.every > 0 or monitor.sharpness_every > 0:
        stability = StabilityMonitor(monitor, optimizer, interval=interval)
    guard = None
    if monitor.nonfinite:
        guard = NonFiniteGuard(task.model.named_parameters(), monitor.max_consecutive)
    return stability, guard


def _skip_scalars(guard: NonFiniteGuard, precision: Precision) -> dict[str, float]:
    """The guard's counts: non-finite steps and, in fp16, the scaler's overflows (skipped too)."""
    scalars = {"stability/nonfinite_skips": float(guard.total_skips)}
    if precision.scaling:
        scalars["stability/overflow_skips"] = float(guard.overflow_skips)
    return scalars


def train(
    task: Task,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig | None = None,
    *,
    monitor: MonitorConfig | None = DEFAULT_MONITOR,
    logger: RunLogger | NullLogger | None = None,
    callbacks: Sequence[Callable[[int], None]] = (),
    log_images: bool = True,
    run_config: Mapping[str, Any] | None = None,
    resume: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    stop: StopRequest | None = None,
    precision: Precision | str = "fp32",
) -> dict[str, float]:
    """Run `config.steps` optimisation steps of `task` with `optimizer`; returns the final
    metrics (the last evaluation's, the last loss, steps, items, throughput, wall time).

    Args:
        config: the loop's settings (`TrainConfig()`'s defaults when None).
        monitor: the stability monitors and the non-finite guard (kinetic/stability/), on
            by default with `MonitorConfig()`; None turns both off.
        logger: where scalars, images, warnings, metrics.json and the checkpoint go (a
            `RunLogger(run_dir, steps)` writes them under run_dir). None: a `NullLogger`,
            which writes no files (no checkpoint either) and prints only warnings.
        callbacks: functions called as `f(step)` once per applied step, after its logging and
            evaluation (e.g. to time steps, or to stop early by raising).
        log_images: log the task's `images` at each evaluation.
        run_config: the resolved config stored in the checkpoint (train.py passes the whole
            Hydra config); default: `{"train": ..., "monitor": ...}` of this call.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (or a `Precision`): autocast around
            the task's loss on the model's device; fp16 adds a gradient scaler, whose
            overflow steps the guard skips without counting them as non-finite steps.
        resume: a training checkpoint's payload (`kinetic.resume.find_resume_checkpoint`) to
            continue from: the run goes on from the step after it exactly as if it had never
            stopped (on the CPU, bit for bit).
        identity: what the run is (`kinetic.checkpoint.run_identity`), stored in its
            checkpoints so that a resume under another task, environment or model is refused.
        stop: a `StopRequest` whose signal (SIGTERM, Ctrl-C) ends the run after the step in
            progress, with a checkpoint, by raising `RunInterrupted` (train.py runs the loop
            inside `with StopRequest() as stop`).

    With a run directory (`logger.run_dir`), checkpoints go to its checkpoints/ folder (the
    last `config.keep_checkpoints`): every `config.checkpoint_every` steps, after the last step,
    and when `stop` asks for one.

    A step whose loss or gradients are not finite is skipped when the guard is on: no optimizer
    step, no schedule step, no `after_step`, no callbacks, and the step number does not
    advance, so the next iteration draws a new batch for the same step. Raises
    `NonFiniteError` (after writing a checkpoint) once `monitor.max_consecutive` steps in a
    row were skipped, and `FloatingPointError` if the final loss is not finite.
    """
    # Setup: config, schedule, monitors. Nothing here draws from a random stream.
    tc = (TrainConfig() if config is None else config).validate()
    if not isinstance(precision, Precision):
        precision = Precision(precision, next(task.model.parameters()).device)
    logger = NullLogger() if logger is None else logger
    if run_config is None:
        run_config = {"train": asdict(tc), "monitor": None if monitor is None else asdict(monitor)}
    schedule = task.lr_schedule(optimizer, tc)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Several processes (torchrun): DDP averages the gradients; rank 0 alone watches, evaluates
    # and writes (train.py gives the other ranks a NullLogger). See docs/distributed.md.
    task.train_model = distributed.data_parallel(task.train_model)
    main = distributed.is_main_process()
    several = distributed.is_distributed()
    stability_monitor, guard = _build_monitors(monitor, task, optimizer, tc.log_every)
    # Resume: the state after step `done`, and what the loop itself carries across steps (the
    # last evaluation's metrics and the last loss, for the final metrics; the time spent).
    checkpoints = (
        None if logger.run_dir is None else Checkpoints(logger.run_dir, tc.keep_checkpoints)
    )
    # Every rank takes part in a checkpoint (its per-rank state is gathered to rank 0).
    saving = distributed.agree(checkpoints is not None)
    carried: dict[str, Any] = {"metrics": {}, "loss": math.nan, "wall": 0.0, "eval_time": 0.0}
    done = 0
    if resume is not None:
        done, carried = restore_training_state(
            resume, task=task, optimizer=optimizer, schedule=schedule, monitor=stability_monitor,
            guard=guard, generators=task.generators(), precision=precision,
            rank=distributed.rank(), world_size=distributed.world_size(),
        )  # fmt: skip
    if not main:
        stability_monitor = None

    def save(at: int) -> Path | None:
        """A checkpoint of the state after step `at` (None without a run directory). In a
        distributed run every rank calls it: rank 0 gathers each rank's own state and writes."""
        if not saving:
            return None
        per_rank = None
        if several:
            per_rank = distributed.gather_to_main(rank_state(task, task.generators()))
        if checkpoints is None:
            return None
        carried.update(wall=wall_before + time.perf_counter() - start, eval_time=eval_time)
        payload = capture_training_state(
            step=at, task=task, optimizer=optimizer, schedule=schedule,
            monitor=stability_monitor, guard=guard, loop=carried, generators=task.generators(),
            precision=precision, per_rank=per_rank,
        )  # fmt: skip
        return checkpoints.save(at, **payload, identity=dict(identity or {}), config=run_config)

    metrics: dict[str, float] = dict(carried["metrics"])
    wall_before = carried["wall"]
    start = time.perf_counter()
    eval_time = carried["eval_time"]  # excluded from the throughput
    window_start, window_eval = start, 0.0
    last_loss = None  # the last step's loss tensor, read once at the end
    step = done + 1
    while step <= tc.steps:
        # Batch: sample one and score it (under autocast in bf16 and fp16).
        with precision.autocast():
            loss, extras = task.loss(step)

        # Backward (fp16: scaled, then the gradients unscaled), then the gradient norm (a device
        # tensor: no sync). The norm is a pass over every gradient, so it is skipped on steps
        # where nothing (clip, guard, monitor, log) needs it.
        optimizer.zero_grad(set_to_none=True)
        precision.backward(loss, optimizer)
        # The global batch's loss (one all-reduce; the local loss itself in one process): a
        # non-finite loss on any rank then skips the step on every rank.
        loss = distributed.mean_over_ranks(loss)
        logging_step = step % tc.log_every == 0 or step == tc.steps
        needs_norm = guard is not None or stability_monitor is not None
        if tc.clip_grad_norm > 0 or logging_step or needs_norm:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in params if p.grad is not None]
            )

        # Guard: skip a non-finite step before it touches the parameters (one host sync). In
        # fp16 an overflow of the scaled gradients is skipped too, halving the scale.
        if guard is not None and not guard.is_finite(loss, grad_norm, params, precision):
            precision.skip(optimizer)
            logger.scalars(step, _skip_scalars(guard, precision))
            if guard.exhausted:
                path = save(step - 1)  # the last applied step, its streams as they are now
                raise NonFiniteError(guard.stop_message(step, str(path)))
            continue

        # Clip.
        if tc.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, tc.clip_grad_norm, grad_norm)

        # Step (the monitor remembers theta_{t-1} just before it), schedule, task hooks.
        if stability_monitor is not None:
            stability_monitor.before_step(step)
        lr = optimizer.param_groups[0]["lr"]  # this step's alpha_0, before the schedule moves it
        precision.step(optimizer, checked=guard is not None)
        if step == 1:  # one sync: a loss that bypassed task.train_model left the ranks apart
            distributed.check_in_sync(params, "the task's loss must call task.train_model")
        schedule.step()
        task.after_step(step)
        logger.progress(1)

        # Monitors: update cosine, sign flips, spikes (device ops, no sync); the sharpness
        # probe when due (syncs, 2 * iters Hessian-vector products).
        stability: dict[str, float] = {}
        if stability_monitor is not None:
            stability_monitor.after_step(step, loss, grad_norm)
            if stability_monitor.probe_due(step):
                stability |= stability_monitor.probe(functools.partial(task.probe_loss, step))

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
            if stability_monitor is not None:
                stability |= stability_monitor.scalars()
            if guard is not None:
                stability |= _skip_scalars(guard, precision)
            logger.scalars(step, scalars | stability)
            logger.postfix(loss=scalars["train/loss"])
            window_start, window_eval = now, 0.0
        if stability_monitor is not None and stability:
            for line in stability_monitor.warnings(step, stability):
                logger.warn(step, line)

        # Evaluate (not counted in the training throughput).
        if tc.eval_every > 0 and (step % tc.eval_every == 0 or step == tc.steps):
            eval_start = time.perf_counter()
            if several:
                task.gather_from_ranks()
            metrics = task.evaluate(step) if main else {}
            logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            if log_images and main:
                for tag, image in task.images(step).items():
                    logger.image(step, f"eval/{tag}", image)
            logger.postfix(**{k: metrics[k] for k in task.progress_keys if k in metrics})
            spent = time.perf_counter() - eval_start
            eval_time += spent
            window_eval += spent

        # Callbacks, then the checkpoint (also when a signal asked the run to stop).
        for callback in callbacks:
            callback(step)
        last_loss = loss
        stopping = stop is not None and stop.requested
        if several and stop is not None:  # the ranks stop after the same step
            stopping = distributed.any_rank(stopping, loss.device)
        periodic = tc.checkpoint_every > 0 and step % tc.checkpoint_every == 0
        path = None
        if saving and (periodic or step == tc.steps or stopping):
            carried.update(metrics=metrics, loss=float(loss.detach()))  # syncs, as the save does
            path = save(step)
        if stopping:
            if stop.signal is None:  # a rank the signal has not reached (yet): torchrun's TERM
                stop.signal, stop.signum = "SIGTERM", int(signal.SIGTERM)
            distributed.barrier()  # no rank exits (and has torchrun end the others) mid-write
            raise RunInterrupted(stop.signal, stop.exit_code, step, path)
        step += 1

    # The final metrics (the last step's checkpoint is written above).
    wall = wall_before + time.perf_counter() - start
    items = tc.steps * task.items_per_step
    final = {
        **metrics,
        "loss": carried["loss"] if last_loss is None else float(last_loss.detach()),
        "steps": float(tc.steps),
        task.items_name: float(items),
        f"{task.items_name}_per_sec": items / max(wall - eval_time, 1e-9),
        "wall_time_s": wall,
    }
    if guard is not None:
        final["nonfinite_skips"] = float(guard.total_skips)
        if precision.scaling:
            final["overflow_skips"] = float(guard.overflow_skips)
    final = distributed.agree(final)  # rank 0's evaluation, on every rank
    logger.write_metrics(final)
    if not math.isfinite(final["loss"]):
        raise FloatingPointError(f"training ended with a non-finite loss ({final['loss']})")
    return final
