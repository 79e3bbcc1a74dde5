"""VRAdam on sharded parameters (FSDP2 ``fully_shard``, tensor parallelism: DTensor parameters).

The velocity measure s_t is a sum over every element of the model, but a rank holds only its
shards. :func:`local_shards` hands the kernels each parameter's local shard (plain tensors, so
every implementation, the Triton one included, runs unchanged and issues no collective of its
own) and attaches to each param group the global element count and one reduction: the per-group
partial sums of squares, stacked into a ``(n_groups,)`` tensor, are summed over the mesh
dimensions the parameters are sharded on by DTensor's own redistribution (Partial -> Replicate,
one all-reduce per sharded mesh dimension, on the device: no host sync). s_t and eta_t then come
out identical on every rank and equal to those of the unsharded model, so sharded VRAdam takes
the unsharded step, up to the order of floating-point additions.

Mesh dimensions on which the parameters are replicated (the replicate dimension of HSDP) are
not summed over: each replica already holds the whole shard.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from optim.velocity import GroupTensors

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Placement

__all__ = ["local_shards", "shard_reduction"]


def shard_reduction(mesh: DeviceMesh, placements: tuple[Placement, ...]) -> Callable:
    """The function that sums a rank's partial sums over the mesh dimensions on which a
    parameter with `placements` is sharded: ``(n,)`` local tensor -> ``(n,)`` global sums."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    partial = tuple(Partial("sum") if p.is_shard() else Replicate() for p in placements)
    replicate = (Replicate(),) * mesh.ndim

    def reduce(sums: Tensor) -> Tensor:
        pending = DTensor.from_local(sums, mesh, partial, run_check=False)
        return pending.redistribute(mesh, replicate).to_local()

    return reduce


def _layout(t: Tensor) -> tuple[DeviceMesh, tuple[Placement, ...]] | None:
    """(mesh, placements) of a DTensor, None for a plain tensor."""
    mesh = getattr(t, "device_mesh", None)
    return None if mesh is None else (mesh, tuple(t.placements))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if _layout(t) is not None else t


def local_shards(groups: list[GroupTensors]) -> list[GroupTensors]:
    """`groups` with every DTensor replaced by its local shard, each group carrying its global
    element count and the reduction of its partial sums; `groups` itself when no parameter is
    a DTensor.

    All parameters must be DTensors on one mesh with one placement, and each gradient and
    moment must share its parameter's placement: a plain tensor beside sharded ones would be
    counted once per rank, and a gradient still Partial (not yet reduced) would give a wrong
    measure, so both are refused.
    """
    if "torch.distributed.tensor" not in sys.modules:
        return groups  # no DTensor exists before its module is imported: skip the scan
    layouts = {_layout(p) for g in groups for p in g.params}
    if layouts <= {None}:
        return groups
    if None in layouts:
        raise TypeError(
            "VRAdam: the parameters mix DTensors (sharded, e.g. by fully_shard) and plain "
            "tensors; the velocity measure would count the plain ones once per rank. Shard every "
            "parameter (apply fully_shard to the root module as well) or optimise the plain "
            "ones with another optimizer"
        )
    if len(layouts) > 1:
        found = ", ".join(sorted(f"{m.mesh.tolist()} {list(p)}" for m, p in layouts))
        raise ValueError(
            "VRAdam: sharded parameters must share one device mesh and one placement, so that "
            f"one all-reduce sums the velocity measure over shards; got {found}"
        )
    ((mesh, placements),) = layouts
    if any(p.is_partial() for p in placements):
        raise ValueError(f"VRAdam: parameters with a Partial placement {list(placements)}")
    reduce = shard_reduction(mesh, placements)
    out = []
    with torch.no_grad():  # to_local then returns the shard itself: in-place updates reach it
        for g in groups:
            lists = (g.params, g.grads, g.exp_avgs, g.exp_avg_sqs)
            for name, ts in zip(("gradient", "exp_avg", "exp_avg_sq"), lists[1:], strict=True):
                for t in ts:
                    if _layout(t) != (mesh, placements):
                        raise ValueError(
                            f"VRAdam: a parameter's {name} has layout {_layout(t)}, not its "
                            f"parameter's {(mesh, placements)}; reduce gradients (FSDP does) "
                            "before the step"
                        )
            out.append(
                dataclasses.replace(
                    g,
                    params=[_local(t) for t in g.params],
                    grads=[_local(t) for t in g.grads],
                    exp_avgs=[_local(t) for t in g.exp_avgs],
                    exp_avg_sqs=[_local(t) for t in g.exp_avg_sqs],
                    state_steps=[_local(t) for t in g.state_steps],
                    numel=sum(p.numel() for p in g.params),
                    reduce=reduce,
                )
            )
    return out
