"""The reachable-state DAG of an enumerable environment, built once and cached per env.

A batched breadth-first search from s0 finds every reachable state (deduplicated by a 64-bit
row hash checked against the full state, so results are exact), levels them by their longest
path from s0 (correct for DAGs where a state is reachable in different numbers of steps), and
keeps the forward edges as index tensors. `gfn.evaluation` pushes probability mass along it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from envs.base import Env
from envs.rows import as_rows, row_keys

__all__ = [
    "DEFAULT_MAX_STATES",
    "StateDAG",
    "has_modes",
    "implements",
    "is_enumerable",
    "state_dag",
    "terminal_index",
]

DEFAULT_MAX_STATES = 20_000_000
_HASH_SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class StateDAG:
    """Every state reachable from s0, in topological order, with its forward edges.

    Attributes:
        states: the reachable states sorted by level, ``(N, *state_shape)``; row 0 is s0.
            A state's level is the length of the longest path to it from s0, so every edge
            goes from a lower level to a higher one.
        level_ptr: states of level ``l`` are rows ``level_ptr[l]:level_ptr[l + 1]``
            (Python ints, ``n_levels + 1`` of them).
        src, dst, action: the forward non-stop edges, long ``(E,)``, sorted by ``src``.
        edge_ptr: edges leaving level ``l`` are ``edge_ptr[l]:edge_ptr[l + 1]``.
        terminals: ``env.enumerate_terminals()``, ``(T, *state_shape)``.
        terminal_ids: row of each terminal in ``states``, long ``(T,)``.
        key_seed: the row-hash seed (envs/rows.py) the keys below were made with.
        terminal_keys_sorted, terminal_order: the terminals' keys, sorted ``(T,)``, and each
            one's row in ``terminals`` ``(T,)``; `terminal_index` searches them.
    """

    states: Tensor
    level_ptr: list[int]
    src: Tensor
    dst: Tensor
    action: Tensor
    edge_ptr: list[int]
    terminals: Tensor
    terminal_ids: Tensor
    key_seed: int
    terminal_keys_sorted: Tensor
    terminal_order: Tensor

    @property
    def n_states(self) -> int:
        return self.states.shape[0]

    @property
    def n_levels(self) -> int:
        return len(self.level_ptr) - 1


@dataclass
class _CacheEntry:
    env_ref: weakref.ref[Env]
    dag: StateDAG | None = None
    true: tuple[Tensor, float] | None = None
    mode_totals: tuple[int, int] | None = None


_CACHE: dict[int, _CacheEntry] = {}


def _cache_entry(env: Env) -> _CacheEntry:
    """The cache slot of `env`, keyed by identity (envs may define ``__eq__``), freed with it."""
    key = id(env)
    entry = _CACHE.get(key)
    if entry is None or entry.env_ref() is not env:
        ref = weakref.ref(env, lambda _, key=key: _CACHE.pop(key, None))
        entry = _CACHE[key] = _CacheEntry(env_ref=ref)
    return entry


# --- optional hooks -----------------------------------------------------------------------


def implements(env: Env, name: str) -> bool:
    """Whether `env`'s class overrides the optional `Env` hook `name`."""
    return getattr(type(env), name, None) not in (None, getattr(Env, name))


def is_enumerable(env: Env) -> bool:
    """Whether `env` implements ``enumerate_terminals`` (so exact metrics apply) and, for
    environments whose size depends on their arguments, says this instance is small enough
    (an ``enumerable`` attribute, e.g. `GraphBuilding` past ``max_enumerable``)."""
    return implements(env, "enumerate_terminals") and bool(getattr(env, "enumerable", True))


def has_modes(env: Env) -> bool:
    """Whether `env` implements the ``is_mode``/``mode_region`` hooks (so modes are counted)."""
    return implements(env, "is_mode") and implements(env, "mode_region")


def _require_enumerable(env: Env) -> None:
    if not implements(env, "enumerate_terminals"):
        cls = type(env).__name__
        raise NotImplementedError(
            f"exact evaluation needs {cls}.enumerate_terminals(), which {cls} does not "
            "implement: return every terminal state as one tensor (N, *state_shape) to get "
            "exact metrics. Sampled estimates for environments that cannot be enumerated "
            "are not available yet."
        )


def _require_modes(env: Env) -> None:
    if not (implements(env, "is_mode") and implements(env, "mode_region")):
        cls = type(env).__name__
        raise NotImplementedError(
            f"counting modes needs {cls}.is_mode() and {cls}.mode_region(), which {cls} does "
            "not implement both of; implement them, or pass visited=None to skip mode metrics"
        )


# --- building the DAG ---------------------------------------------------------------------


