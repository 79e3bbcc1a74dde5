"""`train.py task=ddpm` and `sample.py`, end to end, in a subprocess as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "task=ddpm", "model=unet_tiny", "data.heldout_size=300", "train.steps=20",
    "train.eval_every=10", "train.log_every=5", "train.warmup_steps=2",
    "task.sampling.steps=3", "threads=1", "logging.progress=false",
]  # fmt: skip


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, classifier_cache):
    path = tmp_path_factory.mktemp("ddpm_run")
    done = _run("train.py", *TINY, f"hydra.run.dir={path}", f"task.cache_dir={classifier_cache}")
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: ddpm digits vradam seed=0 loss=")
    for key in ("fd=", "fd_ratio=", "confidence=", "class_entropy=", "images_per_sec="):
        assert key in summary
    return path


def test_train_logs_metrics_images_and_checkpoint(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"fd", "fd_real", "fd_ratio", "confidence", "class_entropy", "loss"} <= set(metrics)
    assert metrics["images"] == 20 * 128
    assert metrics["fd_ratio"] == pytest.approx(metrics["fd"] / metrics["fd_real"])
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "step_000010.png", "step_000020.png",
    ]  # fmt: skip
    assert (run_dir / "checkpoints" / "checkpoint_0000020.pt").is_file()

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    expected = {
        "train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec",
        "optim/eta", "optim/eta_ratio", "eval/fd", "eval/fd_real", "eval/fd_ratio",
        "eval/confidence", "eval/class_entropy",
    }  # fmt: skip
    assert expected <= set(events.Tags()["scalars"])
    assert "eval/samples" in events.Tags()["images"]
    lrs = [s.value for s in events.Scalars("train/lr")]
    assert lrs[-1] < max(lrs)  # warm-up, then the cosine decay


def test_sample_writes_a_grid_from_the_checkpoint(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    done = _run("sample.py", f"run_dir={run_dir}", "n=12", "nrow=4", "steps=3", f"out={out}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    width, height = Image.open(out).size
    assert (width, height) == ((4 * 9 + 1) * 4, (3 * 9 + 1) * 4)  # 8x8 tiles, 1-pixel gaps, x4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run_dir=/nonexistent/run"], "error: No run directory at /nonexistent/run"),
        (["n=3"], "error: Missing run_dir=DIR (a run directory of `train.py task=ddpm`)"),
        (
            ["run_dir=.", "colour=red"],
            "error: Invalid argument: 'colour=red'; expected key=value with key in "
            "run_dir, n, scheduler, steps, seed, ema, out, nrow, threads",
        ),
    ],
)
def test_sample_errors_are_one_line_and_exit_code_2(args, message):
    done = _run("sample.py", *args)
    assert done.returncode == 2
    assert done.stderr.strip() == message


def test_sample_without_checkpoint(tmp_path):
    done = _run("sample.py", f"run_dir={tmp_path}")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == f"error: No checkpoint in {tmp_path / 'checkpoints'} (has the run written one yet?)"
    )


def test_train_data_error_is_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _run("train.py", "task=ddpm", "data=folder", f"data.path={empty}",
                f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: No images in data.path={empty}; expected files ending in .png, .jpg, .jpeg"
    )
