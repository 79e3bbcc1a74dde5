"""Typed configs of the run's own groups, the one source of their keys, types and defaults.

Each dataclass here is both what Python code passes (`train(task, opt, TrainConfig(steps=300))`)
and the schema Hydra checks the composed config against (`register_schemas`, run on import):
an unknown key or a wrong type fails at composition with Hydra's own message. The YAML files in
configs/ are presets on top of these defaults. `TaskSchema` is the base of every task's own
schema, which the task registers with `kinetic.register_task` (gfn/config.py,
diffusion/config.py). Range checks go in each schema's `validate()`, called where the config
enters the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from kinetic.stability.monitors import MonitorConfig
from kinetic.validate import validate_train


@dataclass
class TrainConfig:
    """The `train` group: the loop's own settings.

    Args:
        steps: optimisation steps.
        log_every: steps between two logged scalar sets (each is one host sync).
        eval_every: steps between evaluations, and one after the last step; 0 = never evaluate.
        clip_grad_norm: clip the global gradient norm to this; 0 = off.
        lr_schedule: the task's schedule name (default tasks: constant | linear | cosine; DDPM:
            diffusers' get_scheduler names), a multiplier on every group's lr.
        warmup_steps: linear warm-up steps at the start of the schedule.
        checkpoint_every: steps between two checkpoints (checkpoints/checkpoint_<step>.pt in
            the run directory; one is also written after the last step and on SIGTERM/Ctrl-C);
            0 = only those. A run killed at any moment loses at most this many steps.
        keep_checkpoints: the newest checkpoints kept (older ones are deleted); keeping more
            than one lets a resume fall back past a damaged file.
    """

    steps: int = 3000
    log_every: int = 10
    eval_every: int = 100
    clip_grad_norm: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def validate(self) -> TrainConfig:
        """Raise `ConfigError` naming the key on a value the loop cannot run with; returns
        self. (The schedule name is the task's to check: its schedules differ.)"""
        validate_train(asdict(self), lr_schedules=None)
        return self


@dataclass
class LoggingConfig:
    """The `logging` group: what a command-line run shows besides its TensorBoard scalars."""

    progress: bool = True  # tqdm progress bar on the console
    images: bool = True  # image summaries at evaluation (e.g. learned vs target distribution)


# --- the base of every task's schema ---------------------------------------------------------


@dataclass
class OptimizerPresets:
    """A task's tuned defaults per optimizer (e.g. `task.vradam.lr`), part of every task schema:
    configs/optim/<name>.yaml reads them with `oc.select`, so each is optional."""

    vradam: dict[str, Any] = field(default_factory=dict)
    adamw: dict[str, Any] = field(default_factory=dict)
    adamp: dict[str, Any] = field(default_factory=dict)
    sgdp: dict[str, Any] = field(default_factory=dict)
    kadam: dict[str, Any] = field(default_factory=dict)
    adahb_adam: dict[str, Any] = field(default_factory=dict)
    adahb_sgd: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskSchema(OptimizerPresets):
    """The keys every `task` group has; a task's own schema (registered with
    `kinetic.register_task(..., schema=...)`) extends it with the task's keys."""

    name: str = MISSING  # the registered task name, or a Task subclass's import path
    module: str | None = None  # a module whose import registers the task (a task of your own)


# --- the root ------------------------------------------------------------------------------


@dataclass
class KineticConfig:
    """The root of a composed config (configs/config.yaml puts it first in its defaults list).

    Typed here: the run's own groups `train`, `monitor` and `logging`. The `task` group is typed
    by the chosen task's schema (registered with the task; `kinetic.configure` applies it, and
    a preset may list `/schema/task@task: <name>` to apply it at composition). The groups a task
    reads (`env`, `model`, `loss`, `data`, ...) are the task's: typed by the schemas it
    registered, checked by its `validate`. `optim`: each optimizer class validates its
    arguments, as torch.optim's do. A group that a task does not use stays missing (`"env" in
    cfg` is False for task=ddpm).
    """

    task: Any = MISSING
    optim: Any = MISSING
    env: Any = MISSING
    model: Any = MISSING
    loss: Any = MISSING
    data: Any = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0  # seeds the model's initialisation and every stream of the run
    threads: int = 1  # CPU intra-op threads: 1 is fastest for small models on a 2-core machine
    resume: str | None = None  # auto (the run directory's latest checkpoint) or a checkpoint path
    overwrite: bool = False  # replace the run that the run directory already holds
    debug: bool = False  # a refused input shows its full traceback too
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass and loss
    compile: bool = False  # torch.compile the policy / the UNet (with channels_last)


def register_schemas() -> None:
    """Store the root schema in Hydra's ConfigStore as `kinetic_schema` (configs/config.yaml
    lists it first), and the `kinetic.min` resolver presets use for values bounded by others
    (`warmup_steps: ${kinetic.min:200,${train.steps}}`: a 200-step warm-up, cut to a shorter
    run's length). Runs when kinetic is imported, before any composition; each task stores its
    own schema when it registers."""
    ConfigStore.instance().store(name="kinetic_schema", node=KineticConfig)
    if not OmegaConf.has_resolver("kinetic.min"):
        OmegaConf.register_new_resolver("kinetic.min", lambda *values: min(values))


register_schemas()
