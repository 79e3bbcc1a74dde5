"""check_env: HyperGrid passes quickly; each planted mistake gets its exact sentence."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F

from envs import Env, HyperGrid
from envs.checker import EnvCheckError, check_env, check_masks


def _message(name: str, problems: list[str]) -> str:
    count = f"{len(problems)} problem{'' if len(problems) == 1 else 's'}"
    head = f"{name} does not meet the Env contract; check_env found {count}:"
    return "\n".join([head, *(f"  - {p}" for p in problems)])


def _expect(env: object, *problems: str) -> None:
    """check_env(env) raises with exactly these problems, in this order."""
    message = _message(type(env).__name__, list(problems))
    with pytest.raises(EnvCheckError, match=f"^{re.escape(message)}$") as info:
        check_env(env)
    assert info.value.problems == list(problems)


@pytest.mark.parametrize(
    "env", [HyperGrid(), HyperGrid(ndim=3, height=5), HyperGrid(1, 2)], ids=str
)
def test_hypergrid_passes_in_well_under_a_second(env: HyperGrid) -> None:
    check_env(env)
    start = time.perf_counter()
    check_env(env, seed=1)
    assert time.perf_counter() - start < 1.0  # about 10 ms; train.py runs it before every run


def test_the_message_lists_each_problem_under_one_header() -> None:
    class IntMask(HyperGrid):
        def forward_mask(self, states):
            return super().forward_mask(states).long()

    msg = (
        "IntMask does not meet the Env contract; check_env found 1 problem:\n"
        "  - forward_mask(states) returned dtype torch.int64 for a batch of 4 states; expected "
        "torch.bool. Return a boolean tensor, e.g. mask.bool()."
    )
    with pytest.raises(EnvCheckError, match=f"^{re.escape(msg)}$"):
        check_env(IntMask())
    assert issubclass(EnvCheckError, ValueError)  # train.py's user-error path


class Line(Env):
    """A walk on 0..4 that may stop anywhere: a complete environment in a few lines."""

    n_actions, state_shape, state_dtype, max_steps = 2, (1,), torch.long, 4

    def __init__(self) -> None:
        self.s0 = torch.zeros(self.state_shape, dtype=torch.long)

    def forward_mask(self, states):
        return torch.cat([states < 4, torch.ones_like(states, dtype=torch.bool)], dim=1)

    def backward_mask(self, states):
        return states > 0

    def step(self, states, actions):
        return states + 1

    def backward_step(self, states, actions):
        return states - 1

    def log_reward(self, states):
        return states[:, 0].float()

    def featurize(self, states):
        return F.one_hot(states[:, 0], 5).float()


def test_a_small_custom_env_passes() -> None:
    check_env(Line())


# --- planted mistakes, one per class ------------------------------------------------------


class ScalarLine(Line):
    """A position as a 0-d state: Env.is_initial and the samplers need a state dimension."""

    state_shape = ()


class BatchedS0(HyperGrid):
    """s0 with a batch dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.s0 = torch.zeros(1, 2, dtype=torch.long)


class NoMaxSteps(Env):
    """Forgets max_steps (and everything after the attributes)."""

    n_actions, state_shape, state_dtype = 3, (2,), torch.long
    s0 = torch.zeros(2, dtype=torch.long)
    forward_mask = backward_mask = step = backward_step = log_reward = featurize = None


class WideBackwardMask(HyperGrid):
    """A column for a backward stop, which does not exist."""

    def backward_mask(self, states):
        return torch.cat([states > 0, torch.zeros_like(states[:, :1], dtype=torch.bool)], dim=1)


class TupleStep(HyperGrid):
    """Gymnasium habits: step returns (next_states, rewards)."""

    def step(self, states, actions):
        return super().step(states, actions), self.log_reward(states)


class S0HasParents(HyperGrid):
    """Decrements allowed at 0, so s0 has parents."""

    def backward_mask(self, states):
        return states >= 0


class NeverStop(HyperGrid):
    """The stop column is never True."""

    def forward_mask(self, states):
        return torch.cat([states < self.height - 1, torch.zeros_like(states[:, :1])], dim=1).bool()


class ShortMaxSteps(HyperGrid):
    """max_steps one short of the longest trajectory (1-D: the only offender is [3])."""

    def __init__(self) -> None:
        super().__init__(ndim=1, height=5)
        self.max_steps = 3


class InPlaceStep(HyperGrid):
    """step writes into its input."""

    def step(self, states, actions):
        states[torch.arange(len(states)), actions] += 1
        return states


