"""Learning-rate schedules against their closed forms."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kinetic.schedule import build_schedule
from optim import VRAdam


def _lrs(name: str, warmup: int, total: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = VRAdam([p], lr=0.1)
    schedule = build_schedule(opt, name, warmup, total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        schedule.step()
    return lrs


def test_cosine_with_warmup():
    lrs = _lrs("cosine", warmup=4, total=20)
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    expected = [0.05 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(4, 20)]
    assert lrs[4:] == pytest.approx(expected)


def test_linear_and_constant():
    assert _lrs("linear", warmup=0, total=10) == pytest.approx(
        [0.1 * (1 - s / 10) for s in range(10)]
    )
    assert _lrs("constant", warmup=0, total=5) == pytest.approx([0.1] * 5)


def test_bad_schedule_names_the_choices():
    opt = VRAdam([torch.nn.Parameter(torch.zeros(1))])
    message = "Unknown train.lr_schedule: 'step'; valid: constant, linear, cosine"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_schedule(opt, "step", 0, 10)
    with pytest.raises(
        ValueError, match=r"^Invalid train\.warmup_steps: 11; expected an int in \[0, 10\]$"
    ):
        build_schedule(opt, "cosine", 11, 10)
