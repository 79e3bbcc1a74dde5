"""GFlowNet objectives, each in three stages: residuals, an elementwise penalty, a reduction.

Reduction convention, for every loss: the mean over trajectories of a per-trajectory loss.
    tb     the squared trajectory-balance residual.
    db     the mean, over the trajectory's n + 1 transitions (the exit s_n -> sf included), of
           the squared detailed-balance residual; a long trajectory weighs as much as a short one.
    subtb  the lambda-weighted mean, over the trajectory's (n + 1)(n + 2) / 2 sub-trajectories,
           of the squared sub-trajectory-balance residual.
    zvar   the squared deviation of the trajectory's log Z estimate from the batch mean (so the
           loss is the biased batch variance of the estimates).
    fm     the mean, over the trajectory's n + 1 non-initial nodes of the augmented chain
           (s_1..s_n and sf), of the squared flow-matching residual log inflow - log outflow;
           at sf the inflow is the exit edge flow F(s_n -> sf) and the outflow is R(s_n).
    mdb    the mean, over the trajectory's n non-exit transitions, of the squared modified
           detailed-balance residual; a trajectory that exits at s0 (n = 0) has none and
           contributes 0.

Inputs follow `gfn.sampler.TrajectoryLogProbs`: ``(T, B)`` tensors aligned with the actions, 0 on
padding. Flows enter through the augmented chain u_0..u_{n+1} = s_0..s_n, sf with
log F(u_{n+1}) := log R(s_n), the exit transition having log P_F(exit | s_n) and log P_B = 0.
With the potential A_k = log F(u_k) - sum_{t<k} (log P_F - log P_B)_t, the residual of the
sub-trajectory u_i -> u_j is A_i - A_j: SubTB scores all of them from one cumulative sum.

Each loss is also an object (`GFlowNetLoss`): it declares what it needs of the model
(log-probs, a flow head, edge flows, exit scores, the learned log Z), computes those scores from
one trunk pass (`score`), and scores a batch (`__call__`). A subclass with a `name` registers
itself in `LOSSES`, so adding a loss is one class and one YAML file under configs/loss/
(docs/extending.md, "Adding a loss"); `get_loss(name, **hparams)` builds one.
"""

from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from envs.base import Env
from envs.continuous import ContinuousEnv
from gfn.continuous import continuous_log_probs
from gfn.policies import GFlowNet, policy_input
from gfn.sampler import Trajectories, TrajectoryLogProbs, trajectory_log_probs
from gfn.scores import (
    EdgeFlowScores,
    ExitScores,
    edge_flow_scores,
    exit_scores,
    flow_log_z,
    mdb_log_z,
)
from kinetic.errors import ConfigError
from kinetic.validate import check_float

__all__ = [
    "LOSSES",
    "NEEDS",
    "DetailedBalance",
    "FlowMatching",
    "GFlowNetLoss",
    "LogPartitionVariance",
    "ModifiedDetailedBalance",
    "SubTrajectoryBalance",
    "TrajectoryBalance",
    "balance_potentials",
    "detailed_balance",
    "detailed_balance_residuals",
    "flow_matching",
    "flow_matching_residuals",
    "get_loss",
    "log_partition_variance",
    "log_partition_variance_residuals",
    "loss_from_config",
    "modified_detailed_balance",
    "modified_detailed_balance_residuals",
    "subtrajectory_balance",
    "trajectory_balance",
    "trajectory_balance_residuals",
]

# What a loss may need of the model: the trajectories' log P_F and log P_B, log F(s) from a flow
# head, the edge flows of every visited state, P_F(exit | s) at every visited state, the learned
# scalar log Z.
NEEDS = ("log_probs", "log_flows", "edge_flows", "exit_scores", "log_z")


