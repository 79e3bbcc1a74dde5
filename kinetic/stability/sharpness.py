"""Sharpness: the top Hessian eigenvalue, plain and Adam-preconditioned, against the step size.

Gradient descent with step size eta on a quadratic is stable only while lambda_max(H) < 2/eta
(Cohen et al., "edge of stability", arXiv 2103.00065); for Adam the matrix that matters is the
preconditioned Hessian P^{-1/2} H P^{-1/2}, P = diag(sqrt(v_hat) + eps), and the threshold is
(2 + 2 beta1) / ((1 - beta1) eta) (Cohen et al., arXiv 2207.14484). Both eigenvalues come from
power iteration on Hessian-vector products (double backward), so nothing is ever materialised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from optim.protocol import AdaptiveMomentum, VelocityGated

__all__ = [
    "Preconditioner",
    "power_iteration",
    "preconditioner",
    "sharpness",
    "stability_constant",
    "top_eigenvalue",
]

HVP = Callable[[list[Tensor]], list[Tensor]]


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """<a, b> over lists of tensors, accumulated in float64 (a 0-d tensor)."""
    return sum(
        (
            torch.vdot(x.reshape(-1).double(), y.reshape(-1).double())
            for x, y in zip(a, b, strict=True)
        ),
        start=torch.zeros((), dtype=torch.float64, device=a[0].device),
    )


def power_iteration(
    hvp: HVP, shapes: Sequence[Tensor], iters: int, generator: torch.Generator
) -> float:
    """The dominant eigenvalue of the symmetric operator `hvp` (Rayleigh quotient after `iters`).

    `shapes`: tensors giving each block's shape, dtype and device. Power iteration converges to
    the eigenvalue of largest magnitude (signed); for a Hessian near a minimum that is the top
    one. The start vector is Gaussian from `generator` (CPU), so the probe is reproducible.
    Returns 0.0 when the operator is zero.
    """
    v = [torch.randn(s.shape, generator=generator, dtype=torch.float64).to(s) for s in shapes]
    norm = _dot(v, v).sqrt()
    v = [x / norm.to(x.dtype) for x in v]
    eigenvalue = torch.zeros((), dtype=torch.float64)
    for _ in range(iters):
        hv = hvp(v)
        eigenvalue = _dot(v, hv)  # Rayleigh quotient: v has unit norm
        norm = _dot(hv, hv).sqrt()
        if float(norm) == 0.0:  # a zero operator (e.g. a loss linear in every parameter)
            return 0.0
        v = [x / norm.to(x.dtype) for x in hv]
    return float(eigenvalue)


def top_eigenvalue(
    hvp: HVP, shapes: Sequence[Tensor], iters: int, generator: torch.Generator
) -> float:
    """The largest (most positive) eigenvalue of the symmetric operator `hvp`.

    Power iteration finds the eigenvalue of largest magnitude; if that one is negative (a
    direction of strong negative curvature, common at initialisation), a second run on the
    shifted operator H - lambda_neg I, whose spectrum is >= 0, finds lambda_max - lambda_neg.
    """
    dominant = power_iteration(hvp, shapes, iters, generator)
    if dominant >= 0.0:
        return dominant

    def shifted(v: list[Tensor]) -> list[Tensor]:
        return [h - dominant * x for h, x in zip(hvp(v), v, strict=True)]

    return power_iteration(shifted, shapes, iters, generator) + dominant


def _hvp_fn(loss: Tensor, params: Sequence[Tensor]) -> tuple[HVP, list[Tensor]]:
    """H v for the parameters that `loss` uses; returns the function and those parameters.

    Parameters without a gradient (unused by this loss) drop out: their rows of H are zero. A
    gradient without a graph (the loss is linear in that parameter) contributes nothing to H v.
    """
    grads = torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    used_params = [p for p, _ in used]
    curved = [i for i, (_, g) in enumerate(used) if g.requires_grad]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        if not curved:
            return [torch.zeros_like(x) for x in v]
        out = torch.autograd.grad(
            [used[i][1] for i in curved],
            used_params,
            grad_outputs=[v[i] for i in curved],
            retain_graph=True,
            allow_unused=True,
        )
        return [
            torch.zeros_like(x) if h is None else h.detach() for x, h in zip(v, out, strict=True)
        ]

    return hvp, used_params


@dataclass
class Preconditioner:
    """The diagonal scaling of one optimizer's step, read from its state.

    `scale[p]`: (eta_g / eta_0) / P for each parameter (P = sqrt(v_hat) + eps for Adam-type
    optimizers, 1 otherwise), so that eta_0 * scale is the per-coordinate step of a unit "gradient
    direction"; groups with a larger learning rate (e.g. log Z) weigh more. `eta0`: the first
    group's step size (VRAdam: eta_t; 0 means no threshold). `constant`: c in the threshold
    c / eta_0.
    `adaptive`: whether P came from a second moment (Adam-type).
    """

    scale: dict[Tensor, Tensor]
    eta0: float
    constant: float
    adaptive: bool


def stability_constant(optimizer: torch.optim.Optimizer) -> tuple[float, bool]:
    """c such that a quadratic is stable while lambda_max(eta P^-1 H) < c; and "Adam-type?".

    - Adam-type (`exp_avg_sq` in the state and `betas` in the group): c = (2 + 2 beta1)/(1 - beta1),
      the threshold of preconditioned heavy-ball momentum with EMA coefficient beta1
      (arXiv 2207.14484, eq. 2); 38 for beta1 = 0.9.
    - SGD with heavy-ball momentum mu (`momentum` in the group): c = 2 + 2 mu (a momentum
      recursion v = mu v + g, theta -= eta v; Goh, "Why momentum really works").
    - Anything else: plain gradient descent, c = 2.
    The first group decides (groups differ only in rates, which `preconditioner` folds in).
    AdaHB's momentum is not a constant: its last adaptive beta (`last_momentum`) stands in for
    beta1 (AdaHB-Adam, which keeps `beta2` rather than `betas`) or mu (AdaHB-SGD).
    """
    group = optimizer.param_groups[0]
    states = [optimizer.state.get(p, {}) for p in group["params"]]
    adaptive_beta = optimizer.last_momentum if isinstance(optimizer, AdaptiveMomentum) else None
    beta = None if adaptive_beta is None else float(adaptive_beta[0])  # one sync; probes are rare
    if ("betas" in group or "beta2" in group) and any("exp_avg_sq" in s for s in states):
        beta1 = group["betas"][0] if "betas" in group else (beta or 0.0)
        return (2.0 + 2.0 * beta1) / (1.0 - beta1), True
    mu = group.get("momentum", beta or 0.0)
    if mu:
        return 2.0 + 2.0 * mu, False
    return 2.0, False


def _group_etas(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's step size: VRAdam's eta_t (`last_lr_tensor`) where it exists, else lr."""
    eta_t = optimizer.last_lr_tensor if isinstance(optimizer, VelocityGated) else None
    if eta_t is not None and eta_t.numel() == len(optimizer.param_groups):
        return [float(x) for x in eta_t.tolist()]  # one sync; probes are rare
    return [float(group["lr"]) for group in optimizer.param_groups]


