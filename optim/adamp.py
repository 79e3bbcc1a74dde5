"""AdamP and SGDP (Heo et al., ICLR 2021, arXiv 2006.08217).

Momentum makes scale-invariant weights (those followed by a normalisation layer) grow in norm,
which shrinks their effective step. AdamP and SGDP remove the radial component of the update
of any weight that looks scale-invariant, and shrink its weight decay by ``wd_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim.adam_state import init_adam_state
from optim.template import gather, hyperparameters, step_groups
from optim.validation import ConfigError, check_betas, check_bool, check_float, check_lr

__all__ = ["SGDP", "AdamP", "adamp", "project_radial", "sgdp"]


def _check_common(
    lr: float, eps: float, weight_decay: float, delta: float, wd_ratio: float, nesterov: bool
) -> None:
    check_lr(lr)
    check_float("eps", eps, 0.0, low_open=True)
    check_float("weight_decay", weight_decay, 0.0)
    check_float("delta", delta, 0.0, low_open=True)
    check_float("wd_ratio", wd_ratio, 0.0, 1.0)
    check_bool("nesterov", nesterov)


def project_radial(
    param: Tensor, grad: Tensor, update: Tensor, *, delta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Remove the radial component of `update` if `param` looks scale-invariant.

    Two views are tried in order, as in the authors' code: the channel view (one row per output
    channel, dim 0) and the layer view (the whole tensor as one row). A view triggers when
    max over its rows of |cos(grad, param)| < delta / sqrt(row length); the first view that
    triggers projects every row of the update onto the tangent space of the weight,
    u <- u - p_hat (p_hat . u) with p_hat = p / (||p|| + eps). Returns the update and a 0-dim
    bool tensor `projected`. Branch-free: no host sync (the released code branches on the host).
    Tensors with fewer than 2 dims are never projected.
    """
    projected = torch.zeros((), dtype=torch.bool, device=param.device)
    if param.dim() < 2:
        return update, projected
    out = update
    expand = (-1,) + (1,) * (param.dim() - 1)
    # Reverse order: the layer view's result is the fallback of the channel view's.
    for rows in (1, param.shape[0]):
        p_view = param.reshape(rows, -1)  # (rows, d)
        g_view = grad.reshape(rows, -1)  # (rows, d)
        cosine = torch.nn.functional.cosine_similarity(g_view, p_view, dim=1, eps=eps).abs()
        triggers = cosine.max() < delta / math.sqrt(p_view.shape[1])  # () bool
        p_unit = param / p_view.norm(dim=1).add(eps).reshape(expand if rows > 1 else ())
        radial = (p_unit * update).reshape(rows, -1).sum(dim=1)  # (rows,)
        tangent = update - p_unit * radial.reshape(expand if rows > 1 else ())
        out = torch.where(triggers, tangent, out)
        projected = projected | triggers
    return out, projected


def _wd_factor(projected: Tensor, wd_ratio: float, like: Tensor) -> Tensor:
    """wd_ratio where the update was projected, else 1, in `like`'s dtype (no host sync)."""
    # Filled on the device in `like`'s dtype: a Python float would be wrapped as float32.
    return torch.where(projected, like.new_full((), wd_ratio), like.new_ones(()))


_ADAMP_HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov")
_SGDP_HYPERPARAMETERS = (
    "lr", "momentum", "dampening", "weight_decay", "nesterov", "eps", "delta", "wd_ratio",
)  # fmt: skip


class _Projected(Optimizer):
    """The step of AdamP and SGDP: gather, run the functional, keep each `projected` flag."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; `closure` re-evaluates the model and returns the loss."""
        return step_groups(self, closure, self._step_group)

    def _step_group(self, group: dict) -> None:
        lists = self._init_group(group)
        projected = self._functional(lists, group)
        for state, flag in zip(lists["states"], projected, strict=True):
            state["projected"] = flag  # 0-dim bool: was this update projected?

    def _init_group(self, group: dict) -> dict[str, list]:
        raise NotImplementedError

    def _functional(self, lists: dict[str, list], group: dict) -> list[Tensor]:
        raise NotImplementedError


