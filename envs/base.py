"""The environment contract: stateless, batched, tensor states, last action = stop.

An environment author writes only the physics (`step`, `backward_step`, masks, `log_reward`,
`featurize`); samplers, losses and evaluation are the framework's. Every method takes and
returns whole batches; nothing loops over trajectories in Python.

Devices: an environment lives where its tensors live. The trainer calls ``env.to(device)`` once,
before training, with the run's device; the default `Env.to` moves every tensor attribute
(``s0``, reward tables, targets, also inside lists, tuples and dicts) and sets ``env.device``.
Methods then create any new tensor on their input's device (``device=states.device``,
``torch.zeros_like``, ``states.new_zeros``), never on the default (CPU) device, so the same
class runs on the CPU and on a GPU. An environment written for the CPU alone keeps working on
the CPU (``device=cpu``); `envs.checker.check_devices` names any method that leaves the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ConditionalEnv", "Env", "StateSpace"]


def _to_device(value: object, device: torch.device) -> object:
    """`value` with every tensor in it on `device`: tensors and modules moved, lists, tuples
    (named ones too) and dicts rebuilt around moved tensors; anything else is returned as is."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, torch.nn.Module):  # e.g. a learned reward model, moved in place
        return value.to(device)
    if isinstance(value, dict):
        items = {k: _to_device(v, device) for k, v in value.items()}
        return value if all(items[k] is v for k, v in value.items()) else items
    if isinstance(value, (list, tuple)):
        items = [_to_device(v, device) for v in value]
        if all(m is v for m, v in zip(items, value, strict=True)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return value


class StateSpace(ABC):
    """What every environment shares, discrete (`Env`) or continuous
    (`envs.continuous.ContinuousEnv`): batched states from `s0`, moving to a device, and the
    optional outputs a run writes and shows.

    Attributes:
        state_shape: shape of one state; a batch of states is ``(B, *state_shape)``.
        state_dtype: dtype of state tensors (e.g. ``torch.long``).
        s0: the initial state, ``state_shape``.
        max_steps: an upper bound on the number of non-stop actions in any trajectory.
        summary_keys: metrics of the environment's own (`distribution_metrics`,
            `sampled_metrics`) that a run's closing `done:` line shows beside l1 and jsd.
        condition_dim: the length of the condition vector each trajectory draws; 0 but for a
            `ConditionalEnv`.
    """

    state_shape: tuple[int, ...]
    state_dtype: torch.dtype
    s0: Tensor
    max_steps: int
    summary_keys: tuple[str, ...] = ()
    condition_dim: int = 0

    def to(self, device: torch.device | str) -> StateSpace:
        """Move the environment to `device` in place and return it (as `torch.nn.Module.to`).

        Moves every tensor attribute, also inside lists, tuples and dicts, every module
        attribute (in place), and sets
        ``self.device``. Override it (calling ``super().to(device)``) only to move state the
        default cannot see, e.g. a tensor held inside another object.
        """
        device = torch.device(device)
        for name, value in list(vars(self).items()):
            moved = _to_device(value, device)
            if moved is not value:
                setattr(self, name, moved)
        self.device = device
        return self

    def initial_states(self, n: int) -> Tensor:
        """`n` copies of s0, ``(n, *state_shape)``."""
        return self.s0.unsqueeze(0).expand(n, *self.state_shape).clone()

    def is_initial(self, states: Tensor) -> Tensor:
        """Which states equal s0, bool ``(B,)``."""
        return (states == self.s0).flatten(1).all(dim=1)

    def data_files(self) -> dict[str, Tensor]:
        """Arrays a run writes to its directory as ``<name>.npy`` when it starts (optional):
        what the reward is computed from (e.g. the dataset a structure-learning score reads),
        so results can be recomputed outside kinetic."""
        return {}


class Env(StateSpace):
    """A GFlowNet environment: a DAG of states from `s0`, built by integer actions.

    Attributes (and `StateSpace`'s):
        n_actions: number of forward actions, stop included; action ``n_actions - 1`` is stop
            (the exit action, leading to the sink state ``sf``).
        n_backward_actions: number of backward actions, ``n_actions - 1`` (there is no
            backward "stop").

    Backward actions are numbered by the forward action they undo:
    ``backward_step(step(s, a), a) == s`` and ``backward_mask(step(s, a))[:, a]`` is True.
    Policies read their input width from ``featurize(initial_states(1)).shape[-1]``.
    """

    n_actions: int

    @property
    def n_backward_actions(self) -> int:
        return self.n_actions - 1

    @property
    def stop_action(self) -> int:
        return self.n_actions - 1

    @abstractmethod
    def forward_mask(self, states: Tensor) -> Tensor:
        """Legal forward actions, bool ``(B, n_actions)``; the last column is stop."""

    @abstractmethod
    def backward_mask(self, states: Tensor) -> Tensor:
        """Legal backward actions, bool ``(B, n_actions - 1)``; all False at s0."""

    @abstractmethod
    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Apply forward non-stop `actions` ``(B,)`` to `states`; returns the next states."""

    @abstractmethod
    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Apply backward `actions` ``(B,)``; the inverse of `step` (parents of `states`)."""

    @abstractmethod
    def log_reward(self, states: Tensor) -> Tensor:
        """log R of terminal states (states where stop was taken), float ``(B,)``."""

    @abstractmethod
    def featurize(self, states: Tensor) -> Tensor:
        """What the policy network eats: float ``(B, n_features)`` (or a torch-geometric Batch)."""

    def enumerate_terminals(self) -> Tensor:
        """All terminal states, ``(N, *state_shape)``, for exact evaluation (optional)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not implement enumerate_terminals(); exact metrics need it"
        )

    def is_mode(self, states: Tensor) -> Tensor:
        """Which terminal states are modes (high-reward targets), bool ``(B,)`` (optional).

        Used to count the modes a run has found; environments without a notion of modes
        leave it unimplemented and the mode metrics are left out.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement is_mode(); mode counting needs it"
        )

    def mode_region(self, states: Tensor) -> Tensor:
        """Which mode region each terminal state lies in, long ``(B,)`` (optional).

        Region ids only need to be meaningful where `is_mode` is True; counting distinct ids
        among found modes gives the number of mode regions found.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement mode_region(); mode counting needs it"
        )

    def mode_hits(self, states: Tensor) -> Tensor:
        """Which targets each terminal state counts as finding, bool ``(B, n_targets)`` (optional).

        For environments whose modes are a fixed set of targets reached approximately (e.g. bit
        sequences within a Hamming threshold of a target). The trainer ORs the hits of every
        sampled batch, so ``modes_found`` is the number of targets hit so far.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement mode_hits(); target counting needs it"
        )

    def distribution_metrics(
        self, terminals: Tensor, p: Tensor, p_star: Tensor
    ) -> dict[str, float]:
        """Environment-specific exact metrics of the policy's terminal distribution (optional).

        Args:
            terminals: ``enumerate_terminals()``, ``(N, *state_shape)``.
            p: the policy's exact terminal distribution over them, float64 ``(N,)``.
            p_star: the target R/Z over them, float64 ``(N,)``.

        Returns:
            Named metrics (floats), logged under ``eval/`` beside l1, tv and jsd (e.g. the
            error of edge marginals for structure learning).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement distribution_metrics()"
        )

    def sampled_metrics(
        self, samples: Tensor, log_prob_fn: Callable[[Tensor], Tensor]
    ) -> dict[str, float]:
        """Environment-specific evaluation from the current policy (optional).

        Args:
            samples: terminal states drawn from the policy without exploration,
                ``(N, *state_shape)``.
            log_prob_fn: ``x (M, *state_shape) -> (M,)``, an estimate of log P_T(x), the
                log-probability that the policy terminates at x (exact where every terminal
                state has a single trajectory).

        Returns:
            Named metrics (floats), logged under ``eval/``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement sampled_metrics()")


