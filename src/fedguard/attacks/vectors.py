"""Model-poisoning attacks as functions of update vectors (ByzFL style: rows of a ``(n, d)`` stack).

Two kinds, as in the literature:

* *non-omniscient* attacks need only the attacker's own update (or nothing): sign flipping, Gaussian
  noise, scaling for model replacement. A hostile client runs them on its side, in simulation and over
  the network alike;
* *omniscient, colluding* attacks see the round's honest updates (``honest``: one row per honest client)
  and all Byzantine clients send the same crafted vector: A Little Is Enough, inner-product manipulation,
  min-max, min-sum and Mimic. They exist in simulation only, where the server hands the adversary the
  honest updates before aggregating (no real adversary sees them all).

Defaults are the papers'; each docstring names the paper and the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

PERTURBATIONS = ("unit-vec", "std", "sign")


def sign_flip(update: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Sign flipping (Damaskinos et al. 2018; Allen-Zhu et al. 2021): send ``-scale * update`` (the papers'
    ``scale = 1``; see :func:`mirror_multiplier` for a scale that turns the mean)."""
    return -scale * update


def mirror_multiplier(n: int, f: int) -> float:
    """``s = 2 (n - f) / f``: the multiplier at which ``f`` colluding updates of ``-s`` times the honest mean
    turn the mean of ``n`` updates into the mirror image of the honest clients' share,
    ``((n - f) - f s) / n = -(n - f) / n`` times the honest mean. The reversal condition ``f s > n - f`` is
    inner-product manipulation's against the mean (Xie et al. 2020's inner-product argument); twice the
    threshold gives the mirror. For IPM (``epsilon = s``) the identity is exact; for sign
    flipping (``scale = s``) it holds in expectation over the Byzantine clients' own updates."""
    if not 1 <= f < n:
        raise ValueError(f"the mirror multiplier needs 1 <= f < n; got n={n}, f={f}")
    return 2.0 * (n - f) / f


def gaussian(like: torch.Tensor, sigma: float, generator: torch.Generator, mu: float = 0.0) -> torch.Tensor:
    """Gaussian attack: a vector of i.i.d. ``N(mu, sigma^2)`` values, ignoring the data (ByzFL's default
    ``mu = 0``, ``sigma = 1``)."""
    return mu + sigma * torch.randn(like.shape, generator=generator, dtype=like.dtype)


def model_replacement_boost(clients: int, attackers: int, server_lr: float = 1.0) -> float:
    """Bagdasaryan et al. 2020's boost ``gamma = n / eta`` for one attacker replacing the global model,
    shared among ``attackers`` colluding clients: ``n / (eta * attackers)``."""
    if clients < 1 or attackers < 1 or server_lr <= 0:
        raise ValueError(f"need clients >= 1, attackers >= 1, server_lr > 0; got {clients}, {attackers}, {server_lr}")
    return clients / (server_lr * attackers)


def scale(update: torch.Tensor, gamma: float) -> torch.Tensor:
    """Scaling / model replacement (Bagdasaryan et al. 2020): the attacker's update ``X - G`` boosted to
    ``gamma (X - G)``, so that averaging with the others' updates leaves roughly ``X``."""
    return gamma * update


def alie_z(n: int, f: int) -> float:
    """A Little Is Enough's ``z_max`` (Baruch et al. 2019): with ``s = floor(n/2 + 1) - f`` supporters
    needed, ``z = Phi^-1((n - s) / n)``."""
    s = math.floor(n / 2 + 1) - f
    p = (n - s) / n
    if not 0.0 < p < 1.0:
        raise ValueError(f"ALIE's z is undefined for n={n}, f={f} (needs 0 < (n - s)/n < 1)")
    return NormalDist().inv_cdf(p)


def alie(honest: torch.Tensor, z: float) -> torch.Tensor:
    """A Little Is Enough (Baruch et al. 2019): per coordinate ``mu_j + z sigma_j`` over the honest
    updates (sample standard deviation), small enough to pass as honest, the same for every attacker."""
    if honest.shape[0] < 2:
        raise ValueError("ALIE needs at least two honest updates to estimate their spread")
    return honest.mean(dim=0) + z * honest.std(dim=0, unbiased=True)


