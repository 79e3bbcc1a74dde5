# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""One command for whoever has a GPU: does kinetic run right, sync-free and fast on it?

    python benchmarks/gpu_check.py            # the full check (a few minutes on one GPU)
    python benchmarks/gpu_check.py --quick    # fewer steps and shorter runs (CI runs this)

With CUDA, four sections:

1. ``tests``: every device-parametrised test of the suite on CUDA (``pytest -m device -k cuda``).
2. ``syncs``: N steps of every optimizer (every VRAdam implementation that runs here) and of
   the GFlowNet and DDPM training steps, in fp32 and bf16, under
   ``torch.cuda.set_sync_debug_mode``. Every synchronizing CUDA op is attributed to the
   innermost function of this repository on the stack; a sync outside `ALLOWED_SYNCS` (the
   documented ones) fails the check. The mode is "warn", turned into failures here, rather
   than "error", so that one run names every offending line instead of the first.
3. ``speed``: ms/step of the same steps on the CPU and on CUDA.
4. ``runs``: short HyperGrid and DDPM runs through train.py on CUDA in fp32 and bf16, with
   their metrics.

Without CUDA it says so, runs the CPU half (``speed`` on the CPU, ``runs`` with device=cpu)
and exits 0. Exit code 1 when any check fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from omegaconf import OmegaConf

import optim.vradam
from diffusion.data import BatchSampler, load_digits_split
from diffusion.task import build_noise_scheduler, build_unet
from envs.hypergrid import HyperGrid
from gfn.losses import get_loss
from gfn.policies import GFlowNet, MLPPolicy
from gfn.sampler import sample_trajectories, trajectory_log_probs
from kinetic.precision import Precision
from kinetic.stability.guard import NonFiniteGuard
from optim import OPTIMIZERS, build_optimizer

# Host syncs a training step may make, by the function of this repository they happen in.
ALLOWED_SYNCS = {
    ("gfn/sampler.py", "sample_trajectories"): "the sampler's per-step exit check",
    ("gfn/sampler.py", "trajectory_log_probs"): "the number of visited states",
    ("gfn/sampler.py", "_unique_states"): "the number of distinct states",
    ("gfn/replay.py", "_gather"): "the longest replayed trajectory",
    ("kinetic/stability/guard.py", "is_finite"): "the non-finite guard's one check",
}
Step = Callable[[], None]


# --- the steps checked ----------------------------------------------------------------------


def runnable_vradam_impls(device: torch.device) -> list[str]:
    """VRAdam's implementations that run on `device` (Triton needs CUDA and triton)."""
    impls = [i for i in optim.vradam.IMPLEMENTATIONS if i != "auto"]
    if "triton" in impls and not (device.type == "cuda" and optim.vradam.triton_available()):
        impls.remove("triton")
    return impls


def optimizer_cases(device: torch.device) -> list[tuple[str, dict]]:
    """(label, optimizer config) for every registered optimizer and VRAdam implementation."""
    cases = [(name, {"name": name}) for name in OPTIMIZERS if name != "vradam"]
    cases += [(f"vradam-{i}", {"name": "vradam", "impl": i}) for i in runnable_vradam_impls(device)]
    return cases


def optimizer_step(cfg: dict, device: torch.device) -> Step:
    """Forward, backward and `step()` of an MLP with 0.3M parameters, on `device`."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)
    ).to(device)
    optimizer = build_optimizer({**cfg, "lr": 1e-3}, model.parameters())
    x = torch.randn(64, 256, device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    return step


def _guarded_update(
    loss: torch.Tensor,
    params: list[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    guard: NonFiniteGuard,
    clip: float,
) -> None:
    """The loop's phases after the loss: backward, gradient norm, guard, clip, step."""
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss, optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if not guard.is_finite(loss, grad_norm, params, precision):
        precision.skip(optimizer)
        return
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, grad_norm)
    precision.step(optimizer, checked=True)


def gfn_step(device: torch.device, precision_name: str, small: bool = False) -> Step:
    """One trajectory-balance step on HyperGrid 8^4 (`small`: 8^2) with the 256x2 MLP (`small`:
    64x2), batch 16, VRAdam with the task's preset."""
    torch.manual_seed(0)
    env = HyperGrid(ndim=2 if small else 4, height=8).to(device)
    hidden = 64 if small else 256
    model = GFlowNet(MLPPolicy(env.ndim * 8, env.n_actions, hidden=hidden)).to(device)
    optimizer = build_optimizer(
        {"name": "vradam", "lr": 5e-3, "beta3": 0.03, "norm": "group"},
        model.parameter_groups(log_z_lr=0.1),
    )
    params = list(model.parameters())
    precision, guard = Precision(precision_name, device), NonFiniteGuard([], 10)
    loss_fn, generator = get_loss("tb"), torch.Generator(device).manual_seed(0)

    def step() -> None:
        with precision.autocast():
            batch = sample_trajectories(model, env, 16, generator)
            loss = loss_fn(trajectory_log_probs(model, env, batch), batch, model.log_z)
        _guarded_update(loss, params, optimizer, precision, guard, clip=0.0)

    return step


