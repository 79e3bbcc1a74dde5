"""A task's export (`Task.export`): a folder beside every kept checkpoint and one at the end,
each written whole or not at all (`write_folder_atomic`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kinetic import Task, TrainConfig, train
from kinetic.checkpoint import Checkpoints, write_folder_atomic
from kinetic.logging import RunLogger


class _Exporting(Task):
    """Gradient descent on a scalar; its export is the weight and the step, as JSON."""

    items_per_step = 1
    export_name = "bundle"

    def __init__(self) -> None:
        self.model = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(self.model.weight, 3.0)
        self.steps_taken = 0

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, step, model):
        return model.weight.square().sum(), {}

    def after_step(self, step):
        self.steps_taken = step

    def evaluate(self, step):
        return {}

    def state_dict(self):
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])

    def export(self, folder: Path) -> None:
        weight = float(self.model.weight.detach())
        (folder / "model.json").write_text(json.dumps({"w": weight, "step": self.steps_taken}))


def _exported(folder: Path) -> dict:
    return json.loads((folder / "model.json").read_text())


def test_exports_sit_beside_the_kept_checkpoints_and_the_last_one_in_the_run_dir(tmp_path):
    task = _Exporting()
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.1)
    config = TrainConfig(
        steps=7, checkpoint_every=2, keep_checkpoints=2, eval_every=0, lr_schedule="constant"
    )
    train(task, optimizer, config, monitor=None, logger=RunLogger(tmp_path, 7, progress=False))
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [
        "bundle_0000006", "bundle_0000007",
        "checkpoint_0000006.pt", "checkpoint_0000006.pt.sha256",
        "checkpoint_0000007.pt", "checkpoint_0000007.pt.sha256",
    ]  # fmt: skip
    # w <- w - 0.1 * 2w = 0.8 w per step, from 3: the export of step s holds 3 * 0.8^s.
    assert _exported(folder / "bundle_0000006") == pytest.approx({"w": 3 * 0.8**6, "step": 6})
    assert _exported(tmp_path / "bundle") == pytest.approx({"w": 3 * 0.8**7, "step": 7})
    assert not [p for p in tmp_path.rglob(".*") if p.name != ".hydra"]  # no temporary folder


def test_a_task_without_export_name_writes_no_export(tmp_path):
    task = _Exporting()
    task.export_name = None
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.1)
    config = TrainConfig(steps=2, eval_every=0, lr_schedule="constant")
    train(task, optimizer, config, monitor=None, logger=RunLogger(tmp_path, 2, progress=False))
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == []


def test_export_name_without_export_is_refused_in_words():
    class _NoExport(_Exporting):
        export = Task.export  # the base class's default

    message = "_NoExport sets export_name='bundle' but defines no export(folder)"
    with pytest.raises(NotImplementedError, match=f"^{re.escape(message)}$"):
        _NoExport().export(Path("unused"))


def test_a_failed_folder_write_keeps_the_previous_folder_whole(tmp_path):
    target = tmp_path / "bundle"
    write_folder_atomic(target, lambda f: (f / "a.txt").write_text("old"))

    def half_then_fail(folder: Path) -> None:
        (folder / "a.txt").write_text("new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(target, half_then_fail)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temporary folder left


def test_a_folder_write_replaces_the_previous_one_and_clears_a_crash_leftover(tmp_path):
    target = tmp_path / "bundle"
    write_folder_atomic(target, lambda f: (f / "a.txt").write_text("old"))
    leftover = tmp_path / ".bundle.old"  # a crash between the two renames leaves this
    leftover.mkdir()
    (leftover / "a.txt").write_text("older")

    def nested(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "b.txt").write_text("new")

    write_folder_atomic(target, nested)
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["sub", "sub/b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_checkpoints_without_export_name_have_no_export_path(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    assert checkpoints.export_paths() == []
    with pytest.raises(ValueError, match=r"^These checkpoints have no exports"):
        checkpoints.export_path(1)
