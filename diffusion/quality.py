"""Sample quality without downloads: a small digit classifier trained here, and in its feature
space a Fréchet distance (as FID, arXiv 1706.08500), the mean confidence on samples and the
entropy of the predicted-class histogram (low entropy = mode collapse)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from diffusion.data import resize_center_crop
from kinetic.checkpoint import load_checkpoint, save_checkpoint

CLASSIFIER_VERSION = 1  # bump when DigitClassifier or train_classifier changes: a new cache key
N_CLASSES = 10


class DigitClassifier(nn.Module):
    """An MLP on 8x8 digits in [-1, 1]; `features` (its penultimate layer) feeds the FD."""

    def __init__(self, hidden: int = 256, features: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, features), nn.ReLU()
        )
        self.head = nn.Linear(features, N_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, 8, 8) -> (N, features)."""
        return self.trunk(x)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, 8, 8) -> class logits (N, 10)."""
        return self.head(self.trunk(x))


def train_classifier(
    images: Tensor, labels: Tensor, seed: int, steps: int = 600, lr: float = 3e-3
) -> DigitClassifier:
    """Full-batch Adam on (images (N, 1, 8, 8), labels (N,)); seeded, so deterministic."""
    torch.manual_seed(seed)  # the weight initialisation
    model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        # A little pixel noise, so features of slightly imperfect samples are not out of range.
        noisy = images + 0.05 * torch.randn(images.shape, generator=generator)
        loss = nn.functional.cross_entropy(model(noisy), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def cached_classifier(
    cache_dir: str | Path, images: Tensor, labels: Tensor, seed: int
) -> DigitClassifier:
    """The classifier for this training split, from `cache_dir` when there, else trained (a few
    seconds) and saved there. Keyed by the architecture version, the seed and the data."""
    images, labels = images.detach().cpu().float(), labels.detach().cpu()
    digest = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:12]
    key = json.dumps({"v": CLASSIFIER_VERSION, "seed": seed, "n": len(labels), "data": digest})
    name = f"digit_classifier_v{CLASSIFIER_VERSION}_seed{seed}_n{len(labels)}_{digest}.pt"
    path = Path(cache_dir) / name
    model = DigitClassifier()
    if path.is_file():
        payload = load_checkpoint(path)
        if payload.get("key") == key:
            model.load_state_dict(payload["model"])
            return model.eval()
    model = train_classifier(images, labels, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model=model.state_dict(), key=key)
    return model


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of a symmetric PSD matrix, by eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features x (N, D) and y (M, D), in float64:
    ||mu_x - mu_y||^2 + tr(C_x + C_y - 2 (C_x^1/2 C_y C_x^1/2)^1/2). The last trace is taken
    from the eigenvalues of the symmetric product, which is stable where sqrtm(C_x C_y) is not."""
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
        raise ValueError(f"Expected features (N, D) and (M, D); got {shapes}")
    x, y = x.double(), y.double()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = torch.cov(x.T), torch.cov(y.T)  # (D, D)
    root_x = _sqrtm_psd(cov_x)
    product = root_x @ cov_y @ root_x
    product = (product + product.T) / 2  # symmetric up to rounding
    trace_sqrt = torch.linalg.eigvalsh(product).clamp(min=0).sqrt().sum()
    distance = (mu_x - mu_y).square().sum() + cov_x.trace() + cov_y.trace() - 2 * trace_sqrt
    return float(distance)


class DigitQuality:
    """The quality metrics of digit samples against held-out real digits.

    `reference` and `baseline` are two disjoint held-out sets of the same size; their FD
    (`fd_real`, the real-vs-real floor) is computed once here, at construction. Compare samples
    of that same size: FD is biased upwards at small sample counts.

    The classifier runs on `device` (the run's; default: where `reference` lives), so samples
    are scored where they were drawn. The Fréchet distance itself is taken on the CPU in
    float64: 64x64 eigendecompositions cost microseconds there and need float64, which many
    GPUs run slowly. The classifier is always trained on the CPU (`cached_classifier`), so
    the metrics of a run do not depend on the device it trained on.
    """

    def __init__(
        self,
        classifier: DigitClassifier,
        reference: Tensor,
        baseline: Tensor,
        device: torch.device | str | None = None,
    ) -> None:
        if reference.shape != baseline.shape:
            shapes = f"{tuple(reference.shape)} vs {tuple(baseline.shape)}"
            raise ValueError(f"Held-out sets differ in shape: {shapes}")
        self.device = reference.device if device is None else torch.device(device)
        self.classifier = classifier.to(self.device)
        self.n_reference = reference.shape[0]
        self.reference_features = self._features(reference).cpu()  # (M, 64)
        self.fd_real = frechet_distance(self.reference_features, self._features(baseline).cpu())

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        """Classifier features of `images` (N, 1, 8, 8), on the classifier's device."""
        return self.classifier.features(images.to(self.device, torch.float32))

    @torch.no_grad()
    def class_match(self, samples: Tensor, labels: Tensor) -> float:
        """The share of `samples` (N, 1, H, W) in [-1, 1] that the classifier assigns to the
        class asked for, `labels` (N,)."""
        if labels.shape != samples.shape[:1]:
            raise ValueError(f"Expected {samples.shape[0]} labels, got {tuple(labels.shape)}")
        samples = resize_center_crop(samples.to(self.device, torch.float32), 8)
        predicted = self.classifier(samples).argmax(1)
        return float((predicted == labels.to(self.device)).double().mean())

    @torch.no_grad()
    def __call__(self, samples: Tensor) -> dict[str, float]:
        """`samples` (N, 1, H, W) in [-1, 1], N = the reference size; H = W = 8 or resized to 8.

        fd, fd_real, fd_ratio = fd / fd_real; confidence (mean max softmax probability, in
        [0.1, 1]); class_entropy (nats, of the predicted-class histogram; log 10 = 2.303 when
        uniform, 0 when every sample is one class)."""
        if samples.shape[0] != self.n_reference:
            raise ValueError(
                f"Expected {self.n_reference} samples (the held-out set's size), "
                f"got {samples.shape[0]}"
            )
        samples = resize_center_crop(samples.to(self.device, torch.float32), 8)
        features = self._features(samples)  # (N, 64)
        probs = self.classifier.head(features).softmax(dim=1).cpu()  # (N, 10)
        features = features.cpu()
        histogram = torch.bincount(probs.argmax(1), minlength=N_CLASSES).double() / len(probs)
        entropy = -(histogram * histogram.clamp(min=1e-30).log()).sum()
        fd = frechet_distance(features, self.reference_features)
        return {
            "fd": fd,
            "fd_real": self.fd_real,
            "fd_ratio": fd / self.fd_real if self.fd_real > 0 else math.inf,
            "confidence": float(probs.max(1).values.mean()),
            "class_entropy": float(entropy),
        }
