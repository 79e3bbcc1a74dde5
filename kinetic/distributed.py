"""Rank awareness for runs started by ``torchrun``: who am I, who writes, which seed, which run dir.

Every rank-dependent decision in kinetic asks this module instead of calling ``dist.get_rank()``
itself. Outside ``torchrun`` (no process group, no ``WORLD_SIZE``) everything answers as a
single-process run: rank 0 of 1, the main process, and the collectives below are no-ops.

Seeds. The run's ``seed`` initialises the model on every rank (DistributedDataParallel also
broadcasts rank 0's weights when it wraps the model); what each rank samples (trajectories,
images, noise) comes from :func:`rank_seed`: rank 0 keeps ``seed`` itself, so a single-process
run is unchanged, and rank r > 0 draws ``numpy.random.SeedSequence(seed, spawn_key=(r,))``'s
first 63 bits. SeedSequence hashes (entropy, spawn key) so that the children of one seed, and
of different seeds, give statistically independent generator states: streams of different ranks
do not overlap, and rank 1 of seed 0 is not rank 0 of seed 1.
"""

from __future__ import annotations

import inspect
import os
import warnings
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from optim.validation import ConfigError

__all__ = [
    "agree",
    "any_over_ranks",
    "any_rank",
    "barrier",
    "check_in_sync",
    "data_parallel",
    "device_for_rank",
    "gather_to_main",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "local_rank",
    "mean_over_ranks",
    "per_rank",
    "rank",
    "rank_seed",
    "shutdown",
    "silence_other_ranks",
    "world_size",
]

