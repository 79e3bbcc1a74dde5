"""GFlowNets: policies, samplers, losses and evaluation."""

from gfn.losses import (
    LOSSES,
    GFlowNetLoss,
    detailed_balance,
    get_loss,
    log_partition_variance,
    subtrajectory_balance,
    trajectory_balance,
)
from gfn.policies import GFlowNet, MLPPolicy, PolicyOutput, masked_log_softmax, uniform_log_probs
from gfn.replay import ReplayBuffer
from gfn.sampler import (
    Trajectories,
    TrajectoryLogProbs,
    sample_trajectories,
    trajectory_log_probs,
)

__all__ = [
    "LOSSES",
    "GFlowNet",
    "GFlowNetLoss",
    "MLPPolicy",
    "PolicyOutput",
    "ReplayBuffer",
    "Trajectories",
    "TrajectoryLogProbs",
    "detailed_balance",
    "get_loss",
    "log_partition_variance",
    "masked_log_softmax",
    "sample_trajectories",
    "subtrajectory_balance",
    "trajectory_balance",
    "trajectory_log_probs",
    "uniform_log_probs",
]
