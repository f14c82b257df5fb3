"""Local DP: every client clips and noises its own update before it leaves the client.

For a server that is not trusted at all: each update the server sees is already a Gaussian
mechanism's output. An update clipped to L2 norm ``S`` can be replaced by any other within
``2 S`` of it, so noise of standard deviation ``sigma * S`` is a Gaussian mechanism with
multiplier ``sigma / 2`` relative to that sensitivity (what the ledger charges per round).
The price is accuracy: the noise is not averaged down by a sum before it is released.
"""

from __future__ import annotations

from fedguard.pipeline.base import ClientContext, ClientStep
from fedguard.privacy.dpfedavg import clip_update
from fedguard.privacy.dpsgd import gaussian_like
from fedguard.privacy.noise import Randomness, SecureRandom
from fedguard.types import Params


class LocalGaussian(ClientStep):
    """Clip the update to ``clip`` and add ``N(0, (noise_multiplier * clip)^2)`` on the client."""

    name = "local-dp"

    def __init__(self, clip: float, noise_multiplier: float, source: Randomness | None = None) -> None:
        self.clip, self.noise_multiplier = clip, noise_multiplier
        self.source: Randomness = source or SecureRandom()

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """The clipped, noised update (noise from the client's own secret source)."""
        clipped, _ = clip_update(update, self.clip)
        noise = gaussian_like(clipped, self.noise_multiplier * self.clip, ctx.generator, self.source)
        return {k: v + noise[k] for k, v in clipped.items()}

    @property
    def ledger_noise_multiplier(self) -> float:
        """The multiplier relative to the replace-one sensitivity ``2 * clip``."""
        return self.noise_multiplier / 2.0


class PublicReply(ClientStep):
    """Nothing un-noised beside a DP client's update: the training metrics stay on the client, and
    the example count sent is a public value.

    ``count = "registered"`` (sample-level DP) sends the client's registered dataset size, which the
    server already holds in its registry and checks claims against (DP-SGD treats a client's
    dataset size as public, as Opacus and TF Privacy do: it sets the sampling rate); ``count =
    "one"`` (local DP, which protects a client's whole dataset, its size included) sends 1, so the
    server weights updates uniformly. Under secure aggregation both travel masked or not at all.
    """

    name = "dp-public-reply"

    def __init__(self, count: str) -> None:
        if count not in ("registered", "one"):
            raise ValueError(f"count must be 'registered' or 'one', got {count!r}")
        self.count = count

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """Leave the update; replace the reply's metrics and count by public values."""
        ctx.reply_meta["metrics"] = {}
        ctx.reply_meta["num_examples"] = ctx.num_examples if self.count == "registered" else 1
        return update
