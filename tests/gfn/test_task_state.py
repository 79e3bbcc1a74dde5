"""GFlowNetTask's resume state: a task restored into a fresh one draws, replays, evaluates and
counts found modes exactly as the original goes on to (bit sequences: sampled evaluation with its
own carried stream, and found targets; HyperGrid: visited terminal states)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gfn.task import GFlowNetTask
from kinetic.checkpoint import CheckpointError
from kinetic.rng import capture_rng, restore_rng

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
BITSEQ = ("env=bitseq", "env.n=8", "env.k=2", "env.n_targets=4", "env.mode_threshold=1")


def _task(*overrides: str, seed: int = 0) -> GFlowNetTask:
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose("config", overrides=[*overrides, f"seed={seed}", "task.eval_samples=32"])
    return GFlowNetTask.from_config(cfg)


def _save(task: GFlowNetTask) -> dict:
    buffer = io.BytesIO()
    torch.save({"task": task.state_dict(), "rng": capture_rng(task.generators())}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _steps(task: GFlowNetTask, first: int, last: int) -> list:
    """Losses and evaluations of steps first..last, with a gradient step between losses."""
    optimizer = torch.optim.SGD(task.model.parameters(), lr=0.05)
    out = []
    for step in range(first, last + 1):
        loss, _ = task.loss(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append((float(loss.detach()), task.evaluate(step)))
    return out


@pytest.mark.parametrize("env", [BITSEQ, ("env.height=4",)], ids=["bitseq", "hypergrid"])
def test_a_restored_task_continues_exactly(env):
    replay = ("task.replay.capacity=32", "task.replay.fraction=0.25")
    original = _task(*env, *replay)
    _steps(original, 1, 3)
    saved = _save(original)
    expected = _steps(original, 4, 6)

    fresh = _task(*env, *replay, seed=7)  # other weights and streams
    fresh.load_state_dict(saved["task"])
    restore_rng(saved["rng"], fresh.generators())
    assert _steps(fresh, 4, 6) == expected
    assert "modes_found" in expected[-1][1]


def test_a_checkpoint_with_another_replay_buffer_is_refused():
    saved = _save(_task("env.height=4", "task.replay.capacity=32", "task.replay.fraction=0.25"))
    with pytest.raises(CheckpointError, match=(
        r"^The checkpoint's replay buffer holds 32 trajectories, this run's none "
        r"\(task\.replay\.capacity\); resume with the run's own$"
    )):  # fmt: skip
        _task("env.height=4").load_state_dict(saved["task"])
