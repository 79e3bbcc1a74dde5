"""Datasets: the digits split, and a folder of images with its error cases."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from diffusion.data import (
    BatchSampler,
    build_dataset,
    load_digits_split,
    load_image_folder,
    resize_center_crop,
)


def _png(path, size=(12, 10), value=200, mode="RGB"):
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_digits_split_is_disjoint_seeded_and_in_range():
    train, labels, a, b = load_digits_split(100, seed=0)
    assert train.shape == (1797 - 200, 1, 8, 8) and labels.shape == (1597,)
    assert a.shape == b.shape == (100, 1, 8, 8)
    assert train.min() == -1.0 and train.max() == 1.0
    rows = {tuple(x.flatten().tolist()) for x in torch.cat([train, a, b])}
    assert len(rows) > 1700  # duplicates exist in the raw data, but the sets do not overlap
    assert torch.equal(load_digits_split(100, seed=0)[2], a)
    assert not torch.equal(load_digits_split(100, seed=1)[2], a)


def test_digits_heldout_size_is_validated():
    msg = "Invalid data.heldout_size: 900; expected an int in [1, 898] (two disjoint held-out sets out of 1797 digits)"  # noqa: E501
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        load_digits_split(900, seed=0)


def test_digits_resized_for_the_unet_keep_8x8_for_the_classifier():
    cfg = OmegaConf.create({"name": "digits", "resolution": 16, "channels": 1, "heldout_size": 50})
    data = build_dataset(cfg, seed=0)
    assert data.train.shape[1:] == (1, 16, 16)
    assert data.labeled.shape[1:] == (1, 8, 8) and data.heldout_a.shape[1:] == (1, 8, 8)


def test_resize_center_crop_keeps_the_centre():
    image = torch.zeros(1, 1, 8, 16)
    image[..., 4:12] = 1.0  # a bright centre square, dark sides
    out = resize_center_crop(image, 4)
    assert out.shape == (1, 1, 4, 4)
    assert torch.allclose(out, torch.ones_like(out), atol=0.2)


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_folder_images_are_resized_cropped_and_scaled(tmp_path, channels, mode):
    _png(tmp_path / "a.png", mode=mode, value=255)
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (20, 30), (0, 0, 0)).save(tmp_path / "sub" / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    images = load_image_folder(tmp_path, resolution=8, channels=channels)
    assert images.shape == (2, channels, 8, 8)
    assert torch.allclose(images[0], torch.ones(channels, 8, 8))  # white -> +1
    assert torch.allclose(images[1], -torch.ones(channels, 8, 8), atol=0.02)  # black -> -1


def test_missing_folder(tmp_path):
    msg = f"data.path={tmp_path / 'nope'} does not exist; expected a folder of PNG/JPEG images"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        load_image_folder(tmp_path / "nope", 8, 1)


def test_empty_folder(tmp_path):
    msg = f"No images in data.path={tmp_path}; expected files ending in .png, .jpg, .jpeg"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        load_image_folder(tmp_path, 8, 1)


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    msg = f"No readable image in data.path={tmp_path}; cannot read {bad}"
    warning = re.escape(f"Skipping unreadable image {bad}")
    with pytest.warns(UserWarning, match=warning), pytest.raises(ValueError, match=f"^{msg}$"):
        load_image_folder(tmp_path, 8, 1)


def test_one_bad_image_among_good_ones_is_skipped_with_a_warning(tmp_path):
    for i in range(3):
        _png(tmp_path / f"good{i}.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    with pytest.warns(UserWarning, match=re.escape(f"Skipping unreadable image {bad}")):
        images = load_image_folder(tmp_path, 8, 3)
    assert images.shape == (3, 3, 8, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"channels": 2}, "Invalid data.channels: 2; expected 1 (grayscale) or 3 (RGB)"),
        ({"path": None}, "data=folder needs data.path=DIR (a folder of PNG/JPEG images)"),
        ({"name": "cifar"}, "Unknown data.name: 'cifar'; available: digits, folder"),
    ],
)
def test_data_config_errors(tmp_path, overrides, message):
    _png(tmp_path / "a.png")
    cfg = {"name": "folder", "path": str(tmp_path), "resolution": 8, "channels": 1, **overrides}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_dataset(OmegaConf.create(cfg), seed=0)


def test_batches_are_seeded_draws_from_the_data():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    draw = BatchSampler(images, 6, torch.Generator().manual_seed(0))
    again = BatchSampler(images, 6, torch.Generator().manual_seed(0))
    batch = draw()
    assert batch.shape == (6, 1, 1, 1)
    assert torch.equal(batch, again())
    assert set(np.unique(batch.numpy())) <= set(range(10))


def test_the_dataset_and_its_batches_live_on_the_device(device):
    cfg = OmegaConf.create({"name": "digits", "resolution": 8, "channels": 1, "heldout_size": 50})
    on_cpu = build_dataset(cfg, seed=0)
    data = build_dataset(cfg, seed=0, device=device)
    for name in ("train", "labeled", "labels", "heldout_a", "heldout_b"):
        tensor = getattr(data, name)
        assert tensor.device.type == device.type
        assert torch.equal(tensor.cpu(), getattr(on_cpu, name))
    batch = BatchSampler(data.train, 16, torch.Generator(device).manual_seed(0))()
    assert batch.device.type == device.type and batch.shape == (16, 1, 8, 8)
    rows = {tuple(x.flatten().tolist()) for x in on_cpu.train}
    assert all(tuple(x.flatten().tolist()) in rows for x in batch.cpu())  # drawn from the data
