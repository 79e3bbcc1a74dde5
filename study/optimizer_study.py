"""The optimizer study: hyperparameters chosen on tuning seeds, results reported on held-out seeds.

    python study/optimizer_study.py run --jobs 2       # Hydra multiruns into study_runs/
    python study/optimizer_study.py collect            # docs/study_summary.json, docs/results.md,
                                                       # docs/figures/study_*, README's summary

Protocol, per (task, optimizer) cell:

1. Tuning: every configuration of the optimizer's grid (its learning rates x one second
   hyperparameter, the same number of configurations for every optimizer of a task) on the
   tuning seeds `TUNING_SEEDS`. The configuration with the best mean over those seeds is chosen;
   one with a diverged tuning run ranks after every configuration without one.
2. Held out: the chosen configuration on `HELDOUT_SEEDS` (numbered from 100, never used for
   choosing), and, for the robustness figure, the same configuration at each of the task's
   aggressive learning rates `robust_lrs` on the same seeds.

`collect` pairs each optimizer's held-out runs with AdamW's on the same seeds and reports the
mean difference with a 95% t interval; a difference is a win or a loss only when the interval
excludes 0. It writes every number to docs/study_summary.json, and renders docs/results.md and
README's "Which optimizer?" summary from that file and the templates beside this script, which
may hold no number of their own (`render` refuses one), so the prose cannot drift from the data.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

TUNING_SEEDS = (0, 1)
HELDOUT_SEEDS = (100, 101, 102, 103, 104)
BASELINE = "adamw"
COMMON = ("logging.progress=false", "logging.images=false", "threads=1")


@dataclass(frozen=True)
class StudyTask:
    """One task of the study: its overrides, the metric reported, and which way is better."""

    overrides: tuple[str, ...]  # tuning runs (and held-out runs unless `heldout_overrides`)
    metric: str
    lower_is_better: bool
    label: str
    x_name: str  # what the curves' x axis counts
    probe_every: int  # steps between sharpness probes (the stability figure)
    robust_lrs: tuple[float, ...] = ()  # aggressive learning rates run on the held-out seeds
    heldout_overrides: tuple[str, ...] | None = None
    # A finished run that failed to learn: L1 >= 1.5 (over three quarters of the mass in the
    # wrong place), a test Spearman <= 0, an FD ratio >= 10. Counted beside diverged runs.
    collapse: float = math.nan
    curve: str = ""  # the TensorBoard tag drawn over training (default: eval/<metric>)

    def collapsed(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return value >= self.collapse if self.lower_is_better else value <= self.collapse

    def phase_overrides(self, phase: str) -> tuple[str, ...]:
        if phase == "heldout" and self.heldout_overrides is not None:
            return self.heldout_overrides
        return self.overrides


GFN_ROBUST_LRS = (1e-2, 3e-2, 1e-1)

TASKS: dict[str, StudyTask] = {
    "hypergrid_2d": StudyTask(
        ("env=hypergrid", "env.ndim=2", "env.height=8", "train.steps=1000", "train.eval_every=100"),
        "l1", True, "HyperGrid 8x8, trajectory balance, exact L1", "trajectories", 250,
        GFN_ROBUST_LRS, collapse=1.5,
    ),
    # The VRAdam paper's GFlowNet setting: flow matching on a grid.
    "hypergrid_fm": StudyTask(
        ("env=hypergrid", "env.ndim=2", "env.height=8", "loss=fm", "train.steps=1000",
         "train.eval_every=100"),
        "l1", True, "HyperGrid 8x8, flow matching, exact L1", "trajectories", 250, GFN_ROBUST_LRS,
        collapse=1.5,
    ),
    "hypergrid_4d": StudyTask(
        ("env=hypergrid", "env.ndim=4", "env.height=8", "train.steps=1500", "train.eval_every=150"),
        "l1", True, "HyperGrid 8^4, trajectory balance, exact L1", "trajectories", 250,
        GFN_ROBUST_LRS, collapse=1.5,
    ),
    "bitseq": StudyTask(
        ("env=bitseq", "train.steps=1000", "train.eval_every=100"),
        "spearman_test", False, "Bit sequences n=32 k=4, test Spearman", "trajectories", 250,
        GFN_ROBUST_LRS, collapse=0.0,
    ),
    # Tuned on 1,000-step runs (a third of the default run), reported on the default run.
    "ddpm": StudyTask(
        ("task=ddpm", "train.steps=1000", "train.warmup_steps=100", "train.eval_every=1000"),
        "fd_ratio", True, "DDPM digits, FD ratio", "images", 500, (),
        heldout_overrides=("task=ddpm",), collapse=10.0,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Grid:
    """An optimizer's tuning grid on one task: learning rates x one other hyperparameter."""

    lrs: tuple[float, ...]
    key: str = ""  # the other hyperparameter's override key ("" = learning rate only)
    values: tuple[float, ...] = ()
    label: str = ""  # the other hyperparameter's name in tables (default: the key's last part)

    @property
    def name(self) -> str:
        return self.label or self.key.rsplit(".", 1)[-1]

    def configs(self) -> list[tuple[float, float | None]]:
        return [(lr, v) for lr in self.lrs for v in (self.values or (None,))]


