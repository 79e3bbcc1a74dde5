"""Typed configs: the schema of each config group, the one source of its keys, types and defaults.

Each dataclass here is both what Python code passes (`train(task, opt, TrainConfig(steps=300))`)
and the schema Hydra checks the composed config against (`register_schemas`, called by
train.py): an unknown key or a wrong type fails at composition with Hydra's own message. The
YAML files in configs/ are presets on top of these defaults. Range checks go in each schema's
`validate()`, called where the config enters the run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """The `train` group: the loop's own settings.

    Args:
        steps: optimisation steps.
        log_every: steps between two logged scalar sets (each is one host sync).
        eval_every: steps between evaluations, and one after the last step; 0 = never evaluate.
        clip_grad_norm: clip the global gradient norm to this; 0 = off.
        lr_schedule: the task's schedule name (default tasks: constant | linear | cosine; DDPM:
            diffusers' get_scheduler names), a multiplier on every group's lr.
        warmup_steps: linear warm-up steps at the start of the schedule.
    """

    steps: int = 3000
    log_every: int = 10
    eval_every: int = 100
    clip_grad_norm: float = 0.0
    lr_schedule: str = "cosine"
    warmup_steps: int = 0

    def validate(self) -> TrainConfig:
        """Raise ValueError on a value the loop cannot run with; returns self."""
        for name in ("steps", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid train.{name}: {value!r}; expected an int >= 1")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int):
            raise ValueError(f"Invalid train.eval_every: {self.eval_every!r}; expected an int >= 0")
        if self.eval_every < 0:
            raise ValueError(f"Invalid train.eval_every: {self.eval_every}; expected an int >= 0")
        return self


@dataclass
class LoggingConfig:
    """The `logging` group: what a command-line run shows besides its TensorBoard scalars."""

    progress: bool = True  # tqdm progress bar on the console
    images: bool = True  # image summaries at evaluation (e.g. learned vs target distribution)
