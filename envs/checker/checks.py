"""The contract checks: small ``check_<property>(env, ...)`` functions, each returning the
problems it finds as sentences (messages.py words them). Those before any rollout probe
`PROBE_SIZE` copies of s0; the others check what `random_rollouts` met."""

from __future__ import annotations

import torch
from torch import Tensor

from envs.base import Env
from envs.checker.messages import (
    PROBE_SIZE,
    ROLLOUTS,
    _batch,
    _output_problems,
    _raised_on_parents,
    _show,
    _states,
    _which,
)
from envs.checker.rollouts import Rollouts, _call, _example, _keys, _rows, _same, _smallest


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# --- before any rollout -------------------------------------------------------------------

_ATTRIBUTES = {
    "n_actions": "an int >= 2, the number of forward actions with stop (the last) included",
    "state_shape": "a non-empty tuple of ints, the shape of one state, e.g. (2,), or (1,) for "
    "one number",
    "state_dtype": "a torch.dtype such as torch.long",
    "s0": "the initial state, a tensor of shape state_shape and dtype state_dtype",
    "max_steps": "an int >= 1 that bounds the non-stop actions of every trajectory",
}


def check_attributes(env: Env) -> list[str]:
    """`n_actions`, `state_shape`, `state_dtype`, `s0` and `max_steps` exist with the right
    types, and `s0` is one state of `state_shape` and `state_dtype`."""
    missing = [name for name in _ATTRIBUTES if not hasattr(env, name)]
    if missing:
        return [
            f"{name} is not set; expected {_ATTRIBUTES[name]}. Set self.{name} in __init__."
            for name in missing
        ]
    shape, dtype, s0 = env.state_shape, env.state_dtype, env.s0
    valid = {
        "n_actions": _is_int(env.n_actions, 2),
        "state_shape": isinstance(shape, tuple)
        and len(shape) > 0
        and all(_is_int(d, 0) for d in shape),
        "state_dtype": isinstance(dtype, torch.dtype),
        "s0": isinstance(s0, Tensor),
        "max_steps": _is_int(env.max_steps, 1),
    }
    problems = [
        f"{name} is {f'a {type(s0).__name__}' if name == 's0' else repr(getattr(env, name))}; "
        f"expected {_ATTRIBUTES[name]}."
        for name, ok in valid.items()
        if not ok
    ]
    if valid["s0"] and valid["state_shape"] and tuple(s0.shape) != shape:
        problems.append(
            f"s0 has shape {tuple(s0.shape)}; expected state_shape {shape}, since s0 is one "
            "state, without a batch dimension."
        )
    if valid["s0"] and valid["state_dtype"] and s0.dtype != dtype:
        problems.append(
            f"s0 has dtype {s0.dtype}; expected state_dtype {dtype}. Create it with "
            "dtype=self.state_dtype."
        )
    return problems


def check_initial_states(env: Env, n: int = PROBE_SIZE) -> list[str]:
    """`initial_states(n)` returns `n` copies of s0, ``(n, *state_shape)`` in `state_dtype`."""
    call, shape = f"initial_states({n})", (n, *env.state_shape)
    states = env.initial_states(n)
    if not isinstance(states, Tensor):
        return [f"{call} returned a {type(states).__name__}; expected a tensor of shape {shape}."]
    if tuple(states.shape) != shape:
        got = tuple(states.shape)
        return [f"{call} returned shape {got}; expected {shape} = (n, *state_shape)."]
    if states.dtype != env.state_dtype:
        return [f"{call} returned dtype {states.dtype}; expected state_dtype {env.state_dtype}."]
    differ = ~_same(states, env.s0.expand_as(states))  # (n,)
    if differ.any():
        return [
            f"{call} returned states other than s0, e.g. {_show(_example(states, differ))}; "
            f"expected {n} copies of s0. The inherited Env.initial_states does this: drop the "
            "override or fix it."
        ]
    return []


def check_masks(env: Env, states: Tensor) -> list[str]:
    """`forward_mask` and `backward_mask` return bool ``(B, n_actions)`` and
    ``(B, n_actions - 1)``."""
    n, batch = states.shape[0], _batch(states)
    return [
        *_output_problems(env, "forward_mask(states)", _call(env.forward_mask, states), batch, n),
        *_output_problems(env, "backward_mask(states)", _call(env.backward_mask, states), batch, n),
    ]


