"""DDPMTask: a tiny UNet learns on digits, through the same loop and optimizers as GFlowNets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from diffusion.task import DDPMTask
from kinetic import TrainConfig, train
from optim import build_optimizer

HELDOUT = 300  # every DDPM test uses this held-out size: one cached classifier per session


CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")


def _cfg(cache, *overrides):
    """The task=ddpm config with a tiny UNet; digits use the session's cached classifier."""
    digits = [] if "data=folder" in overrides else [f"data.heldout_size={HELDOUT}"]
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(
            "config",
            [
                "task=ddpm", "model=unet_tiny", f"task.cache_dir={cache}",
                "task.sampling.steps=4", "train.steps=60", "train.warmup_steps=5",
                *digits, *overrides,
            ],
        )  # fmt: skip


@torch.no_grad()
def _fixed_loss(task: DDPMTask) -> float:
    """The ε-MSE on a fixed batch, timesteps and noise (independent of the training stream)."""
    g = torch.Generator().manual_seed(123)
    x0 = task.data.train[:256]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(1000, (256,), generator=g)
    x_t = task.noise_scheduler.add_noise(x0, noise, t)  # diffusers' own forward process
    return float(((task.model(x_t, t).sample - noise) ** 2).mean())


@pytest.mark.parametrize("optim", ["vradam", "adamw"])
def test_tiny_unet_loss_falls_and_ema_tracks(tmp_path, classifier_cache, optim):
    torch.manual_seed(0)
    cfg = _cfg(classifier_cache, f"optim={optim}")
    task = DDPMTask.from_config(cfg, tmp_path)
    optimizer = build_optimizer(cfg.optim, task.param_groups())
    before = _fixed_loss(task)
    config = TrainConfig(steps=60, log_every=60, eval_every=0, warmup_steps=5)
    final = train(task, optimizer, config, monitor=None)  # no logger: nothing written
    after = _fixed_loss(task)
    assert final["images"] == 60 * 128 and "fd_ratio" not in final  # eval_every=0: none
    assert list(tmp_path.iterdir()) == []
    assert after < 0.6 * before, (before, after)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    state = task.state_dict()
    assert set(state) == {"unet", "ema_unet", "ema"}
    assert not torch.equal(state["unet"]["conv_in.weight"], state["ema_unet"]["conv_in.weight"])


def test_evaluation_scores_ema_samples_and_saves_the_grid(tmp_path, classifier_cache):
    cfg = _cfg(classifier_cache)
    task = DDPMTask.from_config(cfg, tmp_path)
    metrics = task.evaluate(7)
    assert set(metrics) == {"fd", "fd_real", "fd_ratio", "confidence", "class_entropy"}
    assert metrics["fd_ratio"] > 3  # untrained: far from digits
    grid = task.images(7)["samples"]
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.min() >= 0 and grid.max() <= 1
    assert (tmp_path / "samples" / "step_000007.png").is_file()
    assert len(list(classifier_cache.glob("digit_classifier_*.pt"))) == 1


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        (
            "train.lr_schedule=cosin",
            ValueError,
            "Unknown train.lr_schedule: 'cosin'; valid: "
            "cosine, linear, constant, constant_with_warmup",
        ),
        (
            "task.sampling.scheduler=pndm",
            ValueError,
            "Unknown task.sampling.scheduler: 'pndm'; valid: ddpm, ddim, dpmsolver++",
        ),
        (
            "task.sampling.guidance_scales=[1.0,-2.0]",
            ValueError,
            "Invalid task.sampling.guidance_scales[1]: -2; expected a float >= 0",
        ),
        (
            "data.resolution=7",
            ValueError,
            "Invalid data.resolution: 7; the UNet downsamples 1 times, "
            "so the resolution must be a multiple of 2",
        ),
        (
            "+model.n_heads=2",
            ValueError,
            "Invalid model config for UNet2DModel: "
            "UNet2DModel.__init__() got an unexpected keyword argument 'n_heads'",
        ),
    ],
)
def test_config_errors_name_the_value(tmp_path, classifier_cache, override, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        DDPMTask.from_config(_cfg(classifier_cache, override), tmp_path)


def test_folder_data_trains_and_evaluates_without_classifier_metrics(tmp_path, classifier_cache):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (10, 12), (60 * i, 20, 200)).save(folder / f"{i}.png")
    cfg = _cfg(
        classifier_cache, "data=folder", f"data.path={folder}", "data.resolution=8",
        "task.sampling.grid_samples=4",
    )  # fmt: skip
    task = DDPMTask.from_config(cfg, tmp_path)
    loss, _ = task.loss(1)
    loss.backward()
    assert task.model.conv_in.weight.grad.shape[1] == 3  # RGB in
    assert task.evaluate(1) == {}
    assert task.images(1)["samples"].shape == ((9 + 1) * 4, (4 * 9 + 1) * 4, 3)  # one row of 4


