# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""Training steps per second of kinetic's DDPM step against a plain diffusers-style loop.

The plain loop follows diffusers' `examples/unconditional_image_generation/train_unconditional.py`
(add_noise, ε-MSE, backward, clip_grad_norm_ to 1, AdamW step, lr_scheduler step, zero_grad,
EMAModel step) in fp32, the recipe's default precision, on the same UNet
(configs/model/unet.yaml), the same batch size and the same digits. Both loops use the same
optimizer and EMA, built from the same config: `torch.optim.AdamW(fused=True)` with the
config's lr, betas, eps and weight decay (kinetic's `optim=adamw` is torch's AdamW, fused by
default), and `EMAModel(..., foreach=True)` with the config's `task.ema` settings (as
`DDPMTask.from_config` builds it), so the plain/kinetic ratio measures the loops, not their
kernels. kinetic's step is the real thing: `kinetic.train` on `DDPMTask`, timed between
successive calls of a loop callback, so it includes everything the loop does per step
(gradient norm, guard, clipping, the default monitors, schedule, EMA) except the logging and
evaluation steps. The per-step monitor signals run on 2 of every `monitor.every` steps; the
sharpness probe (every `monitor.sharpness.every` steps; both printed at run time from the
config) does not fall in these short rounds: `benchmarks/monitor_overhead.py` times it.
kinetic runs with AdamW and with VRAdam in fp32, and with VRAdam in bf16 autocast
(`precision=bf16`), the fastest setting on a CPU with AVX512-BF16
(benchmarks/compile_speed.py). Variants run in interleaved rounds so drift in the machine's
speed hits all of them alike; each round's first step (and kinetic's last, which logs) is not
timed.

    python benchmarks/ddpm_step.py                     # 1 and 2 threads
    python benchmarks/ddpm_step.py --threads 1 --rounds 3 --steps 12

Prints, per thread count (`--threads`, intra-op threads), the median and the mean ms/step of
each variant and their ratios against the plain loop measured in the same run: the mean is
over every timed step, the steps with monitor work included (the throughput a run gets); the
median is the typical step, which hides that periodic work.
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
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere, like the other benchmarks

import diffusion.config  # noqa: F401  (registers task=ddpm)
import gfn.config  # noqa: F401  (registers task=gfn: configs/ name its schema)
from diffusion.task import DDPMTask
from kinetic import MonitorConfig, TrainConfig, train
from optim import build_optimizer

CONFIGS = str(ROOT / "configs")
BASELINE = "plain-adamw"


def compose_cfg(optim: str, steps: int, cache_dir: str, extra: list[str]):
    """The default `task=ddpm` config, for `steps` steps that never log or evaluate midway."""
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(
            "config",
            [
                "task=ddpm", f"optim={optim}", f"train.steps={steps}",
                f"train.log_every={steps}", f"train.eval_every={steps}",
                "train.warmup_steps=0", "task.quality=false", f"task.cache_dir={cache_dir}",
                "logging.progress=false", *extra,
            ],
        )  # fmt: skip


class KineticRunner:
    """kinetic.train on a DDPMTask; each `run()` is one call of the loop, timed per step."""

    def __init__(
        self, optim: str, steps: int, workdir: Path, extra: list[str], precision: str = "fp32"
    ) -> None:
        self.precision = precision
        torch.manual_seed(0)
        self.cfg = compose_cfg(optim, steps, str(workdir / "cache"), extra)
        self.task = DDPMTask.from_config(self.cfg, workdir / optim)
        self.optimizer = build_optimizer(self.cfg.optim, self.task.param_groups())
        # No evaluation (not timed anyway; keeps each round short), no files.
        self.config = TrainConfig(**{**self.cfg.train, "eval_every": 0})
        self.monitor = MonitorConfig.from_dict(self.cfg.monitor)

    def run(self) -> list[float]:
        stamps: list[float] = []
        train(
            self.task, self.optimizer, self.config, monitor=self.monitor,
            callbacks=[lambda step: stamps.append(time.perf_counter())], precision=self.precision,
        )  # fmt: skip
        # Step k's time runs from the end of step k-1 to the end of step k; the last step logs.
        deltas = [b - a for a, b in itertools.pairwise(stamps)]
        return deltas[:-1]


