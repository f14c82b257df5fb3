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

Sample-level (DP-SGD) shares, :class:`DPSGDRingNoise`: with ``dp.mode = sample``, one local step per
round, a fixed Poisson rate ``q`` and example-weighted FedAvg, the SecAgg+ sum of the clients'
encoded updates ``w/M * (-lr (sum of clipped gradients) / (q n))`` (``w = n`` examples, ``M`` =
``secure.max_weight``) is one DP-SGD step on the union of their data (Abadi et al. 2016). Adding or
removing one example moves it by at most ``lr C / (q M)`` in L2, so its sensitivity in levels is
``Delta = lr C / (q M step) + sqrt(d)``, and each client's discrete Gaussian share is
``z Delta / sqrt(shares)``, the client-level sizing with ``S`` replaced by ``lr C / q`` and the
weight ratio ``w/M`` by ``w / (M n)``. The client trains on the clipped, un-noised step; the noise
exists only as integers inside the ring.

Choice of the quantization step: the rounding term ``sqrt(d)`` (each coordinate rounds by less than
one level) is charged to every share, so the noise is ``1 + r`` times what the same ``z`` needs in
floats, with ``r = sqrt(d) step q M / (lr C)``. With ``L = floor((2^(b-h) - 1) / n)`` levels per
client and ``step = 2 clip / L``, ``r`` halves with every ring bit: at 32 bits, 100 clients, a
few hundred thousand parameters and ``lr C / (q M)`` around 1e-2, ``r`` is below 1%.
:func:`rounding_excess` computes ``r`` before training and the build refuses ``r > 0.1`` (the
noise would be more than 10% above the float shares' for the same epsilon) with the fix: more
``secure.ring_bits`` or a smaller ``secure.clip``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedguard.algorithms.lr_schedule import read_lr_scale
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

    def ratio(self, ctx: object) -> float:
        """The factor from ``clip`` to the L2 sensitivity of the encoded vector: ``w/M`` (a clipped update)."""
        return ctx.weight / ctx.max_weight  # type: ignore[attr-defined]

    def max_ratio(self) -> float:
        """The largest :meth:`ratio` a client can have (for the server's range check)."""
        return 1.0

    def bound(self, clients: int, levels: int) -> int:
        """Twelve standard deviations of the noise sum: what the server's range check lets through."""
        sigma = self.sigma(2.0 * self.ring_clip / levels, self.max_ratio(), self.dimension)
        return int(12.0 * math.sqrt(max(clients, 1)) * sigma) + 1

    def sample(self, ctx: object) -> np.ndarray:
        """This client's share for ``ctx.length`` coordinates (secure uniforms; exact integers)."""
        sigma = self.sigma(ctx.step, self.ratio(ctx), ctx.length)  # type: ignore[attr-defined]
        return discrete_gaussian(sigma, int(ctx.length))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class DPSGDRingNoise(DiscreteGaussianRingNoise):
    """A client's share of one DP-SGD step's distributed discrete Gaussian noise, in levels (module doc).

    ``clip`` is C, the per-example gradient clip (dp.clip). Extra attributes:
        sample_rate: q, the fixed Poisson rate the client's step divides by (``q n``).
        lr: the local learning rate (train.lr), times the round's ``lr_scale`` when sampled.
        max_weight: M, secure.max_weight (the encoding sends ``w/M * update``).
    """

    sample_rate: float = 1.0
    lr: float = 1.0
    max_weight: int = 1
    name: str = "distributed discrete Gaussian (DP-SGD step)"

    def ratio(self, ctx: object) -> float:
        """``w/M * lr / (q n)``: one example's clipped gradient C moves the encoded step by C times this."""
        client = ctx.client  # type: ignore[attr-defined]
        lr = self.lr * read_lr_scale(client.instructions)
        return ctx.weight / ctx.max_weight * lr / (self.sample_rate * client.num_examples)  # type: ignore[attr-defined]

    def max_ratio(self) -> float:
        """``lr / (q M)``: with example weights ``w = n`` every client's ratio at lr_scale at most 1."""
        return self.lr / (self.sample_rate * self.max_weight)


def rounding_excess(sensitivity: float, levels_step: float, dimension: int) -> float:
    """``r = sqrt(d) step / sensitivity``: how much the rounding term adds to the sensitivity in levels."""
    return math.sqrt(dimension) * levels_step / sensitivity


def headroom_bits(noise_multiplier: float, shares: int) -> int:
    """Free top bits for the noise sum of at least ``shares`` clients to stay within 10 standard deviations.

    With the ring's clip at least the L2 clip, the noise sum's standard deviation is at most about
    ``z * 2^(b-h-1) / shares`` levels, and it decodes exactly while below ``2^(b-1) (1 - 2^-h)``.
    """
    return int(math.ceil(math.log2(1.0 + 10.0 * noise_multiplier / max(shares, 1)))) + 1
