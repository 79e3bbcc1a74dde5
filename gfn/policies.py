"""Policies: P_F, P_B and log F(s) from one shared trunk, and the GFlowNet module with log Z.

A policy is any module that maps featurized states to a `PolicyOutput`; it knows nothing about
the environment, which supplies the masks. `MLPPolicy` is the default for tensor features;
a graph environment plugs in a GNN with the same output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kinetic.validate import check_choice, check_int

__all__ = [
    "GFlowNet",
    "MLPActivations",
    "MLPPolicy",
    "PolicyOutput",
    "masked_log_softmax",
    "policy_input",
    "uniform_log_probs",
]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
BACKWARD_POLICIES = ("learned", "uniform")


class PolicyOutput(NamedTuple):
    """What one trunk evaluation serves to the sampler and the losses.

    Attributes:
        pf_logits: forward logits, ``(B, n_actions)``; the last column is the exit action.
        pb_logits: backward logits, ``(B, n_actions - 1)``, or None for a uniform P_B.
        log_flow: log F(s), ``(B,)``, or None without a flow head.
    """

    pf_logits: Tensor
    pb_logits: Tensor | None
    log_flow: Tensor | None


def masked_log_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """log-softmax over the legal entries of each row; illegal entries are -inf.

    Never NaN, values or gradients: a row with no legal entry (P_B at s0) comes out all -inf,
    a row with one legal entry gives 0 there. `logits` float ``(..., K)``, `mask` bool
    ``(..., K)``.
    """
    # A finite fill keeps all-illegal rows finite inside log_softmax (no -inf - -inf = NaN);
    # the -inf is put back afterwards, and `where` sends no gradient to filled entries.
    finite = torch.where(mask, logits, torch.finfo(logits.dtype).min)  # (..., K)
    return torch.where(mask, finite.log_softmax(dim=-1), float("-inf"))  # (..., K)


def uniform_log_probs(mask: Tensor) -> Tensor:
    """log of the uniform distribution over the legal entries of each row, ``(..., K)``.

    The uniform P_B. Illegal entries, and every entry of a row with none legal, are -inf.
    """
    n_legal = mask.sum(dim=-1, keepdim=True)  # (..., 1)
    log_p = -torch.log(n_legal.to(torch.get_default_dtype()))  # (..., 1); -(-inf) where none
    return log_p.expand(mask.shape).masked_fill(~mask, float("-inf"))


def policy_input(features: Tensor, conditions: Tensor | None) -> Tensor:
    """What the policy eats: the states' features ``(B, F)``, with each row's condition
    ``(B, C)`` appended for a conditional GFlowNet (``(B, F + C)``)."""
    if conditions is None:
        return features
    return torch.cat([features, conditions.to(features.dtype)], dim=-1)


def has_learned_backward(backward: str) -> bool:
    """Whether a policy's `backward` option asks for a learned P_B head (else uniform P_B)."""
    return check_choice("model.backward", backward, BACKWARD_POLICIES) == "learned"


def check_policy_arguments(
    hidden: int, n_layers: int, backward: str, activation: str | None = None, min_layers: int = 1
) -> None:
    """The policy networks' own `model.*` keys, in one place: checked by `MLPPolicy` and
    `GNNPolicy` when built and, before a run does any work, by the task's config check.
    `activation`: the MLP's (None for the GNN); `min_layers`: 1 for the MLP, 0 for the GNN
    (its node embedding alone)."""
    check_int("model.hidden", hidden, 1)
    check_int("model.n_layers", n_layers, min_layers)
    check_choice("model.backward", backward, BACKWARD_POLICIES)
    if activation is not None:
        check_choice("model.activation", activation, tuple(ACTIVATIONS))


