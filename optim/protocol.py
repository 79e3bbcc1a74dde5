"""What an optimizer may expose to the stability monitors (kinetic/stability/).

The monitors work with any ``torch.optim.Optimizer`` from its param groups and state alone; an
optimizer that has more to say implements one of these protocols, and the monitors check for it
with ``isinstance`` (the protocols are runtime-checkable). Every tensor here is a device tensor
of shape ``(n_groups,)`` written by ``step()`` without a host sync, ``None`` before the first
step; reading one as a float is the reader's (documented) sync.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["AdaptiveMomentum", "VelocityGated"]


@runtime_checkable
class VelocityGated(Protocol):
    """An optimizer whose step size is gated by a velocity measure (VRAdam).

    ``last_lr_tensor``: the step size eta_t each group used in the last step (what multiplies
    the update; for VRAdam alpha_0 / (1 + min(beta3 s_t, alpha_1))).
    ``last_velocity_measure``: the measure s_t that gated it, in the units of the optimizer's
    ``velocity`` option (VRAdam: ||m_t||^2, ||m_t||^2 / n, or the mean square of Adam's step
    direction); in the lagged timing, the measure taken after the step, which gates the next one.
    """

    last_lr_tensor: Tensor | None
    last_velocity_measure: Tensor | None


@runtime_checkable
class AdaptiveMomentum(Protocol):
    """An optimizer whose momentum coefficient is chosen every step (AdaHB).

    ``last_momentum``: the momentum beta_k each group used in the last step (NaN for a group
    without gradients); it stands in for a constant beta1 or mu in stability thresholds.
    """

    last_momentum: Tensor | None