class AdamP(_Projected):
    r"""AdamP (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", ICLR 2021, arXiv 2006.08217), as the authors' released code.

    .. math::
        \begin{aligned}
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        p_t &= \begin{cases} (\beta_1 m_t + (1-\beta_1) g_t) / (\sqrt{\hat v_t} + \epsilon)
            & \text{nesterov} \\ m_t / (\sqrt{\hat v_t} + \epsilon) & \text{else} \end{cases} \\
        q_t, r_t &= \begin{cases} \Pi_{\theta}(p_t),\ \texttt{wd\_ratio}
            & \text{if } \max_{\text{rows}} |\cos(g_t, \theta_{t-1})| < \delta/\sqrt{d}
              \text{ (channel view, else layer view)} \\ p_t,\ 1 & \text{else} \end{cases} \\
        \theta_t &= \theta_{t-1}(1 - \alpha \lambda r_t) - \frac{\alpha}{1-\beta_1^t}\, q_t
        \end{aligned}

    with ``\hat v_t = v_t/(1-\beta_2^t)``, ``d`` the row length of the view and
    ``\Pi_\theta(u) = u - \hat\theta(\hat\theta\cdot u)`` per row (see :func:`project_radial`).
    The weight decay is decoupled (AdamW's). State: ``step``, ``exp_avg``, ``exp_avg_sq`` (v_t of
    the raw gradient, so ``sqrt(v_hat)+eps`` is the preconditioner); after a step, each param's
    ``state["projected"]`` is a 0-dim bool tensor saying whether its update was projected.

    Args:
        params: parameters or param groups to optimise.
        lr: learning rate alpha (default: 1e-3).
        betas: decay rates of the first and second moments (default: (0.9, 0.999)).
        eps: term added to the denominator and to weight norms (default: 1e-8).
        weight_decay: decoupled weight decay lambda (default: 0.0).
        delta: cosine threshold: a view triggers below delta / sqrt(row length) (default: 0.1).
        wd_ratio: weight decay multiplier for projected weights (default: 0.1).
        nesterov: use the Nesterov form of the first moment (default: False).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
    ) -> None:
        _check_common(lr, eps, weight_decay, delta, wd_ratio, nesterov)
        check_betas(betas)
        hyper = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta)
        super().__init__(params, hyper | dict(wd_ratio=wd_ratio, nesterov=nesterov))

    def _init_group(self, group: dict) -> dict[str, list]:
        return gather(
            self, group, init_adam_state, exp_avgs="exp_avg", exp_avg_sqs="exp_avg_sq",
            state_steps="step",
        )  # fmt: skip

    def _functional(self, lists: dict[str, list], group: dict) -> list[Tensor]:
        return adamp(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["state_steps"],
            **hyperparameters(group, _ADAMP_HYPERPARAMETERS),
        )


def adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
) -> list[Tensor]:
    """Functional AdamP (single-tensor loop); returns each parameter's 0-dim `projected` flag."""
    flags = []
    for p, grad, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True):
        step += 1
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = step.to(torch.float64)
        bias_correction1 = 1 - beta1**t
        denom = (v.sqrt() / (1 - beta2**t).sqrt()).add_(eps)
        first = m * beta1 + grad * (1 - beta1) if nesterov else m
        update, projected = project_radial(p, grad, first / denom, delta=delta, eps=eps)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay * _wd_factor(projected, wd_ratio, p))
        p.sub_(update * (lr / bias_correction1))
        flags.append(projected)
    return flags


class SGDP(_Projected):
    r"""SGDP (Heo et al., ICLR 2021, arXiv 2006.08217): SGD with momentum whose update of
    scale-invariant weights loses its radial component, as the authors' released code.

    .. math::
        \begin{aligned}
        b_t &= \mu b_{t-1} + (1-\tau) g_t \qquad
        p_t = \begin{cases} g_t + \mu b_t & \text{nesterov} \\ b_t & \text{else} \end{cases} \\
        q_t, r_t &= \Pi_\theta(p_t), \texttt{wd\_ratio} \text{ if the channel or layer view
            triggers (see AdamP), else } p_t, 1 \\
        \theta_t &= \theta_{t-1}\bigl(1 - \alpha\lambda r_t / (1-\mu)\bigr) - \alpha q_t
        \end{aligned}

    The weight decay is decoupled and divided by ``1 - momentum`` as in the released code (it
    matches the L2 decay's long-run effect under momentum). State: ``momentum_buffer`` (b_t) and
    the 0-dim bool ``projected``; the group keeps ``momentum``.

    Args:
        params: parameters or param groups to optimise.
        lr: learning rate alpha (default: 0.1).
        momentum: momentum factor mu (default: 0.9).
        dampening: dampening tau of the gradient in the buffer (default: 0.0).
        weight_decay: decoupled weight decay lambda (default: 0.0).
        nesterov: Nesterov momentum (default: False).
        eps: term added to weight norms in the cosine and the projection (default: 1e-8).
        delta: cosine threshold: a view triggers below delta / sqrt(row length) (default: 0.1).
        wd_ratio: weight decay multiplier for projected weights (default: 0.1).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
    ) -> None:
        _check_common(lr, eps, weight_decay, delta, wd_ratio, nesterov)
        check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        check_float("dampening", dampening, 0.0, 1.0)
        if nesterov and (momentum == 0 or dampening != 0):
            raise ConfigError(
                f"Invalid nesterov=True with momentum={momentum!r}, dampening={dampening!r}; "
                "Nesterov momentum needs momentum > 0 and dampening = 0"
            )
        hyper = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)
        super().__init__(
            params, hyper | dict(nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio)
        )

    def _init_group(self, group: dict) -> dict[str, list]:
        return gather(self, group, _init_momentum, momentum_buffers="momentum_buffer")

    def _functional(self, lists: dict[str, list], group: dict) -> list[Tensor]:
        return sgdp(
            lists["params"],
            lists["grads"],
            lists["momentum_buffers"],
            **hyperparameters(group, _SGDP_HYPERPARAMETERS),
        )


def _init_momentum(state: dict, p: Tensor) -> None:
    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
) -> list[Tensor]:
    """Functional SGDP (single-tensor loop); returns each parameter's 0-dim `projected` flag."""
    flags = []
    for p, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        direction = grad + momentum * buf if nesterov else buf
        update, projected = project_radial(p, grad, direction, delta=delta, eps=eps)
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay * _wd_factor(projected, wd_ratio, p) / (1 - momentum))
        p.sub_(update, alpha=lr)
        flags.append(projected)
    return flags
