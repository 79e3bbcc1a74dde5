"""Stability diagnostics that watch a run: per-step monitors, the sharpness probe and the
non-finite guard. They read the optimizer's state but belong to the run, not to an optimizer."""

from kinetic.stability.guard import NonFiniteError, NonFiniteGuard
from kinetic.stability.monitors import MonitorConfig, StabilityMonitor, velocity_scalars

__all__ = [
    "MonitorConfig",
    "NonFiniteError",
    "NonFiniteGuard",
    "StabilityMonitor",
    "velocity_scalars",
]
