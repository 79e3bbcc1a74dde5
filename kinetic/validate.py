"""Range checks for every documented config key, run before a run does any work.

Each `check_*` function validates one value and returns it; each `validate_*` function checks a
config group (a mapping: an OmegaConf node, a dict, or a schema dataclass as `asdict`). Every
failure is a `ConfigError` whose message names the key, the value and what is valid, e.g.
``Invalid train.steps: 0; expected an int >= 1``. `validate_config` runs every group that a
composed root config holds; the typed schemas call the group functions from their `validate()`.

What is validated elsewhere, by its owner: the `task` group of a task other than gfn and ddpm
(its `from_config`), optimizer hyperparameters (each optimizer's
constructor, refused through `kinetic.errors.refused_arguments`), the `monitor` group
(`MonitorConfig.from_dict`), environment arguments (the environment's constructor and
`check_env`), UNet arguments (diffusers' `UNet2DModel`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kinetic.errors import ConfigError

__all__ = [
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "check_probability",
    "check_run_keys",
    "validate_config",
    "validate_data",
    "validate_ddpm_task",
    "validate_gfn_task",
    "validate_image_folder",
    "validate_loss",
    "validate_model",
    "validate_train",
]

# The valid choices come from the modules that implement them (imported where a group is
# checked, so that validating a GFlowNet run does not import diffusers).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' DDPMScheduler's
DIGITS_COUNT = 1797  # scikit-learn's bundled 8x8 digits


def _interval(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    """`in [low, high)`, `>= low`, ... (ints as they are, floats in %g)."""
    show = (lambda v: str(v)) if isinstance(low, int) or isinstance(high, int) else "{:g}".format
    if low is not None and high is not None:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        return f"in {left}{show(low)}, {show(high)}{right}"
    if low is not None:
        return f"{'>' if low_open else '>='} {show(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {show(high)}"
    return "finite"


def check_int(key: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """`value` as an int in [low, high] (either bound may be None); bools are refused."""
    expected = f"expected an int {_interval(low, high, False, False)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"Invalid {key}: {value!r}; {expected}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"Invalid {key}: {value}; {expected}")
    return value


def check_float(
    key: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite float within the bounds (open or closed); NaN and inf are refused
    unless a bound is infinite (`high=math.inf, high_open=False` accepts inf)."""
    expected = f"expected a float {_interval(low, high, low_open, high_open)}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"Invalid {key}: {value!r}; {expected}")
    value = float(value)
    inside = not math.isnan(value)
    if inside and low is not None:
        inside = value > low if low_open else value >= low
    if inside and high is not None:
        inside = value < high if high_open else value <= high
    if inside and math.isinf(value) and not (high == math.inf and not high_open and value > 0):
        inside = False
    if not inside:
        raise ConfigError(f"Invalid {key}: {value:g}; {expected}")
    return value


def check_probability(key: str, value: Any, *, high_open: bool = False) -> float:
    """A probability in [0, 1] (or [0, 1) with `high_open`)."""
    return check_float(key, value, 0.0, 1.0, high_open=high_open)


