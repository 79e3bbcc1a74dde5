# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""Trajectories per second of a full GFlowNet training iteration, kinetic against torchgfn.

One iteration is sample + trajectory-balance loss + backward + optimizer step on HyperGrid
(8^2, 8^4, 20^4) at batch 16 and 256: 256x2 MLP, P_B a head on the shared trunk, AdamW lr
1e-3 with log Z at lr 0.1, on-policy, one thread. kinetic runs in this process through the
code path of `python train.py` (Hydra-composed config, `GFlowNetTask`, `build_optimizer`, and
`kinetic.train` without monitors or evaluation); torchgfn 2.4.1 runs `benchmarks/torchgfn_peer.py`
in its own virtual environment (its import name `gfn` clashes with kinetic's), driven over a
pipe. Both train for the same trajectory budget in interleaved chunks, so drift in the
machine's speed hits both alike; the time per iteration is the median over all iterations
after the warm-up. After the budget, both forward policies are tabulated on every grid state
and scored by kinetic's exact evaluator (`gfn.evaluation`): L1 = sum_x |p(x) - p*(x)|, in [0, 2].

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 torchgfn==2.4.1   # CPU torch
    python benchmarks/gfn_throughput.py --peer-python /work/peer-venv/bin/python
    python benchmarks/gfn_throughput.py                      # kinetic only
    python benchmarks/gfn_throughput.py --grids 4x8 --batch-sizes 16 --budget 16=32000
    python benchmarks/gfn_throughput.py --profile 4x8:16 --profile 4x8:256  # kinetic only

The speed-up is torchgfn's median ms/iter over kinetic's (= the ratio of trajectories/s).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import itertools
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor

# The checkout's packages, ahead of the editable install: that is a map fixed at install time,
# so a package added since (such as `kinetic`) is missing from it until a reinstall.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gfn.task
from envs.hypergrid import HyperGrid
from gfn.evaluation import exact_terminal_distribution, l1_distance, true_terminal_distribution
from gfn.policies import masked_log_softmax
from gfn.task import GFlowNetTask
from kinetic import TrainConfig, train
from optim import build_optimizer

PEER_SCRIPT = Path(__file__).with_name("torchgfn_peer.py")
DEFAULT_BUDGETS = {16: 32_000, 256: 64_000}  # trajectories per run, by batch size


# --- kinetic --------------------------------------------------------------------------------


def kinetic_config(
    ndim: int,
    height: int,
    batch_size: int,
    steps: int,
    optim: str,
    seed: int,
    extra: tuple[str, ...] = (),
) -> DictConfig:
    """The config `python train.py` would compose, with the benchmark's settings pinned
    (torchgfn's: lr 1e-3, log Z lr 0.1, no lr schedule); `extra` overrides go last (e.g.
    ``+optim.fused=true`` to try a change)."""
    overrides = [
        f"optim={optim}",
        "optim.lr=1e-3",
        "loss=tb",
        f"env.ndim={ndim}",
        f"env.height={height}",
        f"task.batch_size={batch_size}",
        "task.log_z_lr=0.1",
        "task.epsilon=0.0",
        "task.temperature=1.0",
        "task.replay.capacity=0",
        f"train.steps={steps}",
        "train.lr_schedule=constant",
        "train.warmup_steps=0",
        "train.clip_grad_norm=0.0",
        "model.hidden=256",
        "model.n_layers=2",
        "model.backward=learned",
        f"seed={seed}",
        "threads=1",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


class KineticRun:
    """A GFlowNet task and its optimizer, trained in chunks by `kinetic.train` (no monitors,
    no evaluation, no files: the loop's per-step body only)."""

    def __init__(self, cfg: DictConfig) -> None:
        torch.manual_seed(cfg.seed)  # as train.py does before building the task
        self.cfg = cfg
        self.task = GFlowNetTask.from_config(cfg)
        self.optimizer = build_optimizer(cfg.optim, self.task.param_groups())
        self.step = 0

    def train(self, iters: int) -> list[float]:
        """`iters` iterations (one call of the loop); wall milliseconds of each."""
        tc = self.cfg.train
        config = TrainConfig(
            steps=iters, log_every=iters, eval_every=0, clip_grad_norm=tc.clip_grad_norm,
            lr_schedule=tc.lr_schedule, warmup_steps=tc.warmup_steps,
        )  # fmt: skip
        stamps = [time.perf_counter()]
        train(
            self.task, self.optimizer, config, monitor=None,
            callbacks=[lambda step: stamps.append(time.perf_counter())],
        )  # fmt: skip
        self.step += iters
        return [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]

    @torch.no_grad()
    def log_pf_table(self) -> Tensor:
        """P_F's masked log-probs on every grid state, rows in `env.state_index` order."""
        env = self.task.env
        states = env.enumerate_terminals()  # every HyperGrid state is terminal
        logits = self.task.model(env.featurize(states)).pf_logits
        table = masked_log_softmax(logits, env.forward_mask(states))  # (N, A)
        return table.new_empty(table.shape).index_copy_(0, env.state_index(states), table)


# --- torchgfn, in its own process -----------------------------------------------------------


class Peer:
    """`torchgfn_peer.py` under the peer's Python, one JSON request and reply per line."""

    def __init__(self, python: str, cfg: DictConfig, threads: int) -> None:
        command = [
            python,
            str(PEER_SCRIPT),
            f"--ndim={cfg.env.ndim}",
            f"--height={cfg.env.height}",
            f"--batch-size={cfg.task.batch_size}",
            f"--R0={cfg.env.R0}",
            f"--R1={cfg.env.R1}",
            f"--R2={cfg.env.R2}",
            f"--hidden={cfg.model.hidden}",
            f"--n-layers={cfg.model.n_layers}",
            f"--lr={cfg.optim.lr}",
            f"--lr-logz={cfg.task.log_z_lr}",
            f"--weight-decay={cfg.optim.weight_decay}",
            f"--seed={cfg.seed}",
            f"--threads={threads}",
        ]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # torchgfn's `gfn`
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{PEER_SCRIPT.name} exited with code {self.process.wait()}")
        return json.loads(line)

    def request(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._read()

    def train(self, iters: int) -> list[float]:
        return self.request(cmd="train", iters=iters)["ms"]

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.request_quit()
        self.process.wait(timeout=30)

    def request_quit(self) -> None:
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.close()


def peer_log_pf_table(peer: Peer, env: HyperGrid) -> Tensor:
    """torchgfn's P_F on every grid state, rows in `env.state_index` order, after checking
    that its states, masks and rewards follow kinetic's HyperGrid conventions."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "peer_log_pf.pt"
        peer.request(cmd="dump", path=str(path))
        dump = torch.load(path)
    states, log_pf = dump["states"], dump["log_pf"]  # (N, D), (N, A)
    index = env.state_index(states)
    if not torch.equal(index.sort().values, torch.arange(env.n_terminals)):
        raise RuntimeError("torchgfn's state table does not cover the grid exactly once")
    # Actions 0..D-1 increment a coordinate and D exits in both: the illegal entries must agree.
    if not torch.equal(torch.isfinite(log_pf), env.forward_mask(states)):
        raise RuntimeError("torchgfn's forward masks differ from kinetic's HyperGrid")
    log_r = env.log_reward(states)
    if not torch.allclose(dump["log_rewards"], log_r, atol=1e-5):
        bad = int((~torch.isclose(dump["log_rewards"], log_r, atol=1e-5)).sum())
        raise RuntimeError(f"torchgfn's HyperGrid reward differs from kinetic's on {bad} states")
    return log_pf.new_empty(log_pf.shape).index_copy_(0, index, log_pf)


# --- exact L1 -------------------------------------------------------------------------------


def exact_l1(env: HyperGrid, table: Tensor) -> float:
    """Full L1 between the terminal distribution of the tabulated P_F and R/Z*."""

    def log_pf_fn(states: Tensor) -> Tensor:
        return table[env.state_index(states)]  # (B, A)

    _, p = exact_terminal_distribution(env, log_pf_fn)
    p_star, _ = true_terminal_distribution(env)
    return float(l1_distance(p, p_star))


# --- the benchmark --------------------------------------------------------------------------


def parse_grid(text: str) -> tuple[int, int]:
    """`4x8` -> (ndim=4, height=8)."""
    ndim, height = (int(part) for part in text.lower().split("x"))
    return ndim, height


def chunks(total: int, n: int) -> list[int]:
    """`total` split into `n` near-equal positive parts (fewer if total < n)."""
    n = max(1, min(n, total))
    return [total // n + (i < total % n) for i in range(n)]


def benchmark_one(
    ndim: int, height: int, batch_size: int, budget: int, args: argparse.Namespace
) -> dict:
    """Train both for `budget` trajectories in interleaved chunks; time and score them."""
    iters = math.ceil(budget / batch_size)
    if iters <= args.warmup:
        raise ValueError(f"budget {budget} gives {iters} iterations, not more than the warm-up")
    extra = tuple(args.override)
    cfg = kinetic_config(ndim, height, batch_size, iters, args.optim, args.seed, extra)
    kinetic = KineticRun(cfg)
    peer = Peer(args.peer_python, cfg, args.threads) if args.peer_python else None
    kinetic_ms: list[float] = []
    peer_ms: list[float] = []
    try:
        for i, n in enumerate(chunks(iters, args.rounds)):
            # Alternate who goes first, so neither always runs right after the other.
            order = ("kinetic", "peer") if i % 2 == 0 else ("peer", "kinetic")
            for who in order:
                if who == "kinetic":
                    kinetic_ms += kinetic.train(n)
                elif peer is not None:
                    peer_ms += peer.train(n)
        result = {
            "grid": f"{height}^{ndim}",
            "batch": batch_size,
            "iters": iters,
            "trajectories": iters * batch_size,
            "kinetic_ms": statistics.median(kinetic_ms[args.warmup :]),
            "kinetic_total_s": sum(kinetic_ms) / 1e3,
            "kinetic_l1": exact_l1(kinetic.task.env, kinetic.log_pf_table()),
        }
        # The lookup table reproduces the task's own evaluation (same model, same evaluator).
        task_l1 = kinetic.task.evaluate(kinetic.step)["l1"]
        if abs(task_l1 - result["kinetic_l1"]) > 1e-6:
            raise RuntimeError(f"table L1 {result['kinetic_l1']} != task L1 {task_l1}")
        if peer is not None:
            result["peer_ms"] = statistics.median(peer_ms[args.warmup :])
            result["peer_total_s"] = sum(peer_ms) / 1e3
            result["peer_l1"] = exact_l1(
                kinetic.task.env, peer_log_pf_table(peer, kinetic.task.env)
            )
    finally:
        if peer is not None:
            peer.close()
    return result


def print_table(results: list[dict]) -> None:
    has_peer = any("peer_ms" in r for r in results)
    head = f"{'grid':>5} {'batch':>5} {'iters':>6} {'kinetic ms':>10} {'traj/s':>8}"
    if has_peer:
        head += f" {'torchgfn ms':>11} {'traj/s':>8} {'speed-up':>8}"
    head += f" {'kinetic L1':>10}"
    if has_peer:
        head += f" {'torchgfn L1':>11}"
    head += f" {'at traj':>8}"
    print(head)
    for r in results:
        line = (
            f"{r['grid']:>5} {r['batch']:>5} {r['iters']:>6} {r['kinetic_ms']:>10.2f}"
            f" {r['batch'] / r['kinetic_ms'] * 1e3:>8.0f}"
        )
        if has_peer:
            line += (
                f" {r['peer_ms']:>11.2f} {r['batch'] / r['peer_ms'] * 1e3:>8.0f}"
                f" {r['peer_ms'] / r['kinetic_ms']:>7.2f}x"
            )
        line += f" {r['kinetic_l1']:>10.4f}"
        if has_peer:
            line += f" {r['peer_l1']:>11.4f}"
        line += f" {r['trajectories']:>8}"
        print(line)
    print("wall time of all iterations (s):", end="")
    for r in results:
        peer_s = f"/{r['peer_total_s']:.1f}" if "peer_total_s" in r else ""
        print(f" {r['grid']} b{r['batch']}: {r['kinetic_total_s']:.1f}{peer_s}", end=";")
    print(" (kinetic/torchgfn)" if has_peer else "")


# --- profile --------------------------------------------------------------------------------


def _timed(fn: Callable, totals: dict[str, float], name: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        with torch.profiler.record_function(name):
            out = fn(*args, **kwargs)
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    return wrapper


def profile_one(ndim: int, height: int, batch_size: int, args: argparse.Namespace) -> None:
    """Where kinetic's iteration spends its time: phases, torch ops and Python functions.

    Trains `--profile-warmup` iterations first so that trajectory lengths are those of a
    partly trained policy, then measures `--profile-iters` iterations. The phases are timed by
    wrapping `gfn.task`'s module-level functions in this process only.
    """
    n, m = args.profile_iters, max(1, args.profile_iters // 4)
    steps = args.profile_warmup + n + 2 * m
    extra = tuple(args.override)
    run = KineticRun(kinetic_config(ndim, height, batch_size, steps, args.optim, args.seed, extra))
    run.train(args.profile_warmup)
    totals: dict[str, float] = {}
    originals = (gfn.task.sample_trajectories, gfn.task.trajectory_log_probs, run.task.loss_fn)
    gfn.task.sample_trajectories = _timed(originals[0], totals, "sample_trajectories")
    gfn.task.trajectory_log_probs = _timed(originals[1], totals, "trajectory_log_probs")
    run.task.loss_fn = _timed(originals[2], totals, "loss_fn")
    try:
        # Phases: the loop's calls into the task and the optimizer, timed by wrappers; the
        # rest of the iteration (zero_grad, backward, gradient norm, schedule) by difference.
        task_loss = run.task.loss
        run.task.loss = _timed(task_loss, totals, "task.loss")
        step_start: list[float] = []
        hooks = (
            run.optimizer.register_step_pre_hook(lambda *_: step_start.append(time.perf_counter())),
            run.optimizer.register_step_post_hook(
                lambda *_: totals.__setitem__(
                    "optimizer step",
                    totals.get("optimizer step", 0.0) + time.perf_counter() - step_start.pop(),
                )
            ),
        )
        try:
            start = time.perf_counter()
            run.train(n)
            wall = time.perf_counter() - start
        finally:
            run.task.loss = task_loss
            for hook in hooks:
                hook.remove()
        totals["backward, norm, schedule"] = wall - totals["task.loss"] - totals["optimizer step"]
        # Mean trajectory length of fresh samples (non-exit actions), for context.
        with torch.no_grad():
            batch = originals[0](run.task.model, run.task.env, 256, run.task.generator)
            lengths = batch.lengths.float()
        print(
            f"\n=== kinetic profile: {height}^{ndim}, batch {batch_size}, after "
            f"{args.profile_warmup} iterations; {n} iterations, {wall / n * 1e3:.2f} ms/iter; "
            f"mean trajectory length {lengths.mean():.1f} (max {lengths.max():.0f}) ==="
        )
        print(f"{'phase':<26} {'ms/iter':>8} {'share':>6}")
        for name in (
            "task.loss",
            "sample_trajectories",
            "trajectory_log_probs",
            "loss_fn",
            "backward, norm, schedule",
            "optimizer step",
        ):
            indent = (
                "  " if name in ("sample_trajectories", "trajectory_log_probs", "loss_fn") else ""
            )
            ms = totals.get(name, 0.0) / n * 1e3
            print(f"{indent + name:<26} {ms:>8.3f} {ms / (wall / n * 1e3):>6.1%}")

        # Torch ops (self CPU time), over fewer iterations: the profiler adds overhead.
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run.train(m)
        print(f"\ntorch.profiler, {m} iterations, top ops by self CPU time:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))

        # Python functions (tottime): where interpreter overhead goes.
        profiler = cProfile.Profile()
        profiler.enable()
        run.train(m)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"cProfile, {m} iterations, top functions by own time:")
        print("\n".join(out.getvalue().splitlines()[4:]))
    finally:
        gfn.task.sample_trajectories, gfn.task.trajectory_log_probs = originals[:2]
        run.task.loss_fn = originals[2]


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer-python", help="python of the torchgfn venv; omit: kinetic only")
    parser.add_argument("--grids", nargs="+", default=["2x8", "4x8", "4x20"], help="NDIMxHEIGHT")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="BATCH=TRAJ",
        help="trajectories per run for a batch size (default: "
        + ", ".join(f"{b}={n}" for b, n in DEFAULT_BUDGETS.items())
        + "; other batch sizes: 2000 iterations)",
    )
    parser.add_argument("--warmup", type=int, default=20, help="iterations left out of medians")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved chunks per run")
    parser.add_argument("--optim", default="adamw", help="kinetic's optim config group")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for kinetic's config (repeatable), e.g. +optim.fused=true",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NDIMxHEIGHT:BATCH",
        help="profile kinetic's iteration instead of benchmarking",
    )
    parser.add_argument("--profile-warmup", type=int, default=300)
    parser.add_argument("--profile-iters", type=int, default=200)
    parser.add_argument("--top", type=int, default=25, help="rows of each profile table")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    budgets = dict(DEFAULT_BUDGETS)
    for item in args.budget:
        batch, _, n = item.partition("=")
        budgets[int(batch)] = int(n)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"kinetic: torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; "
        f"load average at start {load}"
    )
    if args.profile:
        for spec in args.profile:
            grid, _, batch = spec.partition(":")
            profile_one(*parse_grid(grid), int(batch), args)
        return

    if args.peer_python:
        probe = Peer(
            args.peer_python, kinetic_config(2, 8, 16, 1, args.optim, args.seed), args.threads
        )
        info = probe.info
        probe.close()
        print(
            f"torchgfn {info['torchgfn']}: torch {info['torch']}, {info['threads']} thread(s), "
            f"in {args.peer_python}"
        )
    if args.override:
        print(f"kinetic config overrides: {' '.join(args.override)}")
    print(
        f"TB, MLP 256x2, P_B on the shared trunk, {args.optim} lr 1e-3 + log Z lr 0.1 (constant), "
        f"on-policy; median ms/iter after {args.warmup} warm-up iterations, {args.rounds} "
        "interleaved chunks; exact L1 = sum|p - p*| in [0, 2] after the budget",
        flush=True,
    )

    results = []
    for grid in args.grids:
        ndim, height = parse_grid(grid)
        for batch_size in args.batch_sizes:
            budget = budgets.get(batch_size, 2000 * batch_size)
            start = time.perf_counter()
            results.append(benchmark_one(ndim, height, batch_size, budget, args))
            print(
                f"  done {height}^{ndim} batch {batch_size} in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print()
    print_table(results)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at end {load}")


if __name__ == "__main__":
    main()
