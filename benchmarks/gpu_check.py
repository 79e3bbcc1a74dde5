# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""One command for whoever has a GPU: does kinetic run right, sync-free and fast on it?

    python benchmarks/gpu_check.py            # the full check (a few minutes on one GPU)
    python benchmarks/gpu_check.py --quick    # fewer steps and shorter runs (CI runs this)

With CUDA, five sections:

1. ``tests``: every device-parametrised test of the suite on CUDA (``pytest -m device -k cuda``).
2. ``syncs``: N steps of every optimizer (every VRAdam implementation that runs here) and of
   the GFlowNet and DDPM training steps, in fp32 and bf16, under
   ``torch.cuda.set_sync_debug_mode``. Every synchronizing CUDA op is attributed to the
   innermost function of this repository on the stack; a sync outside `ALLOWED_SYNCS` (the
   documented ones) fails the check. The mode is "warn", turned into failures here, rather
   than "error", so that one run names every offending line instead of the first.
3. ``speed``: ms/step of the same steps on the CPU and on CUDA.
4. ``rollouts``: the sampler's static rollout, eager and compiled under CUDA graphs
   (``torch.compile(mode="reduce-overhead")``), must draw the dynamic rollout's trajectories;
   ms per rollout of each on HyperGrid 8^4 (batch 16, 256) and bit sequences (batch 16).
5. ``runs``: short HyperGrid and DDPM runs through train.py on CUDA in fp32 and bf16, with
   their metrics.

Without CUDA it says so, runs the CPU half (``speed`` and, without ``--quick``, ``rollouts``
on the CPU, ``runs`` with device=cpu)
and exits 0. Exit code 1 when any check fails.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import itertools
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
from omegaconf import OmegaConf

import optim.vradam
from diffusion.data import build_dataset
from diffusion.task import DDPMTask, build_noise_scheduler, build_unet
from envs.bitseq import BitSequence
from envs.hypergrid import HyperGrid
from gfn.policies import GFlowNet, MLPPolicy
from gfn.sampler import compile_static_steps, sample_trajectories
from gfn.task import GFlowNetTask
from kinetic import TrainConfig, train
from optim import OPTIMIZERS, build_optimizer

