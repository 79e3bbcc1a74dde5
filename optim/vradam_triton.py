"""VRAdam as Triton kernels for CUDA: multi-tensor, two passes (exact) or one (lagged).

One launch covers every parameter of a param group and dtype: the kernels read per-tensor
pointer tables (int64 addresses of theta, g, m, v and the step counter, and each tensor's
length) and a chunk table (tensor index and offset of each block of ``BLOCK`` elements), so a
program handles one block of one tensor. The tables are device tensors built once and cached;
they are rebuilt (one small host-to-device copy) only when a tensor's storage moves, e.g. when
``zero_grad(set_to_none=True)`` lets the allocator hand out new gradient buffers. With static
gradients (``set_to_none=False``, as CUDA-graph capture requires anyway) a step builds nothing
on the host and reads nothing back.

Exact timing, per group and dtype:

1. ``_moments_kernel``: m_t, v_t in place (fp32 state, parameters in fp32/bf16/fp16) and one
   fp32 partial sum of the measure source per block, written to its own slot (no atomics).
2. ``_reduce_kernel``: one program per group sums that group's partial slots in a fixed order,
   so the reduction is deterministic; :func:`optim.velocity.learning_rates` turns the sums into
   eta_t on the device.
3. ``_update_kernel``: theta <- theta (1 - eta_t lambda) - eta_t m_hat / (sqrt(v_hat) + eps),
   reading eta_t of its group from the device.

Lagged timing fuses 1 and 3 (``_moments_kernel`` with ``UPDATE=True`` at the previous step's
eta), so it moves fused AdamW's bytes. Triton is imported on first use: the package imports
without it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from optim.velocity import GroupTensors, learning_rates

__all__ = ["BLOCK", "available", "triton_vradam"]

# Elements per program. Tests lower it (with TRITON_INTERPRET=1) to exercise partial blocks.
BLOCK = 2048
_REDUCE_BLOCK = 1024
_MEASURES = {"velocity": 0, "grad": 1, "precond": 2}


@functools.cache
def available() -> bool:
    """Whether triton can be imported (cheap after the first call; compiles nothing)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): kernels then take CPU
    tensors. Triton reads the variable when a kernel is decorated, see :func:`kernels`."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels(interpret: bool) -> dict:
    """The jitted kernels, defined on first use (keyed by the interpreter flag, which Triton
    reads at decoration time)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _moments_kernel(
        p_tab, g_tab, m_tab, v_tab, step_tab, numel_tab, chunk_tensor, chunk_start, partials,
        eta_ptr, group, beta1, beta2, log2_beta1, log2_beta2, eps, weight_decay,
        P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
        MEASURE: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
        mask = offs < tl.load(numel_tab + t)
        g_ptr = tl.load(g_tab + t).to(tl.pointer_type(G_DTYPE))
        m_ptr = tl.load(m_tab + t).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(v_tab + t).to(tl.pointer_type(tl.float32))
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * v + (1.0 - beta2) * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        step = tl.load(tl.load(step_tab + t).to(tl.pointer_type(tl.float32)))
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        u = m / (tl.sqrt(v) / bias_correction2_sqrt + eps) / bias_correction1
        if MEASURE == 0:
            source = m
        elif MEASURE == 1:
            source = g
        else:
            source = u
        tl.store(partials + c, tl.sum(tl.where(mask, source * source, 0.0), axis=0))
        if UPDATE:
            eta = tl.load(eta_ptr + group)
            p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = p * (1.0 - eta * weight_decay) - eta * u
            tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

    @triton.jit
    def _update_kernel(
        p_tab, m_tab, v_tab, step_tab, numel_tab, chunk_tensor, chunk_start, eta_ptr, group,
        log2_beta1, log2_beta2, eps, weight_decay, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        c = tl.program_id(0)
        t = tl.load(chunk_tensor + c)
        offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
        mask = offs < tl.load(numel_tab + t)
        p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
        m = tl.load(tl.load(m_tab + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask)
        v = tl.load(tl.load(v_tab + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask)
        step = tl.load(tl.load(step_tab + t).to(tl.pointer_type(tl.float32)))
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp2(step * log2_beta2))
        eta = tl.load(eta_ptr + group)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = m / (tl.sqrt(v) / bias_correction2_sqrt + eps) / bias_correction1
        p = p * (1.0 - eta * weight_decay) - eta * u
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)

    @triton.jit
    def _reduce_kernel(partials, group_start, sums, BLOCK: tl.constexpr):
        group = tl.program_id(0)
        start = tl.load(group_start + group)
        stop = tl.load(group_start + group + 1)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for base in range(start, stop, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            acc += tl.load(partials + offs, mask=offs < stop, other=0.0)
        tl.store(sums + group, tl.sum(acc, axis=0))

    dtypes = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    return {
        "moments": _moments_kernel,
        "update": _update_kernel,
        "reduce": _reduce_kernel,
        "dtypes": dtypes,
    }


@dataclass
class _Bucket:
    """One launch: the tensors of one group and dtype, as pointer and chunk tables."""

    group: int
    indices: list[int]  # positions in the group's lists
    p_dtype: torch.dtype
    g_dtype: torch.dtype
    tables: dict[str, Tensor]  # p, g, m, v, step (int64 addresses), numel (int64)
    chunk_tensor: Tensor  # (n_chunks,) int32
    chunk_start: Tensor  # (n_chunks,) int64
    partial_offset: int  # where this bucket's partial slots start


@dataclass
class _Plan:
    key: tuple
    buckets: list[_Bucket]
    group_start: Tensor  # (G + 1,) int64: each group's range of partial slots
    partials: Tensor  # (n_chunks,) float32
    sums: Tensor  # (G,) float32


def _key(groups: list[GroupTensors]) -> tuple:
    """Everything the tables encode: addresses, lengths and dtypes, per group."""
    return tuple(
        tuple(
            (p.data_ptr(), g_.data_ptr(), m.data_ptr(), v.data_ptr(), s.data_ptr(), p.numel(),
             p.dtype, g_.dtype)  # fmt: skip
            for p, g_, m, v, s in zip(
                g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True
            )
        )
        for g in groups
    )


def _check_tensors(g: GroupTensors, dtypes: dict) -> None:
    for p, grad, m, v, s in zip(
        g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps, strict=True
    ):
        if p.dtype not in dtypes or grad.dtype not in dtypes:
            raise TypeError(
                f"VRAdam impl='triton' supports float32, bfloat16 and float16 parameters; got "
                f"{p.dtype} (use impl='reference' or 'fused' for float64)"
            )
        if m.dtype != torch.float32 or v.dtype != torch.float32 or s.dtype != torch.float32:
            raise TypeError("VRAdam impl='triton' keeps exp_avg, exp_avg_sq and step in float32")
        if not (p.is_contiguous() and grad.is_contiguous() and m.is_contiguous()):
            raise ValueError("VRAdam impl='triton' needs contiguous parameters and gradients")


def _plan(groups: list[GroupTensors], cache: dict) -> _Plan:
    """The cached tables for these tensors, rebuilt only when an address or a shape changed."""
    key = _key(groups)
    plan = cache.get("triton_plan")
    if plan is not None and plan.key == key:
        return plan
    dtypes = kernels(interpreted())["dtypes"]
    device = next(g.params[0].device for g in groups if g.params)
    buckets, group_start, offset = [], [0], 0
    for gi, g in enumerate(groups):
        _check_tensors(g, dtypes)
        by_dtype: dict[tuple, list[int]] = {}
        for i, (p, grad) in enumerate(zip(g.params, g.grads, strict=True)):
            by_dtype.setdefault((p.dtype, grad.dtype), []).append(i)
        for (p_dtype, g_dtype), indices in by_dtype.items():
            lists = {
                "p": g.params, "g": g.grads, "m": g.exp_avgs, "v": g.exp_avg_sqs,
                "step": g.state_steps,
            }  # fmt: skip
            host = {k: [lst[i].data_ptr() for i in indices] for k, lst in lists.items()}
            host["numel"] = [g.params[i].numel() for i in indices]
            chunk_tensor, chunk_start = [], []
            for j, n in enumerate(host["numel"]):
                for start in range(0, max(n, 1), BLOCK):
                    chunk_tensor.append(j)
                    chunk_start.append(start)
            # Built once per layout: the only host-to-device copies of this implementation.
            tables = {k: torch.tensor(v, dtype=torch.int64, device=device) for k, v in host.items()}
            buckets.append(
                _Bucket(
                    group=gi,
                    indices=indices,
                    p_dtype=p_dtype,
                    g_dtype=g_dtype,
                    tables=tables,
                    chunk_tensor=torch.tensor(chunk_tensor, dtype=torch.int32, device=device),
                    chunk_start=torch.tensor(chunk_start, dtype=torch.int64, device=device),
                    partial_offset=offset,
                )
            )
            offset += len(chunk_tensor)
        group_start.append(offset)
    plan = _Plan(
        key=key,
        buckets=buckets,
        group_start=torch.tensor(group_start, dtype=torch.int64, device=device),
        partials=torch.zeros(max(offset, 1), dtype=torch.float32, device=device),
        sums=torch.zeros(len(groups), dtype=torch.float32, device=device),
    )
    cache["triton_plan"] = plan
    return plan


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


def triton_vradam(
    groups: list[GroupTensors],
    *,
    norm: str,
    norm_source: str,
    velocity: str,
    norm_timing: str,
    cache: dict,
) -> tuple[Tensor, Tensor]:
    """VRAdam on Triton kernels (see the module docstring); returns (eta_t, s_t), each (G,)."""
    from optim.vradam_kernels import keep_measure, lagged_rates

    k = kernels(interpreted())
    plan = _plan(groups, cache)
    lagged = norm_timing == "lagged"
    measure = _MEASURES["precond" if velocity == "precond" else norm_source]
    for g in groups:
        if g.params:
            torch._foreach_add_(g.state_steps, 1)
    eta = lagged_rates(groups).float() if lagged else plan.sums  # lagged: this step's gate
    for b in plan.buckets:
        h = groups[b.group].hyper
        grid = (b.chunk_tensor.numel(),)
        k["moments"][grid](
            b.tables["p"], b.tables["g"], b.tables["m"], b.tables["v"], b.tables["step"],
            b.tables["numel"], b.chunk_tensor, b.chunk_start, plan.partials[b.partial_offset:],
            eta, b.group, h["beta1"], h["beta2"], _log2(h["beta1"]), _log2(h["beta2"]),
            h["eps"], h["weight_decay"], P_DTYPE=k["dtypes"][b.p_dtype],
            G_DTYPE=k["dtypes"][b.g_dtype], MAXIMIZE=bool(h["maximize"]), MEASURE=measure,
            UPDATE=lagged, BLOCK=BLOCK,
        )  # fmt: skip
    k["reduce"][(len(groups),)](plan.partials, plan.group_start, plan.sums, BLOCK=_REDUCE_BLOCK)
    sums = [plan.sums[i] if g.params else None for i, g in enumerate(groups)]
    new_eta, s = learning_rates(groups, sums, norm=norm, velocity=velocity)
    if lagged:
        keep_measure(groups, s)
        return eta, s
    eta32 = new_eta.float()
    for b in plan.buckets:
        h = groups[b.group].hyper
        k["update"][(b.chunk_tensor.numel(),)](
            b.tables["p"], b.tables["m"], b.tables["v"], b.tables["step"], b.tables["numel"],
            b.chunk_tensor, b.chunk_start, eta32, b.group, _log2(h["beta1"]), _log2(h["beta2"]),
            h["eps"], h["weight_decay"], P_DTYPE=k["dtypes"][b.p_dtype], BLOCK=BLOCK,
        )  # fmt: skip
    return new_eta, s
