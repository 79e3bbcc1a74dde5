"""The monitor protocols: which optimizers say what (optim/protocol.py)."""

from __future__ import annotations

import torch

from optim import OPTIMIZERS, AdaptiveMomentum, VelocityGated, build_optimizer


def test_each_optimizer_implements_what_it_exposes():
    p = torch.nn.Parameter(torch.ones(3))
    gated = {n for n in OPTIMIZERS if isinstance(build_optimizer({"name": n}, [p]), VelocityGated)}
    adaptive = {
        n for n in OPTIMIZERS if isinstance(build_optimizer({"name": n}, [p]), AdaptiveMomentum)
    }
    assert gated == {"vradam"}
    assert adaptive == {"adahb_sgd", "adahb_adam"}


def test_vradam_fills_the_protocol_after_a_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer({"name": "vradam", "velocity": "mean"}, [p])
    assert opt.last_lr_tensor is None and opt.last_velocity_measure is None
    p.grad = torch.full((3,), 2.0)
    opt.step()
    # mean velocity: ||m_1||^2 / n = (0.1 * 2)^2; eta = lr / (1 + min(beta3 s, cutoff))
    torch.testing.assert_close(opt.last_velocity_measure, torch.tensor([0.04]))
    torch.testing.assert_close(opt.last_lr_tensor, torch.tensor([1e-3 / 1.04]))
