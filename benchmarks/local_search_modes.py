"""Modes found against trajectories sampled, with and without local search (LS-GFN).

For each environment (`env=hypergrid_hard`: 16 modes among 4,096 states; `env=bitseq`: 16
targets, found within 3 bits), each seed, and each arm (plain TB; TB with
`task.local_search.refinements=R`), trains `python train.py`'s task and optimizer (Hydra-composed
config, `GFlowNetTask`, VRAdam) on the same budget of sampled trajectories, where every local
search proposal counts as one trajectory, and records the modes found (distinct mode states
for HyperGrid, targets hit for bit sequences) after every `--every` trajectories. Prints, per
environment, the mean over seeds at each budget point for both arms, their ratio, and the wall
time. One intra-op thread (`--threads`): batch-16 MLPs run faster on one than on two contending.
`--axis steps` counts only on-policy trajectories instead, so both arms take the same optimizer
steps and local search's proposals come on top.

    python benchmarks/local_search_modes.py                      # both envs, 3 seeds
    python benchmarks/local_search_modes.py --envs bitseq --seeds 0 1 --budget 20000
    python benchmarks/local_search_modes.py --axis steps
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import gfn.config  # noqa: F401  (registers task=gfn)
from gfn.evaluation import count_modes
from gfn.state_dag import state_dag
from gfn.task import GFlowNetTask
from optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]


def compose_config(env: str, seed: int, refinements: int, k: int, acceptance: str):
    overrides = [
        f"env={env}", f"seed={seed}", f"task.local_search.refinements={refinements}",
        f"task.local_search.k={k}", f"task.local_search.acceptance={acceptance}",
        "task.check_env=false",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def modes_found(task: GFlowNetTask) -> int:
    """Distinct mode states drawn so far (HyperGrid) or targets hit (bit sequences)."""
    if task.found_targets is not None:
        return int(task.found_targets.sum())
    visited = state_dag(task.env).terminals[task.visited]
    return count_modes(task.env, visited)[0]


def run_arm(cfg, budget: int, every: int, axis: str) -> tuple[list[int], float]:
    """Train until `budget` trajectories; the modes found at each multiple of `every`. With
    `axis` "steps", only the on-policy batch counts: both arms take the same optimizer steps
    and local search draws its proposals on top."""
    torch.manual_seed(cfg.seed)
    task = GFlowNetTask.from_config(cfg)
    optimizer = build_optimizer(cfg.optim, task.param_groups())
    curve, next_mark, drawn, step = [], every, 0, 0
    start = time.perf_counter()
    while drawn < budget:
        loss, _ = task.loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        drawn += task.items_per_step if axis == "trajectories" else task.batch_size
        while next_mark <= drawn and next_mark <= budget:
            curve.append(modes_found(task))
            next_mark += every
    return curve, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=["hypergrid_hard", "bitseq"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=32_000, help="trajectories per run")
    parser.add_argument("--every", type=int, default=4_000, help="trajectories between counts")
    parser.add_argument("--refinements", type=int, default=4)
    parser.add_argument("--k", type=int, default=None, help="default: a quarter of max_steps")
    parser.add_argument("--acceptance", default="mh", choices=["mh", "greedy"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--axis", default="trajectories", choices=["trajectories", "steps"],
        help="budget in every sampled trajectory (default), or in on-policy ones (equal steps)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads} budget={args.budget} trajectories ({args.axis} axis), "
          f"seeds={args.seeds}, "
          f"refinements={args.refinements}, acceptance={args.acceptance}")  # fmt: skip
    for env in args.envs:
        probe = GFlowNetTask.from_config(compose_config(env, 0, 0, 1, "mh")).env
        k = args.k or max(1, probe.max_steps // 4)
        curves: dict[str, list[list[int]]] = {"plain": [], "ls": []}
        times: dict[str, list[float]] = {"plain": [], "ls": []}
        for seed in args.seeds:
            for arm, refinements in (("plain", 0), ("ls", args.refinements)):
                cfg = compose_config(env, seed, refinements, k, args.acceptance)
                curve, seconds = run_arm(cfg, args.budget, args.every, args.axis)
                curves[arm].append(curve)
                times[arm].append(seconds)
        print(f"\nenv={env} (max_steps={probe.max_steps}, K={k}); modes found, mean over "
              f"{len(args.seeds)} seeds [min, max]")  # fmt: skip
        unit = "trajectories" if args.axis == "trajectories" else "on-policy"
        print(f"{unit:>12} | plain TB | TB + local search | ratio")
        for i in range(len(curves["plain"][0])):
            plain = [c[i] for c in curves["plain"]]
            ls = [c[i] for c in curves["ls"]]
            ratio = statistics.mean(ls) / max(statistics.mean(plain), 1e-9)
            print(f"{(i + 1) * args.every:>12,} | {statistics.mean(plain):5.1f} "
                  f"[{min(plain)}, {max(plain)}] | {statistics.mean(ls):5.1f} "
                  f"[{min(ls)}, {max(ls)}] | {ratio:.2f}x")  # fmt: skip
        print(f"wall time per run (mean, s): plain {statistics.mean(times['plain']):.1f}, "
              f"local search {statistics.mean(times['ls']):.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
