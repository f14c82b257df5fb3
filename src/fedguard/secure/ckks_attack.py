"""The key-recovery attack on CKKS decryptions released at full precision (Li and Micciancio, EUROCRYPT 2021).

A curious server holds the public context, the ciphertexts it summed, and the float64 values the
key holder decrypted from them. Decryption of ``ct = (c0, c1)`` computes ``m = c0 + c1 * s mod q``
and releases the real parts of ``m``'s slots, which (re-encoded) give ``m + conj(m)`` exactly,
with ``conj(a)(X) = a(X^-1)``:

    m + conj(m) = c0 + conj(c0) + c1 * s + conj(c1) * conj(s)        (mod q)

In the evaluation (NTT) domain ``conj`` pairs the root ``w`` with ``w^-1``, so each pair of
unknowns ``(s(w), s(w^-1))`` meets one equation per released ciphertext: two ciphertexts give a
2x2 system per pair, and an inverse NTT gives the ternary secret key ``s``. With ``s`` the server
decrypts any client's individual ciphertext.

:func:`recover_secret_key` runs the attack with public operations only (TenSEAL's public context,
its SEAL bindings for reading ciphertext polynomials, and a number-theoretic transform written
here). It is the test and attack scenario for the countermeasure in :mod:`fedguard.secure.ckks`
(noise flooding at decryption): against flooded values the recovered ``s`` is not ternary and
decrypts nothing.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

__all__ = ["KeyRecovery", "recover_secret_key"]


def _primitive_root(q: int, order: int) -> int:
    """A primitive ``order``-th root of unity modulo the prime ``q`` (``order`` a power of two)."""
    for x in range(2, 100_000):
        r = pow(x, (q - 1) // order, q)
        if pow(r, order // 2, q) == q - 1:
            return r
    raise ValueError(f"no primitive {order}-th root of unity modulo {q}")


class _NTT:
    """Negacyclic NTT modulo ``q`` in natural order: ``A_j = sum_i a_i psi^((2j+1) i)``.

    Root ``j`` and root ``n-1-j`` are inverses of each other (the conjugate pair).
    """

    def __init__(self, n: int, q: int) -> None:
        self.n, self.q = n, q
        psi = _primitive_root(q, 2 * n)
        self.omega = psi * psi % q
        self.twist = [pow(psi, i, q) for i in range(n)]
        self.untwist = [pow(psi, -i, q) * pow(n, -1, q) % q for i in range(n)]
        bits = n.bit_length() - 1
        self.order = [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]

    def _fft(self, a: list[int], w: int) -> list[int]:
        n, q = self.n, self.q
        a = [a[i] for i in self.order]
        size = 2
        while size <= n:
            half, step = size // 2, pow(w, n // size, q)
            ws = [1] * half
            for k in range(1, half):
                ws[k] = ws[k - 1] * step % q
            for start in range(0, n, size):
                for k in range(half):
                    u, v = a[start + k], a[start + k + half] * ws[k] % q
                    a[start + k], a[start + k + half] = (u + v) % q, (u - v) % q
            size *= 2
        return a

    def forward(self, coeffs: Sequence[int]) -> list[int]:
        return self._fft([int(c) * t % self.q for c, t in zip(coeffs, self.twist, strict=True)], self.omega)

    def inverse(self, values: Sequence[int]) -> list[int]:
        a = self._fft([int(v) for v in values], pow(self.omega, -1, self.q))
        return [x * t % self.q for x, t in zip(a, self.untwist, strict=True)]


def _centred(values: Sequence[int], q: int) -> np.ndarray:
    return np.array([v - q if v > q // 2 else v for v in values], dtype=object)


class _Mirror:
    """SEAL objects mirroring a TenSEAL public context, to read ciphertext polynomials (first data prime)."""

    def __init__(self, ctx: ts.Context) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="fedguard-ckks-attack-")  # removed with the object
        data = ctx.seal_context().data
        first = data.first_context_data().parms()
        self.n = int(first.poly_modulus_degree())
        self.q = int(first.coeff_modulus()[0].value())
        parms = sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.n)
        parms.set_coeff_modulus([sealapi.Modulus(m.value()) for m in data.key_context_data().parms().coeff_modulus()])
        self.seal = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
        self.evaluator = sealapi.Evaluator(self.seal)
        self.path = str(Path(self._folder.name) / "ciphertext")

    def load(self, vec: ts.CKKSVector) -> sealapi.Ciphertext:
        vec.ciphertext()[0].save(self.path)
        ct = sealapi.Ciphertext()
        ct.load(self.seal, self.path)
        return ct

    def polys(self, ct: sealapi.Ciphertext) -> list[list[int]]:
        """Each polynomial of ``ct`` modulo the first data prime, as SEAL stores it."""
        flat, n, levels = ct.dyn_array(), self.n, ct.coeff_modulus_size()
        return [[flat.at(p * levels * n + i) for i in range(n)] for p in range(ct.size())]

    def coefficients(self, ct: sealapi.Ciphertext) -> list[list[int]]:
        out = sealapi.Ciphertext()
        self.evaluator.transform_from_ntt(ct, out)
        return self.polys(out)


@dataclass
class KeyRecovery:
    """The attacker's secret-key candidate and what it needs to decrypt with it."""

    coefficients: np.ndarray  # the candidate s, centred modulo the first data prime
    _secret: list[int]  # the same in the attacker's NTT domain
    _mirror: _Mirror
    _ntt: _NTT
    _perm: list[int]
    _slots: np.ndarray
    _context: ts.Context

    @property
    def is_ternary(self) -> bool:
        """True when every coefficient is -1, 0 or 1: the shape of a real CKKS secret key."""
        return bool(np.all(np.abs(self.coefficients.astype(np.float64)) <= 1))

    def decrypt(self, ciphertext: bytes) -> np.ndarray:
        """Every slot of one serialized ciphertext, decrypted with the candidate key."""
        vec = ts.ckks_vector_from(self._context, ciphertext)
        scale = vec.ciphertext()[0].scale
        c0, c1 = (self._ours(p) for p in self._mirror.polys(self._mirror.load(vec)))
        q = self._ntt.q
        m = [(a + b * s) % q for a, b, s in zip(c0, c1, self._secret, strict=True)]
        coeffs = _centred(self._ntt.inverse(m), q).astype(np.float64)
        return _evaluate(coeffs)[self._slots].real / scale

    def _ours(self, seal_values: Sequence[int]) -> list[int]:
        out = [0] * len(self._perm)
        for i, v in enumerate(seal_values):
            out[self._perm[i]] = v
        return out