def ddpm_step(device: torch.device, precision_name: str, small: bool = False) -> Step:
    """One DDPM step of the default UNet (`small`: unet_tiny) on digits, batch 128 (`small`:
    32), VRAdam, clip 1, EMA."""
    torch.manual_seed(0)
    model_cfg = OmegaConf.load(ROOT / f"configs/model/{'unet_tiny' if small else 'unet'}.yaml")
    model = build_unet(model_cfg, channels=1, resolution=8).to(device)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, foreach=True)
    optimizer = build_optimizer({"name": "vradam", "lr": 2e-3}, model.parameters())
    params = list(model.parameters())
    precision, guard = Precision(precision_name, device), NonFiniteGuard([], 10)
    scheduler = build_noise_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    generator = torch.Generator(device).manual_seed(0)
    images = load_digits_split(400, 0)[0].to(device)
    batches = BatchSampler(images, 32 if small else 128, generator)

    def step() -> None:
        x0 = batches()
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t = torch.randint(1000, (x0.shape[0],), generator=generator, device=device)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        with precision.autocast():
            loss = F.mse_loss(model(x_t, t).sample.float(), noise)
        _guarded_update(loss, params, optimizer, precision, guard, clip=1.0)
        ema.step(model.parameters())

    return step


def training_cases(small: bool = False) -> list[tuple[str, Callable[[torch.device], Step]]]:
    """(label, builder) of the GFlowNet and DDPM training steps in fp32 and bf16."""
    cases = []
    for precision_name in ("fp32", "bf16"):
        for name, build in (("gfn", gfn_step), ("ddpm", ddpm_step)):
            builder = functools.partial(build, precision_name=precision_name, small=small)
            cases.append((f"{name}-{precision_name}", builder))
    return cases


# --- host-sync recording --------------------------------------------------------------------