class PlainRunner:
    """diffusers' train_unconditional.py inner loop, on the same UNet and data as kinetic."""

    def __init__(self, steps: int, workdir: Path, extra: list[str]) -> None:
        torch.manual_seed(0)
        cfg = compose_cfg("adamw", steps, str(workdir / "cache"), extra)
        task = DDPMTask.from_config(
            cfg, workdir / "plain"
        )  # only for the same UNet, scheduler and data
        self.model, self.noise_scheduler = task.model, task.noise_scheduler
        self.images, self.batch_size, self.steps = task.data.train, cfg.task.batch_size, steps
        ema = cfg.task.ema
        self.ema = EMAModel(
            self.model.parameters(), decay=ema.decay, use_ema_warmup=ema.use_ema_warmup,
            inv_gamma=ema.inv_gamma, power=ema.power, foreach=True,
        )  # fmt: skip
        # kinetic's AdamW (optim=adamw) with the same settings: torch's, fused.
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
            weight_decay=opt.weight_decay, fused=True,
        )  # fmt: skip
        self.lr_scheduler = get_scheduler(
            "cosine", self.optimizer, num_warmup_steps=0, num_training_steps=10**6
        )

    def run(self) -> list[float]:
        deltas = []
        for _ in range(self.steps):
            start = time.perf_counter()
            index = torch.randint(self.images.shape[0], (self.batch_size,))
            clean_images = self.images[index]
            noise = torch.randn(clean_images.shape)
            timesteps = torch.randint(
                0, self.noise_scheduler.config.num_train_timesteps, (self.batch_size,)
            )
            noisy_images = self.noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = self.model(noisy_images, timesteps).sample
            loss = F.mse_loss(model_output.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
            self.ema.step(self.model.parameters())
            deltas.append(time.perf_counter() - start)
        return deltas[1:]  # as for kinetic: the first step of a round is not counted


OPTIMIZER_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")
EMA_KEYS = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power",
            "foreach")  # fmt: skip


def check_same_settings(plain: PlainRunner, kinetic: KineticRunner) -> None:
    """Refuse to time loops whose AdamW or EMA settings differ (the docstring's claim)."""

    def settings(optimizer: torch.optim.Optimizer) -> dict:
        group = optimizer.param_groups[0]
        return {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in group.items()
            if k in OPTIMIZER_KEYS
        }

    ours, theirs = settings(plain.optimizer), settings(kinetic.optimizer)
    if not isinstance(kinetic.optimizer, torch.optim.AdamW) or ours != theirs:
        raise RuntimeError(f"the plain loop's AdamW differs from kinetic's: {ours} vs {theirs}")
    ema = kinetic.task.ema
    if any(getattr(plain.ema, k) != getattr(ema, k) for k in EMA_KEYS):
        raise RuntimeError("the plain loop's EMA settings differ from DDPMTask's")


def bench(threads: int, rounds: int, steps: int, extra: list[str]) -> dict[str, list[float]]:
    """Seconds per step of each variant at `threads` intra-op threads, every timed step."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runners = {
            BASELINE: PlainRunner(steps, workdir, extra),
            "kinetic-adamw": KineticRunner("adamw", steps, workdir, extra),
            "kinetic-vradam": KineticRunner("vradam", steps, workdir, extra),
            "kinetic-vradam-bf16": KineticRunner("vradam", steps, workdir, extra, "bf16"),
        }
        check_same_settings(runners[BASELINE], runners["kinetic-adamw"])
        for runner in runners.values():  # warm-up round (allocations, optimizer state)
            runner.run()
        samples: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, runner in runners.items():
                samples[name] += runner.run()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="steps per round and variant")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. task.batch_size=64")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    monitor = MonitorConfig.from_dict(compose_cfg("adamw", 1, ".cache", args.overrides).monitor)
    print(f"DDPM train step, default task=ddpm config {args.overrides}, CPU, "
          f"{args.rounds} rounds x {args.steps} steps, load average {load:.2f}; kinetic's "
          f"monitors: signals on 2 of every {monitor.every} steps, sharpness probe every "
          f"{monitor.sharpness.every} steps (not in these rounds); mean = every timed step, "
          "median = the typical step")  # fmt: skip
    print(f"{'threads':>7}  {'variant':<20} {'median ms':>9} {'mean ms':>8} "
          f"{'median vs ' + BASELINE:>22} {'mean vs ' + BASELINE:>20}")  # fmt: skip
    for threads in args.threads:
        samples = bench(threads, args.rounds, args.steps, args.overrides)
        medians = {name: statistics.median(times) for name, times in samples.items()}
        means = {name: statistics.fmean(times) for name, times in samples.items()}
        for name in samples:
            print(
                f"{threads:>7}  {name:<20} {medians[name] * 1e3:>9.1f} {means[name] * 1e3:>8.1f} "
                f"{medians[BASELINE] / medians[name]:>21.3f}x "
                f"{means[BASELINE] / means[name]:>19.3f}x"
            )
        over = {
            kind: (stat["kinetic-vradam"] - stat["kinetic-adamw"]) / stat["kinetic-adamw"]
            for kind, stat in (("medians", medians), ("means", means))
        }
        print(f"{threads:>7}  VRAdam over AdamW in kinetic: {over['medians']:+.1%} of a step "
              f"(medians), {over['means']:+.1%} (means)")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
