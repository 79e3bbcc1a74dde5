"""Every optimizer (and every VRAdam implementation this machine can run) steps on each device
to the same parameters as on the CPU; the CPU steps are checked against references elsewhere."""

from __future__ import annotations

import pytest
import torch

import optim.vradam
from optim import OPTIMIZERS, build_optimizer

STEPS = 5


CASES = [(name, None) for name in OPTIMIZERS if name != "vradam"] + [
    ("vradam", impl) for impl in optim.vradam.IMPLEMENTATIONS if impl != "auto"
]


def _train(name: str, impl: str | None, device: torch.device) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    model.to(device)
    cfg = {"name": name, "lr": 1e-2}
    if impl is not None:
        cfg["impl"] = impl
    optimizer = build_optimizer(cfg, model.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = (
            torch.randn(16, 6, generator=g).to(device),
            torch.randn(16, 2, generator=g).to(device),
        )
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for state in optimizer.state.values():  # optimizer state lives with its parameters
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.device.type == device.type and value.dtype == torch.float32
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize(("name", "impl"), CASES, ids=[f"{n}-{i}" if i else n for n, i in CASES])
def test_steps_on_the_device_match_the_cpu(name, impl, device):
    if impl == "triton" and not (device.type == "cuda" and optim.vradam.triton_available()):
        pytest.skip(f"VRAdam impl=triton needs CUDA and triton; here: {device}")
    reference_impl = "reference" if impl == "triton" else impl  # triton is CUDA-only
    expected = _train(name, reference_impl, torch.device("cpu"))
    got = _train(name, impl, device)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)
