"""The check of a composed config before a run does any work.

`validate_config` checks the run's own keys (seed, threads, resume, train, logging: kinetic's),
then the chosen task's groups as its registration says (`kinetic.registry.TaskSpec`: their
schemas' types, the lr schedules it takes, its `validate`). The core names no task: everything
it checks of one, the task registered.

Validated elsewhere, by its owner: optimizer hyperparameters (each optimizer's constructor,
refused through `kinetic.errors.refused_arguments`), the `monitor` group
(`MonitorConfig.from_dict`), environment arguments (the environment's constructor and
`check_env`), the device and precision (`kinetic.device`, `kinetic.precision`).
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from kinetic.errors import ConfigError
from kinetic.registry import TaskSpec, config_task_spec
from kinetic.validate import check_bool, check_run_keys, validate_train

__all__ = ["apply_schemas", "validate_config"]


def _first_line(err: OmegaConfBaseException) -> str:
    return str(err).strip().splitlines()[0]


def apply_schemas(cfg: DictConfig, spec: TaskSpec) -> None:
    """Type the task's groups of `cfg` by the schemas `spec` registered, in place: missing keys
    take the schema's defaults, an unknown key or a value of the wrong type is refused naming
    the group (as Hydra refuses one at composition when a preset lists the schema; a task
    registered only once its module is imported is typed here)."""
    for group, schema in {"task": spec.schema, **spec.groups}.items():
        if schema is None or group not in cfg:
            continue
        try:
            typed = OmegaConf.merge(OmegaConf.structured(schema), cfg[group])
        except OmegaConfBaseException as err:
            valid = ", ".join(OmegaConf.structured(schema).keys())
            raise ConfigError(
                f"Invalid {group} for task={spec.name}: {_first_line(err)}; valid keys: {valid}"
            ) from err
        if isinstance(cfg, DictConfig):
            with open_dict(cfg):
                cfg[group] = typed
        else:
            cfg[group] = typed


def validate_config(cfg: DictConfig) -> TaskSpec:
    """Check a composed root config before the run does any work; returns the task's spec.

    The run's keys first (seed, threads, resume, overwrite, debug, train, logging), then the
    task: found by name (`kinetic.registry.config_task_spec`, which refuses an unknown one), its
    groups typed by their registered schemas (`apply_schemas`), `train.lr_schedule` checked
    against the schedules it takes, and its own `validate`.
    """
    check_run_keys(cfg)
    spec = config_task_spec(cfg)
    apply_schemas(cfg, spec)
    validate_train(cfg.get("train"), spec.schedules())
    logging = cfg.get("logging")
    if logging is not None:
        check_bool("logging.progress", logging.get("progress", True))
        check_bool("logging.images", logging.get("images", True))
    if spec.validate is not None:
        spec.validate(cfg)
    return spec
