"""The optimizer study's collector: runs on disk to mean ± std tables, diverged runs counted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("optimizer_study", ROOT / "study/optimizer_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["optimizer_study"] = study  # dataclasses look their module up while it loads
_spec.loader.exec_module(study)


def _fake_run(root: Path, task: str, optimizer: str, lr: float, seed: int, l1: float | None):
    run_dir = root / task / optimizer / f"lr_{lr}_seed_{seed}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- optim.lr={lr}\n- seed={seed}\n")
    if l1 is not None:  # a run stopped by the non-finite guard writes no metrics.json
        (run_dir / "metrics.json").write_text(json.dumps({"l1": l1, "steps": 10.0}))


def test_table_reports_mean_std_best_and_diverged_runs(tmp_path):
    for seed, l1 in enumerate((0.1, 0.2, 0.3)):
        _fake_run(tmp_path, "hypergrid_2d", "adamw", 0.001, seed, l1)
    _fake_run(tmp_path, "hypergrid_2d", "adamw", 0.03, 0, 1.5)
    _fake_run(tmp_path, "hypergrid_2d", "adamw", 0.03, 1, None)
    runs = study.find_runs(tmp_path)
    assert len(runs) == 5
    row = next(line for line in study.table(runs).splitlines() if line.startswith("| adamw"))
    # mean 0.2, sample std 0.1; the lr 0.03 cell averages its one finished run and counts the other
    assert row == (
        "| adamw | 0.001: 0.2 ± 0.1; 0.03: 1.5 ± 0 (1/2 diverged) | 0.001 | **0.2** ± 0.1 |"
    )


def test_commands_sweep_lr_and_seed_in_one_multirun(tmp_path):
    command = study.cell_command("hypergrid_2d", "sgdp", tmp_path, (0, 1, 2))
    assert command[1:3] == ["train.py", "-m"]
    assert "optim=sgdp" in command and "seed=0,1,2" in command
    lrs = ",".join(f"{lr:g}" for lr in study.LR_GRID["hypergrid_2d"]["sgd"])
    assert f"optim.lr={lrs}" in command
