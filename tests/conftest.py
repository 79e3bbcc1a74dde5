"""Fixtures shared by the whole suite: the devices it runs on, and the benchmark scripts as
modules.

A test that takes the `device` fixture runs once per device: ``cpu`` always, ``cuda`` and
``mps`` when this machine has them and skipped, with the reason, when it does not. So the
same suite is the GPU suite: on a CUDA machine ``pytest -m device`` (or
``python benchmarks/gpu_check.py``) runs every device-parametrised test on the GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

# The built-in tasks register themselves on import, as train.py imports them: tests compose
# configs/ (whose presets name the tasks' schemas) and build tasks by name.
import diffusion.config  # noqa: F401
import gfn.config  # noqa: F401

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

DEVICE_PARAMS = ("cpu", "cuda", "mps")


def device_unavailable(name: str) -> str | None:
    """Why `name` cannot run here, or None when it can."""
    if name == "cuda" and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            return "no MPS device on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    """Every test that uses the `device` fixture carries the `device` marker."""
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(params=DEVICE_PARAMS)
def device(request) -> torch.device:
    """The device under test: cpu, then cuda and mps where present (skipped otherwise)."""
    reason = device_unavailable(request.param)
    if reason is not None:
        pytest.skip(reason)
    return torch.device(request.param)


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], ModuleType]:
    """`load_benchmark("name")`: benchmarks/name.py imported as a module (the scripts are not a
    package), to test their parts."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
