"""The non-finite guard: a step whose loss or gradients hold NaN/Inf is skipped, not applied.

A skipped step leaves the parameters, the optimizer state (its `step` count included) and the
loop's step counter as they were; after `max_consecutive` skips in a row the run stops with
`NonFiniteError`, whose one-line message names the step and the first non-finite tensor.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from optim.validation import check_int

if TYPE_CHECKING:
    from kinetic.precision import Precision

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps (not a user error)."""


class NonFiniteGuard:
    """Decides, once per step, whether the loss and gradients are finite.

    `named_params`: (name, parameter) pairs used to name the first non-finite gradient;
    `max_consecutive`: consecutive skipped steps after which `exhausted` turns true (>= 1).
    """

    def __init__(self, named_params: Iterable[tuple[str, Tensor]], max_consecutive: int) -> None:
        check_int("monitor.nonfinite.max_consecutive", max_consecutive, 1)
        self.names = {p: name for name, p in named_params}
        self.max_consecutive = max_consecutive
        self.total_skips = 0  # over the whole run, logged as stability/nonfinite_skips
        self.overflow_skips = 0  # fp16 steps the gradient scaler skipped (not divergences)
        self.consecutive = 0
        self.culprit = ""  # the first non-finite tensor of the last skipped step

    @property
    def exhausted(self) -> bool:
        """Whether the run should stop: `max_consecutive` skipped steps in a row."""
        return self.consecutive >= self.max_consecutive

    def is_finite(
        self,
        loss: Tensor,
        grad_norm: Tensor,
        params: Iterable[Tensor],
        precision: Precision | None = None,
    ) -> bool:
        """True if `loss` and every gradient are finite; else count a skip and find the culprit.

        One fused check: a NaN or Inf in any gradient makes the total norm non-finite, so
        loss + norm decides (that sum overflows only when one of them is beyond ~1e38 in
        float32, a step worth skipping too). `bool()` syncs with the device once per step: the
        decision to skip has to be made on the host. On CPU that costs nothing; on CUDA it is
        one sync per step, the price of skipping instead of applying a NaN.

        With fp16's gradient scaler (`precision`), a step whose gradients overflowed at a
        scale above 1 while the loss stayed finite is the scaler's overflow: it is skipped too
        (the caller halves the scale with `precision.skip`), counted in `overflow_skips`, and
        leaves the count of consecutive non-finite steps as it was.
        """
        if bool(torch.isfinite(loss.detach() + grad_norm)):
            self.consecutive = 0
            return True
        if precision is not None and precision.is_overflow(loss):
            self.overflow_skips += 1
            return False
        self.total_skips += 1
        self.consecutive += 1
        self.culprit = self._first_nonfinite(loss, params)  # the slow path: syncs per tensor
        return False

    def _first_nonfinite(self, loss: Tensor, params: Iterable[Tensor]) -> str:
        if not bool(torch.isfinite(loss.detach()).all()):
            return f"loss ({float(loss.detach()):g})"
        for i, p in enumerate(params):
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return f"gradient of {self.names.get(p, f'parameter {i}')}"
        return "the gradient norm (overflow)"  # every gradient finite, their norm is not

    def stop_message(self, step: int, checkpoint: str) -> str:
        """The one-line reason the run stops (for `NonFiniteError`)."""
        return (
            f"step {step}: {self.consecutive} consecutive non-finite steps skipped "
            f"(monitor.nonfinite.max_consecutive={self.max_consecutive}); first non-finite "
            f"tensor: {self.culprit}; checkpoint: {checkpoint}"
        )

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int | str]:
        """The skip counters and the last culprit (the parameter names are rebuilt)."""
        return {
            "total_skips": self.total_skips,
            "consecutive": self.consecutive,
            "culprit": self.culprit,
        }

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        self.total_skips = int(state["total_skips"])
        self.consecutive = int(state["consecutive"])
        self.culprit = str(state["culprit"])
