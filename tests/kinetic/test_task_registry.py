"""The task registry: a task found by name, by `task.module`, by an installed package's entry
point, or by a class's import path; and what its registration gives the core."""

from __future__ import annotations

import re
import sys

import pytest
from omegaconf import OmegaConf

from kinetic import Task
from kinetic.configure import validate_config
from kinetic.errors import ConfigError
from kinetic.registry import TASKS, register_task, task_spec

MODULE = """
from dataclasses import dataclass

from kinetic import Task, register_task
from kinetic.config import TaskSchema


@dataclass
class ToySchema(TaskSchema):
    name: str = "{name}"
    width: int = 3


class Toy(Task):
    pass


register_task("{name}", Toy, schema=ToySchema, identity=("task.width",))
"""


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """A private copy of the registry, and a folder on sys.path for the user's modules."""
    monkeypatch.setattr("kinetic.registry.TASKS", dict(TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("toy_")]:
        del sys.modules[name]


def test_task_module_names_the_module_that_registers_it(registry):
    (registry / "toy_module.py").write_text(MODULE.format(name="toy_by_module"))
    spec = task_spec("toy_by_module", module="toy_module")
    assert spec.task_class().__name__ == "Toy" and spec.identity == ("task.width",)
    # The core types the task group by the registered schema: defaults filled, typos refused.
    cfg = OmegaConf.create({"task": {"name": "toy_by_module", "module": "toy_module"},
                            "train": {"steps": 5, "log_every": 1, "eval_every": 0,
                                      "lr_schedule": "constant"}})  # fmt: skip
    assert validate_config(cfg) is spec and cfg.task.width == 3
    cfg.task = {"name": "toy_by_module", "module": "toy_module", "widht": 4}
    with pytest.raises(ConfigError, match=r"^Invalid task for task=toy_by_module: Key 'widht'"):
        validate_config(cfg)


def test_an_installed_packages_entry_point_registers_its_task(registry):
    (registry / "toy_plugin.py").write_text(MODULE.format(name="toy_plugin"))
    info = registry / "toy_plugin-1.0.dist-info"  # what pip writes for the package
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kinetic.tasks]\ntoy_plugin = toy_plugin\n")
    assert "toy_plugin" not in TASKS
    assert task_spec("toy_plugin").task_class().__name__ == "Toy"


def test_a_module_that_registers_nothing_or_cannot_be_imported_is_refused_in_words(registry):
    (registry / "toy_silent.py").write_text("x = 1\n")
    message = "task.module=toy_silent was imported but registered no task named 'toy_x'"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        task_spec("toy_x", module="toy_silent")
    with pytest.raises(ConfigError, match=r"^task\.module=toy_absent: cannot be imported"):
        task_spec("toy_x", module="toy_absent")


def test_register_task_refuses_what_is_not_a_task_or_a_schema():
    with pytest.raises(TypeError, match=r"not a kinetic\.Task subclass"):
        register_task("bad", dict)
    with pytest.raises(TypeError, match=r"schema must be a dataclass"):
        register_task("bad", Task, schema=dict)
    assert "bad" not in TASKS
