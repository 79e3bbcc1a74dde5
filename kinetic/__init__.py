"""The shared machinery: one training loop, tasks, typed configs, run logging and checkpoints."""

from kinetic.checkpoint import load_checkpoint, save_checkpoint
from kinetic.config import LoggingConfig, TrainConfig
from kinetic.device import resolve_device
from kinetic.logging import RunLogger
from kinetic.loop import NullLogger, train
from kinetic.precision import Precision
from kinetic.stability.monitors import MonitorConfig
from kinetic.task import TASKS, Task, build_task, register_task

__all__ = [
    "TASKS",
    "LoggingConfig",
    "MonitorConfig",
    "NullLogger",
    "Precision",
    "RunLogger",
    "Task",
    "TrainConfig",
    "build_task",
    "load_checkpoint",
    "register_task",
    "resolve_device",
    "save_checkpoint",
    "train",
]