class _HashCollision(Exception):
    """Two distinct states got the same key; rebuild with another row-hash seed."""


def state_dag(env: Env, max_states: int = DEFAULT_MAX_STATES) -> StateDAG:
    """The reachable-state DAG of `env`, built on first use and cached per env object.

    `max_states` bounds the search on the first call only; later calls return the cache.
    The DAG lives on the environment's device (``env.s0.device``), where the sampled states
    are matched against it (`terminal_index`) without a host sync; an environment moved with
    ``env.to(device)`` gets its DAG rebuilt there on the next call.

    Raises:
        NotImplementedError: `env` does not implement ``enumerate_terminals``.
        ValueError: more than `max_states` states, a cycle, a path longer than
            ``env.max_steps``, or ``enumerate_terminals`` disagreeing with the DAG.
    """
    _require_enumerable(env)
    entry = _cache_entry(env)
    if entry.dag is not None and entry.dag.states.device != env.s0.device:  # env.to(device)
        entry.dag, entry.true, entry.mode_totals = None, None, None
    if entry.dag is None:
        for seed in _HASH_SEEDS:
            try:
                entry.dag = _build_dag(env, max_states, seed)
                break
            except _HashCollision:
                continue
        else:
            raise RuntimeError(
                f"hashing the states of {type(env).__name__} collided under every seed in "
                f"{_HASH_SEEDS}; for integer states this has probability ~2^-64, so please "
                "report it with the environment"
            )
    return entry.dag


def _build_dag(env: Env, max_states: int, seed: int) -> StateDAG:
    """Enumerate the DAG of `env`, order it topologically and match its terminals."""
    states, rows, can_stop, src, dst, action = _discover(env, seed, max_states)
    states, rows, can_stop, level, src, dst, action = _topological_order(
        env, states, rows, can_stop, src, dst, action
    )
    n_levels = int(level[-1]) + 1
    terminals, terminal_ids, terminal_keys = _match_terminals(env, states, rows, can_stop, seed)
    terminal_keys_sorted, terminal_order = torch.sort(terminal_keys)
    return StateDAG(
        states=states,
        level_ptr=_pointers(level, n_levels),
        src=src,
        dst=dst,
        action=action,
        edge_ptr=_pointers(level[src], n_levels),
        terminals=terminals,
        terminal_ids=terminal_ids,
        key_seed=seed,
        terminal_keys_sorted=terminal_keys_sorted,
        terminal_order=terminal_order,
    )


