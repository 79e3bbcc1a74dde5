"""Mixed precision from the `precision` config key: ``fp32 | bf16 | fp16``.

``bf16`` and ``fp16`` run the forward pass and the loss under `torch.autocast` on the run's
device type: matmuls and convolutions in the low-precision type, reductions, softmax and losses
in fp32, as autocast's op lists decide. The parameters, their gradients and the optimizer state
stay fp32 (autocast casts copies of the weights inside each op; nothing is converted in place).
``fp16`` also scales the loss with a `torch.amp.GradScaler`, since fp16 gradients underflow
below ~6e-8; bf16 has fp32's exponent range and needs no scaler.

A scaler grows its scale until the scaled gradients overflow, then skips that step and halves
the scale: an overflow is how it finds its scale, not a divergence. The non-finite guard
(`kinetic.stability.guard`) tells the two apart: with a scaler, a step whose loss is finite
but whose gradients are not, taken at a scale above `OVERFLOW_MIN_SCALE`, is the scaler's
overflow (skipped, counted apart, and not towards the guard's limit). At a scale at or below 1
the gradients overflow unscaled, which the guard counts as a non-finite step.

The loop's order for one step, in every precision::

    with precision.autocast():
        loss = task.loss(step)
    precision.backward(loss, optimizer)      # scaled backward, then unscale the gradients
    ... gradient norm, guard, clip (all on true-scale gradients) ...
    precision.step(optimizer, checked=...)   # optimizer step; the scaler's update
    # or, for a step the guard skipped:
    precision.skip(optimizer)                # the scaler's update only (halves the scale)
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from optim.validation import check_choice

__all__ = ["OVERFLOW_MIN_SCALE", "PRECISIONS", "Precision", "cpu_has_bf16"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OVERFLOW_MIN_SCALE = 1.0  # a scaler overflow at a scale at or below this is a real non-finite
# bf16 against fp32 on a CPU without bf16 instructions (AVX512-BF16 or AMX), where oneDNN
# emulates bf16: the default DDPM step, 2 threads, measured by restricting this repo's AVX512-BF16
# CPU to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2): 87 against 1,569 images/s.
CPU_BF16_EMULATED_SLOWDOWN = 18


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


class Precision:
    """Autocast and (for fp16) gradient scaling for one run.

    Args:
        name: ``"fp32"`` (no autocast), ``"bf16"`` or ``"fp16"`` (autocast; fp16 with a
            `torch.amp.GradScaler`).
        device: the run's device; autocast and the scaler act on its type (``cpu``, ``cuda``,
            ``mps``).
    """

    def __init__(self, name: str, device: torch.device | str) -> None:
        self.name = check_choice("precision", name, tuple(PRECISIONS))
        self.device = torch.device(device)
        self.dtype = PRECISIONS[name]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=name == "fp16")

    def warning(self) -> str | None:
        """One line when this precision is known to run far slower than fp32 here (bf16 on a
        CPU without bf16 instructions), else None."""
        if self.name == "bf16" and self.device.type == "cpu" and not cpu_has_bf16():
            return (
                "precision=bf16 on this CPU (no AVX512-BF16 or AMX) is emulated: a DDPM step "
                f"measured {CPU_BF16_EMULATED_SLOWDOWN}x slower than fp32; use precision=fp32"
            )
        return None

    def __repr__(self) -> str:
        return f"Precision({self.name!r}, device='{self.device}')"

    @property
    def scaling(self) -> bool:
        """Whether gradients are scaled (fp16), so that an overflow is the scaler's to handle."""
        return self.scaler.is_enabled()

    def autocast(self) -> AbstractContextManager:
        """The context for the forward pass and the loss (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """`loss.backward()`, scaled in fp16; the gradients come out at their true scale.

        Unscaling here (no host sync: the scaler records the overflow on the device) lets the
        gradient norm, the guard, clipping and the monitors read true gradients.
        """
        if not self.scaling:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, checked: bool) -> None:
        """The optimizer step, then the scaler's update in fp16.

        `checked`: whether the caller has already established that the gradients are finite
        (the guard's check). Then the optimizer steps directly; otherwise `GradScaler.step`
        decides, reading its overflow flag back to the host (one sync, fp16 only) and skipping
        the optimizer step on an overflow.
        """
        if not self.scaling:
            optimizer.step()
            return
        if checked:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
        self.scaler.update()

    def skip(self, optimizer: torch.optim.Optimizer) -> None:
        """A step the guard skipped: no optimizer step; in fp16 the scaler still updates (it
        halves its scale after the overflow it recorded while unscaling)."""
        if self.scaling:
            self.scaler.update()

    def is_overflow(self, loss: Tensor) -> bool:
        """Whether a step with non-finite gradients is the scaler's overflow rather than a
        divergence: fp16, a finite loss, and a scale above `OVERFLOW_MIN_SCALE`. Syncs with
        the host (called only on the guard's slow path, after a non-finite check)."""
        if not self.scaling or not bool(torch.isfinite(loss.detach()).all()):
            return False
        return self.scale() > OVERFLOW_MIN_SCALE

    def scale(self) -> float:
        """The scaler's current scale (1.0 without one). Syncs with the host in fp16."""
        return self.scaler.get_scale() if self.scaling else 1.0

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker), for checkpoints; empty without one."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)
