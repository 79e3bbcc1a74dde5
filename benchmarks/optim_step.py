"""Median time of one optimizer `step()`: VRAdam (each implementation) against torch's AdamW.

Models of 1M and 10M fp32 parameters spread over a few hundred tensors (weights and biases of
square linear layers), gradients fixed, on the CPU. Implementations are timed in interleaved
rounds so that drift in the machine's speed hits all of them alike. Run:

    python benchmarks/optim_step.py                  # 1M and 10M parameters, 1 and 2 threads
    python benchmarks/optim_step.py --sizes 1e6 --threads 1

The exact VRAdam step must read m and g once more than Adam (for ||m_t||^2 before the update),
about 36 against 28 bytes per parameter, so ~1.3x fused AdamW is the floor for a memory-bound
step; the printed ratio is against fused AdamW measured in the same run.
``velocity="mean"`` costs the same as the paper's sum; ``velocity="precond"`` needs v_t and Adam's
direction before eta_t is known, so it runs foreach ops instead of the fused kernel.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from optim import VRAdam

OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "vradam-reference": lambda ps: VRAdam(ps, lr=1e-3, impl="reference"),
    "vradam-fused": lambda ps: VRAdam(ps, lr=1e-3, impl="fused"),
    "vradam-fused-mean": lambda ps: VRAdam(ps, lr=1e-3, impl="fused", velocity="mean"),
    "vradam-fused-precond": lambda ps: VRAdam(ps, lr=1e-3, impl="fused", velocity="precond"),
}
BASELINE = "adamw-fused"


def make_params(n_params: int, n_tensors: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """Weights (d, d) and biases (d,) of n_tensors/2 linear layers, about n_params in all."""
    n_layers = n_tensors // 2
    d = round((-1 + math.sqrt(1 + 4 * n_params / n_layers)) / 2)  # d^2 + d per layer
    gen = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n_layers):
        for shape in ((d, d), (d,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            params.append(p)
    return params


def time_steps(n_params: int, n_tensors: int, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per step of each optimizer, over `rounds` interleaved rounds."""
    optimizers = {name: make(make_params(n_params, n_tensors)) for name, make in OPTIMIZERS.items()}
    for opt in optimizers.values():  # create the state; first steps allocate
        for _ in range(3):
            opt.step()
    samples: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(rounds):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--tensors", type=int, default=300, help="parameter tensors per model")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--only", nargs="+", choices=list(OPTIMIZERS), help="time only these (default: all)"
    )
    args = parser.parse_args()
    if args.only:
        keep = {*args.only, BASELINE, "vradam-fused"}
        for name in list(OPTIMIZERS):
            if name not in keep:
                del OPTIMIZERS[name]

    print(f"torch {torch.__version__}, CPU, fp32, {args.tensors} tensors, median of {args.rounds}")
    header = f"{'params':>7} {'threads':>7} " + " ".join(f"{n:>20}" for n in OPTIMIZERS)
    print(header + f" {'vradam-fused/adamw-fused':>25}")
    for size in args.sizes:
        n_params = int(size)
        steps = max(1, int(2e7 // n_params))  # ~20M parameter-updates per sample
        for threads in args.threads:
            torch.set_num_threads(threads)
            medians = time_steps(n_params, args.tensors, args.rounds, steps)
            cells = " ".join(f"{medians[n] * 1e3:>17.3f} ms" for n in OPTIMIZERS)
            ratio = medians["vradam-fused"] / medians[BASELINE]
            print(f"{n_params / 1e6:>6.0f}M {threads:>7} {cells} {ratio:>24.2f}x")


if __name__ == "__main__":
    main()
