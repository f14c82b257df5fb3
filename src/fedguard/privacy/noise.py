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
Algorithm 3) whose outputs are exact integers. Continuous noise (DP-SGD, central, local, sample-level
shares) from the secure source follows the mitigation of Holohan and Braghin (2021, "Secure random
sampling in differential privacy", Section 5.1) that Opacus applies in ``secure_mode``
(``opacus.optimizers.optimizer._generate_noise``): every value is the sum of ``2n = 4`` independent
Gaussian draws divided by ``sqrt(4) = 2`` (:func:`secure_normal_summed`). An attacker who would invert
one output to the random bits behind it must now search ``2^(p (2n - 1))`` states instead of ``2^p``
(p = 53 bits per float64 draw): Holohan and Braghin's bound, not a proof of exact DP in floating point.
The draws are float64 Box-Muller from 53-bit secure uniforms, summed in float64 and rounded once to
the tensor's dtype. The seeded (research) source keeps ``torch.randn``, bit for bit.
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
    out = (secure_bits(count) >> np.uint64(11)).astype(np.float64)
    out += 1.0
    out *= 2.0**-53
    return out


def secure_normal(count: int) -> np.ndarray:
    """``count`` standard normal float64 values (Box-Muller over :func:`secure_uniform`; torch's vectorised
    float64 log, sqrt, cos and sin, about twice as fast as numpy's)."""
    half = (count + 1) // 2
    u = torch.from_numpy(secure_uniform(2 * half))
    radius = torch.log(u[:half]).mul_(-2.0).sqrt_()
    angle = u[half:].mul_(_TWO_PI)
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count].numpy()


#: independent Gaussian draws summed into each secure float noise value (Holohan & Braghin 2021, 2n with n = 2,
#: as Opacus's secure_mode)
SUMMED_DRAWS = 4


def secure_normal_summed(count: int, draws: int = SUMMED_DRAWS) -> np.ndarray:
    """``count`` standard normals, each the sum of ``draws`` independent :func:`secure_normal` values over
    ``sqrt(draws)`` (Holohan & Braghin 2021, Section 5.1; Opacus ``_generate_noise(secure_mode=True)``)."""
    if draws == 1:
        return secure_normal(count)
    summed = torch.from_numpy(secure_normal(draws * count)).view(draws, count).sum(dim=0)
    return summed.div_(math.sqrt(draws)).numpy()


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
    """Draws from the OS CSPRNG through ChaCha20; ignores the (seeded) generator it is handed.

    ``draws`` independent Gaussians are summed into each float value (``dp.float_noise_draws``; 4 as in
    Opacus's secure_mode, 1 for the single draw that leaves the floating-point side channel open).
    """

    name = "secure"

    def __init__(self, draws: int = SUMMED_DRAWS) -> None:
        if draws < 1:
            raise ConfigurationError(f"dp.float_noise_draws must be at least 1, got {draws}")
        self.draws = draws

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        """Secure standard normals (each a sum of ``draws`` draws), rounded once from float64 to ``dtype``."""
        count = math.prod(shape)
        return torch.from_numpy(secure_normal_summed(count, self.draws)).reshape(shape).to(dtype)

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


def randomness(source: str, draws: int = SUMMED_DRAWS) -> Randomness:
    """The :class:`Randomness` named by ``dp.noise_source`` (``draws``: ``dp.float_noise_draws``, secure only)."""
    if source == "secure":
        return SecureRandom(draws)
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
