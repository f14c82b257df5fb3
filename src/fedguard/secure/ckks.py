"""Additively homomorphic aggregation of float vectors with CKKS (TenSEAL / Microsoft SEAL), without key recovery.

Roles: a *key holder* (:class:`CKKSKeyHolder`) makes a CKKS context with a secret key and hands
out :meth:`CKKSKeyHolder.public_context_bytes` (public key only, no secret, Galois or relin
keys). Clients encrypt with :class:`CKKSEncryptor` (or :func:`encrypt_vector`), the server adds
ciphertexts with :meth:`CKKSEncryptor.aggregate` (or :func:`add_encrypted`) and cannot decrypt;
only the key holder decrypts the sum, and it never releases a raw decryption.

**Decryption without key recovery.** A CKKS decryption released at full precision lets whoever
holds the ciphertext solve for the secret key (Li and Micciancio, EUROCRYPT 2021;
:mod:`fedguard.secure.ckks_attack` does it). :meth:`CKKSKeyHolder.release` therefore floods:
it adds Gaussian noise of standard deviation ``sigma = sqrt(12 tau) 2^(s/2) B`` (coefficient
units) to what it releases, as OpenFHE's ``NOISE_FLOODING_DECRYPT`` does, following Li,
Micciancio, Schultz and Sorrell (CRYPTO 2022): ``s`` is the statistical security parameter
(default 40: any adversary, whatever its running time, succeeds with probability at most
``2^-40``), ``tau`` the number of ciphertexts decrypted under the key (the key holder refuses
more), ``B`` a bound on the ciphertext's decryption error (:class:`NoiseFlooding`). Added to the
real parts of the ``N/2`` slots, noise of standard deviation ``sigma * sqrt(N/2) / scale`` per
value is exactly the image of coefficient-domain flooding on what the key holder releases (the
real parts are the conjugation-symmetric half of the plaintext polynomial). The noise comes from
the OS CSPRNG (``os.urandom``), and released values are rounded to a grid far below ``sigma``
and far above float64 resolution, so no low-order bits of a floating-point sample leak.

``B`` is the bound for an honest sum of ``n`` fresh encryptions (SEAL's public-key encryption
leaves the rounding error of dropping the special prime, coefficient variance ``(2N/3 + 2) / 12``;
``B = 8 sqrt(n)`` standard deviations), or, where larger, the same number of deviations estimated
from the imaginary parts of the decrypted slots (pure error, since every encoded value is real;
OpenFHE estimates noise the same way): a client that inflates the error of its ciphertext only
makes the flooding larger.

Packing: each ciphertext has ``N/2`` slots: ``N/2 - 1`` vector values (zero padded) and, in the
last slot, a check value of 1.0 per client, so after a sum of ``n`` ciphertexts it decrypts to
``n``. Decryption verifies it: a wrong secret key, or altered coefficients, yield values far from
``n`` and raise :class:`CKKSError`. :class:`EncryptedVector` (the wire message) also carries the
key fingerprint (SHA-256 of the public context) and a SHA-256 digest of its ciphertexts.

**Detecting a forged aggregate.** The key holder could return any plaintext as "the aggregate".
:func:`projection_check` lets the server compute, homomorphically and with fresh secret
randomness the key holder never sees, ``c = sum_j r_j * ct_j + Enc(rho)`` (``r_j`` a uniform
vector per ciphertext scaled by ``2^-16``, ``rho`` a uniform offset); the key holder decrypts it
like the rest and :func:`verify_projection` checks ``c = sum_j r_j * values_j + rho`` within the
flooding noise. A key holder that changes the aggregate must change ``c`` by
``sum_j r_j * delta_j`` without knowing ``r``; scaling everything fails on ``rho``. The
multiplication by ``r_j`` doubles the scale, so the check needs a second data prime: the default
primes are ``(60, 60, 60)``.

Default parameters: ``N = 8192``, primes ``(60, 60, 60)`` (two data primes and the special
prime; 180 <= 218 bits, 128-bit security per the HE standard), scale ``2^56``, 4,095 values and
262 kB per ciphertext (64 bytes per value, 16x float32).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from .wire import WireMessage

__all__ = [
    "CKKSError",
    "CKKSContextConfig",
    "CKKSKeyHolder",
    "CKKSEncryptor",
    "EncryptedVector",
    "NoiseFlooding",
    "Release",
    "create_secret_context",
    "public_context_bytes",
    "load_public_context",
    "context_fingerprint",
    "num_ciphertexts",
    "context_slots",
    "encrypt_vector",
    "add_encrypted",
    "decrypt_vector",
    "projection_check",
    "verify_projection",
    "secure_normal",
]

CHECK_VALUE = 1.0
#: The check slot of a sum of ``n`` must decrypt within ``n * 2^CHECK_SLACK_BITS / scale`` of
#: ``n`` (raw, before flooding); garbage from a wrong key is ~1e6 or more.
CHECK_SLACK_BITS = 16
#: the largest client count a sum may claim when the caller does not say how many it expects
MAX_UNCHECKED_CLIENTS = 2**16
#: the projection's random factors lie in ``[-2^-PROJECTION_BITS, 2^-PROJECTION_BITS]``
PROJECTION_BITS = 16


class CKKSError(RuntimeError):
    """Wrong key, tampered or malformed ciphertexts, a size mismatch, or a refused decryption."""


@dataclass(frozen=True)
class CKKSContextConfig:
    """CKKS parameters.

    Attributes:
        poly_modulus_degree: ring degree ``N`` (``N/2`` slots per ciphertext).
        coeff_mod_bit_sizes: bit sizes of the coefficient-modulus primes (last = special prime).
        global_scale_bits: encoding scale ``2^global_scale_bits``.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60, 60)
    global_scale_bits: int = 56

    @property
    def slots(self) -> int:
        """Slots per ciphertext."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Vector values per ciphertext (one slot is the check slot)."""
        return self.slots - 1

    @property
    def data_bits(self) -> int:
        """Bits of the data modulus (every prime but the special one)."""
        return sum(self.coeff_mod_bit_sizes[:-1])