class _LabelSpy(torch.nn.Module):
    """Calls the UNet and records the class labels it was given."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.labels = unet, []

    def forward(self, x, t, class_labels=None):
        self.labels.append(class_labels)
        return self.unet(x, t, class_labels=class_labels)


def test_conditional_training_drops_a_share_of_the_labels(tmp_path, classifier_cache):
    cfg = _cfg(classifier_cache, "task.conditional=true", "task.label_dropout=0.25",
               "task.batch_size=4000")  # fmt: skip
    task = DDPMTask.from_config(cfg, tmp_path)
    assert task.model.config.num_class_embeds == 11
    spy = _LabelSpy(task.model)
    loss, _ = task.loss(1, spy)
    loss.backward()
    (labels,) = spy.labels
    dropped = float((labels == 10).double().mean())
    assert abs(dropped - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5  # binomial, 4 sigma
    # The labels kept are the digits' own: every digit class appears in its real share.
    kept = labels[labels != 10]
    shares = torch.bincount(kept, minlength=10).double() / len(kept)
    real = torch.bincount(task.data.labels, minlength=10).double() / len(task.data.labels)
    assert (shares - real).abs().max() < 0.03
    assert task.model.class_embedding.weight.grad is not None


def test_conditional_labels_come_with_their_images(classifier_cache):
    from diffusion.data import BatchSampler

    images = torch.arange(6.0).view(6, 1, 1, 1)
    labels = torch.tensor([10, 11, 12, 13, 14, 15])
    batches = BatchSampler(images, 50, torch.Generator().manual_seed(0), labels)
    x, y = batches.labeled()
    assert torch.equal(x.view(-1).long() + 10, y)


def test_conditional_evaluation_reports_the_class_match_at_each_guidance(
    tmp_path, classifier_cache
):
    cfg = _cfg(classifier_cache, "task.conditional=true", "task.sampling.guidance_scales=[1,2.5]")
    task = DDPMTask.from_config(cfg, tmp_path)
    metrics = task.evaluate(1)
    assert {"fd_ratio", "class_match_g1", "class_match_g2p5"} <= set(metrics)
    assert task.summary_keys[-3:] == ("class_match_g1", "class_match_g2p5", "images_per_sec")
    # Independently: the classifier's argmax on the first scale's samples, against 0..9, 0..9...
    asked = torch.arange(HELDOUT) % 10
    predicted = task.quality.classifier(task._last_samples).argmax(1)
    assert metrics["class_match_g1"] == pytest.approx(float((predicted == asked).double().mean()))
    assert 0 <= metrics["class_match_g2p5"] <= 1


def test_conditional_needs_labelled_data(tmp_path, classifier_cache):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8), 100).save(folder / "a.png")
    cfg = _cfg(classifier_cache, "data=folder", f"data.path={folder}", "task.conditional=true")
    message = (
        "task.conditional=true needs labelled images, and data=folder has no labels; use "
        "data=digits or task.conditional=false"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DDPMTask.from_config(cfg, tmp_path)


def test_a_checkpoint_of_the_other_kind_is_refused_in_words(tmp_path, classifier_cache):
    plain = DDPMTask.from_config(_cfg(classifier_cache, "task.quality=false"), None)
    conditional = DDPMTask.from_config(
        _cfg(classifier_cache, "task.quality=false", "task.conditional=true"), None
    )
    message = (
        "The checkpoint is of an unconditional DDPM and this run is a class-conditional one; "
        "resume it with task.conditional=false"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        conditional.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=re.escape("resume it with task.conditional=true")):
        plain.load_state_dict(conditional.state_dict())
    conditional.load_state_dict(conditional.state_dict())  # its own kind loads
