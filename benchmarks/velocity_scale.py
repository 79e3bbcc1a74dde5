"""How big is VRAdam's velocity s_t on each task, under each measure?

Trains (a) the default GFlowNet (`python train.py`: 8x8 hypergrid, MLP policy) and (b) a
DDPM epsilon-prediction step on a diffusers UNet2DModel (block_out_channels (32, 64, 64), 16x16
grayscale digits, batch 64) with VRAdam at beta3 = 0, i.e. plain Adam at the task's lr, so
that the measures do not feed back on the trajectory, and records after every step, over the
gated parameters (the GFlowNet's policy group, the whole UNet):

    sum      ||m_t||^2                                 (the paper's)
    mean     ||m_t||^2 / n
    precond  mean of (m_hat_t / (sqrt(v_hat_t) + eps))^2

It prints the medians over the second half of each run, the ratio between tasks, and the beta3
range that puts eta/alpha0 = 1/(1 + beta3 s) between 0.5 and 0.9 at the median s.

    python benchmarks/velocity_scale.py                     # 300 GFN steps, 200 DDPM steps
    python benchmarks/velocity_scale.py --gfn-steps 100 --ddpm-steps 50
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import diffusion.config  # noqa: F401  (registers task=ddpm)
import gfn.config  # noqa: F401  (registers task=gfn: configs/ name its schema)
from optim import VRAdam, build_optimizer

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
MEASURES = ("sum", "mean", "precond")


@torch.no_grad()
def measures(opt: VRAdam, params: list[torch.nn.Parameter]) -> dict[str, float]:
    """The three velocity measures of `params` from the optimizer's state after a step."""
    group = next(g for g in opt.param_groups if g["params"][0] is params[0])
    beta1, beta2 = group["betas"]
    sq = precond = 0.0
    n = 0
    for p in params:
        state = opt.state[p]
        m, v, t = state["exp_avg"], state["exp_avg_sq"], float(state["step"])
        u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
        sq += float(m.double().square().sum())
        precond += float(u.double().square().sum())
        n += p.numel()
    return {"sum": sq, "mean": sq / n, "precond": precond / n, "n": n}


def gfn_run(steps: int) -> tuple[list[dict[str, float]], float]:
    from gfn.task import GFlowNetTask

    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(config_name="config", overrides=["optim.beta3=0.0"])
    task = GFlowNetTask.from_config(cfg)
    groups = task.param_groups()
    for g in groups:
        g.pop("beta3", None)  # every group ungated: the measures must not steer the run
    opt = build_optimizer(cfg.optim, groups)
    policy = opt.param_groups[0]["params"]
    log = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss, _ = task.loss(step)
        loss.backward()
        opt.step()
        log.append(measures(opt, policy))
    return log, cfg.optim.lr


def ddpm_run(steps: int, lr: float, batch: int = 64) -> list[dict[str, float]]:
    from diffusers import DDPMScheduler, UNet2DModel
    from sklearn.datasets import load_digits

    gen = torch.Generator().manual_seed(0)
    digits = torch.tensor(load_digits().images, dtype=torch.float32)[:, None] / 16.0  # (N,1,8,8)
    images = torch.nn.functional.interpolate(digits, size=16, mode="bilinear") * 2 - 1
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=8,
        add_attention=False,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    params = list(unet.parameters())
    opt = VRAdam(params, lr=lr, beta3=0.0)
    log = []
    for _ in range(steps):
        x0 = images[torch.randint(len(images), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(1000, (batch,), generator=gen)
        opt.zero_grad()
        pred = unet(scheduler.add_noise(x0, noise, t), t).sample
        torch.nn.functional.mse_loss(pred, noise).backward()
        opt.step()
        log.append(measures(opt, params))
    return log


def median_tail(log: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in log[len(log) // 2 :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gfn-steps", type=int, default=300)
    parser.add_argument("--ddpm-steps", type=int, default=200)
    parser.add_argument("--ddpm-lr", type=float, default=2e-3, help="task.vradam.lr of ddpm")
    args = parser.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    gfn, gfn_lr = gfn_run(args.gfn_steps)
    t1 = time.perf_counter()
    ddpm = ddpm_run(args.ddpm_steps, args.ddpm_lr)
    t2 = time.perf_counter()
    print(
        f"gfn: {args.gfn_steps} steps, lr {gfn_lr}, policy n={gfn[0]['n']:.0f} ({t1 - t0:.0f} s); "
        f"ddpm: {args.ddpm_steps} steps, lr {args.ddpm_lr}, unet n={ddpm[0]['n']:.0f} "
        f"({t2 - t1:.0f} s). Medians over the second half of each run."
    )
    columns = f"{'measure':>8} {'gfn':>11} {'ddpm':>11} {'ddpm/gfn':>9}"
    print(f"{columns}  beta3 for eta/alpha0 in [0.5, 0.9]")
    for key in MEASURES:
        a, b = median_tail(gfn, key), median_tail(ddpm, key)
        # 1/(1 + beta3 s) = r  <=>  beta3 = (1/r - 1)/s
        ranges = [f"[{(1 / 0.9 - 1) / s:.3g}, {1 / s:.3g}]" for s in (a, b)]
        print(f"{key:>8} {a:>11.4g} {b:>11.4g} {b / a:>9.3g}  gfn {ranges[0]}, ddpm {ranges[1]}")


if __name__ == "__main__":
    main()
