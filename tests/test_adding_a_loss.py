"""docs/extending.md, "Adding a loss": its class and preset, run as written through train.py
from a project of one's own; the trained sampler checked by the exact evaluator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "extending.md").read_text()
SECTION = DOC[DOC.index("\n# Adding a loss\n") : DOC.index("\n# Adding a task\n")]


def _block(language: str) -> str:
    return re.findall(rf"^```{language}\n(.*?)^```$", SECTION, flags=re.DOTALL | re.MULTILINE)[0]


@pytest.fixture
def project(tmp_path):
    (tmp_path / "my_losses.py").write_text(_block("python"))
    (tmp_path / "my_configs" / "loss").mkdir(parents=True)
    (tmp_path / "my_configs" / "loss" / "huber_tb.yaml").write_text(_block("yaml"))
    return tmp_path


def _train(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project)}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config-dir", "my_configs", "loss=huber_tb",
         "logging.progress=false", *args],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_documented_loss_trains_to_the_target_and_refuses_a_bad_value(project):
    run_dir = project / "run"
    done = _train(project, f"hydra.run.dir={run_dir}", "env.height=4", "train.steps=800",
                  "train.eval_every=400")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "my_losses.HuberTB vradam seed=0" in done.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["l1"] < 1e-3, metrics  # the exact L1 over the 16 terminal states
    refused = _train(project, f"hydra.run.dir={project / 'bad'}", "loss.delta=0")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: Invalid loss.delta: 0; expected a float > 0"
    )
