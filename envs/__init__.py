"""Environments: the batched, stateless contract every GFlowNet environment implements."""

from envs.base import ConditionalEnv, Env
from envs.continuous import Box, ContinuousEnv, Line
from envs.dag import DAGEnv
from envs.hypergrid import ConditionalHyperGrid, HyperGrid

__all__ = [
    "Box",
    "ConditionalEnv",
    "ConditionalHyperGrid",
    "ContinuousEnv",
    "DAGEnv",
    "Env",
    "HyperGrid",
    "Line",
]
