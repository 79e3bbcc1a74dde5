"""`kinetic.train` under torchrun (2 processes, gloo) against a single process with the same
global batch, for both tasks.

The single-process answer is written out by hand: one model, the two ranks' batches drawn from
`distributed.rank_seed(seed, r)` at half the global batch each, the mean of their losses
backpropagated, one optimizer step. DDP must reproduce it: it averages the ranks' gradients,
log Z's included (a parameter used outside the model's forward).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import torchrun
from ddp_worker import GLOBAL_BATCH, SEED, STEPS, TASKS, optimizer

from kinetic import distributed

WORKER = Path(__file__).with_name("ddp_worker.py")
# float32. With two ranks DDP's mean (g0 + g1) / 2 rounds as the hand-written loop's does, and
# the runs agree bit for bit here; the tolerance leaves room for other all-reduce orders.
TOL = {"gfn": 1e-6, "ddpm": 1e-6}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return torchrun(WORKER, tmp_path_factory.mktemp("ddp"), timeout_s=400)


def single_process(name: str) -> list[torch.Tensor]:
    """Two ranks' worth of batches in one process, by hand: the answer DDP must give."""
    torch.set_num_threads(1)
    half = GLOBAL_BATCH[name] // 2
    tasks = [TASKS[name](half), TASKS[name](half)]
    tasks[1].model = tasks[0].model
    tasks[1].generator.manual_seed(distributed.rank_seed(SEED, 1))
    opt = optimizer(tasks[0])
    for step in range(1, STEPS[name] + 1):
        losses = [task.loss(step)[0] for task in tasks]
        opt.zero_grad()
        (sum(losses) / 2).backward()
        opt.step()
    return [p.detach().flatten() for p in tasks[0].model.parameters()]


@pytest.mark.parametrize("name", ["gfn", "ddpm"])
def test_ddp_matches_one_process_with_the_global_batch(name: str, ranks: list[dict]) -> None:
    rank0, rank1 = (r[name] for r in ranks)
    assert rank0["params"] == rank1["params"]  # bit for bit: DDP keeps the ranks in step
    assert rank0["loss"] == rank1["loss"]  # the mean over ranks, on every rank
    assert rank0["items"] == STEPS[name] * GLOBAL_BATCH[name]  # throughput counts every rank
    expected = single_process(name)
    got = [torch.tensor(p) for p in rank0["params"]]
    moved = max((g - p0).abs().max().item() for g, p0 in zip(got, initial(name), strict=True))
    err = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    assert moved > 100 * TOL[name]  # training moved the weights far beyond the tolerance
    assert err < TOL[name], err


def initial(name: str) -> list[torch.Tensor]:
    return [p.detach().flatten() for p in TASKS[name](GLOBAL_BATCH[name]).model.parameters()]
