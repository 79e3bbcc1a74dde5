"""What a run shows: TensorBoard events, a tqdm progress bar, and the final metrics.json.

Each run directory holds one TensorBoard event file with the run's scalars, a custom-scalars
layout (the "Custom Scalars" tab: loss, stability signals and step size on one dashboard) and,
once `RunLogger.hparams` is called, the run's hyperparameters and final metrics for the HParams
tab, so that the runs of a sweep (`train.py -m`) compare side by side.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf
from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams.api_pb2 import Status
from tensorboard.plugins.hparams.metadata import (
    PLUGIN_DATA_VERSION,
    PLUGIN_NAME,
    SESSION_END_INFO_TAG,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary
from tqdm import tqdm

__all__ = ["FINAL_PREFIX", "STABILITY_LAYOUT", "RunLogger", "config_hparams"]

HParam = bool | int | float | str

# The Custom Scalars dashboard: one category of charts, each of the tags it names (matched
# exactly). Tags absent from a run (VRAdam's eta_t under AdamW, the sharpness probe with
# monitor=off) leave their chart empty.
_CHARTS: dict[str, tuple[str, ...]] = {
    "loss": ("train/loss",),
    "spike scores (robust z, log scale) of loss and gradient norm": (
        "stability/loss_z",
        "stability/grad_norm_z",
    ),
    "gradient norm (before clipping)": ("train/grad_norm",),
    "successive updates: cosine, sign-flip share, oscillating share": (
        "stability/update_cos",
        "stability/sign_flip_frac",
        "stability/oscillating",
    ),
    "step size: lr (alpha_0) and VRAdam's eta_t": ("train/lr", "optim/eta"),
    "VRAdam: eta_t / alpha_0 and velocity ||m_t||": ("optim/eta_ratio", "optim/velocity_norm"),
    "update size: ||u_t|| / ||theta_t||": ("stability/update_to_weight",),
    "sharpness (preconditioned) vs edge-of-stability threshold": (
        "stability/precond_sharpness",
        "stability/eos_threshold",
    ),
    "edge-of-stability ratio and plain sharpness": ("stability/eos_ratio", "stability/sharpness"),
    "non-finite steps skipped": ("stability/nonfinite_skips",),
}
STABILITY_LAYOUT: dict[str, dict[str, list[Any]]] = {
    "stability": {
        title: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]
        for title, tags in _CHARTS.items()
    }
}

FINAL_PREFIX = "final/"  # the final metrics' scalar tags (metric columns of the HParams tab)

# Config groups and leaves recorded as hyperparameters of every run, beside its overrides and
# what its task registered (`TaskSpec.hparams`: its environment, loss, model, data, batch):
# what was trained and how (optimizer, lr, schedule, steps) and the seed, so runs from
# different sweeps in one log directory still tell apart.
_GROUPS = ("task", "optim")
_LEAVES = ("optim.lr", "seed", "train.steps", "train.lr_schedule")


def _hparam_value(value: Any) -> HParam:
    """A config value as one the HParams tab shows: numbers and strings as they are; booleans,
    None and containers as strings."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float | str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def config_hparams(
    cfg: DictConfig,
    overrides: Sequence[str] = (),
    choices: Mapping[str, Any] | None = None,
    task_keys: Sequence[str] = (),
) -> dict[str, HParam]:
    """The hyperparameters of a run, for TensorBoard's HParams tab.

    Every key an override sets (`overrides`: Hydra's `HydraConfig.get().overrides.task`, for a
    multirun job its own values), with its resolved value from `cfg`, plus the groups and leaves
    in `_GROUPS`/`_LEAVES` and the task's `task_keys` (groups, or dotted leaves) that exist in
    `cfg`. A config group (`optim=adamw`) is recorded by
    the option chosen (`choices`: `HydraConfig.get().runtime.choices`; without it, the group's
    `name` key). Overrides of `hydra.*` and `logging.*` (they change no result) and deletions
    (`~key`) are left out.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = {} if choices is None else choices
    groups = (*_GROUPS, *(key for key in task_keys if "." not in key))
    leaves = (*_LEAVES, *(key for key in task_keys if "." in key))
    keys = list(dict.fromkeys([*groups, *leaves]))
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0] in ("hydra", "logging"):
            continue
        if key not in keys:
            keys.append(key)
    params: dict[str, HParam] = {}
    for key in keys:
        if choices.get(key) is not None:
            params[key] = _hparam_value(choices[key])
        elif key in groups:
            # A group the task does not use is MISSING (`data` on a GFlowNet run): `in` skips it.
            name = OmegaConf.select(cfg, f"{key}.name", default=None) if key in cfg else None
            if name is not None:
                params[key] = _hparam_value(name)
        else:
            value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
            if value is not None or key not in leaves:
                params[key] = _hparam_value(value)
    return params


def _session_end(status: str) -> Summary:
    """The HParams plugin's session-end record (`status`: STATUS_SUCCESS, STATUS_FAILURE, ...)."""
    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=Status.Value(status)),
        version=PLUGIN_DATA_VERSION,
    )
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=content.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=metadata)])


