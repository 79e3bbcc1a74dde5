"""The root keys `device`, `precision` and `compile`: what `from_config` builds with them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion.task import DDPMTask
from gfn.task import GFlowNetTask

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("config", list(overrides))


def test_the_root_defaults():
    cfg = _cfg()
    assert (cfg.device, cfg.precision, cfg.compile) == ("auto", "fp32", False)


def test_gfn_task_lives_on_the_configured_device(device):
    task = GFlowNetTask.from_config(_cfg("env.height=4", f"device={device.type}"))
    assert task.env.s0.device.type == device.type
    assert all(p.device.type == device.type for p in task.model.parameters())
    assert task.generator.device.type == device.type


def test_compile_compiles_the_policy_in_place_keeping_its_state_dict():
    eager = GFlowNetTask.from_config(_cfg("env.height=4", "device=cpu"))
    compiled = GFlowNetTask.from_config(_cfg("env.height=4", "device=cpu", "compile=true"))
    assert compiled.model.policy._compiled_call_impl is not None  # nn.Module.compile()
    assert eager.model.policy._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints load both ways


def test_ddpm_compile_trains_through_a_compiled_channels_last_unet(tmp_path):
    overrides = ["task=ddpm", "model=unet_tiny", "task.quality=false", "device=cpu"]
    task = DDPMTask.from_config(_cfg(*overrides, "compile=true"), tmp_path)
    compiled = task.train_module()  # what the loop passes to the loss (DDP-wrapped: torchrun)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled._orig_mod is task.model  # one module: one state dict, one EMA
    conv = next(p for p in task.model.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    eager = DDPMTask.from_config(_cfg(*overrides), tmp_path)
    assert eager.train_module() is eager.model and not eager.channels_last


def test_ddpm_data_model_and_ema_on_the_configured_device(tmp_path, device):
    overrides = ["task=ddpm", "model=unet_tiny", "task.quality=false", f"device={device.type}"]
    task = DDPMTask.from_config(_cfg(*overrides), tmp_path)
    assert task.data.train.device.type == device.type
    assert all(p.device.type == device.type for p in task.model.parameters())
    assert all(p.device.type == device.type for p in task.ema.shadow_params)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_from_config_rejects_a_missing_device():
    message = "device=cuda is not available on this machine; available: auto, cpu"
    if torch.backends.mps.is_available():
        message += ", mps"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GFlowNetTask.from_config(_cfg("device=cuda"))
