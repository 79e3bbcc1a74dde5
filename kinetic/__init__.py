"""The shared machinery: one training loop, tasks, typed configs, run logging and checkpoints."""

from kinetic.checkpoint import load_checkpoint, save_checkpoint
from kinetic.config import LoggingConfig, TrainConfig
from kinetic.device import resolve_device
from kinetic.logging import RunLogger
from kinetic.loop import NullLogger, train
from kinetic.precision import Precision
from kinetic.registry import TASKS, TaskSpec, build_task, register_task
from kinetic.stability.monitors import MonitorConfig
from kinetic.task import Task

__all__ = [
    "TASKS",
    "LoggingConfig",
    "MonitorConfig",
    "NullLogger",
    "Precision",
    "RunLogger",
    "Task",
    "TaskSpec",
    "TrainConfig",
    "build_task",
    "load_checkpoint",
    "register_task",
    "resolve_device",
    "save_checkpoint",
    "train",
]
