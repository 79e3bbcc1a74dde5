"""k-Adam (after Gould & Tanaka, arXiv 2411.05746): Adam's adaptive normalisation, k times.

Adam turns the gradient into a normalised direction m_hat / (sqrt(v_hat) + eps). k-Adam feeds that
direction into a second Adam normaliser, and so on, k times in all; k = 1 is Adam(W).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim.adam_state import init_adam_state
from optim.template import gather, hyperparameters, step_groups
from optim.validation import check_adam, check_int

__all__ = ["KAdam", "is_stable", "kadam"]


def is_stable(betas: tuple[float, float]) -> bool:
    """The stability condition beta1^2 < beta2 (equivalently beta1 < sqrt(beta2)).

    Under it, every level's output is bounded elementwise by
    (1 - beta1) / (sqrt(1 - beta2) (1 - beta1/sqrt(beta2))) whatever its input, so the k
    normalisers compose into a bounded step; outside it one large input can give a step that
    grows without bound in beta1 / sqrt(beta2).
    """
    return betas[0] ** 2 < betas[1]


class KAdam(Optimizer):
    r"""k-Adam: k successive Adam normalisations (after Gould & Tanaka, arXiv 2411.05746),
    with decoupled weight decay.

    .. math::
        \begin{aligned}
        u^{(0)}_t &= g_t \\
        m^{(j)}_t &= \beta_1 m^{(j)}_{t-1} + (1-\beta_1) u^{(j-1)}_t, \quad
        v^{(j)}_t = \beta_2 v^{(j)}_{t-1} + (1-\beta_2) \bigl(u^{(j-1)}_t\bigr)^2
            \qquad j = 1, \dots, k \\
        u^{(j)}_t &= \frac{m^{(j)}_t / (1-\beta_1^t)}{\sqrt{v^{(j)}_t / (1-\beta_2^t)} + \epsilon}
        \\
        \theta_t &= \theta_{t-1}(1 - \alpha\lambda) - \alpha\, u^{(k)}_t
        \end{aligned}

    This recursion is our reading of "Adam's normalisation applied k times in succession": each
    level j has its own first and second moments, fed by the previous level's normalised output
    in place of the gradient, with the same (beta1, beta2, eps) and Adam's bias corrections at
    every level. We could not check it against the paper's text; the paper may share betas
    differently across levels or place the momentum only at one level. With k = 1 it is exactly
    torch's AdamW (Adam when weight_decay = 0).

    Stability: beta1^2 < beta2 (see :func:`is_stable`) is checked at construction, and a
    ``UserWarning`` is issued outside it (the rule is still applied).

    State: ``step``; ``exp_avg`` and ``exp_avg_sq`` hold level 1, i.e. the moments m^(1), v^(1) of
    the raw gradient, so ``sqrt(v_hat)+eps`` is level 1's preconditioner (the full step is not a
    diagonal preconditioning of g_t for k > 1); ``inner_exp_avg`` and ``inner_exp_avg_sq`` stack
    levels 2..k along a new first dim (shape ``(k-1, *param.shape)``; absent when k = 1).

    Args:
        params: parameters or param groups to optimise.
        lr: learning rate alpha (default: 1e-3).
        betas: decay rates of the first and second moments, shared by all levels
            (default: (0.9, 0.999)).
        eps: term added to every level's denominator (default: 1e-8).
        weight_decay: decoupled weight decay lambda (default: 0.0).
        k: number of successive normalisations, an int >= 1 (default: 2).
        maximize: maximise the objective instead of minimising it (default: False).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        k: int = 2,
        *,
        maximize: bool = False,
    ) -> None:
        check_adam(lr, betas, eps, weight_decay)
        check_int("k", k, 1)
        if not is_stable(betas):
            warnings.warn(
                f"k-Adam with betas=({betas[0]!r}, {betas[1]!r}) is outside its stability "
                f"condition beta1^2 < beta2 ({betas[0] ** 2!r} >= {betas[1]!r}); "
                "its steps may grow without bound",
                UserWarning,
                stacklevel=2,
            )
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, k=k, maximize=maximize
        )
        super().__init__(params, defaults)

    def _init_group(self, group: dict) -> dict[str, list]:
        """Gather the group's tensors; ``exp_avgs[i]``/``exp_avg_sqs[i]`` list parameter i's
        k levels (level 1 from ``exp_avg``, levels 2..k as views of the stacked state)."""

        def init(state: dict, p: Tensor) -> None:
            init_adam_state(state, p)
            if group["k"] > 1:
                state["inner_exp_avg"] = p.new_zeros((group["k"] - 1, *p.shape))
                state["inner_exp_avg_sq"] = p.new_zeros((group["k"] - 1, *p.shape))

        lists = gather(self, group, init, state_steps="step")
        lists["exp_avgs"], lists["exp_avg_sqs"] = [], []
        for state in lists["states"]:
            inner = group["k"] > 1
            m_inner = list(state["inner_exp_avg"].unbind(0)) if inner else []
            v_inner = list(state["inner_exp_avg_sq"].unbind(0)) if inner else []
            lists["exp_avgs"].append([state["exp_avg"], *m_inner])
            lists["exp_avg_sqs"].append([state["exp_avg_sq"], *v_inner])
        return lists

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; `closure` re-evaluates the model and returns the loss."""
        return step_groups(self, closure, self._step_group)

    def _step_group(self, group: dict) -> None:
        lists = self._init_group(group)
        kadam(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["state_steps"],
            **hyperparameters(group, ("lr", "betas", "eps", "weight_decay", "maximize")),
        )


def kadam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[list[Tensor]],
    exp_avg_sqs: list[list[Tensor]],
    state_steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool,
) -> None:
    """Functional k-Adam (single-tensor loop); `exp_avgs[i]` lists parameter i's k levels."""
    for p, grad, levels_m, levels_v, step in zip(
        params, grads, exp_avgs, exp_avg_sqs, state_steps, strict=True
    ):
        step += 1
        # Bias corrections computed in float64, as torch's kernels, then cast to the parameter's
        # dtype: a 0-dim float64 tensor would otherwise promote a 0-dim parameter (log Z).
        t = step.to(torch.float64)
        bias_correction1 = (1 - beta1**t).to(p.dtype)
        bias_correction2_sqrt = (1 - beta2**t).sqrt().to(p.dtype)
        u = -grad if maximize else grad
        for m, v in zip(levels_m, levels_v, strict=True):
            m.lerp_(u, 1 - beta1)
            v.mul_(beta2).addcmul_(u, u, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            u = m / denom / bias_correction1
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        p.sub_(u, alpha=lr)