def _discover(
    env: Env, seed: int, max_states: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Breadth-first search from s0, one whole frontier per iteration.

    Each state is expanded once; ids follow discovery order, so a frontier's ids are
    contiguous and ``src`` comes out sorted. A sorted key array (merged, not re-sorted, per
    frontier) tells new states from known ones.

    Returns:
        states ``(N, *S)``, rows ``(N, D)``, can_stop ``(N,)``, and src, dst, action ``(E,)``.
    """
    name = type(env).__name__
    stop = env.stop_action
    s0 = env.initial_states(1)  # (1, *S)
    device = s0.device
    state_chunks, row_chunks, stop_chunks = [s0], [as_rows(s0)], []
    src_chunks, dst_chunks, action_chunks = [], [], []
    known_keys = row_keys(row_chunks[0], seed)  # (K,), sorted
    known_ids = torch.zeros(1, dtype=torch.long, device=device)  # (K,), id of each key
    frontier, frontier_ids, n_known = s0, known_ids, 1
    while frontier.shape[0] > 0:
        mask = env.forward_mask(frontier)  # (F, A)
        if mask.dtype != torch.bool or mask.shape != (frontier.shape[0], env.n_actions):
            raise ValueError(
                f"{name}.forward_mask() must return bool (B, n_actions={env.n_actions}), "
                f"got {mask.dtype} {tuple(mask.shape)} for B={frontier.shape[0]}"
            )
        stop_chunks.append(mask[:, stop])
        parent, action = mask[:, :stop].nonzero(as_tuple=True)  # (C,), (C,)
        children = env.step(frontier[parent], action)  # (C, *S)
        child_rows = as_rows(children)  # (C, D)
        keys, inverse = torch.unique(row_keys(child_rows, seed), return_inverse=True)  # (U,), (C,)
        first = torch.full_like(keys, children.shape[0]).scatter_reduce_(
            0, inverse, torch.arange(children.shape[0], device=device), "amin"
        )  # (U,) a representative child per key
        if not torch.equal(child_rows, child_rows[first][inverse]):
            raise _HashCollision
        insert_at = torch.searchsorted(known_keys, keys)  # (U,)
        pos = insert_at.clamp_max(known_keys.shape[0] - 1)
        seen = known_keys[pos] == keys  # (U,)
        ids = torch.empty_like(keys)  # (U,)
        if bool(seen.any()):  # never for graded DAGs such as HyperGrid
            old = known_ids[pos[seen]]
            if not torch.equal(torch.cat(row_chunks)[old], child_rows[first[seen]]):
                raise _HashCollision
            ids[seen] = old
        new = ~seen
        n_new = int(new.sum())
        ids[new] = torch.arange(n_known, n_known + n_new, device=device)
        n_known += n_new
        if n_known > max_states:
            raise ValueError(
                f"{name} has more than max_states={max_states} states reachable from s0; "
                "exact evaluation enumerates them all (raise max_states if memory allows)"
            )
        src_chunks.append(frontier_ids[parent])
        dst_chunks.append(ids[inverse])
        action_chunks.append(action)
        frontier, frontier_ids = children[first[new]], ids[new]
        state_chunks.append(frontier)
        row_chunks.append(child_rows[first[new]])
        known_keys, known_ids = _merge_sorted(
            known_keys, known_ids, insert_at[new], keys[new], frontier_ids
        )
    return (
        torch.cat(state_chunks),
        torch.cat(row_chunks),
        torch.cat(stop_chunks),
        torch.cat(src_chunks),
        torch.cat(dst_chunks),
        torch.cat(action_chunks),
    )


def _merge_sorted(
    keys: Tensor, values: Tensor, insert_at: Tensor, new_keys: Tensor, new_values: Tensor
) -> tuple[Tensor, Tensor]:
    """Insert sorted `new_keys` ``(U,)`` at their `insert_at` positions in sorted `keys` ``(K,)``.

    A linear-time merge (two scatters) instead of re-sorting all K + U keys per frontier.
    """
    n_old, n = keys.shape[0], keys.shape[0] + new_keys.shape[0]
    new_at = insert_at + torch.arange(new_keys.shape[0], device=keys.device)  # (U,)
    # Old key j moves right by the number of new keys inserted at positions <= j.
    shift = torch.bincount(insert_at, minlength=n_old + 1)[:n_old].cumsum_(0)  # (K,)
    old_at = shift.add_(torch.arange(n_old, device=keys.device))  # (K,)
    merged_keys, merged_values = keys.new_empty(n), values.new_empty(n)
    merged_keys[new_at], merged_values[new_at] = new_keys, new_values
    merged_keys[old_at], merged_values[old_at] = keys, values
    return merged_keys, merged_values


def _topological_order(
    env: Env,
    states: Tensor,
    rows: Tensor,
    can_stop: Tensor,
    src: Tensor,
    dst: Tensor,
    action: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Relabel states by longest-path level, so every edge goes forward; sort edges by src.

    Returns:
        states, rows, can_stop, level ``(N,)`` (sorted), src, dst, action ``(E,)``.
    """
    name = type(env).__name__
    level = _longest_path_levels(states.shape[0], src, dst)  # (N,)
    if bool((level < 0).any()):
        on_cycle = level < 0
        raise ValueError(
            f"{name}'s forward transitions contain a cycle: {int(on_cycle.sum())} state(s) "
            f"lie on or after one, e.g. {states[on_cycle.nonzero()[0, 0]].tolist()}; a "
            "GFlowNet environment must be a DAG"
        )
    longest = int(level.max())
    if longest > env.max_steps:
        raise ValueError(
            f"{name} has a trajectory of {longest} non-stop actions, more than "
            f"max_steps={env.max_steps}; max_steps must bound every trajectory"
        )
    if bool((level[1:] < level[:-1]).any()):  # discovery order is not topological
        order = torch.argsort(level, stable=True)  # (N,)
        relabel = torch.empty_like(order)
        relabel[order] = torch.arange(order.shape[0], device=order.device)
        states, rows, can_stop, level = states[order], rows[order], can_stop[order], level[order]
        src, dst = relabel[src], relabel[dst]
        edge_order = torch.argsort(src, stable=True)  # (E,)
        src, dst, action = src[edge_order], dst[edge_order], action[edge_order]
    return states, rows, can_stop, level, src, dst, action


def _match_terminals(
    env: Env, states: Tensor, rows: Tensor, can_stop: Tensor, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Find ``env.enumerate_terminals()`` among the DAG's states; both must list the same
    stop-legal states. Returns terminals ``(T, *S)``, their rows in `states` and their keys."""
    name = type(env).__name__
    terminals = env.enumerate_terminals()  # (T, *S)
    if not isinstance(terminals, Tensor) or terminals.dtype != states.dtype:
        got = terminals.dtype if isinstance(terminals, Tensor) else type(terminals).__name__
        raise ValueError(
            f"{name}.enumerate_terminals() must return a {states.dtype} tensor like the "
            f"states, got {got}"
        )
    if tuple(terminals.shape[1:]) != tuple(states.shape[1:]):
        raise ValueError(
            f"{name}.enumerate_terminals() must return (N, *state_shape="
            f"{tuple(states.shape[1:])}), got {tuple(terminals.shape)}"
        )
    terminals = terminals.to(states.device)
    terminal_rows = as_rows(terminals)  # (T, D)
    terminal_keys = row_keys(terminal_rows, seed)  # (T,)
    node_keys, node_order = torch.sort(row_keys(rows, seed))  # (N,), (N,)
    pos = torch.searchsorted(node_keys, terminal_keys).clamp_max_(node_keys.shape[0] - 1)
    terminal_ids = node_order[pos]  # (T,)
    found = (node_keys[pos] == terminal_keys) & (rows[terminal_ids] == terminal_rows).all(1)
    bad = ~found | ~can_stop[terminal_ids]
    if bool(bad.any()):
        example = terminals[bad.nonzero()[0, 0]].tolist()
        raise ValueError(
            f"{name}.enumerate_terminals() lists {int(bad.sum())} state(s) that are not "
            f"reachable from s0 or where stop is illegal, e.g. {example}"
        )
    n_stoppable = int(can_stop.sum())
    n_listed = torch.unique(terminal_ids).shape[0]
    if n_listed != terminals.shape[0] or n_stoppable != n_listed:
        listed = torch.zeros_like(can_stop).index_fill_(0, terminal_ids, True)
        missing = (can_stop & ~listed).nonzero()
        example = f"; e.g. {states[missing[0, 0]].tolist()} is missing" if len(missing) else ""
        raise ValueError(
            f"{name}.enumerate_terminals() returned {terminals.shape[0]} states but {name} "
            f"can stop in {n_stoppable} distinct reachable states; it must list each of them "
            f"exactly once{example}"
        )
    return terminals, terminal_ids, terminal_keys


def _pointers(sorted_groups: Tensor, n_groups: int) -> list[int]:
    """Start offsets of each group in a sorted group-id vector, plus the end (host list)."""
    counts = torch.bincount(sorted_groups, minlength=n_groups)  # (n_groups,)
    return [0, *torch.cumsum(counts, 0).tolist()]


def _longest_path_levels(n: int, src: Tensor, dst: Tensor) -> Tensor:
    """Longest-path distance from s0 (node 0) of each node, long ``(N,)``; Kahn's algorithm.

    One vectorized peel per level: the nodes whose parents are all placed form the next level.
    Nodes on or downstream of a cycle are never placed and keep level −1.
    """
    device = src.device
    in_degree = torch.bincount(dst, minlength=n)  # (N,)
    dst_by_src = dst  # (E,), edges come sorted by src from _discover
    out_degree = torch.bincount(src, minlength=n)  # (N,)
    out_start = torch.cumsum(out_degree, 0) - out_degree  # (N,)
    level = torch.full((n,), -1, dtype=torch.long, device=device)
    current = (in_degree == 0).nonzero().squeeze(1)  # s0, unless s0 lies on a cycle
    depth = 0
    while current.shape[0] > 0:
        level[current] = depth
        counts = out_degree[current]  # (F,)
        total = int(counts.sum())
        # Edge positions of all out-edges of `current`: each node's start, then +0, +1, ...
        offset = torch.repeat_interleave(
            out_start[current] - (torch.cumsum(counts, 0) - counts), counts, output_size=total
        )
        children = dst_by_src[offset + torch.arange(total, device=device)]  # (F_out,)
        in_degree.index_add_(0, children, torch.full_like(children, -1))
        current = torch.unique(children[in_degree[children] == 0])
        depth += 1
    return level


def terminal_index(env: Env, states: Tensor) -> Tensor:
    """Row of each terminal state in ``env.enumerate_terminals()``, long ``(B,)``; −1 if absent.

    Matching is by 64-bit key only (no host sync), so a state outside the terminal set could
    in principle alias one (probability ~B·T/2^64). Useful to keep a visited mask
    ``visited[terminal_index(env, x)] = True`` during training without syncing (for terminal
    states only: a −1 would mark the last entry).
    """
    dag = state_dag(env)
    keys = row_keys(as_rows(states), dag.key_seed)  # (B,)
    pos = torch.searchsorted(dag.terminal_keys_sorted, keys)  # (B,)
    pos = pos.clamp_max_(dag.terminal_keys_sorted.shape[0] - 1)
    hit = dag.terminal_keys_sorted[pos] == keys  # (B,)
    return torch.where(hit, dag.terminal_order[pos], -1)
