"""Optimizers (VRAdam and its peers) and the registry every trainer builds them from."""

from optim.adahb import AdaHBAdam, AdaHBSGD
from optim.adamp import SGDP, AdamP
from optim.adamw import AdamW
from optim.kadam import KAdam
from optim.protocol import AdaptiveMomentum, VelocityGated
from optim.registry import OPTIMIZERS, build_optimizer, register_optimizer
from optim.vradam import VRAdam

__all__ = [
    "OPTIMIZERS",
    "SGDP",
    "AdaHBAdam",
    "AdaHBSGD",
    "AdamP",
    "AdamW",
    "AdaptiveMomentum",
    "KAdam",
    "VRAdam",
    "VelocityGated",
    "build_optimizer",
    "register_optimizer",
]
