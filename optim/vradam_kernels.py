"""VRAdam's torch-op implementations: the reference loop and the fused (multi-tensor) step.

Both share the signature of :func:`optim.vradam.vradam` and its two stages: the velocity measure
of every group (a sum of squares, reduced to eta_t by :mod:`optim.velocity`), then the decoupled
Adam step at eta_t. In the lagged timing the order is reversed: eta_t comes from the measure of
the previous step, kept in the group's state, and the new measure is taken after the step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from optim.velocity import (
    GroupTensors,
    accumulation_dtype,
    gate,
    home_device,
    learning_rates,
    measures,
)

__all__ = ["fused_vradam", "single_tensor_vradam"]

# Elements per temporary in the fused measure: 128 Ki float32 (512 KiB) stays in a core's L2, so
# the temporary moments cost a read of m and g from memory but no write-back.
CHUNK_ELEMENTS = 1 << 17


def lagged_rates(groups: list[GroupTensors]) -> Tensor:
    """eta_t of the lagged timing: the gate of the previous step's measure (0 before step 1)."""
    device, dtype = home_device(groups), accumulation_dtype(groups)
    etas = []
    for g in groups:
        s = g.state.get("velocity_measure")
        s = torch.zeros((), dtype=dtype, device=device) if s is None else s.to(device, dtype)
        etas.append(gate(s, g.hyper))
    return torch.stack(etas)


def keep_measure(
    groups: list[GroupTensors], sums: list[Tensor | None], *, norm: str, velocity: str
) -> Tensor:
    """s_t per group from this step's sums of squares, stored for the next lagged step (it goes
    into the optimizer's state_dict with the param group); returns s_t, (n_groups,)."""
    s = torch.stack(measures(groups, sums, norm=norm, velocity=velocity))
    for i, g in enumerate(groups):
        g.state["velocity_measure"] = s[i]
    return s


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on MPS, which lacks it: the dtype of the bias corrections and of the
    velocity measure's sums of squares. In float32 a sum of 65k near-equal squares (the
    "precond" measure, whose terms are all ~1) drifts by ~1e-5 relative with the order of the
    additions, so a sharded run, which sums in another order, would not take the unsharded
    step."""
    return torch.float32 if device.type == "mps" else torch.float64


def _adam_direction(m: Tensor, v: Tensor, step: Tensor, hyper: dict) -> Tensor:
    """Adam's step direction m_hat_t / (sqrt(v_hat_t) + eps) of one parameter, after step t."""
    # Bias corrections in float64 (float32 where the device lacks it), as the fused kernels.
    t = step.to(wide_dtype(m.device))
    bias_correction1 = 1 - hyper["beta1"] ** t
    bias_correction2_sqrt = (1 - hyper["beta2"] ** t).sqrt()
    denom = (v.sqrt() / bias_correction2_sqrt).add_(hyper["eps"])
    return m / denom / bias_correction1


def _apply(p: Tensor, direction: Tensor, eta: Tensor, hyper: dict) -> None:
    """theta <- theta (1 - eta lambda) - eta u, with eta a 0-dim device tensor."""
    lr = eta.to(p.device)
    if hyper["weight_decay"] != 0:
        p.mul_(1 - lr * hyper["weight_decay"])
    p.sub_(lr * direction)


def single_tensor_vradam(
    groups: list[GroupTensors], *, norm: str, norm_source: str, velocity: str, norm_timing: str
) -> tuple[Tensor, Tensor]:
    """Reference implementation: a plain loop over parameters, written as the math reads."""
    lagged = norm_timing == "lagged"
    eta = lagged_rates(groups) if lagged else None
    sums: list[Tensor | None] = []
    # Stage 1: the moments, and the sum of squares of each group's velocity (or gradient, or
    # Adam step direction); the lagged timing also steps here, at the previous step's gate.
    for i, g in enumerate(groups):
        beta1, beta2 = g.hyper["beta1"], g.hyper["beta2"]
        sq = None
        for p, grad, m, v, step in zip(
            g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True
        ):
            if g.hyper["maximize"]:
                grad = -grad
            step += 1
            m.lerp_(grad, 1 - beta1)
            v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            direction = _adam_direction(m, v, step, g.hyper)
            if lagged:
                _apply(p, direction, eta[i], g.hyper)
            if velocity == "precond":
                source = direction
            else:
                source = m if norm_source == "velocity" else grad
            term = torch.linalg.vector_norm(source, dtype=wide_dtype(source.device)).square()
            sq = term if sq is None else sq + term
        sums.append(sq)
    if lagged:
        return eta, keep_measure(groups, sums, norm=norm, velocity=velocity)
    new_eta, s = learning_rates(groups, sums, norm=norm, velocity=velocity)
    # Stage 2: the decayed, bias-corrected Adam step with learning rate eta_t.
    for i, g in enumerate(groups):
        for p, m, v, step in zip(g.params, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True):
            _apply(p, _adam_direction(m, v, step, g.hyper), new_eta[i], g.hyper)
    return new_eta, s