def _evaluate(coeffs: np.ndarray) -> np.ndarray:
    """The polynomial at every primitive 2n-th complex root of unity ``exp(i pi (2j+1) / n)``."""
    n = coeffs.shape[0]
    return np.fft.ifft(coeffs * np.exp(1j * np.pi * np.arange(n) / n)) * n


def recover_secret_key(
    public_context: bytes, ciphertexts: Sequence[bytes], released: Sequence[np.ndarray]
) -> KeyRecovery:
    """Solve for the secret key from two full ciphertexts and the real values released for them.

    ``ciphertexts`` are serialized TenSEAL CKKS vectors filling all ``N/2`` slots (for example two
    blocks of an aggregate); ``released`` the ``N/2`` values the key holder returned for each.
    """
    if len(ciphertexts) < 2 or len(released) < 2:
        raise ValueError("the attack needs two ciphertexts and their decryptions")
    ctx = ts.context_from(public_context)
    mirror = _Mirror(ctx)
    ntt = _NTT(mirror.n, mirror.q)
    recovery = KeyRecovery(np.zeros(0), [], mirror, ntt, _calibrate(mirror, ntt, ctx), np.zeros(0, np.int64), ctx)
    rows = []
    for data, values in zip(ciphertexts[:2], released[:2], strict=True):
        vec = ts.ckks_vector_from(ctx, data)
        if np.asarray(values).shape != (mirror.n // 2,):
            raise ValueError(f"need all {mirror.n // 2} released slots of a ciphertext")
        c0, c1 = (recovery._ours(p) for p in mirror.polys(mirror.load(vec)))
        rows.append((c0, c1, _plaintext(mirror, recovery, vec, 2 * np.asarray(values, np.float64))))
    recovery._secret = _solve(rows, mirror.n, mirror.q)
    recovery.coefficients = _centred(ntt.inverse(recovery._secret), mirror.q)
    recovery._slots = _slot_order(mirror, recovery, ctx)
    return recovery


def _solve(rows: list[tuple[list[int], list[int], list[int]]], n: int, q: int) -> list[int]:
    """Per conjugate pair (j, n-1-j): two equations ``T = c1(j) s(j) + c1(j*) s(j*)``, one per ciphertext."""
    (a0, a1, am), (b0, b1, bm) = rows
    s = [0] * n
    for j in range(n // 2):
        k = n - 1 - j
        ta, tb = (am[j] - a0[j] - a0[k]) % q, (bm[j] - b0[j] - b0[k]) % q
        det = (a1[j] * b1[k] - a1[k] * b1[j]) % q
        if det == 0:
            raise ValueError("singular pair: use two other ciphertexts")
        inv = pow(det, -1, q)
        s[j] = (ta * b1[k] - a1[k] * tb) * inv % q
        s[k] = (a1[j] * tb - b1[j] * ta) * inv % q
    return s


def _calibrate(mirror: _Mirror, ntt: _NTT, ctx: ts.Context) -> list[int]:
    """The permutation from SEAL's NTT order to ours (both evaluate at the same roots)."""
    vec = ts.ckks_vector(ctx, np.random.default_rng(0).uniform(-1, 1, mirror.n // 2).tolist())
    ct = mirror.load(vec)
    seal_ntt, coeffs = mirror.polys(ct)[0], mirror.coefficients(ct)[0]
    where = {v: j for j, v in enumerate(ntt.forward(coeffs))}
    return [where[v] for v in seal_ntt]


def _plaintext(mirror: _Mirror, recovery: KeyRecovery, vec: ts.CKKSVector, values: np.ndarray) -> list[int]:
    """``encode(values)`` at ``vec``'s scale in our NTT domain: ``(vec + values) - vec``, polynomial 0."""
    before = mirror.polys(mirror.load(vec))[0]
    after = mirror.polys(mirror.load(vec + values.tolist()))[0]
    return recovery._ours([(b - a) % mirror.q for a, b in zip(before, after, strict=True)])


def _slot_order(mirror: _Mirror, recovery: KeyRecovery, ctx: ts.Context) -> np.ndarray:
    """Which complex root each slot is evaluated at, from a plaintext encoded with known values."""
    z = np.random.default_rng(1).uniform(-1, 1, mirror.n // 2)
    zero = ts.ckks_vector(ctx, [0.0] * (mirror.n // 2))
    scale = zero.ciphertext()[0].scale
    coeffs = _centred(recovery._ntt.inverse(_plaintext(mirror, recovery, zero, z)), mirror.q).astype(np.float64)
    evals = _evaluate(coeffs) / scale
    return np.array([int(np.argmin(np.abs(evals - value))) for value in z], dtype=np.int64)