class RunLogger:
    """One run's outputs, all under `run_dir` (point `tensorboard --logdir` at it or a parent).

    Opening it writes the Custom Scalars layout (`STABILITY_LAYOUT`). For the HParams tab, call
    `hparams(params)` once before training; `write_metrics` then records the final metrics as
    `final/<name>` scalars and ends the session as a success, and `close` without them ends it
    as a failure (a diverged or interrupted run still shows, with its hyperparameters).
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        progress: bool = True,
        resumed_at: int | None = None,
    ) -> None:
        """`resumed_at`: the step of the checkpoint a resumed run starts from (0: none yet).
        TensorBoard then drops the events the interrupted run wrote after it (`purge_step`),
        so each step's scalars appear once, as an uninterrupted run would have logged them;
        the progress bar starts there."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge)
        self.writer.add_custom_scalars(STABILITY_LAYOUT)
        self.bar = tqdm(
            total=total_steps, initial=resumed_at or 0, disable=not progress,
            dynamic_ncols=True, leave=False,
        )  # fmt: skip
        self._postfix: dict[str, str] = {}
        self._session = "none"  # none | open | ended
        self._last_step = 0

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self._last_step = max(self._last_step, step)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """`image`: uint8 or float in [0, 1], (H, W, 3)."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def hparams(self, params: Mapping[str, HParam]) -> None:
        """Record the run's hyperparameters (e.g. from `config_hparams`) for the HParams tab.

        Written into the run's own event file (not a sub-run, as `SummaryWriter.add_hparams`
        would), without an experiment summary: TensorBoard then builds the columns from every
        run's hyperparameters, so runs with different override keys share one table.
        """
        if self._session != "none":
            raise RuntimeError("RunLogger.hparams: the hyperparameters were already recorded")
        for key, value in params.items():
            if not isinstance(value, HParam):
                raise TypeError(
                    f"Invalid hyperparameter {key}={value!r}: expected a bool, int, float or str"
                )
        # torch stores a bool as a number; a string keeps True/False readable.
        clean = {k: str(v) if isinstance(v, bool) else v for k, v in params.items()}
        _, session_start, _ = hparams_summary(clean, {})
        self.writer.file_writer.add_summary(session_start)
        self._session = "open"

    def progress(self, steps: int) -> None:
        """Advance the bar by `steps` (tqdm redraws at most a few times a second)."""
        self.bar.update(steps)

    def postfix(self, **values: float) -> None:
        """Show the latest `values` beside the bar (e.g. loss, l1)."""
        self._postfix.update({k: f"{v:.4g}" for k, v in values.items()})
        self.bar.set_postfix(self._postfix, refresh=False)

    def warn(self, step: int, message: str) -> None:
        """One warning line on the console, printed above the progress bar (which survives)."""
        tqdm.write(f"warning: step {step}: {message}", file=sys.stderr)

    def write_metrics(self, metrics: dict[str, float]) -> Path:
        """The final metrics as JSON (non-finite values written as null); with `hparams`
        recorded, also as `final/<name>` scalars at the last step, and the session ends."""
        path = self.run_dir / "metrics.json"
        clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
        path.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        if self._session == "open":
            step = int(metrics.get("steps", self._last_step))
            for name, value in metrics.items():
                self.writer.add_scalar(f"{FINAL_PREFIX}{name}", value, step)
            self._end_session("STATUS_SUCCESS")
        return path

    def _end_session(self, status: str) -> None:
        self.writer.file_writer.add_summary(_session_end(status))
        self._session = "ended"

    def close(self) -> None:
        if self._session == "open":  # no final metrics: the run failed or was interrupted
            self._end_session("STATUS_FAILURE")
        self.bar.close()
        self.writer.close()
