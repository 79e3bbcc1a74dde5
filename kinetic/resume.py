"""What a checkpoint holds for resuming, and finding the checkpoint that `resume=` names.

A training checkpoint is one dict: the step it was taken after, the task's state (weights and
whatever else the task carries across steps: EMA, replay buffer, visited states), the optimizer,
the LR schedule, the stability monitor and guard, every random stream, the loop's own carried
values (the last evaluation's metrics), the run's identity and the resolved config. Restoring it
into freshly built objects makes the next step the one an uninterrupted run would take.

A checkpoint of a distributed run (torchrun) holds the replicated state once (rank 0's) and,
under "per_rank", one entry per rank (`rank_state`): the task's per-rank keys
(`Task.per_rank_state`: a replay buffer, visited states) and the rank's random streams. Each
rank restores the replicated state and its own entry; it resumes only with the number of
processes that wrote it (`check_world_size`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kinetic.checkpoint import CheckpointError, Checkpoints, check_identity, load_checkpoint
from kinetic.rng import capture_rng, restore_rng

__all__ = [
    "FORMAT",
    "capture_training_state",
    "check_world_size",
    "find_resume_checkpoint",
    "rank_state",
    "restore_training_state",
]

FORMAT = 1  # bumped when the layout below changes incompatibly


def capture_training_state(
    *,
    step: int,
    task: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    monitor: Any | None,
    guard: Any | None,
    loop: Mapping[str, Any],
    generators: Mapping[str, Any],
    precision: Any | None = None,
    per_rank: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The payload of a training checkpoint taken after `step` (tensors and plain containers).

    `task.state_dict()` holds the task's whole carried state; `generators` are the task's
    random generators by name; `loop` the loop's carried values (e.g. the last metrics).
    `per_rank`: in a distributed run, every rank's `rank_state`, indexed by rank.
    """
    payload = {
        "format": FORMAT,
        "step": step,
        "task": task.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "monitor": None if monitor is None else monitor.state_dict(),
        "guard": None if guard is None else guard.state_dict(),
        "rng": capture_rng(generators),
        "loop": dict(loop),
        "scaler": {} if precision is None else precision.state_dict(),  # fp16's loss scale
    }
    if per_rank is not None:
        payload["per_rank"] = per_rank
    return payload


def rank_state(task: Any, generators: Mapping[str, Any]) -> dict[str, Any]:
    """What differs between the ranks of a distributed run: the task's per-rank keys
    (`task.per_rank_state`; None means all of `state_dict()`) and every random stream."""
    state = task.state_dict()
    keys = getattr(task, "per_rank_state", None)
    mine = state if keys is None else {key: state[key] for key in keys}
    return {"task": mine, "rng": capture_rng(generators)}


def check_world_size(payload: Mapping[str, Any], world_size: int) -> None:
    """Refuse a checkpoint written by another number of processes than `world_size`, naming
    both (a rank's sampling streams and replay buffer cannot be carried to another rank)."""
    per_rank = payload.get("per_rank")
    written = 1 if per_rank is None else len(per_rank)
    if written != world_size:
        raise CheckpointError(
            f"The checkpoint was written by {written} process{'es' if written > 1 else ''}, "
            f"this run has {world_size}: resume with the number of processes that wrote it "
            "(torchrun --nproc_per_node), or start a new run"
        )


def restore_training_state(
    payload: Mapping[str, Any],
    *,
    task: Any,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    monitor: Any | None,
    guard: Any | None,
    generators: Mapping[str, Any],
    precision: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[int, dict[str, Any]]:
    """Load `payload` into freshly built objects; returns (the step it was taken after, the
    loop's carried values). A monitor or guard switched on or off since is refused by name.
    In a distributed run, rank `rank` of `world_size` restores its own "per_rank" entry."""
    if payload.get("format") != FORMAT:
        raise CheckpointError(
            f"The checkpoint has format {payload.get('format')!r}; this version of kinetic reads "
            f"format {FORMAT}"
        )
    for name, live in (("monitor", monitor), ("guard", guard)):
        if (payload[name] is None) != (live is None):
            had = "had" if payload[name] is not None else "had no"
            raise CheckpointError(
                f"The checkpoint's run {had} a stability {name}, this run "
                f"{'has none' if live is None else 'has one'}: keep the monitor settings of the "
                "run being resumed"
            )
    check_world_size(payload, world_size)
    task_state, rng = payload["task"], payload["rng"]
    if "per_rank" in payload:
        mine = payload["per_rank"][rank]
        task_state, rng = {**task_state, **mine["task"]}, mine["rng"]
    task.load_state_dict(task_state)
    optimizer.load_state_dict(payload["optimizer"])
    schedule.load_state_dict(payload["schedule"])
    if monitor is not None:
        monitor.load_state_dict(payload["monitor"])
    if guard is not None:
        guard.load_state_dict(payload["guard"])
    if precision is not None:
        precision.load_state_dict(payload.get("scaler", {}))
    restore_rng(rng, generators)
    return int(payload["step"]), dict(payload["loop"])


def find_resume_checkpoint(
    run_dir: str | Path,
    resume: str | None,
    identity: Mapping[str, Any],
    keep: int = 3,
    warn: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint that `resume` names and its payload, or None to start from step 0.

    `resume=None`: start afresh. `resume="auto"`: the newest intact checkpoint of `run_dir`
    (a damaged newer one is reported through `warn` and skipped); none yet means a fresh start.
    Otherwise `resume` is a checkpoint file, refused in words when missing or damaged. Either
    way, a checkpoint of another task, environment or model is refused naming what differs.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = Checkpoints(run_dir, keep).load_latest(warn)
        if found is None:
            return None
        path, payload = found
    else:
        path = Path(resume).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"resume={resume}: no such checkpoint file (resume=auto picks the latest "
                "checkpoint of the run directory)"
            )
        payload = load_checkpoint(path)
    if not isinstance(payload, dict) or "format" not in payload:
        raise CheckpointError(
            f"{path} is not a training checkpoint (it has no resume state: a final checkpoint "
            "or another program's file)"
        )
    check_identity(payload.get("identity", {}), identity, f"from {path}")
    return path, payload
