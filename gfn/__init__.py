"""GFlowNets: policies, samplers, losses and evaluation."""

from gfn.continuous import continuous_log_probs, sample_continuous
from gfn.local_search import LocalSearch, local_search, sample_backward_trajectories
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
    "LocalSearch",
    "MLPPolicy",
    "PolicyOutput",
    "ReplayBuffer",
    "Trajectories",
    "TrajectoryLogProbs",
    "continuous_log_probs",
    "detailed_balance",
    "get_loss",
    "local_search",
    "log_partition_variance",
    "masked_log_softmax",
    "sample_backward_trajectories",
    "sample_continuous",
    "sample_trajectories",
    "subtrajectory_balance",
    "trajectory_balance",
    "trajectory_log_probs",
    "uniform_log_probs",
]
