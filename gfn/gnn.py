"""A graph neural network policy for graph-building environments (`envs.graphs`).

It eats the torch-geometric `Batch` of `GraphBuilding.featurize` and returns the same
`PolicyOutput` as `MLPPolicy`, laid out over the environment's fixed action space: one logit
per node type (add / remove a node), one per slot pair (add / remove an edge), and stop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Batch
from torch_geometric.nn import GINConv, global_add_pool

from envs.base import Env
from gfn.policies import PolicyOutput, check_policy_arguments, has_learned_backward
from kinetic.errors import ConfigError
from kinetic.validate import check_int

__all__ = ["GNNPolicy", "build_gnn_policy"]


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class GNNPolicy(nn.Module):
    r"""GIN message passing (Xu et al., arXiv 1810.00826), pooled graph and pair heads.

    .. code-block:: text

        h⁰_v = W x_v;   hˡ_v = hˡ⁻¹_v + GIN(hˡ⁻¹)_v                   (l = 1..n_layers)
        g    = MLP([Σ_v h_v, mean_v h_v, onehot(n)])                 graph embedding
        add node t, stop, log F(s)  <- Linear(g)
        remove node t               <- Linear([g, h_{n−1}])         (the last node)
        add / remove edge (i, j)    <- MLP([h_i + h_j, h_i ⊙ h_j, g])  symmetric in i, j

    The action layout is ``GraphBuilding``'s: ``T`` node types, then the ``M = N(N−1)/2``
    slot pairs in colex order ((0,1), (0,2), (1,2), (0,3), …), then stop. Node ``k`` of graph
    ``b`` in the batch (``ptr[b] + k``) sits in slot ``k``; slots past a graph's node count
    are zero-padded, so their pair logits are finite (and masked by the environment). An
    empty graph (s0) pools to zeros. Each graph's output depends on that graph alone, so
    the policy is invariant to the order of the batch (and safe to run once per distinct
    state, as `gfn.sampler.trajectory_log_probs` does).

    Args:
        n_node_features: width of the node features ``x``.
        n_actions: forward actions, stop included: ``T + M + 1``.
        max_nodes: N, the number of node slots.
        hidden: width of node and graph embeddings (default 64).
        n_layers: number of GIN layers (default 3).
        backward: ``"learned"`` (P_B heads) or ``"uniform"`` (no P_B head). Default learned.
        flow_head: add a log F(s) head (for detailed / sub-trajectory balance).
    """

    def __init__(
        self,
        n_node_features: int,
        n_actions: int,
        max_nodes: int,
        hidden: int = 64,
        n_layers: int = 3,
        backward: str = "learned",
        flow_head: bool = False,
    ) -> None:
        super().__init__()
        check_int("n_node_features", n_node_features, 1)
        check_int("env.max_nodes", max_nodes, 1)
        check_policy_arguments(hidden, n_layers, backward, min_layers=0)
        n_pairs = max_nodes * (max_nodes - 1) // 2
        n_types = n_actions - n_pairs - 1
        if n_types < 1:
            raise ValueError(
                f"Invalid n_actions: {n_actions} for max_nodes={max_nodes}; it must be "
                f"n_node_types + {n_pairs} (slot pairs) + 1 (stop) with n_node_types >= 1"
            )
        learned_pb = has_learned_backward(backward)
        self.n_actions = n_actions
        self.max_nodes = max_nodes
        self.n_types = n_types
        self.n_pairs = n_pairs
        self.backward = backward
        self.learned_pb = learned_pb
        self.flow_head = flow_head

        self.embed = nn.Linear(n_node_features, hidden)
        self.convs = nn.ModuleList(
            GINConv(_mlp(hidden, hidden, hidden), train_eps=True) for _ in range(n_layers)
        )
        self.graph_mlp = nn.Sequential(_mlp(2 * hidden + max_nodes + 1, hidden, hidden), nn.ReLU())
        self.graph_head = nn.Linear(hidden, n_types + 1 + (1 if flow_head else 0))
        self.remove_node_head = nn.Linear(2 * hidden, n_types) if learned_pb else None
        self.edge_mlp = _mlp(3 * hidden, hidden, 2 if learned_pb else 1)
        # Slot pairs in the environment's colex order: pair p joins (pair_i[p], pair_j[p]).
        j = torch.arange(max_nodes).repeat_interleave(torch.arange(max_nodes))  # (M,)
        self.register_buffer("pair_i", torch.arange(n_pairs) - j * (j - 1) // 2, persistent=False)
        self.register_buffer("pair_j", j, persistent=False)

    def forward(self, data: Batch) -> PolicyOutput:
        """Logits of the B graphs of `data` (``x``, ``edge_index``, ``batch``, ``ptr``)."""
        n_graphs = data.ptr.numel() - 1  # B, empty graphs included
        n_nodes = data.ptr.diff()  # (B,)

        # 1. Node embeddings by message passing.
        h = self.embed(data.x)  # (V, H)
        for conv in self.convs:
            h = h + F.relu(conv(h, data.edge_index))  # (V, H)

        # 2. Graph embedding: sum and mean pools (zeros for an empty graph) and the size.
        size = F.one_hot(n_nodes, self.max_nodes + 1).to(h.dtype)  # (B, N + 1)
        total = global_add_pool(h, data.batch, size=n_graphs)  # (B, H)
        mean = total / n_nodes.clamp(min=1).unsqueeze(1).to(h.dtype)  # (B, H)
        g = self.graph_mlp(torch.cat([total, mean, size], dim=1))  # (B, H)
        graph_out = self.graph_head(g)  # (B, T + 1 [+ 1])
        add_node = graph_out[:, : self.n_types]  # (B, T)
        stop = graph_out[:, self.n_types : self.n_types + 1]  # (B, 1)
        log_flow = graph_out[:, -1] if self.flow_head else None  # (B,)

        # 3. Pair logits from the slots' embeddings (zero-padded past each graph's nodes).
        # Node k of graph b sits in slot k: to_dense_batch's layout by index arithmetic,
        # which is several times cheaper than the general routine at sampling batch sizes.
        slot = torch.arange(h.shape[0], device=h.device) - data.ptr[data.batch]  # (V,)
        dense = h.new_zeros(n_graphs * self.max_nodes, h.shape[1])
        dense = dense.index_copy(0, data.batch * self.max_nodes + slot, h)
        dense = dense.view(n_graphs, self.max_nodes, -1)  # (B, N, H)
        h_i, h_j = dense[:, self.pair_i], dense[:, self.pair_j]  # (B, M, H)
        pair_in = torch.cat([h_i + h_j, h_i * h_j, g.unsqueeze(1).expand_as(h_i)], dim=2)
        edge_out = self.edge_mlp(pair_in)  # (B, M, 1 or 2)
        pf_logits = torch.cat([add_node, edge_out[..., 0], stop], dim=1)  # (B, T + M + 1)

        pb_logits = None
        if self.remove_node_head is not None:
            last = (n_nodes - 1).clamp(min=0)  # (B,)
            h_last = dense[torch.arange(n_graphs, device=h.device), last]  # (B, H); 0 if empty
            remove_node = self.remove_node_head(torch.cat([g, h_last], dim=1))  # (B, T)
            pb_logits = torch.cat([remove_node, edge_out[..., 1]], dim=1)  # (B, T + M)
        return PolicyOutput(pf_logits, pb_logits, log_flow)


def build_gnn_policy(cfg_model: Any, env: Env, flow_head: bool = False) -> GNNPolicy:
    """The `GNNPolicy` of `cfg_model` (``hidden``, ``n_layers``, ``backward``) for `env`.

    `env` must featurize to a torch-geometric `Batch` and expose ``max_nodes`` (as
    `envs.graphs.GraphBuilding` does); `flow_head` is for the flow losses (db, subtb).
    """
    max_nodes = getattr(env, "max_nodes", None)
    features = env.featurize(env.initial_states(1))
    if max_nodes is None or not isinstance(features, Batch):
        raise ConfigError(
            f"model=gnn needs a graph environment (featurize returning a torch-geometric Batch "
            f"and a max_nodes attribute, like envs.graphs.GraphBuilding); got "
            f"{type(env).__name__}, whose featurize returns {type(features).__name__}"
        )
    return GNNPolicy(
        features.num_node_features,
        env.n_actions,
        max_nodes,
        hidden=cfg_model.hidden,
        n_layers=cfg_model.n_layers,
        backward=cfg_model.backward,
        flow_head=flow_head,
    )
