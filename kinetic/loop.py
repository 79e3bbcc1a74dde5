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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kinetic import distributed
from kinetic.checkpoint import Checkpoints, write_folder_atomic
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
    if monitor.every > 0 or monitor.sharpness.every > 0:
        stability = StabilityMonitor(monitor, optimizer, interval=interval)
    guard = None
    if monitor.nonfinite.enabled:
        guard = NonFiniteGuard(task.model.named_parameters(), monitor.nonfinite.max_consecutive)
    return stability, guard


def _skip_scalars(guard: NonFiniteGuard, precision: Precision) -> dict[str, float]:
    """The guard's counts: non-finite steps and, in fp16, the scaler's overflows (skipped too)."""
    scalars = {"stability/nonfinite_skips": float(guard.total_skips)}
    if precision.scaling:
        scalars["stability/overflow_skips"] = float(guard.overflow_skips)
    return scalars


@dataclass
class LoopState:
    """What the loop carries from step to step, in one place: the step counter, the last
    evaluation's metrics and loss, and the run's timers. A checkpoint saves `state_dict()`
    (beside the step: `kinetic.resume`) and a resumed run restores it; the random streams are
    saved beside it by `kinetic.resume` from the task's `generators()` and the global ones."""

    step: int = 0  # the last applied optimizer step
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's
    loss: float = math.nan  # the last step's loss, read (one sync) when a checkpoint is taken
    wall: float = 0.0  # seconds spent by the sessions before this one (a resumed run)
    eval_time: float = 0.0  # of all sessions' seconds, those spent evaluating
    # Timers of this session (not saved): its start, the logging window's start and the
    # evaluation time inside that window (excluded from the throughput).
    started: float = field(default_factory=time.perf_counter)
    window_start: float = field(default_factory=time.perf_counter)
    window_eval: float = 0.0

    def elapsed(self) -> float:
        """The run's wall time so far, over every session."""
        return self.wall + time.perf_counter() - self.started

    def state_dict(self) -> dict[str, Any]:
        return {"metrics": dict(self.metrics), "loss": self.loss, "wall": self.elapsed(),
                "eval_time": self.eval_time}  # fmt: skip

    def load_state_dict(self, step: int, state: Mapping[str, Any]) -> None:
        """Continue after `step` with the carried values of a checkpoint; this session's timers
        start now (restoring is not training time)."""
        self.step, self.metrics, self.loss = step, dict(state["metrics"]), state["loss"]
        self.wall, self.eval_time = state["wall"], state["eval_time"]
        self.started = self.window_start = time.perf_counter()


