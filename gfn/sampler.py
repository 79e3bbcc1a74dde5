"""Vectorized trajectory sampling, and the one-pass log-probabilities the losses score.

Sampling runs without autograd. The loss's log-probabilities come from one batched pass over
the visited states, with autograd: for an on-policy batch of an `MLPPolicy`, the sampling pass
itself, kept with its activations (`SamplingPass`), whose backward runs once over all its rows
(no second forward pass); otherwise a second forward over the visited states, once per
distinct state (`trajectory_log_probs`). Decided by measurement on an 8^4 HyperGrid with the
256x2 MLP, one CPU thread, a whole TB iteration (sample, loss, backward, AdamW step): the
second forward took 5.9 ms at batch 16 and 22 ms at batch 256 against 15 ms and 37 ms when
the loss reused the autograd graph built while sampling (autograd then walks T small per-step
graphs and is on for every sampling op). The recorded pass against the second forward
(sample, loss and backward, interleaved): 3-9% slower at batch 16 and 64, where the recording's
few operators per step cost more than the forward it saves, and 8-12% faster at 256; the
task records from batch 128 on (`gfn.task.RECORD_PASS_MIN_BATCH`).

Trajectory layout (time-major, as in torchgfn), for B trajectories of n_b non-exit actions:
    states[t, b]   s_t for t <= n_b; after that a copy of the terminal state s_{n_b}
    actions[t, b]  a_t for t < n_b, the exit action at t = n_b, then -1
    T = max_b n_b + 1, so states has T + 1 rows and its last row is always padding (sf).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from envs.base import ConditionalEnv, Env
from envs.rows import row_keys
from gfn.policies import (
    GFlowNet,
    MLPActivations,
    MLPPolicy,
    PolicyOutput,
    masked_log_softmax,
    policy_input,
)

__all__ = [
    "ROLLOUTS",
    "SamplingPass",
    "Trajectories",
    "TrajectoryLogProbs",
    "compile_static_steps",
    "sample_trajectories",
    "static_step",
    "static_steps",
    "terminal_log_rewards",
    "trajectory_log_probs",
]

PAD_ACTION = -1
# The dynamic rollout keeps deduplicating its running states only while a step saves at least
# this many rows (and a quarter of them): a step's deduplication (a row hash, a sort, three
# gathers) takes a few tens of µs on one CPU thread, a 256x2 MLP a few µs per row forward and
# backward; a rough break-even, not a tuned value.
DEDUP_MIN_SAVED = 16


@dataclass
class SamplingPass:
    """The policy's pass over the states a sampler evaluated, kept so that the loss can score
    the batch without evaluating the policy again while its parameters are unchanged.

    Attributes:
        policy: the `MLPPolicy` that made the pass.
        versions: its parameters' version counters at the time; any in-place update since
            (an optimizer step) makes the pass stale.
        states: the R states evaluated, ``(R, *state_shape)`` (each distinct state once,
            unless the sampler ran without `unique_states`).
        rows: long ``(T, B)``, the row of ``states`` holding s_t of trajectory b, -1 on padding.
        forward_mask: ``env.forward_mask(states)``, bool ``(R, n_actions)``.
        activations: what `MLPPolicy.replay` needs to backpropagate through the pass.
    """

    policy: MLPPolicy
    versions: tuple[int, ...]
    states: Tensor
    rows: Tensor
    forward_mask: Tensor
    activations: MLPActivations

    def serves(self, gflownet: torch.nn.Module) -> bool:
        """Whether this pass is `gflownet`'s policy's current output (same module, same
        parameter versions)."""
        return getattr(gflownet, "policy", None) is self.policy and self.versions == _versions(
            self.policy
        )


def _versions(module: torch.nn.Module) -> tuple[int, ...]:
    return tuple(p._version for p in module.parameters())


@dataclass
class Trajectories:
    """A batch of B complete trajectories s0 -> ... -> s_n -> sf, padded to a common length.

    Attributes:
        states: ``(T + 1, B, *state_shape)``; rows past s_n repeat the terminal state, so
            every row is a valid state of the environment.
        actions: long ``(T, B)``; the exit action at t = n_b, -1 after it.
        lengths: long ``(B,)``, n_b, the number of non-exit actions.
        terminal_states: ``(B, *state_shape)``, s_{n_b}.
        log_rewards: float ``(B,)``, log R(s_{n_b}) (log R(s_{n_b} | c_b) when conditional).
        conditions: float ``(B, C)``, each trajectory's condition c_b for a conditional
            environment (`envs.base.ConditionalEnv`); None otherwise.
        sampling_pass: the policy's pass that drew this batch, when the sampler was asked to
            keep it (`trajectory_log_probs` then scores the batch from it); not carried over
            by `to`, `padded` or `concatenate`.
    """

    states: Tensor
    actions: Tensor
    lengths: Tensor
    terminal_states: Tensor
    log_rewards: Tensor
    conditions: Tensor | None = None
    sampling_pass: SamplingPass | None = None

    @property
    def batch_size(self) -> int:
        return self.actions.shape[1]

    @property
    def max_length(self) -> int:
        """T, the number of action rows (the longest n_b plus its exit)."""
        return self.actions.shape[0]

    def state_mask(self) -> Tensor:
        """Which rows of ``states[:T]`` are visited states s_0..s_{n_b}, bool ``(T, B)``.

        These are also the rows of `actions` that hold an action (exit included).
        """
        steps = torch.arange(self.max_length, device=self.lengths.device)  # (T,)
        return steps.unsqueeze(1) <= self.lengths.unsqueeze(0)  # (T, B)

    def to(self, device: torch.device | str) -> Trajectories:
        return Trajectories(
            self.states.to(device),
            self.actions.to(device),
            self.lengths.to(device),
            self.terminal_states.to(device),
            self.log_rewards.to(device),
            None if self.conditions is None else self.conditions.to(device),
        )

    def padded(self, max_length: int) -> Trajectories:
        """This batch with its action rows padded to `max_length` (>= its own): states repeat
        the terminal state, actions are -1 (a continuous batch's moves are 0)."""
        pad = max_length - self.max_length
        if pad == 0:
            return self
        last = self.states[-1:].expand(pad, *self.states.shape[1:])  # (pad, B, *S)
        filler = self.actions.new_full((pad, *self.actions.shape[1:]), PAD_ACTION)
        if self.actions.is_floating_point():
            filler.zero_()
        return Trajectories(
            torch.cat([self.states, last]), torch.cat([self.actions, filler]), self.lengths,
            self.terminal_states, self.log_rewards, self.conditions,
        )  # fmt: skip

    @staticmethod
    def concatenate(batches: Sequence[Trajectories]) -> Trajectories:
        """Join batches along B (e.g. on-policy samples and replayed ones), padding to the
        longest T."""
        if len(batches) == 0:
            raise ValueError("Trajectories.concatenate needs at least one batch; got none")
        conditional = [batch.conditions is not None for batch in batches]
        if any(conditional) and not all(conditional):
            raise ValueError("Trajectories.concatenate cannot mix conditional and plain batches")
        t_max = max(batch.max_length for batch in batches)
        padded = [batch.padded(t_max) for batch in batches]
        return Trajectories(
            states=torch.cat([batch.states for batch in padded], dim=1),
            actions=torch.cat([batch.actions for batch in padded], dim=1),
            lengths=torch.cat([batch.lengths for batch in batches]),
            terminal_states=torch.cat([batch.terminal_states for batch in batches]),
            log_rewards=torch.cat([batch.log_rewards for batch in batches]),
            conditions=torch.cat([b.conditions for b in batches]) if all(conditional) else None,
        )


@dataclass
class TrajectoryLogProbs:
    """What the losses score, aligned with `Trajectories.actions` ``(T, B)``, 0 on padding.

    Attributes:
        log_pf: log P_F(a_t | s_t) for t <= n_b (t = n_b is the exit action).
        log_pb: log P_B(s_t | s_{t+1}) for t < n_b; 0 at the exit transition (sf has one
            parent) and on padding.
        log_flows: log F(s_t) for t <= n_b, or None when the policy has no flow head.
    """

    log_pf: Tensor
    log_pb: Tensor
    log_flows: Tensor | None


def terminal_log_rewards(env: Env, states: Tensor, conditions: Tensor | None) -> Tensor:
    """log R of terminal `states`, under their `conditions` ``(B, C)`` when given."""
    if conditions is None:
        return env.log_reward(states)
    return env.conditional_log_reward(states, conditions)


ROLLOUTS = ("dynamic", "static")


def _check_exploration(epsilon: float, temperature: float) -> None:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"Invalid epsilon: {epsilon}; it must lie in [0, 1]")
    if not 0.0 < temperature < float("inf"):
        raise ValueError(f"Invalid temperature: {temperature}; it must be positive and finite")


