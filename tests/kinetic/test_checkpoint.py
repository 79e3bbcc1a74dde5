"""Checkpoint files: atomic writes, the last K kept, corruption caught, run identity enforced."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from kinetic.checkpoint import (
    CheckpointError,
    Checkpoints,
    check_run_dir,
    check_state_shapes,
    load_checkpoint,
    run_identity,
    save_checkpoint,
    start_run_dir,
)
from kinetic.errors import ConfigError


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what a refused input must leave unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_save_then_load_round_trips_and_leaves_no_temporary_file(tmp_path):
    payload = {"w": torch.randn(3, 4), "step": 7, "config": {"a": [1, 2], "b": None}}
    path = save_checkpoint(tmp_path / "c.pt", **payload)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], payload["w"]) and loaded["step"] == 7
    assert loaded["config"] == payload["config"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "c.pt.sha256"]
    digest, name = (tmp_path / "c.pt.sha256").read_text().split()
    assert name == "c.pt" and len(digest) == 64  # `sha256sum -c` format


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "c.pt", step=1)
    before = _snapshot(tmp_path)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, step=2)
    monkeypatch.undo()
    # The old file is whole; its digest was removed first, so the file is checked by torch.load.
    assert (tmp_path / "c.pt").read_bytes() == before["c.pt"]
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # no temporary file left


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        checkpoints.save(step, value=torch.tensor(step))
    assert [p.name for p in checkpoints.paths()] == [
        "checkpoint_0000030.pt",
        "checkpoint_0000040.pt",
    ]
    assert sorted(p.name for p in checkpoints.folder.iterdir()) == [
        "checkpoint_0000030.pt", "checkpoint_0000030.pt.sha256",
        "checkpoint_0000040.pt", "checkpoint_0000040.pt.sha256",
    ]  # fmt: skip
    path, payload = checkpoints.load_latest()
    assert path == checkpoints.path(40) and payload["step"] == 40


def test_latest_sorts_by_step_not_by_name(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=5)
    for step in (999_999, 10_000_000, 5):
        checkpoints.save(step, value=torch.tensor(step))
    assert checkpoints.latest() == checkpoints.path(10_000_000)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte])
@pytest.mark.parametrize("keep_digest", [True, False])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, keep_digest):
    checkpoints = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        checkpoints.save(step, w=torch.full((1000,), float(step)))
    damage(checkpoints.path(2))
    if not keep_digest:
        Path(str(checkpoints.path(2)) + ".sha256").unlink()
    if damage is _flip_a_byte and not keep_digest:
        # Without its digest, a flipped bit in tensor data loads silently: the digest is what
        # catches it. (Shown here so that the digest is not removed as redundant.)
        assert checkpoints.load_latest()[1]["step"] == 2
        return
    warned: list[str] = []
    path, payload = checkpoints.load_latest(warn=warned.append)
    assert path == checkpoints.path(1) and torch.equal(payload["w"], torch.full((1000,), 1.0))
    assert len(warned) == 1
    assert warned[0].startswith(f"Checkpoint {checkpoints.path(2)} ")
    assert warned[0].endswith("; falling back to the previous checkpoint")


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        checkpoints.save(step, w=torch.ones(100))
        _truncate(checkpoints.path(step))
    with pytest.raises(CheckpointError, match=r"^No usable checkpoint in .*checkpoint_0000001\.pt"):
        checkpoints.load_latest(warn=lambda message: None)
    assert Checkpoints(tmp_path / "empty").load_latest() is None


def test_missing_and_unsafe_checkpoints_are_refused(tmp_path):
    with pytest.raises(
        CheckpointError, match=f"^No checkpoint at {re.escape(str(tmp_path))}/x.pt$"
    ):
        load_checkpoint(tmp_path / "x.pt")
    # weights_only=True: a pickled object that is not tensors and plain containers is refused.
    torch.save({"bad": Path("x")}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"^Checkpoint .*unsafe\.pt cannot be read: "):
        load_checkpoint(tmp_path / "unsafe.pt")


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^Invalid train.keep_checkpoints: 0; expected an int >= 1$"
    ):
        Checkpoints(tmp_path, keep=0)


IDENTITY = {"task.name": "gfn", "seed": 0, "optim.name": "vradam", "env.height": 8}


def test_a_run_directory_holding_a_run_is_refused_unchanged(tmp_path):
    check_run_dir(tmp_path, IDENTITY)
    start_run_dir(tmp_path, IDENTITY)
    assert json.loads((tmp_path / "run.json").read_text()) == {"identity": IDENTITY}
    save_checkpoint(tmp_path / "checkpoints" / "checkpoint_0000010.pt", step=10)
    (tmp_path / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=(
        f"^The run directory {re.escape(str(tmp_path))} already holds a run; pass resume=auto "
        "to continue it, overwrite=true to replace it, or choose another hydra.run.dir$"
    )):  # fmt: skip
        check_run_dir(tmp_path, IDENTITY)
    other = IDENTITY | {"env.height": 4, "env.ndim": 3}
    with pytest.raises(CheckpointError, match=(
        r"^Cannot resume the run in .* with a different task, environment or model: "
        r"env\.height: 8 in the checkpoint, 4 now; env\.ndim: \(absent\) in the checkpoint, 3 now$"
    )):  # fmt: skip
        check_run_dir(tmp_path, other, resume="auto")
    with pytest.raises(ConfigError, match="contradict"):
        check_run_dir(tmp_path, IDENTITY, resume="auto", overwrite=True)
    assert _snapshot(tmp_path) == before
    check_run_dir(tmp_path, IDENTITY, resume="auto")  # the same run: accepted
    assert _snapshot(tmp_path) == before


def test_overwrite_removes_the_previous_runs_outputs_only(tmp_path):
    start_run_dir(tmp_path, IDENTITY)
    Checkpoints(tmp_path).save(10, w=torch.ones(2))
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "events.out.tfevents.1.host").write_text("x")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step_000010.png").write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1")
    other = IDENTITY | {"seed": 1}
    check_run_dir(tmp_path, other, overwrite=True, outputs=("samples",))
    start_run_dir(tmp_path, other, overwrite=True, outputs=("samples",))  # the task's own
    assert sorted(_snapshot(tmp_path)) == [".hydra/config.yaml", "notes.txt", "run.json"]
    assert json.loads((tmp_path / "run.json").read_text())["identity"] == other


def test_run_identity_names_what_the_run_trains():
    from hydra import compose, initialize_config_dir

    from kinetic.registry import TASKS

    def identity(cfg):  # as train.py takes it: the keys the task registered
        spec = TASKS[cfg.task.name]
        return run_identity(cfg, spec.identity, spec.identity_ignore)

    configs = str(Path(__file__).resolve().parents[2] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        gfn = identity(compose("config", overrides=["env.height=5", "train.steps=7"]))
        ddpm = identity(compose("config", overrides=["task=ddpm", "model=unet_tiny"]))
    assert gfn["task.name"] == "gfn" and gfn["env.height"] == 5 and gfn["loss.name"] == "tb"
    assert gfn["env._target_"] == "envs.hypergrid.HyperGrid" and gfn["model.hidden"] == 256
    assert not any(key.startswith("train.") for key in gfn)  # steps may change on resume
    assert ddpm["data.channels"] == 1 and ddpm["model.block_out_channels"] == [8, 16]
    assert "data.heldout_size" not in ddpm  # an evaluation size: the task registered it as such
    assert not any(key.startswith("data.") for key in gfn)


def test_a_model_of_another_shape_is_refused_by_name():
    saved = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).state_dict()
    current = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2)).state_dict()
    check_state_shapes(saved, saved)
    with pytest.raises(CheckpointError, match=re.escape(
        "The checkpoint's model does not fit this model: 0.bias has shape (8,) in the checkpoint, "
        "(16,) in the model; 0.weight has shape (8, 4) in the checkpoint, (16, 4) in the model; "
        "1.weight has shape (2, 8) in the checkpoint, (2, 16) in the model"
    )):  # fmt: skip
        check_state_shapes(saved, current)
