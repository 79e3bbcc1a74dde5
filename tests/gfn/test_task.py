"""GFlowNetTask: what the training loop gets from a composed config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gfn.task import GFlowNetTask
from optim import VRAdam, build_optimizer

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _cfg(*overrides: str, env: tuple[str, ...] = ("env.height=4",)):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="config", overrides=[*env, *overrides])


def test_default_optimizer_gates_policy_but_not_log_z():
    cfg = _cfg()
    task = GFlowNetTask.from_config(cfg)
    opt = build_optimizer(cfg.optim, task.param_groups())
    assert isinstance(opt, VRAdam) and opt.norm == cfg.task.vradam.norm
    policy, log_z = opt.param_groups
    assert (policy["lr"], policy["beta3"]) == (cfg.task.vradam.lr, cfg.task.vradam.beta3)
    assert (log_z["lr"], log_z["beta3"]) == (cfg.task.log_z_lr, 0.0)
    assert log_z["params"] == [task.model.log_z]


def test_adamw_ignores_the_vradam_preset():
    cfg = _cfg("optim=adamw")
    opt = build_optimizer(cfg.optim, GFlowNetTask.from_config(cfg).param_groups())
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [cfg.task.adamw.lr, cfg.task.log_z_lr]


@pytest.mark.parametrize("priority", ["uniform", "reward"])
def test_replay_fills_part_of_each_batch(priority):
    cfg = _cfg(
        "task.replay.capacity=64", "task.replay.fraction=0.25", f"task.replay.priority={priority}"
    )
    task = GFlowNetTask.from_config(cfg)
    for step in range(1, 4):
        loss, _ = task.loss(step)
        assert loss.ndim == 0 and torch.isfinite(loss)
    assert len(task.replay) == 16 + 12 + 12  # the first batch is all fresh, then 4 replayed


@pytest.mark.parametrize("loss", ["db", "subtb"])
def test_flow_losses_report_log_f_of_s0_as_log_z(loss):
    task = GFlowNetTask.from_config(_cfg(f"loss={loss}"))
    s0 = task.env.initial_states(1)
    expected = task.model(task.env.featurize(s0)).log_flow[0].detach()
    assert float(task.log_z()) == pytest.approx(float(expected))
    assert "log_z_error" in task.evaluate(0)


def test_zvar_reports_no_log_z():
    task = GFlowNetTask.from_config(_cfg("loss=zvar"))
    assert task.log_z() is None
    assert "log_z_error" not in task.evaluate(0)


def test_mlp_on_a_graph_environment_names_the_fix():
    message = (
        "model=mlp needs featurize() to return a tensor, but GraphBuilding returns a DataBatch; "
        "use model=gnn for graph environments"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        GFlowNetTask.from_config(_cfg("model=mlp", env=("env=graphs_tiny",)))


def test_gnn_policy_trains_on_graphs():
    task = GFlowNetTask.from_config(_cfg("model=gnn", env=("env=graphs_tiny",)))
    loss, _ = task.loss(1)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in task.model.policy.parameters())


def test_graphs_too_large_to_enumerate_train_without_exact_metrics():
    task = GFlowNetTask.from_config(_cfg(env=("env=graphs", "env.max_nodes=6")))
    assert not task.enumerable
    loss, _ = task.loss(1)
    assert torch.isfinite(loss)
    assert "l1" not in task.evaluate(1)


def test_probe_loss_has_no_side_effects():
    """The sharpness probe's loss leaves the training stream, the replay buffer and the record
    of visited states as they were, and is reproducible for a given step."""
    task = GFlowNetTask.from_config(_cfg("task.replay.capacity=64", "task.replay.fraction=0.25"))
    task.loss(1)
    generator, visited = task.generator.get_state(), task.visited.clone()
    n_replay = len(task.replay)
    first, again = task.probe_loss(2), task.probe_loss(2)
    assert first.requires_grad and torch.isfinite(first)
    assert torch.equal(first.detach(), again.detach())
    assert torch.equal(task.generator.get_state(), generator)
    assert torch.equal(task.visited, visited) and len(task.replay) == n_replay
