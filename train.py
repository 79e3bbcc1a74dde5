"""kinetic's command line: `python train.py [group=option ...] [key=value ...]` (Hydra).

    python train.py env=hypergrid env.ndim=4 env.height=8 loss=db optim.lr=3e-3 seed=2
    python train.py -m optim=vradam,adamw seed=0,1,2

Each run writes its resolved config, TensorBoard events, metrics.json and a checkpoint to its
run directory (`runs/<date>/<time>`, or `multirun/<date>/<time>/<job>` for -m).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kinetic import MonitorConfig, RunLogger, Task, TrainConfig, build_task, train
from kinetic.device import resolve_device
from kinetic.logging import config_hparams
from kinetic.precision import Precision
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
    torch.manual_seed(cfg.seed)
    # Checked before anything is built: an unavailable device or unknown precision is one line.
    precision = Precision(cfg.precision, resolve_device(cfg.device))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    task = build_task(cfg, run_dir)
    optimizer = build_optimizer(cfg.optim, task.param_groups())
    train_config = TrainConfig(**cfg.train).validate()
    monitor = MonitorConfig.from_dict(cfg.monitor)  # validated before the progress bar starts
    logger = RunLogger(run_dir, cfg.train.steps, progress=cfg.logging.progress)
    hydra_cfg = HydraConfig.get()  # the HParams tab: this run's overrides and group choices
    logger.hparams(config_hparams(cfg, hydra_cfg.overrides.task, hydra_cfg.runtime.choices))
    try:
        metrics = train(
            task, optimizer, train_config, monitor=monitor, logger=logger,
            log_images=cfg.logging.images, run_config=OmegaConf.to_container(cfg, resolve=True),
            precision=precision,
        )  # fmt: skip
    finally:
        logger.close()
    summary = " ".join(f"{k}={metrics[k]:.4g}" for k in task.summary_keys if k in metrics)
    print(f"done: {describe(cfg)} {summary} time={metrics['wall_time_s']:.1f}s run_dir={run_dir}")
    return metrics, task


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
    main()
