"""A replay buffer of whole trajectories, for mixing off-policy samples into a training batch.

Trajectories are kept batch-major in fixed-size padded tensors (a ring buffer: once full, each
`add` overwrites the oldest). Replayed trajectories are scored by `trajectory_log_probs` like
fresh ones: the buffer stores states and actions, never log-probabilities, which go stale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs.base import Env
from gfn.sampler import PAD_ACTION, Trajectories
from kinetic.validate import check_choice, check_float, check_int

__all__ = ["PRIORITIES", "ReplayBuffer"]

PRIORITIES = ("uniform", "reward")


class ReplayBuffer:
    """A fixed-capacity ring buffer of trajectories.

    Sampling is ``"uniform"`` (without replacement) or ``"reward"``-prioritised: with
    replacement, trajectory i drawn with probability proportional to R_i^alpha =
    exp(alpha * log R_i). Duplicates are stored as they come (no de-duplication).

    Args:
        env: the environment, for state shapes and ``max_steps``.
        capacity: the most trajectories kept.
        priority: ``"uniform"`` (default) or ``"reward"``.
        alpha: the reward exponent of ``"reward"`` priority (default 1.0).
        device: where the buffer lives (default: where ``env.s0`` lives).
    """

    def __init__(
        self,
        env: Env,
        capacity: int,
        priority: str = "uniform",
        alpha: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        check_int("task.replay.capacity", capacity, 1)
        check_choice("task.replay.priority", priority, PRIORITIES)
        check_float("alpha", alpha, 0.0)
        self.capacity = capacity
        self.priority = priority
        self.alpha = alpha
        device = env.s0.device if device is None else torch.device(device)
        max_length = env.max_steps + 1  # the most action rows any trajectory needs
        self.states = torch.zeros(
            (capacity, max_length + 1, *env.state_shape), dtype=env.state_dtype, device=device
        )  # (C, T_max + 1, *S)
        self.actions = torch.full(
            (capacity, max_length), PAD_ACTION, dtype=torch.long, device=device
        )  # (C, T_max)
        self.lengths = torch.zeros(capacity, dtype=torch.long, device=device)  # (C,)
        self.terminal_states = torch.zeros(
            (capacity, *env.state_shape), dtype=env.state_dtype, device=device
        )  # (C, *S)
        self.log_rewards = torch.zeros(capacity, device=device)  # (C,)
        # A conditional environment's trajectories keep their condition (and their reward
        # under it): replayed, they are scored under the same condition.
        n_conditions = env.condition_dim
        self.conditions = (
            torch.zeros(capacity, n_conditions, device=device) if n_conditions else None
        )  # (C, condition_dim) or None
        self._next = 0  # the slot the next trajectory goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, trajectories: Trajectories) -> None:
        """Store a batch, overwriting the oldest trajectories once full (only the last
        `capacity` of a batch larger than the buffer are kept)."""
        batch = trajectories
        if (self.conditions is None) != (batch.conditions is None):
            raise ValueError(
                "A replay buffer stores the conditions of a conditional environment's "
                "trajectories, and only those: this batch "
                f"{'lacks' if batch.conditions is None else 'has'} conditions"
            )
        n_new = min(batch.batch_size, self.capacity)
        first = batch.batch_size - n_new
        slots = (self._next + torch.arange(n_new, device=self.lengths.device)) % self.capacity
        t_plus_1 = batch.states.shape[0]  # T + 1
        states = batch.states[:, first:].transpose(0, 1).to(self.states.device)  # (n, T+1, *S)
        terminal = batch.terminal_states[first:].to(self.states.device)  # (n, *S)
        self.states[slots, :t_plus_1] = states
        # Pad the same way the sampler does: rows after s_n repeat the terminal state.
        self.states[slots, t_plus_1:] = terminal.unsqueeze(1)
        self.actions[slots] = PAD_ACTION
        self.actions[slots, : t_plus_1 - 1] = batch.actions[:, first:].T.to(self.actions.device)
        self.lengths[slots] = batch.lengths[first:].to(self.lengths.device)
        self.terminal_states[slots] = terminal
        self.log_rewards[slots] = batch.log_rewards[first:].to(self.log_rewards.device)
        if self.conditions is not None:
            self.conditions[slots] = batch.conditions[first:].to(self.conditions.device)
        self._next = (self._next + n_new) % self.capacity
        self._size = min(self._size + n_new, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> Trajectories:
        """Draw `n` stored trajectories as a `Trajectories` batch, trimmed to its own T.

        Trimming reads the longest length back to the host (one sync).
        """
        if self.priority == "uniform":
            if not 1 <= n <= self._size:
                raise ValueError(
                    f"Cannot draw {n} trajectories without replacement from a replay buffer "
                    f"holding {self._size}; ask for 1 to {self._size}"
                )
            index = torch.randperm(self._size, generator=generator, device=generator.device)[:n]
        elif self.priority == "reward":
            if n < 1 or self._size == 0:
                raise ValueError(
                    f"Cannot draw {n} trajectories from a replay buffer holding {self._size}"
                )
            log_weights = self.alpha * self.log_rewards[: self._size]  # (size,)
            weights = (log_weights - log_weights.max()).exp()  # (size,), max weight 1
            index = torch.multinomial(weights, n, replacement=True, generator=generator)
        else:
            raise ValueError(
                f"Unknown replay priority: {self.priority!r}; valid: {', '.join(PRIORITIES)}"
            )
        index = index.to(self.lengths.device)
        return self._gather(index)

    def _gather(self, index: Tensor) -> Trajectories:
        lengths = self.lengths[index]  # (n,)
        n_steps = int(lengths.max()) + 1  # T; syncs with the host
        return Trajectories(
            states=self.states[index, : n_steps + 1].transpose(0, 1).contiguous(),  # (T+1, n, *S)
            actions=self.actions[index, :n_steps].T.contiguous(),  # (T, n)
            lengths=lengths,
            terminal_states=self.terminal_states[index],
            log_rewards=self.log_rewards[index],
            conditions=None if self.conditions is None else self.conditions[index],
        )

    # -- checkpointing -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        """The stored trajectories (the filled slots only), the write position and the size:
        what a resumed run needs to draw the same replayed batches."""
        filled = slice(0, self._size)  # slots fill in order, so the filled ones lead
        return {
            "states": self.states[filled].clone(),
            "actions": self.actions[filled].clone(),
            "lengths": self.lengths[filled].clone(),
            "terminal_states": self.terminal_states[filled].clone(),
            "log_rewards": self.log_rewards[filled].clone(),
            "conditions": None if self.conditions is None else self.conditions[filled].clone(),
            "next": self._next,
            "size": self._size,
            "capacity": self.capacity,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore `state_dict()` into this buffer (same capacity and environment), on this
        buffer's device; raises ValueError naming what does not fit."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"The replay buffer in the checkpoint holds {state['capacity']} trajectories, "
                f"this one {self.capacity} (task.replay.capacity)"
            )
        size = int(state["size"])
        names = ["states", "actions", "lengths", "terminal_states", "log_rewards"]
        if self.conditions is not None or state.get("conditions") is not None:
            if self.conditions is None or state.get("conditions") is None:
                raise ValueError(
                    "The replay buffer in the checkpoint and this one disagree on whether "
                    "trajectories carry conditions (a conditional environment's do)"
                )
            names.append("conditions")
        for name in names:
            mine, saved = getattr(self, name), state[name]
            if tuple(saved.shape) != (size, *mine.shape[1:]):
                raise ValueError(
                    f"The replay buffer's {name} in the checkpoint have shape "
                    f"{tuple(saved.shape)}; expected {(size, *mine.shape[1:])} for this "
                    "environment"
                )
        self.states.zero_()
        self.actions.fill_(PAD_ACTION)
        self.lengths.zero_()
        self.terminal_states.zero_()
        self.log_rewards.zero_()
        if self.conditions is not None:
            self.conditions.zero_()
        for name in names:
            getattr(self, name)[:size] = state[name].to(getattr(self, name).device)
        self._next, self._size = int(state["next"]), size