def check_s0_has_no_parent(env: Env) -> list[str]:
    """`backward_mask` is all False at s0, which has no parent."""
    legal = _call(env.backward_mask, env.initial_states(1))[0].nonzero().flatten().tolist()
    if legal:
        return [
            f"backward_mask(initial_states(1)) allowed backward actions {legal} at s0; expected "
            "none, since s0 has no parent. Return all False at s0."
        ]
    return []


def check_step(env: Env, states: Tensor, actions: Tensor) -> list[str]:
    """`step` returns one next state per row, ``(B, *state_shape)`` in `state_dtype`."""
    out = _call(env.step, states, actions)
    return _output_problems(env, "step(states, actions)", out, _batch(states), states.shape[0])


# --- on the rollouts ----------------------------------------------------------------------


def check_legal_actions(env: Env, rollouts: Rollouts) -> list[str]:
    """Every state the rollouts reached has a legal action, and stop is legal somewhere."""
    problems, stop, masks = [], env.stop_action, rollouts.masks
    dead = ~masks.any(dim=1)  # (V,)
    if dead.any():
        problems.append(
            f"forward_mask(states) allowed no action at all in {_which(dead, 'state')}{ROLLOUTS}"
            f", e.g. {_show(_example(rollouts.states, dead))}; expected at least one legal "
            f"action in every reachable state. Allow stop (action {stop}) where nothing else is "
            "legal."
        )
    if masks.shape[0] and not masks[:, stop].any():
        problems.append(
            f"forward_mask(states) never allowed stop (action {stop}, the last) in any state"
            f"{ROLLOUTS}; expected stop to be legal wherever a trajectory may end. Set the last "
            "mask column True in terminal states."
        )
    return problems


def check_max_steps(env: Env, rollouts: Rollouts) -> list[str]:
    """Once `max_steps` non-stop actions have been taken, only stop is legal."""
    moves = rollouts.masks[:, : env.stop_action]  # (V, A - 1)
    deep = (rollouts.depths == env.max_steps) & moves.any(dim=1)  # (V,)
    if not deep.any():
        return []
    i = _smallest(_rows(rollouts.states[deep]))
    return [
        f"forward_mask(states) still allowed non-stop actions "
        f"{moves[deep][i].nonzero().flatten().tolist()} at {_show(rollouts.states[deep][i])}, "
        f"which a rollout reached with max_steps={env.max_steps} non-stop actions; expected "
        "only stop to be legal there, since max_steps bounds every trajectory. Raise "
        "max_steps, or allow only stop once max_steps actions have been taken."
    ]


def check_inputs_unchanged(env: Env, rollouts: Rollouts) -> list[str]:
    """No method writes into the states it is given (samplers keep every visited state)."""
    r, problems = rollouts, []
    for call, method, states, args in (
        ("forward_mask(states)", env.forward_mask, r.states, ()),
        ("backward_mask(states)", env.backward_mask, r.states, ()),
        ("step(states, actions)", env.step, r.parents, (r.actions,)),
        ("backward_step(states, actions)", env.backward_step, r.children, (r.actions,)),
        ("log_reward(states)", env.log_reward, r.terminals, ()),
        ("featurize(states)", env.featurize, r.states, ()),
    ):
        copy = states.clone()
        if states.shape[0] and (method(copy, *args), not torch.equal(copy, states))[1]:
            problems.append(
                f"{call} modified its input states in place; expected them unchanged, since "
                "samplers and losses reuse every state they pass. Compute a new tensor, e.g. "
                "states.clone() before writing into it."
            )
    return problems


def check_backward_step(env: Env, rollouts: Rollouts) -> list[str]:
    """On every rollout transition s -a-> s': ``backward_mask(s')[a]`` is True and
    ``backward_step(s', a) == s``."""
    parents, actions, children = rollouts.parents, rollouts.actions, rollouts.children
    n, batch = children.shape[0], _batch(children, ROLLOUTS)
    if n == 0:
        return []
    mask = _call(env.backward_mask, children)
    problems = _output_problems(env, "backward_mask(states)", mask, batch, n)
    if not problems:
        bad = ~mask[torch.arange(n, device=mask.device), actions]  # (E,)
        if bad.any():
            i = _smallest(_rows(parents[bad]), actions[bad, None])
            problems.append(
                f"backward_mask(step(s, a))[a] was False for {_which(bad, 'rollout transition')}"
                f", e.g. s = {_show(parents[bad][i])}, a = {int(actions[bad][i])}; expected "
                "True, since the action that led to a state must be legal backward from it "
                "(backward action a undoes forward action a)."
            )
    back = _call(env.backward_step, children, actions)
    malformed = _output_problems(env, "backward_step(states, actions)", back, batch, n)
    if malformed:
        return problems + malformed
    bad = ~_same(back, parents)  # (E,)
    if bad.any():
        i = _smallest(_rows(parents[bad]), actions[bad, None])
        problems.append(
            f"backward_step(step(s, a), a) returned a state other than s for "
            f"{_which(bad, 'rollout transition')}, e.g. {_show(back[bad][i])} for s = "
            f"{_show(parents[bad][i])}, a = {int(actions[bad][i])}; expected s, since backward "
            "action a undoes forward action a. Make backward_step the exact inverse of step."
        )
    return problems


