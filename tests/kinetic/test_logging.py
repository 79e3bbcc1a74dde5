"""What TensorBoard shows of a run: its hyperparameters, final metrics and dashboard layout,
read back through TensorBoard's own event readers and HParams plugin code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import json_format
from hydra import compose, initialize_config_dir
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
)
from tensorboard.plugins.hparams import metadata as hp_metadata

from kinetic.logging import STABILITY_LAYOUT, RunLogger, config_hparams
from kinetic.registry import TASKS

ROOT = Path(__file__).resolve().parents[2]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def test_config_hparams_from_overrides_and_choices():
    overrides = [
        "optim=adamw", "optim.lr=0.01", "seed=3", "optim.betas=[0.8,0.9]", "task.epsilon=0.1",
        "hydra.sweep.dir=/tmp/x", "logging.progress=false", "~task.replay",
    ]  # fmt: skip
    cfg = _compose([o for o in overrides if not o.startswith(("hydra.", "~"))])
    choices = {"task": "gfn", "optim": "adamw", "env": "hypergrid", "loss": "tb", "model": "mlp"}
    choices |= {"hydra/launcher": "basic", "monitor": "default"}
    task_keys = TASKS["gfn"].hparams  # what the task registers: its env, loss, model, batch
    assert config_hparams(cfg, overrides, choices, task_keys) == {
        "task": "gfn",
        "env": "hypergrid",
        "loss": "tb",
        "model": "mlp",
        "optim": "adamw",
        "optim.lr": 0.01,
        "seed": 3,
        "train.steps": 3000,
        "train.lr_schedule": "cosine",
        "task.batch_size": 16,
        "optim.betas": "[0.8, 0.9]",
        "task.epsilon": 0.1,
    }


def test_config_hparams_without_hydra_names_groups_by_their_name_key():
    cfg = _compose(["task=ddpm", "optim.lr=1e-3"])
    params = config_hparams(cfg, task_keys=TASKS["ddpm"].hparams)
    assert (params["task"], params["optim"], params["data"], params["model"]) == (
        "ddpm",
        "vradam",
        "digits",
        "unet",
    )
    assert params["optim.lr"] == 1e-3 and "env" not in params and "loss" not in params
    core = config_hparams(cfg)  # a task that registered nothing: the core's keys only
    assert set(core) == {"task", "optim", "optim.lr", "seed", "train.steps", "train.lr_schedule"}


def _events(run_dir: Path) -> EventAccumulator:
    files = list(run_dir.glob("events.out.tfevents.*"))
    assert len(files) == 1, files  # one event file per run, no sub-runs
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def _session(acc: EventAccumulator) -> tuple[dict, int | None]:
    """The hparams (name -> python value) and the session's end status (None: not ended)."""
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(
        content[hp_metadata.SESSION_START_INFO_TAG]
    )
    params = json_format.MessageToDict(start)["hparams"]
    end = content.get(hp_metadata.SESSION_END_INFO_TAG)
    status = None if end is None else hp_metadata.parse_session_end_info_plugin_data(end).status
    return params, status


def test_run_logger_writes_hparams_final_metrics_and_layout(tmp_path):
    logger = RunLogger(tmp_path, total_steps=2, progress=False)
    logger.hparams({"optim": "adamw", "optim.lr": 0.01, "seed": 3, "task.check_env": True})
    logger.scalars(2, {"train/loss": 0.5})
    logger.write_metrics({"l1": 0.25, "steps": 2.0, "loss": float("nan")})
    logger.close()
    acc = _events(tmp_path)
    params, status = _session(acc)
    assert params == {"optim": "adamw", "optim.lr": 0.01, "seed": 3.0, "task.check_env": "True"}
    assert status == api_pb2.STATUS_SUCCESS
    final = {tag: acc.Scalars(tag)[-1] for tag in acc.Tags()["scalars"] if tag.startswith("final/")}
    assert sorted(final) == ["final/l1", "final/loss", "final/steps"]
    assert (final["final/l1"].step, final["final/l1"].value) == (2, 0.25)
    assert json.loads((tmp_path / "metrics.json").read_text())["loss"] is None

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts == {title: spec[1] for title, spec in STABILITY_LAYOUT["stability"].items()}
    assert charts["loss"] == ["^train/loss$"]
    assert charts["spike scores (robust z, log scale) of loss and gradient norm"] == [
        "^stability/loss_z$",
        "^stability/grad_norm_z$",
    ]


