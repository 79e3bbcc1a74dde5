"""Cost of a training checkpoint at the defaults: milliseconds to write one and megabytes on disk.

Runs the real loop (`kinetic.train`) on the task=gfn default (8x8 HyperGrid, MLP, VRAdam, the
monitors) and the task=ddpm default (UNet2DModel on 8x8 digits, EMA, VRAdam, the monitors), with
a checkpoint every few steps, and times the two parts of each: gathering the state
(`capture_training_state`: state dicts, the EMA weights as a UNet, every RNG stream) and writing
it (`Checkpoints.save`: serialise, SHA-256, fsync, rename). Also times loading one back
(`load_checkpoint`: read, digest check, `torch.load(weights_only=True)`), and sets the write time
against a training step's, measured in the same run.

    python benchmarks/checkpoint_cost.py [--threads 1] [--saves 8]
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

import diffusion.config  # noqa: E402, F401  (registers task=ddpm)
import gfn.config  # noqa: E402, F401  (registers task=gfn: configs/ name its schema)
import kinetic.loop  # noqa: E402
from kinetic import RunLogger, TrainConfig, build_task, train  # noqa: E402
from kinetic.checkpoint import Checkpoints, load_checkpoint  # noqa: E402
from kinetic.stability.monitors import MonitorConfig  # noqa: E402
from optim import build_optimizer  # noqa: E402


def _cfg(task: str, steps: int, every: int):
    overrides = [f"task={task}", f"train.steps={steps}", f"train.checkpoint_every={every}",
                 f"train.eval_every={10 * steps}", "train.warmup_steps=0"]  # fmt: skip
    if task == "ddpm":
        overrides += ["task.quality=false"]  # not in the checkpoint; saves training a classifier
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def measure(task_name: str, saves: int, every: int) -> dict[str, float]:
    """Median ms of capture, write and load, the file's MB, and the median step's ms."""
    cfg = _cfg(task_name, saves * every, every)
    torch.manual_seed(cfg.seed)
    capture_s, write_s, stamps = [], [], [time.perf_counter()]
    capture, save = kinetic.loop.capture_training_state, Checkpoints.save

    def timed_capture(**kwargs):
        start = time.perf_counter()
        out = capture(**kwargs)
        capture_s.append(time.perf_counter() - start)
        return out

    def timed_save(self, step, /, **payload):
        start = time.perf_counter()
        path = save(self, step, **payload)
        write_s.append(time.perf_counter() - start)
        return path

    kinetic.loop.capture_training_state, Checkpoints.save = timed_capture, timed_save
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            task = build_task(cfg, run_dir)
            optimizer = build_optimizer(cfg.optim, task.param_groups())
            logger = RunLogger(run_dir, cfg.train.steps, progress=False)
            train(
                task, optimizer, TrainConfig(**cfg.train), logger=logger,
                monitor=MonitorConfig.from_dict(cfg.monitor), log_images=False,
                callbacks=[lambda step: stamps.append(time.perf_counter())],
            )  # fmt: skip
            logger.close()
            path = Checkpoints(run_dir).latest()
            megabytes = path.stat().st_size / 1e6
            load_s = []
            for _ in range(3):
                start = time.perf_counter()
                load_checkpoint(path)
                load_s.append(time.perf_counter() - start)
    finally:
        kinetic.loop.capture_training_state, Checkpoints.save = capture, save
    # A step's time: gap i runs from step i's callback to step i + 1's, so it holds the
    # checkpoint of step i when i is a multiple of `every` (gap 0 holds the setup).
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    steps = [g for i, g in enumerate(gaps) if i > 0 and i % every != 0]
    ms = 1e3
    return {
        "capture_ms": statistics.median(capture_s) * ms,
        "write_ms": statistics.median(write_s) * ms,
        "load_ms": statistics.median(load_s) * ms,
        "mb": megabytes,
        "step_ms": statistics.median(steps) * ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--saves", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}; medians over {args.saves} checkpoints")
    print(f"{'task':<6} {'capture ms':>10} {'write ms':>9} {'total ms':>9} {'MB':>7} "
          f"{'load ms':>8} {'step ms':>8} {'ckpt/step':>9}")  # fmt: skip
    for task, every in (("gfn", 20), ("ddpm", 5)):
        r = measure(task, args.saves, every)
        total = r["capture_ms"] + r["write_ms"]
        print(
            f"{task:<6} {r['capture_ms']:>10.1f} {r['write_ms']:>9.1f} {total:>9.1f} "
            f"{r['mb']:>7.2f} {r['load_ms']:>8.1f} {r['step_ms']:>8.1f} "
            f"{total / r['step_ms']:>9.2f}"
        )


if __name__ == "__main__":
    main()
