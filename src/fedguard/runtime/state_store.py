"""Where a client keeps its state between rounds (control variates, privacy spending, keys).

On a real device the state stays on the device; in the simulation each client's state is a
file of its own, so a client may run in any worker process without the server holding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedguard.core.state import StateStore, decode_state, encode_state
from fedguard.durable import fsync_dir, write_private

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
    """One file per client in a folder, shared by the simulation's worker processes.

    A client's state can hold secrets (SecAgg key pairs and self-mask seeds, a CKKS secret
    key): the folder is made owner-only (0700) and each file is written 0600 and renamed into
    place. With ``durable`` (a device's own state folder) each file is fsynced first, so a
    crash leaves the old state or the new one; the simulation's throw-away folders skip it.
    """

    def __init__(self, folder: str | Path, durable: bool = False) -> None:
        self.durable = durable
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.folder.chmod(0o700)

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
        write_private(tmp, encode_state(state), sync=self.durable)
        tmp.replace(path)
        if self.durable:
            fsync_dir(self.folder)
