"""The run's device, from the `device` config key: ``auto | cpu | cuda | cuda:N | mps``.

``auto`` picks CUDA when a GPU is visible, else Apple's MPS, else the CPU. A named device that
this machine does not have is a user error (`ValueError`) whose one line lists what it has.
"""

from __future__ import annotations

import re

import torch

from optim.validation import ConfigError

__all__ = ["DEVICES", "available_devices", "resolve_device"]

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_INDEX = re.compile(r"cuda:(\d+)")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def available_devices() -> list[str]:
    """The devices this machine can run on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return names


def resolve_device(name: str | torch.device) -> torch.device:
    """The `torch.device` a run uses for the `device` setting `name`.

    ``cuda`` means the current CUDA device (``cuda:0`` unless changed), as in torch.

    Raises:
        ConfigError (a ValueError): `name` is not one of ``auto, cpu, cuda, cuda:N, mps``, or
            names a device this machine does not have (the message lists the ones it has).
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"Unknown device: {name!r}; valid: {', '.join(DEVICES)}")
    key = name.strip().lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if key == "cpu":
        return torch.device("cpu")
    index = _CUDA_INDEX.fullmatch(key)
    if key == "cuda" or index is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = torch.cuda.current_device() if key == "cuda" and count else None
        if index is not None:
            wanted = int(index.group(1))
        if wanted is None or wanted >= count:
            raise ConfigError(_unavailable(name))
        return torch.device("cuda", wanted)
    if key == "mps":
        if not _mps_available():
            raise ConfigError(_unavailable(name))
        return torch.device("mps")
    raise ConfigError(f"Unknown device: {name!r}; valid: {', '.join(DEVICES)}")


def _unavailable(name: str) -> str:
    return f"device={name} is not available on this machine; available: " + ", ".join(
        ["auto", *available_devices()]
    )
