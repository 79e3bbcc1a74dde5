# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""What torch.compile, channels_last and bf16 autocast buy on this machine, per training step.

Two models, each trained with kinetic's default optimizer (VRAdam) on its default config:

- ``unet``: the DDPM step (configs/model/unet.yaml, batch 128 of 8x8 digits): forward, ε-MSE,
  backward, optimizer step. Variants: eager, channels_last, compile, compile + channels_last,
  bf16 autocast, compile + bf16.
- ``gfn``: a full trajectory-balance iteration on HyperGrid 8^4 at batch 16 with the 256x2 MLP
  (sample, log-probs, loss, backward, step). Variants: eager, compile of the policy (the trunk
  and heads; the sampler calls it on a different batch size at every step, so it is compiled
  with dynamic shapes), bf16 autocast around the loss.

Each variant's first steps compile (the compile time printed is the time of the steps before
the step time settles, minus that many settled steps); the step time is the median over
interleaved rounds of `--steps` steps (variants alternate, so drift in the machine's speed hits
all alike). Run one process per thread count, with a fresh Inductor cache (cold compile):

    python benchmarks/compile_speed.py --threads 1
    python benchmarks/compile_speed.py --threads 2 --models unet --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from diffusion.data import load_digits_split
from diffusion.task import build_noise_scheduler, build_unet
from envs.hypergrid import HyperGrid
from gfn.losses import get_loss
from gfn.policies import GFlowNet, MLPPolicy
from gfn.sampler import sample_trajectories, trajectory_log_probs
from optim import VRAdam

WARMUP = 8  # steps per variant before timing (compiles, recompiles, allocator warm-up)


def _autocast(bf16: bool):
    if bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unet_step(variant: str) -> Callable[[], None]:
    """One DDPM training step of the default UNet under `variant`, as a closure."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.load(ROOT / "configs/model/unet.yaml")
    model = build_unet(model_cfg, channels=1, resolution=8)
    parts = set(variant.split("+"))
    if "channels_last" in parts:
        model = model.to(memory_format=torch.channels_last)
    optimizer = VRAdam(model.parameters(), lr=2e-3, beta3=1.0)
    forward = torch.compile(model) if "compile" in parts else model
    scheduler = build_noise_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    abar = scheduler.alphas_cumprod
    images = load_digits_split(400, 0)[0]  # (997, 1, 8, 8)
    generator = torch.Generator().manual_seed(0)
    bf16 = "bf16" in parts

    def step() -> None:
        x0 = images[torch.randint(len(images), (128,), generator=generator)]
        if "channels_last" in parts:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(1000, (128,), generator=generator)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with _autocast(bf16):
            loss = F.mse_loss(forward(x_t, t).sample.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def gfn_step(variant: str) -> Callable[[], None]:
    """One trajectory-balance iteration on HyperGrid 8^4 (batch 16) under `variant`."""
    torch.manual_seed(0)
    env = HyperGrid(ndim=4, height=8)
    policy = MLPPolicy(env.ndim * env.height, env.n_actions, hidden=256, n_layers=2)
    parts = set(variant.split("+"))
    if "compile" in parts:
        policy = torch.compile(policy, dynamic=True)
    gflownet = GFlowNet(policy)
    groups = gflownet.parameter_groups(log_z_lr=0.1)
    optimizer = VRAdam(groups, lr=5e-3, beta3=0.03, norm="group")
    loss_fn = get_loss("tb")
    generator = torch.Generator().manual_seed(0)
    bf16 = "bf16" in parts

    def step() -> None:
        batch = sample_trajectories(gflownet, env, 16, generator)
        with _autocast(bf16):
            loss = loss_fn(trajectory_log_probs(gflownet, env, batch), batch, gflownet.log_z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


MODELS = {
    "unet": (
        unet_step,
        ["eager", "channels_last", "compile", "compile+channels_last", "bf16", "compile+bf16"],
    ),
    "gfn": (gfn_step, ["eager", "compile", "bf16"]),
}


def measure(model: str, variants: list[str], rounds: int, steps: int) -> None:
    build, _ = MODELS[model]
    closures, compile_s = {}, {}
    for variant in variants:
        closures[variant] = step = build(variant)
        times = []
        for _ in range(WARMUP):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        settled = statistics.median(times[-3:])
        compile_s[variant] = sum(times) - WARMUP * settled  # ~0 for eager variants
    samples: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant, step in closures.items():
            for _ in range(steps):
                start = time.perf_counter()
                step()
                samples[variant].append(time.perf_counter() - start)
    base = statistics.median(samples[variants[0]])
    for variant in variants:
        times = samples[variant]
        median, mean = statistics.median(times), statistics.fmean(times)
        print(
            f"{model:<5} {torch.get_num_threads():>7} {variant:<22} {median * 1e3:>9.2f} "
            f"{mean * 1e3:>9.2f} {base / median:>9.3f}x {compile_s[variant]:>9.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15, help="steps per round and variant")
    parser.add_argument("--variants", nargs="+", help="a subset of each model's variants")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"CPU, {args.threads} thread(s), load average {load:.2f} at the start, medians over "
          f"{args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"{'model':<5} {'threads':>7} {'variant':<22} {'median ms':>9} {'mean ms':>9} "
          f"{'vs eager':>10} {'compile s':>9}")  # fmt: skip
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on a first run
        for model in args.models:
            variants = MODELS[model][1]
            if args.variants:
                variants = [v for v in variants if v in args.variants or v == "eager"]
            measure(model, variants, args.rounds, args.steps)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
