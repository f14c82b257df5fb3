"""A client's persistent state between rounds (control variates, privacy spending, keys).

The state is a flat dict of tensors and JSON values. It stays with the client: in memory or
a folder of its own on a real device, one file per client in the simulation (so any worker
process may serve any client); the server never holds it. It is saved with the message codec
(safetensors plus a JSON header), never with pickle.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from fedguard.core.messages import Message


class StateStore(Protocol):
    """Loads and saves one client's state."""

    def load(self, client_id: int) -> dict[str, Any]: ...

    def save(self, client_id: int, state: dict[str, Any]) -> None: ...


def encode_state(state: dict[str, Any]) -> bytes:
    """Client state (tensors and JSON values) to bytes, via the message codec."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    return Message("state", 0, 0, meta, tensors).to_bytes()


def decode_state(data: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_state`."""
    msg = Message.from_bytes(data)
    return {**msg.meta, **msg.tensors}
