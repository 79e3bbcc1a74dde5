"""What a task gives the training loop: the `Task` contract.

A task (GFlowNet, DDPM, one of your own) owns its model, makes a batch and its loss, and
evaluates. It is built from plain objects (an environment and a network; a dataset and a UNet)
by its constructor, or from a composed config by `from_config(cfg, run_dir)`, which the command
line calls through `kinetic.registry.build_task`. What the core needs to know of a task before
building it (its config schema, checks, run identity, ...) is registered beside it with
`kinetic.registry.register_task` (docs/extending.md, "Adding a task").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from kinetic.schedule import build_schedule

if TYPE_CHECKING:
    from kinetic.config import TrainConfig

__all__ = ["Task"]


class Task(ABC):
    """The contract between a task and `kinetic.train`.

    Required (abstract): `model`, `items_per_step`, `param_groups`, `loss`, `evaluate`,
    `state_dict`. The rest are hooks with working defaults that a task overrides when it needs
    to. Attributes:

    - `model` (nn.Module): the trained network (the non-finite guard names its parameters).
    - `items_per_step` (int): trajectories, images, ... consumed by one step (throughput).
    - `items_name` (str): what those items are called in metrics ("trajectories", "images").
    - `progress_keys` (tuple of str): evaluation metrics shown beside the progress bar.
    - `summary_keys` (tuple of str): final metrics printed on the command line's summary line.
    - `objective_key` (str or None): the final metric a Hydra sweeper minimises.
    - `generator` (torch.Generator or None): the stream the task's batches are drawn from; the
      default `probe_loss` restores it so that a sharpness probe never moves the run.
    - `per_rank_state` (tuple of str or None): the keys of `state_dict()` that differ between
      the ranks of a distributed run (a replay buffer, visited states): its checkpoints hold
      them once per rank, the rest once. None (the default): every key, the safe choice.
    - `export_name` (str or None): the name of the folder `export` writes (e.g. "pipeline"),
      None (the default) for a task that exports nothing.

    In a distributed run (torchrun) every rank builds the same task; the task draws its
    batches from `kinetic.distributed.rank_seed(seed)` and its share of the global batch
    (`kinetic.distributed.per_rank`), and only rank 0 evaluates.
    """

    model: torch.nn.Module
    items_per_step: int
    items_name: str = "items"
    progress_keys: tuple[str, ...] = ()
    summary_keys: tuple[str, ...] = ("loss",)
    objective_key: str | None = None
    generator: torch.Generator | None = None
    per_rank_state: tuple[str, ...] | None = None
    export_name: str | None = None

    def train_module(self) -> torch.nn.Module:
        """The module whose forward pass `loss` differentiates: `model` by default (a task that
        compiles it returns the compiled handle of the same module). In a distributed run
        `train` wraps it in DistributedDataParallel and passes the wrapper to `loss`."""
        return self.model

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], run_dir: str | Path | None = None) -> Task:
        """The task of a composed config (the whole tree: `task`, `seed`, and the groups the task
        reads, e.g. `env`, `model`, `loss` or `data`); `run_dir` receives the task's own files
        (e.g. DDPM's sample grids), None for none."""
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer (e.g. log Z with its own learning rate)."""

    @abstractmethod
    def loss(self, step: int, model: torch.nn.Module) -> tuple[Tensor, dict[str, Tensor]]:
        """Make a batch and return its loss and extra scalars to log (device tensors). `model`
        is what to call for the one gradient-carrying forward pass: `train_module()`, or under
        torchrun the DistributedDataParallel wrapper around it, as `train` passes it; sampling
        and evaluation call `self.model`."""

    @abstractmethod
    def evaluate(self, step: int) -> dict[str, float]:
        """Evaluation metrics, logged under `eval/` and returned in the final metrics."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint stores of the task (weights, EMA weights, ...)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned, to resume a run. Default: refuse in words (a
        task that carries state across steps must restore all of it to resume exactly)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot resume a run: it defines no load_state_dict(state) "
            "restoring what its state_dict() returns"
        )

    def generators(self) -> dict[str, torch.Generator]:
        """The task's own random streams by name, saved and restored with every checkpoint
        (torch's global and numpy's streams are saved anyway). Default: `generator`, if any."""
        return {} if self.generator is None else {"generator": self.generator}

    def export(self, folder: Path) -> None:
        """Write the trained model into the empty folder `folder` in its field's own format,
        for use without kinetic (e.g. a diffusers pipeline, `save_pretrained`). With a run
        directory and `export_name` set, the loop calls it on rank 0 beside every checkpoint
        (checkpoints/<export_name>_<step>/, deleted with its checkpoint) and after the last
        step (<run_dir>/<export_name>/), each folder written atomically. Default: refuse."""
        raise NotImplementedError(
            f"{type(self).__name__} sets export_name={self.export_name!r} but defines no "
            "export(folder)"
        )

    def images(self, step: int) -> dict[str, np.ndarray]:
        """Images to log at evaluation, (H, W, 3) in [0, 1]. Default: none."""
        return {}

    def gather_from_ranks(self) -> None:
        """Runs on every rank before rank 0 evaluates, in a distributed run: merge what each
        rank recorded on its own (e.g. the states it visited), so that rank 0's evaluation
        covers the whole run. Default: nothing to merge."""
        return None

    def after_step(self, step: int) -> None:
        """Runs after every applied optimizer step (e.g. an EMA of the weights). Default: no-op."""
        return None

    def lr_schedule(
        self, optimizer: torch.optim.Optimizer, config: TrainConfig
    ) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule the loop steps after every optimizer step. Default:
        `kinetic.schedule` (constant | linear | cosine, with a linear warm-up) from `config`."""
        return build_schedule(optimizer, config.lr_schedule, config.warmup_steps, config.steps)

    def probe_loss(self, step: int) -> Tensor:
        """A fresh loss graph for the sharpness probe, drawn without moving the run's streams.

        Default: `loss(step)`, with `generator` and torch's global CPU generator restored
        afterwards, so the training batches are the ones an unprobed run would draw; other side
        effects of that `loss` call remain. Override it where those matter (the GFlowNet task
        does: its `loss` also records visited states).
        """
        saved = None if self.generator is None else self.generator.get_state()
        global_state = torch.random.get_rng_state()
        try:
            return self.loss(step, self.train_module())[0]
        finally:
            torch.random.set_rng_state(global_state)
            if saved is not None:
                self.generator.set_state(saved)
