"""In-memory datasets: the one data type the engine trains on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class ArrayDataset:
    """Examples held as two tensors: inputs ``x`` (N, ...) float32 and labels ``y`` (N,) int64.

    Image inputs are (N, C, H, W) scaled to [0, 1]. Holding data as tensors lets a client
    slice batches without a DataLoader and lets worker processes share it copy-on-write.
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str = "data"

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"dataset {self.name!r}: {self.x.shape[0]} inputs but {self.y.shape[0]} labels; "
                "every input needs exactly one label"
            )
        if not torch.is_floating_point(self.x):
            raise ValueError(
                f"dataset {self.name!r}: inputs must be floating point, got {self.x.dtype}"
            )
        if not bool(torch.isfinite(self.x).all()):
            raise ValueError(f"dataset {self.name!r}: inputs contain NaN or infinite values")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(
        self, indices: np.ndarray | torch.Tensor | list[int], name: str | None = None
    ) -> ArrayDataset:
        """The examples at ``indices``, in that order."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        part = object.__new__(ArrayDataset)  # already validated as a whole: skip the checks
        part.x, part.y, part.name = self.x[idx], self.y[idx], name or self.name
        return part

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same examples on ``device`` (this very dataset when they are there already)."""
        device = torch.device(device)
        if self.x.device == device and self.y.device == device:
            return self
        moved = object.__new__(ArrayDataset)
        moved.x, moved.y, moved.name = self.x.to(device), self.y.to(device), self.name
        return moved

    @property
    def labels(self) -> np.ndarray:
        """Labels as a numpy array (what partitioners work on)."""
        return self.y.numpy()

    @property
    def num_classes(self) -> int:
        return int(self.y.max().item()) + 1 if len(self) else 0

    @classmethod
    def from_torch(cls, dataset: Dataset, name: str = "user") -> ArrayDataset:
        """Materialise any map-style ``torch.utils.data.Dataset`` of (input, label) pairs."""
        xs, ys = [], []
        for i in range(len(dataset)):  # type: ignore[arg-type]
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(
                    f"dataset {name!r}: item {i} is {type(item).__name__}; fedguard expects "
                    "(input, label) pairs"
                )
            xs.append(torch.as_tensor(item[0], dtype=torch.float32))
            ys.append(int(item[1]))
        if not xs:
            raise ValueError(f"dataset {name!r} is empty")
        return cls(torch.stack(xs), torch.tensor(ys, dtype=torch.long), name)


_LAYOUTS = ("NHW", "NHWC", "NCHW")


@dataclass
class PixelArrays:
    """A training set kept as uint8 pixels (in memory or on disk) and int64 labels.

    Only the examples taken with :meth:`subset` become float32, bit for bit as
    :func:`from_uint8_images` makes the whole set: a process that needs a few examples (a
    network client's partition) need not convert, or even read, all of them.
    """

    labels: np.ndarray
    #: the uint8 images at the given indices, in that order, laid out as ``layout`` says
    rows: Callable[[np.ndarray], np.ndarray]
    name: str
    layout: str = "NHW"

    @classmethod
    def in_memory(cls, images: np.ndarray, labels: np.ndarray, name: str, layout: str = "NHW") -> PixelArrays:
        """Pixels already in memory (uint8, laid out as ``layout``)."""
        return cls(np.asarray(labels).astype(np.int64), lambda idx: images[idx], name, layout)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray | list[int], name: str | None = None) -> ArrayDataset:
        """The examples at ``indices``, in that order, as float32 in [0, 1]."""
        idx = np.asarray(indices, dtype=np.int64)
        return from_uint8_images(self.rows(idx), self.labels[idx], name or self.name, self.layout)


def from_uint8_images(
    images: np.ndarray, labels: np.ndarray, name: str, layout: str = "NHW"
) -> ArrayDataset:
    """An :class:`ArrayDataset` from uint8 pixels (0..255) and integer labels.

    ``layout`` names the axes of ``images``: ``"NHW"`` (grey), ``"NHWC"`` (channels last)
    or ``"NCHW"``. Inputs become float32 (N, C, H, W) in [0, 1]; labels become int64 (N,).
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if images.dtype != np.uint8:
        raise ValueError(f"dataset {name!r}: expected uint8 pixels, got {images.dtype}")
    if images.ndim != len(layout):
        raise ValueError(
            f"dataset {name!r}: layout {layout} needs {len(layout)}-d images, "
            f"got shape {images.shape}"
        )
    if layout == "NHW":
        images = images[:, None, :, :]
    elif layout == "NHWC":
        images = images.transpose(0, 3, 1, 2)
    pixels = np.ascontiguousarray(images, dtype=np.float32)
    pixels /= 255.0
    x = torch.from_numpy(pixels)
    y = torch.from_numpy(np.asarray(labels).astype(np.int64, copy=True))
    return ArrayDataset(x, y, name)
