"""VRAdam: Velocity-Regularized Adam (Vaidhyanathan et al., arXiv 2505.13196).

Adam whose step size shrinks when the first moment ("velocity") m_t is large, which damps the
two-step oscillations that trajectory-balance and diffusion objectives are prone to. The
measures and the gate live in :mod:`optim.velocity`, the torch-op kernels in
:mod:`optim.vradam_kernels`, the Triton kernels in :mod:`optim.vradam_triton`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from optim import vradam_triton
from optim.adam_state import init_adam_state
from optim.sharding import local_shards
from optim.template import evaluate_closure, gradients
from optim.validation import check_adam, check_choice, check_float
from optim.velocity import (
    NORM_SOURCES,
    NORM_TIMINGS,
    NORMS,
    VELOCITIES,
    GroupTensors,
    check_options,
)
from optim.vradam_kernels import fused_vradam, single_tensor_vradam

__all__ = [
    "IMPLEMENTATIONS",
    "NORMS",
    "NORM_SOURCES",
    "NORM_TIMINGS",
    "VELOCITIES",
    "VRAdam",
    "triton_available",
    "vradam",
]

IMPLEMENTATIONS = ("auto", "reference", "fused", "triton")

# Devices whose fused AdamW kernel accepts a tensor learning rate.
_FUSED_DEVICES = ("cpu", "cuda", "mps")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_available() -> bool:
    """Whether ``impl="triton"`` can run here: triton importable (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1). Cheap: imports triton once, compiles nothing."""
    return vradam_triton.available()


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

    ``norm_timing="lagged"`` gates step t with ``s_{t-1}`` (``s_0 = 0``, so step 1 takes
    ``eta = lr``): a deviation from the paper that lets a kernel update the moments, the
    parameters and the next measure in one pass over memory (fused AdamW's bytes, against one
    more read of m, v and theta for the exact rule). ``s_{t-1}`` is kept in each param group as
    ``"velocity_measure"``, so it is saved with the optimizer's state dict.

    The step never synchronises with the host and builds no tensor from host data:
    ``\eta_t`` and ``s_t`` stay device tensors, exposed after each step as
    :attr:`last_lr_tensor` and :attr:`last_velocity_measure` (shape ``(n_groups,)``; in global
    mode every entry of the latter is the same global value), the
    :class:`optim.protocol.VelocityGated` protocol the monitors read.

    Args:
        params: parameters or param groups to optimise.
        lr: base learning rate alpha_0 (default: 1e-3).
        betas: decay rates of the first and second moments (default: (0.9, 0.999)).
        beta3: strength of the velocity penalty (default: 1.0).
        lr_cutoff: alpha_1, the largest value of beta3 * s_t (default: 10.0).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay lambda, multiplied by eta_t (default: 0.0).
        norm: ``"global"`` or ``"group"``: which parameters one norm covers (default: "global").
        norm_source: ``"velocity"`` (m_t) or ``"grad"`` (g_t) (default: "velocity").
        velocity: the measure s_t: ``"sum"`` (the paper's ||m_t||^2), ``"mean"`` (||m_t||^2 / n)
            or ``"precond"`` (mean square of m_hat_t / (sqrt(v_hat_t) + eps)) (default: "sum").
        norm_timing: ``"exact"`` (the paper's: s_t of this step) or ``"lagged"`` (s_{t-1}; one
            pass) (default: "exact").
        maximize: maximise the objective instead of minimising it (default: False).
        impl: ``"reference"`` (a plain per-parameter loop), ``"fused"`` (torch's fused AdamW
            kernel driven by the tensor eta_t, the measure from cache-sized temporaries),
            ``"triton"`` (multi-tensor Triton kernels; fp32 moments for bf16/fp16 weights), or
            ``"auto"``: triton on CUDA when triton is installed and every parameter is a
            dense fp32/bf16/fp16 tensor, else fused where every parameter is a floating-point
            tensor on a device the fused kernel supports, else reference (default: "auto").
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
        norm_timing: str = "exact",
        maximize: bool = False,
        impl: str = "auto",
    ) -> None:
        check_adam(lr, betas, eps, weight_decay)
        check_float("beta3", beta3, 0.0)
        check_float("lr_cutoff", lr_cutoff, 0.0)
        check_options(norm, norm_source, velocity, norm_timing)
        check_choice("impl", impl, IMPLEMENTATIONS)
        gate = dict(lr=lr, betas=tuple(betas), beta3=beta3, lr_cutoff=lr_cutoff)
        super().__init__(params, gate | dict(eps=eps, weight_decay=weight_decay, maximize=maximize))
        self.norm = norm
        self.norm_source = norm_source
        self.velocity = velocity
        self.norm_timing = norm_timing
        self.impl = impl
        self.last_lr_tensor: Tensor | None = None
        self.last_velocity_measure: Tensor | None = None
        self._workspace: dict = {}  # the Triton kernels' cached pointer tables

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("velocity", "sum")
        self.__dict__.setdefault("norm_timing", "exact")
        self.__dict__.setdefault("_workspace", {})
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _init_group(self, group: dict, impl: str) -> GroupTensors:
        """Gather the tensors of `group` that have a gradient, creating state on first use."""
        h = {k: group[k] for k in ("lr", "beta3", "lr_cutoff", "eps", "weight_decay", "maximize")}
        tensors = GroupTensors(
            hyper=h | {"beta1": group["betas"][0], "beta2": group["betas"][1]}, state=group
        )
        for p, state in gradients(self, group):
            if len(state) == 0:
                # The step count lives beside the parameter, so bias corrections need no sync.
                init_adam_state(state, p, torch.float32 if impl == "triton" else None)
            elif state["step"].device != p.device:
                # load_state_dict keeps "step" where it was saved; the kernels want it here.
                state["step"] = state["step"].to(p.device)
            tensors.params.append(p)
            tensors.grads.append(p.grad)
            tensors.exp_avgs.append(state["exp_avg"])
            tensors.exp_avg_sqs.append(state["exp_avg_sq"])
            tensors.state_steps.append(state["step"])
        return tensors

    def _resolve_impl(self) -> str:
        """The implementation "auto" stands for, from the parameters that have a gradient."""
        if self.impl != "auto":
            return self.impl
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        triton_ready = (
            p.is_cuda and p.dtype in _TRITON_DTYPES and vradam_triton.layout(p) is not None
            for p in params
        )
        on_cuda = params and all(triton_ready)
        if on_cuda and triton_available():
            return "triton"
        for p in params:
            if p.device.type not in _FUSED_DEVICES or not torch.is_floating_point(p):
                return "reference"
        return "fused"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimisation step; `closure` re-evaluates the model and returns the loss."""
        loss = evaluate_closure(closure)
        impl = self._resolve_impl()
        groups = [self._init_group(group, impl) for group in self.param_groups]
        if not any(g.params for g in groups):
            return loss
        self.last_lr_tensor, self.last_velocity_measure = vradam(
            groups,
            norm=self.norm,
            norm_source=self.norm_source,
            velocity=self.velocity,
            norm_timing=self.norm_timing,
            impl=impl,
            workspace=self._workspace,
        )
        return loss


