"""Cost of the stability monitors: mean and median step time with `monitor=off` vs
`monitor=default`.

Runs the real training loop (kinetic.loop.train) on the hypergrid default (task=gfn: 8x8 grid,
batch 16, MLP) and on the DDPM default (task=ddpm: diffusers UNet2DModel on 8x8 digits, batch
128) with each task's default `train` settings (its log_every, clipping and schedule), one
evaluation after the last step; off/default runs alternate so that machine load hits both alike,
and every step is timed with a `callbacks` hook of the loop. Each run leaves out its first 10%
of steps (warm-up) and its last (the evaluation). At `--threads` intra-op threads (default 1),
printed with the results.

"mean" is over every timed step, so it includes the steps that do periodic work (the update
signals on 2 of every `monitor.every` steps, the logged scalars every `train.log_every`
steps); "median" is the typical step, which hides that work. The sharpness probe runs every
`monitor.sharpness.every` steps, more than a short run has, so it is timed on its own and
reported amortised over that interval; the interval is read from the config composed at run
time (configs/monitor/default.yaml on top of MonitorConfig) and printed.

    python benchmarks/monitor_overhead.py [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusion.config  # noqa: E402, F401  (registers task=ddpm)
import gfn.config  # noqa: E402, F401  (registers task=gfn: configs/ name its schema)
from kinetic import TrainConfig, build_task, train  # noqa: E402
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor  # noqa: E402
from optim import build_optimizer  # noqa: E402


def _cfg(task: str, monitor: str, steps: int):
    overrides = [f"task={task}", f"monitor={monitor}", f"train.steps={steps}",
                 f"train.eval_every={10 * steps}", "train.warmup_steps=0"]  # fmt: skip
    if task == "ddpm":
        overrides += ["task.quality=false", "task.cache_dir=.cache/kinetic"]  # no hydra runtime
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _step_times(task_name: str, monitor: str, steps: int) -> list[float]:
    """Per-step seconds of one run, without the first 10% (warm-up) and the last step (eval)."""
    cfg = _cfg(task_name, monitor, steps)
    torch.manual_seed(cfg.seed)
    stamps = [time.perf_counter()]
    with tempfile.TemporaryDirectory() as run_dir:
        task = build_task(cfg, run_dir)
        optimizer = build_optimizer(cfg.optim, task.param_groups())
        train(
            task, optimizer, TrainConfig(**cfg.train), monitor=MonitorConfig.from_dict(cfg.monitor),
            callbacks=[lambda step: stamps.append(time.perf_counter())],
        )  # fmt: skip
    dts = [b - a for a, b in itertools.pairwise(stamps)]
    return dts[steps // 10 : -1]


def _probe_seconds(task_name: str) -> float:
    cfg = _cfg(task_name, "default", 20)
    with tempfile.TemporaryDirectory() as run_dir:
        task = build_task(cfg, run_dir)
        optimizer = build_optimizer(cfg.optim, task.param_groups())
        loss, _ = task.loss(1)
        loss.backward()
        optimizer.step()
        monitor = StabilityMonitor(MonitorConfig.from_dict(cfg.monitor), optimizer)
        start = time.perf_counter()
        monitor.probe(lambda: task.probe_loss(2))
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3, help="off/default pairs per task")
    parser.add_argument("--gfn-steps", type=int, default=400)
    parser.add_argument("--ddpm-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"threads={torch.get_num_threads()} reps={args.reps}, load average {load}; mean = every "
          "timed step (periodic work included), median = the typical step")  # fmt: skip
    for task_name, steps in (("gfn", args.gfn_steps), ("ddpm", args.ddpm_steps)):
        times: dict[str, list[float]] = {"off": [], "default": []}
        for _ in range(args.reps):
            for monitor in ("off", "default"):
                times[monitor] += _step_times(task_name, monitor, steps)
        cfg = _cfg(task_name, "default", steps)
        monitor_cfg = MonitorConfig.from_dict(cfg.monitor)
        mean = {k: statistics.fmean(v) for k, v in times.items()}
        median = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{task_name}: {len(times['off'])}/{len(times['default'])} steps (off/default), "
            f"log_every={cfg.train.log_every}, update signals on 2 of every {monitor_cfg.every} "
            "steps"
        )
        for stat, values in (("mean", mean), ("median", median)):
            off, on = values["off"], values["default"]
            print(f"  {stat:<6} step off={1e3 * off:.3f} ms default={1e3 * on:.3f} ms "
                  f"ratio={on / off:.3f} ({on / off - 1:+.1%})")  # fmt: skip
        every = monitor_cfg.sharpness.every
        if every > 0:
            probe = _probe_seconds(task_name)
            amortised = mean["default"] + probe / every
            print(f"  sharpness probe {1e3 * probe:.0f} ms every {every} steps (monitor."
                  f"sharpness.every) = {probe / every / mean['off']:.1%} of a mean step amortised; "
                  f"default with it: {1e3 * amortised:.3f} ms, ratio="
                  f"{amortised / mean['off']:.3f} to off (means)")  # fmt: skip
        else:
            print("  sharpness probe off in monitor=default (monitor.sharpness.every=0)")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at the end {load}")


if __name__ == "__main__":
    main()
