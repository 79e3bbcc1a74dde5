"""The non-finite guard in the training loop: skip without a trace, count, and stop after K."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from kinetic import MonitorConfig, Task, TrainConfig, train
from kinetic.stability.guard import NonFiniteError
from kinetic.stability.monitors import NonfiniteConfig, SharpnessConfig
from optim.vradam import VRAdam


class _Logger:
    """A RunLogger stand-in that keeps what it is given."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.logged: dict[str, list[tuple[int, float]]] = {}
        self.warned: list[str] = []

    def scalars(self, step, values):
        for k, v in values.items():
            self.logged.setdefault(k, []).append((step, v))

    def warn(self, step, message):
        self.warned.append(message)

    def progress(self, steps): ...
    def postfix(self, **values): ...
    def image(self, step, tag, image): ...
    def write_metrics(self, metrics): ...


class _NaNTask(Task):
    """Regression on a fixed batch whose loss (or one gradient) is NaN on chosen calls."""

    items_per_step, items_name = 8, "items"

    def __init__(self, bad_calls: set[int], where: str = "loss") -> None:
        self.model = torch.nn.Sequential(
            torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)
        )
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        self.bad_calls, self.where = bad_calls, where
        self.calls: list[int] = []  # the step number of every call to loss()
        self.snapshots: dict[int, tuple] = {}  # after_step(step): params and optimizer state
        self.optimizer: torch.optim.Optimizer | None = None

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, step, model):
        self.calls.append(step)
        loss = torch.nn.functional.mse_loss(model(self.x), self.y)
        if len(self.calls) in self.bad_calls:
            if self.where == "loss":
                loss = loss * float("nan")
            else:  # a finite loss whose gradient of the last bias is NaN (the torch.where trap)
                bias = self.model[2].bias
                loss = loss + torch.where(torch.tensor(False), bias * float("nan"), 0.0).sum()
        return loss, {}

    def after_step(self, step):
        params = [p.detach().clone() for p in self.model.parameters()]
        self.snapshots[step] = (params, copy.deepcopy(self.optimizer.state_dict()))

    def evaluate(self, step):
        return {}

    def images(self, step):
        return {}

    def state_dict(self):
        return self.model.state_dict()


def _train(task, optimizer, steps: int, logger, max_consecutive: int = 10):
    config = TrainConfig(steps=steps, log_every=2, eval_every=100, lr_schedule="constant")
    monitor = MonitorConfig(window=2, oscillation_window=2, sharpness=SharpnessConfig(every=0),
                            nonfinite=NonfiniteConfig(max_consecutive=max_consecutive))  # fmt: skip
    return train(task, optimizer, config, monitor=monitor, logger=logger)


def _assert_bit_identical(snapshot, task, optimizer):
    params, state = snapshot
    for before, p in zip(params, task.model.parameters(), strict=True):
        assert torch.equal(before, p.detach())
    now = optimizer.state_dict()
    for key, s in state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], now["state"][key][name]), (key, name)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nan_at_step_k_leaves_params_and_state_bit_identical(tmp_path, where):
    k = 4  # the 4th call to loss() is step 4; it is skipped and step 4 is drawn again
    task = _NaNTask(bad_calls={k}, where=where)
    optimizer = task.optimizer = VRAdam(task.param_groups(), lr=1e-2)
    checked = []
    original_loss = task.loss

    def loss(step, model):
        if len(task.calls) == k:  # the retry of step k: nothing may have changed since k - 1
            _assert_bit_identical(task.snapshots[k - 1], task, optimizer)
            checked.append(step)
        return original_loss(step, model)

    task.loss = loss
    logger = _Logger(tmp_path)
    final = _train(task, optimizer, 6, logger)
    assert checked == [k]
    assert task.calls == [1, 2, 3, 4, 4, 5, 6]  # the counter did not advance on the skip
    assert sorted(task.snapshots) == [1, 2, 3, 4, 5, 6]
    assert float(optimizer.state[task.model[0].weight]["step"]) == 6
    assert logger.logged["stability/nonfinite_skips"] == [(2, 0.0), (4, 1.0), (4, 1.0), (6, 1.0)]
    assert final["nonfinite_skips"] == 1.0


def test_stops_after_max_consecutive_skips_with_a_checkpoint(tmp_path):
    task = _NaNTask(bad_calls={3, 4, 5}, where="grad")
    optimizer = task.optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-2)
    path = tmp_path / "checkpoints" / "checkpoint_0000002.pt"  # the last applied step
    message = (
        "step 3: 3 consecutive non-finite steps skipped (monitor.nonfinite.max_consecutive=3); "
        f"first non-finite tensor: gradient of 2.bias; checkpoint: {path}"
    )
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        _train(task, optimizer, 10, _Logger(tmp_path), max_consecutive=3)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] == 2
    for name, value in checkpoint["task"].items():
        assert torch.equal(value, task.model.state_dict()[name])


def test_loss_is_named_when_it_is_the_culprit(tmp_path):
    task = _NaNTask(bad_calls={1}, where="loss")
    optimizer = task.optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-2)
    message = (
        "step 1: 1 consecutive non-finite steps skipped (monitor.nonfinite.max_consecutive=1); "
        "first non-finite tensor: loss (nan); "
        f"checkpoint: {tmp_path / 'checkpoints' / 'checkpoint_0000000.pt'}"
    )
    with pytest.raises(NonFiniteError, match=f"^{re.escape(message)}$"):
        _train(task, optimizer, 10, _Logger(tmp_path), max_consecutive=1)


def test_command_line_stop_is_one_line_and_exit_code_1(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "train.py", f"hydra.run.dir={tmp_path}", "env.height=4",
         "train.steps=20", "task.log_z_init=nan", "monitor.nonfinite.max_consecutive=2",
         "logging.progress=false"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: step 1: 2 consecutive non-finite steps skipped "
        "(monitor.nonfinite.max_consecutive=2); first non-finite tensor: loss (nan); "
        f"checkpoint: {tmp_path / 'checkpoints' / 'checkpoint_0000000.pt'}"
    )
