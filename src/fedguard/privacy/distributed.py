"""Distributed discrete Gaussian noise inside the SecAgg+ ring (Kairouz, Liu, Steinke, ICML 2021).

Client-level DP with ``dp.noise_placement = distributed`` and ``secure.mode = secagg``: each
client clips its update to L2 norm ``S`` (:class:`~fedguard.privacy.dpfedavg.ClipUpdate`), SecAgg+
quantizes it to integer levels of width ``step``, and this :class:`DiscreteGaussianRingNoise` adds
``N_Z(0, sigma^2)`` integer noise to every coordinate before masking
(:data:`~fedguard.secure.secagg_aggregator.RING_NOISE_HOOKS`). The server unmasks only the sum.

Sensitivity in levels: replacing a client's update by zero changes its quantized contribution by
at most ``Delta = S / step + sqrt(d)`` in L2 (each coordinate rounds by less than one level; the
per-coordinate clip of the ring only shrinks the norm). Each client's share is
``sigma = z * Delta / sqrt(shares)``, so ``h`` honest shares sum to a noise of multiplier
``z * sqrt(h / shares)`` relative to ``Delta``, which the ledger charges (shares and ``h`` as in
:func:`~fedguard.privacy.register.distributed_shares`).

The sum of ``n`` discrete Gaussians is not exactly a discrete Gaussian; Kairouz et al. (Theorem 1)
bound the gap by ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k+1))``, adding ``tau d / 2``
to the concentrated-DP parameter. :func:`check_tau` refuses settings where that term is not
negligible (below 1e-9 of the Gaussian term); with ``sigma`` of hundreds of levels it is ~e^-1000.
The accountant then charges the Gaussian mechanism of the same multiplier (dp-accounting's
``GaussianDpEvent``, with Poisson amplification for the model-release epsilon); this treats the
discrete sum like the continuous Gaussian it matches in Renyi divergence (Canonne et al. 2020,
Kairouz et al. 2021), as their experiments do.

Modular clipping: the ring keeps ``headroom_bits`` free so the noise sum decodes exactly with
overwhelming probability (beyond 10 standard deviations it would wrap modulo ``2^b``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedguard.core.pipeline import ConfigurationError
from fedguard.privacy.noise import discrete_gaussian


def tau(sigma: float, clients: int) -> float:
    """Kairouz, Liu, Steinke (2021), Theorem 1: the distance term of a sum of ``clients`` N_Z(0, sigma^2)."""
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, max(clients, 1)))


def check_tau(sigma: float, clients: int, dimension: int, noise_multiplier: float) -> None:
    """Refuse a share so small that the sum of discrete Gaussians is not close to one (tau d / 2 term)."""
    excess = tau(sigma, clients) * dimension / 2.0
    if excess > 1e-9 * noise_multiplier**-2:
        raise ConfigurationError(
            f"distributed discrete Gaussian: each client's share has sigma {sigma:.3g} levels, too small for the sum "
            f"of {clients} shares to be a discrete Gaussian (Kairouz et al. 2021, tau d / 2 = {excess:.3g}). Raise "
            "secure.ring_bits, lower secure.clip, or raise dp.noise_multiplier."
        )


@dataclass(frozen=True)
class DiscreteGaussianRingNoise:
    """A client's share of distributed discrete Gaussian noise, in quantization levels.

    Attributes:
        noise_multiplier: z, relative to the L2 sensitivity in levels.
        clip: S, the L2 clip norm of each update (dp.clip), in update units.
        shares: how many shares make the full noise.
        headroom_bits: ring bits kept free for the noise sum.
        ring_clip: the ring's per-coordinate clip (secure.clip).
        dimension: d, the number of update coordinates.
    """

    noise_multiplier: float
    clip: float
    shares: int
    headroom_bits: int
    ring_clip: float
    dimension: int
    name: str = "distributed discrete Gaussian"

    def sigma(self, levels_step: float, weight_ratio: float, dimension: int) -> float:
        """One share's standard deviation in levels for a given quantization step and weight w/M."""
        sensitivity = self.clip * weight_ratio / levels_step + math.sqrt(dimension)
        return self.noise_multiplier * sensitivity / math.sqrt(self.shares)

    def bound(self, clients: int, levels: int) -> int:
        """Twelve standard deviations of the noise sum: what the server's range check lets through."""
        sigma = self.sigma(2.0 * self.ring_clip / levels, 1.0, self.dimension)
        return int(12.0 * math.sqrt(max(clients, 1)) * sigma) + 1

    def sample(self, ctx: object) -> np.ndarray:
        """This client's share for ``ctx.length`` coordinates (secure uniforms; exact integers)."""
        sigma = self.sigma(ctx.step, ctx.weight / ctx.max_weight, ctx.length)  # type: ignore[attr-defined]
        return discrete_gaussian(sigma, int(ctx.length))  # type: ignore[attr-defined]


def headroom_bits(noise_multiplier: float, shares: int) -> int:
    """Free top bits for the noise sum of at least ``shares`` clients to stay within 10 standard deviations.

    With the ring's clip at least the L2 clip, the noise sum's standard deviation is at most about
    ``z * 2^(b-h-1) / shares`` levels, and it decodes exactly while below ``2^(b-1) (1 - 2^-h)``.
    """
    return int(math.ceil(math.log2(1.0 + 10.0 * noise_multiplier / max(shares, 1)))) + 1
