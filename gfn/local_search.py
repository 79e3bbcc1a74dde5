"""Local search over terminal states (LS-GFN, Kim et al., ICLR 2024, arXiv 2310.02710).

One refinement of a batch: for each terminal state x, draw a whole trajectory back to s0 with
P_B (`sample_backward_trajectories`), keep its first n − K states (K steps of backtracking from
x, fewer where the trajectory is shorter), rebuild from the junction state s with P_F to a new
terminal x', and accept x' or keep x:

    Metropolis–Hastings  accept with probability min(1, A),
        A = R(x') P_B(s ⇠ x') P_F(s → x) / (R(x) P_B(s ⇠ x) P_F(s → x'))
        (the products run over the rebuilt and the destroyed segments, the exit included),
        which leaves the target over trajectories, R(x) P_B(τ | x) / Z, invariant when the
        two segments have the same length;
    greedy               accept when R(x') >= R(x).

Every proposal is a complete trajectory s0 → … → x', so the trainer scores it like any other.
All draws come from one generator, and nothing builds a tensor from host data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from envs.base import Env
from gfn.policies import GFlowNet, masked_log_softmax, policy_input, uniform_log_probs
from gfn.sampler import (
    PAD_ACTION,
    Trajectories,
    _draw,
    sample_trajectories,
    terminal_log_rewards,
    trajectory_log_probs,
)
from kinetic.validate import ConfigError, check_choice, check_int

__all__ = [
    "ACCEPTANCE_RULES",
    "LocalSearch",
    "local_search",
    "refine",
    "sample_backward_trajectories",
]

ACCEPTANCE_RULES = ("mh", "greedy")


@dataclass
class LocalSearch:
    """`task.local_search` (its schema in the task's config, too): the refinement rounds per
    training batch, the steps backtracked, and the acceptance rule (`ACCEPTANCE_RULES`)."""

    refinements: int = 0  # rounds of local search per training batch; 0 = off
    k: int = 2  # steps backtracked from each terminal state with P_B
    acceptance: str = "mh"  # mh (Metropolis-Hastings) | greedy (keep the better reward)

    def check(self, env: Env | None = None) -> LocalSearch:
        """The keys, and K against `env`'s longest trajectory once it is built, refused by
        name."""
        check_int("task.local_search.refinements", self.refinements, 0)
        check_int("task.local_search.k", self.k, 1)
        check_choice("task.local_search.acceptance", self.acceptance, ACCEPTANCE_RULES)
        if env is not None and self.k > env.max_steps:
            raise ConfigError(
                f"task.local_search.k={self.k} is longer than any trajectory of "
                f"{type(env).__name__} (max_steps={env.max_steps}); valid: 1..{env.max_steps}"
            )
        return self


@torch.no_grad()
def sample_backward_trajectories(
    gflownet: GFlowNet,
    env: Env,
    x: Tensor,
    generator: torch.Generator,
    conditions: Tensor | None = None,
    log_rewards: Tensor | None = None,
) -> Trajectories:
    """Complete trajectories s0 → … → x drawn backward from terminal states `x` with P_B
    (the learned head, or uniform over ``backward_mask``), in the sampler's forward layout.

    Syncs with the host once per backward step (which rows have reached s0). `log_rewards`
    ``(n,)``: the rewards of `x`, if known; else computed.
    """
    n = x.shape[0]
    max_steps = env.max_steps
    buffer = x.new_empty((max_steps + 1, *x.shape))  # (K + 1, n, *S): state after k steps back
    buffer[0] = x
    back_actions = torch.full((max_steps, n), PAD_ACTION, dtype=torch.long, device=x.device)
    current, running = x, torch.arange(n, device=x.device)
    for k in range(max_steps + 1):
        walking = (~env.is_initial(current)).nonzero().squeeze(1)  # syncs
        if walking.numel() == 0:
            break
        if k == max_steps:
            raise RuntimeError(
                f"{walking.numel()} states had not reached s0 after env.max_steps={max_steps} "
                f"backward steps of {type(env).__name__}"
            )
        current, running = current[walking], running[walking]
        mask = env.backward_mask(current)  # (R, A − 1)
        running_conditions = None if conditions is None else conditions[running]
        pb_logits = gflownet(policy_input(env.featurize(current), running_conditions)).pb_logits
        if pb_logits is None:
            probs = uniform_log_probs(mask).exp()
        else:
            probs = masked_log_softmax(pb_logits, mask).exp()
        chosen = _draw(probs, generator)  # (R,)
        back_actions[k, running] = chosen
        current = env.backward_step(current, chosen)
        buffer[k + 1, running] = current

    lengths = (back_actions != PAD_ACTION).sum(dim=0)  # (n,)
    n_rows = int(lengths.max()) + 1  # T; syncs
    t = torch.arange(n_rows + 1, device=x.device).unsqueeze(1)  # (T + 1, 1)
    source = (lengths - t).clamp(min=0)  # (T + 1, n): row t is s_t = buffer[n_b − t]
    index = source.view(*source.shape, *([1] * len(env.state_shape))).expand(n_rows + 1, *x.shape)
    states = buffer.gather(0, index)  # (T + 1, n, *S)
    ahead = (lengths - 1 - t[:n_rows]).clamp(min=0)  # (T, n): a_t = back action n_b − 1 − t
    actions = back_actions.gather(0, ahead.clamp(max=max_steps - 1))
    actions = torch.where(t[:n_rows] < lengths, actions, PAD_ACTION)
    actions = torch.where(t[:n_rows] == lengths, env.stop_action, actions)  # (T, n)
    if log_rewards is None:
        log_rewards = terminal_log_rewards(env, x, conditions)
    return Trajectories(states, actions, lengths, x.clone(), log_rewards, conditions)


def _segment_sums(
    gflownet: GFlowNet, env: Env, batches: list[Trajectories], start: Tensor
) -> list[tuple[Tensor, Tensor]]:
    """Σ log P_F and Σ log P_B over the transitions t >= `start` ``(B,)`` of each of the
    same-sized `batches`, from one trunk pass over all of them."""
    joined = Trajectories.concatenate(batches)
    scores = trajectory_log_probs(gflownet, env, joined)
    rows = torch.arange(joined.max_length, device=start.device).unsqueeze(1)  # (T, 1)
    after = rows >= start.repeat(len(batches))  # (T, n · B)
    sums = zip((scores.log_pf * after).sum(dim=0).chunk(len(batches)),
               (scores.log_pb * after).sum(dim=0).chunk(len(batches)), strict=True)  # fmt: skip
    return list(sums)


@torch.no_grad()
def local_search(
    gflownet: GFlowNet,
    env: Env,
    batch: Trajectories,
    generator: torch.Generator,
    k: int,
    acceptance: str = "mh",
) -> tuple[Trajectories, Trajectories, Tensor]:
    """One refinement round of `batch`'s terminal states (see the module docstring).

    Returns:
        ``(kept, proposals, accepted)``: for each row the trajectory it now holds (the
        proposal if accepted, else the one drawn back from x), every proposal, and which
        were accepted, bool ``(B,)``.
    """
    check_choice("acceptance", acceptance, ACCEPTANCE_RULES)
    current = sample_backward_trajectories(
        gflownet, env, batch.terminal_states, generator, batch.conditions, batch.log_rewards
    )
    junction = (current.lengths - k).clamp(min=0)  # (B,)
    rows = torch.arange(batch.batch_size, device=junction.device)
    start = current.states[junction, rows]  # (B, *S)
    suffix = sample_trajectories(
        gflownet, env, batch.batch_size, generator, conditions=batch.conditions,
        start_states=start,
    )  # fmt: skip

    # Proposal: the prefix s_0..s_j of `current`, then the rebuilt suffix.
    lengths = junction + suffix.lengths  # (B,)
    n_rows = int(lengths.max()) + 1  # T'; syncs
    t = torch.arange(n_rows + 1, device=junction.device).unsqueeze(1)  # (T' + 1, 1)
    state_view = (-1, batch.batch_size, *([1] * len(env.state_shape)))
    prefix_states = current.padded(max(current.max_length, n_rows)).states
    from_suffix = (t - junction).clamp(0, suffix.max_length)  # (T' + 1, B)
    suffix_index = from_suffix.view(state_view).expand(n_rows + 1, *start.shape)
    states = torch.where(
        (t <= junction).view(state_view),
        prefix_states[: n_rows + 1],
        suffix.states.gather(0, suffix_index),
    )  # (T' + 1, B, *S)
    prefix_actions = current.padded(max(current.max_length, n_rows)).actions
    suffix_actions = suffix.padded(max(suffix.max_length, n_rows)).actions
    from_suffix = (t[:n_rows] - junction).clamp(0, suffix_actions.shape[0] - 1)
    actions = torch.where(
        t[:n_rows] < junction, prefix_actions[:n_rows], suffix_actions.gather(0, from_suffix)
    )  # (T', B)
    proposals = Trajectories(
        states, actions, lengths, suffix.terminal_states, suffix.log_rewards, batch.conditions
    )

    if acceptance == "greedy":
        accepted = proposals.log_rewards >= current.log_rewards
    else:
        (pf_new, pb_new), (pf_old, pb_old) = _segment_sums(
            gflownet, env, [proposals, current], junction
        )
        log_ratio = (proposals.log_rewards + pb_new + pf_old) - (
            current.log_rewards + pb_old + pf_new
        )  # (B,)
        u = torch.rand(batch.batch_size, generator=generator, device=junction.device)
        accepted = u.log() < log_ratio
    kept = _select(accepted, proposals, current)
    return kept, proposals, accepted


def _select(take: Tensor, new: Trajectories, old: Trajectories) -> Trajectories:
    """Row b of `new` where `take[b]`, else of `old`."""
    length = max(new.max_length, old.max_length)
    new, old = new.padded(length), old.padded(length)
    row = take.view(1, -1)
    state_row = take.view(1, -1, *([1] * (new.states.dim() - 2)))
    return Trajectories(
        torch.where(state_row, new.states, old.states),
        torch.where(row, new.actions, old.actions),
        torch.where(take, new.lengths, old.lengths),
        torch.where(take.view(-1, *([1] * (new.terminal_states.dim() - 1))),
                    new.terminal_states, old.terminal_states),
        torch.where(take, new.log_rewards, old.log_rewards),
        new.conditions,
    )  # fmt: skip


def refine(
    gflownet: GFlowNet,
    env: Env,
    batch: Trajectories,
    generator: torch.Generator,
    search: LocalSearch,
) -> tuple[Trajectories, list[Trajectories], Tensor | None]:
    """`search.refinements` rounds of `local_search` from `batch`'s terminal states.

    Returns:
        ``(refined, proposals, acceptance_rate)``: the trajectories held after the last round,
        every round's proposals (for counting what the search visited), and the share of
        proposals accepted over all rounds (a device scalar; None without rounds).
    """
    held, proposals, accepted = batch, [], []
    for _ in range(search.refinements):
        held, proposed, took = local_search(
            gflownet, env, held, generator, search.k, search.acceptance
        )
        proposals.append(proposed)
        accepted.append(took)
    rate = torch.cat(accepted).float().mean() if accepted else None
    return held, proposals, rate