GFN_LRS = (2e-3, 5e-3, 1e-2)
DDPM_LRS = (1e-3, 2e-3, 5e-3, 2e-2)


@dataclass(frozen=True)
class StudyOptimizer:
    overrides: tuple[str, ...]
    grids: dict[str, Grid] = field(default_factory=dict)  # by task


def _gfn_grids(tb: Grid, fm: Grid) -> dict[str, Grid]:
    return {"hypergrid_2d": tb, "hypergrid_fm": fm, "hypergrid_4d": tb, "bitseq": tb}


# Every optimizer of a task gets the same number of configurations. AdamW tunes log Z's learning
# rate where there is a log Z (trajectory balance) and beta1 where there is none (flow matching);
# VRAdam tunes its velocity penalty beta3 (per-group norm, log Z not gated: the task preset).
OPTIMIZERS: dict[str, StudyOptimizer] = {
    "adamw": StudyOptimizer(
        ("optim=adamw",),
        {**_gfn_grids(Grid(GFN_LRS, "task.log_z_lr", (0.03, 0.1, 0.3)),
                      Grid(GFN_LRS, "optim.betas.0", (0.8, 0.9, 0.95), "beta1")),
         "ddpm": Grid(DDPM_LRS)},
    ),
    "vradam": StudyOptimizer(
        ("optim=vradam",),
        {**_gfn_grids(*[Grid(GFN_LRS, "optim.beta3", (0.01, 0.03, 0.1))] * 2),
         "ddpm": Grid(DDPM_LRS)},
    ),
    # The scale-free measure (mean square of Adam's step direction) with a strong gate.
    "vradam_precond": StudyOptimizer(
        ("optim=vradam", "optim.velocity=precond"),
        _gfn_grids(*[Grid((5e-3, 1e-2, 3e-2), "optim.beta3", (100.0, 300.0, 1000.0))] * 2),
    ),
}  # fmt: skip


def _fmt(value: float) -> str:
    return f"{value:g}"


def sweep_command(
    task: str,
    optimizer: str,
    phase: str,
    sweep_dir: Path,
    configs: list[tuple[float, float | None]],
    seeds: tuple[int, ...],
) -> list[str]:
    """The `train.py -m` command line of one phase of one cell. `configs` must form a grid
    (learning rates x values of the other key), which Hydra sweeps with the seeds."""
    spec, opt = TASKS[task], OPTIMIZERS[optimizer]
    grid = opt.grids[task]
    lrs = sorted({lr for lr, _ in configs})
    values = sorted({v for _, v in configs if v is not None})
    if len(configs) != len(lrs) * max(len(values), 1):
        raise ValueError(f"configs are not a grid: {configs}")
    sweep = [f"optim.lr={','.join(map(_fmt, lrs))}"]
    subdir = "lr_${optim.lr}"
    if grid.key:
        sweep.append(f"{grid.key}={','.join(map(_fmt, values))}")
        subdir += "_" + grid.key.replace(".", "-") + "_${" + grid.key + "}"
    return [
        sys.executable,
        "train.py",
        "-m",
        *spec.phase_overrides(phase),
        *opt.overrides,
        *COMMON,
        f"monitor.sharpness.every={spec.probe_every}",
        *sweep,
        f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={sweep_dir}",
        f"hydra.sweep.subdir={subdir}_seed_${{seed}}",
    ]


# ---- reading runs --------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    optimizer: str
    phase: str
    lr: float
    value: float | None  # the other hyperparameter (None: learning rate only)
    seed: int
    path: Path
    metrics: dict[str, float | None]

    @property
    def config(self) -> tuple[float, float | None]:
        return self.lr, self.value


def _overrides(run_dir: Path) -> dict[str, str]:
    lines = (run_dir / ".hydra" / "overrides.yaml").read_text().splitlines()
    pairs = [line.removeprefix("- ").strip() for line in lines if "=" in line]
    return dict(pair.split("=", 1) for pair in pairs)