def trajectory_balance_residuals(
    log_pf: Tensor, log_pb: Tensor, log_rewards: Tensor, log_z: Tensor
) -> Tensor:
    """log Z + sum_t log P_F - sum_t log P_B - log R per trajectory, ``(B,)``.

    Trajectory balance (Malkin et al. 2022, arXiv 2201.13259). `log_pf`, `log_pb` ``(T, B)``
    with zeros on padding; `log_rewards` ``(B,)``; `log_z` a scalar.
    """
    return log_z + log_pf.sum(dim=0) - log_pb.sum(dim=0) - log_rewards  # (B,)


def trajectory_balance(
    log_pf: Tensor, log_pb: Tensor, log_rewards: Tensor, log_z: Tensor
) -> Tensor:
    """Trajectory-balance loss: the mean over trajectories of the squared residual, scalar."""
    residuals = trajectory_balance_residuals(log_pf, log_pb, log_rewards, log_z)  # (B,)
    return residuals.pow(2).mean()


def balance_potentials(
    log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, log_rewards: Tensor, lengths: Tensor
) -> Tensor:
    """A_k = log F(u_k) - sum_{t<k} (log P_F - log P_B)_t along the augmented chain, ``(T + 1, B)``.

    u_k = s_k for k <= n_b and log F(u_{n_b + 1}) = log R(s_{n_b}); rows past n_b + 1 are
    finite filler. The residual of u_i -> u_j (i < j) is A_i - A_j.
    """
    n_steps, batch = log_pf.shape
    step_terms = log_pf - log_pb  # (T, B), 0 on padding
    cumulative = torch.cat([step_terms.new_zeros(1, batch), step_terms.cumsum(dim=0)])  # (T+1, B)
    flows = torch.cat([log_flows, log_flows.new_zeros(1, batch)])  # (T + 1, B)
    rows = torch.arange(n_steps + 1, device=lengths.device).unsqueeze(1)  # (T + 1, 1)
    flows = torch.where(rows == lengths + 1, log_rewards, flows)  # (T + 1, B)
    return flows - cumulative  # (T + 1, B)