class MLPPolicy(nn.Module):
    """An MLP trunk with forward, backward and state-flow heads.

    The heads are one fused linear layer (one matmul per call); its output columns are, in
    order, the ``n_actions`` forward logits, the ``n_actions - 1`` backward logits when P_B is
    learned, and log F(s) when `flow_head` is set. PyTorch initialises a fused layer exactly
    as it would separate heads (the init depends on the input width only). `forward` applies
    the layers functionally (``F.linear``): the sampler calls the policy once per step on a
    few rows, where per-module call overhead is a visible share of the time.

    Args:
        n_features: input width, ``env.featurize(states).shape[-1]``.
        n_actions: forward actions, exit included (``env.n_actions``).
        hidden: width of each hidden layer (default 256).
        n_layers: number of hidden layers, each Linear + activation (default 2).
        backward: ``"learned"`` (a P_B head on the shared trunk) or ``"uniform"`` (P_B uniform
            over the legal backward actions; no head). Default ``"learned"``.
        flow_head: add a log F(s) head, needed by detailed and sub-trajectory balance
            (default False).
        n_backward_outputs: width of the backward head (default ``n_actions - 1``, one logit
            per backward action); a continuous environment's policy sets both widths to its
            distributions' parameter counts.
        activation: one of ``relu`` (default), ``leaky_relu``, ``elu``, ``gelu``, ``silu``,
            ``tanh``.
    """

    def __init__(
        self,
        n_features: int,
        n_actions: int,
        hidden: int = 256,
        n_layers: int = 2,
        backward: str = "learned",
        flow_head: bool = False,
        activation: str = "relu",
        n_backward_outputs: int | None = None,
    ) -> None:
        super().__init__()
        check_int("n_features", n_features, 1)
        check_int("n_actions", n_actions, 2)  # one move and exit
        if n_backward_outputs is None:
            n_backward_outputs = n_actions - 1
        check_int("n_backward_outputs", n_backward_outputs, 0)
        check_policy_arguments(hidden, n_layers, backward, activation)
        learned_pb = has_learned_backward(backward) and n_backward_outputs > 0
        self.n_actions = n_actions
        self.n_backward_outputs = n_backward_outputs
        self.backward = backward
        self.learned_pb = learned_pb
        self.flow_head = flow_head
        self.activation = activation
        self._activation = ACTIVATIONS[activation]

        widths = [n_features] + [hidden] * n_layers
        self.trunk = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in pairwise(widths))
        sizes = [n_actions] + ([n_backward_outputs] if learned_pb else []) + [1] * flow_head
        self._head_sizes = sizes
        self.heads = nn.Linear(hidden, sum(sizes))

    def forward(self, features: Tensor) -> PolicyOutput:
        """Evaluate the trunk once on `features` ``(B, n_features)`` and split the heads."""
        hidden = features
        for layer in self.trunk:
            hidden = self._activation(F.linear(hidden, layer.weight, layer.bias))  # (B, H)
        return self.split_heads(F.linear(hidden, self.heads.weight, self.heads.bias))

    def split_heads(self, out: Tensor) -> PolicyOutput:
        """The fused heads' output ``(B, n_out)`` as a `PolicyOutput`."""
        if not (self.learned_pb or self.flow_head):
            return PolicyOutput(out, None, None)
        # One split (one operator) into the head's column blocks.
        parts = out.split_with_sizes(self._head_sizes, dim=1)  # (B, A), ...
        pb_logits = parts[1] if self.learned_pb else None  # (B, A - 1)
        log_flow = parts[-1].squeeze(1) if self.flow_head else None  # (B,)
        return PolicyOutput(parts[0], pb_logits, log_flow)

    def record(self, features: Tensor) -> tuple[PolicyOutput, MLPActivations]:
        """`forward` (call it without autograd), also returning what `replay`'s backward needs:
        each layer's input and (except for relu, whose backward reads its output) each hidden
        layer's pre-activation. The same operators as `forward`."""
        inputs, pre_activations = [features], []
        hidden = features
        for layer in self.trunk:
            z = F.linear(hidden, layer.weight, layer.bias)  # (B, H)
            hidden = self._activation(z)
            if self.activation != "relu":
                pre_activations.append(z)
            inputs.append(hidden)
        out = F.linear(hidden, self.heads.weight, self.heads.bias)  # (B, n_out)
        return self.split_heads(out), MLPActivations(inputs, pre_activations, out)

    def replay(self, activations: MLPActivations) -> PolicyOutput:
        """The output of a recorded pass (`record`) as if `forward` had just computed it with
        autograd, without computing it again: its gradient reaches the parameters through a
        backward pass over the recorded activations (the one autograd would run). Valid only
        while the parameters are the ones the pass was recorded with."""
        params = [p for layer in (*self.trunk, self.heads) for p in (layer.weight, layer.bias)]
        return self.split_heads(_ReplayMLP.apply(activations.output, self, activations, *params))

    def activation_backward(self, grad: Tensor, activations: MLPActivations, i: int) -> Tensor:
        """The gradient through hidden layer `i`'s activation in a recorded pass, given the
        gradient after it."""
        if self.activation == "relu":  # relu's own backward kernel, on its output (> 0 iff z > 0)
            return torch.ops.aten.threshold_backward(grad, activations.inputs[i + 1], 0)
        with torch.enable_grad():
            z = activations.pre_activations[i].detach().requires_grad_()
            return torch.autograd.grad(self._activation(z), z, grad)[0]


