"""The extension path of docs/extending.md, as a user outside the repo follows it.

The environment module and its YAML are the page's own code blocks, written to a temporary
directory (not inside the package) and trained through train.py in a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from envs.checker import EnvCheckError, check_env

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "extending.md").read_text()


def _block(language: str) -> str:
    """The first fenced code block of `language` in docs/extending.md."""
    match = re.search(rf"^```{language}\n(.*?)^```$", DOC, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, f"docs/extending.md has no {language} block"
    return match.group(1)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: my_envs.py and my_configs/env/subsets.yaml, from the page."""
    (tmp_path / "my_envs.py").write_text(_block("python"))
    (tmp_path / "my_configs" / "env").mkdir(parents=True)
    (tmp_path / "my_configs" / "env" / "subsets.yaml").write_text(_block("yaml"))
    return tmp_path


def _import_my_envs(project: Path):
    spec = importlib.util.spec_from_file_location("my_envs", project / "my_envs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(project: Path, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(project), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "train.py", *args, f"hydra.run.dir={project / 'run'}"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_documented_recipe_is_short_and_passes_check_env(project: Path) -> None:
    lines = len(_block("python").splitlines()) + len(_block("yaml").splitlines())
    assert lines == 47 + 3  # the count docs/extending.md states
    assert "(47 lines of Python with its docstrings, 3 of\nYAML)" in DOC
    subsets = _import_my_envs(project).Subsets
    check_env(subsets())
    env = subsets(n_items=4)
    assert env.enumerate_terminals().shape == (16, 4)
    assert torch.unique(env.enumerate_terminals(), dim=0).shape[0] == 16


def test_the_documented_error_is_what_check_env_says(project: Path) -> None:
    subsets = _import_my_envs(project).Subsets

    class Subsets(subsets):
        def step(self, states, actions):
            states[torch.arange(len(states)), actions] = 1
            return states

        def featurize(self, states):
            return states

    shown = _block("text").strip().removeprefix("envs.checker.EnvCheckError: ")
    with pytest.raises(EnvCheckError, match=f"^{re.escape(shown)}$"):
        check_env(Subsets())


def test_a_new_env_trains_from_its_own_config_dir(project: Path) -> None:
    done = _train(
        project, "--config-dir", str(project / "my_configs"), "env=subsets",
        "train.steps=200", "train.eval_every=50", "train.log_every=50", "logging.progress=false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("done: subsets() tb vradam seed=0 l1=")

    run = project / "run"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    l1 = events.Scalars("eval/l1")
    assert [e.step for e in l1] == [50, 100, 150, 200]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["l1"] == pytest.approx(l1[-1].value, rel=1e-6)
    assert metrics["l1"] < 0.5 * l1[0].value  # the exact L1 drops as the policy learns
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert config.env == {"_target_": "my_envs.Subsets", "n_items": 6, "seed": 0}


def test_target_override_without_yaml(project: Path) -> None:
    quick = ("train.steps=10", "train.eval_every=10", "logging.progress=false")
    done = _train(project, "~env", "+env._target_=my_envs.Subsets", "+env.n_items=4", *quick)
    assert done.returncode == 0, done.stderr
    config = OmegaConf.load(project / "run" / ".hydra" / "config.yaml")
    assert config.env == {"_target_": "my_envs.Subsets", "n_items": 4}  # no HyperGrid keys

    # Setting only the target keeps HyperGrid's keys, which Subsets does not take: a refused
    # input (exit code 2) that names them, in the same run directory (overwrite=true).
    done = _train(project, "env._target_=my_envs.Subsets", "overwrite=true", *quick)
    assert done.returncode == 2
    assert "unexpected keyword argument 'ndim'" in done.stderr
