"""Sampling: shapes, range, seeding, and the sampler names."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel

from diffusion import sampling
from diffusion.config import SAMPLERS
from diffusion.sampling import build_sampler, image_grid, null_label, sample_images, save_grid

KINDS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False,
    )  # fmt: skip


@pytest.mark.parametrize(("name", "steps"), [("ddim", 5), ("ddpm", 10), ("dpmsolver++", 6)])
def test_samples_have_the_right_shape_range_and_seed(unet, name, steps):
    train = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    sampler = build_sampler(name, train, steps)
    assert type(sampler) is KINDS[name]
    assert sampler.config.beta_schedule == "squaredcos_cap_v2"  # the training schedule
    assert len(sampler.timesteps) == steps and int(sampler.timesteps[0]) == 99  # trailing
    first = sample_images(unet, sampler, 7, torch.Generator().manual_seed(0), batch_size=4)
    again = sample_images(unet, sampler, 7, torch.Generator().manual_seed(0), batch_size=4)
    assert first.shape == (7, 1, 8, 8)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert torch.equal(first, again)
    assert unet.training  # restored


def test_unknown_sampler_and_bad_steps():
    train = DDPMScheduler(num_train_timesteps=100)
    message = "Unknown task.sampling.scheduler: 'euler'; valid: ddpm, ddim, dpmsolver++"
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


def test_the_sampler_names_are_the_configs():
    assert tuple(sampling._SCHEDULERS) == SAMPLERS


def test_dpm_solver_is_dpm_solver_plus_plus_and_clips_like_the_others():
    sampler = build_sampler("dpmsolver++", DDPMScheduler(num_train_timesteps=100), 5)
    assert sampler.config.algorithm_type == "dpmsolver++" and sampler.config.solver_order == 2
    assert sampler.config.thresholding and sampler.config.sample_max_value == 1.0
    unclipped = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    assert not build_sampler("dpmsolver++", unclipped, 5).config.thresholding


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_clipping_by_thresholding_draws_what_clip_sample_draws(unet, name):
    """DDPM and DDIM clip predicted x_0 to [-1, 1] (`clip_sample`, on by default); the samplers
    do it by thresholding capped at 1, which must draw the very same images."""
    train = DDPMScheduler(num_train_timesteps=100)
    ours = sample_images(unet, build_sampler(name, train, 5), 6, torch.Generator().manual_seed(0))
    plain = KINDS[name].from_config(train.config, timestep_spacing="trailing")
    plain.set_timesteps(5)
    assert plain.config.clip_sample and not plain.config.thresholding
    theirs = sample_images(unet, plain, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    unclipped = KINDS[name].from_config(
        train.config, timestep_spacing="trailing", clip_sample=False
    )
    unclipped.set_timesteps(5)
    loose = sample_images(unet, unclipped, 6, torch.Generator().manual_seed(0))
    assert not torch.allclose(loose, ours)  # the clipping acts on this untrained UNet


@pytest.fixture(scope="module")
def conditional_unet():
    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, add_attention=False,
        num_class_embeds=11,
    )  # fmt: skip


def _guided_reference(model, scheduler, n, seed, labels, scale):
    """Classifier-free guidance written out: two separate passes per step, combined as
    ε_u + w (ε_c − ε_u) (diffusers' convention; w = 1 is the conditional model)."""
    generator = torch.Generator(labels.device).manual_seed(seed)
    x = torch.randn((n, 1, 8, 8), generator=generator, device=labels.device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            conditional = model(x, t, class_labels=labels).sample
            free = model(x, t, class_labels=torch.full_like(labels, 10)).sample
            epsilon = free + scale * (conditional - free)
            x = scheduler.step(epsilon, t, x, generator=generator).prev_sample
    return x.clamp(-1, 1)


@pytest.mark.parametrize(("name", "scale"), [("ddpm", 3.0), ("ddpm", 1.0), ("ddim", 0.0)])
def test_classifier_free_guidance_matches_two_separate_passes(
    conditional_unet, name, scale, device
):
    model = copy.deepcopy(conditional_unet).to(device).eval()
    labels = torch.tensor([0, 3, 9, 3, 5], device=device)
    assert null_label(model) == 10
    sampler = build_sampler(name, DDPMScheduler(num_train_timesteps=100), 4)
    ours = sample_images(
        model, sampler, 5, torch.Generator(device).manual_seed(2), class_labels=labels,
        guidance_scale=scale,
    )  # fmt: skip
    sampler = build_sampler(name, DDPMScheduler(num_train_timesteps=100), 4)
    expected = _guided_reference(model, sampler, 5, 2, labels, scale)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    different = sample_images(
        model, sampler, 5, torch.Generator(device).manual_seed(2), class_labels=labels.flip(0),
        guidance_scale=scale,
    )  # fmt: skip
    assert scale == 0.0 or not torch.allclose(different, ours)  # the labels matter


def test_guidance_and_labels_are_checked(conditional_unet, unet):
    sampler = build_sampler("ddim", DDPMScheduler(num_train_timesteps=100), 2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=re.escape("Invalid guidance scale: -1.0; expected")):
        sample_images(conditional_unet, sampler, 2, g, class_labels=torch.zeros(2, dtype=int),
                      guidance_scale=-1.0)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("Expected class_labels of shape (3,)")):
        sample_images(conditional_unet, sampler, 3, g, class_labels=torch.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"^This UNet is unconditional: it takes no class labels$"):
        null_label(unet)


@pytest.mark.parametrize("name", SAMPLERS)
def test_sampling_runs_on_the_model_device_and_is_seeded(unet, name, device):
    model = copy.deepcopy(unet).to(device)
    sampler = build_sampler(name, DDPMScheduler(num_train_timesteps=100), 4)
    first = sample_images(model, sampler, 5, torch.Generator(device).manual_seed(0), batch_size=3)
    again = sample_images(model, sampler, 5, torch.Generator(device).manual_seed(0), batch_size=3)
    assert first.device.type == device.type and first.shape == (5, 1, 8, 8)
    assert first.min() >= -1.0 and first.max() <= 1.0
    assert torch.equal(first, again)
