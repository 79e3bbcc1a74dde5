"""Inputs of the losses that score more than a trajectory's own log-probabilities.

Flow matching (``fm``) scores the edge flows into every visited state, so it evaluates the
policy at the state's parents too; modified detailed balance (``mdb``) scores the exit
probability and the reward of every visited state. Each is computed here from one trunk pass
over the distinct states involved, like `gfn.sampler.trajectory_log_probs` for the other losses,
and scattered back to the trajectories' ``(T, B)`` layout with zeros on padding.

Flow matching reads the forward logits as log edge flows (Bengio et al. 2021, arXiv
2106.04399): log F(s -> s') for each legal non-exit action and log F(s -> sf) for exit. The
forward policy the sampler draws from, softmax of the same logits over the legal actions, is
then exactly F(s -> s') / sum_a F(s -> .), the policy the flows define, so sampling and exact
evaluation need nothing new. Parents are enumerated through the environment's own
``backward_mask``/``backward_step``: backward action a undoes forward action a, so the edge
into s' from its parent p = backward_step(s', a) is p's forward logit a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from envs.base import Env
from gfn.policies import GFlowNet, PolicyOutput, masked_log_softmax
from gfn.sampler import PAD_ACTION, Trajectories, _scatter_visited, _unique_states

__all__ = [
    "EdgeFlowScores",
    "ExitScores",
    "edge_flow_scores",
    "exit_scores",
    "flow_log_z",
    "mdb_log_z",
]


@dataclass
class EdgeFlowScores:
    """What flow matching scores, ``(T, B)`` aligned with `Trajectories.actions`, 0 on padding.

    Attributes:
        log_inflows: log sum over the parents p of s_t of F(p -> s_t), for 1 <= t <= n_b;
            0 at t = 0 (s0 has no parent).
        log_outflows: log sum over the legal actions a at s_t of F(s_t -> a), exit included,
            for t <= n_b.
        log_exit_flows: log F(s_{n_b} -> sf), the flow into the sink, ``(B,)``.
    """

    log_inflows: Tensor
    log_outflows: Tensor
    log_exit_flows: Tensor


@dataclass
class ExitScores:
    """What modified detailed balance scores, ``(T, B)`` aligned with the actions, 0 on padding.

    Attributes:
        log_pf: log P_F(a_t | s_t) for t <= n_b (the exit at t = n_b), as `TrajectoryLogProbs`.
        log_pb: log P_B(s_t | s_{t+1}) for t < n_b, as `TrajectoryLogProbs`.
        log_pf_exit: log P_F(exit | s_t) for t <= n_b.
        log_rewards: log R(s_t) for t <= n_b (every state is terminal).
    """

    log_pf: Tensor
    log_pb: Tensor
    log_pf_exit: Tensor
    log_rewards: Tensor


def _masked_logsumexp(values: Tensor, mask: Tensor) -> Tensor:
    """log sum exp over the True entries of each row of `values` ``(N, K)``, ``(N,)``.

    A row with no True entry comes out finite (a very negative number, not -inf), so its
    gradient is never NaN; callers mask such rows out.
    """
    return torch.where(mask, values, torch.finfo(values.dtype).min).logsumexp(dim=1)  # (N,)


def _visited_states(
    trajectories: Trajectories, unique_states: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The visited states s_0..s_{n_b} of every trajectory, deduplicated.

    Returns ``(states (U, *S), inverse (N,), visited (T, B))``: row i of the flattened visited
    rows is ``states[inverse[i]]``.
    """
    n_steps = trajectories.max_length
    visited = trajectories.state_mask()  # (T, B)
    flat_states = trajectories.states[:n_steps][visited]  # (N, *S)
    if unique_states:
        states, inverse = _unique_states(flat_states)  # (U, *S), (N,)
    else:
        states = flat_states
        inverse = torch.arange(flat_states.shape[0], device=flat_states.device)
    return states, inverse, visited


def edge_flow_scores(
    gflownet: GFlowNet, env: Env, trajectories: Trajectories, unique_states: bool = True
) -> EdgeFlowScores:
    """Edge flows into and out of every visited state, from one trunk pass with autograd.

    The trunk runs once on the distinct states among the visited ones and all their parents
    (``backward_step`` of every legal backward action); the forward logits are log edge flows
    (see the module docstring). Turn `unique_states` off for a policy whose output for a row
    depends on the rest of the batch. Syncs with the host (the numbers of visited, parent and
    distinct states).
    """
    states, inverse, visited = _visited_states(trajectories, unique_states)  # (V, *S), (N,)
    n_visited = states.shape[0]
    # 1. Every parent of every visited state: child row, the forward action that leads in.
    backward_mask = env.backward_mask(states)  # (V, A - 1)
    child, action = backward_mask.nonzero(as_tuple=True)  # (P,), (P,)
    parents = env.backward_step(states[child], action)  # (P, *S)
    # 2. One trunk pass over the visited states and their parents (distinct rows only).
    together = torch.cat([states, parents])  # (V + P, *S)
    if unique_states:
        evaluated, rows = _unique_states(together)  # (U, *S), (V + P,)
    else:
        evaluated, rows = together, torch.arange(together.shape[0], device=together.device)
    logits = gflownet(env.featurize(evaluated)).pf_logits  # (U, A), log edge flows
    forward_mask = env.forward_mask(evaluated)  # (U, A)
    # 3. Outflow of each visited state: every legal edge, exit included.
    own = rows[:n_visited]  # (V,)
    log_outflows = _masked_logsumexp(logits[own], forward_mask[own])  # (V,)
    log_exit = logits[own, env.stop_action]  # (V,)
    # 4. Inflow: the parents' logits of the actions that lead into the state.
    edge_flows = logits[rows[n_visited:], action]  # (P,)
    incoming = torch.full_like(backward_mask, torch.finfo(logits.dtype).min, dtype=logits.dtype)
    incoming = incoming.index_put((child, action), edge_flows)  # (V, A - 1)
    has_parent = backward_mask.any(dim=1)  # (V,), False at s0
    log_inflows = torch.where(has_parent, incoming.logsumexp(dim=1), 0.0)  # (V,)
    # 5. Back to the (T, B) layout; the exit flow is read at t = n_b.
    exit_flows = _scatter_visited(log_exit[inverse], visited)  # (T, B)
    return EdgeFlowScores(
        log_inflows=_scatter_visited(log_inflows[inverse], visited),
        log_outflows=_scatter_visited(log_outflows[inverse], visited),
        log_exit_flows=exit_flows.gather(0, trajectories.lengths.unsqueeze(0)).squeeze(0),
    )


