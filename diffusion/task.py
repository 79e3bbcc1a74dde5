"""The DDPM task for the training loop: ε-prediction MSE on diffusers' UNet2DModel, an EMA of
the weights, diffusers' warm-up + decay schedule, and sample quality at each evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from diffusion.config import LR_SCHEDULES, EMAConfig, check_unet_resolution
from diffusion.data import BatchSampler, ImageData, build_dataset
from diffusion.quality import DigitQuality, cached_classifier
from diffusion.sampling import build_sampler, image_grid, sample_images, save_grid
from kinetic import distributed
from kinetic.checkpoint import check_state_shapes
from kinetic.config import TrainConfig
from kinetic.device import resolve_device
from kinetic.errors import ConfigError
from kinetic.task import Task
from kinetic.validate import check_choice, check_int


def build_unet(model_cfg: DictConfig | dict, channels: int, resolution: int) -> UNet2DModel:
    """diffusers' UNet2DModel from `model_cfg` (its own argument names; `name` is dropped), with
    the data's channels and resolution, which must survive every downsampling."""
    kwargs = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    kwargs = OmegaConf.to_container(OmegaConf.create(kwargs)) if kwargs else kwargs
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    check_unet_resolution(resolution, len(kwargs.get("down_block_types", ())))
    try:
        return UNet2DModel(
            sample_size=resolution, in_channels=channels, out_channels=channels, **kwargs
        )
    except TypeError as err:
        raise ConfigError(f"Invalid model config for UNet2DModel: {err}") from err


def build_noise_scheduler(task_cfg: DictConfig | dict) -> DDPMScheduler:
    """The training noise schedule of a DDPM run (ε-prediction), from its `task` config; the
    samplers derive from it (`build_sampler`)."""
    return DDPMScheduler(
        num_train_timesteps=task_cfg["num_train_timesteps"],
        beta_schedule=task_cfg["beta_schedule"],
        prediction_type="epsilon",
    )


def check_lr_schedule(name: str, warmup_steps: int, steps: int) -> None:
    """Refuse (`ConfigError`) a diffusers schedule `name` that cannot run `steps` with this
    warm-up, in the words of the command line's check of the same keys."""
    check_choice("train.lr_schedule", name, LR_SCHEDULES)
    check_int("train.warmup_steps", warmup_steps, 0, steps)


