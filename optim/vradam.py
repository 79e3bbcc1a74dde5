"""VRAdam: Velocity-Regularized Adam (Vaidhyanathan et al., arXiv 2505.13196).

Adam whose step size shrinks when the first moment ("velocity") m_t is large, which damps the
two-step oscillations that trajectory-balance and diffusion objectives are prone to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim.adam_state import init_adam_state

__all__ = ["IMPLEMENTATIONS", "NORMS", "NORM_SOURCES", "VELOCITIES", "VRAdam", "vradam"]

NORMS = ("global", "group")
NORM_SOURCES = ("velocity", "grad")
VELOCITIES = ("sum", "mean", "precond")
IMPLEMENTATIONS = ("auto", "reference", "fused")

_GROUP_HYPERPARAMETERS = ("lr", "beta3", "lr_cutoff", "eps", "weight_decay", "maximize")

# Devices whose fused AdamW kernel accepts a tensor learning rate.
_FUSED_DEVICES = ("cpu", "cuda", "mps")


@dataclass
class _GroupTensors:
    """The tensors of one param group that have a gradient this step, with its hyperparameters."""

    hyper: dict
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    exp_avgs: list[Tensor] = field(default_factory=list)
    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    state_steps: list[Tensor] = field(default_factory=list)


class VRAdam(Optimizer):
    r"""Velocity-Regularized Adam (arXiv 2505.13196), with decoupled weight decay.

    .. math::
        \begin{aligned}
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \eta_t &= \alpha_0 \,/\, \bigl(1 + \min(\beta_3 s_t, \alpha_1)\bigr) \\
        \theta_t &= \theta_{t-1}(1 - \eta_t\lambda)
            - \eta_t\, \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon}
        \end{aligned}

    The velocity measure ``s_t`` is computed after this step's moment updates, over the
    ``n`` elements of every parameter that has a gradient: over all param groups
    (``norm="global"``, the paper's design: one scalar gate for the whole model) or within each
    group (``norm="group"``, as the authors' released code). ``velocity`` picks the measure:

    .. math::
        \begin{aligned}
        \texttt{"sum"}:&\quad s_t = \lVert m_t \rVert^2 = \textstyle\sum_i m_{t,i}^2
            \quad\text{(the paper's; grows with the model's size)} \\
        \texttt{"mean"}:&\quad s_t = \lVert m_t \rVert^2 / n
            \quad\text{(mean square velocity; scale-free in } n) \\
        \texttt{"precond"}:&\quad s_t = \tfrac{1}{n} \textstyle\sum_i
            \bigl(\hat m_{t,i} / (\sqrt{\hat v_{t,i}} + \epsilon)\bigr)^2
            \quad\text{(kinetic energy per weight of Adam's own step direction)}
        \end{aligned}

    with the raw first moment ``m_t`` (before bias correction) for ``"sum"``/``"mean"``, and the
    bias-corrected ``\hat m_t, \hat v_t`` of this step for ``"precond"``, whose ``s_t`` is the mean
    square of Adam's update divided by ``\eta_t``: it is about 1 for a steady gradient and
    independent of the gradient's units. ``norm_source="grad"`` replaces ``m_t`` by ``g_t`` in
    ``"sum"`` and ``"mean"``; ``"precond"`` measures the step itself and needs
    ``norm_source="velocity"``. ``\alpha_0`` is the group's ``lr``, so learning-rate schedulers act
    on it; the smallest step is ``lr / (1 + lr_cutoff)``. The same ``beta3`` gives very different
    gates under the three measures: ``"sum"`` scales with ``n``, the others do not.

    The step never synchronises with the host: ``\eta_t`` and ``s_t`` stay device tensors,
    exposed after each step as :attr:`last_lr_tensor` and :attr:`last_velocity_sq_norm` (shape
    ``(n_groups,)``; in global mode every entry of the latter is the same global value).

    Args:
        params: parameters or param groups to optimise.
        lr: base learning rate alpha_0 (default: 1e-3).
        betas: decay rates of the first and second moments (default: (0.9, 0.999)).
        beta3: strength of the velocity penalty (default: 1.0).
        lr_cutoff: alpha_1, the largest value of beta3 * ||m_t||^2 (default: 10.0).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay lambda, multiplied by eta_t (default: 0.0).
        norm: ``"global"`` or ``"group"``: which parameters one norm covers (default: "global").
        norm_source: ``"velocity"`` (m_t) or ``"grad"`` (g_t) (default: "velocity").
        velocity: the measure s_t: ``"sum"`` (the paper's ||m_t||^2), ``"mean"`` (||m_t||^2 / n)
            or ``"precond"`` (mean square of m_hat_t / (sqrt(v_hat_t) + eps)) (default: "sum").
        maximize: maximise the objective instead of minimising it (default: False).
        impl: ``"reference"`` (a plain per-parameter loop), ``"fused"`` (torch's fused AdamW
            kernel driven by the tensor eta_t), or ``"auto"`` (fused where every parameter is a
            floating-point tensor on a device the kernel supports) (default: "auto").
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        beta3: float = 1.0,
        lr_cutoff: float = 10.0,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        norm: str = "global",
        norm_source: str = "velocity",
        velocity: str = "sum",
        maximize: bool = False,
        impl: str = "auto",
    ) -> None:
        # `not 0 < x` rather than `x <= 0` so that NaN is rejected too.
        if isinstance(lr, Tensor) or not 0.0 < lr < math.inf:
            raise ValueError(f"Invalid lr: {lr!r}; expected a float in (0, inf)")
        if len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid betas[{i}]: {beta!r}; expected a float in [0, 1)")
        if not 0.0 <= beta3 < math.inf:
            raise ValueError(f"Invalid beta3: {beta3!r}; expected a float in [0, inf)")
        if not 0.0 <= lr_cutoff < math.inf:
            raise ValueError(f"Invalid lr_cutoff: {lr_cutoff!r}; expected a float in [0, inf)")
        if not 0.0 < eps < math.inf:
            raise ValueError(f"Invalid eps: {eps!r}; expected a float in (0, inf)")
        if not 0.0 <= weight_decay < math.inf:
            raise ValueError(
                f"Invalid weight_decay: {weight_decay!r}; expected a float in [0, inf)"
            )
        if norm not in NORMS:
            raise ValueError(f"Invalid norm: {norm!r}; expected one of {', '.join(NORMS)}")
        if norm_source not in NORM_SOURCES:
            raise ValueError(
                f"Invalid norm_source: {norm_source!r}; expected one of {', '.join(NORM_SOURCES)}"
            )
        _check_velocity(velocity, norm_source)
        if impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"Invalid impl: {impl!r}; expected one of {', '.join(IMPLEMENTATIONS)}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            beta3=beta3,
            lr_cutoff=lr_cutoff,
            eps=eps,
            weight_decay=weight_decay,
            maximize=maximize,
        )
        super().__init__(params, defaults)
        self.norm = norm
        self.norm_source = norm_source
        self.velocity = velocity
        self.impl = impl
        self.last_lr_tensor: Tensor | None = None
        self.last_velocity_sq_norm: Tensor | None = None

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("velocity", "sum")
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _init_group(self, group: dict) -> _GroupTensors:
        """Gather the tensors of `group` that have a gradient, creating state on first use."""
        tensors = _GroupTensors(
            hyper={k: group[k] for k in _GROUP_HYPERPARAMETERS}
            | {"beta1": group["betas"][0], "beta2": group["betas"][1]}
        )
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("VRAdam does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # The step count lives beside the parameter, so bias corrections need no sync.
                init_adam_state(state, p)
            elif state["step"].device != p.device:
                # load_state_dict keeps "step" where it was saved; the kernels want it here.
                state["step"] = state["step"].to(p.device)
            tensors.params.append(p)
            tensors.grads.append(p.grad)
            tensors.exp_avgs.append(state["exp_avg"])
            tensors.exp_avg_sqs.append(state["exp_avg_sq"])
            tensors.state_steps.append(state["step"])
        return tensors

    def _resolve_impl(self, groups: list[_GroupTensors]) -> str:
        if self.impl != "auto":
            return self.impl
        for g in groups:
            for p in g.params:
                if p.device.type not in _FUSED_DEVICES or not torch.is_floating_point(p):
                    return "reference"
        return "fused"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._init_group(group) for group in self.param_groups]
        if not any(g.params for g in groups):
            return loss
        self.last_lr_tensor, self.last_velocity_sq_norm = vradam(
            groups,
            norm=self.norm,
            norm_source=self.norm_source,
            velocity=self.velocity,
            impl=self._resolve_impl(groups),
        )
        return loss


def _check_velocity(velocity: str, norm_source: str) -> None:
    if velocity not in VELOCITIES:
        raise ValueError(f"Invalid velocity: {velocity!r}; expected one of {', '.join(VELOCITIES)}")
    if velocity == "precond" and norm_source != "velocity":
        raise ValueError(
            f"Invalid velocity: 'precond' with norm_source={norm_source!r}; 'precond' measures "
            "Adam's step m_hat/(sqrt(v_hat)+eps), so it needs norm_source='velocity'"
        )


def vradam(
    groups: list[_GroupTensors],
    *,
    norm: str,
    norm_source: str,
    impl: str,
    velocity: str = "sum",
) -> tuple[Tensor, Tensor]:
    """Functional VRAdam over gathered param groups; returns (eta_t, s_t), each (n_groups,).

    Both implementations share this signature and the two stages: the velocity measure s_t per
    group (a sum of squares and its element count), then one eta_t per group applied to every
    parameter of the group.
    """
    if norm not in NORMS:
        raise ValueError(f"Invalid norm: {norm!r}; expected one of {', '.join(NORMS)}")
    if norm_source not in NORM_SOURCES:
        raise ValueError(
            f"Invalid norm_source: {norm_source!r}; expected one of {', '.join(NORM_SOURCES)}"
        )
    _check_velocity(velocity, norm_source)
    if impl == "reference":
        return _single_tensor_vradam(groups, norm=norm, norm_source=norm_source, velocity=velocity)
    if impl == "fused":
        return _fused_vradam(groups, norm=norm, norm_source=norm_source, velocity=velocity)
    raise ValueError(f"Invalid impl: {impl!r}; expected one of reference, fused")


def _home_device(groups: list[_GroupTensors]) -> torch.device:
    return next(g.params[0].device for g in groups if g.params)


def _learning_rates(
    groups: list[_GroupTensors],
    sq_norms: list[Tensor | None],
    norm: str,
    device: torch.device,
    velocity: str = "sum",
) -> tuple[Tensor, Tensor]:
    """eta_t = alpha_0 / (1 + min(beta3 s_t, alpha_1)) per group, as device tensors.

    `sq_norms` are per-group sums of squares; for the "mean" and "precond" measures they are
    divided by the number of elements that entered them (a Python int: no sync). Computed in
    float64 when any parameter is float64 (so that float64 runs are exact to float64), else in
    float32.
    """
    wide = any(p.dtype == torch.float64 for g in groups for p in g.params)
    dtype = torch.float64 if wide else torch.float32
    zero = torch.zeros((), dtype=dtype, device=device)
    parts = [zero if s is None else s.to(device, dtype, non_blocking=True) for s in sq_norms]
    per_group = torch.stack(parts)  # (G,)
    counts = [sum(p.numel() for p in g.params) for g in groups]
    if norm == "global":
        per_group = per_group.sum()
        if velocity != "sum":
            per_group = per_group / max(sum(counts), 1)
        per_group = per_group.expand(len(groups)).clone()
    elif velocity != "sum":
        n = torch.tensor([max(n, 1) for n in counts], dtype=dtype, device=device)  # (G,)
        per_group = per_group / n
    h = [g.hyper for g in groups]
    alpha0 = torch.tensor([x["lr"] for x in h], dtype=dtype, device=device)
    beta3 = torch.tensor([x["beta3"] for x in h], dtype=dtype, device=device)
    cutoff = torch.tensor([x["lr_cutoff"] for x in h], dtype=dtype, device=device)
    eta = alpha0 / (1.0 + torch.minimum(beta3 * per_group, cutoff))
    return eta, per_group


def _sum_sq(tensors: list[Tensor]) -> Tensor:
    """Sum of squares of a list of tensors, accumulated in at least float32."""
    norms = torch._foreach_norm(tensors)
    return torch.stack(norms).to(torch.promote_types(norms[0].dtype, torch.float32)).square().sum()


def _adam_direction(m: Tensor, v: Tensor, step: Tensor, hyper: dict) -> Tensor:
    """Adam's step direction m_hat_t / (sqrt(v_hat_t) + eps) of one parameter, after step t."""
    # Bias corrections in float64 (float32 where the device lacks it), as the fused kernels.
    t = step.to(torch.float32 if m.device.type == "mps" else torch.float64)
    bias_correction1 = 1 - hyper["beta1"] ** t
    bias_correction2_sqrt = (1 - hyper["beta2"] ** t).sqrt()
    denom = (v.sqrt() / bias_correction2_sqrt).add_(hyper["eps"])
    return m / denom / bias_correction1


def _single_tensor_vradam(
    groups: list[_GroupTensors], *, norm: str, norm_source: str, velocity: str = "sum"
) -> tuple[Tensor, Tensor]:
    """Reference implementation: a plain loop over parameters, written as the math reads."""
    sq_norms: list[Tensor | None] = []
    # Stage 1: the moments, and the sum of squares of each group's velocity (or gradient, or
    # Adam step direction).
    for g in groups:
        beta1, beta2 = g.hyper["beta1"], g.hyper["beta2"]
        sq = None
        for grad, m, v, step in zip(g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True):
            if g.hyper["maximize"]:
                grad = -grad
            step += 1
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            if velocity == "precond":
                source = _adam_direction(m, v, step, g.hyper)
            else:
                source = m if norm_source == "velocity" else grad
            acc_dtype = torch.promote_types(source.dtype, torch.float32)
            term = torch.linalg.vector_norm(source, dtype=acc_dtype).square()
            sq = term if sq is None else sq + term
        sq_norms.append(sq)
    eta, sq = _learning_rates(groups, sq_norms, norm, _home_device(groups), velocity)
    # Stage 2: the decayed, bias-corrected Adam step with learning rate eta_t.
    for i, g in enumerate(groups):
        for p, m, v, step in zip(g.params, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True):
            lr = eta[i].to(p.device)
            if g.hyper["weight_decay"] != 0:
                p.mul_(1 - lr * g.hyper["weight_decay"])
            p.sub_(lr * _adam_direction(m, v, step, g.hyper))
    return eta, sq


def _fused_vradam(
    groups: list[_GroupTensors], *, norm: str, norm_source: str, velocity: str = "sum"
) -> tuple[Tensor, Tensor]:
    """Fast path: one foreach pass for ||m_t||^2, then torch's fused AdamW kernel at lr = eta_t.

    The kernel updates m, v and the parameters in a single pass, so the new velocity norm is
    computed beforehand from m_{t-1} and g_t into temporaries; the kernel applies the decoupled
    weight decay as theta (1 - lr lambda) with lr = eta_t, exactly the VRAdam rule.
    ``velocity="precond"`` needs v_t and the step direction itself before eta_t is known, so it
    takes the foreach path of :func:`_foreach_precond_vradam` instead of the fused kernel.
    """
    if velocity == "precond":
        return _foreach_precond_vradam(groups, norm=norm)
    sq_norms: list[Tensor | None] = []
    for g in groups:
        if not g.params:
            sq_norms.append(None)
            continue
        grads = torch._foreach_neg(g.grads) if g.hyper["maximize"] else g.grads
        if norm_source == "velocity":
            sq_norms.append(_sum_sq(torch._foreach_lerp(g.exp_avgs, grads, 1 - g.hyper["beta1"])))
        else:
            sq_norms.append(_sum_sq(grads))
    eta, sq = _learning_rates(groups, sq_norms, norm, _home_device(groups), velocity)
    for i, g in enumerate(groups):
        if not g.params:
            continue
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            [g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps]
        )
        for (device, _), ((params, grads, exp_avgs, exp_avg_sqs, steps), _) in grouped.items():
            torch._foreach_add_(steps, 1)
            torch._fused_adamw_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=eta[i].to(device, non_blocking=True),
                beta1=g.hyper["beta1"],
                beta2=g.hyper["beta2"],
                weight_decay=g.hyper["weight_decay"],
                eps=g.hyper["eps"],
                amsgrad=False,
                maximize=g.hyper["maximize"],
            )
    return eta, sq


def _foreach_precond_vradam(groups: list[_GroupTensors], *, norm: str) -> tuple[Tensor, Tensor]:
    """VRAdam with s_t = mean square of Adam's direction u_t = m_hat_t / (sqrt(v_hat_t) + eps).

    Three stages over foreach lists, with one temporary per parameter (u_t): the moments in
    place; u_t and its sum of squares; then theta (1 - eta_t lambda) - eta_t u_t. This reads the
    moments once fewer than temporaries + the fused kernel would, since u_t is reused as the step.
    """
    directions: list[list[Tensor]] = []
    sq_norms: list[Tensor | None] = []
    for g in groups:
        if not g.params:
            directions.append([])
            sq_norms.append(None)
            continue
        beta1, beta2 = g.hyper["beta1"], g.hyper["beta2"]
        grads = torch._foreach_neg(g.grads) if g.hyper["maximize"] else g.grads
        torch._foreach_add_(g.state_steps, 1)
        torch._foreach_lerp_(g.exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(g.exp_avg_sqs, beta2)
        torch._foreach_addcmul_(g.exp_avg_sqs, grads, grads, value=1 - beta2)
        # Bias corrections per tensor, in float64 as the reference (0-dim device tensors).
        steps = [s.to(torch.float64) for s in g.state_steps]
        bias_correction1 = torch._foreach_pow(beta1, steps)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        bias_correction2_sqrt = torch._foreach_pow(beta2, steps)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_add_(bias_correction2_sqrt, 1)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        u = torch._foreach_sqrt(g.exp_avg_sqs)
        torch._foreach_div_(u, bias_correction2_sqrt)
        torch._foreach_add_(u, g.hyper["eps"])
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, g.exp_avgs)
        torch._foreach_div_(u, bias_correction1)
        directions.append(u)
        sq_norms.append(_sum_sq(u))
    eta, sq = _learning_rates(groups, sq_norms, norm, _home_device(groups), "precond")
    for i, (g, u) in enumerate(zip(groups, directions, strict=True)):
        if not g.params:
            continue
        lr = eta[i].to(g.params[0].device, non_blocking=True)
        if g.hyper["weight_decay"] != 0:
            torch._foreach_mul_(g.params, 1 - lr * g.hyper["weight_decay"])
        torch._foreach_mul_(u, lr)
        torch._foreach_sub_(g.params, u)
    return eta, sq
