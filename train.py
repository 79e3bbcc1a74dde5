"""kinetic's command line: `python train.py [group=option ...] [key=value ...]` (Hydra).

    python train.py env=hypergrid env.ndim=4 env.height=8 loss=db optim.lr=3e-3 seed=2
    python train.py -m optim=vradam,adamw seed=0,1,2

Each run writes its resolved config (.hydra/config.yaml), its identity (run.json), TensorBoard
events, metrics.json and checkpoints (checkpoints/) to its run directory (`runs/<date>/<time>`,
or `multirun/<date>/<time>/<job>` for -m). `resume=auto` continues the run in `hydra.run.dir`
from its latest checkpoint; `overwrite=true` replaces it; `debug=true` adds tracebacks to
refusals.

    torchrun --nproc_per_node=2 train.py env=hypergrid

runs it on 2 processes (DistributedDataParallel; gloo on CPU, nccl on CUDA): `task.batch_size` is
the global batch, rank 0 alone writes the run directory (docs/distributed.md); `resume=auto`
continues it with the same number of processes.
"""

from __future__ import annotations

import atexit
import math
import os
import random
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

import diffusion.config  # noqa: F401  (registers task=ddpm)
import gfn.config  # noqa: F401  (registers task=gfn)
from kinetic import (
    MonitorConfig,
    NullLogger,
    RunLogger,
    Task,
    TrainConfig,
    distributed,
    train,
)
from kinetic.checkpoint import check_run_dir, load_checkpoint, run_identity, start_run_dir
from kinetic.configure import validate_config
from kinetic.device import resolve_device
from kinetic.errors import EXIT_DIVERGED, EXIT_USER_ERROR, ConfigError, refused_arguments
from kinetic.interrupt import RunInterrupted, StopRequest, resume_command
from kinetic.logging import config_hparams
from kinetic.precision import Precision
from kinetic.registry import TaskSpec, load_task_plugins
from kinetic.resume import check_world_size, find_resume_checkpoint
from kinetic.stability.guard import NonFiniteError
from optim import build_optimizer

# The built-in tasks register themselves on import (gfn/config.py, diffusion/config.py), and
# installed packages' tasks through the `kinetic.tasks` entry points: all before Hydra composes,
# so that their presets may name their schemas.
load_task_plugins()


def describe(cfg: DictConfig, spec: TaskSpec) -> str:
    """A short name for the run: the task's own (`TaskSpec.run_name`, e.g. `hypergrid(ndim=2,
    height=8) tb` or `ddpm digits`; its name when it has none), the optimizer and the seed."""
    name = cfg.task.name if spec.run_name is None else spec.run_name(cfg)
    return f"{name} {cfg.optim.name} seed={cfg.seed}"