def check_backward_walks(env: Env, rollouts: Rollouts, generator: torch.Generator) -> list[str]:
    """Random walks that follow `backward_mask` from the terminal states the rollouts reached
    end at s0 (the only state without a parent) within `max_steps` steps, and every parent
    ``p = backward_step(s, b)`` on the way leads back to s by forward action b.

    Presumes `backward_step` undoes `step` (`check_backward_step`) and s0 has no parent.
    """
    found: dict[str, str] = {}  # the first example of each kind of problem
    current, where = rollouts.terminals, " that backward walks from terminal states reached"
    for depth in range(env.max_steps + 1):
        n = current.shape[0]
        if n == 0:
            break
        mask = _call(env.backward_mask, current)  # (B, A - 1)
        malformed = _output_problems(env, "backward_mask(states)", mask, _batch(current, where), n)
        if malformed:
            return [*found.values(), *malformed]
        has_parent = mask.any(dim=1)  # (B,)
        orphan = ~has_parent & ~_same(current, env.s0.expand_as(current))  # (B,)
        if orphan.any():
            found.setdefault("orphan", (
                f"backward_mask(states) allowed no backward action at "
                f"{_show(_example(current, orphan))}, which is not s0, reached by a backward "
                "walk from a terminal state; expected backward walks to end only at s0. Either "
                "backward_mask allowed a parent that does not exist on the way there (e.g. off "
                "the edge of the state space), or it misses this state's real parents."
            ))  # fmt: skip
        if depth == env.max_steps and has_parent.any():
            found["deep"] = (
                f"backward_mask(states) still allowed backward actions at "
                f"{_show(_example(current, has_parent))} after max_steps={env.max_steps} "
                "backward steps from a terminal state; expected every backward walk to reach "
                "s0 (where backward_mask is all False) within max_steps steps. Make "
                "backward_mask False for actions that have no parent, e.g. at the edges of the "
                "state space."
            )
        if depth == env.max_steps:
            break
        scores = torch.rand(mask.shape, generator=generator).to(mask.device)  # (B, A - 1)
        b = scores.masked_fill(~mask, -1.0).argmax(dim=1)[has_parent]  # (B',)
        s = current[has_parent]  # (B', *S)
        batch = _batch(s, where)
        p = _call(env.backward_step, s, b)  # (B', *S)
        malformed = _output_problems(env, "backward_step(states, actions)", p, batch, len(s))
        if not malformed:
            try:  # p may be no state at all if backward_mask is too permissive
                forward, again = _call(env.forward_mask, p), _call(env.step, p, b)
            except Exception as err:  # reported, with backward_mask as the likely cause
                return [*found.values(), _raised_on_parents(err)]
            malformed = [
                *_output_problems(env, "forward_mask(states)", forward, batch, len(s)),
                *_output_problems(env, "step(states, actions)", again, batch, len(s)),
            ]
        if malformed:
            return [*found.values(), *malformed]
        fake = ~forward[torch.arange(len(s), device=forward.device), b] | ~_same(again, s)
        if fake.any():
            i = _smallest(_rows(s[fake]), b[fake, None])
            found.setdefault("fake", (
                f"backward_mask(s)[b] was True for s = {_show(s[fake][i])}, b = "
                f"{int(b[fake][i])}, met on a backward walk from a terminal state, but its "
                f"parent p = backward_step(s, b) = {_show(p[fake][i])} does not lead back to s "
                "(forward_mask(p)[b] is False or step(p, b) != s); expected backward_mask to "
                "allow only real parents. Make backward_mask(s)[b] False where s has no parent "
                "by b."
            ))  # fmt: skip
        current = p
    return list(found.values())


