"""Training images as one tensor in [-1, 1]: scikit-learn's bundled 8x8 digits or a folder.

Both datasets are small enough to live on the device as one `(N, C, H, W)` tensor, so a batch is
an index draw from a seeded generator: no DataLoader, no worker processes, no host sync.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from diffusion.config import DATASETS, IMAGE_SUFFIXES, validate_image_folder
from kinetic.errors import ConfigError
from kinetic.validate import check_int

MODES = {1: "L", 3: "RGB"}  # channels -> PIL mode
DIGITS_MAX = 16.0  # the digits' pixel values are integers in [0, 16]


@dataclass
class ImageData:
    """Images in [-1, 1]: `train` (N, C, R, R) for the model; for digits also the same images
    at 8x8 (`labeled`, (N, 1, 8, 8)) with their `labels` (N,), and two disjoint held-out sets
    `heldout_a`, `heldout_b` (M, 1, 8, 8), for the quality metrics."""

    name: str
    train: Tensor
    labeled: Tensor | None = None
    labels: Tensor | None = None
    heldout_a: Tensor | None = None
    heldout_b: Tensor | None = None

    def to(self, device: torch.device | str) -> ImageData:
        """A copy with every tensor on `device` (the training images are read from there)."""
        moved = {
            f.name: v.to(device) if isinstance(v, Tensor) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return ImageData(**moved)


def resize_center_crop(images: Tensor, resolution: int) -> Tensor:
    """Resize (N, C, H, W) so the shorter side is `resolution`, then crop the centre square."""
    height, width = images.shape[-2:]
    if (height, width) == (resolution, resolution):
        return images
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return images[..., top : top + resolution, left : left + resolution]


def load_digits_split(heldout_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's 1,797 digits in [-1, 1], split by a seeded permutation into training
    images (N, 1, 8, 8), their labels (N,), and two disjoint held-out sets of `heldout_size`."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32))[:, None]  # (1797, 1, 8, 8)
    images = images / DIGITS_MAX * 2.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))
    n = images.shape[0]
    if not 0 < 2 * heldout_size < n:
        raise ConfigError(
            f"Invalid data.heldout_size: {heldout_size}; expected an int in [1, {(n - 1) // 2}] "
            f"(two disjoint held-out sets out of {n} digits)"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = order[:heldout_size], order[heldout_size : 2 * heldout_size]
    train = order[2 * heldout_size :]
    return images[train], labels[train], images[a], images[b]


def _read_image(path: Path, channels: int) -> Tensor:
    """One image file as (C, H, W) float in [0, 1]; raises OSError/ValueError if unreadable."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert(MODES[channels]), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array)
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1)


def load_image_folder(path: str | Path, resolution: int, channels: int) -> Tensor:
    """Every PNG/JPEG under `path` (recursively), resized and centre-cropped to
    `resolution`, as (N, channels, R, R) in [-1, 1]. A file that cannot be read is reported
    with a warning and skipped; a folder with no readable image is an error naming the files."""
    if channels not in MODES:
        raise ConfigError(f"Invalid data.channels: {channels}; expected 1 (grayscale) or 3 (RGB)")
    check_int("data.resolution", resolution, 1)
    root = validate_image_folder(path)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images, bad = [], []
    for file in files:
        try:
            image = _read_image(file, channels)
        except (OSError, ValueError) as err:  # PIL raises UnidentifiedImageError (an OSError)
            bad.append(file)
            warnings.warn(f"Skipping unreadable image {file}: {err}", stacklevel=2)
            continue
        images.append(resize_center_crop(image[None], resolution))
    if not images:
        named = ", ".join(str(f) for f in bad[:3]) + (" ..." if len(bad) > 3 else "")
        raise ConfigError(f"No readable image in data.path={path}; cannot read {named}")
    return torch.cat(images).clamp(0.0, 1.0) * 2.0 - 1.0


def build_dataset(cfg: DictConfig, seed: int, device: torch.device | str = "cpu") -> ImageData:
    """The dataset of `cfg.data` (`name`: digits | folder), brought to `cfg.data.resolution`
    and put on `device` (read and resized on the CPU, then moved once)."""
    name = cfg.name
    if name == "digits":
        train, labels, heldout_a, heldout_b = load_digits_split(cfg.heldout_size, seed)
        resized = resize_center_crop(train, cfg.resolution)
        return ImageData(name, resized, train, labels, heldout_a, heldout_b).to(device)
    if name == "folder":
        if cfg.path is None:
            raise ConfigError("data=folder needs data.path=DIR (a folder of PNG/JPEG images)")
        images = load_image_folder(cfg.path, cfg.resolution, cfg.channels)
        return ImageData(name, images).to(device)
    raise ConfigError(f"Unknown data.name: {name!r}; available: {', '.join(DATASETS)}")


class BatchSampler:
    """Random batches (with replacement) from an on-device image tensor, seeded; with `labels`
    (N,), `labeled()` draws each image's label with it."""

    def __init__(
        self,
        images: Tensor,
        batch_size: int,
        generator: torch.Generator,
        labels: Tensor | None = None,
    ) -> None:
        check_int("task.batch_size", batch_size, 1)
        if labels is not None and labels.shape != images.shape[:1]:
            raise ValueError(f"Expected {images.shape[0]} labels, got {tuple(labels.shape)}")
        self.images, self.batch_size, self.generator = images, batch_size, generator
        self.labels = labels

    def _index(self) -> Tensor:
        """(B,) indices; the draw stays on the device (no host sync)."""
        return torch.randint(
            self.images.shape[0], (self.batch_size,), generator=self.generator,
            device=self.images.device,
        )  # fmt: skip

    def __call__(self) -> Tensor:
        """A batch (B, C, H, W)."""
        return self.images[self._index()]

    def labeled(self) -> tuple[Tensor, Tensor | None]:
        """A batch (B, C, H, W) and its labels (B,) (None without labels); the same draw as
        `__call__`."""
        index = self._index()
        return self.images[index], None if self.labels is None else self.labels[index]