def run(cfg: DictConfig) -> tuple[dict[str, float], Task]:
    """One run of the composed config `cfg`; returns its final metrics and its task.

    Every check comes before the first write, so a refused input (a `ConfigError`) leaves an
    existing run directory as it was: first the values' ranges, the run directory and the
    checkpoint to resume; then building the task and the optimizer from the config (the config
    boundary: a constructor's ValueError or TypeError there is a refused argument); only then
    is the run recorded and started.
    """
    # 1. Refuse bad values, a run directory holding another run, a missing or foreign checkpoint.
    spec = validate_config(cfg)
    with refused_arguments(""):  # an unavailable device or unknown precision: one line
        precision = Precision(cfg.precision, resolve_device(cfg.device))
    if (warning := precision.warning()) is not None:
        _warn(warning)
    train_config = TrainConfig(**cfg.train).validate()
    with refused_arguments(""):
        monitor = MonitorConfig.from_dict(cfg.monitor)
    # Under torchrun: join the process group; rank 0's run directory is the run's.
    distributed.init_from_env(cfg.device)
    distributed.silence_other_ranks()
    main_process = distributed.is_main_process()
    run_dir = Path(distributed.agree(HydraConfig.get().runtime.output_dir))
    identity = run_identity(cfg, spec.identity, spec.identity_ignore)
    check_run_dir(
        run_dir, identity, resume=cfg.resume, overwrite=cfg.overwrite, outputs=spec.outputs
    )
    found = find_checkpoint_on_main(run_dir, cfg.resume, identity, train_config.keep_checkpoints)
    if found is not None:
        check_world_size(found[1], distributed.world_size())

    # 2. Build the task (environment or data, networks) and the optimizer.
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the model's initialisation: the same on every rank
    np.random.seed(cfg.seed % 2**32)  # every global stream seeded: a run is its config
    random.seed(cfg.seed)
    with refused_arguments(""):
        task = spec.task_class().from_config(cfg, run_dir)
    with refused_arguments(f"optim={cfg.optim.name}"):
        optimizer = build_optimizer(cfg.optim, task.param_groups())

    # 3. Record the run (run.json; Hydra's .hydra/config.yaml, resolved, and overrides.yaml,
    # which Hydra itself is told not to write before these checks), then train. Rank 0 alone
    # writes the events, metrics.json and the checkpoints, and shows progress.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if distributed.is_distributed():
        resolved["distributed"] = batches = distributed_batches(cfg)
        if main_process:
            print(", ".join(f"{k}={v}" for k, v in batches.items()), flush=True)
    resumed_at = None if cfg.resume is None else (0 if found is None else found[1]["step"])
    if main_process:
        start_run_dir(run_dir, identity, overwrite=cfg.overwrite, outputs=spec.outputs)
        record = run_dir / ".hydra"
        record.mkdir(exist_ok=True)
        (record / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        overrides = list(HydraConfig.get().overrides.task)
        (record / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
        if found is not None:
            print(f"resuming from {found[0]} (step {resumed_at})", file=sys.stderr)
        logger = RunLogger(
            run_dir, cfg.train.steps, progress=cfg.logging.progress, resumed_at=resumed_at
        )
        hydra_cfg = HydraConfig.get()  # the HParams tab: this run's overrides and group choices
        choices = hydra_cfg.runtime.choices
        logger.hparams(config_hparams(cfg, hydra_cfg.overrides.task, choices, spec.hparams))
    else:
        logger = NullLogger()
    try:
        with StopRequest() as stop:  # SIGTERM/Ctrl-C: finish the step, checkpoint, stop
            metrics = train(
                task, optimizer, train_config, monitor=monitor, logger=logger,
                log_images=cfg.logging.images, run_config=resolved,
                resume=None if found is None else found[1], identity=identity, stop=stop,
                precision=precision,
            )  # fmt: skip
    finally:
        if main_process:
            logger.close()
    distributed.shutdown()  # after an error, torchrun ends the other ranks instead
    if main_process:
        summary = " ".join(f"{k}={metrics[k]:.4g}" for k in task.summary_keys if k in metrics)
        time_s = metrics["wall_time_s"]
        print(f"done: {describe(cfg, spec)} {summary} time={time_s:.1f}s run_dir={run_dir}")
    return metrics, task


def find_checkpoint_on_main(
    run_dir: Path, resume: str | None, identity: dict, keep: int
) -> tuple[Path, dict] | None:
    """`find_resume_checkpoint` on rank 0, which decides (and alone warns of a damaged newest
    checkpoint); the other ranks load the file it names (one node: a shared filesystem), and
    refuse what rank 0 refused, with its message."""
    if distributed.is_main_process():
        try:
            found = find_resume_checkpoint(run_dir, resume, identity, keep, warn=_warn)
        except ConfigError as err:
            distributed.agree(("refused", str(err)))
            raise
        distributed.agree(("found", None if found is None else str(found[0])))
        return found
    outcome, value = distributed.agree(None)
    if outcome == "refused":
        raise ConfigError(value)
    return None if value is None else (Path(value), load_checkpoint(Path(value)))


def distributed_batches(cfg: DictConfig) -> dict[str, int | str]:
    """What a distributed run states in its config and log: processes, backend, and the
    global and per-rank batch."""
    n = distributed.world_size()
    return {
        "world_size": n,
        "backend": str(torch.distributed.get_backend()),
        "global_batch": cfg.task.batch_size,
        "batch_per_rank": distributed.per_rank(cfg.task.batch_size, "task.batch_size"),
    }


def quiet_hydra_on_other_ranks(argv: list[str]) -> list[str]:
    """Under torchrun, ranks other than 0 tell Hydra to write nothing (no run directory, no
    .hydra/ config, no log file): rank 0's run directory is the run's."""
    if int(os.environ.get("RANK", "0")) == 0:
        return argv
    quiet = tempfile.mkdtemp(prefix="kinetic-rank-")
    atexit.register(shutil.rmtree, quiet, ignore_errors=True)
    return [
        *argv, f"hydra.run.dir={quiet}", f"hydra.sweep.dir={quiet}", "hydra.output_subdir=null",
        "hydra/job_logging=disabled", "hydra/hydra_logging=disabled",
    ]  # fmt: skip


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _Exit(SystemExit):
    """An exit whose code this program chose (Hydra's own errors exit with 1; see below)."""


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    """Exit codes: 0 done, 2 refused input (nothing ran), 1 diverged or crashed, 128 + signal
    number after a checkpoint on SIGTERM (143) or Ctrl-C (130)."""
    try:
        metrics, task = run(cfg)
    except ConfigError as err:  # a user error: one line (and the traceback with debug=true)
        if cfg.get("debug"):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        raise _Exit(EXIT_USER_ERROR) from None
    except (NonFiniteError, FloatingPointError) as err:  # diverged (not a user error): exit 1
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return math.nan  # one diverged job must not end a sweep (lr sweeps probe divergence)
        raise _Exit(EXIT_DIVERGED) from None
    except RunInterrupted as stop:
        if not distributed.is_main_process():  # rank 0 says it, with the run's directory
            raise _Exit(stop.exit_code) from None
        command = resume_command(Path(HydraConfig.get().runtime.output_dir),
                                 list(HydraConfig.get().overrides.task))  # fmt: skip
        if distributed.world_size() > 1:  # every rank restarts, as many as stopped
            launcher = f"torchrun --nproc_per_node={distributed.world_size()}"
            command = command.replace("python ", f"{launcher} ", 1)
        print(f"stopped: {stop}\nresume with: {command}", file=sys.stderr)
        raise _Exit(stop.exit_code) from None
    except Exception:  # a bug: its traceback, exit 1 (told apart from Hydra's errors below)
        traceback.print_exc()
        raise _Exit(1) from None
    return None if task.objective_key is None else metrics.get(task.objective_key)  # for sweepers


if __name__ == "__main__":
    sys.argv = quiet_hydra_on_other_ranks(sys.argv)
    try:
        main()
    except _Exit:
        raise
    except SystemExit as exit:
        # Hydra ends the process with code 1 on its own errors, before the run starts: an
        # unknown config group option or key, a malformed override, a value of the wrong type.
        # Its message names the problem; the exit code says "refused input", as ours does.
        if exit.code == 1:
            raise SystemExit(EXIT_USER_ERROR) from None
        raise
