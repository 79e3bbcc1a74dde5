"""Every random stream of a run, captured and restored as tensors and plain containers.

A resumed run draws exactly what the uninterrupted run would have drawn only if every stream it
reads continues where it stopped: torch's global CPU generator, the device generators (CUDA:
one per visible device; MPS), the task's own `torch.Generator`s (and any numpy `Generator`),
numpy's global `RandomState` and Python's `random`. The captured state holds only tensors,
ints, floats, strings, None, lists, tuples and dicts, so it loads with `weights_only=True`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng"]

Generators = Mapping[str, "torch.Generator | np.random.Generator"]


def _numpy_global_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,) uint32 values
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {
        "version": version,
        "internal": torch.tensor(internal, dtype=torch.int64),  # (625,) uint32 values
        "gauss_next": gauss_next,
    }


def capture_rng(generators: Generators | None = None) -> dict[str, Any]:
    """The state of every random stream; `generators` are the task's own, by name."""
    state: dict[str, Any] = {
        "torch": torch.random.get_rng_state(),
        "numpy": _numpy_global_state(),
        "python": _python_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "mps": None,
        "generators": {},
    }
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    for name, generator in (generators or {}).items():
        if isinstance(generator, torch.Generator):
            state["generators"][name] = generator.get_state()
        elif isinstance(generator, np.random.Generator):
            state["generators"][name] = generator.bit_generator.state
        else:
            raise TypeError(
                f"generator {name!r} is a {type(generator).__name__}; expected a "
                "torch.Generator or a numpy.random.Generator"
            )
    return state


def restore_rng(state: Mapping[str, Any], generators: Generators | None = None) -> None:
    """Put every stream back to `state` (from `capture_rng`). The task's `generators` must be
    the ones captured, by name; device streams are restored where the device exists (a CPU
    resume of a CUDA run continues its CPU streams only)."""
    generators = dict(generators or {})
    saved = state["generators"]
    if set(saved) != set(generators):
        raise ValueError(
            f"the checkpoint holds the random generators {sorted(saved)}, the task has "
            f"{sorted(generators)}: it was written by a different task"
        )
    torch.random.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = state["cuda"]
        count = min(len(cuda), torch.cuda.device_count())
        for device in range(count):
            torch.cuda.set_rng_state(cuda[device], device)
    if state.get("mps") is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    for name, generator in generators.items():
        if isinstance(generator, torch.Generator):
            generator.set_state(saved[name])
        else:
            generator.bit_generator.state = saved[name]
