# ruff: noqa: E402 (the project's imports follow the sys.path line below)
"""Trajectories per second of a full GFlowNet training iteration, kinetic against torchgfn,
and how far that iteration is from this machine's matmul rate.

One iteration is sample + trajectory-balance loss + backward + optimizer step, on HyperGrid
(default 8^4, batch 16 and 256) and on bit sequences (default 32 bits written 4 at a time, 16
targets, batch 16): 256x2 MLP, P_B a head on the shared trunk, AdamW lr 1e-3 with log Z at lr
0.1 and a constant lr (torchgfn's settings), on-policy, `--threads` intra-op threads (default
1; printed with every table). kinetic runs in this process through the code path of
`python train.py`: the Hydra-composed config, `GFlowNetTask`, `build_optimizer`, and
`kinetic.train` with the config's `monitor` group (`monitor=default`: the non-finite guard, the
per-step stability signals and the periodic sharpness probe), its `train.log_every` scalar
reads and its `train.clip_grad_norm`, without evaluation, files or progress bar. Each run is
one call of the loop, so the periodic work falls on the steps it would in a `python train.py`
run of that length. The kinetic rows (`--variants`): "kinetic", the default config; "kinetic
monitors off", `monitor=off` (the monitors' cost is the difference); "kinetic static
compiled", `task.rollout=static compile=true` (the lockstep rollout, compiled whole; its
compile time falls in the warm-up). torchgfn 2.4.1 runs `benchmarks/torchgfn_peer.py` in its
own virtual environment (its import name `gfn` clashes with kinetic's), driven over a pipe, on
its own HyperGrid or BitSequence (with kinetic's targets and state encoding). All train for the
same trajectory budget in interleaved chunks, the order alternating from chunk to chunk (the
other runs train while kinetic's loop waits in a callback, which is not timed), so drift in the
machine's speed hits them alike.

Per-iteration times leave out `--warmup` iterations. "mean" is the mean over every other
iteration, the periodic ones (sharpness probe, logging) included: the throughput a run gets;
"median" is the typical iteration, which hides the periodic work. After the budget, every
run's forward policy is scored by kinetic's evaluator, the same for all: on HyperGrid the
exact terminal distribution of its P_F on every grid state (`gfn.evaluation`), L1 =
sum_x |p(x) - p*(x)| in [0, 2]; on bit sequences the Spearman correlation between log P_T
(summed along each string's one trajectory) and log R over the environment's test set
(`BitSequence.sampled_metrics`), higher is better. kinetic's figure is checked against the
task's own evaluation.

The limit: the rows that go through the MLP's linear layers (trunk and fused heads) are
counted in the run itself, per pass of the policy: forward passes (sampling, and the loss
when it evaluates the policy again) and backward passes (the loss's, including the backward
through the sampling pass that an on-policy batch is scored from). FLOPs of an iteration =
sum over passes and layers of 2 rows in out (forward) or 2 rows in out for the weight gradient
plus 2 rows in out for the input gradient (backward; every layer but the first, whose input
needs none); bias adds and everything but these matmuls are left out, as are the sharpness
probe's Hessian-vector products (its steps are left out of the limit's figures). Then, in the
same process, the matmuls of sampled iterations are replayed alone at exactly those shapes
(`F.linear` forward, `mm` for the two backward products, fp32, the same threads; best of 3),
whose GFLOP/s is the machine's matmul rate at these shapes, and a 2048^3 matmul gives the
machine's peak at this thread count. Printed: the rows and FLOPs per iteration, its achieved
GFLOP/s, the rate at its shapes, the share of its time its matmuls alone need, and its
fraction of the 2048^3 peak. The floor is the first kinetic row's matmuls alone: the FLOPs
the default configuration needs (each distinct state once per sampling step while states
repeat, no second forward pass in the loss), at this machine's rate for their shapes; "x floor"
is every row's mean iteration over it.

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0 torchgfn==2.4.1   # CPU torch
    python benchmarks/gfn_throughput.py --peer-python /work/peer-venv/bin/python
    python benchmarks/gfn_throughput.py                      # kinetic only
    python benchmarks/gfn_throughput.py --envs 4x8 --batch-sizes 16 --budget 16=32000
    python benchmarks/gfn_throughput.py --profile 4x8:16 --profile bitseq:32:4:16  # kinetic only

The speed-up is torchgfn's ms/iter over kinetic's (= the ratio of trajectories/s), of the
means and of the medians. `--profile` prints where kinetic's iteration spends its time
(phases, aten operators per iteration, top ops, top Python functions).
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
from typing import Any, NamedTuple

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
from envs.bitseq import BitSequence
from envs.hypergrid import HyperGrid
from gfn.evaluation import exact_terminal_distribution, l1_distance, true_terminal_distribution
from gfn.policies import MLPPolicy, masked_log_softmax
from gfn.task import GFlowNetTask
from kinetic import MonitorConfig, TrainConfig, train
from optim import build_optimizer

PEER_SCRIPT = Path(__file__).with_name("torchgfn_peer.py")
DEFAULT_BUDGETS = {16: 32_000, 256: 64_000}  # trajectories per run, by batch size
# Rows of the table: kinetic variant -> (monitor config, extra overrides).
VARIANTS = {
    "kinetic": ("default", ()),
    "kinetic monitors off": ("off", ()),
    "kinetic static compiled": ("default", ("task.rollout=static", "compile=true")),
}
PEAK_SIZE = 2048  # the square matmul that stands for the machine's peak


# --- kinetic --------------------------------------------------------------------------------


def kinetic_config(
    env: tuple[str, ...],
    batch_size: int,
    steps: int,
    optim: str,
    seed: int,
    extra: tuple[str, ...] = (),
    monitor: str = "default",
) -> DictConfig:
    """The config `python train.py` would compose for the environment overrides `env`
    (`EnvSpec.overrides`), with the benchmark's settings pinned (torchgfn's: lr 1e-3, log Z lr
    0.1, no lr schedule); everything else, the monitors and gradient clipping included, is the
    config's default. `extra` overrides go last (e.g. ``+optim.fused=true`` to try a change)."""
    overrides = [
        *env,
        f"optim={optim}",
        "optim.lr=1e-3",
        "loss=tb",
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
    def log_pf_fn(self, states: Tensor) -> Tensor:
        """P_F's masked log-probs on `states`, ``(N, A)``."""
        env = self.task.env
        logits = self.task.model(env.featurize(states)).pf_logits
        return masked_log_softmax(logits, env.forward_mask(states))


# --- the limit: FLOPs and matmul rate ----------------------------------------------------


class RowCounter:
    """The rows of every pass of an `MLPPolicy`, from the run itself.

    The policy applies each of its linear layers (the trunk's, then the fused heads) once to
    every row of its input, so a pass's matmuls are fixed by its row count. Wraps the policy's
    `forward` (taped when autograd is on: the loss backpropagates it), `record` (the sampler's
    forward pass that the loss then backpropagates with `replay`) and `replay` (a backward
    pass without a forward); one Python call and a list append per call, cheaper than a module
    hook. Each pass is recorded as ``(rows, forward, backward, input_needs_grad)``."""

    def __init__(self, policy: MLPPolicy) -> None:
        if not isinstance(policy, MLPPolicy):
            raise TypeError(f"RowCounter counts an MLPPolicy's rows, not a {type(policy)}")
        self.layers = [(m.in_features, m.out_features) for m in (*policy.trunk, policy.heads)]
        self.calls: list[tuple[int, bool, bool, bool]] = []
        self._paused = False
        forward, record, replay = policy.forward, policy.record, policy.replay

        @functools.wraps(forward)
        def counted(features: Tensor):
            # A compiled rollout's calls are counted by `count_static_steps`, from outside the
            # graph (tracing this append would make the graph guard on the list's length).
            if not self._paused and not torch.compiler.is_compiling():
                taped = torch.is_grad_enabled()
                rows = features.numel() // features.shape[-1]
                self.calls.append((rows, True, taped, taped and features.requires_grad))
            return forward(features)

        @functools.wraps(record)
        def counted_record(features: Tensor):
            if not self._paused:
                self.calls.append((features.shape[0], True, False, False))
            return record(features)

        @functools.wraps(replay)
        def counted_replay(activations):
            if not self._paused and torch.is_grad_enabled():
                self.calls.append((activations.output.shape[0], False, True, False))
            return replay(activations)

        policy.forward, policy.record, policy.replay = counted, counted_record, counted_replay

    def count_static_steps(self, steps_fn: Callable) -> Callable:
        """`steps_fn` (a compiled `gfn.sampler.static_steps`) recording its k calls of the
        policy on n rows each, as forward passes without autograd."""

        @functools.wraps(steps_fn)
        def counted(gflownet, env, states, done, races, *args):
            if not self._paused:
                self.calls.extend([(states.shape[0], True, False, False)] * races.shape[0])
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

    def flops(self, calls: list[tuple[int, bool, bool, bool]]) -> dict[str, int]:
        """FLOPs of `calls`' matmuls: forward passes, and backward passes (weight gradients,
        and input gradients of every layer whose input needs one), and the rows of each."""
        per_row = sum(2 * n_in * n_out for n_in, n_out in self.layers)
        first = 2 * self.layers[0][0] * self.layers[0][1]
        out = {"forward_rows": 0, "backward_rows": 0, "forward": 0, "backward": 0}
        for rows, forward, backward, input_grad in calls:
            if forward:
                out["forward_rows"] += rows
                out["forward"] += rows * per_row
            if backward:
                out["backward_rows"] += rows
                out["backward"] += rows * (2 * per_row - (0 if input_grad else first))
        out["total"] = out["forward"] + out["backward"]
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

    def run(self, calls: list[tuple[int, bool, bool, bool]]) -> None:
        for rows, forward, backward, input_grad in calls:
            for i, (x, w, b, g) in enumerate(self.tensors):
                if forward:
                    F.linear(x[:rows], w, b)  # addmm(b, x, W^T), as the policy calls it
                if backward:
                    x[:rows].t().mm(g[:rows])  # weight gradient, as addmm's backward forms it
                    if i > 0 or input_grad:
                        g[:rows].mm(w)  # input gradient

    def seconds(self, calls: list[tuple[int, bool, bool, bool]], reps: int = 3) -> float:
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
    max_rows = max(rows for i in picked for rows, *_ in calls[i])
    replay = MatmulReplay(run.rows.layers, max_rows)
    seconds = sum(replay.seconds(calls[i]) for i in picked)
    result["shapes_gflops"] = sum(counts[i]["total"] for i in picked) / seconds / 1e9
    result["matmul_share"] = result["gflops"] / result["shapes_gflops"]
    result["matmul_ms"] = result["total"] / result["shapes_gflops"] / 1e6
    return result


# --- torchgfn, in its own process -----------------------------------------------------------


class Peer:
    """`torchgfn_peer.py` under the peer's Python, one JSON request and reply per line."""

    def __init__(self, python: str, cfg: DictConfig, threads: int, env: Any = None) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        if isinstance(env, BitSequence):  # the same targets as kinetic's run
            targets = Path(self.tmp.name) / "targets.pt"
            torch.save(env.targets.cpu(), targets)
            env_args = [
                "--env=bitseq",
                f"--n-bits={env.n}",
                f"--word-size={env.k}",
                f"--temperature={env.temperature}",
                f"--targets={targets}",
            ]
        else:
            env_args = [
                f"--ndim={cfg.env.ndim}",
                f"--height={cfg.env.height}",
                f"--R0={cfg.env.R0}",
                f"--R1={cfg.env.R1}",
                f"--R2={cfg.env.R2}",
            ]
        command = [
            python,
            str(PEER_SCRIPT),
            *env_args,
            f"--batch-size={cfg.task.batch_size}",
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
        self.tmp.cleanup()

    def request_quit(self) -> None:
        self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
        self.process.stdin.close()


def peer_log_pf_fn(peer: Peer, env: HyperGrid | BitSequence) -> Callable[[Tensor], Tensor]:
    """torchgfn's P_F as a function of kinetic states ``(N, *S)`` -> ``(N, A)`` masked
    log-probs, after checking on the states it is asked about that its masks (and, for
    terminal HyperGrid states, its rewards) follow kinetic's conventions."""

    def log_pf_fn(states: Tensor) -> Tensor:
        with tempfile.TemporaryDirectory() as tmp:
            path, out = Path(tmp) / "states.pt", Path(tmp) / "log_pf.pt"
            torch.save(states.cpu(), path)
            peer.request(cmd="dump_states", path=str(path), out=str(out))
            log_pf = torch.load(out)  # (N, A)
        # Actions: the same indices in both (the last is exit); the illegal entries must agree.
        if not torch.equal(torch.isfinite(log_pf), env.forward_mask(states)):
            raise RuntimeError(f"torchgfn's forward masks differ from kinetic's {env!r}")
        return log_pf

    if isinstance(env, HyperGrid):  # its reward, checked once on the whole grid
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "peer_log_pf.pt"
            peer.request(cmd="dump", path=str(path))
            dump = torch.load(path)
        log_r = env.log_reward(dump["states"])
        if not torch.allclose(dump["log_rewards"], log_r, atol=1e-5):
            bad = int((~torch.isclose(dump["log_rewards"], log_r, atol=1e-5)).sum())
            raise RuntimeError(f"torchgfn's HyperGrid reward is not kinetic's at {bad} states")
    return log_pf_fn


# --- final error ----------------------------------------------------------------------------


def spec_metric(spec: EnvSpec) -> str:
    """The figure a run is scored by: exact L1 on HyperGrid, the test-set Spearman correlation
    of log P_T with log R on bit sequences (higher is better)."""
    return "l1" if spec.kind == "hypergrid" else "spearman_test"


def final_error(spec: EnvSpec, env: Any, log_pf_fn: Callable[[Tensor], Tensor]) -> float:
    """`spec_metric` of the policy whose masked log P_F on a batch of states is `log_pf_fn`,
    by kinetic's evaluator: the exact terminal distribution (HyperGrid, L1 = sum|p - p*|), or
    log P_T of each test string summed along its one trajectory (`BitSequence`)."""
    if spec.kind == "hypergrid":
        states = env.enumerate_terminals()  # every HyperGrid state is terminal
        table = log_pf_fn(states)  # (N, A)
        table = table.new_empty(table.shape).index_copy_(0, env.state_index(states), table)
        _, p = exact_terminal_distribution(env, lambda s: table[env.state_index(s)])
        p_star, _ = true_terminal_distribution(env)
        return float(l1_distance(p, p_star))

    def log_p_terminal(strings: Tensor) -> Tensor:  # (M, n/k) complete strings -> (M,)
        n_words = strings.shape[1]
        slots = torch.arange(n_words)
        # Prefix t of each string: its first t words, the rest empty; t = n/k is the string.
        prefixes = torch.where(
            slots < torch.arange(n_words + 1).unsqueeze(1).unsqueeze(2), strings, -1
        )  # (n/k + 1, M, n/k)
        log_pf = log_pf_fn(prefixes.flatten(0, 1)).view(n_words + 1, len(strings), -1)
        words = torch.cat([strings.T, torch.full((1, len(strings)), env.stop_action)])
        return log_pf.gather(2, words.unsqueeze(2)).squeeze(2).sum(dim=0)  # (M,)

    return env.sampled_metrics(env.test_set[:1], log_p_terminal)["spearman_test"]


# --- the benchmark --------------------------------------------------------------------------


class EnvSpec(NamedTuple):
    """A benchmarked environment: HyperGrid ``NDIMxHEIGHT`` (scored by exact L1) or bit
    sequences ``bitseq:N:K`` (N bits, K per word, 16 targets; scored by the test-set Spearman
    correlation of log P_T with log R)."""

    kind: str  # hypergrid | bitseq
    a: int  # ndim | n bits
    b: int  # height | bits per word

    @staticmethod
    def parse(text: str) -> EnvSpec:
        if text.startswith("bitseq:"):
            n, k = (int(part) for part in text.split(":")[1:])
            return EnvSpec("bitseq", n, k)
        ndim, height = (int(part) for part in text.lower().split("x"))
        return EnvSpec("hypergrid", ndim, height)

    @property
    def label(self) -> str:
        return f"{self.b}^{self.a}" if self.kind == "hypergrid" else f"bits{self.a}/{self.b}"

    @property
    def overrides(self) -> tuple[str, ...]:
        if self.kind == "hypergrid":
            return ("env=hypergrid", f"env.ndim={self.a}", f"env.height={self.b}")
        return ("env=bitseq", f"env.n={self.a}", f"env.k={self.b}", "env.n_targets=16")


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


def benchmark_one(spec: EnvSpec, batch_size: int, budget: int, args: argparse.Namespace) -> dict:
    """Train every run for `budget` trajectories in interleaved chunks; time and score them.

    kinetic's default run trains in one call of the loop; after each of its chunks, its
    callback trains the other runs' chunk (in alternating order), outside its timed span."""
    iters = math.ceil(budget / batch_size)
    if iters <= args.warmup:
        raise ValueError(f"budget {budget} gives {iters} iterations, not more than the warm-up")
    extra = tuple(args.override)
    if spec.kind == "bitseq":  # every string takes n/k + 1 steps: one compiled chunk each
        extra = (f"task.rollout_chunk={spec.a // spec.b + 1}", *extra)
    runs = {
        name: KineticRun(
            kinetic_config(
                spec.overrides, batch_size, iters, args.optim, args.seed, extra + more, monitor
            )
        )
        for name, (monitor, more) in VARIANTS.items()
        if name in args.variants
    }
    main_name, *other_names = runs
    peer = None
    if args.peer_python:
        peer = Peer(args.peer_python, runs[main_name].cfg, args.threads, runs[main_name].task.env)
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
        env = runs[main_name].task.env
        for name, run in runs.items():
            error = final_error(spec, env, run.log_pf_fn)
            # The lookup reproduces the task's own evaluation (same model and evaluator).
            task_error = run.task.evaluate(run.step)[spec_metric(spec)]
            if abs(task_error - error) > 1e-5:
                raise RuntimeError(f"{spec_metric(spec)}: benchmark's {error}, task's {task_error}")
            probes = [i for i in run.probe_steps if i >= args.warmup]
            rows.append(
                {"variant": name, **timing(run.ms, args.warmup), "error": error, "probes": probes}
                | limit(run, args.warmup, args.limit_samples)
            )
        if peer is not None:
            error = final_error(spec, env, peer_log_pf_fn(peer, env))
            rows.append({"variant": "torchgfn", **timing(peer_ms, args.warmup), "error": error})
    finally:
        if peer is not None:
            peer.close()
    return {
        "grid": spec.label,
        "metric": spec_metric(spec),
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
        "(every one, periodic monitor work included) and median (the typical iteration); "
        "x floor: mean ms over the floor (the first kinetic row's matmuls alone); error: exact "
        "L1 (HyperGrid, lower is better) or test-set Spearman (bit sequences, higher is better)"
    )
    print(
        f"{'env':>9} {'batch':>5} {'iters':>6} {'variant':<24} {'mean ms':>8} {'median ms':>9} "
        f"{'traj/s':>7} {'x floor':>7} {'probes':>6} {'error':>7}"
    )
    for r in results:
        by_name = {row["variant"]: row for row in r["rows"]}
        base = r["rows"][0]
        for row in r["rows"]:
            probes = len(row["probes"]) if "probes" in row else "-"
            print(
                f"{r['grid']:>9} {r['batch']:>5} {r['iters']:>6} {row['variant']:<24} "
                f"{row['mean_ms']:>8.2f} {row['median_ms']:>9.2f} "
                f"{r['batch'] / row['mean_ms'] * 1e3:>7.0f} "
                f"{row['mean_ms'] / base['matmul_ms']:>7.2f} {probes:>6} {row['error']:>7.4f}"
            )
        peer = by_name.get("torchgfn")
        for name, row in by_name.items():
            if peer is not None and name != "torchgfn":
                print(
                    f"{'':>9} {'':>5} {'':>6} torchgfn / {name}: mean "
                    f"{peer['mean_ms'] / row['mean_ms']:.2f}x, median "
                    f"{peer['median_ms'] / row['median_ms']:.2f}x"
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
        f"{'env':>9} {'batch':>5} {'variant':<24} {'rows fwd':>8} {'rows bwd':>8} "
        f"{'MFLOP/iter':>10} {'GFLOP/s':>8} {'at shapes':>9} {'matmuls ms':>10} "
        f"{'of matmul rate':>14} {'of peak':>8}"
    )
    for r in results:
        for row in r["rows"]:
            if "gflops" not in row:
                continue
            print(
                f"{r['grid']:>9} {r['batch']:>5} {row['variant']:<24} "
                f"{row['forward_rows']:>8.0f} {row['backward_rows']:>8.0f} "
                f"{row['total'] / 1e6:>10.1f} {row['gflops']:>8.2f} "
                f"{row['shapes_gflops']:>9.2f} {row['matmul_ms']:>10.3f} "
                f"{row['matmul_share']:>14.1%} {row['gflops'] / peak:>8.1%}"
            )
    print(
        "rows fwd / bwd: through the MLP per iteration, forward (sampling, and the loss when it "
        "evaluates the policy again) and backward (the loss's); MFLOP/iter: 2 rows in out per "
        "layer forward, twice that backward (no input gradient for the first layer); GFLOP/s: "
        "those FLOPs over the iterations' time; at shapes: the GFLOP/s of the same matmuls "
        "replayed alone (best of 3, sampled iterations); matmuls ms: their time alone in a mean "
        "iteration (the first row's is the floor); of matmul rate: GFLOP/s / at shapes (the "
        "share of the iteration's time its matmuls alone need); of peak: GFLOP/s / the "
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


def profile_one(spec: EnvSpec, batch_size: int, args: argparse.Namespace) -> None:
    """Where kinetic's iteration spends its time: phases, torch ops and Python functions.

    Trains `--profile-warmup` iterations first so that trajectory lengths are those of a
    partly trained policy, then measures `--profile-iters` iterations. The phases are timed by
    wrapping `gfn.task`'s sampler, `gfn.losses`' log-prob scorer and the task's loss object in
    this process only.
    """
    n, m = args.profile_iters, max(1, args.profile_iters // 4)
    steps = args.profile_warmup + n + 2 * m
    extra = tuple(args.override)
    cfg = kinetic_config(spec.overrides, batch_size, steps, args.optim, args.seed, extra)
    run = KineticRun(cfg)
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
            f"\n=== kinetic profile: {spec.label}, batch {batch_size}, after "
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
        # (A dispatch mode cannot run through a compiled graph: a compiled rollout is skipped.)
        counter = OpCounter()
        run.task.loss = _timed(task_loss, {}, "task.loss")
        try:
            if run.task.steps_fn is None:
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
    parser.add_argument(
        "--envs",
        nargs="+",
        default=["4x8", "bitseq:32:4"],
        help="HyperGrids NDIMxHEIGHT and bit sequences bitseq:N:K (N bits, K per word)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--bitseq-batch-sizes", type=int, nargs="+", default=[16])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="kinetic rows (the first is the one the others are compared with)",
    )
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
            env, _, batch = spec.rpartition(":")
            profile_one(EnvSpec.parse(env), int(batch), args)
        return

    if args.peer_python:
        probe = Peer(
            args.peer_python,
            kinetic_config(EnvSpec.parse("2x8").overrides, 16, 1, args.optim, args.seed),
            args.threads,
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
        kinetic_config(
            EnvSpec.parse("2x8").overrides, 16, 1, args.optim, 0, tuple(args.override)
        ).monitor
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
    for env in args.envs:
        spec = EnvSpec.parse(env)
        for batch_size in args.batch_sizes if spec.kind == "hypergrid" else args.bitseq_batch_sizes:
            budget = budgets.get(batch_size, 2000 * batch_size)
            start = time.perf_counter()
            results.append(benchmark_one(spec, batch_size, budget, args))
            print(
                f"  done {spec.label} batch {batch_size} in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    print()
    print_tables(results, torch.get_num_threads(), args.warmup, peak)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average at end {load}")


if __name__ == "__main__":
    main()