@functools.cache
def _functions(path: str) -> list[tuple[int, int, str]]:
    """(first line, last line, name) of every function in the repository file `path`."""
    tree = ast.parse((ROOT / path).read_text())
    return [
        (node.lineno, node.end_lineno or node.lineno, node.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def _enclosing_function(path: str, line: int) -> str:
    spans = [(first, name) for first, last, name in _functions(path) if first <= line <= last]
    return max(spans)[1] if spans else "<module>"


class SyncRecorder:
    """Records every synchronizing CUDA op inside it as (repository file, function, line):
    the innermost frame of this repository on the stack when the op ran."""

    def __init__(self) -> None:
        self.syncs: list[tuple[str, str, int]] = []
        self._stack = contextlib.ExitStack()

    def _hook(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):
            return
        here = Path(__file__).resolve()
        for frame in reversed(traceback.extract_stack()):
            path = Path(frame.filename).resolve()
            if path == here or ROOT not in path.parents:
                continue
            rel = path.relative_to(ROOT).as_posix()
            self.syncs.append((rel, _enclosing_function(rel, frame.lineno), frame.lineno))
            return
        self.syncs.append(("<outside the repository>", filename, lineno))

    def __enter__(self) -> SyncRecorder:
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = self._hook
        torch.cuda.set_sync_debug_mode("warn")
        self._stack.callback(torch.cuda.set_sync_debug_mode, "default")
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def unexpected(self) -> list[str]:
        """The recorded syncs outside `ALLOWED_SYNCS`, as 'file:line (function)', once each."""
        bad = {f"{f}:{line} ({fn})" for f, fn, line in self.syncs if (f, fn) not in ALLOWED_SYNCS}
        return sorted(bad)


def check_syncs(steps: int) -> list[str]:
    """Run every optimizer and training step on CUDA under the recorder; the failures."""
    device = torch.device("cuda")
    with SyncRecorder() as probe:
        torch.ones(1, device=device).item()
    if not probe.syncs:
        return ["the sync recorder saw no sync from .item(); the sync check cannot run here"]
    failures = []
    cases = [
        (f"optim {n}", functools.partial(optimizer_step, cfg)) for n, cfg in optimizer_cases(device)
    ]
    cases += [(f"train {n}", build) for n, build in training_cases()]
    for label, build in cases:
        step = build(device)
        step()  # first step: lazy state initialisation may sync once, by design
        torch.cuda.synchronize()
        with SyncRecorder() as recorder:
            for _ in range(steps):
                step()
        torch.cuda.synchronize()
        bad = recorder.unexpected()
        allowed = len(recorder.syncs) - sum(
            1 for f, fn, _ in recorder.syncs if (f, fn) not in ALLOWED_SYNCS
        )
        status = "ok" if not bad else "FAIL"
        print(f"  {label:<24} {status:<4} {allowed / steps:6.1f} allowed syncs/step", flush=True)
        failures += [f"{label}: host sync at {where}" for where in bad]
    return failures


# --- speed ----------------------------------------------------------------------------------


def time_step(step: Step, device: torch.device, steps: int) -> float:
    """Median ms per step after two warm-up steps (CUDA: synchronised per step)."""
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def speed(devices: list[torch.device], steps: int, optimizers: bool, small: bool) -> None:
    """ms/step of the training steps (and of every optimizer) on each device."""
    print(f"  {'step':<24}" + "".join(f"{d!s:>12}" for d in devices) + "   (ms/step)")
    cases = training_cases(small)
    if optimizers:
        cases += [
            (f"optim {n}", functools.partial(optimizer_step, c))
            for n, c in optimizer_cases(devices[-1])
        ]
    for label, build in cases:
        row = []
        for device in devices:
            try:
                row.append(f"{time_step(build(device), device, steps):12.2f}")
            except Exception as err:  # an implementation that does not run on this device
                row.append(f"{'n/a':>12}")
                print(f"  {label} on {device}: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"  {label:<24}" + "".join(row), flush=True)


# --- tests and runs -------------------------------------------------------------------------


def run_tests() -> list[str]:
    """Every device-parametrised test on CUDA, through pytest."""
    command = [sys.executable, "-m", "pytest", "-q", "-m", "device", "-k", "cuda", "tests"]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    print("  " + (result.stdout.strip().splitlines() or [""])[-1])
    if result.returncode != 0:
        print(result.stdout[-4000:])
        return [f"device tests on CUDA failed (exit {result.returncode})"]
    return []


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }


def short_runs(device: str, quick: bool) -> list[str]:
    """HyperGrid and DDPM through train.py on `device` in fp32 and bf16; their summary lines."""
    gfn_steps, ddpm_steps = (60, 20) if quick else (600, 300)
    runs = {
        "hypergrid": [f"train.steps={gfn_steps}", f"train.eval_every={gfn_steps}"],
        "ddpm": [
            "task=ddpm", "model=unet_tiny" if quick else "model=unet", f"train.steps={ddpm_steps}",
            f"train.eval_every={ddpm_steps}", "train.warmup_steps=0", "task.sampling.steps=10",
            f"task.quality={str(not quick).lower()}",
        ],
    }  # fmt: skip
    failures = []
    run_root = tempfile.mkdtemp(prefix="kinetic_gpu_check_")
    for name, overrides in runs.items():
        for precision_name in ("fp32", "bf16"):
            command = [
                sys.executable, "train.py", f"device={device}", f"precision={precision_name}",
                "logging.progress=false", f"hydra.run.dir={run_root}/{name}-{precision_name}",
                *overrides,
            ]  # fmt: skip
            start = time.perf_counter()
            result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
            wall = time.perf_counter() - start
            done = [line for line in result.stdout.splitlines() if line.startswith("done:")]
            if result.returncode != 0 or not done:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                failures.append(f"run {name} {precision_name} on {device}: {' | '.join(tail)}")
                print(f"  {name:<10} {precision_name}: FAIL", flush=True)
                continue
            summary = re.sub(r" run_dir=\S+", "", done[-1])
            print(f"  {name:<10} {precision_name}: {wall:5.1f}s  {summary}", flush=True)
    return failures


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and shorter runs")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "syncs", "speed", "runs"],
        help="sections to leave out",
    )  # fmt: skip
    args = parser.parse_args()
    steps = 2 if args.quick else 20
    torch.set_num_threads(1 if args.quick else min(4, os.cpu_count() or 1))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.2f}")  # fmt: skip
    failures: list[str] = []
    if not torch.cuda.is_available():
        print("No CUDA device here: running the CPU half (speed on the CPU, runs with device=cpu).")
        if "speed" not in args.skip:
            print("speed:")
            speed([torch.device("cpu")], steps, optimizers=not args.quick, small=args.quick)
        if "runs" not in args.skip:
            print("runs (device=cpu):")
            failures += short_runs("cpu", args.quick)
    else:
        print(f"CUDA: {torch.cuda.get_device_name()}")
        if "tests" not in args.skip:
            print("tests (pytest -m device -k cuda):")
            failures += run_tests()
        if "syncs" not in args.skip:
            print(f"syncs ({steps} steps each, allowed: {', '.join(ALLOWED_SYNCS.values())}):")
            failures += check_syncs(steps)
        if "speed" not in args.skip:
            print("speed:")
            speed([torch.device("cpu"), torch.device("cuda")], steps, True, small=False)
        if "runs" not in args.skip:
            print("runs (device=cuda):")
            failures += short_runs("cuda", args.quick)
    for failure in failures:
        print(f"FAIL: {failure}")
    print("gpu_check: " + ("all checks passed" if not failures else f"{len(failures)} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
