"""The GFlowNet task's config: its schema, its checks, its run name, and its registration.

Importing this module registers `task=gfn` with the core (`kinetic.register_task`); it imports
no network library beyond torch, so a run of another task pays nothing for it. The task itself
(`gfn.task.GFlowNetTask`) is imported when a GFlowNet run is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gfn.local_search import LocalSearch
from gfn.losses import LOSSES, loss_from_config
from gfn.policies import check_policy_arguments
from gfn.replay import PRIORITIES
from gfn.sampler import ROLLOUTS
from kinetic.config import TaskSchema
from kinetic.errors import ConfigError, refused_arguments
from kinetic.registry import register_task
from kinetic.validate import check_choice, check_float, check_int, check_probability

__all__ = ["MODELS", "GFlowNetTaskConfig", "ReplayConfig", "run_name", "validate"]

MODELS = ("mlp", "gnn")
# The environment keys a run's name shows, where its env has them: the size of the task (and
# for Ising its coupling and temperature), not every reward constant.
NAMED_ENV_KEYS = (
    "ndim",
    "height",
    "n",
    "k",
    "max_nodes",
    "n_nodes",
    "L",
    "J",
    "beta",
    "delta",
    "n_steps",
)


@dataclass
class ReplayConfig:
    """`task.replay`: the replay buffer (gfn/replay.py)."""

    capacity: int = 0  # trajectories kept; 0 = no replay
    fraction: float = 0.0  # share of each batch drawn from the replay buffer, in (0, 1)
    priority: str = "uniform"  # uniform | reward


@dataclass
class GFlowNetTaskConfig(TaskSchema):
    """The `task` group for task=gfn (`GFlowNetTask.from_config`)."""

    name: str = "gfn"
    batch_size: int = 16  # trajectories per step
    log_z_lr: float = 0.1  # log Z's own learning rate
    log_z_init: float = 0.0
    log_z_beta3: float | None = None  # VRAdam only: the velocity penalty of log Z's group
    epsilon: float = 0.0  # probability of a uniform exploratory action
    temperature: float = 1.0  # softmax temperature of the sampling policy
    rollout: str = "dynamic"  # dynamic | static (lockstep, fixed shapes; compiles whole)
    rollout_chunk: int = 8  # static rollout: lockstep steps per call (per compiled graph)
    eval_samples: int = 256  # policy samples per evaluation, for non-enumerable environments
    check_env: bool = True  # validate the environment (envs/checker.py) before training
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    local_search: LocalSearch = field(default_factory=LocalSearch)


def _validate_task(node: Mapping[str, Any]) -> None:
    """`task`: batch, log Z, exploration, evaluation, replay (types are the schema's)."""
    check_int("task.batch_size", node["batch_size"], 1)
    check_float("task.log_z_lr", node["log_z_lr"], 0.0)
    # log_z_init may be NaN: it is how tests force a divergence.
    check_probability("task.epsilon", node["epsilon"])
    check_float("task.temperature", node["temperature"], 0.0, low_open=True)
    check_int("task.eval_samples", node["eval_samples"], 1)
    check_choice("task.rollout", node["rollout"], ROLLOUTS)
    check_int("task.rollout_chunk", node["rollout_chunk"], 1)
    if node["log_z_beta3"] is not None:
        check_float("task.log_z_beta3", node["log_z_beta3"], 0.0)
    replay = node["replay"]
    capacity = check_int("task.replay.capacity", replay["capacity"], 0)
    fraction = check_probability("task.replay.fraction", replay["fraction"], high_open=True)
    check_choice("task.replay.priority", replay["priority"], PRIORITIES)
    if fraction > 0 and capacity == 0:
        raise ConfigError(
            f"task.replay.fraction={fraction:g} needs a replay buffer: set task.replay.capacity "
            "to the number of trajectories to keep (an int >= 1), or task.replay.fraction=0"
        )
    LocalSearch(**node["local_search"]).check()  # K <= max_steps once the env is built
    if capacity > 0 and fraction == 0:
        raise ConfigError(
            f"task.replay.capacity={capacity} keeps a buffer that no batch draws from: set "
            "task.replay.fraction in (0, 1), or task.replay.capacity=0"
        )


def _validate_model(node: Mapping[str, Any]) -> None:
    """`model`: which policy network, and its keys by the networks' own check."""
    name = check_choice("model.name", node.get("name"), MODELS)
    mlp = name == "mlp"
    activation = node.get("activation") if mlp else None
    check_policy_arguments(
        node.get("hidden"), node.get("n_layers"), node.get("backward"), activation, int(mlp)
    )


def _validate_loss(node: Mapping[str, Any]) -> None:
    """`loss`: a registered loss name (or a `GFlowNetLoss` subclass's import path) and its
    hyperparameters, which the loss's constructor checks (`loss.lamda` of subtb)."""
    name = node.get("name")
    if not (isinstance(name, str) and "." in name):
        check_choice("loss.name", name, tuple(LOSSES))
    with refused_arguments(f"loss={name}"):
        loss_from_config(node)


def validate(cfg: Mapping[str, Any]) -> None:
    """The GFlowNet groups of a composed config: `task`, `model`, `loss` (the environment's
    keys are its constructor's and `check_env`'s to refuse)."""
    _validate_task(cfg["task"])
    _validate_model(cfg.get("model") or {})
    _validate_loss(cfg.get("loss") or {})


def run_name(cfg: Mapping[str, Any]) -> str:
    """`hypergrid(ndim=2, height=8) tb`: the environment, its size keys and the loss."""
    env = cfg["env"]
    target = str(env["_target_"]).rsplit(".", 1)[-1].lower()
    keys = [k for k in NAMED_ENV_KEYS if k in env]
    return f"{target}({', '.join(f'{k}={env[k]}' for k in keys)}) {cfg['loss']['name']}"


register_task(
    "gfn",
    "gfn.task:GFlowNetTask",
    schema=GFlowNetTaskConfig,
    groups={"env": None, "model": None, "loss": None},
    validate=validate,
    identity=("env", "model", "loss"),
    hparams=("env", "loss", "model", "task.batch_size"),
    run_name=run_name,
    outputs=("data.npy", "true_graph.npy", "samples.npy"),
)