@dataclass(frozen=True)
class NoiseFlooding:
    """How much noise the key holder adds to what it releases (Li, Micciancio, Schultz, Sorrell 2022).

    Attributes:
        statistical_security: ``s``; the attacker's advantage is at most ``2^-s``.
        tail: ``B`` is this many standard deviations of an honest sum's decryption error.
        grid_bits: released values are rounded to multiples of ``2^-grid_bits * sigma`` (a power of two).
    """

    statistical_security: int = 40
    tail: float = 8.0
    grid_bits: int = 8

    @staticmethod
    def fresh_sigma(degree: int) -> float:
        """Standard deviation of a fresh SEAL encryption's error, per coefficient.

        Public-key encryption works modulo the data primes times the special prime ``p`` and then
        divides by ``p`` with rounding: what remains is ``r0 + r1 * s`` (``r`` uniform in
        ``[-1/2, 1/2]``, ``s`` ternary), variance ``(1 + 2N/3) / 12``, plus the encoding's rounding
        (``1/12``). Measured in ``tests/test_ckks.py``.
        """
        return math.sqrt((2 * degree / 3 + 2) / 12)

    def error_bound(self, degree: int, clients: int) -> float:
        """``B`` for an honest sum of ``clients`` fresh encryptions (coefficient units)."""
        return self.tail * math.sqrt(max(clients, 1)) * self.fresh_sigma(degree)

    def sigma(self, bound: float, queries: int) -> float:
        """Flooding standard deviation in coefficient units: ``sqrt(12 tau) 2^(s/2) B``."""
        return math.sqrt(12 * max(queries, 1)) * 2.0 ** (self.statistical_security / 2) * bound

    def value_sigma(self, degree: int, bound: float, queries: int, scale: float) -> float:
        """The same noise seen on each released slot value (real part)."""
        return self.sigma(bound, queries) * math.sqrt(degree / 2) / scale

    def grid(self, value_sigma: float) -> float:
        """The rounding step of released values: a power of two ``2^grid_bits`` below ``value_sigma``."""
        return 2.0 ** (math.floor(math.log2(value_sigma)) - self.grid_bits)


def secure_normal(size: int, sigma: float) -> np.ndarray:
    """``size`` samples of N(0, sigma^2) from the OS CSPRNG (Box-Muller on 53-bit uniforms from ``os.urandom``)."""
    half = (size + 1) // 2
    raw = np.frombuffer(os.urandom(16 * half), dtype=np.uint64)
    u = ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1)
    radius = np.sqrt(-2.0 * np.log(u[:half]))
    angle = 2.0 * np.pi * u[half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size] * sigma


