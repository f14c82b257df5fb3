"""Randomness that protects a defense: drawn from the operating system, never from ``run.seed``.

A Byzantine client knows the configuration, seed included. A bucketing shuffle or weak-DP noise it could
reproduce would let it place itself in a chosen bucket or cancel the noise, so defenses draw a fresh seed
from :func:`os.urandom` (the OS CSPRNG) for every use.
"""

from __future__ import annotations

import os

import torch


def secure_generator() -> torch.Generator:
    """A torch generator seeded with 63 bits from the OS CSPRNG (a new, unpredictable seed per call)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
