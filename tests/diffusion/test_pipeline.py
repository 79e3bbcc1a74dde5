"""A DDPM task's export is a diffusers pipeline: `DDPMPipeline.from_pretrained` loads it in a
Python that imports nothing of this project, with the EMA weights, and draws the images that
`diffusion.sampling` draws for the same generator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion.pipeline import find_pipeline, load_pipeline
from diffusion.sampling import build_sampler, sample_images
from diffusion.task import DDPMTask
from kinetic.errors import ConfigError

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
PROJECT = ("kinetic", "diffusion", "gfn", "envs", "optim")

# Run in a fresh interpreter outside the repository: load the pipeline with diffusers alone,
# save its UNet weights and the images it draws, and list any module of this project imported.
LOAD = """
import sys, numpy as np, torch
from diffusers import DDPMPipeline
folder, out = sys.argv[1], sys.argv[2]
pipeline = DDPMPipeline.from_pretrained(folder)
pipeline.set_progress_bar_config(disable=True)
images = pipeline(
    batch_size=5, generator=torch.Generator().manual_seed(7), num_inference_steps=6,
    output_type="np",
).images
torch.save(pipeline.unet.state_dict(), out + "/unet.pt")
np.save(out + "/images.npy", images)
print(",".join(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(",")))))
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory, classifier_cache):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(
            "config",
            ["task=ddpm", "model=unet_tiny", "data.heldout_size=300", "task.quality=false",
             f"task.cache_dir={classifier_cache}"],
        )  # fmt: skip
    torch.manual_seed(0)
    task = DDPMTask.from_config(cfg, tmp_path_factory.mktemp("run"))
    optimizer = torch.optim.Adam(task.param_groups(), lr=1e-2)
    for step in range(1, 4):  # a few steps, so the EMA weights differ from the training ones
        loss, _ = task.loss(step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        task.after_step(step)
    return task


def test_the_exported_pipeline_loads_in_plain_diffusers_with_the_ema_weights_and_images(
    task, tmp_path
):
    folder = tmp_path / "pipeline"
    folder.mkdir()
    task.export(folder)
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder), str(tmp_path), ",".join(PROJECT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""  # not one module of this project was imported

    # The weights are the EMA's shadow parameters, in the order of the UNet's parameters.
    loaded = torch.load(tmp_path / "unet.pt", weights_only=True)
    names = [name for name, _ in task.model.named_parameters()]
    assert len(names) == len(task.ema.shadow_params)
    for name, shadow in zip(names, task.ema.shadow_params, strict=True):
        assert torch.equal(loaded[name], shadow), name
    assert not torch.equal(loaded["conv_in.weight"], task.model.conv_in.weight.detach())

    # The same images as kinetic's sampler (DDPM, 6 steps, trailing) for the same generator.
    sampler = build_sampler("ddpm", task.noise_scheduler, 6)
    with task._ema_weights():
        ours = sample_images(task.model, sampler, 5, torch.Generator().manual_seed(7))
    theirs = np.load(tmp_path / "images.npy")  # (5, 8, 8, 1) in [0, 1]
    expected = ((ours + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(theirs, expected, atol=1e-6)
    assert theirs.std() > 0.05  # images, not a constant


def test_a_conditional_export_keeps_its_class_embeddings(classifier_cache, tmp_path):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(
            "config",
            ["task=ddpm", "model=unet_tiny", "data.heldout_size=300", "task.quality=false",
             "task.conditional=true", f"task.cache_dir={classifier_cache}"],
        )  # fmt: skip
    task = DDPMTask.from_config(cfg, None)
    task.export(tmp_path)
    pipeline = load_pipeline(tmp_path)
    assert pipeline.unet.config.num_class_embeds == 11  # ten digits and "no class"
    assert torch.equal(
        pipeline.unet.class_embedding.weight, task.ema_unet_state()["class_embedding.weight"]
    )


def test_find_pipeline_prefers_the_final_one_then_the_newest_checkpoints(tmp_path):
    def fake(folder: Path) -> Path:
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"unet": [], "scheduler": []}))
        return folder

    older = fake(tmp_path / "checkpoints" / "pipeline_0000900")
    newer = fake(tmp_path / "checkpoints" / "pipeline_0001000")
    assert older.name < newer.name and find_pipeline(tmp_path) == newer
    final = fake(tmp_path / "pipeline")
    assert find_pipeline(tmp_path) == final
    assert find_pipeline(newer) == newer


def test_a_folder_that_is_not_a_ddpm_pipeline_is_refused_in_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"vae": ["diffusers", "AutoencoderKL"]}))
    message = (
        f"{tmp_path} is a diffusers pipeline without a unet and a scheduler; pass a DDPM "
        "pipeline folder (<run_dir>/pipeline)"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                    "scheduler": ["diffusers", "DDPMScheduler"]})
    )  # fmt: skip
    with pytest.raises(ConfigError, match=f"^The pipeline in {re.escape(str(tmp_path))} cannot"):
        load_pipeline(tmp_path)
