"""Shared fixtures of the optimizer tests."""

from __future__ import annotations

import pytest
from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched inside it (`aten._local_scalar_dense` is a
    device-to-host read: what a step must never do)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def record_ops() -> type[RecordOps]:
    """`with record_ops() as rec: ...` then look in `rec.ops`."""
    return RecordOps