def find_runs(root: Path) -> list[Run]:
    """Every run under `root/<task>/<optimizer>/<phase>/<run>/`; one that wrote no metrics.json
    (stopped early, e.g. by the non-finite guard) has empty metrics: it diverged."""
    runs = []
    for overrides_path in sorted(root.glob("*/*/*/*/.hydra/overrides.yaml")):
        run_dir = overrides_path.parent.parent
        phase_dir = run_dir.parent
        task, optimizer, phase = phase_dir.parent.parent.name, phase_dir.parent.name, phase_dir.name
        if task not in TASKS or optimizer not in OPTIMIZERS or phase not in ("tune", "heldout"):
            continue
        over = _overrides(run_dir)
        key = OPTIMIZERS[optimizer].grids[task].key
        value = float(over[key]) if key and key in over else None
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        runs.append(
            Run(
                task,
                optimizer,
                phase,
                float(over["optim.lr"]),
                value,
                int(over["seed"]),
                run_dir,
                metrics,
            )
        )
    return runs


def metric_value(run: Run) -> float:
    """The run's final metric; a diverged run (missing or non-finite) counts as NaN."""
    value = run.metrics.get(TASKS[run.task].metric)
    return float("nan") if value is None else float(value)


def _per_seed(by_seed: dict[int, float], seeds: tuple[int, ...]) -> list[float]:
    """Values in the order of `seeds`; a seed without a run counts as diverged (NaN)."""
    return [by_seed.get(seed, float("nan")) for seed in seeds]


def tuning_results(runs: list[Run]) -> dict[tuple[float, float | None], list[float]]:
    """One cell's tuning runs: each configuration's metric on each tuning seed."""
    by_config: dict = defaultdict(dict)
    for r in runs:
        by_config[r.config][r.seed] = metric_value(r)
    return {config: _per_seed(values, TUNING_SEEDS) for config, values in by_config.items()}


# ---- statistics ----------------------------------------------------------------------------------


def choose(
    results: dict[tuple[float, float | None], list[float]], lower_is_better: bool
) -> tuple[float, float | None]:
    """The configuration with the best mean over the tuning seeds. A configuration with a
    diverged (NaN) run ranks after every one without; among those, by the mean of the rest."""

    def rank(item):
        _config, values = item
        finite = [v for v in values if math.isfinite(v)]
        diverged = len(values) - len(finite)
        if not finite:
            return (diverged, math.inf)
        mean = statistics.fmean(finite)
        return (diverged, mean if lower_is_better else -mean)

    return min(results.items(), key=rank)[0]


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_interval(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of a_i - b_i over the pairs where both are finite, with its 95% t interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    n = len(diffs)
    if n < 2:
        return {"n": n, "mean": float("nan"), "lo": float("nan"), "hi": float("nan")}
    mean = statistics.fmean(diffs)
    half = t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half}


