"""build_optimizer: names to optimizers, config keys to constructor arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from optim import OPTIMIZERS, VRAdam, build_optimizer
from optim.validation import ConfigError


def _params():
    return [torch.nn.Parameter(torch.ones(3))]


def test_builds_vradam_from_omegaconf():
    cfg = OmegaConf.create({"name": "vradam", "lr": 3e-3, "betas": [0.8, 0.99], "beta3": 0.1})
    opt = build_optimizer(cfg, _params())
    assert isinstance(opt, VRAdam)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["beta3"]) == (3e-3, (0.8, 0.99), 0.1)


def test_builds_adamw_with_param_groups():
    params = _params()
    extra = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer(
        {"name": "adamw", "lr": 1e-3}, [{"params": params}, {"params": [extra], "lr": 0.1}]
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 0.1]


def test_unknown_name_lists_the_available_ones():
    names = ", ".join(sorted(OPTIMIZERS))
    message = f"Unknown optimizer: 'adam'; available: {names}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_optimizer({"name": "adam"}, _params())
    assert "vradam" in names and "adamw" in names


def test_unknown_argument_names_the_optimizer_and_its_valid_keys():
    message = (
        "Unknown key for optimizer 'vradam': learning_rate; valid keys: lr, betas, beta3, "
        "lr_cutoff, eps, weight_decay, norm, norm_source, velocity, norm_timing, maximize, impl"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_optimizer({"name": "vradam", "learning_rate": 1e-3}, _params())
    # A factory taking **kwargs decides for itself (AdamW passes its extras to torch's).
    with pytest.raises(ConfigError, match=r"^Invalid argument for optimizer 'adamw': .*'foo'"):
        build_optimizer({"name": "adamw", "foo": 1}, _params())


def test_invalid_value_is_the_optimizers_own_error():
    """The optimizer's own check, with the config node named by `build_optimizer`; built
    directly, the same words without it."""
    with pytest.raises(ConfigError, match=r"^optim=vradam: Invalid lr: -1; expected a float > 0$"):
        build_optimizer({"name": "vradam", "lr": -1.0}, _params())
    with pytest.raises(ConfigError, match=r"^Invalid lr: -1; expected a float > 0$"):
        VRAdam(_params(), lr=-1.0)


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "optim"


def _composed(name: str, task: dict | None = None):
    """configs/optim/<name>.yaml under a root config, as Hydra composes it, resolved."""
    root = OmegaConf.create({"task": task or {}, "optim": OmegaConf.load(CONFIGS / f"{name}.yaml")})
    return OmegaConf.to_container(root, resolve=True)["optim"]


def test_every_optimizer_has_a_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_builds_from_its_config_and_steps(name):
    """Param groups as the GFlowNet task builds them: an extra beta3 key, log Z's own lr, and
    log Z a 0-dim float32 tensor (a 0-dim float64 bias correction must not promote it)."""
    cfg = _composed(name)
    assert cfg["name"] == name
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    log_z = torch.nn.Parameter(torch.zeros(()))
    groups = [{"params": list(net.parameters())}, {"params": [log_z], "lr": 0.1, "beta3": 0.0}]
    opt = build_optimizer(cfg, groups)
    assert isinstance(opt, OPTIMIZERS[name])
    assert opt.param_groups[1]["lr"] == 0.1
    before = [p.detach().clone() for p in [*net.parameters(), log_z]]
    for _ in range(2):
        opt.zero_grad()
        (net(torch.ones(2, 3)).sum() + log_z.sum()).backward()
        opt.step()
    after = [*net.parameters(), log_z]
    assert all(torch.isfinite(p).all() for p in after)
    assert all(p.dtype == torch.float32 for p in after)
    assert not torch.equal(before[-1], log_z.detach())


@pytest.mark.parametrize("name", ["adamp", "sgdp", "adahb_sgd", "adahb_adam", "kadam", "vradam"])
def test_task_presets_reach_the_config(name):
    cfg = _composed(name, {name: {"lr": 0.125}})
    assert cfg["lr"] == 0.125


def test_vradam_velocity_preset():
    assert _composed("vradam")["velocity"] == "sum"
    cfg = _composed("vradam", {"vradam": {"velocity": "precond"}})
    assert build_optimizer(cfg, _params()).velocity == "precond"


def test_every_name_is_listed_when_one_is_unknown():
    message = (
        "Unknown optimizer: 'adam'; available: "
        "adahb_adam, adahb_sgd, adamp, adamw, kadam, sgdp, vradam"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_optimizer({"name": "adam"}, _params())


BAD_VALUES = [
    ("lr", "abc", "Invalid lr: 'abc'; expected a float > 0"),
    ("lr", 0, "Invalid lr: 0; expected a float > 0"),
    ("lr", True, "Invalid lr: True; expected a float > 0"),
    ("weight_decay", float("nan"), "Invalid weight_decay: nan; expected a float >= 0"),
    ("betas", [0.9], "Invalid betas: [0.9]; expected a pair [beta1, beta2] of floats in [0, 1)"),
    ("betas", 0.9, "Invalid betas: 0.9; expected a pair [beta1, beta2] of floats in [0, 1)"),
    ("betas", [0.9, "x"], "Invalid betas[1]: 'x'; expected a float in [0, 1)"),
    ("eps", "1e-8x", "Invalid eps: '1e-8x'; expected a float > 0"),
    ("nesterov", "yes", "Invalid nesterov: 'yes'; expected true or false"),
]


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        (name, *case)
        for name in sorted(OPTIMIZERS)
        for case in BAD_VALUES
        if case[0] in _composed(name)  # a key its config lacks is not its hyperparameter
    ],
)
def test_every_optimizer_refuses_a_bad_value_with_the_shared_message(name, key, value, message):
    """Built from its own config with one value replaced, as `optim.<key>=<value>` does (a list
    arrives as OmegaConf's ListConfig)."""
    cfg = _composed(name)
    cfg[key] = OmegaConf.create({"v": value})["v"]
    with pytest.raises(ConfigError, match=f"^{re.escape(f'optim={name}: {message}')}$"):
        build_optimizer(cfg, _params())


def test_adamw_keeps_torchs_tensor_lr():
    lr = torch.tensor(1e-3)
    assert build_optimizer({"name": "adamw", "lr": lr}, _params()).param_groups[0]["lr"] is lr
