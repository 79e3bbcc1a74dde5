"""What a resume restores, piece by piece: a training run checkpointed at step k, rebuilt from
fresh objects and continued, matches the uninterrupted run bit for bit.

The reference is the same hand-written loop run without a break; the resumed run goes through a
real checkpoint file (`weights_only=True`) and objects built anew with other initial weights, so
anything left out of the checkpoint shows up as a difference.
"""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import EMAModel

from kinetic.checkpoint import load_checkpoint, save_checkpoint
from kinetic.rng import capture_rng, restore_rng
from kinetic.schedule import build_schedule
from kinetic.stability.guard import NonFiniteGuard
from kinetic.stability.monitors import MonitorConfig, SharpnessConfig, StabilityMonitor
from optim.vradam import VRAdam

STEPS, BREAK, LOG_EVERY, NAN_STEP = 30, 13, 5, 9


class Run:
    """A model, VRAdam, a cosine schedule, the monitor and guard, an EMA, and a data stream."""

    def __init__(self, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.optimizer = VRAdam(self.model.parameters(), lr=1e-2, beta3=1.0)
        self.schedule = build_schedule(self.optimizer, "cosine", 3, STEPS)
        config = MonitorConfig(
            every=2, window=4, oscillation_window=2, sharpness=SharpnessConfig(0)
        )
        self.monitor = StabilityMonitor(config, self.optimizer, interval=LOG_EVERY)
        self.guard = NonFiniteGuard(self.model.named_parameters(), max_consecutive=3)
        self.ema = EMAModel(self.model.parameters(), decay=0.9, use_ema_warmup=True, foreach=True)
        self.generator = torch.Generator().manual_seed(init_seed + 100)
        self.logged: list[tuple[int, dict[str, float]]] = []

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "monitor": self.monitor.state_dict(),
            "guard": self.guard.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": capture_rng({"data": self.generator}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.monitor.load_state_dict(state["monitor"])
        self.guard.load_state_dict(state["guard"])
        self.ema.load_state_dict(state["ema"])
        restore_rng(state["rng"], {"data": self.generator})

    def train(self, first: int, last: int) -> None:
        """The loop's phases, as kinetic/loop.py runs them."""
        params = list(self.model.parameters())
        step = first
        while step <= last:
            x = torch.randn(8, 6, generator=self.generator)
            noise = 0.01 * torch.randn(8, 1)  # torch's global stream
            loss = (self.model(x) - x.sum(dim=1, keepdim=True) + noise).square().mean()
            if step == NAN_STEP and self.guard.total_skips == 0:
                loss = loss * math.nan  # one skipped step, counted by the guard
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if not self.guard.is_finite(loss, grad_norm, params):
                continue
            self.monitor.before_step(step)
            self.optimizer.step()
            self.schedule.step()
            self.ema.step(self.model.parameters())
            self.monitor.after_step(step, loss, grad_norm)
            if step % LOG_EVERY == 0:
                self.logged.append((step, self.monitor.scalars() | {"loss": float(loss.detach())}))
            step += 1


def test_a_resumed_run_matches_the_uninterrupted_one(tmp_path):
    reference = Run(init_seed=0)
    reference.train(1, STEPS)

    first = Run(init_seed=0)
    first.train(1, BREAK)
    save_checkpoint(tmp_path / "c.pt", **first.state_dict())
    resumed = Run(init_seed=1)  # other weights and streams: everything must come from the file
    resumed.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    resumed.train(BREAK + 1, STEPS)

    assert reference.guard.total_skips == resumed.guard.total_skips == 1
    for a, b in zip(reference.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(reference.ema.shadow_params, resumed.ema.shadow_params, strict=True):
        assert torch.equal(a, b)
    assert reference.ema.optimization_step == resumed.ema.optimization_step == STEPS
    assert reference.schedule.get_last_lr() == resumed.schedule.get_last_lr()
    after = [entry for entry in reference.logged if entry[0] > BREAK]
    assert resumed.logged == after  # every monitor scalar, exactly
    assert {"stability/update_cos", "stability/loss_z", "stability/sign_flip_frac"} <= set(
        after[-1][1]
    )