class DDPMTask(Task):
    """DDPM (arXiv 2006.11239) on one image dataset; digits also get classifier-based quality.

    A step draws a batch x_0, a timestep t ~ U{0..T-1} and noise ε per image, and regresses the
    UNet's output on ε (MSE). The EMA weights are the ones sampled and evaluated.

    Args:
        data: the images (`diffusion.data.build_dataset`); `data.train` (N, C, R, R) in [-1, 1].
        model: the UNet2DModel (`build_unet`), sized for the data's channels and resolution.
        noise_scheduler: the training noise schedule (`build_noise_scheduler`).
        batch_size: images per step, over all ranks of a distributed run (each rank draws
            batch_size / world_size of them).
        ema: the EMA of the weights (diffusers' EMAModel on `model`); None: EMAModel with
            `EMAConfig`'s defaults (those of `task.ema`).
        sampler: the evaluation sampler, ddpm | ddim.
        sampling_steps: sampler steps, in [1, num_train_timesteps].
        grid_samples: samples shown in the image grid.
        quality: the digit quality metrics (`DigitQuality`), None for none.
        run_dir: where samples/step_XXXXXX.png grids are saved; None: not saved.
        seed: seeds the training stream (rank r of a distributed run:
            `distributed.rank_seed(seed, r)`) and (seed + 1) the evaluation samples.
        compile: train through `torch.compile` of the UNet, in channels_last memory format
            (sampling stays eager: its batch sizes differ from training's).

    The run's device is the data's: `model` (and `ema`, `quality`) must live there too.
    """

    per_rank_state = ()  # weights and EMA are shared; each rank's stream is in its RNG state
    items_name = "images"
    progress_keys = ("fd_ratio",)
    summary_keys = ("loss", "fd", "fd_ratio", "confidence", "class_entropy", "images_per_sec")
    objective_key = "fd_ratio"

    def __init__(
        self,
        data: ImageData,
        model: UNet2DModel,
        noise_scheduler: DDPMScheduler,
        *,
        batch_size: int = 128,
        ema: EMAModel | None = None,
        sampler: str = "ddpm",
        sampling_steps: int = 50,
        grid_samples: int = 64,
        quality: DigitQuality | None = None,
        run_dir: str | Path | None = None,
        seed: int = 0,
        compile: bool = False,
    ) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.data = data
        images = self.data.train
        self.model = model
        self.channels_last = compile
        self.compiled = None
        if compile:
            model.to(memory_format=torch.channels_last)  # in place, parameters stay themselves
            # The loss's forward pass goes through the compiled handle of the same module (one
            # state dict, one EMA); the loop wraps it in DDP under torchrun.
            self.compiled = torch.compile(model)
        self.noise_scheduler = noise_scheduler
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(images.device)
        if ema is None:
            ema = EMAModel(self.model.parameters(), **asdict(EMAConfig()), foreach=True)
        self.ema = ema
        # Each rank draws its share of the global batch from the whole set, with replacement,
        # from its own stream: together the ranks draw a global batch as one process would.
        self.generator = torch.Generator(device=images.device).manual_seed(
            distributed.rank_seed(seed)
        )
        local_batch = distributed.per_rank(batch_size, "task.batch_size")
        self.batches = BatchSampler(images, local_batch, self.generator)
        self.items_per_step = batch_size
        self.seed = seed

        self.sampler_name, self.sampling_steps = sampler, sampling_steps
        build_sampler(self.sampler_name, self.noise_scheduler, self.sampling_steps)  # validate
        self.grid_samples = grid_samples
        self.quality = quality
        # FD compares equal sample counts; without quality metrics only the grid is drawn.
        self.eval_samples = grid_samples if quality is None else quality.n_reference
        self._last_samples: Tensor | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path | None = None) -> DDPMTask:
        """The task of a composed config: `data`, `model` (UNet2DModel's arguments), `task`
        (ddpm), `train` (its lr schedule is diffusers') and `seed`."""
        check_lr_schedule(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.steps)
        tc = cfg.task
        device = resolve_device(cfg.get("device", "auto"))
        data = build_dataset(cfg.data, cfg.seed, device)
        channels, resolution = data.train.shape[1], data.train.shape[-1]
        model = build_unet(cfg.model, channels, resolution).to(device)
        noise_scheduler = build_noise_scheduler(tc)
        ema = EMAModel(
            model.parameters(), decay=tc.ema.decay, use_ema_warmup=tc.ema.use_ema_warmup,
            inv_gamma=tc.ema.inv_gamma, power=tc.ema.power, foreach=True,
        )  # fmt: skip
        # The sampler is validated before the quality classifier is trained (seconds).
        build_sampler(tc.sampling.scheduler, noise_scheduler, tc.sampling.steps)
        quality = None
        if data.name == "digits" and tc.quality and distributed.is_main_process():  # evaluates
            classifier = cached_classifier(tc.cache_dir, data.labeled, data.labels, cfg.seed)
            quality = DigitQuality(classifier, data.heldout_a, data.heldout_b, device)
        return cls(
            data, model, noise_scheduler, batch_size=tc.batch_size, ema=ema,
            sampler=tc.sampling.scheduler, sampling_steps=tc.sampling.steps,
            grid_samples=tc.sampling.grid_samples, quality=quality, run_dir=run_dir,
            seed=cfg.seed, compile=cfg.get("compile", False),
        )  # fmt: skip

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters())}]

    def lr_schedule(
        self, optimizer: torch.optim.Optimizer, config: TrainConfig
    ) -> torch.optim.lr_scheduler.LambdaLR:
        """diffusers' `get_scheduler`: linear warm-up over `config.warmup_steps`, then the decay
        named by `config.lr_schedule` (cosine by default) to 0 at `config.steps`."""
        check_lr_schedule(config.lr_schedule, config.warmup_steps, config.steps)
        return get_scheduler(
            config.lr_schedule, optimizer,
            num_warmup_steps=config.warmup_steps, num_training_steps=config.steps,
        )  # fmt: skip

    def train_module(self) -> torch.nn.Module:
        """The UNet, or with `compile` its compiled handle (the same parameters)."""
        return self.model if self.compiled is None else self.compiled

    def loss(
        self, step: int, model: torch.nn.Module | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """ε-prediction MSE of one batch through `model` (default: `train_module()`)."""
        model = self.train_module() if model is None else model
        x0 = self.batches()  # (B, C, H, W)
        batch = x0.shape[0]
        noise = torch.randn(x0.shape, generator=self.generator, device=x0.device)
        t = torch.randint(
            self.noise_scheduler.config.num_train_timesteps, (batch,),
            generator=self.generator, device=x0.device,
        )  # fmt: skip
        # Forward process (Ho et al., eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) ε.
        abar = self.alphas_cumprod[t].view(batch, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        # bf16 or fp16 under autocast; DDP (and the compiled UNet) through `model`.
        prediction = model(x_t, t).sample
        return F.mse_loss(prediction.float(), noise), {}

    def after_step(self, step: int) -> None:
        self.ema.step(self.model.parameters())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """`n` images in [-1, 1] from the EMA weights with the evaluation sampler."""
        sampler = build_sampler(self.sampler_name, self.noise_scheduler, self.sampling_steps)
        with self._ema_weights():
            return sample_images(self.model, sampler, n, generator)

    @contextmanager
    def _ema_weights(self) -> Iterator[None]:
        """The UNet holds the EMA weights inside the block, its training weights again after."""
        self.ema.store(self.model.parameters())
        self.ema.copy_to(self.model.parameters())
        try:
            yield
        finally:
            self.ema.restore(self.model.parameters())

    def evaluate(self, step: int) -> dict[str, float]:
        """Samples from the EMA weights (same seed each time, so evaluations are comparable),
        scored against held-out digits when the data are digits."""
        generator = torch.Generator(device=self.data.train.device).manual_seed(self.seed + 1)
        self._last_samples = self.sample(self.eval_samples, generator)
        if self.quality is None:
            return {}
        return self.quality(self._last_samples)

    def images(self, step: int) -> dict[str, np.ndarray]:
        """The first `grid_samples` of the last evaluation as a grid, also saved as
        samples/step_XXXXXX.png in the run directory."""
        if self._last_samples is None:
            generator = torch.Generator(device=self.data.train.device).manual_seed(self.seed + 1)
            self._last_samples = self.sample(self.grid_samples, generator)
        grid = image_grid(self._last_samples[: self.grid_samples])
        if self.run_dir is not None:
            save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", grid)
        return {"samples": grid}

    def state_dict(self) -> dict[str, Any]:
        """The UNet's weights, the EMA weights as a UNet state dict (what sample.py loads), and
        the EMA's own state (to resume)."""
        with self._ema_weights():
            ema_unet = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {"unet": self.model.state_dict(), "ema_unet": ema_unet, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the UNet's weights and the EMA's state (its shadow weights and step count;
        `ema_unet` is derived from them); a UNet of another shape is refused by name."""
        check_state_shapes(state["unet"], self.model.state_dict(), "UNet")
        self.model.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        device = next(self.model.parameters()).device
        self.ema.to(device=device)  # load_state_dict keeps the tensors where they were loaded
