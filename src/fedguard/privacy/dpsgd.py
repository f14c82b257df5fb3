"""Sample-level DP: DP-SGD (Abadi et al. 2016) inside each client's local training.

Each local step takes a Poisson sample of the client's examples (each example independently
with probability ``q``), clips every example's gradient to norm ``C``, adds Gaussian noise
of standard deviation ``sigma * C`` to the sum and divides by the *expected* batch size
``q * n`` (a fixed denominator, so that one example changes the result by at most ``C / (q n)``).

Distributed noise (``noise_shares = K``): with one local step per round, a fixed ``q`` and
example-weighted FedAvg, the aggregate is ``(sum of all clipped gradients + sum of noises) /
(q N)``; if each of ``K`` clients adds ``sigma * C / sqrt(K)``, the sum carries ``sigma * C``:
DP-SGD on the union of the clients' data, for a server that only sees the secure sum. Under
SecAgg+ (``in_ring``) the step here is clipped and *un-noised*: each client's share is discrete
Gaussian integer noise added to its quantized update inside the ring
(:class:`~fedguard.privacy.distributed.DPSGDRingNoise`, Kairouz, Liu, Steinke 2021), so no float
noise exists on the client and the server unmasks only the noisy sum.
The client reports ``(q, sigma, steps)`` with its update; the server's ledger composes each
client's own steps over every round it took part in.

:class:`DPSGD` plugs into :class:`~fedguard.algorithms.local_sgd.LocalSGD` as its batch
sampler and gradient estimator; :class:`DPSGDReport` is the client step that reports.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedguard.pipeline.base import ClientContext, ClientStep
from fedguard.privacy.noise import Randomness, SecureRandom
from fedguard.privacy.per_example import FastClippedSum, VmapClippedSum
from fedguard.types import Params

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DPSGDPlan:
    """DP-SGD settings shared by every client; a client's own rate and steps follow from its size.

    ``sample_rate`` 0 means ``batch_size / n`` (expected batch ``batch_size``); ``steps`` 0
    means ``epochs`` passes, i.e. ``ceil(epochs / q)`` steps per round. ``steps_limit``
    caps steps as ``train.max_steps`` does.
    """

    noise_multiplier: float
    clip: float
    sample_rate: float = 0.0
    batch_size: int = 32
    steps: int = 0
    epochs: int = 1
    steps_limit: int | None = None
    #: distributed noise: each client adds 1/noise_shares of the noise variance
    noise_shares: float = 1.0
    #: the shares are added as discrete noise in the SecAgg+ ring, not here (one un-noised step)
    in_ring: bool = False

    def rate(self, n: int) -> float:
        """Poisson sampling rate of a client with ``n`` examples."""
        if self.sample_rate > 0:
            return min(1.0, self.sample_rate)
        return min(1.0, self.batch_size / max(n, 1))

    def local_steps(self, n: int) -> int:
        """Local DP-SGD steps per round of a client with ``n`` examples."""
        steps = self.steps or math.ceil(self.epochs / self.rate(n) - 1e-9)
        return min(steps, self.steps_limit) if self.steps_limit else steps


class DPSGD:
    """Poisson batches and clipped, noised gradients: LocalSGD's ``sampler`` and ``gradient``.

    One object serves one client at a time (clients train one after another in a process):
    :meth:`sample` records the client's expected batch size, which :meth:`gradient` divides by.
    """

    def __init__(
        self, plan: DPSGDPlan, engine: FastClippedSum | VmapClippedSum, source: Randomness | None = None
    ) -> None:
        self.plan, self.engine = plan, engine
        #: where the Poisson masks and the noise come from (the client's own secret by default)
        self.source: Randomness = source or SecureRandom()
        self._expected_batch = 1.0
        self._loss_sum, self._loss_count = 0.0, 0

    def sample(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """``local_steps(n)`` Poisson samples of ``range(n)`` at rate ``rate(n)``."""
        q = self.plan.rate(n)
        self._expected_batch = q * n
        self._loss_sum, self._loss_count = 0.0, 0
        for _ in range(self.plan.local_steps(n)):
            mask = self.source.uniform(n, generator) < q
            yield mask.nonzero().squeeze(1)

    def gradient(
        self, loss_of: Any, params: Params, batch: Batch, generator: torch.Generator
    ) -> tuple[list[torch.Tensor], float]:
        """(clipped sum + N(0, (sigma C)^2)) / (q n), and the batch's mean loss.

        An empty Poisson batch still takes a (noise-only) step, as the analysis requires; its
        loss is reported as the mean of the client's batches so far, leaving the mean unchanged.
        With ``plan.in_ring`` no noise is drawn: clipped sum / (q n) (the ring adds the share).
        """
        plan = self.plan
        if batch[0].shape[0] == 0:
            sums = [torch.zeros_like(v) for v in params.values()]
            loss = self._loss_sum / self._loss_count if self._loss_count else float("nan")
        else:
            result = self.engine(params, batch, plan.clip)
            sums, loss = result.grads, result.loss
            self._loss_sum, self._loss_count = self._loss_sum + loss, self._loss_count + 1
        if plan.in_ring:
            with torch.no_grad():
                return [s / self._expected_batch for s in sums], loss
        std = plan.noise_multiplier * plan.clip / math.sqrt(plan.noise_shares)
        noise = gaussian_like(dict(zip(params, sums, strict=True)), std, generator, self.source)
        with torch.no_grad():
            grads = [(s + noise[k]) / self._expected_batch for k, s in zip(params, sums, strict=True)]
        return grads, loss


def gaussian_like(
    tensors: Params, std: float, generator: torch.Generator, source: Randomness | None = None
) -> Params:
    """``N(0, std^2)`` noise shaped like each tensor, drawn in sorted-name order from ``source``
    (:class:`~fedguard.privacy.noise.SecureRandom` when None; ``generator`` serves the seeded source).

    The order of a received update's tensors can differ between processes (it follows the
    wire format's map), so a fixed order keeps runs reproducible from the seed. The noise is
    drawn on the generator's device (the CPU) and moved to each tensor's: the same noise on
    every device.
    """
    source = source or SecureRandom()
    return {
        k: (source.normal(tuple(tensors[k].shape), tensors[k].dtype, generator) * std).to(tensors[k].device)
        for k in sorted(tensors)
    }


class DPSGDReport(ClientStep):
    """Client step: tell the server's ledger the (q, sigma, steps) this client's DP-SGD used."""

    name = "dp-sgd"

    def __init__(self, plan: DPSGDPlan) -> None:
        self.plan = plan

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """Leave the update unchanged; add the DP-SGD parameters to the reply."""
        n = ctx.num_examples
        ctx.reply_meta["dp_sgd"] = {
            "sample_rate": self.plan.rate(n),
            "noise_multiplier": self.plan.noise_multiplier,
            "steps": self.plan.local_steps(n),
        }
        return update