class ConditionalEnv(Env):
    """An environment whose reward depends on a condition c, drawn once per trajectory.

    A conditional GFlowNet (Jain et al. 2023, arXiv 2210.12765) feeds c to P_F, P_B and log F
    (the policy's input is ``featurize(s)`` with c appended) and learns log Z(c); one network
    then samples from R(x | c)/Z(c) for every c. The environment says how conditions are drawn
    for training, which held-out ones evaluation scores, and what the reward of each is.

    Attributes:
        condition_dim: C >= 1, the length of a condition vector.
    """

    @abstractmethod
    def sample_conditions(self, n: int, generator: torch.Generator) -> Tensor:
        """`n` training conditions, float ``(n, C)``, on the environment's device."""

    @abstractmethod
    def conditional_log_reward(self, states: Tensor, conditions: Tensor) -> Tensor:
        """log R(x | c) of terminal states ``(B, *state_shape)`` under conditions ``(B, C)``:
        float ``(B,)``."""

    @abstractmethod
    def eval_conditions(self) -> Tensor:
        """The held-out conditions evaluation scores one by one, float ``(K, C)``."""

    def condition_label(self, condition: Tensor) -> str:
        """A short name of one condition ``(C,)`` for metric keys, e.g. ``beta=0.5``."""
        return "c=" + ",".join(f"{float(v):g}" for v in condition)