def _exploration_probs(logits: Tensor, mask: Tensor, epsilon: float, temperature: float) -> Tensor:
    """The distribution actions are drawn from: softmax(logits / temperature) over legal
    actions, mixed with weight `epsilon` with the uniform over legal actions, ``(n, A)``.

    Illegal actions get probability exactly 0. A row with no legal action (an environment
    bug) comes out NaN.
    """
    if temperature != 1.0:
        logits = logits / temperature
    probs = torch.where(mask, logits, float("-inf")).softmax(dim=-1)  # (n, A)
    if epsilon > 0.0:
        uniform = mask / mask.sum(dim=-1, keepdim=True)  # (n, A)
        probs = torch.lerp(probs, uniform, epsilon)
    return probs


def _races(shape: tuple[int, ...], generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """Exp(1) draws of `shape`, in one call, clamped above 0 so that `_race`'s division is
    finite. A rollout draws every step's at once, ``(T_max, n, A)``: both rollouts read
    trajectory b's row of step t, so they draw the same actions."""
    races = torch.empty(shape, dtype=dtype, device=generator.device)
    return races.exponential_(generator=generator).clamp_min_(torch.finfo(dtype).tiny)


def _draw(probs: Tensor, generator: torch.Generator) -> Tensor:
    """One action per row of `probs` ``(n, A)``, long ``(n,)``, from fresh races (`_race`)."""
    return _race(probs, _races(probs.shape, generator, probs.dtype))


def _race(probs: Tensor, races: Tensor) -> Tensor:
    """One action per row of `probs` ``(n, A)``, long ``(n,)``, by an exponential race.

    argmax_i p_i / E_i with E_i ~ Exp(1) (`races`, ``(n, A)``, > 0) is i with probability p_i
    (the Gumbel-max trick in probability space; what torch.multinomial does for one sample,
    without its validity checks, which read tensors back to the host). An action with p_i = 0
    scores 0 and a legal one scores > 0, so a masked action is never drawn.
    """
    return (probs / races).argmax(dim=-1)  # (n,)


def static_step(
    gflownet: GFlowNet,
    env: Env,
    states: Tensor,
    done: Tensor,
    races: Tensor,
    conditions: Tensor | None,
    epsilon: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """One lockstep step of every trajectory of a static rollout, fixed shapes throughout.

    Every row is evaluated and stepped: a row `done` ``(n,)`` before this step records the
    padding action, and a row that is done after it keeps its state (the environment steps it
    with action 0, whatever that gives, and the result is dropped). No host sync and no
    data-dependent shape, so ``torch.compile(fullgraph=True)`` traces it whole, and on CUDA it
    can run under CUDA graphs. Returns the recorded actions long ``(n,)``, the new `done` and
    the next states ``(n, *S)``.
    """
    stop = env.stop_action
    features = policy_input(env.featurize(states), conditions)
    logits = gflownet(features).pf_logits  # (n, A)
    probs = _exploration_probs(logits, env.forward_mask(states), epsilon, temperature)
    chosen = _race(probs, races)  # (n,)
    actions = torch.where(done, PAD_ACTION, chosen)  # (n,)
    done = done | (chosen == stop)  # (n,)
    # A finished row takes action 0 (any non-exit action would do) and its result is dropped.
    moved = env.step(states, torch.where(done, 0, chosen))  # (n, *S)
    next_states = torch.where(done.view(-1, *([1] * (states.dim() - 1))), states, moved)
    return actions, done, next_states


def static_steps(
    gflownet: GFlowNet,
    env: Env,
    states: Tensor,
    done: Tensor,
    races: Tensor,
    conditions: Tensor | None,
    epsilon: float,
    temperature: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``k = races.shape[0]`` lockstep steps (`static_step`) in one call, so that a compiled
    chunk pays the call and guard overhead once per k steps. `races` ``(k, n, A)``. Returns
    the actions ``(k, n)``, the states after each step ``(k, n, *S)`` and the final `done`."""
    actions, visited = [], []
    for t in range(races.shape[0]):
        action, done, states = static_step(
            gflownet, env, states, done, races[t], conditions, epsilon, temperature
        )
        actions.append(action)
        visited.append(states)
    return torch.stack(actions), torch.stack(visited), done


def sample_trajectories(
    gflownet: GFlowNet,
    env: Env,
    n: int,
    generator: torch.Generator,
    epsilon: float = 0.0,
    temperature: float = 1.0,
    conditions: Tensor | None = None,
    start_states: Tensor | None = None,
    rollout: str = "dynamic",
    steps_fn: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None,
    chunk: int = 8,
    unique_states: bool = True,
    record_pass: bool = False,
) -> Trajectories:
    """Sample `n` trajectories from s0 with P_F, vectorized over the batch.

    With `start_states` ``(n, *state_shape)`` the trajectories start there instead (local
    search rebuilds the end of a trajectory this way); ``states[0]`` is then the start state.

    On a conditional environment (`envs.base.ConditionalEnv`) each trajectory has a condition
    c: `conditions` ``(n, C)`` if given, else ``env.sample_conditions(n, generator)``; the
    policy sees it at every step and the reward is log R(x | c).

    Exploration changes only which actions are drawn: with probability `epsilon` an action is
    uniform over the legal ones, otherwise it is drawn from softmax(logits / `temperature`).
    Masked actions have probability exactly 0, so they are never taken, and exit is taken
    whenever it is the only legal action. All randomness comes from `generator`: the
    exponential races of every step are drawn in one call up front.

    Two rollouts give the same trajectories from the same generator state:

    - ``"dynamic"`` evaluates only the trajectories still running, and only once per distinct
      state while many share one (s0; with `unique_states`, early steps): the fewest policy
      rows, what a CPU wants at large batches. The batch shrinks (index ops) on steps where
      some trajectory exits. Turn `unique_states` off for a policy whose output for a row
      depends on the rest of the batch (batch norm) or on chance (dropout).
    - ``"static"`` advances every trajectory in lockstep in fixed-size buffers, a finished one
      masked (`static_step`), `chunk` steps per call (`static_steps`): more rows when lengths
      vary, but no data-dependent shape, so a chunk compiles without graph breaks and can run
      under CUDA graphs. `steps_fn` replaces `static_steps` (its compiled form,
      `compile_static_steps`); it must compute the same thing.

    With `record_pass`, on the dynamic rollout of an `MLPPolicy` outside autocast, the batch
    keeps the policy's pass (`SamplingPass`): a loss taken before the next parameter update
    is scored from it, with no second forward pass (`trajectory_log_probs`).

    Both run under `torch.inference_mode()` (no autograd; the results are returned as ordinary
    tensors) and sync with the host once per step (dynamic) or per chunk (static), to stop
    when every trajectory has exited; the log-probabilities for a loss come from
    `trajectory_log_probs`.

    Raises:
        RuntimeError: if a trajectory has not exited after ``env.max_steps`` non-exit actions
            (the environment's forward mask must then allow only exit).
    """
    if n < 1:
        raise ValueError(f"Invalid number of trajectories: {n}; it must be at least 1")
    _check_exploration(epsilon, temperature)
    if rollout not in ROLLOUTS:
        raise ValueError(f"Invalid rollout: {rollout!r}; valid: {', '.join(ROLLOUTS)}")
    if chunk < 1:
        raise ValueError(f"Invalid chunk: {chunk}; it must be at least 1")
    if isinstance(env, ConditionalEnv) and conditions is None:
        conditions = env.sample_conditions(n, generator)  # (n, C)
    # inference_mode, not just no_grad: it also skips autograd's bookkeeping on every op,
    # which is most of the cost of the small per-step ops. The results are cloned out of it.
    with torch.inference_mode():
        current = env.initial_states(n) if start_states is None else start_states  # (n, *S)
        races = _races((env.max_steps + 1, n, env.n_actions), generator)  # (T_max, n, A)
        recorder = None
        if rollout == "static":
            states, actions = _static_rollout(
                gflownet, env, current, races, conditions, epsilon, temperature,
                static_steps if steps_fn is None else steps_fn, chunk,
            )  # fmt: skip
        else:
            policy = getattr(gflownet, "policy", None)
            recorder = (
                _PassRecorder(
                    policy, races.shape[:2], current.device, unique_states and conditions is None
                )
                if record_pass
                and isinstance(policy, MLPPolicy)
                and not torch.is_autocast_enabled(current.device.type)
                else None
            )
            states, actions = _dynamic_rollout(
                gflownet, env, current, races, conditions, epsilon, temperature,
                from_s0=start_states is None, unique_states=unique_states, recorder=recorder,
            )  # fmt: skip
        lengths = (actions != PAD_ACTION).sum(dim=0) - 1  # (n,)
        terminal_states = states[-1]  # (n, *S): rows past s_n repeat the terminal state
        log_rewards = terminal_log_rewards(env, terminal_states, conditions)  # (n,)
    # Clones are ordinary tensors: usable in autograd and in-place outside inference mode.
    return Trajectories(
        states.clone(),
        actions.clone(),
        lengths.clone(),
        terminal_states.clone(),
        log_rewards.clone(),
        None if conditions is None else conditions.clone(),
        None if recorder is None else recorder.finish(actions.shape[0]),
    )


class _PassRecorder:
    """Collects a dynamic rollout's policy passes into a `SamplingPass`."""

    def __init__(
        self, policy: MLPPolicy, shape: torch.Size, device: torch.device, unique_states: bool
    ) -> None:
        self.policy, self.versions = policy, _versions(policy)
        self.unique_states = unique_states
        self.rows = torch.full(shape, PAD_ACTION, dtype=torch.long, device=device)  # (T_max, n)
        self.index = torch.arange(shape[1], device=device)  # (n,), row numbers to slice
        self.states: list[Tensor] = []
        self.masks: list[Tensor] = []
        self.passes: list[MLPActivations] = []
        self.n_rows = 0

    def evaluate(
        self, features: Tensor, states: Tensor, mask: Tensor, inverse: Tensor | None, n: int
    ) -> tuple[PolicyOutput, Tensor]:
        """The policy on `features` of the evaluated `states` ``(U, *S)``, recorded; and for
        each of the `n` running trajectories its row in the recording, long ``(n,)``
        (`inverse` maps trajectories to evaluated states; None: one each, or all at s0)."""
        out, activations = self.policy.record(features)
        u = states.shape[0]
        if inverse is not None:
            rows = inverse + self.n_rows
        elif u == n:
            rows = self.index[:n] + self.n_rows
        else:  # one state for everyone (s0)
            rows = self.index[:1].expand(n) + self.n_rows
        self.states.append(states)
        self.masks.append(mask)
        self.passes.append(activations)
        self.n_rows += u
        return out, rows

    def finish(self, n_steps: int) -> SamplingPass:
        """The recording, for a batch of `n_steps` action rows, each distinct state once
        (with `unique_states`: a state evaluated at several steps, or by several trajectories
        after a step's deduplication stopped, keeps one row, so the backward runs once per
        distinct state as a second forward pass would). Outside inference mode, so its tensors
        are ordinary ones (autograd may save them)."""
        states, masks = torch.cat(self.states), torch.cat(self.masks)  # (R, *S), (R, A)
        rows = self.rows[:n_steps]  # (T, n)
        keep = None
        if self.unique_states:
            keep, inverse = _unique_rows(states)  # (U,), (R,)
            if keep.shape[0] < states.shape[0]:
                states, masks = states[keep], masks[keep]
                rows = torch.where(rows >= 0, inverse[rows.clamp(min=0)], PAD_ACTION)
            else:
                keep = None
        activations = MLPActivations.cat(self.passes, keep)
        return SamplingPass(self.policy, self.versions, states, rows.clone(), masks, activations)


def _dynamic_rollout(
    gflownet: GFlowNet,
    env: Env,
    current: Tensor,
    races: Tensor,
    conditions: Tensor | None,
    epsilon: float,
    temperature: float,
    from_s0: bool,
    unique_states: bool,
    recorder: _PassRecorder | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps only the trajectories still running; states ``(T + 1, n, *S)`` (rows past s_n
    repeat the terminal state) and actions ``(T, n)``.

    The policy runs once per distinct state while states repeat: on one row at s0 (`from_s0`),
    then, with `unique_states`, on the distinct running states for as long as deduplicating
    saves a quarter of the rows and at least `DEDUP_MIN_SAVED` (early steps, where
    trajectories share their first states).
    """
    n, stop, device = current.shape[0], env.stop_action, current.device
    # One allocation each: at most max_steps + 1 actions and max_steps + 2 states.
    states = current.new_empty((races.shape[0] + 1, *current.shape))  # (T_max + 1, n, *S)
    actions = torch.full(races.shape[:2], PAD_ACTION, dtype=torch.long, device=device)
    states[0] = current
    running = None  # None while all n run (`_step_rows`), then their indices
    # States are rows of a hash only when conditions do not enter the policy's input, and a
    # batch of at most DEDUP_MIN_SAVED rows cannot save that many.
    dedup = unique_states and conditions is None and not current.is_floating_point()
    dedup = dedup and n > DEDUP_MIN_SAVED
    for t in range(races.shape[0]):
        if t == 0 and from_s0 and conditions is None:
            evaluated, inverse = current[:1], None  # every trajectory is at s0
        elif dedup:
            evaluated, inverse = _unique_states(current)  # (U, *S), (n_running,)
            saved = current.shape[0] - evaluated.shape[0]  # rows this deduplication saved
            dedup = 4 * saved >= current.shape[0] and saved >= DEDUP_MIN_SAVED  # next step too?
        else:
            evaluated, inverse = current, None
        features = policy_input(env.featurize(evaluated), conditions)
        mask = env.forward_mask(evaluated)  # (U, A)
        if recorder is None:
            logits = gflownet(features).pf_logits  # (U, A)
        else:
            out, rows = recorder.evaluate(features, evaluated, mask, inverse, current.shape[0])
            logits = out.pf_logits
            recorder.rows[_step_rows(t, running)] = rows
        probs = _exploration_probs(logits, mask, epsilon, temperature)
        if inverse is not None:
            probs = probs[inverse]  # (n_running, A)
        elif probs.shape[0] < current.shape[0]:
            probs = probs.expand(current.shape[0], -1)  # (n, A), s0's row for everyone
        chosen = _race(probs, races[_step_rows(t, running)])  # (n_running,)
        actions[_step_rows(t, running)] = chosen
        # Syncs with the host once per step: the loop must know who has exited.
        moving = (chosen != stop).nonzero().squeeze(1)  # (n_moving,)
        if moving.numel() == 0:
            break
        if moving.numel() < chosen.numel():  # some exited: shrink the batch
            running = moving if running is None else running[moving]
            current, chosen = current[moving], chosen[moving]
            if conditions is not None:
                conditions = conditions[moving]
        current = env.step(current, chosen)
        states[_step_rows(t + 1, running)] = current
    else:
        _raise_not_exited(env, n if running is None else running.numel())
    n_steps = t + 1  # T
    actions = actions[:n_steps]  # (T, n)
    lengths = (actions != PAD_ACTION).sum(dim=0) - 1  # (n,)
    terminal_states = states[lengths, torch.arange(n, device=device)]  # (n, *S)
    # Rows after s_n were never written: fill them with the terminal state.
    visited = torch.arange(n_steps + 1, device=device).unsqueeze(1) <= lengths  # (T + 1, n)
    visited = visited.view(*visited.shape, *([1] * (current.dim() - 1)))
    return torch.where(visited, states[: n_steps + 1], terminal_states), actions


def _step_rows(t: int, running: Tensor | None) -> tuple[int] | tuple[int, Tensor]:
    """The index of step `t`'s entries of the running trajectories in a ``(T, n, ...)``
    buffer: the whole row while all run (`running` None; no index op), else theirs."""
    return (t,) if running is None else (t, running)


def _static_rollout(
    gflownet: GFlowNet,
    env: Env,
    current: Tensor,
    races: Tensor,
    conditions: Tensor | None,
    epsilon: float,
    temperature: float,
    steps_fn: Callable[..., tuple[Tensor, Tensor, Tensor]],
    chunk: int,
) -> tuple[Tensor, Tensor]:
    """Steps every trajectory in lockstep, `chunk` steps per call of `steps_fn`
    (`static_steps`); same outputs as `_dynamic_rollout`."""
    n_steps = races.shape[0]  # T_max
    done = torch.zeros(current.shape[0], dtype=torch.bool, device=current.device)  # (n,)
    states, actions = [current.unsqueeze(0)], []
    for start in range(0, n_steps, chunk):
        chunk_races = races[start : start + chunk]  # (k, n, A)
        if chunk_races.shape[0] < chunk:  # the last chunk: steps past T_max are all padding
            chunk_races = F.pad(
                chunk_races, (0, 0, 0, 0, 0, chunk - chunk_races.shape[0]), value=1.0
            )
        chunk_actions, chunk_states, done = steps_fn(
            gflownet, env, current, done, chunk_races, conditions, epsilon, temperature
        )
        current = chunk_states[-1]
        actions.append(chunk_actions)
        states.append(chunk_states)  # a finished trajectory's rows repeat its terminal state
        if done.all():  # syncs with the host
            break
    else:
        _raise_not_exited(env, int((~done).sum()))
    actions = torch.cat(actions)  # (k·chunks, n)
    # T: the last row with an action (one more sync); later rows are padding of the chunk.
    n_rows = int((actions != PAD_ACTION).any(dim=1).sum())
    return torch.cat(states)[: n_rows + 1], actions[:n_rows]  # (T + 1, n, *S), (T, n)


def _raise_not_exited(env: Env, n_running: int) -> None:
    raise RuntimeError(
        f"{n_running} trajectories had not taken the exit action after "
        f"env.max_steps={env.max_steps} steps of {type(env).__name__}; forward_mask "
        "must allow only exit (the last action) once max_steps actions have been taken"
    )


def compile_static_steps(device: torch.device) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """`static_steps` under ``torch.compile(fullgraph=True)``: one graph per chunk, no breaks;
    on CUDA with ``mode="reduce-overhead"`` (CUDA graphs), its outputs cloned out of the
    graph's memory, which the next replay reuses."""
    if device.type != "cuda":
        return torch.compile(static_steps, fullgraph=True, dynamic=False)
    compiled = torch.compile(static_steps, fullgraph=True, dynamic=False, mode="reduce-overhead")

    def steps(*args: Any) -> tuple[Tensor, Tensor, Tensor]:
        torch.compiler.cudagraph_mark_step_begin()
        actions, states, done = compiled(*args)
        return actions.clone(), states.clone(), done.clone()

    return steps


def _unique_rows(states: Tensor) -> tuple[Tensor, Tensor]:
    """One row index per distinct row of `states` ``(N, *S)`` and, for each row, the position
    of its representative among them: ``(representative (U,), inverse (N,))`` with
    ``states[representative][inverse] == states``.

    Rows are hashed to one int64 each (envs/rows.py's seeded hash), the hashes are deduplicated
    with one sort, and the result is checked exactly; on a hash collision, or for floating-point
    states (which rarely repeat), every row is its own representative.
    """
    n = states.shape[0]
    identity = torch.arange(n, device=states.device)
    if states.is_floating_point() or states.is_complex():
        return identity, identity
    keys = row_keys(states.reshape(n, -1).long())  # (N,)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)  # (U,), (N,)
    representative = torch.empty_like(unique_keys).scatter_(0, inverse, identity)  # (U,)
    if not torch.equal(states[representative][inverse], states):  # a collision: astronomically rare
        return identity, identity
    return representative, inverse


def _unique_states(states: Tensor) -> tuple[Tensor, Tensor]:
    """The distinct rows of `states` ``(N, *S)`` and, for each row, its index among them:
    ``(unique (U, *S), inverse (N,))`` with ``unique[inverse] == states`` (`_unique_rows`)."""
    representative, inverse = _unique_rows(states)
    if representative is inverse:  # every row is its own representative
        return states, inverse
    return states[representative], inverse


def _scatter_visited(flat: Tensor, visited: Tensor) -> Tensor:
    """Values of the visited rows ``(N,)`` put back in the ``(T, B)`` layout, 0 elsewhere."""
    return flat.new_zeros(visited.shape).masked_scatter(visited, flat)  # (T, B)


def trajectory_log_probs(
    gflownet: GFlowNet, env: Env, trajectories: Trajectories, unique_states: bool = True
) -> TrajectoryLogProbs:
    """log P_F, log P_B and log F along `trajectories`, from one trunk pass with autograd.

    The trunk runs once on the visited states s_0..s_{n_b} of every trajectory (padding rows
    are never evaluated), and with `unique_states` once per distinct state among them:
    trajectories share their first states, which on an 8^4 HyperGrid at batch 256 cuts the
    rows by 2.5x. That one output serves P_F at s_t (the exit included at s_{n_b}), P_B at s_t
    of the action that led into it, and F(s_t); the result is scattered back to ``(T, B)``
    with zeros on padding. Exploration plays no part: these are the policy's own
    probabilities, whatever drew the actions. Turn `unique_states` off for a policy whose
    output for a row depends on the rest of the batch (batch norm) or on chance (dropout).
    When the batch carries the policy's own sampling pass (`Trajectories.sampling_pass`) and
    `gflownet`'s policy has not changed since, the trunk is not run again: the pass's outputs
    are scored, and with autograd on their gradient flows back through the pass's recorded
    activations (`MLPPolicy.replay`; the same backward over about the same rows).

    Syncs with the host (the number of visited and of distinct states).
    """
    actions = trajectories.actions  # (T, B)
    n_steps, batch = actions.shape
    visited = trajectories.state_mask()  # (T, B)
    flat_actions = actions[visited]  # (N,)
    recorded = trajectories.sampling_pass
    if recorded is not None and recorded.serves(gflownet):
        states, inverse = recorded.states, recorded.rows[visited]  # (U, *S), (N,)
        if torch.is_grad_enabled():
            out = recorded.policy.replay(recorded.activations)
        else:
            out = recorded.policy.split_heads(recorded.activations.output)
        forward_mask = recorded.forward_mask  # (U, A)
    else:
        flat_states = trajectories.states[:n_steps][visited]  # (N, *S)
        conditions = trajectories.conditions
        if conditions is not None:  # a state's output depends on its row's condition
            conditions = conditions.unsqueeze(0).expand(n_steps, *conditions.shape)[visited]
            unique_states = False
        if unique_states:
            states, inverse = _unique_states(flat_states)  # (U, *S), (N,)
        else:
            states, inverse = flat_states, torch.arange(len(flat_states), device=actions.device)
        out = gflownet(policy_input(env.featurize(states), conditions))
        forward_mask = env.forward_mask(states)  # (U, A)

    log_pf_all = masked_log_softmax(out.pf_logits, forward_mask)  # (U, A)
    flat_log_pf = log_pf_all[inverse, flat_actions]  # (N,)
    log_pf = _scatter_visited(flat_log_pf, visited)  # (T, B)

    # P_B at s_t scores the forward action a_{t-1} that led into it; s0 has no parent.
    prev_actions = torch.cat([actions.new_full((1, batch), PAD_ACTION), actions[:-1]])  # (T, B)
    flat_prev = prev_actions[visited]  # (N,)
    has_parent = flat_prev >= 0  # (N,), False at s0
    backward_mask = env.backward_mask(states)  # (U, A - 1)
    if out.pb_logits is None:
        n_parents = backward_mask.sum(dim=1).to(flat_log_pf.dtype)  # (U,)
        flat_log_pb = -torch.log(n_parents[inverse])  # (N,), -(-inf) at s0, masked below
    else:
        log_pb_all = masked_log_softmax(out.pb_logits, backward_mask)  # (U, A - 1)
        flat_log_pb = log_pb_all[inverse, flat_prev.clamp(min=0)]  # (N,)
    flat_log_pb = torch.where(has_parent, flat_log_pb, 0.0)  # (N,)
    # Row t holds log P_B(s_{t-1} | s_t); shift up one so row t scores transition t.
    log_pb_states = _scatter_visited(flat_log_pb, visited)
    log_pb = torch.cat([log_pb_states[1:], log_pb_states.new_zeros(1, batch)])  # (T, B)

    log_flows = None
    if out.log_flow is not None:
        flat_log_flows = out.log_flow[inverse]  # (N,)
        log_flows = _scatter_visited(flat_log_flows, visited)
    return TrajectoryLogProbs(log_pf, log_pb, log_flows)
