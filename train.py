"""kinetic's command line: `python train.py [group=option ...] [key=value ...]` (Hydra).

    python train.py env=hypergrid env.ndim=4 env.height=8 loss=db optim.lr=3e-3 seed=2
    python train.py -m optim=vradam,adamw seed=0,1,2

Each run writes its resolved config, TensorBoard events, metrics.json and a checkpoint to its
run directory (`runs/<date>/<time>`, or `multirun/<date>/<time>/<job>` for -m).

    torchrun --nproc_per_node=2 train.py env=hypergrid

runs it on 2 processes (DistributedDataParallel; gloo on CPU, nccl on CUDA): `task.batch_size` is
the global batch, rank 0 alone writes the run directory (docs/distributed.md).
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kinetic import (
    MonitorConfig,
    NullLogger,
    RunLogger,
    Task,
    TrainConfig,
    build_task,
    distributed,
    train,
)
from kinetic.logging import config_hparams
from kinetic.stability.guard import NonFiniteError
from optim import build_optimizer


def describe(cfg: DictConfig) -> str:
    """A short name for the run, e.g. `hypergrid(ndim=2, height=8) tb vradam seed=0` or
    `ddpm digits vradam seed=0`."""
    parts = []
    if "data" in cfg:
        parts += [cfg.task.name, cfg.data.name]
    if "env" in cfg:
        target = cfg.env._target_.rsplit(".", 1)[-1].lower()
        keys = [k for k in ("ndim", "height", "n", "k", "max_nodes") if k in cfg.env]
        parts.append(f"{target}({', '.join(f'{k}={cfg.env[k]}' for k in keys)})")
    if "loss" in cfg:
        parts.append(cfg.loss.name)
    return " ".join([*parts, cfg.optim.name, f"seed={cfg.seed}"])


def run(cfg: DictConfig) -> tuple[dict[str, float], Task]:
    """One run of the composed config `cfg`; returns its final metrics and its task."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the model's initialisation: the same on every rank
    # Under torchrun: join the process group; rank 0's run directory is the run's.
    distributed.init_from_env(cfg.get("device", "cpu"))
    distributed.silence_other_ranks()
    main_process = distributed.is_main_process()
    run_dir = Path(distributed.agree(HydraConfig.get().runtime.output_dir))
    task = build_task(cfg, run_dir)
    optimizer = build_optimizer(cfg.optim, task.param_groups())
    train_config = TrainConfig(**cfg.train).validate()
    monitor = MonitorConfig.from_dict(cfg.monitor)  # validated before the progress bar starts
    run_config = OmegaConf.to_container(cfg, resolve=True)
    if distributed.is_distributed():
        run_config["distributed"] = batches = distributed_batches(cfg)
        if main_process:
            print(", ".join(f"{k}={v}" for k, v in batches.items()), flush=True)
    # Rank 0 alone writes the events, metrics.json and the checkpoint, and shows progress.
    if main_process:
        logger = RunLogger(run_dir, cfg.train.steps, progress=cfg.logging.progress)
        hydra_cfg = HydraConfig.get()  # the HParams tab: this run's overrides and group choices
        logger.hparams(config_hparams(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices))
    else:
        logger = NullLogger()
    try:
        metrics = train(
            task, optimizer, train_config, monitor=monitor, logger=logger,
            log_images=cfg.logging.images, run_config=run_config,
        )  # fmt: skip
    finally:
        if main_process:
            logger.close()
    distributed.shutdown()  # after an error, torchrun ends the other ranks instead
    if main_process:
        summary = " ".join(f"{k}={metrics[k]:.4g}" for k in task.summary_keys if k in metrics)
        time_s = metrics["wall_time_s"]
        print(f"done: {describe(cfg)} {summary} time={time_s:.1f}s run_dir={run_dir}")
    return metrics, task


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


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> float | None:
    try:
        metrics, task = run(cfg)
    except (ValueError, TypeError, NotImplementedError) as err:  # a user error: one line, exit 2
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteError, FloatingPointError) as err:  # diverged (not a user error): exit 1
        print(f"error: {err}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return math.nan  # one diverged job must not end a sweep (lr sweeps probe divergence)
        sys.exit(1)
    return None if task.objective_key is None else metrics.get(task.objective_key)  # for sweepers


if __name__ == "__main__":
    sys.argv = quiet_hydra_on_other_ranks(sys.argv)
    main()