def check_choice(key: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of `choices` (compared with ==)."""
    if value not in choices:
        raise ConfigError(f"Unknown {key}: {value!r}; valid: {', '.join(str(c) for c in choices)}")
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"Invalid {key}: {value!r}; expected true or false")
    return value


def _get(node: Mapping[str, Any] | None, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    return node.get(key, default)


# --- groups -------------------------------------------------------------------------------


def check_run_keys(cfg: Mapping[str, Any]) -> None:
    """The root keys: seed, threads, and the run-lifecycle keys resume, overwrite, debug."""
    check_int("seed", cfg.get("seed", 0), 0, 2**63 - 1)
    check_int("threads", cfg.get("threads", 1), 1)
    resume = cfg.get("resume")
    if resume is not None and (not isinstance(resume, str) or not resume):
        raise ConfigError(
            f"Invalid resume: {resume!r}; expected auto (the latest checkpoint of the run "
            "directory) or the path of a checkpoint file"
        )
    overwrite = check_bool("overwrite", cfg.get("overwrite", False))
    check_bool("debug", cfg.get("debug", False))
    if resume is not None and overwrite:
        raise ConfigError(
            f"resume={resume} and overwrite=true contradict each other: resume continues the "
            "run in the run directory, overwrite starts a new one there; pass one of them"
        )


def validate_train(node: Mapping[str, Any], lr_schedules: Sequence[str] | None) -> None:
    """`train`: steps, intervals (eval_every and checkpoint_every: 0 = never), clipping, the LR
    schedule (one of the task's `lr_schedules`; None: not checked here) and its warm-up,
    checkpointing."""
    steps = check_int("train.steps", _get(node, "steps"), 1)
    check_int("train.log_every", _get(node, "log_every"), 1)
    check_int("train.eval_every", _get(node, "eval_every"), 0)
    check_int("train.checkpoint_every", _get(node, "checkpoint_every", 0), 0)
    check_int("train.keep_checkpoints", _get(node, "keep_checkpoints", 1), 1)
    check_float("train.clip_grad_norm", _get(node, "clip_grad_norm", 0.0), 0.0)
    if lr_schedules is not None:
        check_choice("train.lr_schedule", _get(node, "lr_schedule"), lr_schedules)
    check_int("train.warmup_steps", _get(node, "warmup_steps", 0), 0, steps)


def validate_gfn_task(node: Mapping[str, Any]) -> None:
    """`task` of a GFlowNet run: batch, log Z, exploration, evaluation, replay."""
    from gfn.replay import PRIORITIES

    check_int("task.batch_size", _get(node, "batch_size"), 1)
    check_float("task.log_z_lr", _get(node, "log_z_lr", 0.1), 0.0)
    init = _get(node, "log_z_init", 0.0)  # NaN is allowed: it is how tests force a divergence
    if isinstance(init, bool) or not isinstance(init, int | float):
        raise ConfigError(f"Invalid task.log_z_init: {init!r}; expected a float")
    check_probability("task.epsilon", _get(node, "epsilon", 0.0))
    check_float("task.temperature", _get(node, "temperature", 1.0), 0.0, low_open=True)
    check_int("task.eval_samples", _get(node, "eval_samples", 1), 1)
    check_bool("task.check_env", _get(node, "check_env", True))
    beta3 = _get(node, "log_z_beta3")
    if beta3 is not None:
        check_float("task.log_z_beta3", beta3, 0.0)
    replay = _get(node, "replay") or {}
    capacity = check_int("task.replay.capacity", _get(replay, "capacity", 0), 0)
    fraction = check_probability(
        "task.replay.fraction", _get(replay, "fraction", 0.0), high_open=True
    )
    check_choice("task.replay.priority", _get(replay, "priority", "uniform"), PRIORITIES)
    if fraction > 0 and capacity == 0:
        raise ConfigError(
            f"task.replay.fraction={fraction:g} needs a replay buffer: set task.replay.capacity "
            "to the number of trajectories to keep (an int >= 1), or task.replay.fraction=0"
        )
    if capacity > 0 and fraction == 0:
        raise ConfigError(
            f"task.replay.capacity={capacity} keeps a buffer that no batch draws from: set "
            "task.replay.fraction in (0, 1), or task.replay.capacity=0"
        )


def validate_ddpm_task(node: Mapping[str, Any]) -> None:
    """`task` of a DDPM run: batch, noise schedule, EMA, evaluation sampler."""
    from diffusion.sampling import SAMPLERS

    check_int("task.batch_size", _get(node, "batch_size"), 1)
    timesteps = check_int("task.num_train_timesteps", _get(node, "num_train_timesteps"), 1)
    check_choice("task.beta_schedule", _get(node, "beta_schedule"), BETA_SCHEDULES)
    ema = _get(node, "ema") or {}
    check_probability("task.ema.decay", _get(ema, "decay", 0.9999))
    check_bool("task.ema.use_ema_warmup", _get(ema, "use_ema_warmup", False))
    check_float("task.ema.inv_gamma", _get(ema, "inv_gamma", 1.0), 0.0, low_open=True)
    check_float("task.ema.power", _get(ema, "power", 0.75), 0.0, low_open=True)
    sampling = _get(node, "sampling") or {}
    check_choice("task.sampling.scheduler", _get(sampling, "scheduler", "ddpm"), SAMPLERS)
    check_int("task.sampling.steps", _get(sampling, "steps", 1), 1, timesteps)
    check_int("task.sampling.grid_samples", _get(sampling, "grid_samples", 1), 1)
    check_bool("task.quality", _get(node, "quality", False))


def validate_image_folder(path: Any) -> Path:
    """`data.path` of `data=folder`: an existing, readable directory holding at least one
    PNG/JPEG file (whether each file decodes is checked when it is read)."""
    if path is None or path == "":
        raise ConfigError("data=folder needs data.path=DIR (a folder of PNG/JPEG images)")
    root = Path(str(path)).expanduser()
    if not root.exists():
        raise ConfigError(f"data.path={path} does not exist; expected a folder of PNG/JPEG images")
    if not root.is_dir():
        raise ConfigError(f"data.path={path} is not a directory (data=folder needs a folder)")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ConfigError(f"data.path={path} cannot be read (permission denied)")
    from diffusion.data import IMAGE_SUFFIXES

    for _, _, filenames in os.walk(root):
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in filenames):
            return root
    raise ConfigError(
        f"No images in data.path={path}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
    )


def validate_data(node: Mapping[str, Any]) -> None:
    """`data`: the dataset, its resolution and channels (digits are 8x8 grayscale)."""
    from diffusion.data import DATASETS

    name = check_choice("data.name", _get(node, "name"), DATASETS)
    check_int("data.resolution", _get(node, "resolution"), 1)
    channels = _get(node, "channels", 1)
    check_choice("data.channels", channels, (1, 3))
    if name == "digits":
        if channels != 1:
            raise ConfigError(
                f"Invalid data.channels: {channels} for data=digits; the digits are grayscale, "
                "so data.channels must be 1 (3 channels need data=folder)"
            )
        check_int("data.heldout_size", _get(node, "heldout_size"), 1, (DIGITS_COUNT - 1) // 2)
    else:
        validate_image_folder(_get(node, "path"))


def validate_model(node: Mapping[str, Any], resolution: int | None = None) -> None:
    """`model`: the MLP or GNN policy sizes, or the UNet's levels (which must divide the data's
    `resolution` when given)."""
    from gfn.policies import ACTIVATIONS, BACKWARD_POLICIES

    name = _get(node, "name")
    if name in ("mlp", "gnn"):
        check_int("model.hidden", _get(node, "hidden"), 1)
        check_int("model.n_layers", _get(node, "n_layers"), 1)
        check_choice("model.backward", _get(node, "backward", "learned"), BACKWARD_POLICIES)
        if name == "mlp":
            check_choice("model.activation", _get(node, "activation", "relu"), tuple(ACTIVATIONS))
        return
    if name != "unet":
        raise ConfigError(f"Unknown model.name: {name!r}; valid: mlp, gnn, unet")
    channels = list(_get(node, "block_out_channels") or [])
    if not channels:
        raise ConfigError("Invalid model.block_out_channels: []; expected a list of ints >= 1")
    for i, width in enumerate(channels):
        check_int(f"model.block_out_channels[{i}]", width, 1)
    check_int("model.layers_per_block", _get(node, "layers_per_block", 1), 1)
    for key in ("down_block_types", "up_block_types"):
        blocks = list(_get(node, key) or [])
        if len(blocks) != len(channels):
            raise ConfigError(
                f"Invalid model.{key}: {len(blocks)} blocks for {len(channels)} "
                "model.block_out_channels; expected one block per level"
            )
    groups = check_int("model.norm_num_groups", _get(node, "norm_num_groups", 32), 1)
    for width in channels:
        if width % groups:
            raise ConfigError(
                f"Invalid model.norm_num_groups: {groups}; it must divide every "
                f"model.block_out_channels ({', '.join(str(c) for c in channels)})"
            )
    if resolution is not None and resolution % 2 ** (len(channels) - 1):
        factor = 2 ** (len(channels) - 1)
        raise ConfigError(
            f"Invalid data.resolution: {resolution}; the UNet downsamples {len(channels) - 1} "
            f"times, so the resolution must be a multiple of {factor}"
        )


def validate_loss(node: Mapping[str, Any]) -> None:
    """`loss`: its name and sub-trajectory balance's lambda."""
    from gfn.losses import LOSSES

    name = check_choice("loss.name", _get(node, "name"), tuple(LOSSES))
    if name == "subtb":
        check_float("loss.lamda", _get(node, "lamda", 0.9), 0.0)


def _lr_schedules(task_name: Any) -> Sequence[str] | None:
    """The schedules a task other than the built-in ones takes: kinetic.schedule's, unless it
    defines its own `lr_schedule` (None: its own to check). Refuses a name that is neither
    registered nor an importable Task."""
    from kinetic.schedule import SCHEDULES
    from kinetic.task import Task, task_class

    try:
        cls = task_class(task_name)
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err
    return SCHEDULES if cls.lr_schedule is Task.lr_schedule else None


def validate_config(cfg: Mapping[str, Any]) -> None:
    """Every group of a composed root config that has a range check here (see the module
    docstring for the groups checked by their owners)."""
    check_run_keys(cfg)
    task = _get(cfg, "task") or {}
    name = _get(task, "name")
    if name not in ("gfn", "ddpm"):  # a registered task, or a Task's import path
        validate_train(_get(cfg, "train"), _lr_schedules(name))
    elif name == "gfn":
        from kinetic.schedule import SCHEDULES

        validate_gfn_task(task)
        validate_train(_get(cfg, "train"), SCHEDULES)
        validate_loss(_get(cfg, "loss") or {})
        validate_model(_get(cfg, "model") or {})
    else:
        from diffusion.task import LR_SCHEDULES

        validate_ddpm_task(task)
        validate_train(_get(cfg, "train"), LR_SCHEDULES)
        data = _get(cfg, "data") or {}
        validate_data(data)
        validate_model(_get(cfg, "model") or {}, _get(data, "resolution"))
    logging = _get(cfg, "logging")
    if logging is not None:
        check_bool("logging.progress", _get(logging, "progress", True))
        check_bool("logging.images", _get(logging, "images", True))