def vradam(
    groups: list[GroupTensors],
    *,
    norm: str,
    norm_source: str,
    impl: str,
    velocity: str = "sum",
    norm_timing: str = "exact",
    workspace: dict | None = None,
) -> tuple[Tensor, Tensor]:
    """Functional VRAdam over gathered param groups; returns (eta_t, s_t), each (n_groups,).

    Every implementation takes the same arguments and runs the same two stages: the velocity
    measure s_t per group (a sum of squares and its element count), then one eta_t per group
    applied to every parameter of the group. `workspace` is where an implementation may cache
    device tensors between steps (the optimizer passes its own dict). DTensor (sharded)
    parameters are stepped on their local shards, the measure summed over shards
    (:mod:`optim.sharding`).
    """
    check_options(norm, norm_source, velocity, norm_timing)
    groups = local_shards(groups)
    options = dict(norm=norm, norm_source=norm_source, velocity=velocity, norm_timing=norm_timing)
    if impl == "reference":
        return single_tensor_vradam(groups, **options)
    if impl == "fused":
        return fused_vradam(groups, **options)
    if impl == "triton":
        devices = {p.device.type for g in groups for p in g.params}
        if devices != {"cuda"} and not vradam_triton.interpreted():
            raise ValueError(
                f"VRAdam impl='triton' runs on CUDA tensors; got {', '.join(sorted(devices))} "
                "(TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for tests)"
            )
        return vradam_triton.triton_vradam(
            groups, **options, cache=workspace if workspace is not None else {}
        )
    raise ValueError(f"Invalid impl: {impl!r}; expected one of reference, fused, triton")
