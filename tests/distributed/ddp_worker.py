"""Run under torchrun by test_ddp.py: `kinetic.train` on both tasks with DistributedDataParallel;
each rank writes its final parameters and metrics as ``rank{r}.json``.

The tasks are built exactly as ``reference_tasks`` builds them for the single-process answer
in test_ddp.py: the same model initialisation and the same seed, so rank r draws from
``distributed.rank_seed(SEED, r)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion.config import DataConfig
from diffusion.data import build_dataset
from diffusion.task import DDPMTask, build_noise_scheduler, build_unet
from envs.hypergrid import HyperGrid
from gfn.policies import GFlowNet, MLPPolicy
from gfn.task import GFlowNetTask
from kinetic import MonitorConfig, TrainConfig, distributed, train
from optim import VRAdam

SEED = 3
ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = {"gfn": 16, "ddpm": 8}
STEPS = {"gfn": 30, "ddpm": 4}


def gfn_task(batch_size: int) -> GFlowNetTask:
    torch.manual_seed(SEED)
    env = HyperGrid(ndim=2, height=8)
    n_features = env.featurize(env.initial_states(1)).shape[-1]
    model = GFlowNet(MLPPolicy(n_features, env.n_actions, hidden=32, n_layers=2))
    return GFlowNetTask(env, model, "tb", batch_size=batch_size, log_z_lr=0.1, seed=SEED)


def ddpm_task(batch_size: int) -> DDPMTask:
    torch.manual_seed(SEED)
    data = build_dataset(OmegaConf.structured(DataConfig()), SEED)
    model_cfg = OmegaConf.load(ROOT / "configs/model/unet_tiny.yaml")
    model = build_unet(model_cfg, data.train.shape[1], data.train.shape[-1])
    scheduler = build_noise_scheduler({"num_train_timesteps": 1000, "beta_schedule": "linear"})
    return DDPMTask(data, model, scheduler, batch_size=batch_size, seed=SEED)


TASKS = {"gfn": gfn_task, "ddpm": ddpm_task}


def optimizer(task) -> VRAdam:
    return VRAdam(task.param_groups(), lr=1e-2, beta3=1.0, norm="group")


def config(name: str) -> TrainConfig:
    return TrainConfig(steps=STEPS[name], log_every=5, eval_every=0, lr_schedule="constant")


def main() -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu", timeout_s=120)
    results = {}
    for name, build in TASKS.items():
        task = build(GLOBAL_BATCH[name])
        final = train(task, optimizer(task), config(name), monitor=MonitorConfig(every=0))
        results[name] = {
            "params": [p.detach().flatten().tolist() for p in task.model.parameters()],
            "loss": final["loss"],
            "items": final[task.items_name],
        }
    Path(sys.argv[1], f"rank{distributed.rank()}.json").write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    main()
