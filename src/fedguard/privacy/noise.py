"""Where DP randomness comes from: a party's own secret (``secure``) or the run's seed (``seeded``).

A DP guarantee holds only against an adversary who cannot predict the noise. Everything a
server sends (the configuration, ``run.seed``) is known to it, so noise derived from it can be
regenerated and subtracted. With ``dp.noise_source = "secure"`` (the default) every DP draw
-- DP-SGD noise and Poisson masks, distributed noise shares, local-DP noise on a client; central
noise, the adaptive-clipping count noise and client sampling on the server -- comes from
:class:`SecureRandom`: a ChaCha20 keystream (RFC 8439, from the ``cryptography`` package) under a
fresh 256-bit key and nonce from ``os.urandom`` for each draw. A fresh key per draw keeps forked
worker processes (which share memory at the fork) from ever sharing a stream.

``seeded`` keeps the previous behaviour -- draws from the torch generator derived from
``(run.seed, round, client, purpose)`` -- so research simulations stay reproducible bit for bit.
The network runtime refuses it (:func:`seeded_noise_problem`) and every epsilon it reports
carries the note :data:`NOT_A_GUARANTEE`.

Floating-point noise (Mironov 2012): a Gaussian drawn in floating point has gaps and uneven
spacing that can reveal the unnoised value in the low-order bits of ``value + noise``. Where the
values are integers anyway -- inside the SecAgg ring -- fedguard adds noise from the discrete
Gaussian (:func:`discrete_gaussian`, the rejection sampler of Canonne, Kamath and Steinke 2020,
Algorithm 3) whose outputs are exact integers. Continuous noise (DP-SGD, central, local) is drawn
as float64 Box-Muller from 53-bit secure uniforms and rounded to the tensor's dtype; that rounding
does not remove the floating-point side channel in theory (see docs/privacy.md).
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedguard.core.pipeline import ConfigurationError

NOISE_SOURCES = ("secure", "seeded")
NOT_A_GUARANTEE = "not a guarantee: noise reproducible from the seed"
_TWO_PI = 2.0 * math.pi


def secure_bits(count: int) -> np.ndarray:
    """``count`` uint64 words of a ChaCha20 keystream under a fresh ``os.urandom`` key and nonce."""
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    key, nonce = os.urandom(32), os.urandom(16)
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * count))
    return np.frombuffer(stream, dtype=np.uint64)


def secure_uniform(count: int) -> np.ndarray:
    """``count`` float64 uniforms on (0, 1]: 53 secure bits each, never 0 (safe under a logarithm)."""
    return ((secure_bits(count) >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def secure_normal(count: int) -> np.ndarray:
    """``count`` standard normal float64 values (Box-Muller over :func:`secure_uniform`)."""
    half = (count + 1) // 2
    u = secure_uniform(2 * half)
    radius = np.sqrt(-2.0 * np.log(u[:half]))
    angle = _TWO_PI * u[half:]
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]


class Randomness(Protocol):
    """The source a DP mechanism draws from (the generator argument is the seeded fallback)."""

    name: str

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """Standard normal values of ``shape`` and ``dtype`` on the CPU."""
        ...

    def uniform(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` uniforms on [0, 1) (float32 for the seeded source, float64 for the secure one)."""
        ...


class SecureRandom:
    """Draws from the OS CSPRNG through ChaCha20; ignores the (seeded) generator it is handed."""

    name = "secure"

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """Secure standard normals, rounded once from float64 to ``dtype``."""
        count = math.prod(shape)
        return torch.from_numpy(secure_normal(count)).reshape(shape).to(dtype)

    def uniform(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Secure uniforms (53 bits)."""
        return torch.from_numpy(1.0 - secure_uniform(count))


class SeededRandom:
    """The research-only source: the torch generator derived from the run's seed (reproducible)."""

    name = "seeded"

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """``torch.randn`` on the seeded generator (bit for bit what earlier versions drew)."""
        return torch.randn(shape, generator=generator, dtype=dtype)

    def uniform(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``torch.rand`` on the seeded generator."""
        return torch.rand(count, generator=generator)


def randomness(source: str) -> Randomness:
    """The :class:`Randomness` named by ``dp.noise_source``."""
    if source == "secure":
        return SecureRandom()
    if source == "seeded":
        return SeededRandom()
    raise ConfigurationError(f"dp.noise_source must be one of {NOISE_SOURCES}, got {source!r}")


def seeded_noise_problem(config: object) -> str | None:
    """Why a networked run must refuse this configuration's DP noise (None when it need not)."""
    dp = getattr(config, "dp", None)
    if dp is None or getattr(dp, "mode", "none") == "none" or getattr(dp, "noise_source", "secure") != "seeded":
        return None
    return (
        "dp.noise_source=seeded: the DP noise would be reproducible from run.seed, which the server knows and sends "
        "to every client, so no epsilon would hold; real deployments use dp.noise_source=secure (the default)"
    )


def refuse_seeded_noise(config: object) -> None:
    """Raise :class:`ConfigurationError` where :func:`seeded_noise_problem` finds one (network runtime)."""
    problem = seeded_noise_problem(config)
    if problem:
        raise ConfigurationError(problem)


# -- the discrete Gaussian (Canonne, Kamath, Steinke 2020) ---------------------------------------


def discrete_gaussian(sigma: float, count: int) -> np.ndarray:
    """``count`` independent draws from the discrete Gaussian N_Z(0, sigma^2), as int64.

    Algorithm 3 of Canonne, Kamath and Steinke (NeurIPS 2020), vectorised over secure uniforms:
    with ``t = floor(sigma) + 1``, draw ``Y`` from the discrete Laplace with scale ``t`` (a geometric
    magnitude with success probability ``1 - exp(-1/t)``, a sign, rejecting negative zero), then
    accept ``Y`` with probability ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``. The acceptance
    probability is evaluated in float64 (relative error ~1e-16) rather than by the paper's exact
    Bernoulli(exp(-gamma)) sampler; the outputs are exact integers, so the floating-point attack
    on the released values (Mironov 2012) has no low-order bits to read.
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"the discrete Gaussian needs a positive finite sigma, got {sigma}")
    t = math.floor(sigma) + 1
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        batch = max(64, int(1.5 * (count - out.size)) + 16)
        u = secure_uniform(3 * batch)
        # geometric magnitude G >= 0 with P(G = k) = (1 - p) p^k, p = exp(-1/t): G = floor(-t ln U)
        magnitude = np.floor(-t * np.log(u[:batch]))
        negative = u[batch:2 * batch] < 0.5
        keep = ~(negative & (magnitude == 0))  # the discrete Laplace: -0 is rejected
        y = np.where(negative, -magnitude, magnitude)
        accept = u[2 * batch:] <= np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2.0 * sigma**2))
        out = np.concatenate([out, y[keep & accept].astype(np.int64)])
    return out[:count]