def detailed_balance_residuals(
    log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, log_rewards: Tensor, lengths: Tensor
) -> Tensor:
    """Detailed-balance residuals of every transition, ``(T, B)``, 0 on padding.

    log F(s_t) + log P_F(s_{t+1} | s_t) - log F(s_{t+1}) - log P_B(s_t | s_{t+1}) for t < n_b,
    and log F(s_n) + log P_F(exit | s_n) - log R(s_n) at t = n_b (Bengio et al. 2023,
    arXiv 2111.09266). `lengths` ``(B,)`` long.
    """
    n_steps, batch = log_pf.shape
    rows = torch.arange(n_steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    next_flows = torch.cat([log_flows[1:], log_flows.new_zeros(1, batch)])  # (T, B)
    next_flows = torch.where(rows == lengths, log_rewards, next_flows)  # (T, B), log R at exit
    residuals = log_flows + log_pf - next_flows - log_pb  # (T, B)
    return torch.where(rows <= lengths, residuals, 0.0)  # (T, B)


def detailed_balance(
    log_pf: Tensor, log_pb: Tensor, log_flows: Tensor, log_rewards: Tensor, lengths: Tensor
) -> Tensor:
    """Detailed-balance loss, scalar: per trajectory the mean of the n + 1 squared residuals,
    then the mean over trajectories."""
    residuals = detailed_balance_residuals(log_pf, log_pb, log_flows, log_rewards, lengths)
    per_trajectory = residuals.pow(2).sum(dim=0) / (lengths + 1).to(residuals.dtype)  # (B,)
    return per_trajectory.mean()


def subtrajectory_balance(
    log_pf: Tensor,
    log_pb: Tensor,
    log_flows: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
    lamda: float = 0.9,
) -> Tensor:
    """Sub-trajectory balance (Madan et al. 2023, arXiv 2209.12782), scalar.

    Every sub-trajectory u_i -> u_j, 0 <= i < j <= n_b + 1, of the augmented chain has residual
    A_i - A_j (`balance_potentials`) and weight lamda^(j - i); per trajectory the squared
    residuals are averaged with these weights normalised to sum to 1, then averaged over
    trajectories. ``lamda = 0`` keeps only single transitions (detailed balance, as averaged by
    `detailed_balance`); as lamda grows the full trajectory, i.e. trajectory balance with
    log Z = log F(s0), dominates. Vectorized: ``(T + 1, T + 1, B)`` residuals, no loops.
    """
    if not 0.0 <= lamda < float("inf"):
        raise ValueError(f"Invalid lamda: {lamda}; it must be non-negative and finite")
    potentials = balance_potentials(log_pf, log_pb, log_flows, log_rewards, lengths)  # (T+1, B)
    residuals = potentials.unsqueeze(1) - potentials.unsqueeze(0)  # (T+1, T+1, B), [i, j, b]
    nodes = torch.arange(potentials.shape[0], device=lengths.device)  # (T + 1,)
    span = (nodes.unsqueeze(0) - nodes.unsqueeze(1)).unsqueeze(2)  # (T + 1, T + 1, 1), j - i
    in_chain = (span > 0) & (nodes.unsqueeze(0).unsqueeze(2) <= lengths + 1)  # (T+1, T+1, B)
    # Any constant factor cancels in the normalisation; pick one that keeps every weight in
    # [0, 1]: lamda^(span - 1) for lamda <= 1 (exact at lamda = 0, as 0^0 = 1), and
    # (1 / lamda)^(n + 1 - span) for lamda > 1 (no overflow for long trajectories).
    if lamda <= 1.0:
        exponents = span - 1  # (T + 1, T + 1, 1)
        base = lamda
    else:
        exponents = lengths + 1 - span  # (T + 1, T + 1, B)
        base = 1.0 / lamda
    weights = torch.pow(base, exponents.clamp(min=0).to(potentials.dtype))  # (T+1, T+1, *)
    weights = torch.where(in_chain, weights, 0.0)  # (T + 1, T + 1, B)
    weights = weights / weights.sum(dim=(0, 1))  # (T + 1, T + 1, B)
    per_trajectory = (weights * residuals.pow(2)).sum(dim=(0, 1))  # (B,)
    return per_trajectory.mean()


def log_partition_variance_residuals(log_pf: Tensor, log_pb: Tensor, log_rewards: Tensor) -> Tensor:
    """Deviation of each trajectory's log Z estimate from the batch mean, ``(B,)``.

    The estimate is log R + sum_t log P_B - sum_t log P_F (Zhang et al. 2023, "Robust
    scheduling with GFlowNets", arXiv 2302.05446); at the optimum it equals log Z for every
    trajectory, so no learned log Z is needed.
    """
    log_z_estimates = log_rewards + log_pb.sum(dim=0) - log_pf.sum(dim=0)  # (B,)
    return log_z_estimates - log_z_estimates.mean()  # (B,)


def log_partition_variance(log_pf: Tensor, log_pb: Tensor, log_rewards: Tensor) -> Tensor:
    """Log-partition variance loss: the biased batch variance of the log Z estimates, scalar."""
    return log_partition_variance_residuals(log_pf, log_pb, log_rewards).pow(2).mean()


def flow_matching_residuals(
    log_inflows: Tensor,
    log_outflows: Tensor,
    log_exit_flows: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
) -> Tensor:
    """Flow-matching residuals along the augmented chain u_1..u_{n+1}, ``(T + 1, B)``.

    Row k in 1..n_b: log sum_{parents} F(p -> s_k) - log sum_a F(s_k -> a) (Bengio et al.
    2021, arXiv 2106.04399, eq. 9, in log space without their epsilon); row n_b + 1, the sink:
    log F(s_n -> sf) - log R(s_n). Row 0 (s0, whose inflow is Z) and padding are 0. Inputs
    as `gfn.scores.EdgeFlowScores` (``(T, B)``, ``(T, B)``, ``(B,)``); `log_rewards` ``(B,)``.
    """
    n_steps, batch = log_inflows.shape
    rows = torch.arange(n_steps + 1, device=lengths.device).unsqueeze(1)  # (T + 1, 1)
    states = torch.cat([log_inflows - log_outflows, log_inflows.new_zeros(1, batch)])  # (T+1, B)
    states = torch.where((rows >= 1) & (rows <= lengths), states, 0.0)  # (T + 1, B)
    return torch.where(rows == lengths + 1, log_exit_flows - log_rewards, states)  # (T + 1, B)


def flow_matching(
    log_inflows: Tensor,
    log_outflows: Tensor,
    log_exit_flows: Tensor,
    log_rewards: Tensor,
    lengths: Tensor,
) -> Tensor:
    """Flow-matching loss, scalar: per trajectory the mean of its n + 1 squared residuals,
    then the mean over trajectories."""
    residuals = flow_matching_residuals(
        log_inflows, log_outflows, log_exit_flows, log_rewards, lengths
    )  # (T + 1, B)
    per_trajectory = residuals.pow(2).sum(dim=0) / (lengths + 1).to(residuals.dtype)  # (B,)
    return per_trajectory.mean()


def modified_detailed_balance_residuals(
    log_pf: Tensor, log_pb: Tensor, log_pf_exit: Tensor, log_rewards: Tensor, lengths: Tensor
) -> Tensor:
    """Modified detailed-balance residuals of the non-exit transitions, ``(T, B)``, 0 elsewhere.

    For s_t -> s_{t+1}, t < n_b (Deleu et al. 2022, arXiv 2202.13903, eq. 6, with
    F(s) = R(s) / P_F(exit | s)):
    log R(s_t) + log P_F(s_{t+1} | s_t) + log P_F(exit | s_{t+1})
      - log R(s_{t+1}) - log P_B(s_t | s_{t+1}) - log P_F(exit | s_t).
    Inputs ``(T, B)`` as `gfn.scores.ExitScores`; `lengths` ``(B,)`` long.
    """
    n_steps, batch = log_pf.shape
    rows = torch.arange(n_steps, device=lengths.device).unsqueeze(1)  # (T, 1)
    # The state term log R(s) - log P_F(exit | s) is -log F(s) + const; its difference along
    # each transition is what balances log P_F - log P_B.
    state_terms = log_rewards - log_pf_exit  # (T, B)
    next_terms = torch.cat([state_terms[1:], state_terms.new_zeros(1, batch)])  # (T, B)
    residuals = state_terms + log_pf - next_terms - log_pb  # (T, B)
    return torch.where(rows < lengths, residuals, 0.0)  # (T, B)


def modified_detailed_balance(
    log_pf: Tensor, log_pb: Tensor, log_pf_exit: Tensor, log_rewards: Tensor, lengths: Tensor
) -> Tensor:
    """Modified detailed-balance loss, scalar: per trajectory the mean of its n squared
    residuals (0 when n = 0), then the mean over trajectories."""
    residuals = modified_detailed_balance_residuals(
        log_pf, log_pb, log_pf_exit, log_rewards, lengths
    )  # (T, B)
    per_trajectory = residuals.pow(2).sum(dim=0) / lengths.clamp(min=1).to(residuals.dtype)
    return per_trajectory.mean()


# --- losses as objects -------------------------------------------------------------------------

LOSSES: dict[str, type[GFlowNetLoss]] = {}


class GFlowNetLoss(ABC):
    """A GFlowNet objective: what it needs of the model, how it scores a batch.

    Subclasses set `name` (the `loss.name` that selects it; a named subclass registers itself
    in `LOSSES`) and `needs` (a subset of `NEEDS`), take their hyperparameters as keyword
    arguments of `__init__` (validated there, naming the `loss.<key>`), and implement
    `__call__(scores, trajectories, log_z) -> scalar`. The rest follows from `needs`: which
    scores `score` computes, whether the policy needs a flow head, what `estimate_log_z`
    reports and which scalars the loss logs.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"log_probs"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = sorted(set(cls.needs) - set(NEEDS))
        if unknown:
            raise TypeError(f"{cls.__name__}.needs: unknown {unknown}; valid: {', '.join(NEEDS)}")
        if cls.name:
            LOSSES[cls.name] = cls

    @property
    def flow_head(self) -> bool:
        """Whether the policy must have a flow head (log F(s))."""
        return "log_flows" in self.needs

    @property
    def scores_log_probs(self) -> bool:
        """Whether `score` gives the trajectories' log-probabilities (log-densities on a
        continuous environment) rather than edge flows or exit scores."""
        return {"edge_flows", "exit_scores"}.isdisjoint(self.needs)

    def score(self, model: torch.nn.Module, env: Env, trajectories: Trajectories) -> Any:
        """What `__call__` scores, from one trunk pass of `model` over the visited states:
        edge flows, exit scores, or the trajectories' log-probabilities (and flows); on a
        continuous environment, their log-densities."""
        if isinstance(env, ContinuousEnv):
            return continuous_log_probs(model, env, trajectories)
        if "edge_flows" in self.needs:
            return edge_flow_scores(model, env, trajectories)
        if "exit_scores" in self.needs:
            return exit_scores(model, env, trajectories)
        return trajectory_log_probs(model, env, trajectories)

    @abstractmethod
    def __call__(self, scores: Any, trajectories: Trajectories, log_z: Tensor) -> Tensor:
        """The loss of a batch, scalar (the reduction convention of the module docstring)."""

    @torch.no_grad()
    def estimate_log_z(
        self, model: GFlowNet, env: Env, condition: Tensor | None = None
    ) -> Tensor | None:
        """The model's estimate of log Z under this loss: the learned scalar if the loss trains
        it, else log F(s0) from a flow head; None when the loss implies none. A conditional
        GFlowNet's at one `condition` ``(C,)``: log Z(c), or log F(s0 | c)."""
        conditions = None if condition is None else condition.unsqueeze(0)  # (1, C)
        if "log_z" in self.needs:
            log_z = model.log_z_of(conditions).detach()
            return log_z if conditions is None else log_z[0]
        if "log_flows" in self.needs:
            s0 = env.initial_states(1)
            return model(policy_input(env.featurize(s0), conditions)).log_flow[0]
        return None

    def scalars(self, model: GFlowNet) -> dict[str, Tensor]:
        """Extra training scalars (device tensors): the learned log Z, if the loss trains it."""
        return {"train/log_z": model.log_z.detach()} if "log_z" in self.needs else {}

    def _flows(self, log_probs: TrajectoryLogProbs) -> Tensor:
        if log_probs.log_flows is None:
            raise ValueError(
                f"The {self.name!r} loss needs log F(s) but the policy has no flow head; build "
                "it with flow_head=True, or use 'tb' or 'zvar'"
            )
        return log_probs.log_flows


