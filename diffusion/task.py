"""The DDPM task for the training loop: ε-prediction MSE on diffusers' UNet2DModel, an EMA of
the weights, diffusers' warm-up + decay schedule, and sample quality at each evaluation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

from diffusion.config import (
    LR_SCHEDULES,
    PIPELINE_DIR,
    EMAConfig,
    check_conditional,
    check_guidance_scales,
    check_unet_resolution,
)
from diffusion.data import BatchSampler, ImageData, build_dataset
from diffusion.pipeline import pipeline_scheduler, save_pipeline
from diffusion.quality import N_CLASSES, DigitQuality, cached_classifier
from diffusion.sampling import build_sampler, image_grid, null_label, sample_images, save_grid
from kinetic import distributed
from kinetic.checkpoint import CheckpointError, check_state_shapes
from kinetic.config import TrainConfig
from kinetic.device import resolve_device
from kinetic.errors import ConfigError
from kinetic.task import Task
from kinetic.validate import check_choice, check_float, check_int


def build_unet(
    model_cfg: DictConfig | dict, channels: int, resolution: int, classes: int | None = None
) -> UNet2DModel:
    """diffusers' UNet2DModel from `model_cfg` (its own argument names; `name` is dropped), with
    the data's channels and resolution, which must survive every downsampling. `classes`: a
    class-conditional UNet with `classes + 1` class embeddings (the last one: no class)."""
    kwargs = {k: v for k, v in dict(model_cfg).items() if k != "name"}
    kwargs = OmegaConf.to_container(OmegaConf.create(kwargs)) if kwargs else kwargs
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    check_unet_resolution(resolution, len(kwargs.get("down_block_types", ())))
    try:
        if classes is not None:
            kwargs["num_class_embeds"] = classes + 1
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
    UNet's output on ε (MSE). The EMA weights are the ones sampled, evaluated and exported as a
    diffusers pipeline (`export`). A class-conditional UNet (`build_unet(..., classes=10)`)
    also gets each image's label, replaced by the "no class" label with probability
    `label_dropout`, so that one network learns both the conditional and the unconditional
    noise prediction that classifier-free guidance (arXiv 2207.12598) combines at sampling.

    Args:
        data: the images (`diffusion.data.build_dataset`); `data.train` (N, C, R, R) in [-1, 1].
            A class-conditional UNet also reads `data.labels` (N,).
        model: the UNet2DModel (`build_unet`), sized for the data's channels and resolution;
            with `num_class_embeds` set, the task is class-conditional.
        noise_scheduler: the training noise schedule (`build_noise_scheduler`).
        batch_size: images per step, over all ranks of a distributed run (each rank draws
            batch_size / world_size of them).
        ema: the EMA of the weights (diffusers' EMAModel on `model`); None: EMAModel with
            `EMAConfig`'s defaults (those of `task.ema`).
        sampler: the evaluation sampler, ddpm | ddim | dpmsolver++.
        sampling_steps: sampler steps, in [1, num_train_timesteps].
        grid_samples: samples shown in the image grid.
        quality: the digit quality metrics (`DigitQuality`), None for none.
        run_dir: where samples/step_XXXXXX.png grids are saved; None: not saved.
        seed: seeds the training stream (rank r of a distributed run:
            `distributed.rank_seed(seed, r)`) and (seed + 1) the evaluation samples.
        compile: train through `torch.compile` of the UNet, in channels_last memory format
            (sampling stays eager: its batch sizes differ from training's).
        label_dropout: class-conditional: the share of training labels replaced by "no class".
        guidance_scales: class-conditional: the guidance scales evaluated (1 = none); the
            quality metrics are those of the first, and with `quality` each one's
            `class_match_g<scale>` is the share of samples the classifier assigns to the
            class asked for.

    The run's device is the data's: `model` (and `ema`, `quality`) must live there too.
    """

    per_rank_state = ()  # weights and EMA are shared; each rank's stream is in its RNG state
    items_name = "images"
    progress_keys = ("fd_ratio",)
    summary_keys = ("loss", "fd", "fd_ratio", "confidence", "class_entropy", "images_per_sec")
    objective_key = "fd_ratio"
    export_name = PIPELINE_DIR

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
        label_dropout: float = 0.1,
        guidance_scales: Sequence[float] = (1.0, 3.0),
    ) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.data = data
        images = self.data.train
        self.model = model
        self.conditional = model.config.num_class_embeds is not None
        if self.conditional:
            if data.labels is None:
                check_conditional(True, data.name)  # refuses: no labels
            check_int("num_class_embeds", model.config.num_class_embeds, N_CLASSES + 1)
            check_float("task.label_dropout", label_dropout, 0.0, 1.0, low_open=True,
                        high_open=True)  # fmt: skip
        self.label_dropout = label_dropout
        self.guidance_scales = check_guidance_scales(
            "task.sampling.guidance_scales", guidance_scales
        )
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
        labels = data.labels if self.conditional else None
        self.batches = BatchSampler(images, local_batch, self.generator, labels)
        self.items_per_step = batch_size
        self.seed = seed

        self.sampler_name, self.sampling_steps = sampler, sampling_steps
        build_sampler(self.sampler_name, self.noise_scheduler, self.sampling_steps)  # validate
        self.grid_samples = grid_samples
        self.quality = quality
        # FD compares equal sample counts; without quality metrics only the grid is drawn.
        self.eval_samples = grid_samples if quality is None else quality.n_reference
        self._last_samples: Tensor | None = None
        if self.conditional and quality is not None:
            self.summary_keys = (*self.summary_keys[:-1], *self._match_keys(), "images_per_sec")

    def _match_keys(self) -> list[str]:
        """`class_match_g1`, `class_match_g3`, `class_match_g1p5`: one per guidance scale."""
        return [f"class_match_g{w:g}".replace(".", "p") for w in self.guidance_scales]

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path | None = None) -> DDPMTask:
        """The task of a composed config: `data`, `model` (UNet2DModel's arguments), `task`
        (ddpm), `train` (its lr schedule is diffusers') and `seed`."""
        check_lr_schedule(cfg.train.lr_schedule, cfg.train.warmup_steps, cfg.train.steps)
        tc = cfg.task
        check_conditional(tc.conditional, cfg.data.name)
        device = resolve_device(cfg.get("device", "auto"))
        data = build_dataset(cfg.data, cfg.seed, device)
        channels, resolution = data.train.shape[1], data.train.shape[-1]
        classes = N_CLASSES if tc.conditional else None
        model = build_unet(cfg.model, channels, resolution, classes).to(device)
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
            seed=cfg.seed, compile=cfg.get("compile", False), label_dropout=tc.label_dropout,
            guidance_scales=list(tc.sampling.guidance_scales),
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
        x0, labels = self.batches.labeled()  # (B, C, H, W), (B,) or None
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
        if labels is None:
            prediction = model(x_t, t).sample  # bf16 or fp16 under autocast; DDP via `model`
        else:
            # Classifier-free guidance's training (Ho & Salimans, Algorithm 1): drop labels.
            dropped = torch.rand(batch, generator=self.generator, device=x0.device)
            labels = labels.masked_fill(dropped < self.label_dropout, null_label(self.model))
            prediction = model(x_t, t, class_labels=labels).sample
        return F.mse_loss(prediction.float(), noise), {}

    def after_step(self, step: int) -> None:
        self.ema.step(self.model.parameters())

    def sample(
        self,
        n: int,
        generator: torch.Generator,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> Tensor:
        """`n` images in [-1, 1] from the EMA weights with the evaluation sampler; a
        class-conditional task draws the classes `class_labels` (n,) (default: 0, 1, ..., 9,
        0, 1, ...) with classifier-free guidance of scale `guidance_scale`."""
        sampler = build_sampler(self.sampler_name, self.noise_scheduler, self.sampling_steps)
        if self.conditional and class_labels is None:
            class_labels = self.eval_labels(n)
        with self._ema_weights():
            return sample_images(
                self.model, sampler, n, generator, class_labels=class_labels,
                guidance_scale=guidance_scale,
            )  # fmt: skip

    def eval_labels(self, n: int) -> Tensor:
        """The classes of `n` evaluation samples: 0, 1, ..., 9, 0, 1, ... (equal shares)."""
        return torch.arange(n, device=self.data.train.device) % N_CLASSES

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
        scored against held-out digits when the data are digits. A class-conditional task
        draws equal shares of every class at each guidance scale: the quality metrics are the
        first scale's, and `class_match_g<scale>` is the share the classifier assigns to the
        class asked for."""
        device = self.data.train.device
        generator = torch.Generator(device=device).manual_seed(self.seed + 1)
        scales = self.guidance_scales if self.conditional else [1.0]
        self._last_samples = self.sample(self.eval_samples, generator, None, scales[0])
        if self.quality is None:
            return {}
        metrics = self.quality(self._last_samples)
        if self.conditional:
            labels = self.eval_labels(self.eval_samples)
            for key, scale in zip(self._match_keys(), scales, strict=True):
                if scale == scales[0]:
                    samples = self._last_samples
                else:
                    generator = torch.Generator(device=device).manual_seed(self.seed + 1)
                    samples = self.sample(self.eval_samples, generator, labels, scale)
                metrics[key] = self.quality.class_match(samples, labels)
        return metrics

    def images(self, step: int) -> dict[str, np.ndarray]:
        """The first `grid_samples` of the last evaluation as a grid (a class-conditional
        task's: one column per class), also saved as samples/step_XXXXXX.png in the run
        directory."""
        if self._last_samples is None:
            generator = torch.Generator(device=self.data.train.device).manual_seed(self.seed + 1)
            scale = self.guidance_scales[0] if self.conditional else 1.0
            self._last_samples = self.sample(self.grid_samples, generator, None, scale)
        nrow = N_CLASSES if self.conditional else 8
        grid = image_grid(self._last_samples[: self.grid_samples], nrow=nrow)
        if self.run_dir is not None:
            save_grid(self.run_dir / "samples" / f"step_{step:06d}.png", grid)
        return {"samples": grid}

    def ema_unet_state(self) -> dict[str, Tensor]:
        """The EMA weights as a state dict of the UNet (contiguous CPU copies)."""
        with self._ema_weights():
            return {
                k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                for k, v in self.model.state_dict().items()
            }

    def export(self, folder: Path) -> None:
        """The EMA UNet and the noise schedule as a diffusers `DDPMPipeline` folder
        (`diffusion.pipeline`), loadable by `DDPMPipeline.from_pretrained(folder)`."""
        with torch.device("meta"):  # no initialisation: it would draw from torch's stream
            unet = UNet2DModel.from_config(self.model.config)
        unet.load_state_dict(self.ema_unet_state(), assign=True)
        save_pipeline(folder, unet, pipeline_scheduler(self.noise_scheduler))

    def state_dict(self) -> dict[str, Any]:
        """The UNet's weights, the EMA weights as a UNet state dict, and the EMA's own state
        (to resume)."""
        return {
            "unet": self.model.state_dict(), "ema_unet": self.ema_unet_state(),
            "ema": self.ema.state_dict(),
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the UNet's weights and the EMA's state (its shadow weights and step count;
        `ema_unet` is derived from them); a UNet of another shape is refused by name, and a
        checkpoint of the other kind (class-conditional or not) in words."""
        saved_conditional = "class_embedding.weight" in state["unet"]
        if saved_conditional != self.conditional:
            kinds = ("an unconditional", "a class-conditional")
            raise CheckpointError(
                f"The checkpoint is of {kinds[saved_conditional]} DDPM and this run is "
                f"{kinds[self.conditional]} one; resume it with "
                f"task.conditional={str(saved_conditional).lower()}"
            )
        check_state_shapes(state["unet"], self.model.state_dict(), "UNet")
        self.model.load_state_dict(state["unet"])
        self.ema.load_state_dict(state["ema"])
        device = next(self.model.parameters()).device
        self.ema.to(device=device)  # load_state_dict keeps the tensors where they were loaded