class NotInverse(HyperGrid):
    """backward_step decrements the mirrored coordinate."""

    def backward_step(self, states, actions):
        return states - self._increments[self.ndim - 1 - actions]


class NoParentAtSum3(HyperGrid):
    """backward_mask forgets the parents of states whose coordinates sum to 3."""

    def backward_mask(self, states):
        return (states > 0) & (states.sum(dim=1, keepdim=True) != 3)


class ForwardOnlyRule(HyperGrid):
    """A forward rule (no action 1 on the last column) that backward_mask does not mirror."""

    def forward_mask(self, states):
        mask = super().forward_mask(states)
        mask[:, 1] &= states[:, 0] < self.height - 1
        return mask


class PermissiveBackwardMask(HyperGrid):
    """Decrementing a coordinate at 0 is allowed (except at s0): walks leave the grid."""

    def backward_mask(self, states):
        return (states >= 0) & ~self.is_initial(states).unsqueeze(1)


class RangeCheckedPermissive(PermissiveBackwardMask):
    """As above, with a forward_mask that rejects states off the grid."""

    def forward_mask(self, states):
        if (states < 0).any():
            raise ValueError("negative coordinate")
        return super().forward_mask(states)


class LogOfZero(HyperGrid):
    """log R with R = 0 outside the corner plateaus."""

    def log_reward(self, states):
        return (self.reward(states) - self.R0).log()


class OneHotWithoutNumClasses(HyperGrid):
    """F.one_hot infers the width from the batch's largest value."""

    def featurize(self, states):
        return F.one_hot(states).flatten(1).float()


class LongFeatures(HyperGrid):
    """featurize forgets .float()."""

    def featurize(self, states):
        return states


class MissingTerminal(HyperGrid):
    """enumerate_terminals drops the origin."""

    def enumerate_terminals(self):
        return super().enumerate_terminals()[1:]


REMEDY_WALK = (
    "expected every backward walk to reach s0 (where backward_mask is all False) within "
    "max_steps steps. Make backward_mask False for actions that have no parent, e.g. at the "
    "edges of the state space."
)