class TrajectoryBalance(GFlowNetLoss):
    """Trajectory balance (arXiv 2201.13259), with the learned log Z."""

    name = "tb"
    needs = frozenset({"log_probs", "log_z"})

    def __call__(self, scores, trajectories, log_z):
        return trajectory_balance(scores.log_pf, scores.log_pb, trajectories.log_rewards, log_z)


class DetailedBalance(GFlowNetLoss):
    """Detailed balance (arXiv 2111.09266), with log F(s) from a flow head."""

    name = "db"
    needs = frozenset({"log_probs", "log_flows"})

    def __call__(self, scores, trajectories, log_z):
        return detailed_balance(scores.log_pf, scores.log_pb, self._flows(scores),
                                trajectories.log_rewards, trajectories.lengths)  # fmt: skip


class SubTrajectoryBalance(GFlowNetLoss):
    """Sub-trajectory balance (arXiv 2209.12782), sub-trajectories weighted lamda^length."""

    name = "subtb"
    needs = frozenset({"log_probs", "log_flows"})

    def __init__(self, *, lamda: float = 0.9) -> None:
        self.lamda = check_float("loss.lamda", lamda, 0.0)

    def __call__(self, scores, trajectories, log_z):
        return subtrajectory_balance(scores.log_pf, scores.log_pb, self._flows(scores),
                                     trajectories.log_rewards, trajectories.lengths,
                                     lamda=self.lamda)  # fmt: skip


