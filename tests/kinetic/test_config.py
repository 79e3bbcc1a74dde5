"""The schemas of kinetic/config.py as Hydra composes them: one source of defaults and types."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from diffusion.config import DataConfig, DDPMTaskConfig
from gfn.config import GFlowNetTaskConfig
from kinetic.config import LoggingConfig, TrainConfig
from kinetic.stability.monitors import MonitorConfig

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_presets_are_the_schema_defaults():
    cfg = _compose()
    assert OmegaConf.to_object(cfg.train) == TrainConfig()
    assert OmegaConf.to_object(cfg.logging) == LoggingConfig()
    assert OmegaConf.to_object(cfg.monitor) == MonitorConfig()
    assert MonitorConfig.from_dict(cfg.monitor) == MonitorConfig() == MonitorConfig().validate()
    task = OmegaConf.to_object(cfg.task)
    assert isinstance(task, GFlowNetTaskConfig)
    assert (task.batch_size, task.log_z_beta3, task.vradam["lr"]) == (16, 0.0, 5e-3)
    assert "data" not in cfg and "env" in cfg  # a group the task does not use stays missing
    assert cfg.optim.lr == 5e-3 and cfg.optim.beta3 == 0.03  # the task's VRAdam preset


def test_ddpm_preset_is_typed_by_its_schema():
    cfg = _compose("task=ddpm", "task.cache_dir=/tmp/unused")
    assert isinstance(OmegaConf.to_object(cfg.task), DDPMTaskConfig)
    assert OmegaConf.to_object(cfg.data) == DataConfig()  # data=digits: every default
    assert cfg.train.steps == 3000 and cfg.train.warmup_steps == 200 and cfg.threads == 2
    assert "env" not in cfg
    off = _compose("monitor=off").monitor
    assert (off.every, off.sharpness.every, off.nonfinite.enabled) == (0, 0, False)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("task.bacth_size=2", "Key 'bacth_size' not in 'GFlowNetTaskConfig'"),
        ("monitor.nonfinite.enabled=maybe", "Value 'maybe' is not a valid bool"),
        ("seed=x", "Value 'x' of type 'str' could not be converted to Integer"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_composition(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        _compose(override)
    assert message in str(info.value.__cause__)


def test_env_stays_open_for_an_environment_class_own_keys():
    cfg = _compose("~env", "+env._target_=my_envs.Subsets", "+env.n_items=4")
    assert OmegaConf.to_container(cfg.env) == {"_target_": "my_envs.Subsets", "n_items": 4}
