"""Long-term client identities for SecAgg+ against a malicious server: Ed25519 keys and their directory.

Bonawitz et al. (CCS 2017) make secure aggregation hold against an actively malicious server with
a PKI: each client signs its round keys with a long-term signing key, and every client knows the
others' verification keys from a source the server does not control. Here:

* :class:`IdentityDirectory` maps client ids to Ed25519 public keys (the PKI's registry: public,
  the same file on every party);
* :class:`IdentityKey` is one client's private signing key (``cryptography``'s Ed25519, generated
  from the OS CSPRNG), kept by that client only;
* :func:`write_identities` enrols clients into a folder (``directory.json`` plus
  ``client-K.ed25519`` per client, mode 0600), for deployments: copy ``directory.json`` to every
  party and each key file to its client only, then set ``secure.identities`` to the folder;
* :func:`enrol` does the same in memory for a simulation (the experiment acts as the enrolment
  authority; each client reads only its own key).

``python -m fedguard.secure.identity --out certs/identities --clients 10`` writes a folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["IdentityDirectory", "IdentityKey", "Enrolment", "enrol", "write_identities", "load_identities"]

PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64
_FORMAT = "fedguard_identities"


class IdentityError(ValueError):
    """A missing, malformed or unregistered identity."""


@dataclass(frozen=True)
class IdentityDirectory:
    """Client id -> Ed25519 public key (32 bytes): who may sign SecAgg keys for which id."""

    keys: Mapping[int, bytes]

    def __post_init__(self) -> None:
        for cid, key in self.keys.items():
            if not isinstance(cid, int) or len(key) != PUBLIC_BYTES:
                raise IdentityError(f"identity of client {cid!r} is not a 32-byte Ed25519 public key")

    def __contains__(self, client: int) -> bool:
        return client in self.keys

    def verify(self, client: int, payload: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is ``client``'s signature of ``payload`` (False for unknown clients)."""
        key = self.keys.get(client)
        if key is None or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(key).verify(signature, payload)
        except (InvalidSignature, ValueError):
            return False
        return True

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the canonical directory: parties compare it to know they share one PKI."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, "version": 1,
                           "clients": {str(c): k.hex() for c, k in sorted(self.keys.items())}}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IdentityDirectory:
        try:
            data = json.loads(text)
            if data.get("format") != _FORMAT or data.get("version") != 1:
                raise IdentityError("not a fedguard identity directory")
            return cls({int(c): bytes.fromhex(k) for c, k in data["clients"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IdentityError(f"malformed identity directory: {exc}") from exc


class IdentityKey:
    """One client's long-term Ed25519 signing key."""

    def __init__(self, private: bytes | None = None) -> None:
        """Load ``private`` (32 raw bytes) or generate a key from the OS CSPRNG."""
        try:
            key = Ed25519PrivateKey.generate() if private is None else Ed25519PrivateKey.from_private_bytes(private)
        except ValueError as exc:
            raise IdentityError(f"malformed Ed25519 private key: {exc}") from exc
        self._key = key

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)

    @property
    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes_raw()

    def private_bytes(self) -> bytes:
        """The raw private key: for the client's own key file only."""
        return self._key.private_bytes_raw()


@dataclass(frozen=True)
class Enrolment:
    """A directory and where each client finds its private key.

    ``folder`` (a deployment): ``client-K.ed25519`` files there; ``private`` (a simulation): the
    keys in memory, handed to each client app by the experiment that enrolled them.
    """

    directory: IdentityDirectory
    folder: Path | None = None
    private: Mapping[int, bytes] | None = None

    def key(self, client: int) -> IdentityKey:
        """Client ``client``'s signing key, read from its own file (or the simulation's memory)."""
        if self.private is not None:
            if client not in self.private:
                raise IdentityError(f"client {client} is not enrolled")
            return IdentityKey(self.private[client])
        assert self.folder is not None
        path = self.folder / f"client-{client}.ed25519"
        try:
            return IdentityKey(bytes.fromhex(path.read_text().strip()))
        except (OSError, ValueError) as exc:
            raise IdentityError(f"client {client}: cannot read its identity key {path} ({exc})") from exc


def enrol(clients: Iterable[int]) -> Enrolment:
    """Fresh identities for ``clients``, in memory (a simulation's enrolment)."""
    keys = {int(c): IdentityKey() for c in clients}
    directory = IdentityDirectory({c: k.public_bytes for c, k in keys.items()})
    return Enrolment(directory, private={c: k.private_bytes() for c, k in keys.items()})


def write_identities(folder: str | Path, clients: Iterable[int]) -> IdentityDirectory:
    """Enrol ``clients`` into ``folder``: ``directory.json`` and one ``client-K.ed25519`` each (0600)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    keys = {int(c): IdentityKey() for c in clients}
    for cid, key in keys.items():
        path = out / f"client-{cid}.ed25519"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key.private_bytes().hex() + "\n")
    directory = IdentityDirectory({c: k.public_bytes for c, k in keys.items()})
    (out / "directory.json").write_text(directory.to_json() + "\n")
    return directory


def load_identities(folder: str | Path) -> Enrolment:
    """The enrolment in ``folder`` (its ``directory.json``; key files are read by each client)."""
    path = Path(folder) / "directory.json"
    try:
        directory = IdentityDirectory.from_json(path.read_text())
    except OSError as exc:
        raise IdentityError(f"cannot read the identity directory {path}: {exc}") from exc
    return Enrolment(directory, folder=Path(folder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Enrol SecAgg client identities (Ed25519) into a folder.")
    parser.add_argument("--out", required=True, help="folder for directory.json and client-K.ed25519")
    parser.add_argument("--clients", type=int, required=True, help="number of clients (ids 0..N-1)")
    args = parser.parse_args(argv)
    directory = write_identities(args.out, range(args.clients))
    print(f"wrote {args.out}/directory.json ({len(directory.keys)} clients, fingerprint {directory.fingerprint[:16]}) "
          "and one private key file per client: give each client only its own")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
