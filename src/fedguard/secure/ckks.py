"""Additively homomorphic aggregation of float vectors with CKKS (TenSEAL / Microsoft SEAL).

Roles: a *key holder* (:class:`CKKSKeyHolder`) makes a CKKS context with a secret key and hands
out :meth:`CKKSKeyHolder.public_context_bytes` (public key only, no secret, Galois or relin
keys). Clients encrypt with :class:`CKKSEncryptor` (or :func:`encrypt_vector`), the server adds
ciphertexts with :meth:`CKKSEncryptor.aggregate` (or :func:`add_encrypted`) and cannot decrypt;
only the key holder decrypts the sum.

Packing: each ciphertext has ``N/2`` slots; ``N/2 - 1`` carry vector values and the slot after
the values carries a check value of 1.0 per client, so after a sum of ``n`` ciphertexts it
decrypts to ``n``. Decryption verifies it: decrypting with the wrong secret key, or a ciphertext
whose coefficients were altered, yields values far from ``n`` and raises :class:`CKKSError`.
Unparseable bytes raise :class:`CKKSError` too. :class:`EncryptedVector` (the wire message)
also carries the key fingerprint (SHA-256 of the public context) and a SHA-256 digest of its
ciphertexts, so a wrong key or any changed byte is reported precisely. A digest only catches
corruption, not an attacker, who can recompute it; CKKS ciphertexts are malleable by design, so
integrity against an active attacker needs authenticated transport (signatures / TLS).

Default parameters (sum-only workload, no multiplicative depth): ``N = 8192``,
``coeff_mod_bit_sizes = (60, 60)``, scale ``2^40``: one 60-bit data prime (20 bits of headroom
above the scale, so |sum| < 2^19) plus the special prime; 128-bit security per the HE standard
(120 <= 218 bits); 4,095 values and 131 kB per ciphertext (32 bytes per value, 8x float32).
Measured on the 2-core dev CPU (shared, so +-20%), 10 clients, values uniform in [-1, 1]:

  parameters               values  enc/client  sum of 10  decrypt  bytes/value  max abs err
  8192, (60, 60), 2^40     1.66M   2.1 s       1.4 s      0.4 s    32 (53 MB)   4e-8
  8192, (60, 40, 60), 2^40 1.66M   2.8 s       4.6 s      0.9 s    58 (96 MB)   4e-8
  4096, (60, 49), 2^40     100k    0.16 s      0.11 s     0.03 s   32           2e-8
  4096, (40, 20, 40), 2^20 100k    0.28 s      0.41 s     0.09 s   40           2e-2 (fails)

The requirement (max abs error < 1e-4 for a sum of 10 updates of magnitude ~1) holds with a
margin of 1000x at the default.

Threshold / multi-party CKKS (secret key shared among parties, decryption by a quorum) is NOT
supported: TenSEAL has no multiparty CKKS. OpenFHE has it, but its wheel does not import on
Python 3.11 here. The single key holder must therefore be trusted not to decrypt individual
client ciphertexts (or be a separate party that never sees them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from .wire import WireMessage

__all__ = [
    "CKKSError",
    "CKKSContextConfig",
    "CKKSKeyHolder",
    "CKKSEncryptor",
    "EncryptedVector",
    "create_secret_context",
    "public_context_bytes",
    "load_public_context",
    "context_fingerprint",
    "num_ciphertexts",
    "context_slots",
    "encrypt_vector",
    "add_encrypted",
    "decrypt_vector",
]

CHECK_VALUE = 1.0
#: The check slot of a sum of ``n`` must decrypt within ``n * 2^CHECK_SLACK_BITS / scale`` of
#: ``n``. Measured CKKS error is about ``2^13.5 * sqrt(n) / scale`` at worst over 100k slots, so
#: this is >= 6x that; garbage from a wrong key is ~1e6 or more.
CHECK_SLACK_BITS = 16
#: the largest client count a sum may claim when the caller does not say how many it expects
MAX_UNCHECKED_CLIENTS = 2**16


class CKKSError(RuntimeError):
    """Wrong key, tampered or malformed ciphertexts, or a size mismatch."""


@dataclass(frozen=True)
class CKKSContextConfig:
    """CKKS parameters.

    Attributes:
        poly_modulus_degree: ring degree ``N`` (``N/2`` slots per ciphertext).
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes (last = special prime).
        global_scale_bits: encoding scale ``2^global_scale_bits``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    global_scale_bits: int = 40

    @property
    def slots(self) -> int:
        """Slots per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Vector values per ciphertext (one slot is the check slot)."""
        return self.slots - 1


