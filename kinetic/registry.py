"""The task registry: everything the core needs of a task, given once by the task itself.

A task package calls `register_task(name, "module:Class", schema=..., ...)` where it is
defined; the core looks the name up and never lists tasks itself. A `TaskSpec` says what the
core cannot know: the `task` group's schema (stored in Hydra's ConfigStore as
`schema/task/<name>`), the config groups the task reads and their checks, which keys make two
runs the same run (the resume check), which groups the HParams tab records, how a run is named
on the `done:` line, the learning-rate schedules the task accepts and the files it writes in a
run directory. A task from a user's own package registers the same way and gets the same
treatment.

`task_spec(name)` finds a task by name: one registered in this process; else one an installed
package declares as an entry point of the group `kinetic.tasks` (the entry point names the
module whose import registers it); else the module named by the config's `task.module`; else
`name` itself as the import path of a `Task` subclass, registered with default settings.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from kinetic.errors import ConfigError
from kinetic.schedule import SCHEDULES
from kinetic.task import Task

__all__ = [
    "ENTRY_POINT_GROUP",
    "TASKS",
    "TaskSpec",
    "build_task",
    "load_task_plugins",
    "register_task",
    "task_spec",
]

ENTRY_POINT_GROUP = "kinetic.tasks"  # installed packages' tasks: name = "module that registers"


@dataclass(frozen=True)
class TaskSpec:
    """What the core knows of one task, as `register_task` was told.

    Attributes:
        name: the `task.name` that selects it.
        target: the `Task` subclass, or its "module:Class" path, imported when first built
            (so that choosing one task never imports another's libraries).
        schema: the dataclass of the `task` config group (defaults and types), or None for an
            open group whose keys the task checks itself.
        groups: the other config groups the task reads, each with its schema dataclass or
            None for an open group (e.g. ``{"env": None, "model": None, "loss": None}``).
        validate: range checks of the task's groups, `validate(cfg)` on the composed root
            config, raising `ConfigError` naming the key; None: `from_config` checks them.
        identity: config groups or dotted keys whose values make a checkpoint belong to a
            different run (besides task.name, optim.name and seed, which always do).
        identity_ignore: dotted keys inside those groups that do not (e.g. an evaluation size).
        hparams: config groups or keys recorded in TensorBoard's HParams tab for every run
            (besides task, optim, optim.lr, seed, train.steps and train.lr_schedule).
        run_name: `run_name(cfg)` names the run on the `done:` line (e.g. an environment and
            its size); None: the task's name.
        lr_schedules: the `train.lr_schedule` names the task accepts; None when the task's
            own `lr_schedule` checks its name. Default: `kinetic.schedule`'s.
        outputs: files and folders the task writes in a run directory (removed with the run's
            own by `overwrite=true`; their presence marks a directory as holding a run).
    """

    name: str
    target: type[Task] | str
    schema: type | None = None
    groups: Mapping[str, type | None] = field(default_factory=dict)
    validate: Callable[[Mapping[str, Any]], None] | None = None
    identity: tuple[str, ...] = ()
    identity_ignore: tuple[str, ...] = ()
    hparams: tuple[str, ...] = ()
    run_name: Callable[[Mapping[str, Any]], str] | None = None
    lr_schedules: tuple[str, ...] | None = SCHEDULES
    outputs: tuple[str, ...] = ()

    def schedules(self) -> tuple[str, ...] | None:
        """The `train.lr_schedule` names to check: `lr_schedules`, except that a task left at
        kinetic's default whose class defines its own `lr_schedule` checks its names itself."""
        if self.lr_schedules is SCHEDULES and self.task_class().lr_schedule is not Task.lr_schedule:
            return None
        return self.lr_schedules

    def task_class(self) -> type[Task]:
        """The `Task` subclass, imported on first use."""
        target = self.target
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            if not (isinstance(target, type) and issubclass(target, Task)):
                raise TypeError(f"task {self.name}: {self.target} is not a kinetic.Task subclass")
        return target


TASKS: dict[str, TaskSpec] = {}


def register_task(
    name: str,
    target: type[Task] | str,
    *,
    schema: type | None = None,
    groups: Mapping[str, type | None] | None = None,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
    identity: Sequence[str] = (),
    identity_ignore: Sequence[str] = (),
    hparams: Sequence[str] = (),
    run_name: Callable[[Mapping[str, Any]], str] | None = None,
    lr_schedules: Sequence[str] | None = SCHEDULES,
    outputs: Sequence[str] = (),
) -> TaskSpec:
    """Make `task.name=<name>` build `target` (a `Task` subclass or its "module:Class" path),
    with what the core needs of it (the arguments are `TaskSpec`'s attributes). Registering a
    name again replaces it. The schemas go to Hydra's ConfigStore as `schema/<group>/<name>`
    (`schema/task/<name>`, `schema/data/<name>`, ...), so a preset may list
    `/schema/task@task: <name>` in its defaults and be typed at composition."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Invalid task name: {name!r}; expected a non-empty string")
    if isinstance(target, type) and not issubclass(target, Task):
        raise TypeError(f"register_task({name!r}, {target.__name__}): not a kinetic.Task subclass")
    if not isinstance(target, type | str):
        raise TypeError(f"register_task({name!r}, {target!r}): expected a Task subclass or a path")
    for what, cls in {"schema": schema, **dict(groups or {})}.items():
        if cls is not None and not dataclasses.is_dataclass(cls):
            raise TypeError(f"register_task({name!r}): {what} must be a dataclass, not {cls!r}")
    spec = TaskSpec(
        name=name, target=target, schema=schema, groups=dict(groups or {}), validate=validate,
        identity=tuple(identity), identity_ignore=tuple(identity_ignore), hparams=tuple(hparams),
        run_name=run_name,
        lr_schedules=(
            lr_schedules if lr_schedules is None or lr_schedules is SCHEDULES
            else tuple(lr_schedules)
        ),
        outputs=tuple(outputs),
    )  # fmt: skip
    TASKS[name] = spec
    store = ConfigStore.instance()
    for group, node in {"task": schema, **spec.groups}.items():
        if node is not None:
            store.store(group=f"schema/{group}", name=name, node=node)
    return spec


def _entry_points() -> dict[str, Any]:
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def load_task_plugins() -> None:
    """Import every installed package's task module (entry points of `kinetic.tasks`), so that
    their schemas are in Hydra's ConfigStore before a config is composed. A plugin that fails
    to import is a bug in it and keeps its traceback."""
    for name, point in _entry_points().items():
        if name not in TASKS:
            point.load()


def _available() -> str:
    return ", ".join(sorted(set(TASKS) | set(_entry_points())))


def _import_registering(module: str, name: str) -> None:
    """Import `task.module`, which must register the task `name`."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"task.module={module}: cannot be imported ({err}); put its package on PYTHONPATH or "
            f"install it (available tasks: {_available()})"
        ) from err
    if name not in TASKS:
        raise ConfigError(
            f"task.module={module} was imported but registered no task named {name!r}; it must "
            f"call kinetic.register_task({name!r}, ...) (available tasks: {_available()})"
        )


