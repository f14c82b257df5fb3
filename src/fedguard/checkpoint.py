"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, committed atomically.

A nested state (dicts and lists of tensors, numbers and strings) is split into a flat
``path -> tensor`` file and a JSON skeleton in which each tensor is replaced by its path.

One commit is one rename. :func:`save_state` writes the tensors to a new file named after
their SHA-256 (``name-<hash>.safetensors``) and fsyncs it, then writes the skeleton with a
manifest entry (that file's name and hash) to a temporary file, fsyncs it, and renames it
over ``name.json`` (then fsyncs the folder). A crash at any moment leaves ``name.json``
naming either the old tensor file or the new one, both complete on disk, never a mix;
:func:`load_state` checks the hash, so a torn or swapped tensor file is refused, not loaded.
Tensor files no longer named by the manifest are removed after the commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedguard.durable import fsync_dir, write_durably

_TENSOR = "__tensor__"
#: key of the manifest entry in ``name.json`` (the state's own top-level keys stay where they are)
MANIFEST = "__checkpoint__"
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as written (missing, torn or mismatched files)."""


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
    """Commit ``state`` as ``name.json`` (manifest and skeleton) plus one tensor file, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if MANIFEST in state:
        raise ValueError(f"{MANIFEST!r} is reserved for the checkpoint's manifest")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors)
    blob = st_save(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    tensor_name = f"{name}-{digest[:16]}.safetensors"
    tmp_tensors = folder / f".{tensor_name}.tmp"
    write_durably(tmp_tensors, blob)
    os.replace(tmp_tensors, folder / tensor_name)  # same name, same bytes: replacing a live file is safe
    fsync_dir(folder)  # the tensor file is in place before any manifest can name it
    manifest = {MANIFEST: {"format": FORMAT, "tensors": tensor_name, "sha256": digest}, **skeleton}
    tmp = folder / f".{name}.json.tmp"
    write_durably(tmp, json.dumps(manifest, indent=1, allow_nan=True).encode())
    os.replace(tmp, folder / f"{name}.json")  # the commit
    fsync_dir(folder)
    _remove_unreferenced(folder, name, tensor_name)
    return folder / f"{name}.json"


def _remove_unreferenced(folder: Path, name: str, keep: str) -> None:
    stale = [p for p in folder.glob(f"{name}-*.safetensors") if p.name != keep]
    stale += list(folder.glob(f".{name}-*.safetensors.tmp"))
    legacy = folder / f"{name}.safetensors"
    for path in [*stale, *([legacy] if legacy.exists() else [])]:
        with contextlib.suppress(OSError):
            path.unlink()


def load_state(folder: str | Path, name: str = "checkpoint") -> dict[str, Any]:
    """Read what :func:`save_state` committed (or a checkpoint of the earlier two-file format)."""
    folder = Path(folder)
    json_path = folder / f"{name}.json"
    if not json_path.exists():
        raise FileNotFoundError(f"no checkpoint {name!r} in {folder} (expected {json_path.name})")
    try:
        skeleton = json.loads(json_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{json_path} is not valid JSON ({exc}); the checkpoint is damaged") from exc
    entry = skeleton.pop(MANIFEST, None)
    if entry is None:  # format 1: name.json beside name.safetensors, no manifest
        tensor_path = folder / f"{name}.safetensors"
        if not tensor_path.exists():
            raise FileNotFoundError(f"no checkpoint {name!r} in {folder} (expected {tensor_path.name})")
        return _join(skeleton, st_load(tensor_path.read_bytes()))
    tensor_path = folder / str(entry["tensors"])
    try:
        blob = tensor_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{json_path} names {tensor_path.name}, which cannot be read ({exc})") from exc
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{tensor_path.name} does not match the hash in {json_path.name}: torn or replaced")
    return _join(skeleton, st_load(blob))
