"""The `device` setting: auto picks CUDA, then MPS, then the CPU; a missing device is one line."""

from __future__ import annotations

import re

import pytest
import torch

from kinetic.device import available_devices, resolve_device


@pytest.fixture
def machine(monkeypatch):
    """Pretend this machine has `n_cuda` GPUs and MPS or not: `machine(n_cuda, mps)`."""

    def pretend(n_cuda: int, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n_cuda > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n_cuda)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(
    ("n_cuda", "mps", "expected"),
    [(0, False, "cpu"), (0, True, "mps"), (1, False, "cuda:0"), (2, True, "cuda:0")],
)
def test_auto_prefers_cuda_then_mps_then_cpu(machine, n_cuda, mps, expected):
    machine(n_cuda, mps)
    assert resolve_device("auto") == torch.device(expected)


def test_named_devices_that_exist(machine):
    machine(2, True)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CUDA:1") == torch.device("cuda", 1)
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert available_devices() == ["cpu", "cuda:0", "cuda:1", "mps"]


@pytest.mark.parametrize(
    ("n_cuda", "mps", "name", "available"),
    [
        (0, False, "cuda", "auto, cpu"),
        (0, False, "cuda:0", "auto, cpu"),
        (2, False, "cuda:2", "auto, cpu, cuda:0, cuda:1"),
        (1, False, "mps", "auto, cpu, cuda:0"),
        (0, True, "cuda", "auto, cpu, mps"),
    ],
)
def test_unavailable_device_names_what_is_available(machine, n_cuda, mps, name, available):
    machine(n_cuda, mps)
    message = f"device={name} is not available on this machine; available: {available}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cuda:", "tpu", ""])
def test_unknown_device_names_the_choices(machine, name):
    machine(0, False)
    message = f"Unknown device: {name!r}; valid: auto, cpu, cuda, cuda:N, mps"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_device(name)


def test_non_string_device_is_a_type_error():
    with pytest.raises(ValueError, match="Unknown device: 0"):
        resolve_device(0)
