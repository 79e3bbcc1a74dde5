"""The optimizer study: choosing on tuning seeds, pairing held-out seeds, and prose rendered only
from the summary (the committed docs/results.md and README's summary must be what it renders)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("optimizer_study", ROOT / "study/optimizer_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["optimizer_study"] = study  # dataclasses look their module up while it loads
_spec.loader.exec_module(study)

NAN = float("nan")


def _fake_run(root, task, optimizer, phase, lr, value, seed, metric):
    """A run directory as Hydra and train.py leave it; `metric=None`: it diverged (the
    non-finite guard stopped it before metrics.json)."""
    key = study.OPTIMIZERS[optimizer].grids[task].key
    run_dir = root / task / optimizer / phase / f"lr_{lr}_v_{value}_seed_{seed}"
    (run_dir / ".hydra").mkdir(parents=True)
    lines = [f"- optim.lr={lr}", f"- seed={seed}"] + ([f"- {key}={value}"] if key else [])
    (run_dir / ".hydra" / "overrides.yaml").write_text("\n".join(lines) + "\n")
    if metric is not None:
        name = study.TASKS[task].metric
        (run_dir / "metrics.json").write_text(json.dumps({name: metric, "steps": 10.0}))


def test_choose_takes_the_best_tuning_mean_and_ranks_diverged_configurations_last():
    results = {
        (1e-3, 0.1): [0.30, 0.10],  # mean 0.20
        (5e-3, 0.1): [0.05, NAN],  # the best finite value, but one seed diverged
        (5e-3, 0.3): [0.15, 0.17],  # mean 0.16: the best without a divergence
    }
    assert study.choose(results, lower_is_better=True) == (5e-3, 0.3)
    assert study.choose(results, lower_is_better=False) == (1e-3, 0.1)  # 0.20 > 0.16
    assert study.choose({(1.0, None): [NAN, NAN], (2.0, None): [NAN, 5.0]}, True) == (2.0, None)


def test_paired_interval_matches_the_t_interval_by_hand():
    # differences 1, 2, 3, 4, 5: mean 3, sample sd sqrt(2.5); t(0.975, df=4) = 2.7764451051977987
    a, b = [2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0]
    interval = study.paired_interval(a, b)
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert interval["n"] == 5
    assert interval["mean"] == pytest.approx(3.0)
    assert interval["lo"] == pytest.approx(3.0 - half, rel=1e-9)
    assert interval["hi"] == pytest.approx(3.0 + half, rel=1e-9)
    # a pair with a diverged run on either side drops out of the pairing
    assert study.paired_interval([1.0, NAN, 3.0], [0.0, 1.0, 1.0])["n"] == 2


def test_verdict_needs_the_interval_to_exclude_zero():
    assert study.verdict({"lo": -0.3, "hi": -0.1}, lower_is_better=True) == "win"
    assert study.verdict({"lo": -0.3, "hi": -0.1}, lower_is_better=False) == "loss"
    assert study.verdict({"lo": 0.1, "hi": 0.3}, lower_is_better=True) == "loss"
    assert study.verdict({"lo": -0.1, "hi": 0.3}, lower_is_better=True) == "tie"
    assert study.verdict({"lo": NAN, "hi": NAN}, lower_is_better=True) == "n/a"


def test_summary_chooses_on_tuning_seeds_and_pairs_held_out_seeds(tmp_path):
    task = "hypergrid_2d"
    # AdamW: log_z_lr 0.3 is best on the tuning seeds; VRAdam: beta3 0.1 at lr 5e-3.
    for seed in study.TUNING_SEEDS:
        _fake_run(tmp_path, task, "adamw", "tune", 0.005, 0.3, seed, 0.2)
        _fake_run(tmp_path, task, "adamw", "tune", 0.005, 0.1, seed, 0.4)
        _fake_run(tmp_path, task, "vradam", "tune", 0.005, 0.1, seed, 0.1)
        _fake_run(tmp_path, task, "vradam", "tune", 0.01, 0.1, seed, 0.5)
    adamw = [0.30, 0.20, 0.25, 0.40, 0.35]
    vradam = [0.20, 0.15, 0.20, 0.30, None]  # the last seed diverged
    for i, seed in enumerate(study.HELDOUT_SEEDS):
        _fake_run(tmp_path, task, "adamw", "heldout", 0.005, 0.3, seed, adamw[i])
        _fake_run(tmp_path, task, "adamw", "heldout", 0.1, 0.3, seed, None if i < 2 else 1.9)
        _fake_run(tmp_path, task, "vradam", "heldout", 0.005, 0.1, seed, vradam[i])
        _fake_run(tmp_path, task, "adamw", "heldout", 0.005, 0.1, seed, 9.0)  # not the chosen one
    summary = study.summarise(study.find_runs(tmp_path))
    entry = summary["tasks"][task]["optimizers"]
    assert entry["adamw"]["chosen"] == {"lr": 0.005, "value": 0.3}
    assert entry["vradam"]["chosen"] == {"lr": 0.005, "value": 0.1}
    assert entry["adamw"]["heldout"]["values"] == adamw
    held = entry["vradam"]["heldout"]
    assert held["diverged"] == 1 and held["mean"] == pytest.approx(0.2125)
    paired = entry["vradam"]["paired"]
    diffs = [-0.10, -0.05, -0.05, -0.10]  # the diverged seed drops out of the pairing
    assert paired["n"] == 4 and paired["mean"] == pytest.approx(sum(diffs) / 4)
    assert paired["verdict"] == "win"
    aggressive = {p["lr"]: p for p in entry["adamw"]["robustness"]}[0.1]
    assert aggressive["diverged"] == 2 and aggressive["mean"] == pytest.approx(1.9)
    assert aggressive["collapsed"] == 3  # L1 1.9 >= 1.5: finished, but learned nothing
    assert entry["adamw"]["heldout"]["collapsed"] == 0


def test_held_out_commands_run_the_tuned_configuration_and_the_aggressive_lrs(tmp_path):
    task = "hypergrid_4d"
    for seed in study.TUNING_SEEDS:
        _fake_run(tmp_path, task, "adamw", "tune", 0.002, 0.03, seed, 0.3)
        _fake_run(tmp_path, task, "adamw", "tune", 0.01, 0.3, seed, 0.1)
    tune = study.phase_command(tmp_path, task, "adamw", "tune")
    assert "optim.lr=0.002,0.005,0.01" in tune and "task.log_z_lr=0.03,0.1,0.3" in tune
    assert "seed=0,1" in tune and "optim=adamw" in tune
    held = study.phase_command(tmp_path, task, "adamw", "heldout")
    assert "optim.lr=0.01,0.03,0.1" in held and "task.log_z_lr=0.3" in held
    assert "seed=100,101,102,103,104" in held
    # every optimizer of a task gets the same number of configurations
    for name in study.TASKS:
        sizes = {len(o.grids[name].configs()) for o in study.OPTIMIZERS.values() if name in o.grids}
        assert len(sizes) == 1, name


def test_templates_may_not_write_numbers_of_their_own():
    values = {"a.b": "0.12 [0.01, 0.2]"}
    assert study.fill("x {{a.b}} on 8x8", values) == "x 0.12 [0.01, 0.2] on 8x8"
    with pytest.raises(ValueError, match="summary lacks: nope"):
        study.fill("{{nope}}", values)
    for bad in ("beats it by 0.5", "a 3% gain", "lr 3e-2"):
        with pytest.raises(ValueError, match="number by hand"):
            study.fill(bad, values)


def test_committed_results_and_readme_are_what_the_summary_renders():
    summary = json.loads((ROOT / "docs" / study.SUMMARY).read_text())
    figures = [n for n in study.FIGURE_NAMES if (ROOT / "docs" / "figures" / n).is_file()]
    assert len(figures) == len(study.FIGURE_NAMES)
    template = study.TEMPLATES["results"].read_text()
    expected = study.render_results(summary, template, figures)
    assert (ROOT / "docs" / "results.md").read_text() == expected
    readme = (ROOT / "README.md").read_text()
    rendered = study.render_readme(readme, summary, study.TEMPLATES["readme"].read_text())
    assert readme == rendered