def _spans(tensors: list[Tensor]) -> list[tuple[int, int]]:
    """Consecutive index ranges of `tensors` of at most CHUNK_ELEMENTS elements (or one tensor)."""
    spans, start, size = [], 0, 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > CHUNK_ELEMENTS:
            spans.append((start, i))
            start, size = i, 0
        size += t.numel()
    if start < len(tensors):
        spans.append((start, len(tensors)))
    return spans


def _bias_corrections(steps: list[Tensor], hyper: dict) -> tuple[list[Tensor], list[Tensor]]:
    """Per-tensor 1 - beta1^t and sqrt(1 - beta2^t) in float64 (0-dim views; no host data)."""
    t = torch.stack(steps).to(torch.float64)  # (n,)
    bias_correction1 = 1 - torch.pow(hyper["beta1"], t)
    bias_correction2_sqrt = (1 - torch.pow(hyper["beta2"], t)).sqrt()
    return list(bias_correction1.unbind()), list(bias_correction2_sqrt.unbind())


def _measure_norms(
    g: GroupTensors, *, norm_source: str, velocity: str, moments_updated: bool
) -> list[Tensor]:
    """Per-tensor norms of this step's measure source, built chunk by chunk in cache-sized
    temporaries (no allocation proportional to the model).

    Before the moment update (`moments_updated=False`) m_t and v_t are formed from m_{t-1},
    v_{t-1} and g_t; after it, they are read from the state.
    """
    beta1, beta2 = g.hyper["beta1"], g.hyper["beta2"]
    dtype = wide_dtype(g.params[0].device)
    if velocity != "precond" and norm_source == "grad":
        return list(torch._foreach_norm(g.grads, dtype=dtype))
    if velocity != "precond" and moments_updated:
        return list(torch._foreach_norm(g.exp_avgs, dtype=dtype))
    if velocity == "precond":
        bias_correction1, bias_correction2_sqrt = _bias_corrections(g.state_steps, g.hyper)
    norms: list[Tensor] = []
    for a, b in _spans(g.params):
        exp_avgs, exp_avg_sqs = g.exp_avgs[a:b], g.exp_avg_sqs[a:b]
        if moments_updated:
            m_t = exp_avgs
        else:
            grads = g.grads[a:b]
            if g.hyper["maximize"]:
                grads = torch._foreach_neg(grads)
            m_t = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        if velocity != "precond":
            norms.extend(torch._foreach_norm(m_t, dtype=dtype))
            continue
        if moments_updated:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        else:
            denom = torch._foreach_mul(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(denom, grads, grads, value=1 - beta2)
            torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bias_correction2_sqrt[a:b])
        torch._foreach_add_(denom, g.hyper["eps"])
        u = torch._foreach_div(m_t, denom)
        torch._foreach_div_(u, bias_correction1[a:b])
        norms.extend(torch._foreach_norm(u, dtype=dtype))
    return norms


def _sum_sq(norms: list[Tensor]) -> Tensor:
    """Sum of squares from per-tensor norms (`wide_dtype`), accumulated in at least float32."""
    stacked = torch.stack(norms)
    return stacked.to(torch.promote_types(stacked.dtype, torch.float32)).square().sum()


def _fused_adamw_step(g: GroupTensors, eta: Tensor) -> None:
    """torch's fused AdamW kernel at lr = eta (a device tensor): m, v and theta in one pass."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps]
    )
    for (device, _), ((params, grads, exp_avgs, exp_avg_sqs, steps), _) in grouped.items():
        torch._fused_adamw_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=eta.to(device, non_blocking=True),
            beta1=g.hyper["beta1"],
            beta2=g.hyper["beta2"],
            weight_decay=g.hyper["weight_decay"],
            eps=g.hyper["eps"],
            amsgrad=False,
            maximize=g.hyper["maximize"],
        )


def fused_vradam(
    groups: list[GroupTensors], *, norm: str, norm_source: str, velocity: str, norm_timing: str
) -> tuple[Tensor, Tensor]:
    """Fast path: the measure from cache-sized temporaries, then torch's fused AdamW at eta_t.

    Exact timing: the fused kernel updates m, v and the parameters in a single pass, so the new
    measure is formed beforehand from m_{t-1}, v_{t-1} and g_t, chunk by chunk; the kernel
    applies the decoupled weight decay as theta (1 - lr lambda) with lr = eta_t, exactly the
    VRAdam rule. Lagged timing: the kernel runs first at the previous step's gate, and the
    measure is read from the updated state.
    """
    lagged = norm_timing == "lagged"
    for g in groups:
        if g.params:
            torch._foreach_add_(g.state_steps, 1)
    if lagged:
        eta = lagged_rates(groups)
        for i, g in enumerate(groups):
            if g.params:
                _fused_adamw_step(g, eta[i])
    sums: list[Tensor | None] = []
    for g in groups:
        if not g.params:
            sums.append(None)
            continue
        norms = _measure_norms(
            g, norm_source=norm_source, velocity=velocity, moments_updated=lagged
        )
        sums.append(_sum_sq(norms))
    if lagged:
        return eta, keep_measure(groups, sums, norm=norm, velocity=velocity)
    new_eta, s = learning_rates(groups, sums, norm=norm, velocity=velocity)
    for i, g in enumerate(groups):
        if g.params:
            _fused_adamw_step(g, new_eta[i])
    return new_eta, s
