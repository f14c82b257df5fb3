"""A user's own examples from one file of arrays ``x`` and ``y``: ``.npz`` (read without pickle) or ``.safetensors``.

Used for a network client's local data (``fedguard client --data``) and FLTrust's root dataset
(``robust.root_data``); each caller names its own setting in the error for another suffix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedguard.data.arrays import ArrayDataset

#: the file types :func:`load_examples` reads
EXAMPLE_FILE_SUFFIXES = (".npz", ".safetensors")


def load_examples(path: str | Path, name: str | None = None) -> ArrayDataset:
    """The examples of ``path``: ``x`` of shape (N, H, W), (N, C, H, W) or (N, features), ``y`` the labels;
    uint8 pixels are scaled to [0, 1] and (N, H, W) gains a channel axis. ``name`` defaults to the file's stem.
    Raises ValueError for a suffix not in :data:`EXAMPLE_FILE_SUFFIXES`."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            x, y = torch.from_numpy(arrays["x"].copy()), torch.from_numpy(arrays["y"].copy())
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        x, y = tensors["x"], tensors["y"]
    else:
        raise ValueError(f"{path}: use an .npz or .safetensors file with arrays x and y")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return ArrayDataset(x.unsqueeze(1) if x.dim() == 3 else x, y.long(), name or path.stem)
