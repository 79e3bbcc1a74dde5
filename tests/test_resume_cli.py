"""Interrupted runs resume exactly: SIGKILL mid-training, then `resume=auto`, ends with the same
parameters, optimizer state, metrics.json and TensorBoard scalars as a run never interrupted
(both tasks); SIGTERM and Ctrl-C checkpoint and print the resume command; a truncated newest
checkpoint falls back to the one before.

Interrupted runs are real processes killed with real signals; the runs they are compared with
are the same command line, run once without a break.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kinetic.checkpoint import Checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["threads=1", "logging.progress=false", "logging.images=false"]
GFN = [
    "env.height=4", "train.steps=300", "train.log_every=10", "train.eval_every=50",
    "train.checkpoint_every=50", "task.replay.capacity=64", "task.replay.fraction=0.25",
    "task.epsilon=0.1", "monitor.sharpness.every=100", *COMMON,
]  # fmt: skip
DDPM = [
    "task=ddpm", "model=unet_tiny", "task.batch_size=16", "task.quality=false",
    "task.sampling.steps=3", "task.sampling.grid_samples=4", "train.steps=80",
    "train.warmup_steps=10", "train.log_every=10", "train.eval_every=40",
    "train.checkpoint_every=20", "monitor.sharpness.every=20", "monitor.sharpness.iters=2",
    *COMMON,
]  # fmt: skip
TIMING = ("wall_time_s", "eval_time_s", "trajectories_per_sec", "images_per_sec")


def _command(run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *args]


def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(run_dir, *args), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done


def _kill_after(run_dir: Path, args: list[str], step: int) -> subprocess.Popen:
    """Start a run and SIGKILL it as soon as its checkpoint of `step` is complete."""
    digest = run_dir / "checkpoints" / f"checkpoint_{step:07d}.pt.sha256"  # written last
    process = subprocess.Popen(
        _command(run_dir, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not digest.exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.kill()
    process.communicate(timeout=60)
    assert not (run_dir / "metrics.json").exists()  # killed mid-run, not after it
    return process


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        # Throughput and wall time (perf/*, final/wall_time_s, ...) are never reproducible.
        if not tag.startswith("perf/") and tag.rsplit("/", 1)[-1] not in TIMING
    }


def _assert_same(a, b, where: str = "") -> None:
    """Equal tensors (bit for bit) and values, recursively."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # NaN == NaN here


def _assert_resumed_run_matches(reference: Path, resumed: Path, steps: int) -> None:
    final_a = load_checkpoint(Checkpoints(reference).path(steps))
    final_b = load_checkpoint(Checkpoints(resumed).path(steps))
    assert final_a.keys() == final_b.keys()
    for key in ("task", "optimizer", "schedule", "monitor", "guard", "rng", "step", "per_rank"):
        if key in final_a:  # per_rank: every rank's own state, in a distributed run
            _assert_same(final_a[key], final_b[key], key)
    metrics_a = json.loads((reference / "metrics.json").read_text())
    metrics_b = json.loads((resumed / "metrics.json").read_text())
    for key in TIMING:
        metrics_a.pop(key, None), metrics_b.pop(key, None)
    assert metrics_a == metrics_b
    assert _scalars(reference) == _scalars(resumed)


def test_gflownet_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    """With replay, exploration and sharpness probes; the newest checkpoint is then truncated,
    so the resume also falls back past a damaged file."""
    _run(tmp_path / "reference", *GFN)
    resumed = tmp_path / "resumed"
    _kill_after(resumed, GFN, step=100)
    checkpoints = Checkpoints(resumed)
    newest = checkpoints.latest()
    assert newest is not None and newest != checkpoints.path(300)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    done = _run(resumed, *GFN, "resume=auto")
    assert f"warning: Checkpoint {newest} " in done.stderr
    assert "falling back to the previous checkpoint" in done.stderr
    _assert_resumed_run_matches(tmp_path / "reference", resumed, 300)


def test_ddpm_killed_and_resumed_matches_an_uninterrupted_run(tmp_path):
    """A tiny UNet with its EMA, the warm-up + cosine schedule and the sharpness probe."""
    _run(tmp_path / "reference", *DDPM)
    resumed = tmp_path / "resumed"
    _kill_after(resumed, DDPM, step=40)
    done = _run(resumed, *DDPM, "resume=auto")
    assert "resuming from " in done.stderr
    _assert_resumed_run_matches(tmp_path / "reference", resumed, 80)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_and_prints_the_resume_command(tmp_path, signum, code):
    args = ["env.height=4", "train.steps=1000000", "train.checkpoint_every=0", *COMMON]
    process = subprocess.Popen(
        _command(tmp_path, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("events.out.tfevents.*")):  # training has started
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    path = Checkpoints(tmp_path).latest()
    step = load_checkpoint(path)["step"]
    assert 0 < step < 1000000
    lines = err.strip().splitlines()
    assert lines[-2] == f"stopped: {signal.Signals(signum).name}: stopped after step {step}; " \
        f"checkpoint: {path}"  # fmt: skip
    assert lines[-1] == (
        "resume with: python train.py " + " ".join(args) + f" hydra.run.dir={tmp_path} resume=auto"
    )
