"""Typed configs: the schema of each config group, the one source of its keys, types and defaults.

Each dataclass here is both what Python code passes (`train(task, opt, TrainConfig(steps=300))`)
and the schema Hydra checks the composed config against (`register_schemas`, called by
train.py): an unknown key or a wrong type fails at composition with Hydra's own message. The
YAML files in configs/ are presets on top of these defaults. Range checks go in each schema's
`validate()`, called where the config enters the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kinetic.stability.monitors import MonitorSchema
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


# --- tasks ---------------------------------------------------------------------------------


@dataclass
class ReplayConfig:
    """`task.replay` of task=gfn: the replay buffer (gfn/replay.py)."""

    capacity: int = 0  # trajectories kept; 0 = no replay
    fraction: float = 0.0  # share of each batch drawn from the replay buffer, in (0, 1)
    priority: str = "uniform"  # uniform | reward


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
class GFlowNetTaskConfig(OptimizerPresets):
    """The `task` group for task=gfn (`GFlowNetTask.from_config`)."""

    name: str = "gfn"
    batch_size: int = 16  # trajectories per step
    log_z_lr: float = 0.1  # log Z's own learning rate
    log_z_init: float = 0.0
    log_z_beta3: float | None = None  # VRAdam only: the velocity penalty of log Z's group
    epsilon: float = 0.0  # probability of a uniform exploratory action
    temperature: float = 1.0  # softmax temperature of the sampling policy
    eval_samples: int = 256  # policy samples per evaluation, for non-enumerable environments
    check_env: bool = True  # validate the environment (envs/checker.py) before training
    replay: ReplayConfig = field(default_factory=ReplayConfig)


@dataclass
class EMAConfig:
    """`task.ema` of task=ddpm: diffusers' EMAModel, whose weights are sampled and saved."""

    decay: float = 0.999  # the largest decay
    use_ema_warmup: bool = True  # decay = 1 - (1 + step / inv_gamma)^-power, capped at `decay`
    inv_gamma: float = 1.0
    power: float = 0.75


@dataclass
class SamplingConfig:
    """`task.sampling` of task=ddpm: the evaluation sampler."""

    scheduler: str = "ddpm"  # ddpm | ddim
    steps: int = 50  # sampler steps, in [1, num_train_timesteps]
    grid_samples: int = 64  # samples shown in the grid (TensorBoard and samples/*.png)


@dataclass
class DDPMTaskConfig(OptimizerPresets):
    """The `task` group for task=ddpm (`DDPMTask.from_config`)."""

    name: str = "ddpm"
    batch_size: int = 128  # images per step
    num_train_timesteps: int = 1000  # T of the forward process
    beta_schedule: str = "squaredcos_cap_v2"  # cosine (arXiv 2102.09672); linear | scaled_linear
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    quality: bool = True  # digits only: classifier FD, confidence, class entropy per evaluation
    cache_dir: str = ".cache/kinetic"  # the quality classifier, trained once


@dataclass
class DataConfig:
    """The `data` group of task=ddpm (diffusion/data.py)."""

    name: str = "digits"  # digits (scikit-learn's 8x8, no download) | folder
    path: str | None = None  # data=folder: the image folder (searched recursively)
    resolution: int = 8  # pixels per side fed to the UNet
    channels: int = 1  # 1 = grayscale, 3 = RGB
    heldout_size: int = 400  # digits: two disjoint held-out sets of this size (FD reference
    # and real-vs-real floor); the rest trains the DDPM and the quality classifier


# --- the root ------------------------------------------------------------------------------


@dataclass
class KineticConfig:
    """The root of a composed config (configs/config.yaml puts it first in its defaults list).

    Typed groups: `train`, `monitor`, `logging`, `data`, and `task` (typed by the chosen task's
    own schema, `schema/task/<name>` in Hydra's ConfigStore, which its YAML preset lists in its
    defaults). Open groups (`Any`): `env` (an environment class's own arguments beside
    `_target_`; the class validates them when it is built), `model` (the network's arguments),
    `loss` (the loss's arguments) and `optim` (each optimizer class validates its arguments,
    as torch.optim's do, and a third-party optimizer brings its own). A group that a task does
    not use stays missing (`"env" in cfg` is False for task=ddpm).
    """

    task: Any = MISSING
    optim: Any = MISSING
    env: Any = MISSING
    model: Any = MISSING
    loss: Any = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorSchema = field(default_factory=MonitorSchema)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0  # seeds the model's initialisation and every stream of the run
    threads: int = 1  # CPU intra-op threads: 1 is fastest for small models on a 2-core machine
    resume: str | None = None  # auto (the run directory's latest checkpoint) or a checkpoint path
    overwrite: bool = False  # replace the run that the run directory already holds
    debug: bool = False  # a refused input shows its full traceback too
    device: str = "auto"  # auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the forward pass and loss
    compile: bool = False  # torch.compile the policy / the UNet (with channels_last)


# Task schemas by task name; `register_schemas` stores them as `schema/task/<name>`.
TASK_SCHEMAS: dict[str, type] = {"gfn": GFlowNetTaskConfig, "ddpm": DDPMTaskConfig}


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore: the root as `kinetic_schema`, each task's as
    `schema/task/<name>`. Runs when kinetic is imported, before any composition."""
    store = ConfigStore.instance()
    store.store(name="kinetic_schema", node=KineticConfig)
    for name, schema in TASK_SCHEMAS.items():
        store.store(group="schema/task", name=name, node=schema)


register_schemas()
