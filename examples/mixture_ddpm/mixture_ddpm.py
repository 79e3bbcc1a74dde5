"""A kinetic task from outside kinetic: a DDPM of a 2-D Gaussian mixture.

The whole plug-in is this module and one preset (configs/task/mixture_ddpm.yaml): a `Task`
subclass, the schema of its `task` keys, their range checks, and one `register_task` call that
gives kinetic all of it. Nothing in kinetic names this task, yet a run of it gets what the
built-in tasks get: typed and range-checked keys, checkpoints and `resume=auto` (with the run
identity this module declares), TensorBoard scalars and HParams, the non-finite guard and the
stability monitors.

The data: `n_components` Gaussians of standard deviation `std`, their means evenly spaced on a
circle of radius `radius`, equal weights. The model: an MLP that predicts the noise ε from x_t
and a sinusoidal embedding of t (DDPM, arXiv 2006.11239, with diffusers' noise schedule and
sampler). Its evaluation compares samples with the known mixture: the share of samples within
3 std of a mean (`inliers`; 98.9% of the mixture's own samples are), and the L1 distance between
the share of samples nearest each mean and the true weights (`weights_l1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from kinetic import Task, register_task
from kinetic.config import TaskSchema
from kinetic.device import resolve_device
from kinetic.validate import check_float, check_int

INLIER_RADIUS = 3.0  # in units of std: a 2-D Gaussian puts 1 - exp(-9/2) = 98.9% inside


@dataclass
class MixtureConfig(TaskSchema):
    """`task` keys of task=mixture_ddpm (kinetic types them by this schema)."""

    name: str = "mixture_ddpm"
    n_components: int = 8  # Gaussians on the circle
    radius: float = 4.0  # of the circle of means
    std: float = 0.3  # of each Gaussian
    batch_size: int = 256  # points per step
    timesteps: int = 100  # T of the forward process
    hidden: int = 128  # width of the denoising MLP
    eval_samples: int = 2000  # samples per evaluation


def validate(cfg) -> None:
    """Range checks of the `task` keys (kinetic calls it before the run does any work)."""
    t = cfg["task"]
    check_int("task.n_components", t["n_components"], 1)
    check_float("task.radius", t["radius"], 0.0)
    check_float("task.std", t["std"], 0.0, low_open=True)
    check_int("task.batch_size", t["batch_size"], 1)
    check_int("task.timesteps", t["timesteps"], 2)
    check_int("task.hidden", t["hidden"], 1)
    check_int("task.eval_samples", t["eval_samples"], 1)


class Denoiser(nn.Module):
    """ε(x_t, t): an MLP on x_t and a 32-wide sinusoidal embedding of t."""

    def __init__(self, hidden: int, timesteps: int) -> None:
        super().__init__()
        self.register_buffer("frequencies", torch.exp(-math.log(timesteps) * torch.arange(16) / 16))
        self.net = nn.Sequential(
            nn.Linear(2 + 32, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None].float() * self.frequencies  # (B, 16)
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))  # (B, 2)


class MixtureDDPM(Task):
    """DDPM on a 2-D Gaussian mixture; its samples are scored against the mixture itself."""

    items_name = "points"
    progress_keys = ("inliers",)
    summary_keys = ("inliers", "weights_l1", "loss")
    objective_key = "weights_l1"

    def __init__(self, n_components=8, radius=4.0, std=0.3, batch_size=256, timesteps=100,
                 hidden=128, eval_samples=2000, seed=0, device="cpu"):  # fmt: skip
        angles = 2 * math.pi * torch.arange(n_components, dtype=torch.float32) / n_components
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1).to(device)
        self.std, self.items_per_step, self.eval_samples = std, batch_size, eval_samples
        self.model = Denoiser(hidden, timesteps).to(device)
        # The data spans [-radius - 3 std, radius + 3 std]: no clipping of the predicted x_0.
        self.scheduler = DDPMScheduler(
            num_train_timesteps=timesteps, beta_schedule="squaredcos_cap_v2", clip_sample=False
        )
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # checkpointed
        self.eval_seed = seed + 1

    @classmethod
    def from_config(cls, cfg, run_dir=None):
        t = cfg["task"]
        return cls(t["n_components"], t["radius"], t["std"], t["batch_size"], t["timesteps"],
                   t["hidden"], t["eval_samples"], seed=cfg["seed"],
                   device=resolve_device(cfg.get("device", "auto")))  # fmt: skip

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` points of the mixture, (n, 2), drawn on its device from `generator`."""
        device = self.means.device
        index = torch.randint(len(self.means), (n,), generator=generator, device=device)
        noise = torch.randn(n, 2, generator=generator, device=device)
        return self.means[index] + self.std * noise

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, step, model):
        x0 = self.draw(self.items_per_step, self.generator)  # (B, 2)
        n, device = x0.shape[0], x0.device
        t = torch.randint(len(self.alphas_cumprod), (n,), generator=self.generator, device=device)
        noise = torch.randn(x0.shape, generator=self.generator, device=device)
        abar = self.alphas_cumprod[t][:, None]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        return F.mse_loss(model(x_t, t), noise), {}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` points by ancestral sampling (diffusers' DDPM sampler), (n, 2)."""
        x = torch.randn(n, 2, generator=generator, device=self.means.device)
        self.scheduler.set_timesteps(len(self.alphas_cumprod))
        for t in self.scheduler.timesteps:
            epsilon = self.model(x, t.expand(n).to(x.device))
            x = self.scheduler.step(epsilon, t, x, generator=generator).prev_sample
        return x

    def evaluate(self, step):
        generator = torch.Generator(device=self.means.device).manual_seed(self.eval_seed)
        x = self.sample(self.eval_samples, generator)
        distance, nearest = torch.cdist(x, self.means).min(dim=1)
        shares = torch.bincount(nearest, minlength=len(self.means)) / len(x)
        return {
            "inliers": float((distance <= INLIER_RADIUS * self.std).float().mean()),
            "weights_l1": float((shares - 1 / len(self.means)).abs().sum()),
        }

    def state_dict(self):
        return {"model": self.model.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])


register_task(
    "mixture_ddpm",
    MixtureDDPM,
    schema=MixtureConfig,
    validate=validate,
    identity=("task.n_components", "task.radius", "task.std", "task.timesteps", "task.hidden"),
    hparams=("task.n_components", "task.batch_size"),
    run_name=lambda cfg: f"mixture_ddpm(k={cfg['task']['n_components']})",
)