def ipm(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Inner-product manipulation (Xie et al. 2020, "Fall of Empires"): ``-epsilon * mean(honest)``,
    so that the aggregate's inner product with the true gradient turns negative (for the mean when
    ``f epsilon > n - f``; for median and Krum already with a small ``epsilon`` such as 0.1)."""
    return -epsilon * honest.mean(dim=0)


def _deviation(honest: torch.Tensor, mean: torch.Tensor, perturbation: str) -> torch.Tensor:
    if perturbation == "unit-vec":
        return mean / mean.norm().clamp(min=1e-12)
    if perturbation == "std":
        return honest.std(dim=0, unbiased=True)
    if perturbation == "sign":
        return mean.sign()
    raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")


def _largest_gamma(fits, gamma_init: float, tol: float) -> float:
    """Shejwalkar and Houmansadr's search for the largest ``gamma`` with ``fits(gamma)``: start at
    ``gamma_init``, step by half the previous step up on success and down on failure, until the step is
    below ``tol``; returns the last ``gamma`` that fitted (0 when none did)."""
    gamma, step, success = gamma_init, gamma_init, 0.0
    while abs(success - gamma) > tol:
        if fits(gamma):
            success = gamma
            gamma = gamma + step / 2
        else:
            gamma = gamma - step / 2
        step /= 2
    return success


def _check_scale(distance_scale: float) -> None:
    if not distance_scale > 0:
        raise ValueError(f"distance_scale must be > 0, got {distance_scale}")


def min_max(
    honest: torch.Tensor, perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5,
    distance_scale: float = 1.0,
) -> torch.Tensor:
    """Min-max (Shejwalkar and Houmansadr 2021, AGR-agnostic): ``mean - gamma p`` with the largest
    ``gamma`` such that its largest distance to an honest update is at most the largest distance between
    two honest updates. ``p``: ``std`` (the paper's strongest in most settings), ``unit-vec`` or ``sign``.

    ``distance_scale`` multiplies that bound (1: the paper's); the search then starts from
    ``gamma_init * distance_scale``, since the largest ``gamma`` grows about linearly with the bound and the
    search never goes past twice its start."""
    _check_scale(distance_scale)
    h = honest.double()
    mu = h.mean(dim=0)
    p = _deviation(h, mu, perturbation)
    limit = distance_scale * float(torch.cdist(h, h).max())

    def fits(gamma: float) -> bool:
        return float((h - (mu - gamma * p)).norm(dim=1).max()) <= limit

    return (mu - _largest_gamma(fits, gamma_init * distance_scale, tol) * p).to(honest.dtype)


def min_sum(
    honest: torch.Tensor, perturbation: str = "std", gamma_init: float = 10.0, tol: float = 1e-5,
    distance_scale: float = 1.0,
) -> torch.Tensor:
    """Min-sum (Shejwalkar and Houmansadr 2021): ``mean - gamma p`` with the largest ``gamma`` such that
    its sum of squared distances to the honest updates is at most the smallest such sum of an honest
    update (the authors' code: the crafted update then scores better than every honest one).
    ``distance_scale`` multiplies the distances allowed (the bound on squared distances by its square) and
    the search's start, as in :func:`min_max`."""
    _check_scale(distance_scale)
    h = honest.double()
    mu = h.mean(dim=0)
    p = _deviation(h, mu, perturbation)
    limit = distance_scale**2 * float(torch.cdist(h, h).pow(2).sum(dim=1).min())

    def fits(gamma: float) -> bool:
        return float((h - (mu - gamma * p)).pow(2).sum()) <= limit

    return (mu - _largest_gamma(fits, gamma_init * distance_scale, tol) * p).to(honest.dtype)


@dataclass
class Mimic:
    """Mimic (Karimireddy et al. 2022): every attacker copies one honest client, chosen to over-represent
    the direction in which honest updates vary most, which hurts most under heterogeneity while passing
    every distance test. During ``warmup`` rounds the direction ``z`` is estimated by one power-iteration
    step per round on the honest updates' deviations from their mean; then the target is the honest client
    with the largest ``|<x_i - mu, z>|`` and stays fixed (re-chosen only if it stops taking part)."""

    warmup: int = 1
    z: torch.Tensor | None = None
    rounds_seen: int = 0
    target: int | None = None

    def __call__(self, honest: torch.Tensor, honest_ids: list[int], generator: torch.Generator) -> torch.Tensor:
        """The vector to send this round (one row of ``honest``), updating the estimate."""
        dev = honest.double() - honest.double().mean(dim=0)
        if self.z is None:
            z = torch.randn(honest.shape[1], generator=generator, dtype=torch.float64)
            self.z = z / z.norm()
        if self.rounds_seen < self.warmup:
            step = ((dev @ self.z)[:, None] * dev).sum(dim=0)
            if float(step.norm()) > 0:
                t = self.rounds_seen
                z = (t * self.z + step / step.norm()) / (t + 1)
                self.z = z / z.norm().clamp(min=1e-12)
        self.rounds_seen += 1
        if self.rounds_seen > self.warmup and self.target in honest_ids:
            return honest[honest_ids.index(self.target)]
        pick = int((dev @ self.z).abs().argmax())
        if self.rounds_seen >= self.warmup:
            self.target = honest_ids[pick]
        return honest[pick]
