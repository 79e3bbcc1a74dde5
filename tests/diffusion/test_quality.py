"""Quality metrics: the Fréchet distance against a closed form, and its real-vs-noise gap."""

from __future__ import annotations

import math
import re

import pytest
import torch
from sklearn.datasets import load_digits

from diffusion.data import load_digits_split
from diffusion.quality import DigitQuality, cached_classifier, frechet_distance, train_classifier

HELDOUT = 300  # every DDPM test uses this held-out size: one cached classifier per session


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    g = torch.Generator().manual_seed(0)
    n, s1, s2 = 200_000, torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 1.0, 0.5])
    x = torch.randn(n, 3, generator=g, dtype=torch.float64) * s1
    y = torch.randn(n, 3, generator=g, dtype=torch.float64) * s2 + 1.0
    expected = 3 * 1.0 + float(((s1 - s2) ** 2).sum())  # = 3 + 5
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture(scope="module")
def quality(classifier_cache):
    train, labels, a, b = load_digits_split(HELDOUT, seed=0)
    classifier = cached_classifier(classifier_cache, train, labels, seed=0)
    return DigitQuality(classifier, a, b), a, b


def test_classifier_is_cached_and_accurate_on_heldout_digits(classifier_cache, quality):
    train, labels, _, _ = load_digits_split(HELDOUT, seed=0)
    classifier = cached_classifier(classifier_cache, train, labels, seed=0)
    assert len(list(classifier_cache.glob("digit_classifier_*.pt"))) == 1
    fresh = train_classifier(train[:200], labels[:200], seed=0, steps=20)
    again = train_classifier(train[:200], labels[:200], seed=0, steps=20)
    for p, q in zip(fresh.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)  # seeded: retraining gives the same classifier
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    heldout = torch.randperm(1797, generator=torch.Generator().manual_seed(0))[: 2 * HELDOUT]
    correct = classifier(images[heldout]).argmax(1) == torch.tensor(digits.target)[heldout]
    assert correct.float().mean() > 0.95  # chance is 0.1


def test_real_vs_real_is_far_below_real_vs_noise(quality):
    metrics, _, b = quality
    real = metrics(b)
    noise = metrics(torch.rand(b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real["fd"] == pytest.approx(metrics.fd_real) and real["fd_ratio"] == pytest.approx(1.0)
    assert noise["fd"] > 20 * real["fd"]
    assert real["confidence"] > 0.9
    assert real["class_entropy"] > 0.95 * math.log(10)  # held-out digits cover every class


def test_mode_collapse_shows_in_the_class_entropy(quality):
    metrics, a, b = quality
    ones = a[:1].expand(len(b), -1, -1, -1)  # every sample the same digit
    collapsed = metrics(ones)
    assert collapsed["class_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["fd"] > 5 * collapsed["fd_real"]


def test_sample_count_must_match_the_reference(quality):
    metrics, a, _ = quality
    msg = f"Expected {HELDOUT} samples (the held-out set's size), got 10"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        metrics(a[:10])


def test_metrics_on_the_device_match_the_cpu(classifier_cache, quality, device):
    """The classifier scores on the run's device; the FD is taken on the CPU in float64."""
    metrics, a, b = quality
    train, labels, _, _ = load_digits_split(HELDOUT, seed=0)
    classifier = cached_classifier(classifier_cache, train, labels, seed=0)
    on_device = DigitQuality(classifier, a.to(device), b.to(device))
    assert next(on_device.classifier.parameters()).device.type == device.type
    noise = torch.rand(b.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for samples in (b, noise):
        expected, got = metrics(samples), on_device(samples.to(device))
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_class_match_is_the_classifiers_accuracy_on_the_labels_asked(quality):
    metrics, _, _ = quality
    train, labels, _, _ = load_digits_split(HELDOUT, seed=0)
    images, asked = train[:300], labels[:300]
    accuracy = float((metrics.classifier(images).argmax(1) == asked).double().mean())
    assert metrics.class_match(images, asked) == pytest.approx(accuracy)
    assert accuracy > 0.95  # the training split: the classifier knows these digits
    assert metrics.class_match(images, (asked + 1) % 10) < 0.05  # every label wrong