def verdict(interval: dict[str, float], lower_is_better: bool) -> str:
    """'win' when the interval of (optimizer - baseline) excludes 0 on the better side, 'loss'
    on the worse side, else 'tie'."""
    lo, hi = interval["lo"], interval["hi"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    better_side = hi < 0 if lower_is_better else lo > 0
    worse_side = lo > 0 if lower_is_better else hi < 0
    return "win" if better_side else "loss" if worse_side else "tie"


def _mean_std(values: list[float], spec: StudyTask) -> dict[str, float]:
    """Mean and std of the finite values; the runs that diverged and that collapsed, counted."""
    finite = [v for v in values if math.isfinite(v)]
    return {
        "mean": statistics.fmean(finite) if finite else float("nan"),
        "std": statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else float("nan"),
        "n": len(values),
        "diverged": len(values) - len(finite),
        "collapsed": sum(spec.collapsed(v) for v in finite),
    }


def summarise(runs: list[Run]) -> dict:
    """Every number the study reports, as a JSON-able dict (docs/study_summary.json)."""
    tasks = {}
    for task, spec in TASKS.items():
        task_runs = [r for r in runs if r.task == task]
        if not task_runs:
            continue
        entry = {
            "label": spec.label,
            "metric": spec.metric,
            "lower_is_better": spec.lower_is_better,
            "optimizers": {},
        }
        for optimizer, opt in OPTIMIZERS.items():
            cell = [r for r in task_runs if r.optimizer == optimizer]
            tune = [r for r in cell if r.phase == "tune"]
            if not tune:
                continue
            grid = opt.grids[task]
            results = tuning_results(tune)
            lr, value = choose(results, spec.lower_is_better)
            heldout: dict = defaultdict(dict)
            for r in cell:
                if r.phase == "heldout" and r.value == value:
                    heldout[r.lr][r.seed] = metric_value(r)
            by_lr = {x: _per_seed(heldout[x], HELDOUT_SEEDS) for x in sorted(heldout)}
            chosen = by_lr.get(lr, _per_seed({}, HELDOUT_SEEDS))
            entry["optimizers"][optimizer] = {
                "grid": {
                    "lrs": list(grid.lrs),
                    "key": grid.key,
                    "name": grid.name,
                    "values": list(grid.values),
                },
                "tuning": [
                    {"lr": c[0], "value": c[1], "values": v, **_mean_std(v, spec)}
                    for c, v in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
                ],
                "chosen": {"lr": lr, "value": value},
                "heldout": {
                    "seeds": list(HELDOUT_SEEDS),
                    "values": chosen,
                    **_mean_std(chosen, spec),
                },
                "robustness": [
                    {"lr": x, "values": values, **_mean_std(values, spec)}
                    for x, values in by_lr.items()
                ],
            }
            gate = _gate([r for r in cell if r.phase == "heldout" and r.config == (lr, value)])
            if gate:
                entry["optimizers"][optimizer]["gate"] = gate
        base = entry["optimizers"].get(BASELINE)
        for optimizer, result in entry["optimizers"].items():
            if base is None or optimizer == BASELINE:
                continue
            interval = paired_interval(result["heldout"]["values"], base["heldout"]["values"])
            interval["verdict"] = verdict(interval, spec.lower_is_better)
            result["paired"] = interval
        tasks[task] = entry
    return {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {_cpu_name()}, {_cores()} cores, 1 thread per run",
        "tuning_seeds": list(TUNING_SEEDS),
        "heldout_seeds": list(HELDOUT_SEEDS),
        "tasks": tasks,
    }


GATE_TAG = "optim/eta_ratio"  # VRAdam's eta_t / alpha_0, logged every log_every steps


def _gate(runs: list[Run]) -> dict[str, float]:
    """How much VRAdam's gate acted over these runs: the median and the smallest logged
    eta_t / alpha_0 (1 = not gated). Empty for an optimizer without a gate."""
    values = [v for r in runs for v in _scalars(r.path, GATE_TAG)[1]]
    if not values:
        return {}
    return {"eta_ratio_median": statistics.median(values), "eta_ratio_min": min(values)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ---- rendering: the prose's numbers come from the summary ---------------------------------------

SUMMARY = "study_summary.json"
TEMPLATES = {"results": HERE / "findings.md", "readme": HERE / "which_optimizer.md"}
README_BEGIN = "<!-- generated by study/optimizer_study.py from docs/study_summary.json -->"
README_END = "<!-- end of the generated summary -->"
PLACEHOLDER = re.compile(r"\{\{\s*([\w.\-]+)\s*\}\}")
# A number written into a template by hand: a decimal, an exponent or a percentage.
HANDWRITTEN_NUMBER = re.compile(r"\d\.\d|\d[eE][-+]?\d|\d\s?%")


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x == int(x) and abs(x) < 1e5:
        return str(int(x)).replace("-", "−")
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text.replace("-", "−")


def _cell(stats: dict) -> str:
    std = stats["std"]
    if std is not None and stats["mean"] is not None and std <= 1e-9 * abs(stats["mean"]):
        std = 0.0  # equal values up to rounding
    text = f"{_num(stats['mean'])} ± {_num(std, 2)}"
    failed = [f"{stats[k]}/{stats['n']} {k}" for k in ("diverged", "collapsed") if stats.get(k)]
    return text + (f" ({', '.join(failed)})" if failed else "")


def _config(task_entry: dict, optimizer: str) -> str:
    result = task_entry["optimizers"][optimizer]
    text = f"lr {_num(result['chosen']['lr'])}"
    if result["grid"]["key"]:
        text += f", {result['grid']['name']} {_num(result['chosen']['value'])}"
    return text


def _interval(paired: dict) -> str:
    return f"{_num(paired['mean'])} [{_num(paired['lo'])}, {_num(paired['hi'])}]"


def facts(summary: dict) -> dict[str, str]:
    """Every value a template may name, as text: `{{task.optimizer.heldout}}`, `.diff`,
    `.verdict`, `.config`, `.robust.<lr>`, and the protocol's seeds and date."""
    out = {
        "date": summary["date"],
        "machine": summary["machine"],
        "tuning_seeds": ", ".join(map(str, summary["tuning_seeds"])),
        "heldout_seeds": ", ".join(map(str, summary["heldout_seeds"])),
        "n_heldout": str(len(summary["heldout_seeds"])),
        "ci": "95%",
    }
    tally: dict = defaultdict(lambda: defaultdict(int))
    for task, entry in summary["tasks"].items():
        for optimizer, result in entry["optimizers"].items():
            prefix = f"{task}.{optimizer}"
            out[f"{prefix}.heldout"] = _cell(result["heldout"])
            out[f"{prefix}.mean"] = _num(result["heldout"]["mean"])
            out[f"{prefix}.config"] = _config(entry, optimizer)
            out[f"{prefix}.lr"] = _num(result["chosen"]["lr"])
            grid = result["grid"]
            text = "lr " + ", ".join(map(_num, grid["lrs"]))
            if grid["key"]:
                text += f" × {grid['name']} " + ", ".join(map(_num, grid["values"]))
            out[f"{prefix}.grid"] = text
            for point in result["robustness"]:
                out[f"{prefix}.robust.{_fmt(point['lr'])}"] = _cell(point)
                for kind in ("diverged", "collapsed"):
                    out[f"{prefix}.{kind}.{_fmt(point['lr'])}"] = f"{point[kind]}/{point['n']}"
            for key, number in result.get("gate", {}).items():
                out[f"{prefix}.{key}"] = _num(number)
            if "paired" in result:
                out[f"{prefix}.diff"] = _interval(result["paired"])
                out[f"{prefix}.verdict"] = result["paired"]["verdict"]
                tally[optimizer][result["paired"]["verdict"]] += 1
    for optimizer, counts in tally.items():
        for name, plural in (("win", "wins"), ("loss", "losses"), ("tie", "ties")):
            out[f"{optimizer}.{plural}"] = str(counts[name])
    # The GFlowNet robustness sweep's learning rates, lowest to highest.
    for name, lr in zip(("lr_lo", "lr_mid", "lr_hi"), GFN_ROBUST_LRS, strict=True):
        out[name] = _num(lr)
    return out


def fill(template: str, values: dict[str, str]) -> str:
    """The template with each `{{name}}` replaced; a name the summary lacks, or a number written
    by hand outside a placeholder, is an error."""
    unknown = sorted({m for m in PLACEHOLDER.findall(template) if m not in values})
    if unknown:
        raise ValueError(f"template names values the summary lacks: {', '.join(unknown)}")
    bare = PLACEHOLDER.sub("", template)
    for line in bare.splitlines():
        if HANDWRITTEN_NUMBER.search(line):
            raise ValueError(
                f"template writes a number by hand (use a placeholder): {line.strip()}"
            )
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def tables(summary: dict) -> str:
    """The held-out results, the robustness sweep and the tuning grids, as markdown tables."""
    out = []
    for entry in summary["tasks"].values():
        arrow = "lower is better" if entry["lower_is_better"] else "higher is better"
        out += [f"### {entry['label']} ({entry['metric']}, {arrow})", ""]
        out += [
            "| optimizer | chosen on tuning seeds | held-out mean ± std | "
            f"minus {BASELINE}, mean [95% CI] | verdict |",
            "| --- | --- | --- | --- | --- |",
        ]
        for optimizer, result in entry["optimizers"].items():
            paired = result.get("paired")
            diff, word = (_interval(paired), paired["verdict"]) if paired else ("(baseline)", "")
            out.append(
                f"| {optimizer} | {_config(entry, optimizer)} | {_cell(result['heldout'])} "
                f"| {diff} | {word} |"
            )
        out.append("")
        lrs = sorted({p["lr"] for r in entry["optimizers"].values() for p in r["robustness"]})
        if len(lrs) > 1:
            out += [
                "Learning-rate sweep on the held-out seeds (the other hyperparameter as chosen):",
                "",
            ]
            out += [
                "| optimizer | " + " | ".join(f"lr {_num(lr)}" for lr in lrs) + " |",
                "| --- |" + " --- |" * len(lrs),
            ]
            for optimizer, result in entry["optimizers"].items():
                by_lr = {p["lr"]: p for p in result["robustness"]}
                cells = [_cell(by_lr[lr]) if lr in by_lr else "" for lr in lrs]
                out.append(f"| {optimizer} | " + " | ".join(cells) + " |")
            out.append("")
    out += [
        "### Tuning runs",
        "",
        f"Mean ± std over the tuning seeds ({', '.join(map(str, summary['tuning_seeds']))}) of "
        "every configuration; the chosen one in bold.",
        "",
    ]
    for entry in summary["tasks"].values():
        out += [f"**{entry['label']}**", "", "| optimizer | configurations |", "| --- | --- |"]
        for optimizer, result in entry["optimizers"].items():
            key = result["grid"]["name"] if result["grid"]["key"] else ""
            cells = []
            for row in result["tuning"]:
                name = f"{_num(row['lr'])}" + (f"/{_num(row['value'])}" if key else "")
                text = f"{name}: {_cell(row)}"
                chosen = (row["lr"], row["value"]) == (
                    result["chosen"]["lr"],
                    result["chosen"]["value"],
                )
                cells.append(f"**{text}**" if chosen else text)
            label = f"{optimizer} (lr{'/' + key if key else ''})"
            out.append(f"| {label} | {'; '.join(cells)} |")
        out.append("")
    return "\n".join(out)


def render_results(summary: dict, template: str, figures: list[str]) -> str:
    values = facts(summary)
    return "\n".join(
        [
            "# Optimizer study",
            "",
            "Generated by `python study/optimizer_study.py collect` from the runs of",
            "`python study/optimizer_study.py run --jobs 2` (`--dry-run` prints the commands);",
            "every number here, the prose's included, comes from `docs/study_summary.json`.",
            f"Measured {values['date']} on {values['machine']}.",
            "",
            fill(template, values),
            "## Results",
            "",
            tables(summary),
            "## Figures",
            "",
            *[f"![{Path(p).stem}](figures/{Path(p).name})" for p in figures],
            "",
        ]
    )


def render_readme(readme: str, summary: dict, template: str) -> str:
    """README with the text between the generated-summary markers replaced."""
    start, end = readme.find(README_BEGIN), readme.find(README_END)
    if start < 0 or end < start:
        raise ValueError("README.md lacks the generated-summary markers")
    body = fill(template, facts(summary)).strip("\n")
    return readme[: start + len(README_BEGIN)] + "\n" + body + "\n" + readme[end:]


FIGURE_NAMES = (
    "study_robustness.png",
    "study_paired.png",
    "study_curves.png",
    "study_stability.png",
)


def render_files(docs: Path, readme: Path) -> None:
    """docs/results.md and README's summary from docs/study_summary.json and the templates."""
    summary = json.loads((docs / SUMMARY).read_text())
    figures = [n for n in FIGURE_NAMES if (docs / "figures" / n).is_file()]
    (docs / "results.md").write_text(
        render_results(summary, TEMPLATES["results"].read_text(), figures)
    )
    readme.write_text(render_readme(readme.read_text(), summary, TEMPLATES["readme"].read_text()))
    print(f"wrote {docs / 'results.md'} and {readme}'s summary from {docs / SUMMARY}")


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def collect(args: argparse.Namespace) -> None:
    runs = find_runs(args.runs)
    if not runs:
        raise SystemExit(f"error: no finished runs under {args.runs}")
    summary = _json_safe(summarise(runs))
    args.docs.mkdir(parents=True, exist_ok=True)
    (args.docs / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    if args.figures:
        plot(runs, summary, args.docs / "figures")
    render_files(args.docs, args.readme)


# ---- figures -------------------------------------------------------------------------------------


@functools.cache
def _events(path: Path):
    """A run's TensorBoard events, read once however many tags are drawn from them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    return events


def _scalars(path: Path, tag: str) -> tuple[list[int], list[float]]:
    events = _events(path)
    if tag not in events.Tags()["scalars"]:
        return [], []
    points = events.Scalars(tag)
    return [p.step for p in points], [p.value for p in points]


def _colour(optimizer: str):
    import matplotlib

    return matplotlib.colormaps["tab10"](list(OPTIMIZERS).index(optimizer) % 10)


def plot(runs: list[Run], summary: dict, figures: Path) -> None:
    """The robustness figure (held-out metric against lr, diverged runs counted), the paired
    differences, the curves at the chosen configurations, and the stability monitors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    tasks = list(summary["tasks"])

    def panels(height: float = 3.2):
        cols = min(3, len(tasks))
        rows = math.ceil(len(tasks) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, height * rows), squeeze=False)
        for ax in axes.flat[len(tasks) :]:
            ax.set_visible(False)
        return fig, axes

    def save(fig, axes, name: str) -> None:
        labelled = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                labelled.setdefault(label, handle)
        order = [n for n in OPTIMIZERS if n in labelled]
        if order:
            fig.legend(
                [labelled[n] for n in order],
                order,
                loc="upper center",
                ncol=len(order),
                fontsize=8,
                frameon=False,
            )
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # the legend above
        fig.savefig(figures / name, dpi=90)
        plt.close(fig)

    def chosen_runs(task: str, optimizer: str, lr: float | None = None) -> list[Run]:
        result = summary["tasks"][task]["optimizers"][optimizer]
        lr = result["chosen"]["lr"] if lr is None else lr
        return [
            r
            for r in runs
            if (r.task, r.optimizer, r.phase) == (task, optimizer, "heldout")
            and r.lr == lr
            and r.value == result["chosen"]["value"]
        ]

    # 1. Robustness: final metric against lr on the held-out seeds, diverged runs counted.
    fig, axes = panels()
    for ax, task in zip(axes.flat, tasks, strict=False):
        entry = summary["tasks"][task]
        title = entry["label"]
        for optimizer, result in entry["optimizers"].items():
            points = result["robustness"]
            if not TASKS[task].robust_lrs:  # no held-out sweep: the tuning runs' lrs
                points = [
                    row for row in result["tuning"] if row["value"] == result["chosen"]["value"]
                ]
                title = f"{entry['label']} (tuning runs)"
            lrs = [p["lr"] for p in points]
            means = [p["mean"] if p["mean"] is not None else float("nan") for p in points]
            ax.plot(lrs, means, marker="o", ms=4, color=_colour(optimizer), label=optimizer)
            for p in points:
                finite = [v for v in p["values"] if v is not None]
                ax.scatter(
                    [p["lr"]] * len(finite), finite, s=6, alpha=0.4, color=_colour(optimizer)
                )
                failed = [
                    f"{p[k]}/{p['n']} {k[:4]}." for k in ("diverged", "collapsed") if p.get(k)
                ]
                if failed:
                    y = max(finite) if finite else (means[0] if math.isfinite(means[0]) else 1.0)
                    ax.annotate(
                        ", ".join(failed),
                        (p["lr"], y),
                        fontsize=7,
                        color=_colour(optimizer),
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ax.set(xscale="log", xlabel="learning rate", ylabel=entry["metric"], title=title)
        if entry["metric"] in ("l1", "fd_ratio"):
            ax.set_yscale("log")
        ax.title.set_fontsize(8)
    save(fig, axes, FIGURE_NAMES[0])

    # 2. Paired differences against the baseline, with their 95% intervals.
    fig, axes = panels(height=2.4)
    for ax, task in zip(axes.flat, tasks, strict=False):
        entry = summary["tasks"][task]
        names = [o for o, r in entry["optimizers"].items() if r.get("paired")]
        for y, optimizer in enumerate(names):
            p = entry["optimizers"][optimizer]["paired"]
            if p["mean"] is None:
                continue
            ax.errorbar(
                [p["mean"]],
                [y],
                xerr=[[p["mean"] - p["lo"]], [p["hi"] - p["mean"]]],
                fmt="o",
                capsize=3,
                color=_colour(optimizer),
                label=optimizer,
            )
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        better = "lower" if entry["lower_is_better"] else "higher"
        ax.set(
            xlabel=f"{entry['metric']} minus {BASELINE} ({better} is better)", title=entry["label"]
        )
        ax.set_ylim(-0.7, len(names) - 0.3)
        ax.title.set_fontsize(8)
    save(fig, axes, FIGURE_NAMES[1])

    # 3. The metric over training at each chosen configuration, mean over the held-out seeds.
    fig, axes = panels()
    for ax, task in zip(axes.flat, tasks, strict=False):
        entry = summary["tasks"][task]
        tag = TASKS[task].curve or f"eval/{entry['metric']}"
        for optimizer in entry["optimizers"]:
            curves = [_scalars(r.path, tag) for r in chosen_runs(task, optimizer)]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            n = min(len(c[1]) for c in curves)
            per_step = _items_per_step(chosen_runs(task, optimizer), TASKS[task].x_name)
            mean = [statistics.fmean(c[1][i] for c in curves) for i in range(n)]
            ax.plot(
                [s * per_step for s in curves[0][0][:n]],
                mean,
                marker=".",
                color=_colour(optimizer),
                label=optimizer,
            )
        ax.set(xlabel=TASKS[task].x_name, ylabel=tag, title=entry["label"])
        if entry["metric"] in ("l1", "fd_ratio"):
            ax.set_yscale("log")
        ax.title.set_fontsize(8)
    save(fig, axes, FIGURE_NAMES[2])

    # 4. Stability monitors at each chosen configuration, first held-out seed.
    tags = ("stability/update_cos", "stability/eos_ratio")
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 2.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for col, tag in enumerate(tags):
            ax = axes[row][col]
            for optimizer in summary["tasks"][task]["optimizers"]:
                chosen = [r for r in chosen_runs(task, optimizer) if r.seed == HELDOUT_SEEDS[0]]
                if not chosen:
                    continue
                steps, values = _scalars(chosen[0].path, tag)
                if steps:
                    ax.plot(
                        steps,
                        values,
                        lw=0.8,
                        marker="." if len(steps) < 20 else None,
                        color=_colour(optimizer),
                        label=optimizer,
                    )
            if tag.endswith("eos_ratio"):
                ax.set_yscale("log")
            ax.set(
                xlabel="step",
                ylabel=tag.removeprefix("stability/"),
                title=summary["tasks"][task]["label"],
            )
            ax.title.set_fontsize(8)
    save(fig, axes, FIGURE_NAMES[3])


def _items_per_step(runs: list[Run], x_name: str) -> float:
    """Trajectories or images per step, read from a finished run's metrics."""
    for r in runs:
        if r.metrics.get(x_name) and r.metrics.get("steps"):
            return float(r.metrics[x_name]) / float(r.metrics["steps"])
    return 1.0


# ---- running -------------------------------------------------------------------------------------


def tuning_choice(root: Path, task: str, optimizer: str) -> tuple[float, float | None]:
    """The configuration chosen from the finished tuning runs of one cell."""
    runs = [
        r for r in find_runs(root) if (r.task, r.optimizer, r.phase) == (task, optimizer, "tune")
    ]
    if not runs:
        raise SystemExit(f"error: no tuning runs of {task}/{optimizer} under {root}")
    return choose(tuning_results(runs), TASKS[task].lower_is_better)


def phase_command(root: Path, task: str, optimizer: str, phase: str) -> list[str]:
    grid = OPTIMIZERS[optimizer].grids[task]
    sweep_dir = root / task / optimizer / phase
    if phase == "tune":
        return sweep_command(task, optimizer, phase, sweep_dir, grid.configs(), TUNING_SEEDS)
    lr, value = tuning_choice(root, task, optimizer)
    lrs = sorted({lr, *TASKS[task].robust_lrs})
    configs = [(x, value) for x in lrs]
    return sweep_command(task, optimizer, phase, sweep_dir, configs, HELDOUT_SEEDS)


def run(args: argparse.Namespace) -> None:
    cells = [(t, o) for t in args.tasks for o in args.optimizers if t in OPTIMIZERS[o].grids]

    def launch(cell: tuple[str, str]) -> None:
        task, optimizer = cell
        for phase in args.phases:
            if args.dry_run and phase == "heldout" and "tune" in args.phases:
                print(
                    f"# {task}/{optimizer} heldout: the chosen configuration on seeds "
                    f"{HELDOUT_SEEDS}, at its lr and {TASKS[task].robust_lrs}"
                )
                continue
            command = phase_command(args.out, task, optimizer, phase)
            if args.dry_run:
                print(" ".join(command))
                continue
            sweep_dir = args.out / task / optimizer / phase
            sweep_dir.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            with open(sweep_dir / "multirun.log", "a") as log:
                code = subprocess.run(
                    command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
                ).returncode
            status = "ok" if code == 0 else f"exit {code} (see {sweep_dir / 'multirun.log'})"
            seconds = time.perf_counter() - start
            print(
                f"{task:>13} {optimizer:>15} {phase:>7}: {status} in {seconds:.0f}s",
                flush=True,
            )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(launch, cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="launch the Hydra multiruns")
    run_p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    run_p.add_argument(
        "--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS)
    )
    run_p.add_argument(
        "--phases", nargs="+", default=["tune", "heldout"], choices=["tune", "heldout"]
    )
    run_p.add_argument("--jobs", type=int, default=2, help="cells at once (one core each)")
    run_p.add_argument("--out", type=Path, default=ROOT / "study_runs")
    run_p.add_argument("--dry-run", action="store_true", help="print the commands only")
    col_p = sub.add_parser("collect", help="write the summary, docs/results.md, figures, README")
    col_p.add_argument("--runs", type=Path, default=ROOT / "study_runs")
    col_p.add_argument("--docs", type=Path, default=ROOT / "docs")
    col_p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    col_p.add_argument("--figures", action=argparse.BooleanOptionalAction, default=True)
    ren_p = sub.add_parser("render", help="docs/results.md and README from the summary alone")
    ren_p.add_argument("--docs", type=Path, default=ROOT / "docs")
    ren_p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    elif args.command == "collect":
        collect(args)
    else:
        render_files(args.docs, args.readme)


if __name__ == "__main__":
    main()