PLANTED = {
    ScalarLine: [
        "state_shape is (); expected a non-empty tuple of ints, the shape of one state, e.g. "
        "(2,), or (1,) for one number."
    ],
    BatchedS0: [
        "s0 has shape (1, 2); expected state_shape (2,), since s0 is one state, without a "
        "batch dimension."
    ],
    NoMaxSteps: [
        "max_steps is not set; expected an int >= 1 that bounds the non-stop actions of every "
        "trajectory. Set self.max_steps in __init__."
    ],
    WideBackwardMask: [
        "backward_mask(states) returned shape (4, 3) for a batch of 4 states; expected (4, 2) "
        "= (B, n_actions - 1): backward action a undoes forward action a, and there is no "
        "backward stop."
    ],
    TupleStep: [
        "step(states, actions) returned a tuple for a batch of 4 states; expected a torch.int64 "
        "tensor of shape (4, 2). Return only the states; rewards come from log_reward."
    ],
    S0HasParents: [
        "backward_mask(initial_states(1)) allowed backward actions [0, 1] at s0; expected none, "
        "since s0 has no parent. Return all False at s0."
    ],
    NeverStop: [
        "forward_mask(states) allowed no action at all in some states the rollouts reached, "
        "e.g. [7, 7]; expected at least one legal action in every reachable state. Allow stop "
        "(action 2) where nothing else is legal.",
        "forward_mask(states) never allowed stop (action 2, the last) in any state the rollouts "
        "reached; expected stop to be legal wherever a trajectory may end. Set the last mask "
        "column True in terminal states.",
        "forward_mask(enumerate_terminals()) disallowed stop at every listed state, e.g. "
        "[0, 0]; expected stop to be legal at every terminal state. List only states where a "
        "trajectory may end.",
    ],
    ShortMaxSteps: [
        "forward_mask(states) still allowed non-stop actions [0] at [3], which a rollout "
        "reached with max_steps=3 non-stop actions; expected only stop to be legal there, "
        "since max_steps bounds every trajectory. Raise max_steps, or allow only stop once "
        "max_steps actions have been taken."
    ],
    InPlaceStep: [
        "step(states, actions) modified its input states in place; expected them unchanged, "
        "since samplers and losses reuse every state they pass. Compute a new tensor, e.g. "
        "states.clone() before writing into it."
    ],
    NotInverse: [
        "backward_step(step(s, a), a) returned a state other than s for every rollout "
        "transition, e.g. [1, -1] for s = [0, 0], a = 0; expected s, since backward action a "
        "undoes forward action a. Make backward_step the exact inverse of step."
    ],
    NoParentAtSum3: [
        "backward_mask(step(s, a))[a] was False for some rollout transitions, e.g. s = [0, 2], "
        "a = 0; expected True, since the action that led to a state must be legal backward "
        "from it (backward action a undoes forward action a)."
    ],
    ForwardOnlyRule: [
        "backward_mask(s)[b] was True for s = [7, 3], b = 1, met on a backward walk from a "
        "terminal state, but its parent p = backward_step(s, b) = [7, 2] does not lead back to "
        "s (forward_mask(p)[b] is False or step(p, b) != s); expected backward_mask to allow "
        "only real parents. Make backward_mask(s)[b] False where s has no parent by b."
    ],
    PermissiveBackwardMask: [
        "backward_mask(states) allowed no backward action at [-1, -1], which is not s0, "
        "reached by a backward walk from a terminal state; expected backward walks to end only "
        "at s0. Either backward_mask allowed a parent that does not exist on the way there "
        "(e.g. off the edge of the state space), or it misses this state's real parents.",
        "backward_mask(states) still allowed backward actions at [-1, 0] after max_steps=14 "
        f"backward steps from a terminal state; {REMEDY_WALK}",
    ],
    RangeCheckedPermissive: [
        "forward_mask(p) or step(p, b) raised ValueError: negative coordinate on parents p = "
        "backward_step(s, b) of states s met on backward walks from terminal states; expected "
        "backward_mask(s)[b] to allow only real parents, on which every method works. Make "
        "backward_mask(s)[b] False where s has no parent by b."
    ],
    LogOfZero: [
        "log_reward(states) returned non-finite values for some of the 64 terminal states the "
        "rollouts reached, e.g. -inf for [0, 2]; expected finite log-rewards, i.e. R > 0 "
        "everywhere. Keep R positive, e.g. with a small floor: (reward + 1e-6).log()."
    ],
    OneHotWithoutNumClasses: [
        "featurize(states) returned 16 features per state for the states the rollouts reached "
        "but 2 for initial_states(1); expected one width for every batch, since the policy "
        "reads its input width from featurize(initial_states(1)). Fix the width, e.g. "
        "F.one_hot(x, num_classes=k) rather than F.one_hot(x)."
    ],
    LongFeatures: [
        "featurize(initial_states(1)) returned dtype torch.int64; expected a floating-point "
        "dtype, the policy network's input. Convert with .float()."
    ],
    MissingTerminal: [
        "enumerate_terminals() does not list [0, 0], where a rollout could stop; expected "
        "every reachable state where stop is legal. Add such states, or disallow stop there."
    ],
}


@pytest.mark.parametrize("env_class", PLANTED, ids=lambda cls: cls.__name__)
def test_planted_mistake_gets_its_sentence(env_class: type) -> None:
    _expect(env_class(), *PLANTED[env_class])


def test_every_problem_is_collected_not_just_the_first() -> None:
    class TwoMistakes(InPlaceStep, LogOfZero):
        pass

    _expect(TwoMistakes(), *PLANTED[InPlaceStep], *PLANTED[LogOfZero])


def test_each_check_also_runs_alone() -> None:
    env = WideBackwardMask()
    assert check_masks(env, env.initial_states(4)) == PLANTED[WideBackwardMask]
    assert check_masks(HyperGrid(), HyperGrid().initial_states(3)) == []


def test_not_an_env_and_bad_arguments() -> None:
    class Duck:
        pass

    _expect(
        Duck(),
        "Duck is not a subclass of envs.base.Env; expected class Duck(Env), which also "
        "supplies initial_states, stop_action and the optional hooks.",
    )
    with pytest.raises(ValueError, match=r"^Invalid n_trajectories: 0; expected an int >= 1$"):
        check_env(HyperGrid(), n_trajectories=0)


def test_graph_featurize_is_a_batch_of_one_graph_per_state() -> None:
    from torch_geometric.data import Batch, Data

    class Graphs(HyperGrid):
        extra = 0  # graphs returned beyond one per state

        def featurize(self, states):
            x = F.one_hot(states, self.height).float()  # (B, D, H): a node per coordinate
            n = states.shape[0] + self.extra
            return Batch.from_data_list([Data(x=x[min(i, len(x) - 1)]) for i in range(n)])

    check_env(Graphs(ndim=2, height=3), n_trajectories=8)
    wrong = Graphs(ndim=2, height=3)
    wrong.extra = 1
    _expect(
        wrong,
        "featurize(initial_states(1)) returned a Batch of 2 graphs for 1 state; expected 1, "
        "one graph per state.",
    )
