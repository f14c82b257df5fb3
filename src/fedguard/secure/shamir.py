"""t-of-n Shamir secret sharing over the prime field GF(2^521 - 1).

Why a local implementation: the PyPI candidates did not fit SecAgg's needs (32-byte secrets,
~100 shares, share indices = client ids + 1):

* ``pycryptodome``'s ``Crypto.Protocol.SecretSharing.Shamir`` (maintained) shares only 16-byte
  secrets over GF(2^128); a 32-byte X25519 key would need two independent splits, and it would
  add a dependency for ~40 lines of arithmetic.
* ``shamir-mnemonic`` (SLIP-39) is limited to 16 shares per group and wraps shares in mnemonics.
* ``secretsharing``/``secret-sharing``/``pysss``/``shamir`` and similar are small, mostly
  unmaintained projects (last releases 2014-2022) or share small integers only.

So the scheme here is the textbook one: a secret ``s < 2^256`` (32 bytes, big-endian) is the
constant term of a random polynomial of degree ``t - 1`` over GF(p) with the Mersenne prime
``p = 2^521 - 1``; coefficients come from :mod:`secrets`. Share ``i`` is ``(x_i, f(x_i))`` with
distinct non-zero ``x_i`` (SecAgg uses ``x = client id + 1``). Any ``t`` shares give ``s`` back by
Lagrange interpolation at 0; ``t - 1`` shares give a uniformly random field element and so carry
no information. :func:`reconstruct_secret` reports such a result as :class:`ShamirError` when it
does not fit the expected byte length (a random element fits in 32 bytes with probability
``2^-265``). Python ints are not constant time; the field arithmetic is not hardened against
timing side channels.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "Share",
    "ShamirError",
    "split_int",
    "reconstruct_int",
    "split_secret",
    "reconstruct_secret",
]

PRIME = 2**521 - 1
SHARE_BYTES = 66  # bytes needed for a field element (521 bits)


class ShamirError(ValueError):
    """Invalid sharing parameters, too few or inconsistent shares, or a failed reconstruction."""


@dataclass(frozen=True)
class Share:
    """One share ``(x, y)``: the polynomial evaluated at the non-zero point ``x``."""

    x: int
    y: int

    def y_bytes(self) -> bytes:
        """The ``y`` coordinate as 66 big-endian bytes (``x`` is usually implied by the holder)."""
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_y_bytes(cls, x: int, data: bytes) -> Share:
        """Rebuild a share from its point ``x`` and the 66-byte ``y``."""
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"share y must be {SHARE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise ShamirError("share y is not a field element")
        return cls(x, y)


def _check_points(xs: Sequence[int]) -> None:
    """Evaluation points must be distinct and in 1..p-1."""
    if len(set(xs)) != len(xs):
        raise ShamirError("share points x must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points x must lie in 1..p-1")


def split_int(secret: int, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split the field element ``secret`` into shares at points ``xs``; any ``threshold`` rebuild it."""
    if not 0 <= secret < PRIME:
        raise ShamirError("secret must lie in 0..p-1")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must lie in 1..{len(xs)} (number of shares), got {threshold}")
    _check_points(xs)
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y))
    return shares


def reconstruct_int(shares: Sequence[Share], threshold: int) -> int:
    """Interpolate at 0 from the first ``threshold`` of ``shares`` (needs at least that many)."""
    if threshold < 1:
        raise ShamirError(f"threshold must be >= 1, got {threshold}")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed")
    pts = list(shares[:threshold])
    xs = [s.x for s in pts]
    _check_points(xs)
    total = 0
    for i, si in enumerate(pts):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - si.x) % PRIME
        total = (total + si.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def split_secret(secret: bytes, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split a byte string of at most 64 bytes (e.g. a 32-byte key) into shares at ``xs``."""
    if len(secret) > 64:
        raise ShamirError("secrets longer than 64 bytes do not fit the field")
    return split_int(int.from_bytes(secret, "big"), threshold, xs)


def reconstruct_secret(shares: Sequence[Share], threshold: int, length: int = 32) -> bytes:
    """Rebuild a ``length``-byte secret; raise :class:`ShamirError` if the result does not fit.

    With fewer than ``threshold`` genuine shares (or corrupted ones) the interpolated value is a
    random field element, which fits in ``length`` bytes only with negligible probability.
    """
    value = reconstruct_int(shares, threshold)
    if value >= 1 << (8 * length):
        raise ShamirError(f"reconstructed value does not fit in {length} bytes: shares are inconsistent")
    return value.to_bytes(length, "big")
