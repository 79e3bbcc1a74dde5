"""`torchrun --nproc_per_node=2 train.py ...` (gloo, loopback): one run directory, one event
file, one summary line, and the batch split stated, for both tasks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kinetic.checkpoint import Checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

RUNS = {
    "gfn": ["env=hypergrid", "train.steps=20", "train.eval_every=10"],
    "ddpm": [
        "task=ddpm", "model=unet_tiny", "task.batch_size=8", "train.steps=3", "train.log_every=1",
        "train.warmup_steps=0", "task.quality=false", "task.sampling.steps=2",
        "task.sampling.grid_samples=4", "threads=1",
    ],
}  # fmt: skip


@pytest.mark.parametrize("task", ["gfn", "ddpm"])
def test_two_processes_write_one_run(task: str, tmp_path: Path) -> None:
    # Microseconds in the directory name: ranks that each named their own would not agree.
    runs = tmp_path / "runs"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "train.py", *RUNS[task], "logging.progress=false",
        f"hydra.run.dir={runs}/${{now:%H-%M-%S-%f}}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = runs.iterdir()
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert len(Checkpoints(run_dir).paths()) == 1  # the last step's, written by rank 0 alone
    assert (run_dir / "metrics.json").is_file() and (run_dir / ".hydra/config.yaml").is_file()
    assert proc.stdout.count("done: ") == 1
    batch = 16 if task == "gfn" else 8
    split = f"world_size=2, backend=gloo, global_batch={batch}, batch_per_rank={batch // 2}"
    assert split in proc.stdout
    config = load_checkpoint(Checkpoints(run_dir).latest())["config"]
    assert config["distributed"]["batch_per_rank"] == batch // 2
    assert torch.distributed.is_available()
