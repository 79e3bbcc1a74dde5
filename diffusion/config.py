"""The DDPM task's config: its schemas (task and data), its checks, and its registration.

Importing this module registers `task=ddpm` with the core (`kinetic.register_task`) without
importing diffusers; the task itself (`diffusion.task.DDPMTask`) is imported when a DDPM run is
built. The names the checks accept (datasets, samplers, schedules) are defined here and used by
the modules that implement them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kinetic.config import TaskSchema
from kinetic.errors import ConfigError
from kinetic.registry import register_task
from kinetic.validate import check_choice, check_float, check_int, check_probability

__all__ = [
    "DATASETS",
    "DEFAULT_STEPS",
    "IMAGE_SUFFIXES",
    "LR_SCHEDULES",
    "PIPELINE_DIR",
    "SAMPLERS",
    "DDPMTaskConfig",
    "DataConfig",
    "EMAConfig",
    "SamplingConfig",
    "validate",
    "validate_image_folder",
]

DATASETS = ("digits", "folder")
# A run's diffusers pipeline (DDPMTask's export): <run_dir>/pipeline/ and, beside each kept
# checkpoint, checkpoints/pipeline_<step>/.
PIPELINE_DIR = "pipeline"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")  # diffusion.sampling.build_sampler's
# Steps per sampler when none are asked for (sample.py): DDPM's whole chain, and the step
# counts at which DDIM and DPM-Solver++ are usually run.
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmsolver++": 25}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")  # diffusers' DDPMScheduler's
# diffusers get_scheduler names that need only warm-up and total steps.
LR_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")
DIGITS_COUNT = 1797  # scikit-learn's bundled 8x8 digits


@dataclass
class EMAConfig:
    """`task.ema`: diffusers' EMAModel, whose weights are sampled and saved. The one place of
    these defaults: `DDPMTask` builds its default EMA from them too."""

    decay: float = 0.999  # the largest decay
    use_ema_warmup: bool = True  # decay = 1 - (1 + step / inv_gamma)^-power, capped at `decay`
    inv_gamma: float = 1.0
    power: float = 0.75


@dataclass
class SamplingConfig:
    """`task.sampling`: the evaluation sampler."""

    scheduler: str = "ddpm"  # ddpm | ddim | dpmsolver++
    steps: int = 50  # sampler steps, in [1, num_train_timesteps]
    grid_samples: int = 64  # samples shown in the grid (TensorBoard and samples/*.png)
    # task.conditional: the classifier-free guidance scales evaluated (1 = the conditional
    # model alone); the quality metrics are those of the first.
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 3.0])


@dataclass
class DDPMTaskConfig(TaskSchema):
    """The `task` group for task=ddpm (`DDPMTask.from_config`)."""

    name: str = "ddpm"
    batch_size: int = 128  # images per step
    num_train_timesteps: int = 1000  # T of the forward process
    beta_schedule: str = "squaredcos_cap_v2"  # cosine (arXiv 2102.09672); linear | scaled_linear
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    quality: bool = True  # digits only: classifier FD, confidence, class entropy per evaluation
    # Class-conditional DDPM with classifier-free guidance (arXiv 2207.12598), digits only:
    # the UNet learns the class embeddings plus a "no class" one, which replaces the label of
    # a `label_dropout` share of the training images.
    conditional: bool = False
    label_dropout: float = 0.1
    cache_dir: str = ".cache/kinetic"  # the quality classifier, trained once


@dataclass
class DataConfig:
    """The `data` group (diffusion/data.py)."""

    name: str = "digits"  # digits (scikit-learn's 8x8, no download) | folder
    path: str | None = None  # data=folder: the image folder (searched recursively)
    resolution: int = 8  # pixels per side fed to the UNet
    channels: int = 1  # 1 = grayscale, 3 = RGB
    heldout_size: int = 400  # digits: two disjoint held-out sets of this size (FD reference
    # and real-vs-real floor); the rest trains the DDPM and the quality classifier


def _validate_task(node: Mapping[str, Any]) -> None:
    """`task`: batch, noise schedule, EMA, evaluation sampler (types are the schema's)."""
    check_int("task.batch_size", node["batch_size"], 1)
    timesteps = check_int("task.num_train_timesteps", node["num_train_timesteps"], 1)
    check_choice("task.beta_schedule", node["beta_schedule"], BETA_SCHEDULES)
    ema = node["ema"]
    check_probability("task.ema.decay", ema["decay"])
    check_float("task.ema.inv_gamma", ema["inv_gamma"], 0.0, low_open=True)
    check_float("task.ema.power", ema["power"], 0.0, low_open=True)
    sampling = node["sampling"]
    check_choice("task.sampling.scheduler", sampling["scheduler"], SAMPLERS)
    check_int("task.sampling.steps", sampling["steps"], 1, timesteps)
    check_int("task.sampling.grid_samples", sampling["grid_samples"], 1)
    check_guidance_scales("task.sampling.guidance_scales", sampling["guidance_scales"])
    if node["conditional"]:
        check_float("task.label_dropout", node["label_dropout"], 0.0, 1.0, low_open=True,
                    high_open=True)  # fmt: skip


def check_guidance_scales(key: str, scales: Any) -> list[float]:
    """A non-empty list of classifier-free guidance scales, each a float >= 0."""
    if isinstance(scales, str) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ConfigError(f"Invalid {key}: {scales!r}; expected a non-empty list of floats >= 0")
    return [check_float(f"{key}[{i}]", w, 0.0) for i, w in enumerate(scales)]


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
    for _, _, filenames in os.walk(root):
        if any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in filenames):
            return root
    raise ConfigError(
        f"No images in data.path={path}; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
    )