def test_a_run_without_final_metrics_ends_as_a_failure(tmp_path):
    logger = RunLogger(tmp_path, total_steps=2, progress=False)
    logger.hparams({"seed": 0})
    logger.close()  # e.g. the non-finite guard stopped the run
    assert _session(_events(tmp_path))[1] == api_pb2.STATUS_FAILURE


def test_hparams_rejects_values_tensorboard_cannot_show(tmp_path):
    logger = RunLogger(tmp_path, total_steps=1, progress=False)
    with pytest.raises(TypeError, match=r"^Invalid hyperparameter betas=\[0\.9\]: expected a "):
        logger.hparams({"betas": [0.9]})
    logger.close()


def _hparams_tab(logdir: Path) -> tuple[api_pb2.Experiment, api_pb2.ListSessionGroupsResponse]:
    """What TensorBoard's HParams tab requests, answered by the plugin's own handlers."""
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
    tb = backend_context.Context(base_plugin.TBContext(logdir=str(logdir), data_provider=provider))
    ctx = context.RequestContext()
    experiment = get_experiment.Handler(
        ctx, tb, "", api_pb2.GetExperimentRequest(include_metrics=True)
    ).run()
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100)
    request.allowed_statuses.extend(
        [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE]
    )
    return experiment, list_session_groups.Handler(ctx, tb, "", request).run()


@pytest.mark.slow
def test_a_multirun_sweep_compares_in_the_hparams_tab(tmp_path):
    """`train.py -m` over 2 learning rates x 2 seeds: four sessions in the HParams tab, each
    with its lr, seed and final L1 (read back as metrics.json has it), and no spikes. Every
    tag of the dashboard layout is logged; the last probe, at the end of the cosine schedule
    (lr ~0), reports the sharpness without an edge-of-stability threshold."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [sys.executable, "train.py", "-m", "optim.lr=1e-3,3e-3", "seed=0,1", "train.steps=100",
         "train.eval_every=50", "monitor.sharpness.every=50", "logging.progress=false",
         "logging.images=false", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    # No spike or oscillation warning. (The probe at step 50, far earlier than the default
    # 1,500, may find the preconditioned sharpness above the threshold: Adam's preconditioner
    # is 1 / eps on coordinates whose gradients have been ~0 so far.)
    warnings = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert [line for line in warnings if "edge of stability" not in line] == []
    experiment, groups = _hparams_tab(sweep)
    varied = [h.name for h in experiment.hparam_infos if h.differs]
    assert sorted(varied) == ["optim.lr", "seed"]
    assert {"final/l1", "eval/l1", "stability/loss_z"} <= {
        m.name.tag for m in experiment.metric_infos
    }
    sessions = {}
    for group in groups.session_groups:
        (session,) = group.sessions
        assert session.status == api_pb2.STATUS_SUCCESS
        key = (group.hparams["optim.lr"].number_value, group.hparams["seed"].number_value)
        l1 = next(m.value for m in session.metric_values if m.name.tag == "final/l1")
        sessions[key] = (session.name, l1)
    assert sorted(sessions) == [(1e-3, 0.0), (1e-3, 1.0), (3e-3, 0.0), (3e-3, 1.0)]
    for name, l1 in sessions.values():
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert l1 == pytest.approx(metrics["l1"], rel=1e-6)

    acc = _events(sweep / "0")
    tags = set(acc.Tags()["scalars"])
    layout_tags = {tag for spec in STABILITY_LAYOUT["stability"].values() for tag in spec[1]}
    assert {tag for tag in layout_tags if not any(re.match(tag, t) for t in tags)} == set()
    assert [e.step for e in acc.Scalars("stability/sharpness")] == [50, 100]
    assert [e.step for e in acc.Scalars("stability/eos_threshold")] == [50]
