"""Where a client keeps its state between rounds (control variates, privacy spending, keys).

On a real device the state stays on the device; in the simulation each client's state is a
file of its own, so a client may run in any worker process without the server holding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedguard.core.state import StateStore, decode_state, encode_state

__all__ = ["DirectoryStateStore", "MemoryStateStore", "StateStore"]


class MemoryStateStore:
    """State kept in this process (a network client, or the serial simulation)."""

    def __init__(self) -> None:
        self._states: dict[int, bytes] = {}

    def load(self, client_id: int) -> dict[str, Any]:
        data = self._states.get(client_id)
        return decode_state(data) if data else {}

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        if state or client_id in self._states:
            self._states[client_id] = encode_state(state)


class DirectoryStateStore:
    """One file per client in a folder, shared by the simulation's worker processes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, client_id: int) -> Path:
        return self.folder / f"client-{client_id}.safetensors"

    def load(self, client_id: int) -> dict[str, Any]:
        path = self._path(client_id)
        return decode_state(path.read_bytes()) if path.exists() else {}

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        path = self._path(client_id)
        if not state and not path.exists():
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(encode_state(state))
        tmp.replace(path)
