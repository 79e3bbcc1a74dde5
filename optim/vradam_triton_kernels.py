"""The Triton kernels of VRAdam (see :mod:`optim.vradam_triton`, which launches them).

Loaded only through :func:`optim.vradam_triton.kernels`. Every kernel handles one block of
``BLOCK`` elements of one tensor: program ``c`` reads its tensor index and offset from the chunk
table and the tensor's addresses from the pointer tables. Moments are float32 whatever the
parameters' dtype; the arithmetic is float32, the bias corrections float64.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _bias_corrections(step_tab, t, log_beta1, log_beta2):
    """1 - beta1^t and sqrt(1 - beta2^t) of tensor t, computed in float64 as torch's kernels do
    (in float32, 1 - 0.999^t loses ~4 digits to cancellation), then rounded to float32."""
    step = tl.load(tl.load(step_tab + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * log_beta1)
    bias_correction2 = 1.0 - tl.exp(step * log_beta2)
    return bias_correction1.to(tl.float32), tl.sqrt(bias_correction2).to(tl.float32)


@triton.jit
def moments_kernel(
    p_tab, g_tab, m_tab, v_tab, step_tab, numel_tab, chunk_tensor, chunk_start, partials,
    eta_ptr, group, beta1, beta2, log_beta1, log_beta2, eps, weight_decay,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, MAXIMIZE: tl.constexpr,
    MEASURE: tl.constexpr, UPDATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """m_t, v_t in place and this block's partial sum of the measure source (MEASURE: 0 m_t,
    1 g_t, 2 Adam's direction); with UPDATE (lagged timing) also theta at eta[group]."""
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
    m = m + (1.0 - beta1) * (g - m)  # torch.lerp's formula for weights below 0.5
    v = beta2 * v + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if MEASURE == 0:
        source = m
    elif MEASURE == 1:
        source = g
    if MEASURE == 2 or UPDATE:
        bias_correction1, bias_correction2_sqrt = _bias_corrections(
            step_tab, t, log_beta1, log_beta2
        )
        u = m / (tl.sqrt(v) / bias_correction2_sqrt + eps) / bias_correction1
        if MEASURE == 2:
            source = u
        if UPDATE:
            eta = tl.load(eta_ptr + group)
            p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            p = p * (1.0 - eta * weight_decay) - eta * u
            tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
    tl.store(partials + c, tl.sum(tl.where(mask, source * source, 0.0), axis=0))


@triton.jit
def update_kernel(
    p_tab, m_tab, v_tab, step_tab, numel_tab, chunk_tensor, chunk_start, eta_ptr, group,
    log_beta1, log_beta2, eps, weight_decay, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """theta <- theta (1 - eta lambda) - eta m_hat / (sqrt(v_hat) + eps), eta = eta[group]."""
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    offs = tl.load(chunk_start + c) + tl.arange(0, BLOCK)
    mask = offs < tl.load(numel_tab + t)
    p_ptr = tl.load(p_tab + t).to(tl.pointer_type(P_DTYPE))
    m = tl.load(tl.load(m_tab + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    v = tl.load(tl.load(v_tab + t).to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    bias_correction1, bias_correction2_sqrt = _bias_corrections(step_tab, t, log_beta1, log_beta2)
    eta = tl.load(eta_ptr + group)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = m / (tl.sqrt(v) / bias_correction2_sqrt + eps) / bias_correction1
    p = p * (1.0 - eta * weight_decay) - eta * u
    tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)


@triton.jit
def reduce_kernel(partials, group_start, sums, BLOCK: tl.constexpr):
    """sums[group] = the group's partial sums, added in a fixed order (deterministic)."""
    group = tl.program_id(0)
    start = tl.load(group_start + group)
    stop = tl.load(group_start + group + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for base in range(start, stop, BLOCK):
        offs = base + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < stop, other=0.0)
    tl.store(sums + group, tl.sum(acc, axis=0))


DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
