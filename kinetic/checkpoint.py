"""Checkpoints that a crash cannot half-write, the last K of a run, and the run's identity.

Layout of a run directory::

    run.json                            what run this is (task, env/data, model, ...): written once
    checkpoints/checkpoint_0001000.pt   every `train.checkpoint_every` steps (and on SIGTERM/Ctrl-C)
    checkpoints/checkpoint_0001000.pt.sha256   its digest, `sha256sum -c` format

Numbered files in their own folder keep the run directory readable and make "the latest" a sort
by step, with no pointer file to keep in sync. A write goes to a temporary file in the same
folder, is fsynced, renamed over the target with `os.replace` (atomic on POSIX and Windows) and
the folder is fsynced, so a crash leaves either the old file or the new one, never half of one.
The digest catches what a rename cannot: a file truncated or damaged later (a full disk, a copy
cut short, a bad sector); `torch.load` alone accepts flipped bits in tensor data. Loading is
always `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kinetic.errors import ConfigError

__all__ = [
    "CHECKPOINT_DIR",
    "RUN_RECORD",
    "CheckpointError",
    "Checkpoints",
    "check_identity",
    "check_run_dir",
    "check_state_shapes",
    "identity_differences",
    "load_checkpoint",
    "run_identity",
    "save_checkpoint",
    "start_run_dir",
    "write_folder_atomic",
]

CHECKPOINT_DIR = "checkpoints"
RUN_RECORD = "run.json"
DIGEST_SUFFIX = ".sha256"
_NAME = re.compile(r"^checkpoint_(\d{7,})\.pt$")
# What `overwrite=true` removes from a run directory: the files every run writes, and those
# its task registered (`TaskSpec.outputs`), nothing else.
_RUN_OUTPUTS = (CHECKPOINT_DIR, RUN_RECORD, "metrics.json", "checkpoint.pt")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or from another run."""


# --- one file -----------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` to `path` through a temporary file in the same folder, fsync, rename, fsync."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_folder_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """The folder `path`, filled by `write(folder)` in a temporary folder beside it, every file
    fsynced, then renamed into place; returns `path`.

    A reader finds the previous folder or the new one, never a half-written one. An existing
    `path` is first renamed aside (a folder cannot be renamed over a non-empty one), so for an
    instant neither is at `path`; a crash in that instant leaves the previous folder at
    `.<name>.old`, which the next write removes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        for item in sorted(tmp.rglob("*"), reverse=True):  # files before their folders
            if item.is_dir():
                _fsync_dir(item)
            else:
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)
    return path


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + DIGEST_SUFFIX)