def exit_scores(
    gflownet: GFlowNet, env: Env, trajectories: Trajectories, unique_states: bool = True
) -> ExitScores:
    """log P_F, log P_B, log P_F(exit | s) and log R(s) along `trajectories`, one trunk pass.

    For modified detailed balance, where every state may terminate. Checks that the exit is
    legal at every visited state: this is where a state that cannot terminate would make the
    loss infinite, and it is exact (every state the loss scores is checked) at the cost of
    one host sync per batch; a check up front could only sample some states. Also syncs with
    the host for the numbers of visited and distinct states.

    Raises:
        ValueError: some visited state forbids the exit action (the environment is not one
            where every state is terminal).
    """
    states, inverse, visited = _visited_states(trajectories, unique_states)  # (V, *S), (N,)
    forward_mask = env.forward_mask(states)  # (V, A)
    cannot_exit = ~forward_mask[:, env.stop_action]  # (V,)
    if bool(cannot_exit.any()):  # syncs
        example = states[cannot_exit.nonzero()[0, 0]]
        raise ValueError(
            f"The 'mdb' loss needs every state to be terminal, but {type(env).__name__} "
            f"forbids the exit action at {int(cannot_exit.sum())} distinct visited state(s), e.g. "
            f"{example.tolist()}; use 'tb', 'db', 'subtb', 'zvar' or 'fm' with this environment"
        )
    out: PolicyOutput = gflownet(env.featurize(states))
    log_pf_all = masked_log_softmax(out.pf_logits, forward_mask)  # (V, A)
    actions = trajectories.actions  # (T, B)
    flat_actions = actions[visited]  # (N,)
    log_pf = _scatter_visited(log_pf_all[inverse, flat_actions], visited)  # (T, B)
    log_pf_exit = _scatter_visited(log_pf_all[inverse, env.stop_action], visited)  # (T, B)
    log_rewards = _scatter_visited(env.log_reward(states)[inverse].to(log_pf.dtype), visited)

    # P_B at s_t scores the action a_{t-1} that led into it; row t then moves to row t - 1.
    batch = actions.shape[1]
    prev = torch.cat([actions.new_full((1, batch), PAD_ACTION), actions[:-1]])[visited]  # (N,)
    backward_mask = env.backward_mask(states)  # (V, A - 1)
    if out.pb_logits is None:  # uniform: -log(number of parents), in the policy's dtype
        flat_log_pb = -torch.log(backward_mask.sum(dim=1).to(log_pf.dtype))[inverse]  # (N,)
    else:
        log_pb_all = masked_log_softmax(out.pb_logits, backward_mask)  # (V, A - 1)
        flat_log_pb = log_pb_all[inverse, prev.clamp(min=0)]  # (N,)
    flat_log_pb = torch.where(prev >= 0, flat_log_pb, 0.0)  # (N,), s0 has no parent
    log_pb_states = _scatter_visited(flat_log_pb, visited)  # (T, B)
    log_pb = torch.cat([log_pb_states[1:], log_pb_states.new_zeros(1, batch)])  # (T, B)
    return ExitScores(log_pf, log_pb, log_pf_exit, log_rewards)


@torch.no_grad()
def flow_log_z(gflownet: GFlowNet, env: Env) -> Tensor:
    """log F(s0), the total flow out of s0 (the logsumexp of its legal log edge flows): the
    log Z that flow matching's edge flows imply, scalar."""
    s0 = env.initial_states(1)  # (1, *S)
    logits = gflownet(env.featurize(s0)).pf_logits  # (1, A)
    return _masked_logsumexp(logits, env.forward_mask(s0))[0]


@torch.no_grad()
def mdb_log_z(gflownet: GFlowNet, env: Env) -> Tensor:
    """log R(s0) - log P_F(exit | s0): the log Z that modified detailed balance implies, since
    at its optimum P_F(exit | s) = R(s) / F(s); scalar."""
    s0 = env.initial_states(1)  # (1, *S)
    logits = gflownet(env.featurize(s0)).pf_logits  # (1, A)
    log_pf_exit = masked_log_softmax(logits, env.forward_mask(s0))[0, env.stop_action]
    return env.log_reward(s0)[0].to(logits.dtype) - log_pf_exit
