"""Adaptive heavy-ball momentum for SGD and Adam (after Sun et al., arXiv 2110.09057).

Polyak's heavy ball is fastest on a quadratic of curvature L with momentum
beta = (1 - sqrt(alpha L))^2. These optimizers estimate L every step from the last two iterates,
h_k = ||g_k - g_{k-1}|| / ||x_k - x_{k-1}|| (a secant estimate of the local curvature along the
last move), and set the momentum from it, so no momentum coefficient needs tuning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim.adam_state import init_adam_state
from optim.template import evaluate_closure, gather, hyperparameters
from optim.validation import check_float, check_lr

__all__ = ["AdaHBAdam", "AdaHBSGD", "adahb_adam", "adahb_sgd", "heavy_ball_momentum"]


def heavy_ball_momentum(
    lr: float, sq_grad_change: Tensor, sq_move: Tensor, previous: Tensor, delta: float
) -> tuple[Tensor, Tensor]:
    """beta_k = clip((1 - min(sqrt(alpha h_k), 1))^2, 0, 1 - delta), h_k = sqrt(dg^2 / dx^2).

    `sq_grad_change` and `sq_move` are ||g_k - g_{k-1}||^2 and ||x_k - x_{k-1}||^2 (0-dim). Where
    the iterate did not move (dx = 0: the first step, or a zero update) beta keeps `previous` and
    h is reported as 0. Returns (beta_k, h_k) as 0-dim tensors; no host sync.
    """
    moved = sq_move > 0
    h = torch.where(moved, (sq_grad_change / torch.where(moved, sq_move, 1.0)).sqrt(), 0.0)
    root = (lr * h).sqrt().clamp(max=1.0)
    beta = (1 - root).square().clamp(0.0, 1.0 - delta)
    return torch.where(moved, beta, previous), h


def _validate(lr: float, delta: float, weight_decay: float) -> None:
    check_lr(lr)
    check_float("delta", delta, 0.0, 1.0, low_open=True)
    check_float("weight_decay", weight_decay, 0.0)


def _acc_dtype(tensors: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _AdaHB(Optimizer):
    """Shared state handling: per-group momentum beta_k and curvature h_k as device tensors."""

    _adam = False

    def __init__(self, params: ParamsT, defaults: dict) -> None:
        super().__init__(params, defaults)
        self.last_momentum: Tensor | None = None
        self.last_curvature: Tensor | None = None

    def _init_group(self, group: dict) -> tuple[dict[str, list], Tensor | None]:
        """The group's lists for the functional, and beta_{k-1} (None: no gradients)."""

        def init(state: dict, p: Tensor) -> None:
            grad = -p.grad if group["maximize"] else p.grad
            if group["weight_decay"] != 0 and not self._adam:
                grad = grad.add(p, alpha=group["weight_decay"])
            # g_{k-1} := g_k on a parameter's first step: it adds nothing to ||dg||.
            state["prev_grad"] = grad.clone(memory_format=torch.preserve_format)
            state["prev_update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros((), dtype=_acc_dtype([p]), device=p.device)
            if self._adam:
                init_adam_state(state, p)
                state["beta1_prod"] = torch.ones((), dtype=torch.float64, device=p.device)

        keys = {"prev_grads": "prev_grad", "prev_updates": "prev_update"}
        if self._adam:
            keys |= {
                "exp_avgs": "exp_avg", "exp_avg_sqs": "exp_avg_sq", "state_steps": "step",
                "beta1_prods": "beta1_prod",
            }  # fmt: skip
        lists = gather(self, group, init, **keys)
        previous = lists["states"][0]["momentum"] if lists["states"] else None
        return lists, previous

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        betas, curvatures = [], []
        for group in self.param_groups:
            lists, previous = self._init_group(group)
            if previous is None:
                betas.append(None)
                curvatures.append(None)
                continue
            beta, h = self._functional(lists, previous, group)
            for p in lists["params"]:
                self.state[p]["momentum"] = beta
            betas.append(beta)
            curvatures.append(h)
        present = [b for b in betas if b is not None]
        if present:
            dtype, device = present[0].dtype, present[0].device
            nan = torch.full((), math.nan, dtype=dtype, device=device)
            self.last_momentum = torch.stack(
                [nan if b is None else b.to(device, dtype) for b in betas]
            )
            self.last_curvature = torch.stack(
                [nan if h is None else h.to(device, dtype) for h in curvatures]
            )
        return loss

    def _functional(self, lists: dict, previous: Tensor, group: dict) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class AdaHBSGD(_AdaHB):
    r"""Heavy-ball SGD with adaptive momentum (after Sun et al., arXiv 2110.09057).

    .. math::
        \begin{aligned}
        h_k &= \lVert g_k - g_{k-1} \rVert \,/\, \lVert x_k - x_{k-1} \rVert \\
        \beta_k &= \operatorname{clip}\bigl((1 - \min(\sqrt{\alpha h_k}, 1))^2,\ 0,\ 1-\delta\bigr)
            \qquad (\beta_k = \beta_{k-1} \text{ if } x_k = x_{k-1};\ \beta_0 = 0) \\
        x_{k+1} &= x_k - \alpha g_k + \beta_k (x_k - x_{k-1})
        \end{aligned}

    ``g_k`` is the gradient (negated if ``maximize``) plus ``weight_decay * x_k`` (L2, as
    torch's SGD). The norms run over every parameter of the group that has a gradient, so each
    group has one beta_k (per-group is our choice; the paper states the rule for one vector x).
    On a quadratic of curvature L along the last move, h_k = L exactly, and beta_k is Polyak's
    (1 - sqrt(alpha L))^2. The inner ``min(., 1)`` departs from the literal clip((1 -
    sqrt(alpha h))^2, 0, 1 - delta): without it, curvature beyond 1/alpha (where plain gradient
    descent is already at its limit) would bring momentum back towards 1; with it, beta = 0 there.

    State: ``prev_update`` (x_k - x_{k-1}, the heavy-ball velocity), ``prev_grad`` (g_{k-1}) and
    ``momentum``, a 0-dim tensor holding the group's beta_k used in the last step (the same value
    for every parameter of the group). :attr:`last_momentum` and :attr:`last_curvature` (shape
    ``(n_groups,)``, NaN for a group without gradients) hold beta_k and h_k of the last step.
    Monitors read momentum there: the group has no ``momentum`` key since it is not a constant.

    Args:
        params: parameters or param groups to optimise.
        lr: step size alpha (default: 0.01).
        delta: the momentum is at most 1 - delta (default: 0.01).
        weight_decay: L2 penalty added to the gradient (default: 0.0).
        maximize: maximise the objective instead of minimising it (default: False).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.01,
        delta: float = 0.01,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        _validate(lr, delta, weight_decay)
        super().__init__(
            params, dict(lr=lr, delta=delta, weight_decay=weight_decay, maximize=maximize)
        )

    def _functional(self, lists: dict, previous: Tensor, group: dict) -> tuple[Tensor, Tensor]:
        return adahb_sgd(
            lists["params"],
            lists["grads"],
            lists["prev_grads"],
            lists["prev_updates"],
            previous,
            **hyperparameters(group, ("lr", "delta", "weight_decay", "maximize")),
        )


def adahb_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    prev_grads: list[Tensor],
    prev_updates: list[Tensor],
    previous_momentum: Tensor,
    *,
    lr: float,
    delta: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    """Functional AdaHB-SGD over one group (single-tensor loop); returns (beta_k, h_k)."""
    acc = _acc_dtype(params)
    effective = []
    sq_dg, sq_dx = (torch.zeros((), dtype=acc, device=params[0].device) for _ in range(2))
    # Stage 1: the curvature estimate along the last move.
    for p, grad, prev_grad, prev_update in zip(
        params, grads, prev_grads, prev_updates, strict=True
    ):
        grad = -grad if maximize else grad
        if weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)
        effective.append(grad)
        sq_dg += torch.linalg.vector_norm(grad - prev_grad, dtype=acc).square()
        sq_dx += torch.linalg.vector_norm(prev_update, dtype=acc).square()
    beta, h = heavy_ball_momentum(lr, sq_dg, sq_dx, previous_momentum.to(acc), delta)
    # Stage 2: x_{k+1} = x_k - alpha g_k + beta_k (x_k - x_{k-1}).
    for p, grad, prev_grad, prev_update in zip(
        params, effective, prev_grads, prev_updates, strict=True
    ):
        prev_update.mul_(beta.to(p.dtype)).add_(grad, alpha=-lr)
        p.add_(prev_update)
        prev_grad.copy_(grad)
    return beta, h


class AdaHBAdam(_AdaHB):
    r"""Adam whose first-moment decay beta_1 is the adaptive heavy-ball momentum (after Sun et
    al., arXiv 2110.09057, extended to Adam's preconditioned metric by us).

    .. math::
        \begin{aligned}
        v_k &= \beta_2 v_{k-1} + (1-\beta_2) g_k^2 \qquad
            P_k = \sqrt{v_k / (1-\beta_2^k)} + \epsilon \\
        h_k &= \lVert (g_k - g_{k-1}) / \sqrt{P_k} \rVert \,/\,
            \lVert (x_k - x_{k-1}) \sqrt{P_k} \rVert \\
        \beta_k &= \operatorname{clip}\bigl((1 - \min(\sqrt{\alpha h_k}, 1))^2,\ 0,\ 1-\delta\bigr)
            \qquad (\beta_k = \beta_{k-1} \text{ if } x_k = x_{k-1};\ \beta_0 = 0) \\
        m_k &= \beta_k m_{k-1} + (1-\beta_k) g_k \qquad
            \hat m_k = m_k / (1 - \textstyle\prod_{i \le k} \beta_i) \\
        x_{k+1} &= x_k (1 - \alpha\lambda) - \alpha\, \hat m_k / P_k
        \end{aligned}

    h_k is the secant curvature of the preconditioned problem (in the variables y = sqrt(P) x,
    whose Hessian P^{-1/2} H P^{-1/2} has the eigenvalues of P^{-1} H), measured with this step's
    preconditioner; the step size alpha is the one that multiplies the preconditioned gradient, so
    alpha h_k plays the role of alpha L in Polyak's rule. The bias correction of m_k uses the
    product of the betas actually applied (it is 1 from the first step on, since beta_1 = 0,
    unless a parameter joins a group later). Weight decay is decoupled (AdamW's). The min(., 1)
    departs from the literal rule as in :class:`AdaHBSGD`. One beta_k per group.

    State: ``step``, ``exp_avg`` (m_k), ``exp_avg_sq`` (v_k of the raw gradient, so ``P_k`` is the
    preconditioner), ``prev_grad``, ``prev_update`` (x_k - x_{k-1}), ``beta1_prod`` and
    ``momentum`` (the group's beta_k, 0-dim); :attr:`last_momentum` and :attr:`last_curvature`
    as in :class:`AdaHBSGD`. The group keeps ``beta2`` and ``eps`` but no ``betas``: beta_1 is not
    a constant, monitors read it from ``momentum``.

    Args:
        params: parameters or param groups to optimise.
        lr: step size alpha (default: 1e-3).
        beta2: decay rate of the second moment (default: 0.999).
        delta: the momentum is at most 1 - delta (default: 0.01).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay lambda (default: 0.0).
        maximize: maximise the objective instead of minimising it (default: False).
    """

    _adam = True

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        beta2: float = 0.999,
        delta: float = 0.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
    ) -> None:
        _validate(lr, delta, weight_decay)
        check_float("beta2", beta2, 0.0, 1.0, high_open=True)
        check_float("eps", eps, 0.0, low_open=True)
        defaults = dict(
            lr=lr, beta2=beta2, delta=delta, eps=eps, weight_decay=weight_decay, maximize=maximize
        )
        super().__init__(params, defaults)

    def _functional(self, lists: dict, previous: Tensor, group: dict) -> tuple[Tensor, Tensor]:
        return adahb_adam(
            lists["params"],
            lists["grads"],
            lists["prev_grads"],
            lists["prev_updates"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["state_steps"],
            lists["beta1_prods"],
            previous,
            **hyperparameters(group, _ADAM_HYPERPARAMETERS),
        )


_ADAM_HYPERPARAMETERS = ("lr", "beta2", "delta", "eps", "weight_decay", "maximize")


def adahb_adam(
    params: list[Tensor],
    grads: list[Tensor],
    prev_grads: list[Tensor],
    prev_updates: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    beta1_prods: list[Tensor],
    previous_momentum: Tensor,
    *,
    lr: float,
    beta2: float,
    delta: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> tuple[Tensor, Tensor]:
    """Functional AdaHB-Adam over one group (single-tensor loop); returns (beta_k, h_k)."""
    acc = _acc_dtype(params)
    denoms, effective = [], []
    sq_dg, sq_dx = (torch.zeros((), dtype=acc, device=params[0].device) for _ in range(2))
    # Stage 1: v_k, the preconditioner P_k and the curvature estimate in its metric.
    for grad, prev_grad, prev_update, v, step in zip(
        grads, prev_grads, prev_updates, exp_avg_sqs, state_steps, strict=True
    ):
        grad = -grad if maximize else grad
        effective.append(grad)
        step += 1
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # Cast to v's dtype: a 0-dim float64 tensor would promote a 0-dim parameter (log Z).
        bias_correction2_sqrt = (1 - beta2 ** step.to(torch.float64)).sqrt().to(v.dtype)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)  # P_k
        denoms.append(denom)
        root = denom.sqrt()
        sq_dg += torch.linalg.vector_norm((grad - prev_grad) / root, dtype=acc).square()
        sq_dx += torch.linalg.vector_norm(prev_update * root, dtype=acc).square()
    beta, h = heavy_ball_momentum(lr, sq_dg, sq_dx, previous_momentum.to(acc), delta)
    # Stage 2: the first moment with beta_k, then the decoupled-decay Adam step.
    for p, grad, prev_grad, prev_update, m, denom, prod in zip(
        params, effective, prev_grads, prev_updates, exp_avgs, denoms, beta1_prods, strict=True
    ):
        m.lerp_(grad, (1 - beta).to(m.dtype))
        prod.mul_(beta.to(prod.dtype))
        new = p * (1 - lr * weight_decay) if weight_decay != 0 else p.clone()
        new.sub_(m / denom / (1 - prod).to(m.dtype), alpha=lr)
        torch.sub(new, p, out=prev_update)
        p.copy_(new)
        prev_grad.copy_(grad)
    return beta, h