@dataclass
class _Run:
    """The collaborators of one `train` call, wired once ("build"), and the phases of a step
    as methods that `train` calls in order. `module` is what the task's loss calls for its
    gradient pass: `task.train_module()`, wrapped in DistributedDataParallel under torchrun."""

    task: Task
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    precision: Precision
    logger: RunLogger | NullLogger
    run_config: Mapping[str, Any]
    identity: Mapping[str, Any]
    stop: StopRequest | None
    schedule: Any = None
    module: torch.nn.Module | None = None
    monitor: StabilityMonitor | None = None
    guard: NonFiniteGuard | None = None
    checkpoints: Checkpoints | None = None
    saving: bool = False
    state: LoopState = field(default_factory=LoopState)
    params: list[torch.Tensor] = field(default_factory=list)
    last_loss: Tensor | None = None  # the last applied step's loss tensor (read at the end)

    @classmethod
    def build(
        cls,
        task: Task,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        monitor: MonitorConfig | None,
        **wiring: Any,
    ) -> _Run:
        """Schedule, DDP wrapper, monitors and checkpoints (nothing draws from a stream)."""
        run = cls(task, optimizer, config, **wiring)
        run.schedule = task.lr_schedule(optimizer, config)
        run.params = [p for group in optimizer.param_groups for p in group["params"]]
        # Several processes (torchrun): DDP averages the gradients; rank 0 alone watches,
        # evaluates and writes (train.py gives the other ranks a NullLogger).
        run.module = distributed.data_parallel(task.train_module())
        run.monitor, run.guard = _build_monitors(monitor, task, optimizer, config.log_every)
        if run.logger.run_dir is not None:
            run.checkpoints = Checkpoints(
                run.logger.run_dir, config.keep_checkpoints, task.export_name
            )
        # Every rank takes part in a checkpoint (its per-rank state is gathered to rank 0).
        run.saving = distributed.agree(run.checkpoints is not None)
        return run

    def restore(self, payload: Mapping[str, Any]) -> None:
        """Continue from a checkpoint: every object's state and the loop's."""
        step, loop = restore_training_state(
            payload, task=self.task, optimizer=self.optimizer, schedule=self.schedule,
            monitor=self.monitor, guard=self.guard, generators=self.task.generators(),
            precision=self.precision, rank=distributed.rank(),
            world_size=distributed.world_size(),
        )  # fmt: skip
        self.state.load_state_dict(step, loop)

    def forward_backward(self, step: int) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """Batch and loss (under autocast), backward (fp16: scaled, then unscaled), the global
        batch's loss (one all-reduce under torchrun: a non-finite loss on any rank skips the
        step on every rank) and the gradient norm (a device tensor: no sync; a pass over every
        gradient, so only on steps where clip, guard, monitor or log need it)."""
        with self.precision.autocast():
            loss, extras = self.task.loss(step, self.module)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss, self.optimizer)
        loss = distributed.mean_over_ranks(loss)
        grad_norm = None
        needs_norm = self.guard is not None or self.monitor is not None
        if self.config.clip_grad_norm > 0 or self._logging(step) or needs_norm:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.params if p.grad is not None]
            )
        return loss, extras, grad_norm

    def skipped(self, step: int, loss: Tensor, grad_norm: Tensor | None) -> bool:
        """The guard's verdict (one host sync): a non-finite step (in fp16 also the scaler's
        overflow, halving the scale) is skipped before it touches the parameters; too many in
        a row stop the run after a checkpoint of the last applied step."""
        if self.guard is None or self.guard.is_finite(loss, grad_norm, self.params, self.precision):
            return False
        self.precision.skip(self.optimizer)
        self.logger.scalars(step, _skip_scalars(self.guard, self.precision))
        if self.guard.exhausted:
            path = self.save()  # the last applied step, its streams as they are now
            raise NonFiniteError(self.guard.stop_message(step, str(path)))
        return True

    def apply(self, step: int, loss: Tensor, grad_norm: Tensor | None) -> float:
        """Clip, step (the monitor remembers theta_{t-1} just before it), schedule, the task's
        hook; returns this step's alpha_0 (the lr before the schedule moved it)."""
        if self.config.clip_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.clip_grad_norm, grad_norm)
        if self.monitor is not None:
            self.monitor.before_step(step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.precision.step(self.optimizer, checked=self.guard is not None)
        if step == 1:  # one sync: a loss that bypassed the module it was given left ranks apart
            distributed.check_in_sync(
                self.params, "the task's loss must call the model it is given"
            )
        self.schedule.step()
        self.task.after_step(step)
        self.logger.progress(1)
        self.state.step, self.last_loss = step, loss
        return lr

    def watch(self, step: int, loss: Tensor, grad_norm: Tensor | None) -> dict[str, float]:
        """The monitors: cosine, sign flips, spikes (device ops, no sync); the sharpness probe
        when due (syncs, 2 * iters Hessian-vector products)."""
        if self.monitor is None:
            return {}
        self.monitor.after_step(step, loss, grad_norm)
        if self.monitor.probe_due(step):
            return self.monitor.probe(functools.partial(self.task.probe_loss, step))
        return {}

    def _logging(self, step: int) -> bool:
        return step % self.config.log_every == 0 or step == self.config.steps

    def log(
        self,
        step: int,
        loss: Tensor,
        grad_norm: Tensor | None,
        extras: Mapping[str, Tensor],
        lr: float,
        stability: dict[str, float],
    ) -> None:
        """Scalars every `log_every` steps (float() syncs with the device), and warnings."""
        state = self.state
        if self._logging(step):
            now = time.perf_counter()
            seconds = max(now - state.window_start - state.window_eval, 1e-9)
            steps_in_window = (step - 1) % self.config.log_every + 1
            scalars = {"train/loss": loss.detach(), "train/grad_norm": grad_norm, **extras}
            scalars["train/lr"] = lr
            scalars |= {f"optim/{k}": v for k, v in velocity_scalars(self.optimizer, lr).items()}
            scalars = {k: float(v) for k, v in scalars.items()}
            items = steps_in_window * self.task.items_per_step
            scalars[f"perf/{self.task.items_name}_per_sec"] = items / seconds
            if self.monitor is not None:
                stability |= self.monitor.scalars()
            if self.guard is not None:
                stability |= _skip_scalars(self.guard, self.precision)
            self.logger.scalars(step, scalars | stability)
            self.logger.postfix(loss=scalars["train/loss"])
            state.window_start, state.window_eval = now, 0.0
        if self.monitor is not None and stability:
            for line in self.monitor.warnings(step, stability):
                self.logger.warn(step, line)

    def evaluate(self, step: int, log_images: bool) -> None:
        """The task's evaluation when due (rank 0; not counted in the training throughput)."""
        every = self.config.eval_every
        if every == 0 or (step % every and step != self.config.steps):
            return
        started, main = time.perf_counter(), distributed.is_main_process()
        if distributed.is_distributed():
            self.task.gather_from_ranks()
        metrics = self.state.metrics = self.task.evaluate(step) if main else {}
        self.logger.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        if log_images and main:
            for tag, image in self.task.images(step).items():
                self.logger.image(step, f"eval/{tag}", image)
        self.logger.postfix(**{k: metrics[k] for k in self.task.progress_keys if k in metrics})
        spent = time.perf_counter() - started
        self.logger.scalars(step, {"perf/eval_seconds": spent})
        self.state.eval_time += spent
        self.state.window_eval += spent

    def save(self) -> Path | None:
        """A checkpoint of the state after the last applied step (None without a run
        directory). In a distributed run every rank calls it: rank 0 gathers each rank's own
        state and writes."""
        if not self.saving:
            return None
        per_rank = None
        if distributed.is_distributed():
            per_rank = distributed.gather_to_main(rank_state(self.task, self.task.generators()))
        if self.checkpoints is None:
            return None
        payload = capture_training_state(
            step=self.state.step, task=self.task, optimizer=self.optimizer,
            schedule=self.schedule, monitor=self.monitor, guard=self.guard,
            loop=self.state.state_dict(), generators=self.task.generators(),
            precision=self.precision, per_rank=per_rank,
        )  # fmt: skip
        export = None if self.task.export_name is None else self.task.export
        return self.checkpoints.save(
            self.state.step, **payload, export=export, identity=dict(self.identity),
            config=self.run_config,
        )  # fmt: skip

    def checkpoint_or_stop(self, step: int, loss: Tensor) -> None:
        """The periodic and last checkpoints; on a stop request (SIGTERM/Ctrl-C), which the
        ranks agree on (one all-reduce per step), a checkpoint, then `RunInterrupted`."""
        stop = self.stop
        stopping = stop is not None and stop.requested
        if distributed.is_distributed() and stop is not None:  # the ranks stop after one step
            stopping = distributed.any_rank(stopping, loss.device)
        every = self.config.checkpoint_every
        path = None
        if self.saving and ((every > 0 and step % every == 0) or step == self.config.steps
                            or stopping):  # fmt: skip
            self.state.loss = float(loss.detach())  # syncs, as the save does
            path = self.save()
        if stopping:
            if stop.signal is None:  # a rank the signal has not reached (yet): torchrun's TERM
                stop.signal, stop.signum = "SIGTERM", int(signal.SIGTERM)
            distributed.barrier()  # no rank exits (and has torchrun end the others) mid-write
            raise RunInterrupted(stop.signal, stop.exit_code, step, path)

    def finish(self) -> dict[str, float]:
        """The task's export (`Task.export`) in <run_dir>/<export_name>/; the final metrics,
        the same on every rank (rank 0's evaluation), in metrics.json; `FloatingPointError` if
        the last loss is not finite."""
        name = self.task.export_name
        if self.checkpoints is not None and name is not None:  # rank 0 of a run with a folder
            write_folder_atomic(self.checkpoints.run_dir / name, self.task.export)
        state, steps = self.state, self.config.steps
        wall, items = state.elapsed(), steps * self.task.items_per_step
        last = self.last_loss
        final = {
            **state.metrics,
            "loss": state.loss if last is None else float(last.detach()),
            "steps": float(steps),
            self.task.items_name: float(items),
            f"{self.task.items_name}_per_sec": items / max(wall - state.eval_time, 1e-9),
            "wall_time_s": wall,
            "eval_time_s": state.eval_time,
        }
        if self.guard is not None:
            final["nonfinite_skips"] = float(self.guard.total_skips)
            if self.precision.scaling:
                final["overflow_skips"] = float(self.guard.overflow_skips)
        final = distributed.agree(final)
        self.logger.write_metrics(final)
        if not math.isfinite(final["loss"]):
            raise FloatingPointError(f"training ended with a non-finite loss ({final['loss']})")
        return final


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
    and when `stop` asks for one. A task with an `export_name` also has its `export` written
    beside each checkpoint and, after the last step, to <run_dir>/<export_name>/.

    A step whose loss or gradients are not finite is skipped when the guard is on: no optimizer
    step, no schedule step, no `after_step`, no callbacks, and the step number does not
    advance, so the next iteration draws a new batch for the same step. Raises
    `NonFiniteError` (after writing a checkpoint) once `monitor.nonfinite.max_consecutive` steps
    in a row were skipped, and `FloatingPointError` if the final loss is not finite.
    """
    # Build: the settings, then the schedule, DDP wrapper, monitors and checkpoints.
    config = (TrainConfig() if config is None else config).validate()
    if not isinstance(precision, Precision):
        precision = Precision(precision, next(task.model.parameters()).device)
    if run_config is None:
        run_config = {
            "train": asdict(config),
            "monitor": None if monitor is None else asdict(monitor),
        }
    run = _Run.build(
        task, optimizer, config, monitor, precision=precision,
        logger=NullLogger() if logger is None else logger, run_config=run_config,
        identity=dict(identity or {}), stop=stop,
    )  # fmt: skip

    # Resume: every object's state after the checkpoint's step, and the loop's own.
    if resume is not None:
        run.restore(resume)
    if not distributed.is_main_process():
        run.monitor = None  # rank 0 alone watches (the other ranks' windows are restored, unused)

    while run.state.step < config.steps:
        step = run.state.step + 1
        # Step: batch, loss, backward; the guard; clip, optimizer step, schedule.
        loss, extras, grad_norm = run.forward_backward(step)
        if run.skipped(step, loss, grad_norm):
            continue  # the same step again, with a new batch
        lr = run.apply(step, loss, grad_norm)
        run.log(step, loss, grad_norm, extras, lr, run.watch(step, loss, grad_norm))

        # Evaluate, then the callbacks.
        run.evaluate(step, log_images)
        for callback in callbacks:
            callback(step)

        # Checkpoint, and stop if a signal asked to.
        run.checkpoint_or_stop(step, loss)

    return run.finish()
