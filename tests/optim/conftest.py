"""Shared fixtures of the optimizer tests."""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched inside it (`aten._local_scalar_dense` is a
    device-to-host read: what a step must never do), and the device types of every tensor the
    ops take or return (`devices`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        for x in pytree.tree_leaves((args, kwargs, out)):
            if isinstance(x, torch.Tensor):
                self.devices.add(x.device.type)
        return out


@pytest.fixture
def record_ops() -> type[RecordOps]:
    """`with record_ops() as rec: ...` then look in `rec.ops`."""
    return RecordOps
