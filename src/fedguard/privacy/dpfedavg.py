"""Client-level DP: DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping.

Each sampled client clips its update to L2 norm ``S`` (:class:`ClipUpdate`). The server
turns the uniform mean of the ``n`` completed updates back into their sum, adds Gaussian
noise of standard deviation ``z_update * S`` and divides by the *expected* number of clients
per round ``m = q N`` (a fixed denominator: one client changes the result by at most ``S / m``):
:class:`DPFedAvgNoise`.

Noise placement:

* ``central``: the server adds all the noise (it must be trusted with individual updates);
* ``distributed``: each client adds ``N(0, (z S)^2 / shares)`` to its own clipped update
  (:class:`DistributedNoise`), so that the *sum* carries the full noise when ``shares``
  clients complete; meant to be combined with secure aggregation, which hides the
  individual (weakly noised) updates. When fewer clients complete (dropouts), the sum holds
  less noise: the ledger charges the round with the effective multiplier
  ``z * sqrt(completed / shares)``.

Adaptive clipping (Andrew et al. 2021): the clip norm follows the ``gamma`` quantile of the
update norms, ``S <- S * exp(-eta (b - gamma))``, where ``b`` is the noised fraction of
clients whose update norm was at most ``S``. Each client reports ``1[norm <= S] - 1/2``
(sensitivity 1/2); the server adds ``N(0, sigma_b^2)`` to their sum. The two releases
compose to one Gaussian mechanism with multiplier ``z = (z_update^-2 + (2 sigma_b)^-2)^-1/2``
(Andrew et al., Theorem 1): the configured ``z`` is this total, and the update noise uses
``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.messages import Message
from fedguard.pipeline.base import ClientContext, ClientStep, ConfigurationError, ServerContext, ServerStep
from fedguard.privacy.dpsgd import gaussian_like
from fedguard.privacy.noise import Randomness, SecureRandom
from fedguard.types import Params


def global_norm(update: Params) -> float:
    """L2 norm of all tensors of an update taken together."""
    return math.sqrt(sum(float(update[k].double().pow(2).sum()) for k in sorted(update)))


def clip_update(update: Params, clip: float) -> tuple[Params, float]:
    """The update scaled to norm at most ``clip``, and its norm before clipping."""
    norm = global_norm(update)
    factor = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}, norm


def update_noise_multiplier(total: float, quantile_noise: float) -> float:
    """``z_update`` that, composed with the clip-count release, totals ``total`` (Andrew et al. Thm 1)."""
    if quantile_noise <= 0:
        return total
    rest = total**-2 - (2.0 * quantile_noise) ** -2
    if rest <= 0:
        raise ConfigurationError(
            f"dp.quantile_noise={quantile_noise:g} is too small for a total noise multiplier {total:g}: "
            f"adaptive clipping needs 2 * quantile_noise > noise_multiplier (Andrew et al. 2021)"
        )
    return rest**-0.5


@dataclass
class AdaptiveClip:
    """Quantile tracking of update norms (Andrew et al. 2021): gamma, eta and the count noise sigma_b."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float = 1.0


