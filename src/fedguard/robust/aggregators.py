"""Byzantine-robust aggregation rules on plaintext updates: median, trimmed mean, (multi-)Krum.

Each rule reads every client's update in the clear (``needs_individual_updates``), so none can
run behind secure aggregation or encryption, where the server only learns a sum; that
combination is refused at configuration time. The rules are unweighted: a robust rule that let a
client claim more examples would let it claim more influence.

* coordinate-wise median (Yin et al. 2018): the median of each coordinate over clients;
* coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ``b`` largest and
  ``b`` smallest values (``b = floor(beta * n)``), average the rest;
* Krum / multi-Krum (Blanchard et al. 2017): score each update by the summed squared distances to
  its ``n - f - 2`` nearest other updates; Krum keeps the best-scoring one, multi-Krum averages
  the ``m`` best.
"""

from __future__ import annotations

import torch

from fedguard.algorithms.fedavg import FedAvg, weighted_metrics
from fedguard.messages import Message
from fedguard.pipeline.base import AggregateResult, ServerContext
from fedguard.runtime.base import Communicator
from fedguard.types import Params, flatten, unflatten


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median over clients (dim 0) per coordinate; the mean of the two middle values for even counts."""
    ordered = stack.sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, beta: float) -> torch.Tensor:
    """Per coordinate, the mean after dropping the ``floor(beta * n)`` largest and smallest values."""
    n = stack.shape[0]
    b = int(beta * n)
    if n - 2 * b < 1:
        raise ValueError(f"trimming {b} from each end of {n} updates leaves none")
    return stack.sort(dim=0).values[b : n - b].mean(dim=0)


def krum_scores(stack: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum score of each update: summed squared distances to its ``n - f - 2`` nearest others."""
    n = stack.shape[0]
    k = n - byzantine - 2
    if k < 1:
        raise ValueError(f"Krum needs n > f + 2 updates (n={n}, f={byzantine})")
    dists = torch.cdist(stack.double(), stack.double()).pow(2)
    dists.fill_diagonal_(float("inf"))
    return dists.topk(k, dim=1, largest=False).values.sum(dim=1)


def multi_krum(stack: torch.Tensor, byzantine: int, keep: int) -> tuple[torch.Tensor, list[int]]:
    """The mean of the ``keep`` best-scoring updates (``keep=1``: Krum), and their row indices."""
    scores = krum_scores(stack, byzantine)
    chosen = sorted(scores.argsort()[: max(1, keep)].tolist())
    return stack[chosen].mean(dim=0), chosen


class RobustAggregator(FedAvg):
    """A robust rule over the plaintext updates collected as FedAvg collects them."""

    needs_individual_updates = True

    def __init__(self, rule: str, trim_fraction: float = 0.1, byzantine: int = 1, keep: int = 0) -> None:
        super().__init__("uniform")
        if rule not in ("median", "trimmed-mean", "krum", "multi-krum"):
            raise ValueError(f"unknown robust rule {rule!r}")
        self.rule, self.trim_fraction, self.byzantine, self.keep = rule, trim_fraction, byzantine, keep
        self.name = rule

    def combine(self, updates: list[Params]) -> tuple[Params, list[int]]:
        """The robust aggregate of ``updates`` and the indices of the updates it kept."""
        like = updates[0]  # every update is flattened in this one name order (dict orders may differ)
        stack = torch.stack([flatten({k: u[k] for k in like}).float() for u in updates])
        kept = list(range(len(updates)))
        if self.rule == "median":
            vector = coordinate_median(stack)
        elif self.rule == "trimmed-mean":
            vector = trimmed_mean(stack, self.trim_fraction)
        else:
            keep = 1 if self.rule == "krum" else (self.keep or len(updates) - self.byzantine)
            vector, kept = multi_krum(stack, self.byzantine, keep)
        return unflatten(vector, like), kept

    def aggregate(
        self, comm: Communicator, round: int, fit_messages: dict[int, Message], like: Params, ctx: ServerContext
    ) -> AggregateResult:
        """Collect the plaintext updates, then apply the rule (aborting when too few arrived)."""
        completed, updates, weights, replies, failed = self.collect(comm, round, fit_messages, like, ctx)
        if not updates:
            return AggregateResult(None, [], failed, aborted="no client returned a usable update")
        try:
            delta, kept = self.combine(updates)
        except ValueError as exc:
            return AggregateResult(None, completed, failed, aborted=f"robust rule {self.rule}: {exc}")
        metrics = weighted_metrics(replies, weights)
        metrics["robust_kept"] = float(len(kept))
        return AggregateResult(delta, completed, failed, float(len(updates)), metrics, replies)