def preconditioner(optimizer: torch.optim.Optimizer) -> Preconditioner:
    """The diagonal preconditioner and threshold constant of `optimizer` at its current state.

    Adam-type: P = sqrt(v_t / (1 - beta2^t)) + eps from `exp_avg_sq` and `step`; parameters
    without state yet (never had a gradient) get P = 1, which is harmless since their Hessian rows
    are zero for the losses seen so far.
    """
    constant, adaptive = stability_constant(optimizer)
    etas = _group_etas(optimizer)
    eta0 = etas[0]
    scale: dict[Tensor, Tensor] = {}
    for group, eta in zip(optimizer.param_groups, etas, strict=True):
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            # A first group at lr 0 (the end of a decay) has no threshold; weigh groups equally.
            rel = torch.full_like(p, eta / eta0 if eta0 > 0 else 1.0, dtype=torch.float64)
            if adaptive and "exp_avg_sq" in state:
                beta2 = group["betas"][1] if "betas" in group else group["beta2"]
                step = state["step"].double() if torch.is_tensor(state["step"]) else state["step"]
                v_hat = state["exp_avg_sq"].double() / (1.0 - beta2**step)
                rel = rel / (v_hat.sqrt() + group["eps"])
            scale[p] = rel
    return Preconditioner(scale=scale, eta0=eta0, constant=constant, adaptive=adaptive)


def sharpness(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    iters: int,
    seed: int = 0,
    precond: Preconditioner | None = None,
) -> tuple[float, float | None]:
    """lambda_max(H) and, if `precond`, lambda_max(S^{1/2} H S^{1/2}) with S = precond.scale
    (the largest eigenvalues, not the largest in magnitude; see `top_eigenvalue`).

    `loss_fn` builds the loss graph (called once, under the math attention backend so that
    double backward works through scaled-dot-product attention, e.g. diffusers' attention
    blocks); `params` are the parameters to differentiate. Cost: 2 * iters Hessian-vector
    products (each about two backward passes) plus one forward, twice that where the dominant
    eigenvalue is negative; host syncs once per iteration.
    """
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn()
        hvp, used = _hvp_fn(loss, params)
    if not used:
        return 0.0, (0.0 if precond is not None else None)
    generator = torch.Generator().manual_seed(seed)
    top = top_eigenvalue(hvp, used, iters, generator)
    if precond is None:
        return top, None
    roots = [precond.scale[p].sqrt().to(p.dtype) for p in used]

    def preconditioned(v: list[Tensor]) -> list[Tensor]:
        hv = hvp([r * x for r, x in zip(roots, v, strict=True)])
        return [r * x for r, x in zip(roots, hv, strict=True)]

    return top, top_eigenvalue(preconditioned, used, iters, generator)
