"""Plot the `stability/` curves of runs side by side (e.g. AdamW vs VRAdam on the hypergrid).

    python benchmarks/plot_stability.py RUN_A RUN_B [...] [--labels AdamW VRAdam ...]
        [--out docs/figures/stability_hypergrid.png]

Reads each run directory's TensorBoard events and draws, over steps: the cosine between
successive updates, the edge-of-stability ratio (sharpness probe / threshold), eta_t / alpha_0
(1 for optimizers without a velocity gate), the training loss, the loss spike z-score and the
evaluation L1 distance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PANELS = (
    ("stability/update_cos", "cos(u_t, u_{t-1}) (mean per log interval)", "linear"),
    ("stability/eos_ratio", "edge-of-stability ratio (preconditioned)", "log"),
    ("optim/eta_ratio", "eta_t / alpha_0", "linear"),
    ("train/loss", "training loss", "log"),
    ("stability/loss_z", "loss spike z-score (max per log interval)", "symlog"),
    ("eval/l1", "eval L1(p, p*)", "linear"),
)
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:purple")


def scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar tag of a run: tag -> (steps, values)."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        points = events.Scalars(tag)
        out[tag] = ([p.step for p in points], [p.value for p in points])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", default=["AdamW", "VRAdam"])
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/stability_hypergrid.png"))
    args = parser.parse_args()
    if len(args.labels) != len(args.runs) or len(args.runs) > len(COLORS):
        raise SystemExit(f"error: give one label per run (at most {len(COLORS)} runs)")
    runs = [scalars(r) for r in args.runs]
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    for ax, (tag, label, yscale) in zip(axes.flat, PANELS, strict=True):
        for data, name, color in zip(runs, args.labels, COLORS, strict=False):
            if tag in data:
                steps, values = data[tag]
                style = {"marker": "o", "markersize": 3} if tag == "stability/eos_ratio" else {}
                ax.plot(steps, values, label=name, color=color, linewidth=0.8, **style)
            elif tag == "optim/eta_ratio":  # no velocity gate: eta_t is alpha_0
                ax.axhline(1.0, label=f"{name} (no gate)", color=color, linewidth=0.8)
        if tag == "stability/eos_ratio":
            ax.axhline(1.0, color="black", linestyle="--", linewidth=0.7)
        if tag == "stability/update_cos":
            ax.axhline(0.0, color="black", linestyle="--", linewidth=0.7)
        ax.set_yscale(yscale)
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
