"""Tests for fedguard.secure.shamir."""

from __future__ import annotations

import itertools
import random
import secrets

import pytest

from fedguard.secure.shamir import (
    PRIME,
    ShamirError,
    Share,
    reconstruct_int,
    reconstruct_secret,
    split_int,
    split_secret,
)


def test_any_t_shares_reconstruct() -> None:
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 3, [v + 1 for v in range(6)])
    for subset in itertools.combinations(shares, 3):
        assert reconstruct_secret(list(subset), 3) == secret
    assert reconstruct_secret(shares, 3) == secret  # more than t is fine


def test_large_sharing_random_subsets() -> None:
    secret = secrets.token_bytes(32)
    xs = [17 + 5 * i for i in range(100)]  # client ids + 1, not contiguous
    shares = split_secret(secret, 51, xs)
    rnd = random.Random(0)
    for _ in range(3):
        assert reconstruct_secret(rnd.sample(shares, 51), 51) == secret


def test_t_minus_one_shares_fail() -> None:
    secret = secrets.token_bytes(32)
    shares = split_secret(secret, 4, [1, 2, 3, 4, 5])
    with pytest.raises(ShamirError, match="3 shares given, 4 needed"):
        reconstruct_secret(shares[:3], 4)
    assert reconstruct_int(shares[:3], 3) != int.from_bytes(secret, "big")
    with pytest.raises(ShamirError, match="does not fit"):
        reconstruct_secret(shares[:3], 3)


def test_corrupted_share_detected() -> None:
    shares = split_secret(b"\x01" * 32, 2, [1, 2, 3])
    bad = [Share(shares[0].x, secrets.randbelow(PRIME)), shares[1]]  # a random y
    with pytest.raises(ShamirError):
        reconstruct_secret(bad, 2)


def test_share_bytes_roundtrip_and_validation() -> None:
    (s,) = split_int(12345, 1, [9])
    assert Share.from_y_bytes(9, s.y_bytes()) == s
    assert s.y == 12345  # threshold 1: the constant polynomial
    with pytest.raises(ShamirError):
        Share.from_y_bytes(1, b"\xff" * 66)  # >= p
    with pytest.raises(ShamirError):
        split_int(1, 2, [1, 1])
    with pytest.raises(ShamirError):
        split_int(1, 2, [0, 1])
    with pytest.raises(ShamirError):
        split_int(1, 3, [1, 2])
