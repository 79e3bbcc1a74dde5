"""Every bad config value is refused before any work, in one sentence naming key and valid range.

(Wrong types, e.g. `train.steps=1.5`, are Hydra's to refuse at composition: the schemas type
every key (kinetic/config.py the run's, gfn/config.py and diffusion/config.py the tasks');
tests/test_bad_inputs.py runs those through the command line.) The built-in tasks' ranges are
checked by what they registered (`TaskSpec.validate`), which `validate_config` calls.

The configs are composed by Hydra from configs/ exactly as `train.py` composes them; the
command-line test of the same table (exit code 2, the run directory untouched) lives in
tests/test_train.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import diffusion.config  # noqa: F401  (registers task=ddpm)
import gfn.config  # noqa: F401  (registers task=gfn)
from kinetic.configure import validate_config
from kinetic.errors import ConfigError
from kinetic.registry import TASKS, register_task
from kinetic.task import Task
from kinetic.validate import check_float, check_int

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
DDPM = "task=ddpm"

BAD_INPUTS = [
    # The inputs that gave a traceback or a silent wrong run.
    (["train.steps=0"], "Invalid train.steps: 0; expected an int >= 1"),
    (["train.log_every=0"], "Invalid train.log_every: 0; expected an int >= 1"),
    (["train.eval_every=-1"], "Invalid train.eval_every: -1; expected an int >= 0"),
    (["threads=0"], "Invalid threads: 0; expected an int >= 1"),
    ([DDPM, "data.resolution=0"], "Invalid data.resolution: 0; expected an int >= 1"),
    (
        [DDPM, "task.sampling.grid_samples=0"],
        "Invalid task.sampling.grid_samples: 0; expected an int >= 1",
    ),
    (
        [DDPM, "data.channels=3"],
        "Invalid data.channels: 3 for data=digits; the digits are grayscale, so data.channels "
        "must be 1 (3 channels need data=folder)",
    ),
    (["task.replay.capacity=-5"], "Invalid task.replay.capacity: -5; expected an int >= 0"),
    (["train.clip_grad_norm=-1"], "Invalid train.clip_grad_norm: -1; expected a float >= 0"),
    (["task.log_z_beta3=-0.5"], "Invalid task.log_z_beta3: -0.5; expected a float >= 0"),
    (["task.batch_size=0"], "Invalid task.batch_size: 0; expected an int >= 1"),
    ([DDPM, "task.batch_size=0"], "Invalid task.batch_size: 0; expected an int >= 1"),
    # Sizes, steps, intervals.
    (["train.warmup_steps=5000"], "Invalid train.warmup_steps: 5000; expected an int in [0, 3000]"),
    (["train.checkpoint_every=-1"], "Invalid train.checkpoint_every: -1; expected an int >= 0"),
    (["train.keep_checkpoints=0"], "Invalid train.keep_checkpoints: 0; expected an int >= 1"),
    (["task.eval_samples=0"], "Invalid task.eval_samples: 0; expected an int >= 1"),
    (["model.hidden=0"], "Invalid model.hidden: 0; expected an int >= 1"),
    (["model.n_layers=0"], "Invalid model.n_layers: 0; expected an int >= 1"),
    (
        [DDPM, "task.num_train_timesteps=0"],
        "Invalid task.num_train_timesteps: 0; expected an int >= 1",
    ),
    (
        [DDPM, "task.sampling.steps=2000"],
        "Invalid task.sampling.steps: 2000; expected an int in [1, 1000]",
    ),
    ([DDPM, "data.heldout_size=0"], "Invalid data.heldout_size: 0; expected an int in [1, 898]"),
    (["seed=-1"], "Invalid seed: -1; expected an int in [0, 9223372036854775807]"),
    # Learning rates, temperatures, probabilities, decays.
    (["task.log_z_lr=-0.1"], "Invalid task.log_z_lr: -0.1; expected a float >= 0"),
    (["task.temperature=0"], "Invalid task.temperature: 0; expected a float > 0"),
    (["task.temperature=nan"], "Invalid task.temperature: nan; expected a float > 0"),
    (["task.epsilon=1.5"], "Invalid task.epsilon: 1.5; expected a float in [0, 1]"),
    (
        ["task.replay.capacity=100", "task.replay.fraction=1.0"],
        "Invalid task.replay.fraction: 1; expected a float in [0, 1)",
    ),
    ([DDPM, "task.ema.decay=1.5"], "Invalid task.ema.decay: 1.5; expected a float in [0, 1]"),
    ([DDPM, "task.ema.power=0"], "Invalid task.ema.power: 0; expected a float > 0"),
    (["loss=subtb", "loss.lamda=-1"], "Invalid loss.lamda: -1; expected a float >= 0"),
    # Choices.
    (
        ["task.replay.capacity=100", "task.replay.fraction=0.5", "task.replay.priority=best"],
        "Unknown task.replay.priority: 'best'; valid: uniform, reward",
    ),
    (
        ["train.lr_schedule=step"],
        "Unknown train.lr_schedule: 'step'; valid: constant, linear, cosine",
    ),
    (
        [DDPM, "train.lr_schedule=polynomial"],
        "Unknown train.lr_schedule: 'polynomial'; valid: cosine, linear, constant, "
        "constant_with_warmup",
    ),
    (["model.backward=random"], "Unknown model.backward: 'random'; valid: learned, uniform"),
    (
        ["model.activation=swish"],
        "Unknown model.activation: 'swish'; valid: relu, leaky_relu, elu, gelu, silu, tanh",
    ),
    (
        [DDPM, "task.sampling.scheduler=euler"],
        "Unknown task.sampling.scheduler: 'euler'; valid: ddpm, ddim, dpmsolver++",
    ),
    (
        [DDPM, "task.beta_schedule=cubic"],
        "Unknown task.beta_schedule: 'cubic'; valid: linear, scaled_linear, squaredcos_cap_v2",
    ),
    # Combinations.
    (
        ["task.replay.fraction=0.5"],
        "task.replay.fraction=0.5 needs a replay buffer: set task.replay.capacity to the number "
        "of trajectories to keep (an int >= 1), or task.replay.fraction=0",
    ),
    (
        ["task.replay.capacity=100"],
        "task.replay.capacity=100 keeps a buffer that no batch draws from: set "
        "task.replay.fraction in (0, 1), or task.replay.capacity=0",
    ),
    (
        [DDPM, "model.norm_num_groups=5"],
        "Invalid model.norm_num_groups: 5; it must divide every model.block_out_channels "
        "(16, 32, 64)",
    ),
    (
        [DDPM, "data.resolution=6"],
        "Invalid data.resolution: 6; the UNet downsamples 2 times, so the resolution must be a "
        "multiple of 4",
    ),
    (
        ["resume=auto", "overwrite=true"],
        "resume=auto and overwrite=true contradict each other: resume continues the run in the "
        "run directory, overwrite starts a new one there; pass one of them",
    ),
    # Data folders.
    ([DDPM, "data=folder"], "data=folder needs data.path=DIR (a folder of PNG/JPEG images)"),
    (
        [DDPM, "data=folder", "data.path={tmp}/missing"],
        "data.path={tmp}/missing does not exist; expected a folder of PNG/JPEG images",
    ),
    (
        [DDPM, "data=folder", "data.path={tmp}/empty"],
        "No images in data.path={tmp}/empty; expected files ending in .png, .jpg, .jpeg",
    ),
    (
        [DDPM, "data=folder", "data.path={tmp}/file.png"],
        "data.path={tmp}/file.png is not a directory (data=folder needs a folder)",
    ),
]


def _validate(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        validate_config(compose("config", overrides=overrides))


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_INPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_bad_input_is_refused_in_words(tmp_path, overrides, message):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    (tmp_path / "file.png").write_bytes(b"")
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    with pytest.raises(
        ConfigError, match=f"^{re.escape(message.replace('{tmp}', str(tmp_path)))}$"
    ):
        _validate(overrides)


def test_the_table_covers_at_least_thirty_inputs():
    assert len(BAD_INPUTS) >= 30


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["env=bitseq"],
        ["env=graphs_tiny"],
        ["loss=subtb", "task.replay.capacity=64", "task.replay.fraction=0.5"],
        [DDPM],
        [DDPM, "model=unet_tiny", "data.resolution=16"],
    ],
)
def test_the_shipped_configs_pass(overrides):
    _validate(overrides)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_folder_is_refused(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(ConfigError, match=re.escape(f"data.path={folder} cannot be read")):
            _validate([DDPM, "data=folder", f"data.path={folder}"])
    finally:
        folder.chmod(0o700)


def test_range_check_edges():
    assert check_int("k", 0, 0) == 0 and check_int("k", 5, 0, 5) == 5
    assert check_float("x", 1, 0.0, 1.0) == 1.0  # an int is a float
    with pytest.raises(ConfigError, match=re.escape("Invalid k: True; expected an int >= 0")):
        check_int("k", True, 0)  # a bool is not an int
    with pytest.raises(ConfigError, match=re.escape("Invalid x: inf; expected a float >= 0")):
        check_float("x", float("inf"), 0.0)
    assert check_float("x", float("inf"), 0.0, float("inf")) == float("inf")
    with pytest.raises(ConfigError, match=re.escape("Invalid x: 0; expected a float in (0, 1)")):
        check_float("x", 0.0, 0.0, 1.0, low_open=True, high_open=True)


def test_a_task_of_ones_own_has_its_train_keys_checked_and_its_name_resolved(monkeypatch):
    """A registered task other than gfn and ddpm: `train` is checked, the schedule against
    kinetic.schedule's names (the base `Task.lr_schedule`'s) unless the task has its own."""

    class Plain(Task):  # the base's lr_schedule
        pass

    class Own(Task):
        def lr_schedule(self, optimizer, config):
            raise AssertionError("not called by validation")

    monkeypatch.setattr("kinetic.registry.TASKS", dict(TASKS))
    register_task("plain", Plain)
    register_task("own", Own)
    train = {"steps": 10, "log_every": 1, "eval_every": 0, "lr_schedule": "step"}
    with pytest.raises(ConfigError, match=r"^Unknown train\.lr_schedule: 'step'; valid: "):
        validate_config({"task": {"name": "plain"}, "train": train})
    validate_config({"task": {"name": "own"}, "train": train})  # its own schedules
    with pytest.raises(ConfigError, match=r"^Invalid train\.steps: 0; expected an int >= 1$"):
        validate_config({"task": {"name": "own"}, "train": {**train, "steps": 0}})
    message = "Unknown task: 'nope'; available: "
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        validate_config({"task": {"name": "nope"}, "train": train})
