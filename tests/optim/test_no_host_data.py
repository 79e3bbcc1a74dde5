"""No optimizer builds a tensor from host data, or reads one back, inside `step()`.

On CUDA, a tensor built from host data (``torch.tensor([...], device="cuda")``) is a blocking
host-to-device copy, and a CUDA graph cannot capture it; ``.item()`` is a device-to-host sync.
The step is recorded on the CPU with a dispatch mode, and the criterion is:

1. no ``aten.lift_fresh`` / ``aten.lift_fresh_copy``: the only way Python data (lists, floats,
   numpy arrays through ``torch.tensor``/``torch.as_tensor``) enters the dispatcher as a tensor;
2. no ``aten._local_scalar_dense``: a device value read back to the host (``.item()``,
   ``float(t)``, ``bool(t)``);
3. no tensor on the meta device: the step runs under ``with torch.device("meta")``, so a
   factory called without an explicit device (``torch.zeros(())``), which on CUDA would build
   the tensor on the host, makes a meta tensor here, and the recorder sees it.

Factories with an explicit device and a Python fill value (``torch.zeros(..., device=p.device)``,
``torch.where(mask, 0.0, x)``'s ``aten.scalar_tensor`` on the mask's device) are fills of device
memory, not copies, and are allowed; so are Python scalars as kernel arguments (``x * lr``).
Every case steps with an LR scheduler that changes ``lr`` before every step, including the one
recorded: a new learning rate must not cost a host copy.
"""

from __future__ import annotations

import pytest
import torch

from optim import OPTIMIZERS, build_optimizer
from optim.vradam import IMPLEMENTATIONS, VELOCITIES

HOST_DATA = ("aten.lift_fresh.default", "aten.lift_fresh_copy.default")
SYNC = "aten._local_scalar_dense.default"


def _params() -> list[dict]:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4))  # 2-dim: AdamP/SGDP's projection path
    b = torch.nn.Parameter(torch.randn(4))
    log_z = torch.nn.Parameter(torch.zeros(()))
    return [{"params": [w, b]}, {"params": [log_z], "lr": 0.05}]


def _recorded_step(opt: torch.optim.Optimizer, record_ops):
    """Two warm-up steps (state exists), then the recorded one; the schedule moves lr each time."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1.0 + t))
    for t in range(3):
        for p in params:
            p.grad = torch.cos(p.detach() * (t + 1)) + 0.1  # new gradient tensors every step
        if t < 2:
            opt.step()
            sched.step()
    lr_before = opt.param_groups[0]["lr"]
    with record_ops() as rec, torch.device("meta"):
        opt.step()
    assert lr_before != opt.param_groups[0]["initial_lr"]  # the schedule did move lr
    assert rec.ops, "the dispatch mode recorded nothing"
    return rec


def _assert_clean(rec) -> None:
    assert [op for op in rec.ops if op in HOST_DATA] == []
    assert SYNC not in rec.ops
    assert rec.devices == {"cpu"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_registered_optimizers(name, record_ops):
    """Every optimizer as the registry builds it, with its defaults and two param groups."""
    _assert_clean(_recorded_step(build_optimizer({"name": name}, _params()), record_ops))


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i not in ("auto", "triton")])
@pytest.mark.parametrize("velocity", VELOCITIES)
@pytest.mark.parametrize(
    "options",
    [{}, {"norm": "group", "weight_decay": 0.1, "maximize": True}, {"norm_timing": "lagged"}],
    ids=["global", "group-wd-maximize", "lagged"],
)
def test_vradam_implementations(impl, velocity, options, record_ops):
    """impl="triton" is recorded the same way under Triton's interpreter, in
    interpreted_vradam_triton.py (run by test_vradam_triton.py)."""
    cfg = {"name": "vradam", "impl": impl, "velocity": velocity, **options}
    _assert_clean(_recorded_step(build_optimizer(cfg, _params()), record_ops))


def test_the_criterion_sees_what_it_forbids(record_ops):
    """The recorder sees host data, syncs, and a factory without a device under the meta
    default device (the controls for the tests above)."""
    x = torch.ones(3)
    with record_ops() as rec:
        _ = x * torch.tensor([2.0, 3.0, 4.0])
        _ = x.sum().item()
    assert HOST_DATA[0] in rec.ops and SYNC in rec.ops and rec.devices == {"cpu"}
    with record_ops() as rec, torch.device("meta"):
        x.add_(torch.zeros(()))  # an in-place op even accepts the 0-dim meta tensor
    assert "meta" in rec.devices
