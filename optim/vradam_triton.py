"""VRAdam as Triton kernels for CUDA: multi-tensor, two passes (exact) or one (lagged).

One launch covers every parameter of a param group and dtype: the kernels read per-tensor
pointer tables (int64 addresses of theta, g, m, v and the step counter, and each tensor's
length) and a chunk table (tensor index and offset of each block of ``BLOCK`` elements), so a
program handles one block of one tensor. The tables are device tensors built once and cached;
they are rebuilt (a few small asynchronous copies from pinned memory, no sync) only when a
tensor's storage moves, e.g. when ``zero_grad(set_to_none=True)`` lets the allocator hand out
new gradient buffers. With static gradients (``set_to_none=False``, as CUDA-graph capture
requires anyway) a step builds nothing on the host and reads nothing back.

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
from types import ModuleType

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
    """Whether triton is installed. Cheap: finds the package without importing it, since the
    first import of triton fixes whether it interprets (TRITON_INTERPRET)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1): kernels then take CPU
    tensors. Triton reads the variable when a kernel is decorated, see :func:`kernels`."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def kernels(interpret: bool) -> ModuleType:
    """The kernels module, loaded on first use, one copy per value of the interpreter flag:
    Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when the module runs."""
    spec = importlib.util.find_spec("optim.vradam_triton_kernels")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    staging: list[Tensor]  # pinned host sources of the asynchronous table uploads


def _key(groups: list[GroupTensors]) -> tuple:
    """Everything the tables encode: addresses, lengths and dtypes, per group."""
    key = []
    for g in groups:
        lists = (g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, g.state_steps)
        key.append(tuple(tuple(t.data_ptr() for t in ts) for ts in zip(*lists, strict=True)))
        key.append(tuple((p.numel(), p.dtype, d.dtype) for p, d in zip(*lists[:2], strict=True)))
    return tuple(key)


def layout(t: Tensor) -> str | None:
    """ "contiguous" or "channels_last" for a tensor whose elements fill its memory in one of
    those orders (the kernels walk raw memory), else None."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return None


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
        layouts = {layout(x) for x in (p, grad, m, v)}
        if None in layouts or len(layouts) > 1:
            raise ValueError(
                "VRAdam impl='triton' needs each parameter, its gradient and its moments in one "
                "dense layout (all contiguous, or all channels_last)"
            )


def _plan(groups: list[GroupTensors], cache: dict) -> _Plan:
    """The cached tables for these tensors, rebuilt only when an address or a shape changed."""
    key = _key(groups)
    plan = cache.get("triton_plan")
    if plan is not None and plan.key == key:
        return plan
    dtypes = kernels(interpreted()).DTYPES
    device = next(g.params[0].device for g in groups if g.params)
    staging: list[Tensor] = []

    def upload(values: list[int], dtype: torch.dtype) -> Tensor:
        """A device copy of `values`; on CUDA from pinned memory, asynchronously (no sync),
        the pinned source kept alive with the plan."""
        host = torch.tensor(values, dtype=dtype)
        if device.type != "cuda":
            return host.to(device)
        staging.append(host.pin_memory())
        return staging[-1].to(device, non_blocking=True)

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
            tables = {k: upload(v, torch.int64) for k, v in host.items()}
            buckets.append(
                _Bucket(
                    group=gi,
                    indices=indices,
                    p_dtype=p_dtype,
                    g_dtype=g_dtype,
                    tables=tables,
                    chunk_tensor=upload(chunk_tensor, torch.int32),
                    chunk_start=upload(chunk_start, torch.int64),
                    partial_offset=offset,
                )
            )
            offset += len(chunk_tensor)
        group_start.append(offset)
    plan = _Plan(
        key=key,
        buckets=buckets,
        group_start=upload(group_start, torch.int64),
        partials=torch.zeros(max(offset, 1), dtype=torch.float32, device=device),
        sums=torch.zeros(len(groups), dtype=torch.float32, device=device),
        staging=staging,
    )
    cache["triton_plan"] = plan
    return plan


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


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
        k.moments_kernel[grid](
            b.tables["p"], b.tables["g"], b.tables["m"], b.tables["v"], b.tables["step"],
            b.tables["numel"], b.chunk_tensor, b.chunk_start, plan.partials[b.partial_offset:],
            eta, b.group, h["beta1"], h["beta2"], _log(h["beta1"]), _log(h["beta2"]),
            h["eps"], h["weight_decay"], P_DTYPE=k.DTYPES[b.p_dtype],
            G_DTYPE=k.DTYPES[b.g_dtype], MAXIMIZE=bool(h["maximize"]), MEASURE=measure,
            UPDATE=lagged, BLOCK=BLOCK,
        )  # fmt: skip
    k.reduce_kernel[(len(groups),)](plan.partials, plan.group_start, plan.sums, BLOCK=_REDUCE_BLOCK)
    sums = [plan.sums[i] if g.params else None for i, g in enumerate(groups)]
    if lagged:
        return eta, keep_measure(groups, sums, norm=norm, velocity=velocity)
    new_eta, s = learning_rates(groups, sums, norm=norm, velocity=velocity)
    eta32 = new_eta.float()
    for b in plan.buckets:
        h = groups[b.group].hyper
        k.update_kernel[(b.chunk_tensor.numel(),)](
            b.tables["p"], b.tables["m"], b.tables["v"], b.tables["step"], b.tables["numel"],
            b.chunk_tensor, b.chunk_start, eta32, b.group, _log(h["beta1"]), _log(h["beta2"]),
            h["eps"], h["weight_decay"], P_DTYPE=k.DTYPES[b.p_dtype], BLOCK=BLOCK,
        )  # fmt: skip
    return new_eta, s