def save_checkpoint(path: Path, **payload: Any) -> Path:
    """Write `payload` (state dicts, counters, the resolved config) to `path` atomically, with
    its SHA-256 beside it; returns `path`.

    The old digest goes first and the new one last, so whatever instant a crash hits, the digest
    on disk is either absent (the file is then checked by `torch.load` alone) or the file's own.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = _digest_path(path)
    digest.unlink(missing_ok=True)
    _write_atomic(path, data)
    _write_atomic(digest, f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors and plain containers only);
    raises `CheckpointError` naming the file when it is missing, does not match its digest, or
    cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}")
    data = path.read_bytes()
    digest = _digest_path(path)
    if digest.is_file():
        expected = digest.read_text().split(maxsplit=1)[0] if digest.stat().st_size else ""
        if hashlib.sha256(data).hexdigest() != expected:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: its {len(data):,} bytes do not match the SHA-256 "
                f"in {digest.name} (truncated or damaged after it was written)"
            )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"Checkpoint {path} cannot be read: {first}") from err


# --- the numbered checkpoints of a run ----------------------------------------------------


class Checkpoints:
    """The numbered checkpoints of one run directory, the last `keep` of them kept.

    `save(step, **payload)` writes `checkpoints/checkpoint_<step>.pt` and deletes the oldest
    beyond `keep`; `latest()` is the newest file; `load_latest()` the newest that loads, falling
    back to older ones with a warning when the newest is truncated or corrupt.

    With `export_name` (a task's `Task.export_name`), `save(step, export=write, ...)` also
    writes the folder `checkpoints/<export_name>_<step>/` with `write(folder)` (atomically,
    before the checkpoint, so every kept checkpoint has its export beside it); an export is
    deleted with its checkpoint.
    """

    def __init__(self, run_dir: str | Path, keep: int = 3, export_name: str | None = None) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"Invalid train.keep_checkpoints: {keep!r}; expected an int >= 1")
        self.run_dir = Path(run_dir)
        self.folder = self.run_dir / CHECKPOINT_DIR
        self.keep = keep
        self.export_name = export_name

    def path(self, step: int) -> Path:
        return self.folder / f"checkpoint_{step:07d}.pt"

    def export_path(self, step: int) -> Path:
        """The export folder beside the checkpoint of `step`."""
        if self.export_name is None:
            raise ValueError("These checkpoints have no exports (export_name is None)")
        return self.folder / f"{self.export_name}_{step:07d}"

    def export_paths(self) -> list[Path]:
        """The export folders on disk, oldest first (by step)."""
        if self.export_name is None or not self.folder.is_dir():
            return []
        pattern = re.compile(rf"^{re.escape(self.export_name)}_(\d{{7,}})$")
        found = [
            (int(m[1]), p) for p in self.folder.iterdir() if (m := pattern.match(p.name))
            and p.is_dir()
        ]  # fmt: skip
        return [p for _, p in sorted(found)]

    def paths(self) -> list[Path]:
        """The numbered checkpoints on disk, oldest first (by step)."""
        if not self.folder.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(
        self, step: int, /, export: Callable[[Path], None] | None = None, **payload: Any
    ) -> Path:
        """Write the checkpoint of `step` (stored as its "step") atomically, after its export
        folder when `export` is given, then prune to the last `keep` (and their exports)."""
        if export is not None:
            write_folder_atomic(self.export_path(step), export)
        path = save_checkpoint(self.path(step), **{**payload, "step": step})
        for old in self.paths()[: -self.keep]:
            _digest_path(old).unlink(missing_ok=True)
            old.unlink(missing_ok=True)
        kept = {int(_NAME.match(p.name)[1]) for p in self.paths()}
        for folder in self.export_paths():
            if int(folder.name.rpartition("_")[2]) not in kept:
                shutil.rmtree(folder, ignore_errors=True)
        return path

    def load_latest(
        self, warn: Callable[[str], None] | None = None
    ) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads and its payload (None if the run has none). A
        newer one that is truncated or corrupt is reported through `warn` (default:
        `warnings.warn`) and skipped; if none loads, `CheckpointError` lists them all."""
        paths = self.paths()
        if not paths:
            return None
        problems = []
        for path in reversed(paths):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as err:
                problems.append(str(err))
                message = f"{err}; falling back to the previous checkpoint"
                if warn is None:
                    warnings.warn(message, stacklevel=2)
                else:
                    warn(message)
        raise CheckpointError(
            f"No usable checkpoint in {self.folder}: " + "; ".join(reversed(problems))
        )


# --- the identity of a run ----------------------------------------------------------------


def _plain(value: Any) -> Any:
    """An OmegaConf node or dataclass as plain dicts/lists, for JSON and comparison."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_identity(
    cfg: Mapping[str, Any], keys: Sequence[str] = (), ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """What makes two runs the same run, as a flat dict (`{"env.height": 8, ...}`) of the
    composed config: the task's name, the optimizer's name and the seed, and what the task
    registered as its identity (`keys`: groups, whose every key counts, or dotted keys; e.g.
    its environment, data, model and loss), less the dotted keys in `ignore`. Training
    lengths, learning rates and intervals are not part of it: they may change on resume (to
    extend a run, say)."""
    identity: dict[str, Any] = {
        "task.name": _plain(cfg["task"]["name"]),
        "seed": _plain(cfg.get("seed")),
        "optim.name": _plain(cfg["optim"]["name"]) if "optim" in cfg else None,
    }
    for key in keys:
        group, _, leaf = key.partition(".")
        node = cfg.get(group) if group in cfg else None
        for part in leaf.split(".") if leaf else ():  # only the key's own value is resolved
            node = node.get(part) if isinstance(node, Mapping) else None
        node = _plain(node)
        if isinstance(node, dict) and not leaf:
            identity |= {f"{group}.{k}": v for k, v in node.items() if f"{group}.{k}" not in ignore}
        elif key not in ignore:
            identity[key] = node
    return identity


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """`key: <saved> in the checkpoint, <current> now` for each key that differs."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            shown = ["(absent)" if v is missing else json.dumps(v) for v in (a, b)]
            lines.append(f"{key}: {shown[0]} in the checkpoint, {shown[1]} now")
    return lines


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], source: str) -> None:
    """Refuse to continue `source` (a checkpoint or run directory, in words) under a config whose
    identity differs, naming every differing key."""
    differences = identity_differences(saved, current)
    if differences:
        raise CheckpointError(
            f"Cannot resume {source} with a different task, environment or model: "
            + "; ".join(differences)
        )


