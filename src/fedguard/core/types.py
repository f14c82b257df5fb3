"""Parameter dicts and the helpers over them: the vocabulary every other contract speaks."""

from __future__ import annotations

from typing import Any

import torch

#: Model parameters or an update: name -> tensor, in ``model.named_parameters()`` order.
Params = dict[str, torch.Tensor]
#: JSON-serialisable metadata.
JSON = Any


def params_of(model: torch.nn.Module) -> Params:
    """A detached copy of the model's trainable parameters."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def zeros_like(params: Params) -> Params:
    """A dict of zero tensors with the shapes of ``params``."""
    return {k: torch.zeros_like(v) for k, v in params.items()}


def flatten(params: Params) -> torch.Tensor:
    """All tensors concatenated into one float vector (name order preserved)."""
    return torch.cat([v.reshape(-1) for v in params.values()]) if params else torch.zeros(0)


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten` for the shapes of ``like``."""
    out: Params = {}
    offset = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = vector[offset : offset + n].reshape(v.shape).to(v.dtype)
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values but the model needs {offset}")
    return out


def num_params(params: Params) -> int:
    """Total number of scalar values."""
    return sum(v.numel() for v in params.values())
