"""Sampling from a trained ε-prediction UNet with the DDPM scheduler (arXiv 2006.11239) or the
fewer-step DDIM one (arXiv 2010.02502), and sample grids as images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from diffusion.config import SAMPLERS
from kinetic.validate import check_choice, check_int


def build_sampler(name: str, train_scheduler: DDPMScheduler, steps: int) -> SchedulerMixin:
    """A scheduler for sampling with the training noise schedule, set to `steps` steps: `ddpm`
    (ancestral; fewer steps than training respace the chain) or `ddim` (deterministic, eta = 0).

    Timesteps are spaced "trailing" (arXiv 2305.08891, Table 2), so the first step is t = T-1
    and sampling starts from pure noise whatever the step count.
    """
    check_choice("task.sampling.scheduler", name, SAMPLERS)
    check_int("task.sampling.steps", steps, 1, train_scheduler.config.num_train_timesteps)
    cls = DDPMScheduler if name == "ddpm" else DDIMScheduler
    scheduler = cls.from_config(train_scheduler.config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_images(
    model: UNet2DModel,
    scheduler: SchedulerMixin,
    n: int,
    generator: torch.Generator,
    batch_size: int = 500,
) -> Tensor:
    """`n` images (n, C, H, W) in [-1, 1] (clamped), drawn in chunks of `batch_size`.

    `scheduler` comes from `build_sampler` (its timesteps already set). Randomness comes only
    from `generator` (the initial noise, and DDPM's per-step noise), so a seed fixes the images.
    """
    config = model.config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        shape = (count, config.in_channels, height, width)
        x = torch.randn(shape, generator=generator, device=device)  # x_T ~ N(0, I)
        for t in scheduler.timesteps:
            epsilon = model(x, t).sample
            if isinstance(scheduler, DDPMScheduler):
                x = scheduler.step(epsilon, t, x, generator=generator).prev_sample
            else:
                x = scheduler.step(epsilon, t, x).prev_sample
        chunks.append(x.clamp(-1.0, 1.0))
    model.train(was_training)
    return torch.cat(chunks)


def image_grid(images: Tensor, nrow: int = 8, pad: int = 1, scale: int = 4) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled row by row into one RGB image (rows, cols, 3) in
    [0, 1], white gaps of `pad` pixels, each pixel repeated `scale` times so 8x8 stays legible."""
    images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    n, channels, height, width = images.shape
    if channels == 1:
        images = images.repeat(3, axis=1)
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    grid = np.ones((rows * (height + pad) + pad, ncol * (width + pad) + pad, 3), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = images[i].transpose(1, 2, 0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def save_grid(path: str | Path, grid: np.ndarray) -> Path:
    """Write an (H, W, 3) grid in [0, 1] as a PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(path)
    return path
