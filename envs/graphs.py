"""GraphBuilding: grow an undirected graph with typed nodes, one node or one edge at a time.

A toy of molecule generation (the GFlowNet setting of Bengio et al., 2021, arXiv 2106.04399):
nodes carry a type with a valence, and the reward favours graphs whose every node has exactly
its valence ("saturated molecules"), with a bonus per triangle. States are dense long tensors
so sampling stays vectorized; `featurize` turns them into a torch-geometric `Batch`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch_geometric.data import Batch

from envs.base import Env
from kinetic.errors import ConfigError
from kinetic.validate import check_float, check_int

__all__ = ["GraphBuilding"]


class GraphBuilding(Env):
    r"""Undirected simple graphs on at most ``max_nodes`` slots, built from the empty graph.

    .. code-block:: text

        state   [t_0, …, t_{N−1}, a_0, …, a_{M−1}]   long (N + M,), M = N(N−1)/2
                t_i ∈ {0, …, T−1} the type of slot i, −1 when empty; occupied slots are a
                prefix 0..n−1. a_p ∈ {0, 1} is edge p = (i, j), i < j, in colex order
                p = j(j−1)/2 + i, so the edges among the first n slots are a_0..a_{n(n−1)/2−1}.
                s0 = the empty graph (all t = −1, all a = 0).
        action  t < T:          add a node of type t in slot n          (legal while n < N)
                T + p < T + M:  add edge p = (i, j)                     (legal if j < n, a_p = 0)
                T + M:          stop                                    (legal if n ≥ 1)
        backward actions undo the forward action of the same index:
                t < T:          remove node n−1   (legal if t_{n−1} = t and it has no edge)
                T + p:          remove edge p     (legal if a_p = 1)
        reward  log R(x) = −valence_penalty · Σ_{i<n} |deg_i − valence[t_i]|
                           + triangle_bonus · #triangles(x)

    The parents of a state are exactly its graphs with one edge fewer and, when the last node is
    isolated, the graph without it: a node can only have been appended last, and only before
    its edges. Every state with at least one node is terminal.

    A mode is a saturated graph (every node has degree ``valence[type]``, log R ≥ 0 with the
    triangle bonus on top). With the default valences (1, 2) on 4 slots these are, up to slot
    order, H–H, H–O–H, H–O–O–H, two H–H, the O₃ triangle and the O₄ ring, so the target has
    several separated peaks (the O₃ triangle the highest); these 23 of the 1,098 terminal
    graphs hold 48% of the target mass, and log R is bounded below by
    −valence_penalty·N·(N − 1 + max valence). ``mode_region`` names a mode by an
    isomorphism invariant (type counts, edge and triangle counts): relabelings of one graph
    share a region.

    Sizes: Σ_{n≤N} T^n·2^{n(n−1)/2} states (N = 4, T = 2: 1,099 states, 3,322 edges, built
    by `gfn.state_dag.state_dag` in ~0.02 s; N = 5, T = 2: 33,867 states, ~0.2 s). Exact
    evaluation runs the policy on every state, so `enumerable` stops at `max_enumerable`.

    Args:
        max_nodes: N, the number of node slots (≥ 1). Default: 4.
        n_node_types: T, the number of node types (≥ 1). Default: 2.
        valences: target degree of each type, T ints ≥ 0. Default: ``(1, 2, …, T)``.
        valence_penalty: log-reward lost per unit of valence mismatch (finite, ≥ 0). Default 2.
        triangle_bonus: log-reward gained per triangle (finite). Default: 0.5.
        device: where states live. Default: ``"cpu"``.
    """

    max_enumerable: int = 2_000_000  # states; N = 6, T = 2 (2.1M) is past it

    def __init__(
        self,
        max_nodes: int = 4,
        n_node_types: int = 2,
        valences: Sequence[int] | None = None,
        valence_penalty: float = 2.0,
        triangle_bonus: float = 0.5,
        device: str | torch.device = "cpu",
    ) -> None:
        check_int("env.max_nodes", max_nodes, 1)
        check_int("env.n_node_types", n_node_types, 1)
        if valences is None:
            valences = tuple(range(1, n_node_types + 1))
        valences = tuple(valences)
        if len(valences) != n_node_types or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in valences
        ):
            raise ConfigError(
                f"Invalid env.valences: {list(valences)!r}; expected env.n_node_types="
                f"{n_node_types} ints >= 0"
            )
        check_float("env.valence_penalty", valence_penalty, 0.0)
        check_float("env.triangle_bonus", triangle_bonus)
        self.max_nodes = max_nodes
        self.n_node_types = n_node_types
        self.valences = valences
        self.valence_penalty = float(valence_penalty)
        self.triangle_bonus = float(triangle_bonus)
        self.device = torch.device(device)

        n, m = max_nodes, max_nodes * (max_nodes - 1) // 2
        self.n_edges_max = m
        self.n_actions = n_node_types + m + 1
        self.state_shape = (n + m,)
        self.state_dtype = torch.long
        self.s0 = torch.cat(
            [torch.full((n,), -1, dtype=torch.long), torch.zeros(m, dtype=torch.long)]
        ).to(self.device)
        self.max_steps = n + m
        # Edge p joins slots (edge_i[p], edge_j[p]), colex order: (0,1), (0,2), (1,2), (0,3)...
        j = torch.arange(n).repeat_interleave(torch.arange(n))  # (M,)
        i = torch.arange(m) - j * (j - 1) // 2  # (M,)
        self.edge_i, self.edge_j = i.to(self.device), j.to(self.device)
        self._slots = torch.arange(n, device=self.device)
        self._edge_ids = torch.arange(m, device=self.device)
        self._valence = torch.tensor(valences, dtype=torch.long, device=self.device)
        self._type_ids = torch.arange(n_node_types, device=self.device)  # (T,)

    def __repr__(self) -> str:
        return (
            f"GraphBuilding(max_nodes={self.max_nodes}, n_node_types={self.n_node_types}, "
            f"valences={list(self.valences)}, valence_penalty={self.valence_penalty}, "
            f"triangle_bonus={self.triangle_bonus}, device='{self.device}')"
        )

    # --- views of a state batch ---------------------------------------------------------

    def split(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """Node types ``(B, N)`` (−1 = empty slot) and edge indicators ``(B, M)`` (views)."""
        return states[:, : self.max_nodes], states[:, self.max_nodes :]

    def n_nodes(self, states: Tensor) -> Tensor:
        """Number of nodes of each graph, long ``(B,)``."""
        return (states[:, : self.max_nodes] >= 0).sum(dim=1)

    def degrees(self, states: Tensor) -> Tensor:
        """Degree of each slot, long ``(B, N)`` (0 for empty slots)."""
        _, edges = self.split(states)
        deg = edges.new_zeros(edges.shape[0], self.max_nodes)  # (B, N)
        return deg.index_add_(1, self.edge_i, edges).index_add_(1, self.edge_j, edges)

    def adjacency(self, states: Tensor) -> Tensor:
        """Dense symmetric adjacency, long ``(B, N, N)``."""
        _, edges = self.split(states)
        adj = edges.new_zeros(edges.shape[0], self.max_nodes, self.max_nodes)  # (B, N, N)
        adj[:, self.edge_i, self.edge_j] = edges
        adj[:, self.edge_j, self.edge_i] = edges
        return adj

    def n_triangles(self, states: Tensor) -> Tensor:
        """Number of triangles of each graph, long ``(B,)``: trace(A³)/6."""
        adj = self.adjacency(states).double()  # (B, N, N); exact for these small counts
        return ((adj @ adj) * adj).sum(dim=(1, 2)).div(6).round().long()

    # --- dynamics -----------------------------------------------------------------------

    def forward_mask(self, states: Tensor) -> Tensor:
        """Add-node while slots remain, add-edge between existing unjoined nodes, stop at
        n ≥ 1: bool ``(B, T + M + 1)``."""
        n = self.n_nodes(states)  # (B,)
        _, edges = self.split(states)
        add_node = (n < self.max_nodes).unsqueeze(1).expand(-1, self.n_node_types)  # (B, T)
        add_edge = (self.edge_j < n.unsqueeze(1)) & (edges == 0)  # (B, M)
        stop = (n >= 1).unsqueeze(1)  # (B, 1)
        return torch.cat([add_node, add_edge, stop], dim=1)

    def backward_mask(self, states: Tensor) -> Tensor:
        """Remove the last node (its type's column) when isolated; remove any present edge:
        bool ``(B, T + M)``."""
        types, edges = self.split(states)
        last = (self.n_nodes(states) - 1).clamp(min=0).unsqueeze(1)  # (B, 1)
        last_type = types.gather(1, last)  # (B, 1), −1 at s0
        last_isolated = self.degrees(states).gather(1, last) == 0  # (B, 1)
        remove_node = (last_type == self._type_ids) & last_isolated  # (B, T)
        return torch.cat([remove_node, edges == 1], dim=1)

    def step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Apply add-node / add-edge `actions` ``(B,)``; stop leaves a state unchanged."""
        types, edges = self.split(states)
        actions = actions.unsqueeze(1)  # (B, 1)
        slot = self.n_nodes(states).unsqueeze(1) == self._slots  # (B, N), the next free slot
        types = torch.where(slot & (actions < self.n_node_types), actions, types)
        edges = edges | (self._edge_ids == actions - self.n_node_types).long()  # (B, M)
        return torch.cat([types, edges], dim=1)

    def backward_step(self, states: Tensor, actions: Tensor) -> Tensor:
        """Undo add-node (remove the last node) / add-edge (remove it) `actions` ``(B,)``."""
        types, edges = self.split(states)
        actions = actions.unsqueeze(1)  # (B, 1)
        slot = self.n_nodes(states).unsqueeze(1) - 1 == self._slots  # (B, N), the last node
        types = torch.where(slot & (actions < self.n_node_types), -1, types)
        edges = edges * (self._edge_ids != actions - self.n_node_types).long()  # (B, M)
        return torch.cat([types, edges], dim=1)

    # --- reward and features ------------------------------------------------------------

    def valence_error(self, states: Tensor) -> Tensor:
        """Σ_i |deg_i − valence[t_i]| over the nodes of each graph, long ``(B,)``."""
        types, _ = self.split(states)
        target = self._valence[types.clamp(min=0)]  # (B, N)
        error = (self.degrees(states) - target).abs() * (types >= 0)  # (B, N)
        return error.sum(dim=1)

    def log_reward(self, states: Tensor) -> Tensor:
        """log R(x) (see the class docstring), float32 ``(B,)``; finite and bounded."""
        penalty = self.valence_error(states).float()  # (B,)
        triangles = self.n_triangles(states).float()  # (B,)
        return -self.valence_penalty * penalty + self.triangle_bonus * triangles

    def featurize(self, states: Tensor) -> Batch:
        """A torch-geometric `Batch` of the B graphs (empty ones included).

        ``x``: one-hot node types, float32 ``(n_total, T)``, graph b's nodes in slot order;
        ``edge_index``: both directions of every edge, long ``(2, 2·E_total)``;
        ``batch`` ``(n_total,)`` and ``ptr`` ``(B + 1,)``: the usual PyG graph index and
        offsets; ``n_nodes`` ``(B,)``: nodes per graph (so slot i of graph b is node
        ``ptr[b] + i``). Syncs with the host (the variable node and edge counts).
        """
        types, edges = self.split(states)
        n = self.n_nodes(states)  # (B,)
        ptr = torch.cat([n.new_zeros(1), n.cumsum(0)])  # (B + 1,)
        graph, slot = (types >= 0).nonzero(as_tuple=True)  # (n_total,), graph-major
        x = torch.nn.functional.one_hot(types[graph, slot], self.n_node_types).float()
        edge_graph, edge = edges.nonzero(as_tuple=True)  # (E_total,)
        src = ptr[edge_graph] + self.edge_i[edge]  # (E_total,)
        dst = ptr[edge_graph] + self.edge_j[edge]  # (E_total,)
        edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
        return Batch(x=x, edge_index=edge_index, batch=graph, ptr=ptr, n_nodes=n)

    # --- exact evaluation ---------------------------------------------------------------

    @property
    def n_states(self) -> int:
        """Number of reachable states, Σ_{n=0}^{N} T^n · 2^{n(n−1)/2} (s0 included)."""
        t = self.n_node_types
        return sum(t**n * 2 ** (n * (n - 1) // 2) for n in range(self.max_nodes + 1))

    @property
    def n_terminals(self) -> int:
        """Number of terminal states: every non-empty graph, ``n_states − 1``."""
        return self.n_states - 1

    @property
    def enumerable(self) -> bool:
        """Whether exact evaluation is affordable: at most `max_enumerable` states."""
        return self.n_states <= self.max_enumerable

    def enumerate_terminals(self) -> Tensor:
        """All non-empty graphs, ``(n_terminals, N + M)``: by node count, then types
        (mixed radix, slot 0 most significant), then edges (bit p of the edge code is a_p)."""
        if not self.enumerable:
            raise ValueError(
                f"{self!r} has {self.n_states} states, more than GraphBuilding.max_enumerable"
                f" = {self.max_enumerable}; exact evaluation is limited to smaller graphs"
            )
        chunks = []
        for n in range(1, self.max_nodes + 1):
            m = n * (n - 1) // 2
            n_types, n_edge_sets = self.n_node_types**n, 2**m
            type_code = torch.arange(n_types, device=self.device)  # (T^n,)
            place = self.n_node_types ** torch.arange(n - 1, -1, -1, device=self.device)
            types = type_code.unsqueeze(1) // place % self.n_node_types  # (T^n, n)
            edge_code = torch.arange(n_edge_sets, device=self.device)  # (2^m,)
            edges = edge_code.unsqueeze(1) >> self._edge_ids[:m] & 1  # (2^m, m)
            count = n_types * n_edge_sets
            states = self.s0.repeat(count, 1)  # (count, N + M)
            states[:, :n] = types.repeat_interleave(n_edge_sets, dim=0)
            states[:, self.max_nodes : self.max_nodes + m] = edges.repeat(n_types, 1)
            chunks.append(states)
        return torch.cat(chunks)

    # --- modes --------------------------------------------------------------------------

    def is_mode(self, states: Tensor) -> Tensor:
        """Saturated graphs: every node has degree ``valence[type]``, bool ``(B,)``."""
        return self.valence_error(states) == 0

    def mode_region(self, states: Tensor) -> Tensor:
        """An isomorphism invariant of each graph, long ``(B,)``: type counts, edge count and
        triangle count as one mixed-radix number (isomorphic graphs share it)."""
        types, edges = self.split(states)
        counts = (types.unsqueeze(2) == self._type_ids).sum(dim=1)  # (B, T), each ≤ N
        radix_n = self.max_nodes + 1
        code = (counts * radix_n ** torch.arange(self.n_node_types, device=states.device)).sum(1)
        code = code * (self.n_edges_max + 1) + edges.sum(dim=1)
        n_triangle_max = math.comb(self.max_nodes, 3)
        return code * (n_triangle_max + 1) + self.n_triangles(states)
