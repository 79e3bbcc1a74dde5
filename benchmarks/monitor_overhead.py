"""Cost of the stability monitors: median step time with `monitor=off` vs `monitor=default`.

Runs the real training loop (kinetic.loop.train) on the hypergrid default (task=gfn: 8x8 grid,
batch 16, MLP) and on the DDPM default (task=ddpm: diffusers UNet2DModel on 8x8 digits, batch
128), alternating off/default runs so that machine load hits both alike, and times every step
with a `callbacks` hook of the loop. The sharpness probe runs every 500 steps by default, so it
is timed on its own and reported amortised over those 500 steps.

    python benchmarks/monitor_overhead.py [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kinetic import TrainConfig, build_task, train  # noqa: E402
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor  # noqa: E402
from optim import build_optimizer  # noqa: E402


def _cfg(task: str, monitor: str, steps: int):
    overrides = [f"task={task}", f"monitor={monitor}", f"train.steps={steps}",
                 f"train.eval_every={10 * steps}", "train.log_every=10",
                 "train.warmup_steps=0"]  # fmt: skip
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
    print(f"threads={torch.get_num_threads()} reps={args.reps}")
    for task_name, steps in (("gfn", args.gfn_steps), ("ddpm", args.ddpm_steps)):
        times: dict[str, list[float]] = {"off": [], "default": []}
        for _ in range(args.reps):
            for monitor in ("off", "default"):
                times[monitor] += _step_times(task_name, monitor, steps)
        off, on = (statistics.median(times[k]) for k in ("off", "default"))
        probe = _probe_seconds(task_name)
        every = MonitorConfig().sharpness_every
        print(
            f"{task_name}: median step off={1e3 * off:.3f} ms default={1e3 * on:.3f} ms "
            f"ratio={on / off:.3f} (n={len(times['off'])}/{len(times['default'])} steps); "
            f"sharpness probe {1e3 * probe:.0f} ms = {probe / every / off:.1%} of a step "
            f"amortised over {every} steps"
        )


if __name__ == "__main__":
    main()
