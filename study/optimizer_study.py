"""The optimizer study: every optimizer on every task, a few seeds over a small lr sweep.

    python study/optimizer_study.py run --jobs 2        # Hydra multiruns into study_runs/
    python study/optimizer_study.py collect             # docs/results.md and docs/figures/study_*

`run` launches one `train.py -m` per (task, optimizer) cell, sweeping `optim.lr` and `seed`;
`collect` reads each run's `metrics.json`, `.hydra/overrides.yaml` and TensorBoard events, and
writes mean ± std tables and plots. Everything the study varies is in the tables below.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StudyTask:
    """One task of the study: its overrides, the metric reported, and which way is better."""

    overrides: tuple[str, ...]
    metric: str
    lower_is_better: bool
    label: str
    x_name: str  # what the curves' x axis counts
    curve: str = ""  # the TensorBoard tag drawn over training (default: eval/<metric>)


TASKS: dict[str, StudyTask] = {
    "hypergrid_2d": StudyTask(
        ("env=hypergrid", "env.ndim=2", "env.height=8", "train.steps=1000", "train.eval_every=100"),
        "l1", True, "HyperGrid 8x8, exact L1", "trajectories",
    ),
    # The VRAdam paper's GFlowNet setting: flow matching on a grid.
    "hypergrid_fm": StudyTask(
        ("env=hypergrid", "env.ndim=2", "env.height=8", "loss=fm", "train.steps=1000",
         "train.eval_every=100"),
        "l1", True, "HyperGrid 8x8, flow matching, exact L1", "trajectories",
    ),
    "hypergrid_4d": StudyTask(
        ("env=hypergrid", "env.ndim=4", "env.height=8", "train.steps=1500", "train.eval_every=150"),
        "l1", True, "HyperGrid 8^4, exact L1", "trajectories",
    ),
    "bitseq": StudyTask(
        ("env=bitseq", "train.steps=1000", "train.eval_every=100"),
        "spearman_test", False, "Bit sequences n=32 k=4, test Spearman", "trajectories",
    ),
    "ddpm": StudyTask(
        ("task=ddpm", "task.batch_size=64", "train.steps=300", "train.warmup_steps=30",
         "train.eval_every=300"),
        "fd_ratio", True, "DDPM digits (short), FD ratio", "images",
        "train/loss",  # one evaluation per short run: the curve is the training loss
    ),
}  # fmt: skip

# Optimizers (and VRAdam's velocity variants) as config overrides; `family` picks the lr grid.
OPTIMIZERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "adamw": ("adam", ("optim=adamw",)),
    "vradam": ("adam", ("optim=vradam",)),
    # One beta3 for every task, to test whether a scale-free measure lets one value transfer.
    "vradam_mean": ("adam", ("optim=vradam", "optim.velocity=mean", "optim.beta3=1e7")),
    "vradam_precond": ("adam", ("optim=vradam", "optim.velocity=precond", "optim.beta3=300")),
    "adamp": ("adam", ("optim=adamp",)),
    "adahb_adam": ("adam", ("optim=adahb_adam",)),
    "kadam": ("adam", ("optim=kadam",)),
    "sgdp": ("sgd", ("optim=sgdp",)),
    "adahb_sgd": ("sgd", ("optim=adahb_sgd",)),
}

# Learning rates per (task, optimizer family): the last one is deliberately aggressive.
LR_GRID: dict[str, dict[str, tuple[float, ...]]] = {
    "hypergrid_2d": {"adam": (1e-3, 5e-3, 3e-2), "sgd": (1e-2, 3e-2, 3e-1)},
    "hypergrid_fm": {"adam": (1e-3, 5e-3, 3e-2), "sgd": (1e-2, 3e-2, 3e-1)},
    "hypergrid_4d": {"adam": (1e-3, 5e-3, 3e-2), "sgd": (1e-2, 3e-2, 3e-1)},
    "bitseq": {"adam": (1e-3, 5e-3, 3e-2), "sgd": (1e-2, 3e-2, 3e-1)},
    "ddpm": {"adam": (3e-4, 1e-3, 5e-3, 2e-2), "sgd": (1e-2, 1e-1, 1.0)},
}
SEEDS = (0, 1, 2)
COMMON = ("logging.progress=false", "logging.images=false", "threads=1")
# Sharpness probes often enough to draw the edge-of-stability ratio over a short run.
PROBES = {"gfn": ("monitor.sharpness.every=250",), "ddpm": ("monitor.sharpness.every=100",)}


def cell_command(
    task: str, optimizer: str, sweep_dir: Path, seeds: tuple[int, ...], lrs: tuple[float, ...] = ()
) -> list[str]:
    """The `train.py -m` command line of one (task, optimizer) cell (`lrs`: a subset of the grid,
    to add or redo some learning rates; default: the whole grid)."""
    family, overrides = OPTIMIZERS[optimizer]
    lrs = ",".join(f"{lr:g}" for lr in lrs or LR_GRID[task][family])
    return [
        sys.executable, "train.py", "-m", *TASKS[task].overrides, *overrides, *COMMON,
        *PROBES["ddpm" if task == "ddpm" else "gfn"],
        f"optim.lr={lrs}", f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=lr_${optim.lr}_seed_${seed}",
    ]  # fmt: skip


def run(args: argparse.Namespace) -> None:
    cells = [(t, o) for t in args.tasks for o in args.optimizers]
    seeds = tuple(args.seeds)

    def launch(cell: tuple[str, str]) -> tuple[str, str, int, float]:
        task, optimizer = cell
        family = OPTIMIZERS[optimizer][0]
        lrs = tuple(lr for lr in LR_GRID[task][family] if not args.lrs or lr in args.lrs)
        if not lrs:
            return task, optimizer, -1, 0.0
        sweep_dir = args.out / task / optimizer
        command = cell_command(task, optimizer, sweep_dir, seeds, lrs)
        if args.dry_run:
            print(" ".join(command))
            return task, optimizer, -1, 0.0
        sweep_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(sweep_dir / "multirun.log", "a") as log:
            code = subprocess.run(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            ).returncode
        return task, optimizer, code, time.perf_counter() - start

    with ThreadPoolExecutor(args.jobs) as pool:
        for task, optimizer, code, seconds in pool.map(launch, cells):
            if code < 0:
                continue
            status = "ok" if code == 0 else f"exit {code} (see multirun.log)"
            print(f"{task:>13} {optimizer:>15}: {status} in {seconds:.0f}s", flush=True)


# ---- collect -------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    optimizer: str
    lr: float
    seed: int
    path: Path
    metrics: dict[str, float | None]


def _overrides(run_dir: Path) -> dict[str, str]:
    lines = (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    pairs = [line.removeprefix("- ").strip() for line in lines if "=" in line]
    return dict(pair.split("=", 1) for pair in pairs)


def find_runs(root: Path) -> list[Run]:
    """Every run under `root/<task>/<optimizer>/lr_<lr>_seed_<seed>/`; one that wrote no
    metrics.json (stopped early, e.g. by the non-finite guard) has empty metrics: it diverged."""
    runs = []
    for overrides_path in sorted(root.glob("*/*/*/.hydra/overrides.yaml")):
        run_dir = overrides_path.parent.parent
        task, optimizer = run_dir.parent.parent.name, run_dir.parent.name
        if task not in TASKS or optimizer not in OPTIMIZERS:
            continue
        over = _overrides(run_dir)
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        runs.append(
            Run(task, optimizer, float(over["optim.lr"]), int(over["seed"]), run_dir, metrics)
        )
    return runs


def _value(run: Run, metric: str) -> float:
    """The run's final metric; a diverged run (missing or non-finite) counts as NaN."""
    value = run.metrics.get(metric)
    return float("nan") if value is None else float(value)


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan"), 0
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    return statistics.fmean(finite), std, len(finite)


