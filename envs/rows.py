"""State rows and their seeded 64-bit hash, shared by the env checker, the state DAG and the
sampler's deduplication of visited states.

A row hash is one int64 per state: sum_d row[d] * m[d] with wrapping arithmetic, where the
multipliers m are fixed odd random numbers drawn from a seeded generator (never from a user's
stream). A one-element difference never collides; any other collision between distinct rows is
possible (probability ~2^-64 per pair), so every caller checks matched rows exactly.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# The default seed of the row hash multipliers (the first word of SHA-256's initial state).
ROW_HASH_SEED = 0x6A09E667

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_rows(states: Tensor) -> Tensor:
    """States ``(B, *state_shape)`` as int64 rows ``(B, D)``; floats by their bit pattern."""
    flat = states.reshape(states.shape[0], math.prod(states.shape[1:]))  # (B, D)
    if flat.dtype.is_complex:
        raise TypeError(f"states of dtype {flat.dtype} cannot be hashed; use real states")
    if flat.dtype.is_floating_point:
        flat = flat.contiguous().view(_BITS[flat.dtype.itemsize])
    return flat.long()


@functools.lru_cache(maxsize=64)
def row_multipliers(width: int, seed: int = ROW_HASH_SEED, device: str = "cpu") -> Tensor:
    """The odd hash multipliers ``(width,)`` int64 of `seed`, on `device`.

    Drawn on the CPU from their own generator, so a seed gives the same multipliers on every
    device; cached per (width, seed, device), so a hot path pays the draw (and on an
    accelerator the host-to-device copy) once. Callers must not modify the result.
    """
    generator = torch.Generator().manual_seed(seed)
    multipliers = torch.randint(-(2**62), 2**62, (width,), generator=generator, dtype=torch.long)
    return (multipliers | 1).to(device)


def row_keys(rows: Tensor, seed: int = ROW_HASH_SEED) -> Tensor:
    """The hash of each int64 row ``(B, D)`` -> ``(B,)`` under the multipliers of `seed`."""
    return (rows * row_multipliers(rows.shape[1], seed, str(rows.device))).sum(dim=1)
