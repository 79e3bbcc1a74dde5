"""The Task base, the task registry and `train()` called from Python."""

from __future__ import annotations

import re

import pytest
import torch

from kinetic import TASKS, NullLogger, Task, TrainConfig, build_task, register_task, train


class _Regression(Task):
    """Least squares on a fixed batch: the smallest task with every required member."""

    items_per_step, items_name = 8, "rows"

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.model.weight.copy_(torch.randn(1, 3, generator=g))
            self.model.bias.zero_()
        self.x, self.y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
        self.evaluations: list[int] = []

    @classmethod
    def from_config(cls, cfg, run_dir=None):
        return cls(seed=cfg["seed"])

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, step, model):
        return torch.nn.functional.mse_loss(model(self.x), self.y), {}

    def evaluate(self, step):
        self.evaluations.append(step)
        return {"weight_norm": float(self.model.weight.detach().norm())}

    def state_dict(self):
        return self.model.state_dict()


def test_train_matches_a_hand_written_loop():
    """Constant lr, no clipping, no monitors: train() is zero_grad, backward, step per step."""
    task, reference = _Regression(), _Regression()
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.1, momentum=0.9)
    config = TrainConfig(steps=7, log_every=3, eval_every=3, lr_schedule="constant")
    final = train(task, optimizer, config, monitor=None)

    ref_opt = torch.optim.SGD(reference.model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(7):
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference.model(reference.x), reference.y).backward()
        ref_opt.step()
    for p, q in zip(task.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert task.evaluations == [3, 6, 7]  # every 3 steps, and after the last
    assert final["weight_norm"] == pytest.approx(float(reference.model.weight.norm()))
    assert (final["steps"], final["rows"]) == (7.0, 56.0)


def test_callbacks_see_every_step_and_defaults_of_the_base():
    task = _Regression()
    seen: list[int] = []
    optimizer = torch.optim.SGD(task.param_groups(), lr=0.05)
    train(task, optimizer, TrainConfig(steps=5, eval_every=0), callbacks=[seen.append])
    assert seen == [1, 2, 3, 4, 5]
    assert task.evaluations == []  # eval_every=0: no evaluation
    assert task.images(1) == {} and task.after_step(1) is None
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # default: cosine to 0
    # The default probe loss leaves the global random stream where it was.
    state = torch.random.get_rng_state()
    task.probe_loss(1)
    assert torch.equal(state, torch.random.get_rng_state())
    assert NullLogger().run_dir is None


def test_registry_builds_a_registered_task_and_names_the_choices():
    register_task("regression", _Regression)
    try:
        task = build_task({"task": {"name": "regression"}, "seed": 3})
        assert isinstance(task, _Regression)
        assert torch.equal(task.model.weight, _Regression(seed=3).model.weight)
        message = (
            "Unknown task: 'nope'; available: ddpm, gfn, regression (a task of your own: its "
            "module calls kinetic.register_task, and task.module names it or an entry point of "
            "the group kinetic.tasks does)"
        )
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            build_task({"task": {"name": "nope"}, "seed": 0})
        with pytest.raises(TypeError, match=r"not a kinetic\.Task subclass"):
            register_task("bad", dict)
    finally:
        TASKS.pop("regression")


def test_train_config_validate_names_the_key():
    with pytest.raises(ValueError, match=r"^Invalid train\.steps: 0; expected an int >= 1$"):
        train(_Regression(), torch.optim.SGD([torch.zeros(1)], lr=0.1), TrainConfig(steps=0))