def _scalars(run: Run, tag: str) -> tuple[list[int], list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def _by_lr(runs: list[Run], task: str, optimizer: str) -> dict[float, list[float]]:
    """One (task, optimizer) cell: each seed's final metric, by learning rate (ascending)."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in runs:
        if r.task == task and r.optimizer == optimizer:
            by_lr[r.lr].append(_value(r, TASKS[task].metric))
    return dict(sorted(by_lr.items()))


def _best(task: str, by_lr: dict[float, list[float]]) -> tuple[float, float, float] | None:
    """The learning rate with the best finite mean over seeds, as (lr, mean, std); None when
    every learning rate diverged."""
    lower = TASKS[task].lower_is_better
    best = None
    for lr, values in by_lr.items():
        mean, std, _ = _mean_std(values)
        better = best is None or (mean < best[1] if lower else mean > best[1])
        if math.isfinite(mean) and better:
            best = (lr, mean, std)
    return best


def table(runs: list[Run]) -> str:
    """One markdown table per task: optimizer x lr, mean ± std over seeds (n if not all)."""
    out = []
    for task, spec in TASKS.items():
        if not any(r.task == task for r in runs):
            continue
        arrow = "lower is better" if spec.lower_is_better else "higher is better"
        out += [f"### {spec.label} ({spec.metric}, {arrow})", ""]
        out += [
            "| optimizer | lr: values (mean ± std) | best lr | best |",
            "| --- | --- | --- | --- |",
        ]
        for optimizer in OPTIMIZERS:
            by_lr = _by_lr(runs, task, optimizer)
            if not by_lr:
                continue
            cells = []
            for lr, values in by_lr.items():
                mean, std, n = _mean_std(values)
                mark = "" if n == len(values) else f" ({len(values) - n}/{len(values)} diverged)"
                cells.append(f"{lr:g}: {mean:.4g} ± {std:.2g}{mark}")
            best = _best(task, by_lr)
            best_cells = (
                ("–", "–")
                if best is None
                else (f"{best[0]:g}", f"**{best[1]:.4g}** ± {best[2]:.2g}")
            )
            out.append(f"| {optimizer} | {'; '.join(cells)} | {best_cells[0]} | {best_cells[1]} |")
        out.append("")
    return "\n".join(out)


def plot(runs: list[Run], figures: Path, stability_tags: tuple[str, str]) -> list[Path]:
    """Curves (metric vs items at each optimizer's best lr), final metric vs lr, and the
    stability monitors' curves per optimizer. Returns the written PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figures.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in TASKS if any(r.task == t for r in runs)]
    written = []

    def best_lr(task: str, optimizer: str) -> float | None:
        best = _best(task, _by_lr(runs, task, optimizer))
        return None if best is None else best[0]

    def save(fig, axes, name: str, top: float) -> None:
        _figure_legend(fig, axes)
        fig.tight_layout(rect=(0, 0, 1, top))  # room above the panels for the legend
        fig.savefig(figures / name, dpi=90)
        plt.close(fig)
        written.append(figures / name)

    # 1. Final metric vs learning rate.
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        spec = TASKS[task]
        for optimizer in OPTIMIZERS:
            by_lr = _by_lr(runs, task, optimizer)
            if not by_lr:
                continue
            lrs = list(by_lr)
            stats = [_mean_std(values) for values in by_lr.values()]
            ax.errorbar(lrs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                        ms=3, capsize=2, color=_colour(optimizer), label=optimizer)  # fmt: skip
        ax.set(xscale="log", xlabel="learning rate", ylabel=spec.metric, title=spec.label)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # no 3x10^-4 clutter
        if spec.metric in ("l1", "fd_ratio"):
            ax.set_yscale("log")
    save(fig, axes, "study_metric_vs_lr.png", top=0.9)

    # 2. Metric over training at each optimizer's best lr (mean over seeds).
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        spec = TASKS[task]
        per_step = _items_per_step(runs, task)
        for optimizer in OPTIMIZERS:
            lr = best_lr(task, optimizer)
            if lr is None:
                continue
            tag = spec.curve or f"eval/{spec.metric}"
            curves = [_scalars(r, tag) for r in runs
                      if r.task == task and r.optimizer == optimizer and r.lr == lr]  # fmt: skip
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            steps = curves[0][0]
            n = min(len(c[1]) for c in curves)
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
            items = [s * per_step for s in steps[:n]]
            ax.plot(items, mean, color=_colour(optimizer), label=optimizer)
        ax.set(xlabel=spec.x_name, ylabel=tag, title=spec.label)
        ax.set_yscale("log")
    save(fig, axes, "study_curves.png", top=0.9)

    # 3. Stability monitors per optimizer at its best lr (seed 0): one row per signal.
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.2), squeeze=False)
    for col, task in enumerate(tasks):
        for row, tag in enumerate(stability_tags):
            ax = axes[row][col]
            for optimizer in OPTIMIZERS:
                lr = best_lr(task, optimizer)
                chosen = [r for r in runs if r.task == task and r.optimizer == optimizer
                          and r.lr == lr and r.seed == min(SEEDS)]  # fmt: skip
                if not chosen:
                    continue
                steps, values = _scalars(chosen[0], tag)
                if tag.endswith("eos_ratio"):  # the last probe sees lr = 0 (ratio 0): no news
                    kept = [(s, v) for s, v in zip(steps, values, strict=True) if v > 0]
                    steps, values = [s for s, _ in kept], [v for _, v in kept]
                    ax.set_yscale("log")
                if steps:
                    ax.plot(steps, values, lw=0.8, marker="." if len(steps) < 20 else None,
                            color=_colour(optimizer), label=optimizer)  # fmt: skip
            ax.set(xlabel="step", ylabel=tag.removeprefix("stability/"), title=TASKS[task].label)
            ax.title.set_fontsize(8)
    save(fig, axes, "study_stability.png", top=0.93)
    return written


