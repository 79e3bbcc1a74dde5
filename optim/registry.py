"""Optimizers by name: the one place every trainer builds its optimizer from a config."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch.optim import Optimizer

from optim.adahb import AdaHBAdam, AdaHBSGD
from optim.adamp import SGDP, AdamP
from optim.adamw import AdamW
from optim.kadam import KAdam
from optim.validation import ConfigError, keyword_parameters
from optim.vradam import VRAdam

__all__ = ["OPTIMIZERS", "build_optimizer", "register_optimizer"]

OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "vradam": VRAdam,
    "adamw": AdamW,
    "adamp": AdamP,
    "sgdp": SGDP,
    "adahb_sgd": AdaHBSGD,
    "adahb_adam": AdaHBAdam,
    "kadam": KAdam,
}


def register_optimizer(name: str, factory: Callable[..., Optimizer]) -> None:
    """Make `factory(params, **hyperparameters)` available to configs as `optim.name=<name>`."""
    if name in OPTIMIZERS:
        raise ValueError(f"Optimizer {name!r} is already registered")
    OPTIMIZERS[name] = factory


def build_optimizer(cfg: Mapping[str, Any], params: Iterable) -> Optimizer:
    """Build the optimizer named by `cfg["name"]`; every other key is a constructor argument.

    `cfg` is a plain mapping or an OmegaConf node, e.g. ``{"name": "vradam", "lr": 3e-3}``; a
    name with a dot that is not registered is an import path, e.g. ``my_optims.Lion``;
    `params` is an iterable of tensors or of param-group dicts, as for any torch optimizer.
    """
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    factory = OPTIMIZERS.get(name) if isinstance(name, str) else None
    if factory is None and isinstance(name, str) and "." in name:
        factory = _import(name)
    if factory is None:
        raise ConfigError(
            f"Unknown optimizer: {name!r}; available: {', '.join(sorted(OPTIMIZERS))}"
        )
    _check_keys(name, factory, cfg)
    betas = cfg.get("betas")
    if isinstance(betas, Sequence) and not isinstance(betas, str):  # others: the factory refuses
        cfg["betas"] = tuple(betas)
    try:
        return factory(params, **cfg)
    except ConfigError as err:  # its own check: the config node named, as for every refusal
        raise ConfigError(f"optim={name}: {err}") from err
    except TypeError as err:
        raise ConfigError(f"Invalid argument for optimizer {name!r}: {err}") from err


def _check_keys(name: str, factory: Callable[..., Optimizer], cfg: Mapping[str, Any]) -> None:
    """Refuse config keys the factory does not take, naming them and the valid ones (a factory
    that takes ``**kwargs``, or has no signature, decides for itself)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return
    valid = [key for key in keyword_parameters(signature) if key != "params"]
    unknown = [key for key in cfg if key not in valid]
    if unknown:
        raise ConfigError(
            f"Unknown key for optimizer {name!r}: {', '.join(map(str, unknown))}; "
            f"valid keys: {', '.join(valid)}"
        )


def _import(path: str) -> Callable[..., Optimizer]:
    """The optimizer class or factory at import path `path` (``module.attribute``)."""
    module, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ConfigError(
            f"Unknown optimizer: {path!r}; not registered, and not importable ({err}); "
            f"available: {', '.join(sorted(OPTIMIZERS))}"
        ) from err