def check_state_shapes(
    saved: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor], what: str = "model"
) -> None:
    """Refuse a state dict whose tensor names or shapes differ from the live model's, naming
    the first differences (a clearer message than `load_state_dict`'s)."""
    problems = []
    for name in sorted(set(saved) | set(current)):
        if name not in current:
            problems.append(f"{name} is in the checkpoint but not in the {what}")
        elif name not in saved:
            problems.append(f"{name} is in the {what} but not in the checkpoint")
        elif tuple(saved[name].shape) != tuple(current[name].shape):
            problems.append(
                f"{name} has shape {tuple(saved[name].shape)} in the checkpoint, "
                f"{tuple(current[name].shape)} in the {what}"
            )
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(
            f"The checkpoint's {what} does not fit this {what}: " + "; ".join(problems[:3]) + more
        )


def _holds_a_run(run_dir: Path, outputs: Sequence[str]) -> bool:
    return any((run_dir / name).exists() for name in (*_RUN_OUTPUTS, *outputs))


def check_run_dir(
    run_dir: str | Path,
    identity: Mapping[str, Any],
    *,
    resume: str | None = None,
    overwrite: bool = False,
    outputs: Sequence[str] = (),
) -> None:
    """Refuse to start a run in `run_dir` when it already holds another; writes nothing.

    A directory that already holds a run (a run record, checkpoints or final metrics) is refused
    unless resuming it (`resume`: the recorded identity must match, else the differing keys are
    named) or replacing it (`overwrite`). `resume=auto` in a directory without a run is a fresh
    start, so one command serves the first start and every restart of a preemptible job.
    `outputs`: the files and folders the task writes there (`TaskSpec.outputs`).
    """
    run_dir = Path(run_dir)
    if resume is not None and overwrite:
        raise ConfigError("resume and overwrite=true contradict each other; pass one of them")
    if not _holds_a_run(run_dir, outputs) or overwrite:
        return
    if resume is None:
        raise ConfigError(
            f"The run directory {run_dir} already holds a run; pass resume=auto to continue "
            "it, overwrite=true to replace it, or choose another hydra.run.dir"
        )
    record = run_dir / RUN_RECORD
    if record.is_file():
        saved = json.loads(record.read_text())["identity"]
        check_identity(saved, identity, f"the run in {run_dir}")


def start_run_dir(
    run_dir: str | Path,
    identity: Mapping[str, Any],
    *,
    overwrite: bool = False,
    outputs: Sequence[str] = (),
) -> None:
    """Record `identity` in `run_dir` (run.json), after `check_run_dir` and every other check
    passed, so that a refused input leaves the directory untouched. With `overwrite`, the
    previous run's outputs go first: checkpoints, run.json, metrics.json, checkpoint.pt, the
    task's `outputs` (e.g. DDPM's samples/) and TensorBoard event files; nothing else (notes,
    .hydra/) is touched."""
    run_dir = Path(run_dir)
    if overwrite:
        for name in (*_RUN_OUTPUTS, *outputs):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
                _digest_path(target).unlink(missing_ok=True)
        for events in run_dir.glob("events.out.tfevents.*"):
            events.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(
        run_dir / RUN_RECORD, (json.dumps({"identity": dict(identity)}, indent=2) + "\n").encode()
    )