def task_spec(name: Any, module: str | None = None) -> TaskSpec:
    """The task registered as `name` (see the module docstring for where it is looked for);
    `module`: the config's `task.module`, a module whose import registers it. Refuses an
    unknown name with a `ConfigError` listing the available ones."""
    if not isinstance(name, str) or not name:
        raise ConfigError(f"Invalid task.name: {name!r}; expected a task name ({_available()})")
    if name in TASKS:
        return TASKS[name]
    points = _entry_points()
    if name in points:
        points[name].load()
        if name in TASKS:
            return TASKS[name]
        raise ConfigError(
            f"task.name={name}: the entry point {points[name].value} registered no task of "
            "that name (it must call kinetic.register_task)"
        )
    if module is not None:
        _import_registering(module, name)
        return TASKS[name]
    if "." in name:  # the import path of a Task subclass
        path, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(path), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(
                f"Unknown task: {name!r}; not registered, and not importable ({err}); "
                f"available: {_available()}"
            ) from err
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ConfigError(f"task.name={name} is {cls!r}, not a kinetic.Task subclass")
        return TASKS[name] if name in TASKS else register_task(name, cls)
    raise ConfigError(
        f"Unknown task: {name!r}; available: {_available()} (a task of your own: its "
        "module calls kinetic.register_task, and task.module names it or an entry point of "
        f"the group {ENTRY_POINT_GROUP} does)"
    )


def config_task_spec(cfg: Mapping[str, Any]) -> TaskSpec:
    """The spec of the task a composed config names (`task.name`, `task.module`)."""
    task = cfg.get("task") or {}
    return task_spec(task.get("name"), task.get("module"))


def build_task(cfg: Mapping[str, Any], run_dir: str | Path | None = None) -> Task:
    """The task named by `cfg.task.name`, from the composed config (`Task.from_config`)."""
    return config_task_spec(cfg).task_class().from_config(cfg, run_dir)