def validate_data(node: Mapping[str, Any]) -> None:
    """`data`: the dataset, its resolution and channels (digits are 8x8 grayscale)."""
    name = check_choice("data.name", node["name"], DATASETS)
    check_int("data.resolution", node["resolution"], 1)
    channels = check_choice("data.channels", node["channels"], (1, 3))
    if name == "digits":
        if channels != 1:
            raise ConfigError(
                f"Invalid data.channels: {channels} for data=digits; the digits are grayscale, "
                "so data.channels must be 1 (3 channels need data=folder)"
            )
        check_int("data.heldout_size", node["heldout_size"], 1, (DIGITS_COUNT - 1) // 2)
    else:
        validate_image_folder(node["path"])


def validate_unet(node: Mapping[str, Any], resolution: int | None = None) -> None:
    """`model`: the UNet's levels (which must divide the data's `resolution` when given)."""
    check_choice("model.name", node.get("name"), ("unet",))
    channels = list(node.get("block_out_channels") or [])
    if not channels:
        raise ConfigError("Invalid model.block_out_channels: []; expected a list of ints >= 1")
    for i, width in enumerate(channels):
        check_int(f"model.block_out_channels[{i}]", width, 1)
    check_int("model.layers_per_block", node.get("layers_per_block", 1), 1)
    for key in ("down_block_types", "up_block_types"):
        blocks = list(node.get(key) or [])
        if len(blocks) != len(channels):
            raise ConfigError(
                f"Invalid model.{key}: {len(blocks)} blocks for {len(channels)} "
                "model.block_out_channels; expected one block per level"
            )
    groups = check_int("model.norm_num_groups", node.get("norm_num_groups", 32), 1)
    for width in channels:
        if width % groups:
            raise ConfigError(
                f"Invalid model.norm_num_groups: {groups}; it must divide every "
                f"model.block_out_channels ({', '.join(str(c) for c in channels)})"
            )
    if resolution is not None:
        check_unet_resolution(resolution, len(channels))


def check_unet_resolution(resolution: int, levels: int) -> None:
    """`data.resolution` survives the UNet's `levels - 1` downsamplings (checked before a run
    and by `diffusion.task.build_unet`)."""
    if resolution % 2 ** (levels - 1):
        raise ConfigError(
            f"Invalid data.resolution: {resolution}; the UNet downsamples {levels - 1} times, "
            f"so the resolution must be a multiple of {2 ** (levels - 1)}"
        )


def check_conditional(conditional: bool, data_name: str) -> None:
    """A class-conditional DDPM needs labelled images: the digits."""
    if conditional and data_name != "digits":
        raise ConfigError(
            f"task.conditional=true needs labelled images, and data={data_name} has no labels; "
            "use data=digits or task.conditional=false"
        )


def validate(cfg: Mapping[str, Any]) -> None:
    """The DDPM groups of a composed config: `task`, `data`, `model` (the UNet)."""
    _validate_task(cfg["task"])
    validate_data(cfg["data"])
    check_conditional(cfg["task"]["conditional"], cfg["data"]["name"])
    validate_unet(cfg.get("model") or {}, cfg["data"]["resolution"])


def run_name(cfg: Mapping[str, Any]) -> str:
    """`ddpm digits`: the task and its dataset."""
    return f"ddpm {cfg['data']['name']}"


register_task(
    "ddpm",
    "diffusion.task:DDPMTask",
    schema=DDPMTaskConfig,
    groups={"data": DataConfig, "model": None},
    validate=validate,
    identity=("data", "model"),  # task.conditional: DDPMTask.load_state_dict refuses it
    identity_ignore=("data.heldout_size",),
    hparams=("model", "data", "task.batch_size"),
    run_name=run_name,
    lr_schedules=LR_SCHEDULES,
    outputs=("samples", PIPELINE_DIR),
)
