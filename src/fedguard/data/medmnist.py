"""MedMNIST 2D datasets from their official ``.npz`` files (no pickle: ``allow_pickle=False``).

Each file holds ``train_images``, ``train_labels``, ``val_images``, ``val_labels``,
``test_images`` and ``test_labels``. Images are uint8 (N, H, W) grey or (N, H, W, 3) RGB;
labels are (N, 1) for single-label tasks. Multi-label files (ChestMNIST) and 3D volumes are
refused with a clear error, since fedguard's tasks are single-label image classification.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedguard.data.arrays import ArrayDataset, from_uint8_images

SPLITS = ("train", "val", "test")
KEYS = tuple(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels"))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in KEYS if k not in npz.files]
            if missing:
                raise ValueError(
                    f"MedMNIST file {path}: missing arrays {missing} (found {sorted(npz.files)})"
                )
            return {k: npz[k] for k in KEYS}
    except FileNotFoundError:
        raise FileNotFoundError(f"MedMNIST file not found: {path}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise ValueError(f"MedMNIST file {path}: not a readable .npz file ({err})") from err
    except ValueError as err:
        if str(err).startswith("MedMNIST file"):
            raise
        raise ValueError(f"MedMNIST file {path}: unreadable array ({err})") from err


def _labels(labels: np.ndarray, source: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise ValueError(
            f"{source}: labels have shape {labels.shape}: this is a multi-label task "
            f"({labels.shape[1]} labels per image); fedguard supports single-label tasks only"
        )
    if labels.ndim not in (1, 2):
        raise ValueError(f"{source}: labels must be (N,) or (N, 1), got shape {labels.shape}")
    labels = labels.reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise ValueError(f"{source}: labels must be non-negative integers, got {labels.dtype}")
    return labels.astype(np.int64)


def _layout(images: np.ndarray, source: str) -> str:
    if images.ndim == 3:
        return "NHW"
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return "NHWC"
    raise ValueError(
        f"{source}: images have shape {images.shape}; expected 2D images (N, H, W) or "
        "(N, H, W, 3) (3D MedMNIST volumes are not supported)"
    )


def load_medmnist(path: str | Path, name: str | None = None) -> dict[str, ArrayDataset]:
    """All three official splits of a MedMNIST ``.npz`` file: ``{"train", "val", "test"}``.

    Images become float32 (N, 1 or 3, H, W) in [0, 1]; labels int64 (N,).
    """
    path = Path(path)
    name = name or path.stem
    arrays = _read_npz(path)
    out: dict[str, ArrayDataset] = {}
    for split in SPLITS:
        source = f"MedMNIST file {path} ({split} split)"
        images = arrays[f"{split}_images"]
        labels = _labels(arrays[f"{split}_labels"], source)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{source}: {images.shape[0]} images but {labels.shape[0]} labels")
        out[split] = from_uint8_images(images, labels, f"{name}-{split}", _layout(images, source))
    return out
