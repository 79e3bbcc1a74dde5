# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""Trajectories per second of a full GFlowNet training iteration, kinetic against torchgfn,
and how far that iteration is from this machine's matmul rate.

One iteration is sample + trajectory-balance loss + backward + optimizer step on HyperGrid
(8^2, 8^4, 20^4) at batch 16 and 256: 256x2 MLP, P_B a head on the shared trunk, AdamW lr
1e-3 with log Z at lr 0.1 and a constant lr (torchgfn's settings), on-policy, `--threads`
intra-op threads (default 1; printed with every table). kinetic runs in this process through
the code path of `python train.py`: the Hydra-composed config, `GFlowNetTask`,
`build_optimizer`, and `kinetic.train` with the config's `monitor` group (`monitor=default`:
the non-finite guard, the per-step stability signals and the periodic sharpness probe), its
`train.log_every` scalar reads and its `train.clip_grad_norm`, without evaluation, files or
progress bar. Each run is one call of the loop, so the periodic work falls on the steps it
would in a `python train.py` run of that length. A second kinetic row, "monitors off", runs
the same config with `monitor=off`, so the monitors' cost is the difference of the two rows.
torchgfn 2.4.1 runs `benchmarks/torchgfn_peer.py` in its own virtual environment (its import
name `gfn` clashes with kinetic's), driven over a pipe. All train for the same trajectory
budget in interleaved chunks (the other runs train while kinetic's loop waits in a callback,
which is not timed), so drift in the machine's speed hits them alike.

Per-iteration times leave out `--warmup` iterations. "mean" is the mean over every other
iteration, the periodic ones (sharpness probe, logging) included: the throughput a run gets;
"median" is the typical iteration, which hides the periodic work. After the budget, the
forward policies are tabulated on every grid state and scored by kinetic's exact evaluator
(`gfn.evaluation`): L1 = sum_x |p(x) - p*(x)|, in [0, 2].

The limit: the rows that go through the MLP's linear layers (trunk and fused heads) are
counted in the run itself, per call of the policy: sampling's calls (no autograd) and the
loss's (taped, so backpropagated). FLOPs of an iteration = sum over calls and layers of
2 rows in out (forward) plus, for the loss's calls, 2 rows in out for the weight gradient and
2 rows in out for the input gradient (every layer but the first, whose input needs none);
bias adds and everything but these matmuls are left out, as are the sharpness probe's
Hessian-vector products (its steps are left out of the limit's figures). Then, in the same
process, the matmuls of sampled iterations are replayed alone at exactly those shapes
(`F.linear` forward, `mm` for the two backward products, fp32, the same threads; best of 3),
whose GFLOP/s is the machine's matmul rate at these shapes, and a 2048^3 matmul gives the
machine's peak at this thread count. Printed: the rows and FLOPs per iteration, its achieved
GFLOP/s, the rate at its shapes, the share of its time its matmuls alone need (achieved over
the rate at its shapes: its fraction of the machine's matmul rate at these shapes), and its
fraction of the 2048^3 peak.

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 torchgfn==2.4.1   # CPU torch
    python benchmarks/gfn_throughput.py --peer-python /work/peer-venv/bin/python
    python benchmarks/gfn_throughput.py                      # kinetic only
    python benchmarks/gfn_throughput.py --grids 4x8 --batch-sizes 16 --budget 16=32000
    python benchmarks/gfn_throughput.py --profile 4x8:16 --profile 4x8:256  # kinetic only

The speed-up is torchgfn's ms/iter over kinetic's (= the ratio of trajectories/s), of the
means and of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
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
from typing import Any

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

# The checkout's packages, ahead of the editable install: that is a map fixed at install time,
# so a package added since (such as `kinetic`) is missing from it until a reinstall.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import diffusion.config  # noqa: F401  (registers task=ddpm)
import gfn.config
import gfn.losses
import gfn.task
from envs.hypergrid import HyperGrid
from gfn.evaluation import exact_terminal_distribution, l1_distance, true_terminal_distribution
from gfn.policies import MLPPolicy, masked_log_softmax
from gfn.task import GFlowNetTask
from kinetic import MonitorConfig, TrainConfig, train
from optim import build_optimizer

PEER_SCRIPT = Path(__file__).with_name("torchgfn_peer.py")
DEFAULT_BUDGETS = {16: 32_000, 256: 64_000}  # trajectories per run, by batch size
MONITORS = {"kinetic": "default", "kinetic monitors off": "off"}  # row -> monitor config
PEAK_SIZE = 2048  # the square matmul that stands for the machine's peak


# --- kinetic --------------------------------------------------------------------------------


def kinetic_config(
    ndim: int,
    height: int,
    batch_size: int,
    steps: int,
    optim: str,
    seed: int,
    extra: tuple[str, ...] = (),
    monitor: str = "default",
) -> DictConfig:
    """The config `python train.py` would compose, with the benchmark's settings pinned
    (torchgfn's: lr 1e-3, log Z lr 0.1, no lr schedule); everything else, the monitors and
    gradient clipping included, is the config's default. `extra` overrides go last (e.g.
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
        "model.hidden=256",
        "model.n_layers=2",
        "model.backward=learned",
        f"monitor={monitor}",
        f"seed={seed}",
        "threads=1",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


class KineticRun:
    """A GFlowNet task and its optimizer, trained by `kinetic.train` with the config's
    monitors, `log_every` and clipping (no evaluation, no files), its iterations timed and
    the rows through its MLP counted (`RowCounter`)."""

    def __init__(self, cfg: DictConfig) -> None:
        torch.manual_seed(cfg.seed)  # as train.py does before building the task
        self.cfg = cfg
        self.task = GFlowNetTask.from_config(cfg)
        self.optimizer = build_optimizer(cfg.optim, self.task.param_groups())
        self.monitor = MonitorConfig.from_dict(cfg.monitor)
        self.rows = RowCounter(self.task.model.policy)
        if self.task.steps_fn is not None:
            self.task.steps_fn = self.rows.count_static_steps(self.task.steps_fn)
        self.step = 0
        self.ms: list[float] = []  # wall milliseconds of every iteration so far
        self.marks = [0]  # len(self.rows.calls) after each iteration
        self.probe_steps: list[int] = []  # iterations (0-based) on which the probe ran
        probe_loss = self.task.probe_loss

        def counted_probe_loss(step: int) -> Tensor:  # the probe's rows are not an iteration's
            if not self.probe_steps or self.probe_steps[-1] != self.step + step - 1:
                self.probe_steps.append(self.step + step - 1)
            with self.rows.paused():
                return probe_loss(step)

        self.task.probe_loss = counted_probe_loss

    def train(self, iters: int, pause: Callable[[int], None] | None = None) -> list[float]:
        """`iters` iterations in one call of the loop; wall milliseconds of each. `pause(step)`
        runs after each iteration, outside the timed span (other runs train meanwhile)."""
        config = TrainConfig(**{**self.cfg.train, "steps": iters, "eval_every": 0})
        first = len(self.ms)
        last = [time.perf_counter()]

        def callback(step: int) -> None:
            self.ms.append((time.perf_counter() - last[0]) * 1e3)
            self.marks.append(len(self.rows.calls))
            if pause is not None:
                pause(step)
            last[0] = time.perf_counter()

        train(self.task, self.optimizer, config, monitor=self.monitor, callbacks=[callback])
        self.step += iters
        return self.ms[first:]

    @torch.no_grad()
    def log_pf_table(self) -> Tensor:
        """P_F's masked log-probs on every grid state, rows in `env.state_index` order."""
        env = self.task.env
        states = env.enumerate_terminals()  # every HyperGrid state is terminal
        logits = self.task.model(env.featurize(states)).pf_logits
        table = masked_log_softmax(logits, env.forward_mask(states))  # (N, A)
        return table.new_empty(table.shape).index_copy_(0, env.state_index(states), table)


# --- the limit: FLOPs and matmul rate ----------------------------------------------------


class RowCounter:
    """The rows of every call of an `MLPPolicy`, from the run itself.

    The policy applies each of its linear layers (the trunk's, then the fused heads) once to
    every row of its input, so a call's matmuls are fixed by its row count; a call made with
    autograd on is backpropagated by the loss. Wraps the policy's `forward` (one Python call
    and a list append per call: cheaper than a module hook). Each call is recorded as
    ``(rows, taped, input_needs_grad)``."""

    def __init__(self, policy: MLPPolicy) -> None:
        if not isinstance(policy, MLPPolicy):
            raise TypeError(f"RowCounter counts an MLPPolicy's rows, not a {type(policy)}")
        self.layers = [(m.in_features, m.out_features) for m in (*policy.trunk, policy.heads)]
        self.calls: list[tuple[int, bool, bool]] = []
        self._paused = False
        forward = policy.forward

        @functools.wraps(forward)
        def counted(features: Tensor):
            # A compiled rollout's calls are counted by `count_static_steps`, from outside the
            # graph (tracing this append would make the graph guard on the list's length).
            if not self._paused and not torch.compiler.is_compiling():
                taped = torch.is_grad_enabled()
                rows = features.numel() // features.shape[-1]
                self.calls.append((rows, taped, taped and features.requires_grad))
            return forward(features)

        policy.forward = counted

    def count_static_steps(self, steps_fn: Callable) -> Callable:
        """`steps_fn` (a compiled `gfn.sampler.static_steps`) recording its k calls of the
        policy on n rows each, as sampling calls (no autograd)."""

        @functools.wraps(steps_fn)
        def counted(gflownet, env, states, done, races, *args):
            if not self._paused:
                self.calls.extend([(states.shape[0], False, False)] * races.shape[0])
            return steps_fn(gflownet, env, states, done, races, *args)

        return counted

    @contextlib.contextmanager
    def paused(self):
        """Calls made inside are not recorded."""
        self._paused, before = True, self._paused
        try:
            yield
        finally:
            self._paused = before

    def flops(self, calls: list[tuple[int, bool, bool]]) -> dict[str, int]:
        """FLOPs of `calls`' matmuls: sampling's forward (calls without autograd), the loss's
        forward and the loss's backward (weight gradients, and input gradients of every layer
        whose input needs one), and the rows of each kind."""
        per_row = sum(2 * n_in * n_out for n_in, n_out in self.layers)
        first = 2 * self.layers[0][0] * self.layers[0][1]
        out = {"sample_rows": 0, "loss_rows": 0, "sample": 0, "loss_fwd": 0, "loss_bwd": 0}
        for rows, taped, input_grad in calls:
            if not taped:
                out["sample_rows"] += rows
                out["sample"] += rows * per_row
                continue
            out["loss_rows"] += rows
            out["loss_fwd"] += rows * per_row
            out["loss_bwd"] += rows * (2 * per_row - (0 if input_grad else first))
        out["total"] = out["sample"] + out["loss_fwd"] + out["loss_bwd"]
        return out


class MatmulReplay:
    """The matmuls of recorded policy calls, replayed alone at the same shapes and dtype."""

    def __init__(self, layers: list[tuple[int, int]], max_rows: int, dtype=torch.float32):
        gen = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(shape, generator=gen, dtype=dtype)

        # Per layer: input rows x, weight W, bias b, output gradient g.
        self.tensors = [
            (rand(max_rows, n_in), rand(n_out, n_in), rand(n_out), rand(max_rows, n_out))
            for n_in, n_out in layers
        ]

    def run(self, calls: list[tuple[int, bool, bool]]) -> None:
        for rows, taped, input_grad in calls:
            for i, (x, w, b, g) in enumerate(self.tensors):
                F.linear(x[:rows], w, b)  # forward: addmm(b, x, W^T), as the policy calls it
                if taped:
                    x[:rows].t().mm(g[:rows])  # weight gradient, as addmm's backward forms it
                    if i > 0 or input_grad:
                        g[:rows].mm(w)  # input gradient

    def seconds(self, calls: list[tuple[int, bool, bool]], reps: int = 3) -> float:
        """Best of `reps` wall seconds of `run(calls)` (after one untimed run)."""
        self.run(calls)
        best = math.inf
        for _ in range(reps):
            start = time.perf_counter()
            self.run(calls)
            best = min(best, time.perf_counter() - start)
        return best


def peak_gflops(n: int = PEAK_SIZE, reps: int = 3, dtype=torch.float32) -> float:
    """GFLOP/s of an n x n x n matmul at the current thread count, best of `reps`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def limit(run: KineticRun, warmup: int, samples: int) -> dict[str, float]:
    """FLOPs per iteration of `run` after `warmup` (the probe's iterations left out) and its
    achieved GFLOP/s over those iterations; the matmul rate at its shapes, from `samples`
    iterations spread over the run whose matmuls are replayed alone; the share of an
    iteration's time those matmuls alone need (achieved rate over the rate at the shapes)."""
    probes = set(run.probe_steps)
    steps = [i for i in range(warmup, len(run.ms)) if i not in probes]
    calls = {i: run.rows.calls[run.marks[i] : run.marks[i + 1]] for i in steps}
    counts = {i: run.rows.flops(c) for i, c in calls.items()}
    n = len(steps)
    result = {k: sum(c[k] for c in counts.values()) / n for k in counts[steps[0]]}
    result["gflops"] = result["total"] * n / (sum(run.ms[i] for i in steps) / 1e3) / 1e9
    picked = sorted({steps[round(j * (n - 1) / max(samples - 1, 1))] for j in range(samples)})
    max_rows = max(rows for i in picked for rows, _, _ in calls[i])
    replay = MatmulReplay(run.rows.layers, max_rows)
    seconds = sum(replay.seconds(calls[i]) for i in picked)
    result["shapes_gflops"] = sum(counts[i]["total"] for i in picked) / seconds / 1e9
    result["matmul_share"] = result["gflops"] / result["shapes_gflops"]
    result["matmul_ms"] = result["total"] / result["shapes_gflops"] / 1e6
    return result


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


def timing(ms: list[float], warmup: int) -> dict[str, float]:
    """Mean and median ms of the iterations after `warmup`, and their wall seconds in all."""
    timed = ms[warmup:]
    return {
        "mean_ms": statistics.fmean(timed),
        "median_ms": statistics.median(timed),
        "total_s": sum(ms) / 1e3,
    }


def benchmark_one(
    ndim: int, height: int, batch_size: int, budget: int, args: argparse.Namespace
) -> dict:
    """Train every run for `budget` trajectories in interleaved chunks; time and score them.

    kinetic's default run trains in one call of the loop; after each of its chunks, its
    callback trains the other runs' chunk (in alternating order), outside its timed span."""
    iters = math.ceil(budget / batch_size)
    if iters <= args.warmup:
        raise ValueError(f"budget {budget} gives {iters} iterations, not more than the warm-up")
    extra = tuple(args.override)
    runs = {
        name: KineticRun(
            kinetic_config(ndim, height, batch_size, iters, args.optim, args.seed, extra, monitor)
        )
        for name, monitor in MONITORS.items()
    }
    main_name, *other_names = runs
    peer = Peer(args.peer_python, runs[main_name].cfg, args.threads) if args.peer_python else None
    peer_ms: list[float] = []
    parts = chunks(iters, args.rounds)
    ends = dict(zip(itertools.accumulate(parts), range(len(parts)), strict=True))

    def others(step: int) -> None:
        i = ends.get(step)
        if i is None:
            return
        order = [*other_names, "peer"]
        for who in order if i % 2 == 0 else order[::-1]:
            if who != "peer":
                runs[who].train(parts[i])
            elif peer is not None:
                peer_ms.extend(peer.train(parts[i]))

    rows = []
    try:
        runs[main_name].train(iters, pause=others)
        for name, run in runs.items():
            l1 = exact_l1(run.task.env, run.log_pf_table())
            # The lookup table reproduces the task's own evaluation (same model and evaluator).
            task_l1 = run.task.evaluate(run.step)["l1"]
            if abs(task_l1 - l1) > 1e-6:
                raise RuntimeError(f"table L1 {l1} != task L1 {task_l1}")
            probes = [i for i in run.probe_steps if i >= args.warmup]
            rows.append(
                {"variant": name, **timing(run.ms, args.warmup), "l1": l1, "probes": probes}
                | limit(run, args.warmup, args.limit_samples)
            )
        if peer is not None:
            l1 = exact_l1(
                runs[main_name].task.env, peer_log_pf_table(peer, runs[main_name].task.env)
            )
            rows.append({"variant": "torchgfn", **timing(peer_ms, args.warmup), "l1": l1})
    finally:
        if peer is not None:
            peer.close()
    return {
        "grid": f"{height}^{ndim}",
        "batch": batch_size,
        "iters": iters,
        "trajectories": iters * batch_size,
        "rows": rows,
    }


def print_tables(results: list[dict], threads: int, warmup: int, peak: float) -> None:
    """The speed table, then the limit table."""
    plural = "s" if threads != 1 else ""
    print(
        f"{threads} thread{plural}; ms/iter over the iterations after {warmup} warm-up: mean "
        "(every one, periodic monitor work included) and median (the typical iteration)"
    )
    print(
        f"{'grid':>5} {'batch':>5} {'iters':>6} {'variant':<21} {'mean ms':>8} {'median ms':>9} "
        f"{'traj/s':>7} {'probes':>6} {'L1':>7}"
    )
    for r in results:
        for row in r["rows"]:
            probes = len(row["probes"]) if "probes" in row else "-"
            print(
                f"{r['grid']:>5} {r['batch']:>5} {r['iters']:>6} {row['variant']:<21} "
                f"{row['mean_ms']:>8.2f} {row['median_ms']:>9.2f} "
                f"{r['batch'] / row['mean_ms'] * 1e3:>7.0f} {probes:>6} {row['l1']:>7.4f}"
            )
        by_name = {row["variant"]: row for row in r["rows"]}
        base = by_name["kinetic"]
        for name, row in by_name.items():
            if name == "kinetic":
                continue
            what = "speed-up (torchgfn / kinetic)" if name == "torchgfn" else f"{name} / kinetic"
            print(
                f"{'':>5} {'':>5} {'':>6} {what}: mean {row['mean_ms'] / base['mean_ms']:.3f}x, "
                f"median {row['median_ms'] / base['median_ms']:.3f}x"
            )
    print("wall time of all iterations (s):", end="")
    for r in results:
        walls = "/".join(f"{row['total_s']:.1f}" for row in r["rows"])
        print(f" {r['grid']} b{r['batch']}: {walls}", end=";")
    print(" (" + ", ".join(row["variant"] for row in results[0]["rows"]) + ")")

    print(
        f"\nThe limit, {threads} thread{plural}, fp32: the MLP's matmuls per iteration, counted "
        f"from the run's rows (probe iterations left out); a {PEAK_SIZE}^3 matmul runs at "
        f"{peak:.1f} GFLOP/s here (the peak)"
    )
    print(
        f"{'grid':>5} {'batch':>5} {'variant':<21} {'rows sample':>11} {'rows loss':>9} "
        f"{'MFLOP/iter':>10} {'GFLOP/s':>8} {'at shapes':>9} {'matmuls ms':>10} "
        f"{'of matmul rate':>14} {'of peak':>8}"
    )
    for r in results:
        for row in r["rows"]:
            if "gflops" not in row:
                continue
            print(
                f"{r['grid']:>5} {r['batch']:>5} {row['variant']:<21} {row['sample_rows']:>11.0f} "
                f"{row['loss_rows']:>9.0f} {row['total'] / 1e6:>10.1f} {row['gflops']:>8.2f} "
                f"{row['shapes_gflops']:>9.2f} {row['matmul_ms']:>10.3f} "
                f"{row['matmul_share']:>14.1%} {row['gflops'] / peak:>8.1%}"
            )
    print(
        "rows: through the MLP per iteration, in sampling and in the loss; MFLOP/iter: sampling "
        "forward + loss forward + loss backward (2 rows in out each, per layer; no input "
        "gradient for the first layer); GFLOP/s: those FLOPs over the iterations' time; at "
        "shapes: the GFLOP/s of the same matmuls replayed alone (best of 3, sampled iterations); "
        "matmuls ms: their time alone in a mean iteration; of matmul rate: GFLOP/s / at shapes "
        "(the share of the iteration's time its matmuls alone need); of peak: GFLOP/s / the "
        f"{PEAK_SIZE}^3 matmul's"
    )


# --- profile --------------------------------------------------------------------------------


_PHASES: list[str] = []  # the innermost timed phase running now is last


def _timed(fn: Callable, totals: dict[str, float], name: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        _PHASES.append(name)
        try:
            with torch.profiler.record_function(name):
                out = fn(*args, **kwargs)
        finally:
            _PHASES.pop()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return out

    return wrapper


class OpCounter(TorchDispatchMode):
    """Counts the aten operators an iteration dispatches to a kernel, by the innermost timed
    phase running (`_timed`): what reaches the backend after autograd and composite ops
    are unfolded (``linear`` is a ``t`` and an ``addmm``), backward's operators included.
    Every one of them is a kernel launch on a GPU and a dispatcher round trip on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        phase = _PHASES[-1] if _PHASES else "outside task.loss"
        self.counts[phase] = self.counts.get(phase, 0) + 1
        return func(*args, **(kwargs or {}))


class _TimedLoss:
    """A task's loss object whose call (the residuals and reduction, not its scoring) is timed
    as "loss_fn"; everything else is the loss's own."""

    def __init__(self, loss: Any, totals: dict[str, float]) -> None:
        self.loss, self.call = loss, _timed(loss, totals, "loss_fn")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loss, name)

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)


def profile_one(ndim: int, height: int, batch_size: int, args: argparse.Namespace) -> None:
    """Where kinetic's iteration spends its time: phases, torch ops and Python functions.

    Trains `--profile-warmup` iterations first so that trajectory lengths are those of a
    partly trained policy, then measures `--profile-iters` iterations. The phases are timed by
    wrapping `gfn.task`'s sampler, `gfn.losses`' log-prob scorer and the task's loss object in
    this process only.
    """
    n, m = args.profile_iters, max(1, args.profile_iters // 4)
    steps = args.profile_warmup + n + 2 * m
    extra = tuple(args.override)
    run = KineticRun(kinetic_config(ndim, height, batch_size, steps, args.optim, args.seed, extra))
    run.train(args.profile_warmup)
    totals: dict[str, float] = {}
    originals = (gfn.task.sample_trajectories, gfn.losses.trajectory_log_probs, run.task.loss_fn)
    gfn.task.sample_trajectories = _timed(originals[0], totals, "sample_trajectories")
    gfn.losses.trajectory_log_probs = _timed(originals[1], totals, "trajectory_log_probs")
    run.task.loss_fn = _TimedLoss(originals[2], totals)
    try:
        # Phases: the loop's calls into the task and the optimizer, timed by wrappers; the
        # rest of the iteration (zero_grad, backward, gradient norm, guard, monitors, schedule,
        # log) by difference.
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
        totals["backward, guard, monitors"] = wall - totals["task.loss"] - totals["optimizer step"]
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
            "backward, guard, monitors",
            "optimizer step",
        ):
            indent = (
                "  " if name in ("sample_trajectories", "trajectory_log_probs", "loss_fn") else ""
            )
            ms = totals.get(name, 0.0) / n * 1e3
            print(f"{indent + name:<26} {ms:>8.3f} {ms / (wall / n * 1e3):>6.1%}")

        # Operators per iteration, by phase ("task.loss" alone: the task's own work outside
        # the three inner phases; "outside task.loss": backward, guard, monitors, optimizer).
        counter = OpCounter()
        run.task.loss = _timed(task_loss, {}, "task.loss")
        try:
            with counter:
                run.train(m)
        finally:
            run.task.loss = task_loss
        total = sum(counter.counts.values())
        print(f"\naten operators per iteration ({m} iterations): {total / m:.0f}")
        for name in (
            "sample_trajectories",
            "trajectory_log_probs",
            "loss_fn",
            "task.loss",
            "outside task.loss",
        ):
            count = counter.counts.get(name, 0)
            print(f"  {name:<24} {count / m:>7.0f}")

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
        gfn.task.sample_trajectories, gfn.losses.trajectory_log_probs = originals[:2]
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
    parser.add_argument(
        "--warmup", type=int, default=20, help="iterations left out of means and medians"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved chunks per run")
    parser.add_argument("--optim", default="adamw", help="kinetic's optim config group")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for kinetic's config (repeatable), e.g. +optim.fused=true",
    )
    parser.add_argument(
        "--limit-samples", type=int, default=16, help="iterations replayed for the matmul rate"
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
    monitor = MonitorConfig.from_dict(
        kinetic_config(2, 8, 16, 1, args.optim, 0, tuple(args.override)).monitor
    )
    print(
        f"TB, MLP 256x2, P_B on the shared trunk, {args.optim} lr 1e-3 + log Z lr 0.1 (constant), "
        f"on-policy, {args.rounds} interleaved chunks; exact L1 = sum|p - p*| in [0, 2] after the "
        f"budget. kinetic: `python train.py`'s monitor=default (non-finite guard "
        f"{'on' if monitor.nonfinite.enabled else 'off'}, per-step signals on steps k-1 and k of "
        "every "
        f"k={monitor.every}, sharpness probe every {monitor.sharpness.every} steps), log_every, "
        "clip_grad_norm as configured; kinetic monitors off: monitor=off",
        flush=True,
    )
    peak = peak_gflops()

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
    print_tables(results, torch.get_num_threads(), args.warmup, peak)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at end {load}")


if __name__ == "__main__":
    main()
