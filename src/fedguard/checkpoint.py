"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A nested state (dicts and lists of tensors, numbers and strings) is split into a flat
``path -> tensor`` file and a JSON skeleton in which each tensor is replaced by its path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, dict):
        return {str(k): _split(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    return obj


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            return tensors[obj[_TENSOR]]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_state(folder: str | Path, state: dict[str, Any], name: str = "checkpoint") -> Path:
    """Write ``name.safetensors`` and ``name.json`` atomically into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    tmp_t, tmp_j = folder / f".{name}.safetensors.tmp", folder / f".{name}.json.tmp"
    save_file(tensors, str(tmp_t))
    tmp_j.write_text(json.dumps(skeleton, indent=1, allow_nan=True))
    os.replace(tmp_t, folder / f"{name}.safetensors")
    os.replace(tmp_j, folder / f"{name}.json")
    return folder / f"{name}.json"


def load_state(folder: str | Path, name: str = "checkpoint") -> dict[str, Any]:
    """Read what :func:`save_state` wrote."""
    folder = Path(folder)
    json_path, tensor_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not json_path.exists() or not tensor_path.exists():
        raise FileNotFoundError(
            f"no checkpoint {name!r} in {folder} (expected {json_path.name} and {tensor_path.name})"
        )
    return _join(json.loads(json_path.read_text()), load_file(str(tensor_path)))