class ClipUpdate(ClientStep):
    """Clip each client's update to the round's clip norm; with adaptive clipping, move the norm.

    The server broadcasts the round's norm as ``dp_clip``; the client reports whether its
    update fitted (``dp_below_clip``: 1 or 0) when clipping is adaptive. With distributed noise
    (``client_noise``) the client's noise share is sized for the configured ``dp.clip``, so a
    broadcast norm above it (a malicious server widening the sensitivity under the share) is capped.
    """

    name = "dp-clip"

    def __init__(
        self,
        clip: float,
        expected_clients: float,
        adaptive: AdaptiveClip | None = None,
        source: Randomness | None = None,
    ) -> None:
        if clip <= 0:
            raise ConfigurationError(f"dp.clip must be positive, got {clip}")
        self.clip, self.expected_clients, self.adaptive = clip, expected_clients, adaptive
        #: the server's own source for the count noise
        self.source: Randomness = source or SecureRandom()
        self.by_round: dict[int, float] = {}
        #: the clients add the noise (distributed placement): never clip above ``clip``
        self.client_noise = False

    def configure(self, round: int, instructions: dict[str, Any]) -> None:
        """Broadcast this round's clip norm (and remember it for the noise step)."""
        self.by_round[round] = self.clip
        instructions["dp_clip"] = self.clip

    def clip_of_round(self, round: int) -> float:
        """The clip norm clients used in ``round``."""
        return self.by_round.get(round, self.clip)

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """Clip to the broadcast norm (at most ``clip`` under client noise); report the clipping indicator
        when adaptive."""
        clip = float(ctx.instructions.get("dp_clip", self.clip))
        if self.client_noise:
            clip = min(clip, self.clip)
        clipped, norm = clip_update(update, clip)
        if self.adaptive is not None:
            ctx.reply_meta["dp_below_clip"] = 1 if norm <= clip else 0
        return clipped

    def observe_replies(self, replies: list[Message], ctx: ServerContext) -> None:
        """Adaptive clipping: noised fraction of unclipped updates, then the geometric update."""
        if self.adaptive is None:
            return
        a = self.adaptive
        centred = sum(float(m.meta.get("dp_below_clip", 0)) - 0.5 for m in replies)
        noisy = centred + float(self.source.normal((), torch.float64, ctx.generator)) * a.count_noise
        fraction = noisy / self.expected_clients + 0.5
        self.clip = self.clip_of_round(ctx.round) * math.exp(-a.learning_rate * (fraction - a.target_quantile))

    def state_dict(self) -> dict[str, Any]:
        """The current clip norm."""
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.clip = float(state.get("clip", self.clip))


class SelfSample(ClientStep):
    """Client self-sampling: take part in the round with probability ``rate``, by the client's own secret coin.

    A client that is not selected sends a zero update (its noise share is still added, in the ring),
    so under secure aggregation the server learns only the sum and not who was in the sample: the
    amplification by Poisson sampling then holds against the server as well (the sampling is the
    clients', as in the distributed-DP setting of Kairouz, Liu, Steinke 2021).
    """

    name = "dp-self-sample"

    def __init__(self, rate: float, source: Randomness | None = None) -> None:
        self.rate = rate
        self.source: Randomness = source or SecureRandom()

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """The update, or zeros when this client's coin says it sits the round out."""
        if float(self.source.uniform(1, ctx.generator)[0]) < self.rate:
            return update
        return {k: torch.zeros_like(v) for k, v in update.items()}


class DistributedNoise(ClientStep):
    """Distributed DP: each client adds its share ``N(0, (z S)^2 / shares)`` of the noise."""

    name = "dp-distributed-noise"

    def __init__(self, noise_multiplier: float, shares: float, clip: float, source: Randomness | None = None) -> None:
        self.noise_multiplier, self.shares, self.clip = noise_multiplier, shares, clip
        self.source: Randomness = source or SecureRandom()

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """Add this client's share of the noise (from its own secret source), for the clip actually applied."""
        clip = min(float(ctx.instructions.get("dp_clip", self.clip)), self.clip)
        noise = gaussian_like(update, self.noise_multiplier * clip / math.sqrt(self.shares), ctx.generator,
                              self.source)
        return {k: v + noise[k] for k, v in update.items()}


class DPFedAvgNoise(ServerStep):
    """Server: (mean * completed + N(0, (z_update S)^2)) / expected clients.

    With distributed noise ``z_update`` is 0 here (the clients added it): the step only
    replaces the mean over completed clients by the fixed-denominator estimate.
    """

    name = "dp-fedavg"

    def __init__(
        self, clip_step: ClipUpdate, noise_multiplier: float, expected_clients: float, source: Randomness | None = None
    ) -> None:
        self.clip_step, self.noise_multiplier, self.expected_clients = clip_step, noise_multiplier, expected_clients
        #: the server's own source for the central noise
        self.source: Randomness = source or SecureRandom()

    def apply(self, delta: Params, ctx: ServerContext) -> Params:
        """The noised, fixed-denominator aggregate update."""
        completed = len(ctx.completed)
        std = self.noise_multiplier * self.clip_step.clip_of_round(ctx.round)
        noise = gaussian_like(delta, std, ctx.generator, self.source) if std > 0 else {k: 0.0 for k in delta}
        return {k: (v * completed + noise[k]) / self.expected_clients for k, v in delta.items()}
