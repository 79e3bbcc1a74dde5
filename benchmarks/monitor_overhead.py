"""Cost of the stability monitors: median step time with `monitor=off` vs `monitor=default`.

Runs the real training loop (kinetic.loop.train) on the hypergrid default (task=gfn: 8x8 grid,
batch 16, MLP) and on the DDPM default (task=ddpm: diffusers UNet2DModel on 8x8 digits, batch
128), alternating off/default runs so that machine load hits both alike, and times every step
from the loop's own progress calls. The sharpness probe runs every 500 steps by default, so it
is timed on its own and reported amortised over those 500 steps.

    python benchmarks/monitor_overhead.py [--threads 1] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kinetic.loop import _probe_loss, train  # noqa: E402
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor  # noqa: E402
from optim import build_optimizer  # noqa: E402


class _TimingLogger:
    """Records the time of every finished step (the loop calls progress(1) once per step)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir, self.stamps = run_dir, [time.perf_counter()]

    def progress(self, steps: int) -> None:
        self.stamps.append(time.perf_counter())

    def scalars(self, step, values): ...
    def warn(self, step, message): ...
    def postfix(self, **values): ...
    def image(self, step, tag, image): ...
    def write_metrics(self, metrics): ...


def _cfg(task: str, monitor: str, steps: int):
    overrides = [f"task={task}", f"monitor={monitor}", f"train.steps={steps}",
                 f"train.eval_every={10 * steps}", "train.log_every=10",
                 "train.warmup_steps=0"]  # fmt: skip
    if task == "ddpm":
        overrides += ["task.quality=false", "task.cache_dir=.cache/kinetic"]  # no hydra runtime
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def _task(cfg, run_dir: str):
    if cfg.task.name == "gfn":
        from gfn.task import GFlowNetTask

        return GFlowNetTask(cfg)
    from diffusion.task import DDPMTask

    return DDPMTask(cfg, run_dir)


def _step_times(task_name: str, monitor: str, steps: int) -> list[float]:
    """Per-step seconds of one run, without the first 10% (warm-up) and the last step (eval)."""
    cfg = _cfg(task_name, monitor, steps)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        task = _task(cfg, run_dir)
        optimizer = build_optimizer(cfg.optim, task.param_groups())
        logger = _TimingLogger(run_dir)
        train(task, optimizer, cfg, logger)
    dts = [b - a for a, b in zip(logger.stamps, logger.stamps[1:], strict=False)]
    return dts[steps // 10 : -1]


def _probe_seconds(task_name: str) -> float:
    cfg = _cfg(task_name, "default", 20)
    with tempfile.TemporaryDirectory() as run_dir:
        task = _task(cfg, run_dir)
        optimizer = build_optimizer(cfg.optim, task.param_groups())
        loss, _ = task.loss(1)
        loss.backward()
        optimizer.step()
        monitor = StabilityMonitor(MonitorConfig.from_dict(cfg.monitor), optimizer)
        start = time.perf_counter()
        monitor.probe(lambda: _probe_loss(task, 2))
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