def create_secret_context(config: CKKSContextConfig | None = None) -> ts.Context:
    """A fresh CKKS context holding a secret key (key holder only)."""
    cfg = config or CKKSContextConfig()
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=cfg.poly_modulus_degree,
            coeff_mod_bit_sizes=list(cfg.coeff_mod_bit_sizes),
        )
    except ValueError as exc:
        raise CKKSError(f"invalid CKKS parameters {cfg}: {exc}") from exc
    ctx.global_scale = 2.0**cfg.global_scale_bits
    return ctx


def public_context_bytes(ctx: ts.Context) -> bytes:
    """Serialize ``ctx`` with its public key only (no secret, Galois or relinearization keys)."""
    return ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def load_public_context(data: bytes) -> ts.Context:
    """Load a serialized context; :class:`CKKSError` if it is malformed."""
    try:
        return ts.context_from(data)
    except Exception as exc:  # TenSEAL raises ValueError / RuntimeError variants
        raise CKKSError(f"cannot load CKKS context: {exc}") from exc


def context_fingerprint(public_bytes: bytes) -> str:
    """Hex SHA-256 of a public context serialization: identifies the key pair."""
    return hashlib.sha256(public_bytes).hexdigest()


def context_slots(ctx: ts.Context) -> int:
    """Slots per ciphertext (``N/2``) of a TenSEAL context."""
    parms = ctx.seal_context().data.first_context_data().parms()
    return int(parms.poly_modulus_degree()) // 2


