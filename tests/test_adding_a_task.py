"""docs/extending.md, "Adding a task": its module, its Python use and its preset, run as
written (the module in a temporary project, trained through train.py in a subprocess), the
trained fit checked against the closed-form least-squares solution of the same data."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinetic import TASKS, build_task
from kinetic.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "extending.md").read_text()
SECTION = DOC[DOC.index("\n# Adding a task\n") :]


def _blocks(language: str) -> list[str]:
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", SECTION, flags=re.DOTALL | re.MULTILINE)
    assert blocks, f"'Adding a task' has no {language} block"
    return blocks


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A user's project: my_tasks.py and my_configs/task/linear_fit.yaml, from the page."""
    (tmp_path / "my_tasks.py").write_text(_blocks("python")[0])
    (tmp_path / "my_configs" / "task").mkdir(parents=True)
    (tmp_path / "my_configs" / "task" / "linear_fit.yaml").write_text(_blocks("yaml")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("my_tasks", None)
    for name in ("linear_fit", "my_tasks.LinearFit"):
        TASKS.pop(name, None)


def _least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The closed-form fit of y = x w + b, (w then b) as one vector, and its mean squared error."""
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution
    return solution.flatten(), float((design @ solution - y.double()).square().mean())


def _fitted(state: dict) -> torch.Tensor:
    return torch.cat([state["model"]["weight"].flatten(), state["model"]["bias"]]).double()


def test_the_documented_python_trains_to_the_least_squares_fit(project):
    namespace: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(_blocks("python")[1], namespace)  # as written: trains 500 steps, prints the MSE
    finally:
        torch.set_num_threads(threads)
    task, metrics = namespace["task"], namespace["metrics"]
    solution, best = _least_squares(task.x, task.y)
    assert best <= metrics["mse"] <= 1.01 * best  # within 1% of the minimum
    torch.testing.assert_close(_fitted(task.state_dict()), solution, atol=0.02, rtol=0)
    assert f"least-squares minimum of this dataset's mean squared error is {best:.4g}" in SECTION

    # register_task: the name builds it from a config; state_dict restores its fit.
    my_tasks = importlib.import_module("my_tasks")
    cfg = {"task": {"name": "linear_fit", "n_samples": 256, "n_features": 4, "noise_std": 0.1,
                    "batch_size": 32, "data_seed": 0}, "seed": 5, "device": "cpu"}  # fmt: skip
    fresh = build_task(cfg)
    assert isinstance(fresh, my_tasks.LinearFit) and torch.equal(fresh.x, task.x)
    fresh.load_state_dict(task.state_dict())
    assert fresh.evaluate(0) == task.evaluate(0)


def _train(project: Path, *args: str) -> subprocess.CompletedProcess:
    """The page's command, run in the project, with `args` added."""
    command = shlex.split(_blocks("bash")[0])
    assert command[:3] == ["PYTHONPATH=.", "python", "path/to/kinetic/train.py"], command
    path = os.pathsep.join(p for p in (".", os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *command[3:], *args,
         f"hydra.run.dir={project / 'run'}", "logging.progress=false"],
        cwd=project, env={**os.environ, "PYTHONPATH": path},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_the_documented_preset_trains_resumes_and_refuses_from_the_command_line(project):
    done = _train(project, "train.checkpoint_every=250")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: my_tasks.LinearFit vradam seed=0 mse="), summary
    mse = float(re.search(r" mse=(\S+)", summary).group(1))
    assert f"mse={mse:.4g}" in SECTION  # the page's figure is this run's

    my_tasks = importlib.import_module("my_tasks")
    data = my_tasks.LinearFit()  # the preset's values are the constructor's defaults
    solution, best = _least_squares(data.x, data.y)
    checkpoints = project / "run" / "checkpoints"
    final = load_checkpoint(checkpoints / "checkpoint_0000500.pt")["task"]
    fitted = _fitted(final)
    torch.testing.assert_close(fitted, solution, atol=0.02, rtol=0)
    assert best <= mse <= 1.01 * best

    # resume=auto from step 250 (its model, optimizer and batch stream) ends where the run did.
    for name in ("checkpoint_0000500.pt", "checkpoint_0000500.pt.sha256"):
        (checkpoints / name).unlink()
    (project / "run" / "metrics.json").unlink()
    done = _train(project, "train.checkpoint_every=250", "resume=auto")
    assert done.returncode == 0, done.stderr
    resumed = load_checkpoint(checkpoints / "checkpoint_0000500.pt")["task"]
    assert torch.equal(_fitted(resumed), fitted)

    # A bad task key: one line naming it, exit code 2.
    done = _train(project, "task.batch_size=0", "overwrite=true")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: Invalid task.batch_size: 0; expected an int in [1, 256]"