class LogPartitionVariance(GFlowNetLoss):
    """Log-partition variance (arXiv 2302.05446): no log Z is learned or implied."""

    name = "zvar"
    needs = frozenset({"log_probs"})

    def __call__(self, scores, trajectories, log_z):
        return log_partition_variance(scores.log_pf, scores.log_pb, trajectories.log_rewards)


class FlowMatching(GFlowNetLoss):
    """Flow matching (arXiv 2106.04399) on the edge flows of every visited state."""

    name = "fm"
    needs = frozenset({"edge_flows"})

    def __call__(self, scores: EdgeFlowScores, trajectories, log_z):
        return flow_matching(scores.log_inflows, scores.log_outflows, scores.log_exit_flows,
                             trajectories.log_rewards, trajectories.lengths)  # fmt: skip

    @torch.no_grad()
    def estimate_log_z(self, model, env):
        """log F(s0), the total flow out of s0."""
        return flow_log_z(model, env)


class ModifiedDetailedBalance(GFlowNetLoss):
    """Modified detailed balance (arXiv 2202.13903), for environments where every state may
    exit: F(s) = R(s) / P_F(exit | s)."""

    name = "mdb"
    needs = frozenset({"exit_scores"})

    def __call__(self, scores: ExitScores, trajectories, log_z):
        return modified_detailed_balance(scores.log_pf, scores.log_pb, scores.log_pf_exit,
                                         scores.log_rewards, trajectories.lengths)  # fmt: skip

    @torch.no_grad()
    def estimate_log_z(self, model, env):
        """log R(s0) - log P_F(exit | s0)."""
        return mdb_log_z(model, env)


