"""A torchrun run (2 processes, gloo, loopback) killed after a checkpoint and resumed with
`resume=auto` ends exactly where the same command run once without a break ends: parameters,
optimizer, every rank's replay buffer and random streams, metrics.json and the TensorBoard
scalars. A SIGTERM that reaches one rank stops both after the same step, with a checkpoint. A
checkpoint of another number of processes is refused, naming both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_resume_cli import _assert_resumed_run_matches  # tests/ is on the path (conftest.py)

from kinetic.checkpoint import CheckpointError, Checkpoints, load_checkpoint
from kinetic.resume import check_world_size

ROOT = Path(__file__).resolve().parents[2]
ARGS = [
    "env.height=4", "train.steps=200", "train.log_every=10", "train.eval_every=50",
    "train.checkpoint_every=20", "task.replay.capacity=64", "task.replay.fraction=0.25",
    "task.epsilon=0.1", "threads=1", "logging.progress=false", "logging.images=false",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _command(run_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--max-restarts=0", "train.py", f"hydra.run.dir={run_dir}", *args,
    ]  # fmt: skip


def _run(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        _command(run_dir, *args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _start(run_dir: Path, args: list[str], ready: Callable[[], bool]) -> subprocess.Popen:
    """Start a torchrun run (its own session) and return once `ready()` holds."""
    process = subprocess.Popen(
        _command(run_dir, *args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_all(process)
            raise AssertionError(process.stderr.read() if process.stderr else "timed out")
        time.sleep(0.002)
    return process


def _kill_all(process: subprocess.Popen) -> None:
    """SIGKILL every rank (torchrun starts each in a session of its own), then torchrun; a
    no-op once torchrun has exited (its ranks have then ended)."""
    if process.poll() is None:
        for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split():
            os.killpg(int(pid), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)


@pytest.mark.slow
def test_torchrun_killed_and_resumed_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run(reference, *ARGS)

    # SIGKILL both ranks and torchrun once step 20's checkpoint is whole.
    digest = resumed / "checkpoints" / "checkpoint_0000020.pt.sha256"  # written last
    _kill_all(_start(resumed, ARGS, digest.exists))
    assert not (resumed / "metrics.json").exists()  # killed mid-run
    interrupted_at = load_checkpoint(Checkpoints(resumed).latest())["step"]
    assert interrupted_at < 200

    done = _run(resumed, *ARGS, "resume=auto")
    assert f"(step {interrupted_at})" in done.stderr

    # One entry per rank, each its own: the ranks' streams and replay buffers differ.
    ranks = load_checkpoint(Checkpoints(reference).path(200))["per_rank"]
    assert len(ranks) == 2
    assert not ranks[0]["rng"]["generators"]["batches"].equal(
        ranks[1]["rng"]["generators"]["batches"]
    )
    assert not ranks[0]["task"]["replay"]["states"].equal(ranks[1]["task"]["replay"]["states"])
    _assert_resumed_run_matches(reference, resumed, 200)


def test_a_checkpoint_of_another_number_of_processes_is_refused() -> None:
    check_world_size({"step": 3}, 1)
    check_world_size({"per_rank": [{}, {}]}, 2)
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 4"):
        check_world_size({"per_rank": [{}, {}]}, 4)
    with pytest.raises(CheckpointError, match="written by 1 process, this run has 2"):
        check_world_size({"step": 3}, 2)


@pytest.mark.slow
def test_a_sigterm_reaching_one_rank_stops_both_after_the_same_step(tmp_path: Path) -> None:
    """Rank 1 alone gets SIGTERM: the ranks agree to stop, rank 0 writes the checkpoint with both
    ranks' state and prints the resume command."""
    args = ["env.height=4", "train.steps=1000000", "train.checkpoint_every=0", *ARGS[-3:]]
    process = _start(tmp_path, args, lambda: any(tmp_path.glob("events.out.tfevents.*")))
    try:
        time.sleep(0.5)  # training has started
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        ranks = {
            pid: dict(
                line.split("=", 1)
                for line in Path(f"/proc/{pid}/environ").read_text().split("\0")
                if "=" in line
            )["RANK"]
            for pid in children
        }
        (rank1,) = [int(pid) for pid, r in ranks.items() if r == "1"]
        os.kill(rank1, signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        _kill_all(process)
    path = Checkpoints(tmp_path).latest()
    payload = load_checkpoint(path)
    assert 0 < payload["step"] < 1000000 and len(payload["per_rank"]) == 2
    assert f"stopped: SIGTERM: stopped after step {payload['step']}; checkpoint: {path}" in err
    assert "resume with: torchrun --nproc_per_node=2 train.py " in err
