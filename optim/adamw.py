"""torch's AdamW as the registry builds it: the baseline every study reports against."""

from __future__ import annotations

import torch
from torch.optim.optimizer import ParamsT
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

__all__ = ["AdamW"]


def _fusable(params: list) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter (floating, on a device it has)."""
    devices = _get_fused_kernels_supported_devices()
    tensors = [p for x in params for p in (x["params"] if isinstance(x, dict) else [x])]
    return all(torch.is_floating_point(p) and p.device.type in devices for p in tensors)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW``, fused by default wherever its fused kernel takes every parameter.

    torch's default CPU AdamW is the single-tensor loop, whose step reads its step counter back
    to the host (``.item()``) every step; the fused kernel keeps the counter on the device, so
    the step neither syncs nor builds tensors from host data, and it is the fastest AdamW on both
    CPU and CUDA. Passing ``foreach`` or ``fused`` explicitly keeps torch's behaviour.
    """

    def __init__(
        self, params: ParamsT, *args, foreach: bool | None = None, fused: bool | None = None, **kw
    ) -> None:
        params = list(params)
        if fused is None and foreach is None:
            fused = _fusable(params)
        super().__init__(params, *args, foreach=foreach, fused=fused, **kw)
