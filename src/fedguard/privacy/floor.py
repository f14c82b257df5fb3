"""A client's privacy floor: what its own noise guarantees against a malicious server (issue 13).

A networked client without ``--config`` takes every DP setting from the server. A malicious server
can therefore weaken the noise a client adds -- a huge ``dp.noise_shares``, a tiny
``dp.noise_multiplier``, ``dp.mode=none``, central noise it adds itself, ``secure.min_survivors``
or ``dp.colluding_clients`` that shrink each share -- and control Sybil clients whose shares it
knows. :class:`PrivacyFloor` (``fedguard client --privacy-floor EPSILON``) makes the client compute,
before training, the epsilon that the noise its *own* code will add (plus the shares of
``trusted_honest`` other honest clients the operator chooses to trust; default 0: under a malicious
server with Sybil clients only the client's own noise counts) gives against the server, and refuse
to take part when that epsilon exceeds the floor or when no noise of its own protects it.

The accounting (dp-accounting, through :mod:`fedguard.privacy.accountant`) is per release:

* ``sample`` (DP-SGD): every local step is a Gaussian release of noise ``sigma / sqrt(shares)``
  (times ``sqrt(1 + trusted)`` for distributed noise) on a Poisson sample of the client's examples.
  The client draws that sample with its own secret coins (Abadi et al. 2016), so amplification holds
  against the server.
* ``local``: one Gaussian release per round at ``sigma / 2`` (replace-one sensitivity ``2 S``).
* ``client`` with distributed noise (Kairouz, Liu, Steinke 2021): one release per round of
  ``z sqrt((1 + trusted) / shares)``; the server picks the sample, so no amplification -- except with
  ``dp.client_sampling=self``, where the client's own secret coin decides and its noise share hides
  the coin's outcome even from a server that knows every other summand.
* central noise (``client``, ``ftrl``) is added by the server itself: nothing holds against it.

Every round of ``run.rounds`` is assumed to include this client (the server chooses), and
:meth:`PrivacyFloor.guard` refuses training requests beyond ``run.rounds``, so a server cannot spend
more than it declared. ``delta`` is the configuration's (resolved as the ledger resolves it), or the
floor's own when that is smaller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fedguard.core.pipeline import ConfigurationError
from fedguard.privacy.accountant import GaussianStep, default_delta, epsilon, history_of
from fedguard.privacy.dpfedavg import DistributedNoise, SelfSample
from fedguard.privacy.dpsgd import DPSGD, DPSGDPlan, DPSGDReport
from fedguard.privacy.local_dp import LocalGaussian

#: the client's state key counting the training requests it answered under a floor
FITS_KEY = "privacy_floor_fits"


@dataclass(frozen=True)
class OwnNoise:
    """The releases one round of this client's own (and trusted) noise makes, as the accountant sees them."""

    step: GaussianStep
    per_round: int
    #: the settings that decide the figure, as the refusal names them
    setting: str


