"""Tests for fedguard.secure.quantize."""

from __future__ import annotations

import numpy as np
import pytest

from fedguard.secure.quantize import Quantizer, dequantize_sum, quantize


def _ring_sum(qs: list[np.ndarray], bits: int) -> np.ndarray:
    total = sum(q.astype(object) for q in qs)
    assert max(int(v) for v in total) < 2**bits  # the integer sum never wraps
    return (total % 2**bits).astype(np.uint64)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_deterministic_error_bound(bits: int) -> None:
    rng = np.random.default_rng(0)
    n, clip = 10, 2.0
    xs = [rng.uniform(-clip, clip, 2000) for _ in range(n)]
    qs = [quantize(x, clip, bits, max_clients=n) for x in xs]
    assert qs[0].dtype == (np.uint32 if bits <= 32 else np.uint64)
    got = dequantize_sum(_ring_sum(qs, bits), n, clip, bits)
    bound = Quantizer(clip, bits, n).error_bound(n, stochastic=False)
    assert np.abs(got - sum(xs)).max() <= bound * (1 + 1e-9) + 1e-12


def test_stochastic_error_bound_and_unbiased() -> None:
    rng = np.random.default_rng(1)
    n, clip, bits = 8, 1.0, 16
    q = Quantizer(clip, bits, n)
    xs = [rng.uniform(-clip, clip, 5000) for _ in range(n)]
    qs = [q.quantize(x, rng) for x in xs]
    got = q.dequantize_sum(_ring_sum(qs, bits), n)
    assert np.abs(got - sum(xs)).max() < q.error_bound(n, stochastic=True)
    x = np.full(20000, 0.3 * q.step - clip)  # 0.3 of the way between two levels
    mean = q.dequantize_sum(q.quantize(x, rng), 1).mean()
    assert abs(mean - x[0]) < 0.02 * q.step


def test_no_wrap_at_extremes_and_clipping() -> None:
    n, clip, bits = 100, 1.0, 32
    qs = [quantize(np.array([5.0, -5.0, 1.0]), clip, bits, max_clients=n) for _ in range(n)]
    got = dequantize_sum(_ring_sum(qs, bits), n, clip, bits)
    np.testing.assert_allclose(got, [n * clip, -n * clip, n * clip], atol=1e-9)


def test_fewer_clients_than_max_and_seeded_rounding() -> None:
    q = Quantizer(1.0, 32, max_clients=50)
    x = np.linspace(-1, 1, 101)
    a = q.quantize(x, np.random.default_rng(7))
    b = q.quantize(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    got = dequantize_sum(a.astype(np.uint64) * 3 % 2**32, 3, 1.0, 32, max_clients=50)
    assert np.abs(got - 3 * x).max() < q.error_bound(3, stochastic=True)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        quantize(np.array([np.nan]), 1.0, 32, max_clients=2)
    with pytest.raises(ValueError):
        Quantizer(1.0, 4, max_clients=100)  # no level left
    with pytest.raises(ValueError):
        Quantizer(0.0, 32)
    with pytest.raises(ValueError):
        Quantizer(1.0, 32, 5).dequantize_sum(np.zeros(2, np.uint32), 6)
