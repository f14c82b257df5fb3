"""Fixed-point quantization of float vectors into the ring Z_{2^b}.

Scheme (for secure aggregation, where the server only sees a sum modulo ``2^b``):

* Each coordinate is clipped to ``[-clip, clip]`` and mapped affinely onto the integers
  ``0 .. L`` with ``L = min(floor((2^b - 1) / max_clients), 2^52)`` levels per client, so
  ``step = 2 * clip / L`` and ``q = round((x + clip) / step)``.
* Because every client contributes at most ``L``, the sum over up to ``max_clients`` clients is
  at most ``max_clients * L <= 2^b - 1``: the modular sum never wraps and equals the integer sum.
  (``L`` is capped at ``2^52`` so that float64 represents every level exactly.)
* The sum of ``n`` quantized vectors dequantizes as ``S * step - n * clip``, where ``S`` is the
  ring sum read as the integer nearest the middle of the honest range ``[0, n * L]``
  (:meth:`Quantizer.centred`): a sum pushed below 0 (integer noise, a hostile client) reads as
  negative instead of wrapping to the top of the ring.
* ``headroom_bits = h`` keeps the top ``h`` bits of the ring free, ``L = floor((2^(b-h) - 1) / n)``,
  for integer noise added after quantization (distributed discrete DP): the noisy sum decodes
  exactly while ``|noise sum| < 2^(b-1) - n * L / 2`` and wraps modulo ``2^b`` beyond it
  (modular clipping, as in Kairouz et al., ICML 2021).

Error bound after dequantizing the sum of ``n`` clients' inputs that lie in ``[-clip, clip]``:

* deterministic rounding (``rng=None``): ``|error| <= n * step / 2`` per coordinate;
* stochastic rounding (``rng`` given, unbiased): ``|error| < n * step`` per coordinate, with
  expectation zero.

Inputs outside ``[-clip, clip]`` additionally lose their clipped part. ``b`` ranges over
``2..64``; arrays are ``uint32`` for ``b <= 32`` and ``uint64`` otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Quantizer",
    "quantize",
    "dequantize_sum",
    "ring_dtype",
    "ring_mask",
    "reduce_ring",
]

_MAX_LEVELS = 2**52


def ring_dtype(bits: int) -> np.dtype:
    """The unsigned dtype that holds elements of Z_{2^bits} (uint32 or uint64)."""
    if not 2 <= bits <= 64:
        raise ValueError(f"ring bits must be in 2..64, got {bits}")
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def ring_mask(bits: int) -> int:
    """The bit mask ``2^bits - 1``."""
    return (1 << bits) - 1


def reduce_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Reduce an array of the ring dtype modulo ``2^bits`` in place and return it."""
    if bits < values.dtype.itemsize * 8:
        values &= values.dtype.type(ring_mask(bits))
    return values


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point codec for sums of up to ``max_clients`` vectors clipped to ``[-clip, clip]``.

    Attributes:
        clip: clipping bound ``c > 0``.
        bits: ring size exponent ``b`` (arithmetic is modulo ``2^b``).
        max_clients: largest number of vectors that will be summed.
        headroom_bits: top bits of the ring kept free for integer noise (0: none).
    """

    clip: float
    bits: int = 32
    max_clients: int = 1
    headroom_bits: int = 0

    def __post_init__(self) -> None:
        ring_dtype(self.bits)
        if not self.clip > 0 or not np.isfinite(self.clip):
            raise ValueError(f"clip must be a positive finite number, got {self.clip}")
        if self.max_clients < 1:
            raise ValueError(f"max_clients must be >= 1, got {self.max_clients}")
        if not 0 <= self.headroom_bits < self.bits:
            raise ValueError(f"headroom_bits must lie in 0..{self.bits - 1}, got {self.headroom_bits}")
        if self.levels < 1:
            raise ValueError(f"2^{self.bits} is too small for {self.max_clients} clients: no levels left")

    @property
    def dtype(self) -> np.dtype:
        """Array dtype of quantized values."""
        return ring_dtype(self.bits)

    @property
    def levels(self) -> int:
        """``L``: largest quantized value one client may contribute."""
        return min(ring_mask(self.bits - self.headroom_bits) // self.max_clients, _MAX_LEVELS)

    @property
    def step(self) -> float:
        """Quantization step ``2 * clip / L``."""
        return 2.0 * self.clip / self.levels

    def error_bound(self, n: int, stochastic: bool) -> float:
        """Per-coordinate bound on ``|dequantized sum - true sum|`` for ``n`` clipped inputs."""
        return n * self.step * (1.0 if stochastic else 0.5)

    def quantize(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Clip and quantize ``x``; stochastic rounding when ``rng`` is given, else nearest."""
        arr = np.asarray(x, dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError("cannot quantize NaN or infinite values")
        scaled = (np.clip(arr, -self.clip, self.clip) + self.clip) / self.step
        if rng is None:
            rounded = np.floor(scaled + 0.5)
        else:
            rounded = np.floor(scaled + rng.random(arr.shape))
        return np.clip(rounded, 0, self.levels).astype(self.dtype)

    def centred(self, s: np.ndarray, n: int) -> np.ndarray:
        """The ring sum ``s`` of ``n`` inputs as integers in ``[n*L/2 - 2^(b-1), n*L/2 + 2^(b-1))``.

        Honest sums lie in ``[0, n * L]`` and are returned unchanged; a sum that noise (or a hostile
        client) pushed below 0 comes back negative rather than near ``2^b``. int64 for rings up to
        62 bits, float64 above.
        """
        if not 0 <= n <= self.max_clients:
            raise ValueError(f"n={n} must lie in 0..max_clients={self.max_clients}")
        arr = np.asarray(s)
        if arr.dtype.kind not in "ui":
            raise ValueError(f"a ring sum holds integers, got {arr.dtype}")
        arr = arr.astype(self.dtype)  # an element of Z_{2^b}: reduced modulo 2^32 or 2^64
        low = n * self.levels // 2 - (1 << (self.bits - 1))
        offset = arr - self.dtype.type(low % (1 << self.bits))  # wraps modulo 2^64 or 2^32
        offset = reduce_ring(offset, self.bits)
        return offset.astype(np.int64 if self.bits <= 62 else np.float64) + low

    def dequantize_sum(self, s: np.ndarray, n: int) -> np.ndarray:
        """Map the ring sum of ``n`` quantized vectors back to the float64 sum."""
        return self.centred(s, n).astype(np.float64) * self.step - n * self.clip


def quantize(
    x: np.ndarray,
    clip: float,
    bits: int,
    max_clients: int,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Quantize ``x`` into Z_{2^bits} so that sums of ``max_clients`` vectors cannot wrap.

    Stochastic (unbiased) rounding when ``rng`` is given, deterministic nearest otherwise.
    """
    return Quantizer(clip, bits, max_clients).quantize(x, rng)


def dequantize_sum(s: np.ndarray, n: int, clip: float, bits: int, max_clients: int | None = None) -> np.ndarray:
    """Dequantize the ring sum ``s`` of ``n`` vectors quantized with the same parameters.

    ``max_clients`` must be the value used by :func:`quantize` (defaults to ``n``).
    """
    return Quantizer(clip, bits, n if max_clients is None else max_clients).dequantize_sum(s, n)