def check_log_reward(env: Env, states: Tensor, where: str = ROLLOUTS) -> list[str]:
    """`log_reward` returns finite floats ``(B,)`` on terminal `states`; `where` says where
    they came from, e.g. " the rollouts reached"."""
    n = states.shape[0]
    call, batch = "log_reward(states)", f"the {n} terminal states{where}"
    out = _call(env.log_reward, states) if n else torch.zeros(0)
    if not isinstance(out, Tensor):
        return [
            f"{call} returned a {type(out).__name__} for {batch}; expected a float tensor of "
            f"shape ({n},)."
        ]
    if tuple(out.shape) != (n,):
        return [
            f"{call} returned shape {tuple(out.shape)} for {batch}; expected ({n},), one "
            "log-reward per state."
        ]
    if not out.is_floating_point():
        return [
            f"{call} returned dtype {out.dtype} for {batch}; expected a floating-point dtype "
            "such as torch.float32. Convert with .float()."
        ]
    bad = ~torch.isfinite(out)  # (B,)
    if bad.any():
        i = _smallest(_rows(states[bad]))
        return [
            f"{call} returned non-finite values for {'every one' if bad.all() else 'some'} of "
            f"{batch}, e.g. {float(out[bad][i])} for {_show(states[bad][i])}; expected finite "
            "log-rewards, i.e. R > 0 everywhere. Keep R positive, e.g. with a small floor: "
            "(reward + 1e-6).log()."
        ]
    return []


def _is_graph_batch(out: object) -> bool:
    """Whether `out` is a torch-geometric ``Batch`` (imported only when it might be one)."""
    if isinstance(out, Tensor):
        return False
    from torch_geometric.data import Batch

    return isinstance(out, Batch)


def check_featurize(env: Env, states: Tensor) -> list[str]:
    """`featurize` gives a float tensor ``(B, n_features)`` of one width for every batch (the
    policy reads its width from ``featurize(initial_states(1))``), or a torch-geometric
    ``Batch`` of B graphs."""
    first = _call(env.featurize, env.initial_states(1))
    out = _call(env.featurize, states)
    expected = "a float tensor (B, n_features), or a torch_geometric.data.Batch of B graphs"
    for call, value, n in (
        ("featurize(initial_states(1))", first, 1),
        ("featurize(states)", out, states.shape[0]),
    ):
        if _is_graph_batch(value):
            if value.num_graphs != n:
                return [
                    f"{call} returned a Batch of {value.num_graphs} graphs for {_states(n)}; "
                    f"expected {n}, one graph per state."
                ]
        elif not isinstance(value, Tensor):
            return [f"{call} returned a {type(value).__name__}; expected {expected}."]
        elif value.dim() != 2 or value.shape[0] != n:
            return [
                f"{call} returned shape {tuple(value.shape)} for {_states(n)}; expected "
                f"({n}, n_features), one row of features per state. Flatten each state's "
                "features, e.g. features.flatten(1)."
            ]
        elif not value.is_floating_point():
            return [
                f"{call} returned dtype {value.dtype}; expected a floating-point dtype, the "
                "policy network's input. Convert with .float()."
            ]
    if isinstance(first, Tensor) != isinstance(out, Tensor):
        return [
            f"featurize(states) returned a {type(out).__name__} for the states{ROLLOUTS} but a "
            f"{type(first).__name__} for initial_states(1); expected the same kind every time."
        ]
    if not isinstance(out, Tensor):
        return []  # graph batches: their node and edge features are the policy's to check
    problems = []
    if out.shape[1] != first.shape[1]:
        problems.append(
            f"featurize(states) returned {out.shape[1]} features per state for the states"
            f"{ROLLOUTS} but {first.shape[1]} for initial_states(1); expected one width for "
            "every batch, since the policy reads its input width from "
            "featurize(initial_states(1)). Fix the width, e.g. F.one_hot(x, num_classes=k) "
            "rather than F.one_hot(x)."
        )
    bad = ~torch.isfinite(out).all(dim=1)  # (B,)
    if bad.any():
        problems.append(
            f"featurize(states) returned non-finite features for "
            f"{_show(_example(states, bad))}; expected finite features."
        )
    return problems


