"""examples/mixture_ddpm, a task from outside this repository, trained through train.py.

The example is installed as a user installs a package of their own (its module on the path and
the `kinetic.tasks` entry point that pip would write into a .dist-info folder); no file of this
project names it. Its samples are scored against the mixture itself: 98.9% of the mixture's own
samples lie within 3 std of a mean, and each mean is nearest to 1/8 of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from kinetic.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "mixture_ddpm"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """What `pip install examples/mixture_ddpm` leaves for importlib.metadata: its entry point."""
    site = tmp_path_factory.mktemp("site")
    info = site / "mixture_ddpm_example-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mixture-ddpm-example\n"
                                   "Version: 0.1.0\n")  # fmt: skip
    declared = '[project.entry-points."kinetic.tasks"]\nmixture_ddpm = "mixture_ddpm"'
    assert declared in (EXAMPLE / "pyproject.toml").read_text()  # what pip turns into this:
    (info / "entry_points.txt").write_text("[kinetic.tasks]\nmixture_ddpm = mixture_ddpm\n")
    return site


def _train(site: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLE), str(site)])}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "task=mixture_ddpm",
         f"hydra.searchpath=[file://{EXAMPLE / 'configs'}]", f"hydra.run.dir={run_dir}",
         "logging.progress=false", *args],
        cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_the_example_trains_to_the_mixture_with_what_a_builtin_task_gets(site, tmp_path):
    run_dir = tmp_path / "run"
    done = _train(site, run_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("done: mixture_ddpm(k=8) vradam seed=0")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["inliers"] >= 0.9 and metrics["weights_l1"] <= 0.1, metrics
    # The run identity it registered, checkpoints, TensorBoard scalars, monitors and HParams.
    identity = json.loads((run_dir / "run.json").read_text())["identity"]
    assert identity["task.n_components"] == 8 and identity["task.std"] == 0.3
    assert (run_dir / "checkpoints" / "checkpoint_0001500.pt").is_file()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/inliers", "optim/eta", "stability/nonfinite_skips",
            "stability/update_cos", "perf/points_per_sec"} <= tags  # fmt: skip
    content = events.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(
        content[hp_metadata.SESSION_START_INFO_TAG]
    )
    hparams = json_format.MessageToDict(start)["hparams"]  # what the task registered, too
    assert hparams["task.n_components"] == 8 and hparams["task"] == "mixture_ddpm"


@pytest.mark.slow
def test_the_example_resumes_bit_for_bit_and_refuses_another_identity(site, tmp_path):
    short = ["train.lr_schedule=constant", "train.eval_every=100", "train.checkpoint_every=100"]
    whole = _train(site, tmp_path / "whole", "train.steps=300", *short)
    assert whole.returncode == 0, whole.stderr
    first = _train(site, tmp_path / "parts", "train.steps=200", *short)
    assert first.returncode == 0, first.stderr
    again = _train(site, tmp_path / "parts", "train.steps=300", "resume=auto", *short)
    assert again.returncode == 0, again.stderr
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "checkpoint_0000300.pt")
    b = load_checkpoint(tmp_path / "parts" / "checkpoints" / "checkpoint_0000300.pt")
    for key, value in a["task"]["model"].items():
        assert torch.equal(value, b["task"]["model"][key]), key
    metrics = [
        json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("whole", "parts")
    ]
    assert metrics[0]["inliers"] == metrics[1]["inliers"]  # the same model, the same samples

    other = _train(site, tmp_path / "parts", "task.n_components=4", "resume=auto", *short)
    assert other.returncode == 2
    assert "task.n_components: 8 in the checkpoint, 4 now" in other.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("task.std=0", "error: Invalid task.std: 0; expected a float > 0"),
        ("task.timesteps=1", "error: Invalid task.timesteps: 1; expected an int >= 2"),
        ("task.sdt=0.5", "Key 'sdt' not in 'MixtureConfig'"),
    ],
)
def test_the_example_refuses_bad_keys_in_one_line(site, tmp_path, override, message):
    done = _train(site, tmp_path / "run", override)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "run.json").exists()  # nothing written
