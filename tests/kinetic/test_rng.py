"""Every random stream continues exactly where it stopped after capture -> save -> restore."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from kinetic.rng import capture_rng, restore_rng


def _draw(generators: dict) -> list:
    """One draw from every stream: what a resumed run must reproduce."""
    return [
        torch.rand(3).tolist(),
        torch.randn(2, generator=generators["batches"]).tolist(),
        generators["numpy_task"].random(2).tolist(),
        np.random.rand(2).tolist(),
        np.random.randn(1).tolist(),  # numpy's cached Gaussian is part of its state
        random.random(),
        random.gauss(0.0, 1.0),  # so is Python's
    ]


def _weights_only_round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_stream_resumes_where_it_stopped():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    generators = {
        "batches": torch.Generator().manual_seed(4),
        "numpy_task": np.random.default_rng(5),
    }
    _draw(generators)
    np.random.randn(1)  # leave a cached Gaussian in numpy's state
    state = _weights_only_round_trip(capture_rng(generators))
    expected = _draw(generators)
    _draw(generators)  # move every stream on
    fresh = {"batches": torch.Generator().manual_seed(99), "numpy_task": np.random.default_rng(0)}
    restore_rng(state, fresh)
    assert _draw(fresh) == expected


def test_generators_of_another_task_are_refused():
    state = capture_rng({"batches": torch.Generator()})
    with pytest.raises(
        ValueError, match=r"holds the random generators \['batches'\], the task has \['eval'\]"
    ):
        restore_rng(state, {"eval": torch.Generator()})
    with pytest.raises(
        TypeError, match=r"expected a torch\.Generator or a numpy\.random\.Generator"
    ):
        capture_rng({"bad": random.Random(0)})