@dataclass(frozen=True)
class PrivacyFloor:
    """Refuse a server configuration under which this client's own noise gives more than ``epsilon``.

    Attributes:
        epsilon: the largest epsilon against the server this client accepts.
        trusted_honest: other honest clients whose noise shares reach every sum this client is in
            (0: a malicious server may fill every round with Sybils; only the client's own share counts).
        delta: the delta to account at when smaller than the configuration's (0: the configuration's).
    """

    epsilon: float
    trusted_honest: int = 0
    delta: float = 0.0

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or self.trusted_honest < 0 or not 0 <= self.delta < 1:
            raise ConfigurationError(
                f"privacy floor: epsilon must be > 0, trusted honest clients >= 0 and 0 <= delta < 1; got "
                f"{self.epsilon}, {self.trusted_honest}, {self.delta}"
            )

    def check(self, config: Any, app: Any, client_sizes: Sequence[int]) -> float:
        """The epsilon this client's own noise gives against the server; raises :class:`ConfigurationError`
        (naming the setting, the epsilon and the fix) when it exceeds the floor or no noise protects it."""
        own = own_noise(config, app, self.trusted_honest)
        delta = self.resolve_delta(config, client_sizes or [len(app.data)] * config.data.num_clients)
        rounds = int(config.run.rounds)
        value = epsilon(history_of([(own.step, own.per_round * rounds)]), delta, config.dp.accountant)
        if value > self.epsilon:
            trusted = f" and {self.trusted_honest} trusted honest clients' shares" if self.trusted_honest else ""
            raise ConfigurationError(
                f"privacy floor: the server's configuration ({own.setting}) gives this client epsilon {value:.4g} "
                f"against the server (delta {delta:.3g}, {rounds} rounds, its own noise{trusted} only), above the "
                f"floor {self.epsilon:g}. Fix: ask the server's operator for more noise per client (a larger "
                "dp.noise_multiplier, fewer dp.noise_shares, fewer run.rounds), or accept a larger --privacy-floor."
            )
        return value

    def resolve_delta(self, config: Any, client_sizes: Sequence[int]) -> float:
        """The configuration's delta (dp.delta, or the automatic rule delta < 1/N), capped by the floor's."""
        dp = config.dp
        records = sum(client_sizes) if dp.mode == "sample" else int(config.data.num_clients)
        delta = dp.delta if dp.delta > 0 else default_delta(max(records, 1))
        return min(delta, self.delta) if self.delta > 0 else delta

    def guard(self, rounds: int, handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """``handler`` (the client's ``fit(msg, ctx)``) refusing requests beyond ``rounds``: the floor's epsilon
        counts ``run.rounds`` releases; a server asking for more would spend beyond it. The count lives in the
        client's state (``ctx.state``), so a client restarted with ``--state-dir`` keeps it."""

        def guarded(msg: Any, ctx: Any) -> Any:
            answered = int(ctx.state.get(FITS_KEY, 0))
            if answered >= rounds:
                raise ConfigurationError(
                    f"privacy floor: this client already trained in run.rounds={rounds} rounds, all its floor "
                    "allows; it answers no further training request"
                )
            reply = handler(msg, ctx)
            ctx.state[FITS_KEY] = answered + 1
            return reply

        return guarded


def own_noise(config: Any, app: Any, trusted_honest: int = 0) -> OwnNoise:
    """The noise the client's built mechanism adds itself, read from ``app`` (what its code will run).

    Raises :class:`ConfigurationError` when DP is off or the noise is the server's (central, DP-FTRL).
    """
    dp = config.dp
    if dp.mode == "none":
        raise ConfigurationError(
            "privacy floor: the server's configuration has dp.mode=none, so this client adds no noise and no epsilon "
            "holds against the server. Fix: the server must run dp.mode=sample or local, or client with "
            "dp.noise_placement=distributed under secure.mode=secagg; or run this client without --privacy-floor."
        )
    if dp.mode == "sample":
        return _sample_noise(_dpsgd_plan(app), len(app.data), trusted_honest)
    if dp.mode == "local":
        step = _find(app.pipeline.client_steps, LocalGaussian)
        if step is not None:
            sigma = step.ledger_noise_multiplier
            return OwnNoise(GaussianStep(sigma, 1.0), 1, f"dp.mode=local, dp.noise_multiplier={2 * sigma:.4g}")
        raise ConfigurationError("privacy floor: dp.mode=local but this client's pipeline adds no local noise")
    if dp.mode == "client" and dp.noise_placement == "distributed":
        return _client_noise(app, trusted_honest)
    raise ConfigurationError(
        f"privacy floor: dp.mode={dp.mode} with dp.noise_placement={dp.noise_placement}: the server adds the noise "
        "itself after seeing this client's clipped update, so nothing holds against it (epsilon_server is "
        "infinite). Fix: the server must use dp.noise_placement=distributed with secure.mode=secagg (client), "
        "or dp.mode=sample/local; or run this client without --privacy-floor."
    )


def _find(steps: Sequence[Any], kind: type) -> Any:
    """The first step of type ``kind`` (None when there is none)."""
    return next((s for s in steps if isinstance(s, kind)), None)


def _dpsgd_plan(app: Any) -> DPSGDPlan:
    """The DP-SGD plan the client's trainer draws noise with (its report step's, as a fallback)."""
    owner = getattr(getattr(app.trainer, "gradient", None), "__self__", None)
    if isinstance(owner, DPSGD):
        return owner.plan
    report = _find(app.pipeline.client_steps, DPSGDReport)
    if report is None:
        raise ConfigurationError("privacy floor: dp.mode=sample but this client's trainer adds no DP-SGD noise")
    return report.plan


def _sample_noise(plan: DPSGDPlan, n: int, trusted_honest: int) -> OwnNoise:
    """DP-SGD: each step's own share (all of it with local noise), on the client's own Poisson sample."""
    honest = 1.0 if plan.noise_shares <= 1 else min(1.0 + trusted_honest, plan.noise_shares)
    z = plan.noise_multiplier * math.sqrt(honest / plan.noise_shares)
    setting = (f"dp.mode=sample, dp.noise_multiplier={plan.noise_multiplier:.4g}, noise shares "
               f"{plan.noise_shares:g}, sample rate {plan.rate(n):.4g}, {plan.local_steps(n)} steps per round")
    return OwnNoise(GaussianStep(z, plan.rate(n)), plan.local_steps(n), setting)


def _client_noise(app: Any, trusted_honest: int) -> OwnNoise:
    """Client-level distributed noise: the own share (ring or float), amplified only by the client's own coin."""
    steps = app.pipeline.client_steps
    noise = _find(steps, DistributedNoise)
    if noise is None:  # under SecAgg+ the share is discrete, added in the ring
        noise = getattr(getattr(app.pipeline.aggregator, "settings", None), "ring_noise", None)
    if noise is None:
        raise ConfigurationError("privacy floor: dp.noise_placement=distributed but this client adds no noise share")
    shares = float(noise.shares)
    z = noise.noise_multiplier * math.sqrt(min(1.0 + trusted_honest, shares) / shares)
    coin = _find(steps, SelfSample)
    rate = coin.rate if coin is not None else 1.0
    sampling = f"self-sampling at rate {rate:.4g}" if coin is not None else "the server picks the sample"
    setting = (f"dp.mode=client, dp.noise_multiplier={noise.noise_multiplier:.4g} split into {shares:g} shares "
               f"(dp.noise_shares, or secure.min_survivors less dp.colluding_clients), {sampling}")
    return OwnNoise(GaussianStep(z, rate), 1, setting)