def _colour(optimizer: str) -> tuple[float, ...]:
    """One colour per optimizer, the same in every figure."""
    import matplotlib

    return matplotlib.colormaps["tab10"](list(OPTIMIZERS).index(optimizer) % 10)


def _figure_legend(fig, axes) -> None:
    """One legend for the whole figure, above the panels, from every labelled line."""
    labelled = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labelled.setdefault(label, handle)
    order = [name for name in OPTIMIZERS if name in labelled]
    fig.legend([labelled[n] for n in order], order, loc="upper center", ncol=min(len(order), 9),
               fontsize=7, frameon=False)  # fmt: skip


def _items_per_step(runs: list[Run], task: str) -> float:
    """Trajectories or images per step, read from a finished run's metrics."""
    x_name = TASKS[task].x_name
    for r in runs:
        if r.task == task and r.metrics.get(x_name) and r.metrics.get("steps"):
            return float(r.metrics[x_name]) / float(r.metrics["steps"])
    return 1.0


def collect(args: argparse.Namespace) -> None:
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"error: no finished runs under {args.runs}")
    figures = args.docs / "figures"
    written = plot(runs, figures, tuple(args.stability_tags))
    # What the data show is written by a person, in study/findings.md, and placed up front.
    findings = args.findings.read_text() if args.findings.is_file() else ""
    lines = [
        "# Optimizer study",
        "",
        "Generated by `python study/optimizer_study.py collect` from the runs of",
        "`python study/optimizer_study.py run --jobs 2` (each cell is one `train.py -m`;",
        "`--dry-run` prints the exact commands). Final metric after the run, mean ± std over",
        f"seeds {', '.join(map(str, SEEDS))}. A diverged run (stopped by the non-finite guard, or",
        "a non-finite metric) is left out of the mean and counted. Every run uses the task's",
        "default lr schedule and `threads=1`.",
        "",
        findings,
        "## Results",
        "",
        table(runs),
        "## Figures",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in written],
        "",
    ]
    (args.docs / "results.md").write_text("\n".join(lines))
    print(f"wrote {args.docs / 'results.md'} and {len(written)} figures from {len(runs)} runs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="launch the Hydra multiruns")
    run_p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    run_p.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    run_p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    run_p.add_argument(
        "--lrs", nargs="+", type=float, default=[], help="only these learning rates of the grid"
    )
    run_p.add_argument("--jobs", type=int, default=2, help="multiruns at once (one core each)")
    run_p.add_argument("--out", type=Path, default=ROOT / "study_runs")
    run_p.add_argument("--dry-run", action="store_true", help="print the commands only")
    col_p = sub.add_parser("collect", help="write docs/results.md and the figures")
    col_p.add_argument("--runs", type=Path, default=ROOT / "study_runs")
    col_p.add_argument("--docs", type=Path, default=ROOT / "docs")
    col_p.add_argument("--findings", type=Path, default=ROOT / "study" / "findings.md")
    col_p.add_argument(
        "--stability-tags", nargs=2, default=["stability/eos_ratio", "stability/update_cos"]
    )
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        collect(args)


if __name__ == "__main__":
    main()