class MLPActivations(NamedTuple):
    """What `MLPPolicy.record` keeps of a pass over R rows: every layer's input
    (``inputs[0]`` the features, then each hidden layer's output), every hidden layer's
    pre-activation (none for relu), and the heads' output ``(R, n_out)``."""

    inputs: list[Tensor]
    pre_activations: list[Tensor]
    output: Tensor

    @staticmethod
    def cat(passes: Sequence[MLPActivations], rows: Tensor | None = None) -> MLPActivations:
        """Passes over R_1, R_2, ... rows as one pass over their R_1 + R_2 + ... rows; only
        the rows `rows` (long) of that, in that order, when given."""

        def join(tensors: Sequence[Tensor]) -> Tensor:
            joined = torch.cat(list(tensors))
            return joined if rows is None else joined[rows]

        return MLPActivations(
            [join(layer) for layer in zip(*(p.inputs for p in passes), strict=True)],
            [join(layer) for layer in zip(*(p.pre_activations for p in passes), strict=True)],
            join([p.output for p in passes]),
        )


class _ReplayMLP(torch.autograd.Function):
    """Identity on a recorded output, whose backward is the MLP's (`MLPPolicy.replay`)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, policy: MLPPolicy, acts: MLPActivations, *params):
        ctx.policy, ctx.acts = policy, acts
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        policy, acts = ctx.policy, ctx.acts
        layers = [*policy.trunk, policy.heads]
        grads: list[Tensor] = []
        for i in range(len(layers) - 1, -1, -1):  # heads first
            if i < len(layers) - 1:
                grad = policy.activation_backward(grad, acts, i)  # (R, H)
            grads[:0] = [grad.t() @ acts.inputs[i], grad.sum(dim=0)]  # weight, bias
            if i > 0:
                grad = grad @ layers[i].weight  # (R, width of layer i's input)
        return (None, None, None, *grads)


class GFlowNet(nn.Module):
    """An environment-agnostic policy (P_F, P_B, log F) plus the learned log Z.

    A conditional GFlowNet (``condition_dim > 0``) learns log Z(c) with a small MLP
    (`log_z_net`: C -> `log_z_hidden` -> 1, its output bias starting at `log_z_init`) in place
    of the scalar; its policy eats features with the condition appended (`policy_input`).

    Args:
        policy: a module mapping featurized states to a `PolicyOutput` (e.g. `MLPPolicy`).
        log_z_init: initial value of log Z (default 0.0).
        condition_dim: C, the length of the condition vector; 0: unconditional (default).
        log_z_hidden: width of log Z(c)'s hidden layer (default 64).
    """

    def __init__(
        self,
        policy: nn.Module,
        log_z_init: float = 0.0,
        condition_dim: int = 0,
        log_z_hidden: int = 64,
    ) -> None:
        super().__init__()
        self.policy = policy
        self.log_z = nn.Parameter(torch.tensor(float(log_z_init)))
        self.condition_dim = check_int("condition_dim", condition_dim, 0)
        self.log_z_net = None
        if condition_dim > 0:
            self.log_z_net = nn.Sequential(
                nn.Linear(condition_dim, log_z_hidden), nn.ReLU(), nn.Linear(log_z_hidden, 1)
            )
            with torch.no_grad():
                self.log_z_net[-1].bias.fill_(float(log_z_init))

    def log_z_of(self, conditions: Tensor | None) -> Tensor:
        """log Z: the scalar parameter, or log Z(c) for conditions ``(B, C)`` as ``(B,)``."""
        if self.log_z_net is None or conditions is None:
            return self.log_z
        return self.log_z_net(conditions.to(self.log_z.dtype)).squeeze(-1)

    def forward(self, features: Tensor) -> PolicyOutput:
        """The policy's output on featurized states: one trunk evaluation."""
        return self.policy(features)

    def parameter_groups(self, log_z_lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer param groups: the policy's parameters, then ``[log_z]`` (log Z(c)'s
        network for a conditional GFlowNet) on its own.

        log Z usually wants a much larger learning rate than the network; pass it as
        `log_z_lr`, or leave it None to inherit the optimizer's default. Each group carries a
        ``"name"`` (``"policy"``, ``"log_z"``) for logging.
        """
        log_z_params = [self.log_z] if self.log_z_net is None else list(self.log_z_net.parameters())
        log_z_group: dict[str, Any] = {"params": log_z_params, "name": "log_z"}
        if log_z_lr is not None:
            if not log_z_lr >= 0.0:  # also rejects NaN
                raise ValueError(f"Invalid log Z learning rate: {log_z_lr}")
            log_z_group["lr"] = log_z_lr
        return [{"params": list(self.policy.parameters()), "name": "policy"}, log_z_group]
