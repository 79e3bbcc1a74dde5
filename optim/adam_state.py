"""Adam's per-parameter state, shared by every Adam-type optimizer here.

The keys are torch.optim.Adam's, and the stability monitors (kinetic/stability/sharpness.py)
read them:
``step`` (a 0-dim float32 counter on the parameter's device), ``exp_avg`` (m_t) and
``exp_avg_sq`` (v_t of the raw gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


def init_adam_state(state: dict, p: Tensor, dtype: torch.dtype | None = None) -> None:
    """Fill an empty `state` for parameter `p`: step 0, m_0 = v_0 = 0 shaped like `p` (in
    `dtype`, default `p`'s: kernels that keep fp32 moments for bf16/fp16 weights pass float32)."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