# torchrun's variables (torch.distributed.run sets all of them in every worker).
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the run: the process group's size, else torchrun's WORLD_SIZE, else 1."""
    if _initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's RANK, else 0."""
    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (torchrun's LOCAL_RANK; 0 outside torchrun): which
    GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """Whether more than one process takes part in the run."""
    return world_size() > 1


def is_main_process() -> bool:
    """Whether this process logs, evaluates and writes files (global rank 0)."""
    return rank() == 0


def device_for_rank(device: torch.device | str) -> torch.device:
    """The device this rank drives: ``cuda`` becomes ``cuda:LOCAL_RANK``; others are unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def init_from_env(device: torch.device | str = "cpu", timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes in the environment; True when distributed.

    The backend follows the device: gloo for CPU tensors, nccl for CUDA (the rank's GPU, see
    :func:`device_for_rank`, becomes the current device first, so tensors created on plain
    ``"cuda"`` land on it); ``"auto"`` means CUDA where available, else CPU. A no-op
    returning False outside torchrun or with WORLD_SIZE=1, and returning True when a group
    already exists (a caller that manages its own). `timeout_s` bounds every collective, so a
    rank that died makes the others fail instead of hanging; it must exceed the longest
    stretch one rank works alone (rank 0's evaluations), hence the long default.
    """
    if _initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; start "
            "distributed runs with torchrun (python -m torch.distributed.run), which sets them"
        )
    if device == "auto":  # the run's device setting: CUDA where there is one
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = device_for_rank(device)
    if device.type not in BACKENDS:
        raise ConfigError(
            f"Invalid device for a distributed run: {device.type!r}; expected one of "
            f"{', '.join(BACKENDS)} (gloo on CPU, nccl on CUDA)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(BACKENDS[device.type], timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


def shutdown() -> None:
    """Leave the process group (after a final barrier, so no rank exits while another still
    talks to it); a no-op when none exists."""
    if _initialized():
        barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every rank gets here; a no-op outside a distributed run."""
    if _initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agree(value: Any) -> Any:
    """Rank 0's `value` on every rank (a pickled broadcast; call it on every rank). Used for
    decisions only rank 0 may take, e.g. the run directory named after its clock."""
    if not (_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` on rank 0, as a list indexed by rank (None on the other ranks);
    `[value]` outside a distributed run. Tensors travel on the CPU (a pickled gather: call it on
    every rank), so rank 0 receives no tensor on another rank's device."""
    value = _to_cpu(value)
    if not (_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` is true on any rank (one all-reduce of one value on `device`, the
    backend's: CPU for gloo, the rank's GPU for nccl, and one host sync); `flag` itself outside
    a distributed run. E.g. a stop signal that reached the ranks at different steps."""
    if not (_initialized() and dist.get_world_size() > 1):
        return flag
    return bool(any_over_ranks(torch.full((1,), flag, dtype=torch.bool, device=device)))


def rank_seed(seed: int, of_rank: int | None = None) -> int:
    """The seed of the sampling streams of rank `of_rank` (default: this process's): `seed` on
    rank 0, a SeedSequence hash of (seed, rank) on the others (see the module docstring)."""
    r = rank() if of_rank is None else of_rank
    if r < 0:
        raise ValueError(f"Invalid rank: {r}; expected a rank >= 0")
    if r == 0:
        return seed
    state = np.random.SeedSequence(seed, spawn_key=(r,)).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])  # 63 bits: any torch or numpy seed takes it


def silence_other_ranks() -> None:
    """Let only rank 0 speak: Python warnings are ignored on the other ranks (their errors
    still raise and torchrun reports them)."""
    if not is_main_process():
        warnings.filterwarnings("ignore")


def per_rank(total: int, key: str) -> int:
    """`total` items split evenly over the ranks (e.g. the global batch); `key` names the
    config entry in the error when the split is uneven."""
    n = world_size()
    if total % n != 0 or total < n:
        raise ConfigError(
            f"Invalid {key}: {total} is not a positive multiple of the number of processes "
            f"({n}); it is the global count, split evenly over the ranks"
        )
    return total // n


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (one all-reduce on the device, no host sync);
    `value` itself outside a distributed run. A non-finite value on any rank makes the mean
    non-finite on every rank, so decisions taken from it (skip a step) agree."""
    if not (_initialized() and dist.get_world_size() > 1):
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel in a distributed run, else `model` itself.

    Call the wrapper for the forward pass whose loss is backpropagated: DDP then averages the
    gradient of every parameter over the ranks, once, during ``backward()``. Two settings make
    that exact for the models here:

    - ``static_graph=True``: the same parameters receive gradients every step, which lets a
      parameter be used outside ``forward`` (a GFlowNet's log Z enters the loss directly) or
      not at all (log Z under flow losses) without DDP's per-step search for unused ones;
    - buffers are not synchronised in ``forward`` (``forward_sync_buffers=False``; before
      torch 2.13, ``broadcast_buffers=False``): a forward pass issues no collective, so ranks
      may call the model a different number of times, e.g. a sampler whose trajectories end at
      different steps. Buffers agree from the start: DDP broadcasts rank 0's parameters and
      buffers when it wraps the model.
    """
    if not (_initialized() and dist.get_world_size() > 1):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        buffers = {"forward_sync_buffers": False}
    else:
        buffers = {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=True, **buffers)


def any_over_ranks(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise OR of a bool tensor over the ranks (one all-reduce on the device); `mask`
    itself outside a distributed run. E.g. which states any rank has visited."""
    if not (_initialized() and dist.get_world_size() > 1):
        return mask
    merged = mask.to(torch.uint8)
    dist.all_reduce(merged, op=dist.ReduceOp.MAX)
    return merged.bool()


def check_in_sync(params: list[torch.Tensor], what: str) -> None:
    """Raise RuntimeError unless every rank holds the same `params` (one all-reduce of a
    checksum and one host sync: call it once, e.g. after the first step). `what` names the
    likely cause in the message."""
    if not (_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        weights = torch.arange(1, len(params) + 1, dtype=torch.float64, device=params[0].device)
        sums = torch.stack([p.detach().double().sum() for p in params])
        checksum = torch.stack([(sums * weights).sum()] * 2)
        checksum[1].neg_()  # max of -x is -min of x: both extremes in one all-reduce
        dist.all_reduce(checksum, op=dist.ReduceOp.MAX)
        spread = float(checksum[0] + checksum[1])
    if spread != 0.0:
        raise RuntimeError(f"the ranks hold different parameters ({what})")