def check_devices(env: Env, rollouts: Rollouts) -> list[str]:
    """Every method returns its tensors on the device of the states it was given (the trainer
    moves an environment with ``env.to(device)``; methods must follow their input there)."""
    device = rollouts.states.device
    calls = {
        "forward_mask(states)": lambda: env.forward_mask(rollouts.states.clone()),
        "backward_mask(states)": lambda: env.backward_mask(rollouts.states.clone()),
        "step(states, actions)": lambda: env.step(rollouts.parents.clone(), rollouts.actions),
        "backward_step(states, actions)": lambda: env.backward_step(
            rollouts.children.clone(), rollouts.actions
        ),
        "log_reward(states)": lambda: env.log_reward(rollouts.terminals.clone()),
        "featurize(states)": lambda: env.featurize(rollouts.states.clone()),
    }
    problems = []
    for call, method in calls.items():
        out = method()
        tensors = [out] if isinstance(out, Tensor) else []
        if _is_graph_batch(out):
            tensors = [t for t in (out.x, out.edge_index) if isinstance(t, Tensor)]
        wrong = next((t.device for t in tensors if t.device != device), None)
        if wrong is not None:
            problems.append(
                f"{call} returned a tensor on {wrong} for states on {device}; expected it on "
                "the states' device. Create new tensors there, e.g. torch.zeros(n, "
                "device=states.device) or torch.zeros_like(states); tensors set in __init__ "
                "follow env.to(device)."
            )
    return problems


def check_enumerate_terminals(env: Env, terminals: Tensor, rollouts: Rollouts) -> list[str]:
    """`terminals`, what ``enumerate_terminals()`` returned, lists each terminal state once,
    ``(N, *state_shape)`` in `state_dtype`, with stop legal at each, and includes every state
    where the rollouts could stop."""
    call, stop = "enumerate_terminals()", env.stop_action
    shape = f"(N, *state_shape) = (N, {', '.join(map(str, env.state_shape))})"
    if not isinstance(terminals, Tensor):
        return [f"{call} returned a {type(terminals).__name__}; expected a tensor {shape}."]
    if terminals.dim() != 1 + len(env.state_shape) or terminals.shape[1:] != env.state_shape:
        return [f"{call} returned shape {tuple(terminals.shape)}; expected {shape}."]
    if terminals.dtype != env.state_dtype:
        return [f"{call} returned dtype {terminals.dtype}; expected state_dtype {env.state_dtype}."]
    device = rollouts.states.device
    if terminals.device != device:
        return [
            f"{call} returned a tensor on {terminals.device} for an environment on {device}; "
            "expected it on the environment's device. Create it there, e.g. "
            "torch.arange(n, device=self.s0.device)."
        ]
    n = terminals.shape[0]
    if n == 0:
        return [f"{call} returned no states; expected every terminal state."]
    mask = _call(env.forward_mask, terminals)  # (N, A)
    problems = _output_problems(env, "forward_mask(states)", mask, f"the {n} states of {call}", n)
    if problems:
        return problems
    if not mask[:, stop].all():
        no_stop = ~mask[:, stop]  # (N,)
        problems.append(
            f"forward_mask(enumerate_terminals()) disallowed stop at "
            f"{_which(no_stop, 'listed state')}, e.g. {_show(_example(terminals, no_stop))}; "
            "expected stop to be legal at every terminal state. List only states where a "
            "trajectory may end."
        )
    rows = _rows(terminals)  # (N, D)
    keys, order = torch.sort(_keys(rows))  # (N,): sorted by hash, rows compared exactly
    rows = rows[order]
    repeated = (keys[1:] == keys[:-1]) & (rows[1:] == rows[:-1]).all(dim=1)  # (N - 1,)
    if repeated.any():
        problems.append(
            f"{call} listed {_show(_example(terminals[order[1:]], repeated))} more than once; "
            "expected each terminal state exactly once."
        )
    stoppable = rollouts.states[rollouts.masks[:, stop]]  # (M, *S)
    stoppable_rows = _rows(stoppable)  # (M, D)
    stoppable_keys = _keys(stoppable_rows)  # (M,)
    pos = torch.searchsorted(keys, stoppable_keys).clamp_max_(n - 1)  # (M,)
    missing = (keys[pos] != stoppable_keys) | (rows[pos] != stoppable_rows).any(dim=1)  # (M,)
    if missing.any():
        problems.append(
            f"{call} does not list {_show(_example(stoppable, missing))}, where a rollout could "
            "stop; expected every reachable state where stop is legal. Add such states, or "
            "disallow stop there."
        )
    return problems
