"""`resume=`: which checkpoint a run continues from, and which it refuses."""

from __future__ import annotations

import re

import pytest
import torch

from kinetic.checkpoint import CheckpointError, Checkpoints, save_checkpoint
from kinetic.resume import FORMAT, find_resume_checkpoint

IDENTITY = {"task.name": "gfn", "env.height": 8}


def _save(run_dir, step, identity=IDENTITY):
    return Checkpoints(run_dir).save(step, format=FORMAT, identity=identity, w=torch.ones(1))


def test_auto_takes_the_latest_and_starts_afresh_without_one(tmp_path):
    assert find_resume_checkpoint(tmp_path, None, IDENTITY) is None
    assert find_resume_checkpoint(tmp_path, "auto", IDENTITY) is None
    _save(tmp_path, 10)
    latest = _save(tmp_path, 20)
    path, payload = find_resume_checkpoint(tmp_path, "auto", IDENTITY)
    assert path == latest and payload["step"] == 20


def test_an_explicit_path_is_refused_when_missing_foreign_or_of_another_run(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match=re.escape(
        f"resume={missing}: no such checkpoint file (resume=auto picks the latest checkpoint of "
        "the run directory)"
    )):  # fmt: skip
        find_resume_checkpoint(tmp_path, str(missing), IDENTITY)
    foreign = save_checkpoint(tmp_path / "final.pt", model={})
    with pytest.raises(CheckpointError, match=re.escape(f"{foreign} is not a training checkpoint")):
        find_resume_checkpoint(tmp_path, str(foreign), IDENTITY)
    other = _save(tmp_path / "other", 5, IDENTITY | {"env.height": 4})
    with pytest.raises(CheckpointError, match=re.escape(
        f"Cannot resume from {other} with a different task, environment or model: env.height: 4 "
        "in the checkpoint, 8 now"
    )):  # fmt: skip
        find_resume_checkpoint(tmp_path, str(other), IDENTITY)
    _, payload = find_resume_checkpoint(tmp_path, str(_save(tmp_path / "same", 7)), IDENTITY)
    assert payload["step"] == 7
