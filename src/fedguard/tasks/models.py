"""Reference models: the CNNs of the fedguard benchmarks and a small MLP.

CNN-M is the MNIST CNN of McMahan et al. 2017; CNN-S is its small variant used for the
cross-device workloads. ``norm="group"`` inserts GroupNorm after each convolution (DP-SGD
needs a normalisation that does not mix examples; BatchNorm does).
"""

from __future__ import annotations

from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(8, channels // 2), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be one of none, group, batch; got {kind!r}")


class CNN(nn.Module):
    """Two 5x5 conv blocks then a classifier head: the shape shared by CNN-S and CNN-M."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        widths: tuple[int, int] = (16, 32),
        hidden: int | None = None,
        norm: str = "none",
    ) -> None:
        super().__init__()
        c1, c2 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            _norm(norm, c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            _norm(norm, c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * (image_size // 4) ** 2
        if hidden:
            self.head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.head = nn.Linear(flat, num_classes)

    def forward(self, x):  # noqa: D102
        return self.head(self.features(x))


class MLP(nn.Module):
    """A two-hidden-layer perceptron over flattened images."""

    def __init__(self, in_features: int = 784, hidden: int = 200, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):  # noqa: D102
        return self.net(x)


def cnn_s(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, norm: str = "none") -> CNN:
    """CNN-S: Conv(16,5)-ReLU-Pool-Conv(32,5)-ReLU-Pool-Linear(1568,10) on 28x28 inputs."""
    return CNN(in_channels, image_size, num_classes, (16, 32), None, norm)


def cnn_m(in_channels: int = 1, image_size: int = 28, num_classes: int = 10, norm: str = "none") -> CNN:
    """CNN-M (McMahan et al. 2017): Conv(32,5)-Pool-Conv(64,5)-Pool-Linear(3136,512)-Linear(512,10)."""
    return CNN(in_channels, image_size, num_classes, (32, 64), 512, norm)


MODELS = {"cnn-s": cnn_s, "cnn-m": cnn_m}


def build_classifier(name: str, in_channels: int, image_size: int, num_classes: int, norm: str = "none") -> nn.Module:
    """A reference classifier by name (``cnn-s``, ``cnn-m`` or ``mlp``)."""
    if name == "mlp":
        return MLP(in_channels * image_size * image_size, 200, num_classes)
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted([*MODELS, 'mlp'])}; got {name!r}")
    return MODELS[name](in_channels, image_size, num_classes, norm)