def _secure_uniform(shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
    """Uniform floats in ``[low, high)`` from the OS CSPRNG."""
    count = int(np.prod(shape))
    raw = np.frombuffer(os.urandom(8 * count), dtype=np.uint64)
    u = (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return (low + (high - low) * u).reshape(shape)


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


def _data_primes(ctx: ts.Context) -> int:
    return len(ctx.seal_context().data.first_context_data().parms().coeff_modulus())


def num_ciphertexts(length: int, slots: int) -> int:
    """Ciphertexts needed for ``length`` values at ``slots`` slots each (one is the check slot)."""
    per = slots - 1
    return max(1, -(-length // per))


def encrypt_vector(ctx: ts.Context, vec: np.ndarray) -> list[bytes]:
    """Encrypt a float vector of any length into serialized ciphertexts of ``N/2`` slots each:
    ``N/2 - 1`` values (the last block zero padded) and the check slot last."""
    slots = context_slots(ctx)
    per = slots - 1
    flat = np.asarray(vec, dtype=np.float64).ravel()
    if not np.all(np.isfinite(flat)):
        raise CKKSError("cannot encrypt NaN or infinite values")
    out = []
    for start in range(0, max(flat.size, 1), per):
        block = np.zeros(slots)
        chunk = flat[start : start + per]
        block[: chunk.size] = chunk
        block[-1] = CHECK_VALUE
        out.append(ts.ckks_vector(ctx, block.tolist()).serialize())
    return out


def _load(ctx: ts.Context, data: bytes, where: str) -> ts.CKKSVector:
    """Deserialize one ciphertext, mapping TenSEAL/SEAL errors to :class:`CKKSError`."""
    try:
        return ts.ckks_vector_from(ctx, data)
    except Exception as exc:
        raise CKKSError(f"{where}: malformed or tampered ciphertext ({exc})") from exc


def _check_block(ctx: ts.Context, vec: ts.CKKSVector, where: str) -> None:
    """A client's block must be a fresh-shaped ciphertext: N/2 slots, two polynomials, the
    context's scale and every data prime (anything else would make the sum fail or wrong)."""
    ct = vec.ciphertext()[0]
    slots = context_slots(ctx)
    if vec.size() != slots:
        raise CKKSError(f"{where}: holds {vec.size()} slots, expected {slots}")
    if ct.size() != 2 or ct.coeff_modulus_size() != _data_primes(ctx):
        raise CKKSError(f"{where}: {ct.size()} polynomials over {ct.coeff_modulus_size()} primes, expected 2 over "
                        f"{_data_primes(ctx)}")
    if ct.scale != ctx.global_scale:
        expected = math.log2(ctx.global_scale)
        raise CKKSError(f"{where}: encoded at scale 2^{math.log2(ct.scale):.4g}, expected 2^{expected:g}")


def add_encrypted(
    ctx: ts.Context, client_cts: Sequence[Sequence[bytes]], expected_count: int | None = None
) -> list[bytes]:
    """Sum clients' ciphertext lists slot-wise (in place, no ``.copy()``); needs the public ctx.

    All lists must have the same number of ciphertexts (``expected_count`` if given), each of
    the context's shape and scale.
    """
    if not client_cts:
        raise CKKSError("nothing to aggregate")
    count = len(client_cts[0]) if expected_count is None else expected_count
    acc: list[ts.CKKSVector] | None = None
    for i, cts in enumerate(client_cts):
        if len(cts) != count:
            raise CKKSError(f"client {i} sent {len(cts)} ciphertexts, expected {count}")
        blocks = [_load(ctx, b, f"client {i}, ciphertext {j}") for j, b in enumerate(cts)]
        for j, vec in enumerate(blocks):
            _check_block(ctx, vec, f"client {i}, ciphertext {j}")
        if acc is None:
            acc = blocks
            continue
        for j, vec in enumerate(blocks):
            try:
                acc[j].add_(vec)
            except Exception as exc:
                raise CKKSError(f"client {i}, ciphertext {j}: cannot add ({exc})") from exc
    assert acc is not None
    return [v.serialize() for v in acc]


def decrypt_vector(
    secret_ctx: ts.Context,
    cts: Sequence[bytes],
    length: int,
    num_clients: int | None = None,
) -> np.ndarray:
    """The raw, full-precision decryption of ``length`` values, check slots verified.

    Releasing this output lets the holder of the ciphertexts recover the secret key
    (:mod:`fedguard.secure.ckks_attack`): it is what :meth:`CKKSKeyHolder.release` computes
    before flooding, and never leaves the key holder in fedguard.
    """
    if not secret_ctx.is_private():
        raise CKKSError("this context has no secret key: only the key holder can decrypt")
    slots = context_slots(secret_ctx)
    if len(cts) != num_ciphertexts(length, slots):
        raise CKKSError(f"{len(cts)} ciphertexts for {length} values, expected {num_ciphertexts(length, slots)}")
    blocks = []
    for j, data in enumerate(cts):
        try:
            plain = np.asarray(_load(secret_ctx, data, f"ciphertext {j}").decrypt(), np.float64)
        except CKKSError:
            raise
        except Exception as exc:
            raise CKKSError(f"ciphertext {j}: cannot decrypt ({exc})") from exc
        if plain.size != slots:
            raise CKKSError(f"ciphertext {j} holds {plain.size} slots, expected {slots}")
        blocks.append(plain)
    values = np.stack(blocks)
    _verify_checks(values[:, -1], num_clients, secret_ctx.global_scale)
    return values[:, :-1].ravel()[:length]


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


def projection_check(ctx: ts.Context, cts: Sequence[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    """Server side: ``Enc(sum_j r_j * values_j + rho)`` from the aggregate's ciphertexts, with
    fresh CSPRNG ``r`` (one vector per ciphertext, in ``[-2^-16, 2^-16]``) and ``rho``.

    Returns the serialized check ciphertext and the secrets ``(r, rho)`` to verify it with.
    The multiplication doubles the scale (no rescaling), so the context needs two data primes.
    """
    if _data_primes(ctx) < 2:
        raise CKKSError("the projection check needs two data primes (e.g. ckks_coeff_bits = [60, 60, 60])")
    slots = context_slots(ctx)
    ratio = 2.0**-PROJECTION_BITS
    r = _secure_uniform((len(cts), slots), -ratio, ratio)
    rho = _secure_uniform((slots,), -64 * ratio, 64 * ratio)
    auto_rescale = ctx.auto_rescale
    ctx.auto_rescale = False
    try:
        check = _load(ctx, cts[0], "aggregate ciphertext 0").mul(r[0].tolist())
        for j in range(1, len(cts)):
            check.add_(_load(ctx, cts[j], f"aggregate ciphertext {j}").mul(r[j].tolist()))
        scale = check.ciphertext()[0].scale
        check.add_(ts.ckks_vector(ctx, rho.tolist(), scale=scale))
    finally:
        ctx.auto_rescale = auto_rescale
    return check.serialize(), r, rho


def verify_projection(
    values: np.ndarray, check: np.ndarray, r: np.ndarray, rho: np.ndarray, sigmas: np.ndarray, check_sigma: float
) -> float:
    """How many standard deviations the returned check lies from the returned aggregate's projection.

    ``values`` are the released slots (blocks x N/2, check slots included), ``sigmas`` the
    flooding per block, ``check_sigma`` the check's. Honest releases give at most about 6 over
    4,096 slots; a forged aggregate gives far more.
    """
    expected = np.einsum("js,js->s", r, values) + rho
    variance = np.einsum("js,j->s", r * r, np.asarray(sigmas) ** 2) + check_sigma**2
    return float(np.max(np.abs(check - expected) / np.sqrt(variance)))


@dataclass(frozen=True)
class Release:
    """What the key holder released for one decryption request.

    Attributes:
        values: flooded, rounded slot values, one row of ``N/2`` per ciphertext (check slots included).
        sigmas: the flooding standard deviation of each row (value units).
        check: the flooded projection check (``N/2`` values), if one was sent.
        check_sigma: its flooding standard deviation.
        noise_bits: log2 of the largest decryption-error bound used, in coefficient units.
    """

    values: np.ndarray
    sigmas: np.ndarray
    check: np.ndarray | None = None
    check_sigma: float = 0.0
    noise_bits: float = 0.0

    def vector(self, length: int) -> np.ndarray:
        """The released vector (check slots dropped)."""
        return self.values[:, :-1].ravel()[:length]


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
        """Sum encrypted vectors; each is checked for key, digest, length, count, shape and scale."""
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


def _inner_ciphertexts(serialized: bytes) -> list[bytes]:
    """The SEAL ciphertexts inside a serialized TenSEAL CKKS vector (protobuf field 2 of
    ``CKKSVectorProto`` in TenSEAL's ``tensors.proto``)."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = serialized[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos

    pos, found = 0, []
    while pos < len(serialized):
        key, pos = varint(pos)
        field, kind = key >> 3, key & 7
        if kind == 2:
            size, pos = varint(pos)
            if field == 2:
                found.append(serialized[pos : pos + size])
            pos += size
        elif kind == 0:
            _, pos = varint(pos)
        elif kind in (1, 5):
            pos += 8 if kind == 1 else 4
        else:
            raise CKKSError("malformed serialized CKKS vector")
    return found


class _SlotDecryptor:
    """SEAL's decryptor and encoder on a mirror of the key holder's context: decrypts to the
    complex slot values (TenSEAL returns real parts only), whose imaginary parts are pure error."""

    def __init__(self, ctx: ts.Context) -> None:
        data = ctx.seal_context().data
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(int(data.first_context_data().parms().poly_modulus_degree()))
        parms.set_coeff_modulus([sealapi.Modulus(m.value()) for m in data.key_context_data().parms().coeff_modulus()])
        self._seal = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        self._folder = tempfile.TemporaryDirectory(prefix="fedguard-ckks-")  # 0700, removed with the object
        self._path = str(Path(self._folder.name) / "item")
        ctx.secret_key().data.save(self._path)
        secret = sealapi.SecretKey()
        secret.load(self._seal, self._path)
        os.remove(self._path)
        self._decryptor = sealapi.Decryptor(self._seal, secret)
        self._encoder = sealapi.CKKSEncoder(self._seal)

    def slots(self, serialized: bytes, where: str) -> tuple[np.ndarray, float]:
        """The complex slots of one serialized ciphertext, and its scale."""
        inner = _inner_ciphertexts(serialized)
        if len(inner) != 1:
            raise CKKSError(f"{where}: expected one ciphertext per vector, found {len(inner)}")
        with open(self._path, "wb") as f:
            f.write(inner[0])
        ct = sealapi.Ciphertext()
        try:
            ct.load(self._seal, self._path)
            plain = sealapi.Plaintext()
            self._decryptor.decrypt(ct, plain)
            values = np.array(self._encoder.decode_complex(plain))
        except Exception as exc:
            raise CKKSError(f"{where}: cannot decrypt ({exc})") from exc
        finally:
            os.remove(self._path)
        return values, float(ct.scale)


class CKKSKeyHolder:
    """Holds the secret key: publishes the public context and releases flooded decryptions of sums.

    ``query_budget`` is ``tau``, the most ciphertexts it will ever decrypt under this key (the
    flooding is sized for it); after that it refuses, and the caller must make a new key.
    """

    def __init__(
        self,
        config: CKKSContextConfig | None = None,
        flooding: NoiseFlooding | None = None,
        query_budget: int = 1024,
    ) -> None:
        """Generate a fresh key pair with ``config`` (default: N=8192, (60, 60, 60), 2^56)."""
        self.config = config or CKKSContextConfig()
        self.flooding = flooding or NoiseFlooding()
        self.query_budget = int(query_budget)
        self.decrypted = 0
        self._ctx = create_secret_context(self.config)
        self._public = public_context_bytes(self._ctx)
        self.fingerprint = context_fingerprint(self._public)
        self._slots: _SlotDecryptor | None = None

    def public_context_bytes(self) -> bytes:
        """The context without its secret key, for the server and the clients."""
        return self._public

    def secret_context_bytes(self) -> bytes:
        """The full context with its secret key: for the key holder's own storage only."""
        return self._ctx.serialize(
            save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
        )

    @classmethod
    def from_secret_bytes(
        cls,
        data: bytes,
        config: CKKSContextConfig | None = None,
        flooding: NoiseFlooding | None = None,
        query_budget: int = 1024,
        decrypted: int = 0,
    ) -> CKKSKeyHolder:
        """Reload a key holder saved with :meth:`secret_context_bytes` (same keys, same fingerprint)."""
        ctx = load_public_context(data)
        if not ctx.is_private():
            raise CKKSError("this context has no secret key: it cannot make a key holder")
        holder = cls.__new__(cls)
        holder.config = config or CKKSContextConfig()
        holder.flooding = flooding or NoiseFlooding()
        holder.query_budget, holder.decrypted = int(query_budget), int(decrypted)
        holder._ctx = ctx
        holder._public = public_context_bytes(ctx)
        holder.fingerprint = context_fingerprint(holder._public)
        holder._slots = None
        return holder

    def encryptor(self) -> CKKSEncryptor:
        """A public-key encryptor bound to this key pair."""
        return CKKSEncryptor(self._public)

    def decrypt(self, enc: EncryptedVector, num_clients: int | None = None) -> np.ndarray:
        """The flooded decryption of an aggregate (see :meth:`release`), as one vector."""
        return self.release(enc, num_clients).vector(enc.length)

    def release(
        self, enc: EncryptedVector, num_clients: int | None = None, check: bytes | None = None
    ) -> Release:
        """Decrypt a sum of ``num_clients`` (default: as ``enc`` says) and release it flooded.

        Each ciphertext's check slot must count the clients; its flooding is sized for the
        larger of the honest-sum bound and the error its imaginary parts show. ``check`` (from
        :func:`projection_check` over ``enc``'s ciphertexts) is released flooded too.
        """
        enc.verify(self.fingerprint)
        expected = enc.num_clients if num_clients is None else num_clients
        slots = context_slots(self._ctx)
        if len(enc.ciphertexts) != num_ciphertexts(enc.length, slots):
            raise CKKSError(f"{len(enc.ciphertexts)} ciphertexts for {enc.length} values")
        queries = len(enc.ciphertexts) + (check is not None)
        if self.decrypted + queries > self.query_budget:
            raise CKKSError(
                f"refusing to decrypt {queries} more ciphertexts: {self.decrypted} of this key's budget of "
                f"{self.query_budget} are spent (the flooding is sized for it); make a new key"
            )
        self.decrypted += queries
        if self._slots is None:
            self._slots = _SlotDecryptor(self._ctx)
        rows, bounds = [], []
        for j, data in enumerate(enc.ciphertexts):
            values, scale = self._slots.slots(data, f"ciphertext {j}")
            if scale != self._ctx.global_scale or values.shape != (slots,):
                raise CKKSError(f"ciphertext {j} is not an aggregate of this key's encryptions")
            rows.append(values)
            bounds.append(self._bound(values, scale, expected))
        complex_rows = np.stack(rows)
        _verify_checks(complex_rows[:, -1].real, expected, self._ctx.global_scale)
        degree, scale = 2 * slots, self._ctx.global_scale
        sigmas = np.array([self.flooding.value_sigma(degree, b, self.query_budget, scale) for b in bounds])
        released = np.stack([self._flood(row.real, sigma) for row, sigma in zip(complex_rows, sigmas, strict=True)])
        out_check, check_sigma = None, 0.0
        if check is not None:
            out_check, check_sigma = self._release_check(check, len(enc.ciphertexts), max(bounds))
        return Release(released, sigmas, out_check, check_sigma, math.log2(max(bounds)))

    def _bound(self, values: np.ndarray, scale: float, clients: int) -> float:
        """``B`` for one ciphertext: the honest-sum bound, unless its imaginary parts show a larger error.

        Each imaginary part is a sum of ``N`` coefficient errors, ``sqrt(N/2)`` times their
        deviation: their root mean square estimates that deviation (within a few percent over 4,096
        slots); an estimate more than 15% above the honest model replaces it.
        """
        degree = 2 * values.shape[0]
        honest = self.flooding.error_bound(degree, clients)
        seen = self.flooding.tail * float(np.sqrt(np.mean(values.imag**2))) * scale / math.sqrt(degree / 2)
        return seen if seen > 1.15 * honest else honest

    def _flood(self, values: np.ndarray, sigma: float) -> np.ndarray:
        grid = self.flooding.grid(sigma)
        return np.round((values + secure_normal(values.size, sigma)) / grid) * grid

    def _release_check(self, check: bytes, folded: int, bound: float) -> tuple[np.ndarray, float]:
        """The projection check, flooded for its error: ``sqrt(folded) * 2^-16`` times an aggregate block's."""
        assert self._slots is not None
        values, scale = self._slots.slots(check, "projection check")
        degree = 2 * values.shape[0]
        if scale != self._ctx.global_scale**2:
            raise CKKSError("the projection check is not at the squared scale: refused")
        check_bound = bound * math.sqrt(folded) * 2.0**-PROJECTION_BITS * self._ctx.global_scale
        sigma = self.flooding.value_sigma(degree, check_bound, self.query_budget, scale)
        return self._flood(values.real, sigma), sigma
