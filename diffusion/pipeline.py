"""A DDPM run as diffusers users expect it: a `DDPMPipeline` folder (`save_pretrained`) of the
EMA UNet and the noise schedule, which `diffusers.DDPMPipeline.from_pretrained(folder)` loads
anywhere, without kinetic.

A run writes `<run_dir>/pipeline/` after its last step and `checkpoints/pipeline_<step>/` beside
each kept checkpoint (`DDPMTask.export`). The scheduler saved is the training schedule with
"trailing" timestep spacing, so a pipeline called with fewer steps than training still starts
from pure noise, and with x_0 clipped by thresholding (`diffusion.sampling.sampling_options`),
which schedulers built from its config inherit.

A class-conditional UNet (`task.conditional=true`) is saved the same way. Its last class
embedding (`num_class_embeds - 1`) is the "no class" label of classifier-free guidance.
`DDPMPipeline.__call__` passes no labels, so it cannot sample such a UNet: load the pipeline's
`unet` and `scheduler` and pass `class_labels` (as `sample.py` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion.config import PIPELINE_DIR
from diffusion.sampling import sampling_options
from kinetic.checkpoint import Checkpoints
from kinetic.errors import ConfigError

__all__ = ["PIPELINE_DIR", "find_pipeline", "load_pipeline", "pipeline_scheduler", "save_pipeline"]

MODEL_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


def pipeline_scheduler(train_scheduler: DDPMScheduler) -> DDPMScheduler:
    """The scheduler a pipeline is saved with: the training schedule with the options of every
    sampler (`sampling_options`: trailing timesteps, x_0 clipped by thresholding), so that a
    scheduler built `from_config` of it (DDIM, DPM-Solver++) samples as `sample.py` does."""
    config = train_scheduler.config
    return DDPMScheduler.from_config(config, **sampling_options(config))


def save_pipeline(folder: str | Path, unet: UNet2DModel, scheduler: DDPMScheduler) -> Path:
    """`DDPMPipeline(unet, scheduler).save_pretrained(folder)` (safetensors weights); `unet`
    should be a CPU copy holding the weights to publish (the EMA weights of a run)."""
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def _newest_checkpoint_pipeline(run_dir: Path) -> Path | None:
    """The newest checkpoints/pipeline_<step>/ of a run that holds a pipeline, if any."""
    exports = Checkpoints(run_dir, export_name=PIPELINE_DIR).export_paths()  # oldest first
    return next((p for p in reversed(exports) if (p / MODEL_INDEX).is_file()), None)


def find_pipeline(path: str | Path) -> Path:
    """The pipeline folder `path` names: itself when it holds a model_index.json; for a run
    directory its final `pipeline/`, else the newest `checkpoints/pipeline_<step>/` (a run still
    going, or stopped). Anything else is refused (`ConfigError`) naming what to pass."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"No such pipeline folder or run directory: {path}")
    if (path / MODEL_INDEX).is_file():
        return path
    if (path / PIPELINE_DIR / MODEL_INDEX).is_file():
        return path / PIPELINE_DIR
    newest = _newest_checkpoint_pipeline(path) if path.is_dir() else None
    if newest is not None:
        return newest
    raise ConfigError(
        f"{path} is not a diffusers pipeline folder (no {MODEL_INDEX}) nor a DDPM run directory "
        f"holding one; pass <run_dir>/{PIPELINE_DIR} or the run directory of `train.py task=ddpm`"
    )


def load_pipeline(path: str | Path, device: torch.device | str = "cpu") -> DDPMPipeline:
    """The `DDPMPipeline` at `path` (a pipeline folder or a run directory: `find_pipeline`) on
    `device`; one whose folder diffusers cannot load is refused (`ConfigError`) in one line."""
    folder = find_pipeline(path)
    try:
        components = json.loads((folder / MODEL_INDEX).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / MODEL_INDEX} cannot be read: {err}") from err
    if not isinstance(components, dict) or not {"unet", "scheduler"} <= set(components):
        raise ConfigError(
            f"{folder} is a diffusers pipeline without a unet and a scheduler; pass a DDPM "
            "pipeline folder (<run_dir>/pipeline)"
        )
    try:
        # low_cpu_mem_usage=False: the default asks for accelerate, only to warn without it.
        pipeline = DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    except (OSError, ValueError, TypeError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"The pipeline in {folder} cannot be loaded: {first}") from err
    if not isinstance(pipeline.unet, UNet2DModel):
        kind = type(pipeline.unet).__name__
        raise ConfigError(f"The pipeline in {folder} holds a {kind}; sampling needs a UNet2DModel")
    return pipeline.to(device)