def num_ciphertexts(length: int, slots: int) -> int:
    """Ciphertexts needed for ``length`` values at ``slots`` slots each (one is the check slot)."""
    per = slots - 1
    return max(1, -(-length // per))


def encrypt_vector(ctx: ts.Context, vec: np.ndarray) -> list[bytes]:
    """Encrypt a float vector of any length into serialized ciphertexts holding ``N/2 - 1``
    values plus a check slot each."""
    per = context_slots(ctx) - 1
    flat = np.asarray(vec, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise CKKSError("cannot encrypt NaN or infinite values")
    out = []
    for start in range(0, max(flat.size, 1), per):
        chunk = np.append(flat[start : start + per], CHECK_VALUE)
        out.append(ts.ckks_vector(ctx, chunk).serialize())
    return out


def _load(ctx: ts.Context, data: bytes, where: str) -> ts.CKKSVector:
    """Deserialize one ciphertext, mapping TenSEAL/SEAL errors to :class:`CKKSError`."""
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception as exc:
        raise CKKSError(f"{where}: malformed or tampered ciphertext ({exc})") from exc


def add_encrypted(
    ctx: ts.Context, client_cts: Sequence[Sequence[bytes]], expected_count: int | None = None
) -> list[bytes]:
    """Sum clients' ciphertext lists slot-wise (in place, no ``.copy()``); needs the public ctx.

    All lists must have the same number of ciphertexts (``expected_count`` if given).
    """
    if not client_cts:
        raise CKKSError("nothing to aggregate")
    count = len(client_cts[0]) if expected_count is None else expected_count
    for i, cts in enumerate(client_cts):
        if len(cts) != count:
            raise CKKSError(f"client {i} sent {len(cts)} ciphertexts, expected {count}")
    acc = [_load(ctx, b, f"client 0, ciphertext {j}") for j, b in enumerate(client_cts[0])]
    for i, cts in enumerate(client_cts[1:], start=1):
        for j, b in enumerate(cts):
            try:
                acc[j].add_(_load(ctx, b, f"client {i}, ciphertext {j}"))
            except CKKSError:
                raise
            except Exception as exc:
                raise CKKSError(f"client {i}, ciphertext {j}: cannot add ({exc})") from exc
    return [v.serialize() for v in acc]


def decrypt_vector(
    secret_ctx: ts.Context,
    cts: Sequence[bytes],
    length: int,
    num_clients: int | None = None,
) -> np.ndarray:
    """Decrypt ``length`` values and verify each check slot equals ``num_clients``.

    Without ``num_clients`` the check slots must all equal one positive integer. A wrong secret
    key, tampered coefficients or a missing secret key raise :class:`CKKSError`.
    """
    if not secret_ctx.is_private():
        raise CKKSError("this context has no secret key: only the key holder can decrypt")
    slots = context_slots(secret_ctx)
    per = slots - 1
    if len(cts) != num_ciphertexts(length, slots):
        raise CKKSError(f"{len(cts)} ciphertexts for {length} values, expected {num_ciphertexts(length, slots)}")
    out = np.empty(length, dtype=np.float64)
    checks = []
    for j, data in enumerate(cts):
        n_vals = min(per, length - j * per)
        try:
            plain = np.asarray(_load(secret_ctx, data, f"ciphertext {j}").decrypt(), np.float64)
        except CKKSError:
            raise
        except Exception as exc:
            raise CKKSError(f"ciphertext {j}: cannot decrypt ({exc})") from exc
        if plain.size != n_vals + 1:
            raise CKKSError(f"ciphertext {j} holds {plain.size - 1} values, expected {n_vals}")
        out[j * per : j * per + n_vals] = plain[:n_vals]
        checks.append(plain[n_vals])
    _verify_checks(np.array(checks), num_clients, secret_ctx.global_scale)
    return out


def _verify_checks(checks: np.ndarray, num_clients: int | None, scale: float) -> None:
    """The check slots must all decrypt to the number of summed clients.

    With the count unknown, the first check slot gives it, and it must be a plausible count
    (1..MAX_UNCHECKED_CLIENTS): garbage from a wrong key is ~1e7 and would otherwise bring a
    tolerance wide enough to pass a single ciphertext.
    """
    expected = float(num_clients) if num_clients is not None else float(np.round(checks[0]))
    tolerance = max(expected, 1.0) * 2.0**CHECK_SLACK_BITS / scale
    implausible = num_clients is None and expected > MAX_UNCHECKED_CLIENTS
    bad = ~(np.abs(checks - expected) < tolerance) | (expected < 1) | implausible
    if np.any(bad):
        j = int(np.argmax(bad))
        raise CKKSError(
            f"check slot of ciphertext {j} decrypted to {checks[j]:.6g}, expected "
            f"{expected:g}: wrong secret key or tampered ciphertext"
        )


@dataclass(eq=False)
class EncryptedVector(WireMessage):
    """Wire message: an encrypted vector (one client's, or a sum of ``num_clients``).

    Attributes:
        length: number of plaintext values.
        num_clients: how many client vectors are summed in it (1 for a client's own).
        key_fingerprint: :func:`context_fingerprint` of the public context used.
        digest: hex SHA-256 over the ciphertexts (corruption check, not authentication).
        ciphertexts: serialized TenSEAL CKKS vectors.
    """

    length: int
    num_clients: int
    key_fingerprint: str
    digest: str
    ciphertexts: list[bytes]

    @staticmethod
    def compute_digest(ciphertexts: Sequence[bytes]) -> str:
        """SHA-256 over the length-prefixed ciphertexts."""
        h = hashlib.sha256()
        for c in ciphertexts:
            h.update(len(c).to_bytes(8, "big"))
            h.update(c)
        return h.hexdigest()

    def verify(self, fingerprint: str, length: int | None = None) -> None:
        """Check key fingerprint, digest and (optionally) the plaintext length."""
        if self.key_fingerprint != fingerprint:
            raise CKKSError(f"encrypted under key {self.key_fingerprint[:12]}, expected {fingerprint[:12]}")
        if length is not None and self.length != length:
            raise CKKSError(f"vector has {self.length} values, expected {length}")
        if self.compute_digest(self.ciphertexts) != self.digest:
            raise CKKSError("ciphertext digest mismatch: bytes were altered")


class CKKSEncryptor:
    """Public-key side (clients and server): encrypt and add, never decrypt."""

    def __init__(self, public_context: bytes) -> None:
        """Load the key holder's public context (its parameters travel with it)."""
        self.context = load_public_context(public_context)
        self.fingerprint = context_fingerprint(public_context)

    def encrypt(self, vec: np.ndarray) -> EncryptedVector:
        """Encrypt a float vector (one client's contribution)."""
        flat = np.asarray(vec, dtype=np.float64).ravel()
        cts = encrypt_vector(self.context, flat)
        return EncryptedVector(flat.size, 1, self.fingerprint, EncryptedVector.compute_digest(cts), cts)

    def aggregate(self, vectors: Sequence[EncryptedVector], length: int | None = None) -> EncryptedVector:
        """Sum encrypted vectors; each is checked for key, digest, length and ciphertext count."""
        if not vectors:
            raise CKKSError("nothing to aggregate")
        n_len = vectors[0].length if length is None else length
        for v in vectors:
            v.verify(self.fingerprint, n_len)
        count = num_ciphertexts(n_len, context_slots(self.context))
        cts = add_encrypted(self.context, [v.ciphertexts for v in vectors], count)
        return EncryptedVector(
            n_len,
            sum(v.num_clients for v in vectors),
            self.fingerprint,
            EncryptedVector.compute_digest(cts),
            cts,
        )


class CKKSKeyHolder:
    """Holds the secret key: publishes the public context and decrypts aggregates."""

    def __init__(self, config: CKKSContextConfig | None = None) -> None:
        """Generate a fresh key pair with ``config`` (default: N=8192, (60, 60), 2^40)."""
        self.config = config or CKKSContextConfig()
        self._ctx = create_secret_context(self.config)
        self._public = public_context_bytes(self._ctx)
        self.fingerprint = context_fingerprint(self._public)

    def public_context_bytes(self) -> bytes:
        """The context without its secret key, for the server and the clients."""
        return self._public

    def secret_context_bytes(self) -> bytes:
        """The full context with its secret key: for the key holder's own storage only."""
        return self._ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )

    @classmethod
    def from_secret_bytes(cls, data: bytes, config: CKKSContextConfig | None = None) -> CKKSKeyHolder:
        """Reload a key holder saved with :meth:`secret_context_bytes` (same keys, same fingerprint)."""
        ctx = load_public_context(data)
        if not ctx.is_private():
            raise CKKSError("this context has no secret key: it cannot make a key holder")
        holder = cls.__new__(cls)
        holder.config = config or CKKSContextConfig()
        holder._ctx = ctx
        holder._public = public_context_bytes(ctx)
        holder.fingerprint = context_fingerprint(holder._public)
        return holder

    def encryptor(self) -> CKKSEncryptor:
        """A public-key encryptor bound to this key pair."""
        return CKKSEncryptor(self._public)

    def decrypt(self, enc: EncryptedVector, num_clients: int | None = None) -> np.ndarray:
        """Decrypt an (aggregated) vector after checking fingerprint, digest and check slots."""
        enc.verify(self.fingerprint)
        expected = enc.num_clients if num_clients is None else num_clients
        return decrypt_vector(self._ctx, enc.ciphertexts, enc.length, expected)
