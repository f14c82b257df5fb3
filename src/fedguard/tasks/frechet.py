"""Frechet distance between image sets in the feature space of a small classifier.

FID (Heusel et al. 2017) measures the Frechet distance between Gaussians fitted to Inception
features of real and generated images. Inception weights cannot be downloaded here and do not
fit 28x28 grey digits anyway, so fedguard uses the same distance in the penultimate layer
(128 ReLU units) of a small CNN (:class:`FeatureCNN`) trained once on the dataset's own
training split. The number is therefore *not* comparable to published FID values; call it
"FD in <dataset>-classifier features".

The classifier is trained with a fixed seed (Adam, ``epochs`` passes, batch 128) and cached
as safetensors + JSON under ``$FEDGUARD_CACHE`` (default ``~/.cache/fedguard``), keyed by a
SHA-256 of the training images, labels and training settings, so every run on the same data
uses the same feature network. The classifier only serves evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.generative_common import Adam, single_thread

CACHE_ENV = "FEDGUARD_CACHE"
ARCH_VERSION = "feature-cnn-v1"


class FeatureCNN(nn.Module):
    """conv3x3(16)-pool-conv3x3(32)-pool-fc(128)-fc(classes); features = the fc(128) ReLU output."""

    def __init__(self, channels: int = 1, size: int = 28, classes: int = 10, width: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, width), nn.ReLU(),
        )
        self.head = nn.Linear(width, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (B, width)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierSettings:
    """How the feature classifier is trained (part of the cache key)."""

    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    arch: str = ARCH_VERSION


def cache_dir() -> Path:
    """``$FEDGUARD_CACHE`` or ``~/.cache/fedguard``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedguard")


def data_key(data: ArrayDataset, settings: ClassifierSettings) -> str:
    """SHA-256 of the images, labels and training settings (hex)."""
    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    h.update(str(tuple(data.x.shape)).encode())
    h.update(data.x.contiguous().numpy().tobytes())
    h.update(data.y.contiguous().numpy().tobytes())
    return h.hexdigest()


def train_feature_classifier(data: ArrayDataset, settings: ClassifierSettings) -> tuple[FeatureCNN, dict]:
    """Train :class:`FeatureCNN` on ``data`` from ``settings.seed``; returns it and a summary."""
    t0 = time.perf_counter()
    c, size = int(data.x.shape[1]), int(data.x.shape[-1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = FeatureCNN(c, size, max(data.num_classes, 2))
    gen = torch.Generator().manual_seed(settings.seed)
    opt = Adam(list(net.parameters()), settings.lr)
    for _ in range(settings.epochs):
        for idx in torch.randperm(len(data), generator=gen).split(settings.batch_size):
            opt.minimise(F.cross_entropy(net(data.x[idx]), data.y[idx]))
    net.eval()
    info = {"train_accuracy": accuracy(net, data), "train_s": round(time.perf_counter() - t0, 1)}
    return net, info


@torch.no_grad()
def accuracy(net: FeatureCNN, data: ArrayDataset, batch_size: int = 2000) -> float:
    """Classification accuracy of ``net`` on ``data``."""
    correct = sum(int((net(data.x[i : i + batch_size]).argmax(1) == data.y[i : i + batch_size]).sum())
                  for i in range(0, len(data), batch_size))
    return correct / max(len(data), 1)


def feature_classifier(data: ArrayDataset, settings: ClassifierSettings | None = None,
                       cache: Path | None = None) -> tuple[FeatureCNN, dict]:
    """The cached feature classifier for ``data`` (trained and cached on first use)."""
    settings = settings or ClassifierSettings()
    key = data_key(data, settings)
    folder = cache or cache_dir()
    weights, meta = folder / f"fd-classifier-{key[:16]}.safetensors", folder / f"fd-classifier-{key[:16]}.json"
    c, size = int(data.x.shape[1]), int(data.x.shape[-1])
    if weights.exists() and meta.exists():
        info = json.loads(meta.read_text())
        net = FeatureCNN(c, size, int(info["classes"]))
        net.load_state_dict(load_file(str(weights)))
        return net.eval(), info
    net, info = train_feature_classifier(data, settings)
    info = {**info, "key": key, "dataset": data.name, "examples": len(data), "classes": net.head.out_features,
            "settings": asdict(settings)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(info, indent=1))
    return net, info


def frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2))`` in float64.

    ``tr((C1 C2)^(1/2))`` is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``C1^(1/2) C2 C1^(1/2)``, which has the same spectrum as ``C1 C2``.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    with single_thread():  # small eigenproblems: threads only add synchronisation cost
        vals, vecs = torch.linalg.eigh(cov1)
        root1 = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
        middle = root1 @ cov2 @ root1
        trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_root
    return float(value.clamp_min(0))


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of rows, in float64."""
    f = features.double()
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / max(len(f) - 1, 1)


class FrechetScorer:
    """FD between image sets in a :class:`FeatureCNN`'s features."""

    def __init__(self, net: FeatureCNN, batch_size: int = 1000) -> None:
        self.net, self.batch_size = net.eval(), batch_size

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Feature rows of ``images`` (N, C, H, W) in [0, 1]."""
        return torch.cat([self.net.features(images[i : i + self.batch_size])
                          for i in range(0, len(images), self.batch_size)])

    def stats(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian fit (mean, covariance) of the features of ``images``."""
        return gaussian_stats(self.features(images))

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """FD between image sets ``a`` and ``b``."""
        return frechet_distance(*self.stats(a), *self.stats(b))


def sanity_scores(scorer: FrechetScorer, train: ArrayDataset, test: ArrayDataset, n: int,
                  seed: int = 0) -> dict[str, float]:
    """FD of ``n`` test images against: ``n`` real training images (should be near 0),
    uniform noise, one training image repeated ``n`` times (a fully collapsed generator) and
    training images of a single class (a mode-collapsed generator)."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n, len(train), len(test))
    ref = scorer.stats(test.x[:n])
    real = train.x[torch.randperm(len(train), generator=gen)[:n]]
    noise = torch.rand((n, *train.x.shape[1:]), generator=gen)
    collapsed = train.x[:1].expand(n, *train.x.shape[1:])
    one_class = train.x[train.y == train.y[0]][:n]
    return {name: frechet_distance(*scorer.stats(images), *ref)
            for name, images in (("real", real), ("noise", noise), ("collapsed", collapsed), ("one_class", one_class))}