def loss_class(name: str) -> type[GFlowNetLoss]:
    """The loss registered as `name`, or a `GFlowNetLoss` subclass by its import path
    (`my_losses.MyLoss`, for a loss outside this package)."""
    if name in LOSSES:
        return LOSSES[name]
    if isinstance(name, str) and "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"Unknown loss: {name!r}; not importable ({err})") from err
        if isinstance(cls, type) and issubclass(cls, GFlowNetLoss):
            return cls
        raise ConfigError(f"Unknown loss: {name!r} is {cls!r}, not a GFlowNetLoss subclass")
    raise ConfigError(f"Unknown loss: {name!r}; valid: {', '.join(LOSSES)}")


def get_loss(name: str, **hparams: Any) -> GFlowNetLoss:
    """The loss named `name`, built with its hyperparameters (e.g. ``lamda`` for ``subtb``):
    ``loss(scores, trajectories, log_z) -> scalar``, with ``loss.score(model, env, batch)``
    computing its scores."""
    cls = loss_class(name)
    valid = [
        p.name for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    ]  # fmt: skip
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ConfigError(
            f"Unknown hyperparameter(s) {', '.join(unknown)} for loss {name!r}; "
            f"valid: {', '.join(valid) if valid else 'none'}"
        )
    return cls(**hparams)


def loss_from_config(node: Mapping[str, Any]) -> GFlowNetLoss:
    """The loss of a `loss` config node: `name`, and the loss's hyperparameters beside it."""
    return get_loss(node["name"], **{key: value for key, value in node.items() if key != "name"})
