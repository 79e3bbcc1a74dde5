"""Sampling: shapes, range, seeding, and the sampler names."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusion.sampling import build_sampler, image_grid, sample_images, save_grid


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "steps"), [("ddim", 5), ("ddpm", 10)])
def test_samples_have_the_right_shape_range_and_seed(unet, name, steps):
    train = DDPMScheduler(num_train_timesteps=100)
    sampler = build_sampler(name, train, steps)
    assert isinstance(sampler, DDIMScheduler if name == "ddim" else DDPMScheduler)
    assert len(sampler.timesteps) == steps
    first = sample_images(unet, sampler, 7, torch.Generator().manual_seed(0), batch_size=4)
    again = sample_images(unet, sampler, 7, torch.Generator().manual_seed(0), batch_size=4)
    assert first.shape == (7, 1, 8, 8)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert torch.equal(first, again)
    assert unet.training  # restored


def test_unknown_sampler_and_bad_steps():
    train = DDPMScheduler(num_train_timesteps=100)
    message = "Unknown task.sampling.scheduler: 'euler'; valid: ddpm, ddim"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_sampler("euler", train, 10)
    with pytest.raises(
        ValueError,
        match=f"^{re.escape('Invalid task.sampling.steps: 101; expected an int in [1, 100]')}$",
    ):
        build_sampler("ddim", train, 101)


def test_grid_layout_and_png(tmp_path):
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 2, 2)
    grid = image_grid(images, nrow=3, pad=1, scale=1)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1, 3)
    assert grid.min() >= 0 and grid.max() <= 1
    assert np.allclose(grid[1:3, 1:3], 0.0) and np.allclose(grid[4:6, 4:6], 1.0)
    path = save_grid(tmp_path / "g.png", grid)
    assert path.is_file()


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_sampling_runs_on_the_model_device_and_is_seeded(unet, name, device):
    model = copy.deepcopy(unet).to(device)
    sampler = build_sampler(name, DDPMScheduler(num_train_timesteps=100), 4)
    first = sample_images(model, sampler, 5, torch.Generator(device).manual_seed(0), batch_size=3)
    again = sample_images(model, sampler, 5, torch.Generator(device).manual_seed(0), batch_size=3)
    assert first.device.type == device.type and first.shape == (5, 1, 8, 8)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert torch.equal(first, again)
