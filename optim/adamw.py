"""torch's AdamW as the registry builds it: the baseline every study reports against."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from optim.validation import check_adam

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

    Its hyperparameters are checked as every other optimizer's here (`optim.validation`), so a
    bad value gets the same message; one difference from torch: lr=0 is refused. A tensor lr
    (torch's option for capturable and fused steps) is left to torch to check.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        **kw,
    ) -> None:
        check_adam(1.0 if isinstance(lr, Tensor) else lr, betas, eps, weight_decay)
        params = list(params)
        if fused is None and foreach is None:
            fused = _fusable(params)
        super().__init__(
            params, lr, tuple(betas), eps, weight_decay, amsgrad, foreach=foreach, fused=fused, **kw
        )
