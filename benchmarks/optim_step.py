"""Time of one optimizer `step()`: every VRAdam implementation against torch's fused AdamW, and
the bandwidth each achieves against a copy and an in-place pass measured in the same run.

Models of fp32 parameters spread over a few hundred tensors (weights and biases of square
linear layers), gradients fixed. Every optimizer steps the same parameters and keeps its own
state; they are timed in interleaved rounds so that drift in the machine's speed hits all of
them alike. Two passes over AdamW's byte count are timed in the same rounds as the machine's
attainable bandwidth: "copy", a `Tensor.copy_` (14 bytes per parameter read, 14 written to
other memory), and "in-place", a `mul_(1)` that reads and writes the same 14 bytes, as an
optimizer updates theta, m and v where they are (a copy's destination is also read into the
cache before it is written, which the in-place pass does not pay, so on a CPU it is the faster
and the fairer ceiling, and an optimizer can exceed 100% of the copy). Per optimizer the
table gives the median time per step over the rounds (a step does the same work every time,
so there is no periodic work for a mean to show), the bytes per parameter it must move (BYTES
below, as docs/performance.md derives them: 28 for AdamW and lagged Triton VRAdam, 32 for
lagged fused VRAdam, 36 for exact VRAdam, 40 for fused `velocity="precond"`), the GB/s it
achieves (those bytes over its time), that bandwidth's fraction of the copy's and of the
in-place pass's, and its time
against fused AdamW's. CPU runs use each `--threads` count in turn (default 1 and 2, printed
per row); CUDA times the device. Run:

    python benchmarks/optim_step.py --threads 1                # CPU: 1M and 10M parameters
    python benchmarks/optim_step.py --device cuda              # 10M, 100M, 1B parameters

Memory: 8 bytes per parameter (theta, g) plus 8 per optimizer (m, v); at 1B parameters and the
default set on CUDA, about 90 GB (use --only to time fewer).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from optim import VRAdam
from optim.vradam import triton_available

# Bytes each step must read and write per fp32 parameter (4 bytes per tensor touched).
# AdamW: read theta, g, m, v; write theta, m, v. Exact VRAdam needs s_t before any theta moves:
# fused (CPU) reads m, g (precond: m, v, g) once more before the AdamW pass; Triton's two passes
# are g, m, v -> m, v then theta, m, v -> theta. Lagged: one pass, AdamW's bytes.
BYTES = {
    "adamw-foreach": 28,
    "adamw-fused": 28,
    "vradam-reference": 28,  # not bandwidth-bound: many temporaries per tensor
    "vradam-fused": 36,
    "vradam-fused-mean": 36,
    "vradam-fused-precond": 40,
    "vradam-fused-lagged": 32,  # lagged on the CPU: AdamW's pass, then a read of m for s_t
    "vradam-triton": 36,
    "vradam-triton-mean": 36,
    "vradam-triton-precond": 36,
    "vradam-triton-lagged": 28,
}
BASELINE = "adamw-fused"


def _vradam(impl: str, **options) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    return lambda ps: VRAdam(ps, lr=1e-3, impl=impl, **options)


OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "vradam-reference": _vradam("reference"),
    "vradam-fused": _vradam("fused"),
    "vradam-fused-mean": _vradam("fused", velocity="mean"),
    "vradam-fused-precond": _vradam("fused", velocity="precond"),
    "vradam-fused-lagged": _vradam("fused", norm_timing="lagged"),
    "vradam-triton": _vradam("triton"),
    "vradam-triton-mean": _vradam("triton", velocity="mean"),
    "vradam-triton-precond": _vradam("triton", velocity="precond"),
    "vradam-triton-lagged": _vradam("triton", norm_timing="lagged"),
}


def make_params(n_params: int, n_tensors: int, device: str) -> list[torch.nn.Parameter]:
    """Weights (d, d) and biases (d,) of n_tensors/2 linear layers, about n_params in all."""
    n_layers = n_tensors // 2
    d = round((-1 + math.sqrt(1 + 4 * n_params / n_layers)) / 2)  # d^2 + d per layer
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(n_layers):
        for shape in ((d, d), (d,)):
            p = torch.randn(shape, generator=gen, device=device).mul_(0.02)
            p = torch.nn.Parameter(p)
            p.grad = torch.randn(shape, generator=gen, device=device).mul_(1e-3)
            params.append(p)
    return params


def _clock(device: str) -> Callable[[], float]:
    if device == "cuda":

        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return now
    return time.perf_counter


def time_steps(
    names: list[str], n_params: int, n_tensors: int, rounds: int, steps: int, device: str
) -> tuple[dict[str, float], int]:
    """Median seconds per step of each optimizer (and of "copy" and "in-place", the bandwidth
    probes), and the
    number of parameters stepped."""
    params = make_params(n_params, n_tensors, device)
    optimizers = {name: OPTIMIZERS[name](params) for name in names}
    n = sum(p.numel() for p in params)
    # Each probe reads and writes half of AdamW's bytes per parameter: 3.5 floats per parameter
    # (ones: no denormals or NaNs in the multiply, and mul_(1) keeps them ones).
    src = torch.ones(BYTES[BASELINE] * n // 8, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    tasks: dict[str, Callable[[], object]] = {name: opt.step for name, opt in optimizers.items()}
    tasks["copy"] = lambda: dst.copy_(src)
    tasks["in-place"] = lambda: src.mul_(1.0)
    for task in tasks.values():  # create the state, compile kernels; first steps allocate
        for _ in range(3):
            task()
    now = _clock(device)
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(rounds):
        for name, task in tasks.items():
            start = now()
            for _ in range(steps):
                task()
            samples[name].append((now() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=float, nargs="+", help="default: 1e6 1e7 (cuda: 1e7-1e9)")
    parser.add_argument("--tensors", type=int, default=300, help="parameter tensors per model")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU threads")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--only", nargs="+", choices=list(OPTIMIZERS), help="time only these")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    names = [n for n in OPTIMIZERS if not args.only or n in args.only or n == BASELINE]
    if args.device == "cpu" or not triton_available():
        # On the CPU Triton only interprets (numpy per program): far too slow to time.
        names = [n for n in names if "triton" not in n]
    sizes = args.sizes or ([1e7, 1e8, 1e9] if args.device == "cuda" else [1e6, 1e7])
    threads = args.threads if args.device == "cpu" else [torch.get_num_threads()]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {where}, fp32, {args.tensors} tensors, "
          f"median of {args.rounds} interleaved rounds; GB/s = bytes/param x params / time, "
          "of copy / of in-place = that over the copy's / the in-place pass's GB/s in the same "
          "run")  # fmt: skip
    print(f"{'params':>7} {'threads':>7} {'optimizer':<22} {'ms/step':>9} {'B/param':>7} "
          f"{'GB/s':>7} {'of copy':>7} {'of in-place':>11} {'x adamw-fused':>13}")  # fmt: skip
    for size in args.sizes or sizes:
        n_params = int(size)
        steps = max(1, int((2e9 if args.device == "cuda" else 2e7) // n_params))
        for t in threads:
            torch.set_num_threads(t)
            medians, n = time_steps(names, n_params, args.tensors, args.rounds, steps, args.device)
            gbs = {
                name: BYTES.get(name, BYTES[BASELINE]) * n / m / 1e9 for name, m in medians.items()
            }
            for name in [*names, "copy", "in-place"]:
                ratio = medians[name] / medians[BASELINE]
                print(f"{n / 1e6:>6.0f}M {t:>7} {name:<22} {medians[name] * 1e3:>9.3f} "
                      f"{BYTES.get(name, BYTES[BASELINE]):>7} {gbs[name]:>7.1f} "
                      f"{gbs[name] / gbs['copy']:>7.1%} {gbs[name] / gbs['in-place']:>11.1%} "
                      f"{ratio:>12.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
