"""Client authentication: per-client secret keys, request MACs, replay protection, revocation.

Each client holds a 32-byte secret key in a key file (``client-K.key``, JSON with its id);
the server holds the same keys in a registry (``clients.json``) where a client can be marked
revoked. Keys never travel: every request carries an HMAC-SHA256 made with the key over
its fields, so an unknown client, a revoked one, a forged or a replayed request is refused.
The registry is re-read when its file changes, so revoking needs no server restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fedguard.durable import write_private

KEY_BYTES = 32
#: how far a Hello's clock may be from the server's
MAX_CLOCK_SKEW_S = 300.0


class AuthError(Exception):
    """A request refused for who sent it; ``code`` is 'unknown', 'revoked' or 'invalid'."""

    def __init__(self, reason: str, code: str = "invalid") -> None:
        super().__init__(reason)
        self.code = code


def new_key() -> bytes:
    """A fresh random client key."""
    return os.urandom(KEY_BYTES)


def canonical(*parts: bytes | str | int) -> bytes:
    """Length-prefixed concatenation: distinct field tuples never give the same bytes."""
    out = bytearray()
    for part in parts:
        if isinstance(part, int):
            raw = part.to_bytes(16, "little", signed=True)
        elif isinstance(part, str):
            raw = part.encode()
        else:
            raw = bytes(part)
        out += len(raw).to_bytes(8, "little") + raw
    return bytes(out)


def sign(key: bytes, label: str, *parts: bytes | str | int) -> bytes:
    """HMAC-SHA256 of a labelled field tuple."""
    return hmac.new(key, canonical(label, *parts), hashlib.sha256).digest()


def verify(key: bytes, tag: bytes, label: str, *parts: bytes | str | int) -> bool:
    """Constant-time check of :func:`sign`."""
    return hmac.compare_digest(sign(key, label, *parts), bytes(tag))


def write_key_file(path: str | Path, client_id: int, key: bytes) -> None:
    """Write a client's key file, readable by its owner only."""
    path = Path(path)
    text = json.dumps({"fedguard_client_key": 1, "client_id": client_id, "key": key.hex()})
    write_private(path, (text + "\n").encode())


def read_key_file(path: str | Path) -> tuple[int, bytes]:
    """(client id, key) from a key file made by ``fedguard certs``."""
    try:
        data = json.loads(Path(path).read_text())
        key = bytes.fromhex(data["key"])
        cid = int(data["client_id"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuthError(f"cannot read client key file {path}: {exc}") from exc
    if len(key) != KEY_BYTES:
        raise AuthError(f"client key file {path}: key must be {KEY_BYTES} bytes")
    return cid, key


@dataclass
class ClientRecord:
    """One registered client."""

    key: bytes
    revoked: bool = False


def load_registry(path: str | Path) -> dict[int, ClientRecord]:
    """Client id -> record from a registry file."""
    data = json.loads(Path(path).read_text())
    if data.get("fedguard_registry") != 1:
        raise ValueError(f"{path} is not a fedguard client registry (make one with `fedguard certs`)")
    records = {}
    for cid, entry in data["clients"].items():
        key = bytes.fromhex(entry["key"])
        if len(key) != KEY_BYTES:
            raise ValueError(f"{path}: client {cid} has a key of {len(key)} bytes, expected {KEY_BYTES}")
        records[int(cid)] = ClientRecord(key, bool(entry.get("revoked", False)))
    return records


def save_registry(path: str | Path, records: dict[int, ClientRecord]) -> None:
    """Write a registry atomically, readable by its owner only."""
    path = Path(path)
    body = {
        "fedguard_registry": 1,
        "clients": {str(c): {"key": r.key.hex(), "revoked": r.revoked} for c, r in sorted(records.items())},
    }
    tmp = path.with_suffix(".tmp")
    write_private(tmp, (json.dumps(body, indent=1) + "\n").encode())
    tmp.replace(path)


class Registry:
    """The server's view of the registry file, reloaded whenever the file changes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[int, ClientRecord] = {}
        self._reload()

    def _reload(self) -> None:
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._records = load_registry(self.path)
            self._stamp = stamp

    def key(self, client_id: int) -> bytes:
        """The key of an active client; unknown or revoked clients raise :class:`AuthError`."""
        with self._lock:
            with contextlib.suppress(OSError, ValueError):  # a half-written file: keep the last good one
                self._reload()
            record = self._records.get(client_id)
        if record is None:
            raise AuthError(f"unknown client id {client_id} (not in {self.path.name})", "unknown")
        if record.revoked:
            raise AuthError(f"client {client_id} is revoked", "revoked")
        return record.key

    def ids(self) -> list[int]:
        """Every registered client id (revoked ones included)."""
        with self._lock:
            return sorted(self._records)


class NonceCache:
    """Remembers recent nonces so that a replayed request is refused."""

    def __init__(self, window_s: float = 2 * MAX_CLOCK_SKEW_S, capacity: int = 100_000) -> None:
        self.window_s, self.capacity = window_s, capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def fresh(self, nonce: bytes) -> bool:
        """True the first time ``nonce`` is seen within the window, False on a replay."""
        now = time.monotonic()
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) < now - self.window_s or self._full()):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True

    def _full(self) -> bool:
        return len(self._seen) > self.capacity