# Host syncs a training step may make, by the function of this repository they happen in.
ALLOWED_SYNCS = {
    ("gfn/sampler.py", "_dynamic_rollout"): "the sampler's per-step exit check",
    ("gfn/sampler.py", "_static_rollout"): "the static rollout's per-chunk exit check",
    ("gfn/sampler.py", "trajectory_log_probs"): "the number of visited states",
    ("gfn/sampler.py", "_unique_rows"): "the number of distinct states",
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


class TrainingRun:
    """The real training loop (`kinetic.train`) on a GFlowNet or DDPM task on `device`.

    ``gfn``: trajectory balance on HyperGrid 8^4 (`small`: 8^2) with the 256x2 MLP (`small`:
    64x2), batch 16, VRAdam with the task's preset. ``ddpm``: the default UNet (`small`:
    unet_tiny) on digits, batch 128 (`small`: 32), VRAdam, clip 1, EMA. Monitors and the guard
    at their defaults; no evaluation.
    """

    def __init__(self, kind: str, device: torch.device, precision: str, small: bool) -> None:
        torch.manual_seed(0)
        self.device, self.precision = device, precision
        if kind == "gfn":
            env = HyperGrid(ndim=2 if small else 4, height=8).to(device)
            policy = MLPPolicy(env.ndim * 8, env.n_actions, hidden=64 if small else 256)
            self.task = GFlowNetTask(env, GFlowNet(policy).to(device), "tb", batch_size=16)
            optim_cfg = {"name": "vradam", "lr": 5e-3, "beta3": 0.03, "norm": "group"}
            self.clip = 0.0
        elif kind == "ddpm":
            data_cfg = {"name": "digits", "resolution": 8, "channels": 1, "heldout_size": 400}
            data = build_dataset(OmegaConf.create(data_cfg), 0, device)
            unet = OmegaConf.load(ROOT / f"configs/model/{'unet_tiny' if small else 'unet'}.yaml")
            model = build_unet(unet, channels=1, resolution=8).to(device)
            schedule = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
            noise_scheduler = build_noise_scheduler(schedule)
            self.task = DDPMTask(data, model, noise_scheduler, batch_size=32 if small else 128)
            optim_cfg = {"name": "vradam", "lr": 2e-3}
            self.clip = 1.0
        else:
            raise ValueError(f"Unknown training case: {kind!r}; expected gfn or ddpm")
        self.optimizer = build_optimizer(optim_cfg, self.task.param_groups())

    def run(self, steps: int, on_step: Callable[[int], None] | None = None) -> list[float]:
        """`steps` steps of the loop; returns seconds per step, from the end of one step to the
        end of the next (on CUDA synchronised), the first and the last (a logging step) left
        out. With `on_step`, each step's number goes to it instead and nothing is timed."""
        stamps: list[float] = []

        def callback(step: int) -> None:
            if on_step is not None:
                on_step(step)
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        config = TrainConfig(
            steps=steps, log_every=steps, eval_every=0, clip_grad_norm=self.clip,
            lr_schedule="constant",
        )  # fmt: skip
        train(self.task, self.optimizer, config, precision=self.precision, callbacks=[callback])
        return [b - a for a, b in itertools.pairwise(stamps)][:-1]


def training_cases(small: bool = False) -> list[tuple[str, Callable[[torch.device], TrainingRun]]]:
    """(label, builder) of the GFlowNet and DDPM training runs in fp32 and bf16."""
    cases = []
    for precision in ("fp32", "bf16"):
        for kind in ("gfn", "ddpm"):
            build = functools.partial(TrainingRun, kind, precision=precision, small=small)
            cases.append((f"{kind}-{precision}", build))
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
    """Records every synchronizing CUDA op between `start()` and `stop()` (or inside a `with`)
    as (repository file, function, line): the innermost frame of this repository on the stack
    when the op ran."""

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

    def start(self) -> None:
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("always")
        warnings.showwarning = self._hook
        torch.cuda.set_sync_debug_mode("warn")
        self._stack.callback(torch.cuda.set_sync_debug_mode, "default")

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> SyncRecorder:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def unexpected(self) -> list[str]:
        """The recorded syncs outside `ALLOWED_SYNCS`, as 'file:line (function)', once each."""
        bad = {f"{f}:{line} ({fn})" for f, fn, line in self.syncs if (f, fn) not in ALLOWED_SYNCS}
        return sorted(bad)


def _report(label: str, recorder: SyncRecorder, steps: int) -> list[str]:
    bad = recorder.unexpected()
    allowed = sum(1 for f, fn, _ in recorder.syncs if (f, fn) in ALLOWED_SYNCS)
    status = "ok" if not bad else "FAIL"
    print(f"  {label:<24} {status:<4} {allowed / steps:6.1f} allowed syncs/step", flush=True)
    return [f"{label}: host sync at {where}" for where in bad]


def check_syncs(steps: int) -> list[str]:
    """Every optimizer's step and the training loop's steps on CUDA under the recorder (the
    first step, which initialises state, and the last, which logs, left out); the failures."""
    device = torch.device("cuda")
    with SyncRecorder() as probe:
        torch.ones(1, device=device).item()
    if not probe.syncs:
        return ["the sync recorder saw no sync from .item(); the sync check cannot run here"]
    failures = []
    for name, cfg in optimizer_cases(device):
        step = optimizer_step(cfg, device)
        step()  # the first step initialises the optimizer state
        torch.cuda.synchronize()
        with SyncRecorder() as recorder:
            for _ in range(steps):
                step()
        torch.cuda.synchronize()
        failures += _report(f"optim {name}", recorder, steps)
    for name, build in training_cases():
        recorder, total = SyncRecorder(), steps + 2

        def on_step(step: int, recorder: SyncRecorder = recorder, total: int = total) -> None:
            if step == 1:
                recorder.start()
            elif step == total - 1:
                recorder.stop()

        build(device).run(total, on_step=on_step)
        failures += _report(f"train {name}", recorder, steps)
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
    """Median ms/step of the training loop's steps (and of every optimizer) on each device."""
    print(f"  {'step':<24}" + "".join(f"{d!s:>12}" for d in devices) + "   (ms/step)")
    cases: list[tuple[str, Callable[[torch.device], float]]] = [
        (f"train {label}", lambda d, b=build: statistics.median(b(d).run(steps + 3)) * 1e3)
        for label, build in training_cases(small)
    ]
    if optimizers:
        cases += [
            (f"optim {name}", lambda d, c=cfg: time_step(optimizer_step(c, d), d, steps))
            for name, cfg in optimizer_cases(devices[-1])
        ]
    for label, measure in cases:
        row = []
        for device in devices:
            try:
                row.append(f"{measure(device):12.2f}")
            except Exception as err:  # an implementation that does not run on this device
                row.append(f"{'n/a':>12}")
                print(f"  {label} on {device}: {type(err).__name__}: {err}", file=sys.stderr)
        print(f"  {label:<24}" + "".join(row), flush=True)


# --- rollouts -------------------------------------------------------------------------------


def rollouts(device: torch.device, quick: bool) -> list[str]:
    """The sampler's rollouts on `device`: the static one, eager and compiled (CUDA graphs on
    CUDA), must draw the dynamic one's trajectories; prints the median ms of each (compile time
    left out) on HyperGrid 8^4 at batch 16 and 256 and on bit sequences at batch 16."""
    envs = {
        "hypergrid 8^4": lambda: HyperGrid(ndim=4, height=8),
        "bitseq 32/4": lambda: BitSequence(n=32, k=4),
    }
    cases = [("hypergrid 8^4", 16), ("hypergrid 8^4", 256), ("bitseq 32/4", 16)]
    if quick:
        cases = cases[:1]
    print(f"  {'env, batch':<20}{'dynamic':>10}{'static':>10}{'compiled':>10}   (ms/rollout)")
    failures = []
    steps_fn = compile_static_steps(device)
    for name, batch in cases:
        env = envs[name]().to(device)
        torch.manual_seed(0)
        width = env.featurize(env.initial_states(1)).shape[-1]
        model = GFlowNet(MLPPolicy(width, env.n_actions)).to(device)
        # Bit strings all take n/k + 1 steps: one chunk per rollout.
        chunk = env.max_steps + 1 if isinstance(env, BitSequence) else 8
        variants = {
            "dynamic": {},
            "static": {"rollout": "static", "chunk": chunk},
            "compiled": {"rollout": "static", "chunk": chunk, "steps_fn": steps_fn},
        }

        def rollout(seed: int, kwargs: dict, model=model, env=env, batch=batch):
            generator = torch.Generator(device).manual_seed(seed)
            return sample_trajectories(model, env, batch, generator, **kwargs)

        want = rollout(1, variants["dynamic"])  # what every static variant must draw
        times = {}
        for label, kwargs in variants.items():
            if label != "dynamic":
                got = rollout(1, kwargs)
                if not (
                    torch.equal(want.actions, got.actions) and torch.equal(want.states, got.states)
                ):
                    failures.append(f"rollouts: {label} differs from dynamic on {name}, b{batch}")
            times[label] = time_step(lambda kw=kwargs: rollout(2, kw), device, 3 if quick else 20)
        row = "".join(f"{times[label]:>10.2f}" for label in variants)
        print(f"  {f'{name}, {batch}':<20}{row}", flush=True)
    return failures


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
    """HyperGrid and DDPM through train.py on `device`, in fp32 and bf16 (`quick`: bf16 only,
    a few steps of a tiny UNet); prints their summary lines, returns the failures."""
    if quick:
        precisions = ("bf16",)
        gfn = ["train.steps=20", "train.eval_every=20", "threads=1"]
        ddpm = [
            "model=unet_tiny", "train.steps=5", "train.eval_every=5", "task.batch_size=16",
            "task.sampling.steps=2", "task.sampling.grid_samples=4", "task.quality=false",
            "threads=1",
        ]  # fmt: skip
    else:
        precisions = ("fp32", "bf16")
        gfn = ["train.steps=600", "train.eval_every=600"]
        ddpm = ["train.steps=300", "train.eval_every=300", "task.sampling.steps=10"]
    runs = {"hypergrid": gfn, "ddpm": ["task=ddpm", "train.warmup_steps=0", *ddpm]}
    failures = []
    run_root = tempfile.mkdtemp(prefix="kinetic_gpu_check_")
    for name, overrides in runs.items():
        for precision in precisions:
            command = [
                sys.executable, "train.py", f"device={device}", f"precision={precision}",
                "logging.progress=false", f"hydra.run.dir={run_root}/{name}-{precision}",
                *overrides,
            ]  # fmt: skip
            start = time.perf_counter()
            result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
            wall = time.perf_counter() - start
            done = [line for line in result.stdout.splitlines() if line.startswith("done:")]
            if result.returncode != 0 or not done:
                tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
                failures.append(f"run {name} {precision} on {device}: {' | '.join(tail)}")
                print(f"  {name:<10} {precision}: FAIL", flush=True)
                continue
            summary = re.sub(r" run_dir=\S+", "", done[-1])
            print(f"  {name:<10} {precision}: {wall:5.1f}s  {summary}", flush=True)
    return failures


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and shorter runs")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["tests", "syncs", "speed", "rollouts", "runs"],
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
        if "rollouts" not in args.skip and not args.quick:  # (quick: no compile time in CI)
            print("rollouts (cpu):")
            failures += rollouts(torch.device("cpu"), quick=False)
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
        if "rollouts" not in args.skip:
            print("rollouts (cuda; static compiled under CUDA graphs):")
            failures += rollouts(torch.device("cuda"), args.quick)
        if "runs" not in args.skip:
            print("runs (device=cuda):")
            failures += short_runs("cuda", args.quick)
    for failure in failures:
        print(f"FAIL: {failure}")
    print("gpu_check: " + ("all checks passed" if not failures else f"{len(failures)} failed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
