"""The pipeline aggregator for plaintext updates: FedAvg or a robust chain, with an optional simulated
omniscient adversary.

Every robust rule reads each client's update in the clear (``needs_individual_updates``), so none can run
behind secure aggregation or encryption, where the server only learns a sum; that combination is refused
at configuration time. Robust rules are unweighted: a rule that let a client claim more examples would
let it claim more influence.

Order within a round: collect and check the replies as FedAvg does; in simulation only, let the
omniscient adversary replace the Byzantine clients' updates with vectors crafted from the honest ones
(it sees them all, as the attacks of Baruch et al. 2019 or Shejwalkar and Houmansadr 2021 assume); then
the chain (pre-aggregators, rule) or the weighted mean.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from fedguard.algorithms.fedavg import FedAvg, weighted_mean, weighted_metrics
from fedguard.core.communicator import Communicator
from fedguard.core.messages import Message
from fedguard.core.pipeline import AggregateResult, ServerContext
from fedguard.core.types import Params, flatten, unflatten

from .defenses import Chain


class RoundAdversary(Protocol):
    """A server-side, simulation-only adversary that sees the round's updates before aggregation."""

    def tamper(self, round: int, client_ids: list[int], stack: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The stack with the Byzantine clients' rows replaced, and figures for the round's metrics."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def stack_updates(updates: list[Params]) -> tuple[torch.Tensor, Params]:
    """Updates as rows of one float32 matrix, flattened in the first update's name order, and that order."""
    like = updates[0]  # every update is flattened in this one name order (dict orders may differ)
    return torch.stack([flatten({k: u[k] for k in like}).float() for u in updates]), like


class RobustAggregator(FedAvg):
    """FedAvg (``chain=None``, weighted as configured) or a robust chain over the plaintext updates."""

    def __init__(self, chain: Chain | None = None, weighting: str = "examples",
                 adversary: RoundAdversary | None = None) -> None:
        super().__init__("uniform" if chain is not None else weighting)
        self.chain, self.adversary = chain, adversary
        self.name = chain.name if chain is not None else "fedavg"
        self.needs_individual_updates = chain is not None or adversary is not None

    def combine(
        self, updates: list[Params], weights: list[float] | None = None, params: Params | None = None
    ) -> tuple[Params, dict[str, float]]:
        """The chain's aggregate of ``updates`` (or their weighted mean without a chain), and its figures;
        ``params`` is the round's global model (FLTrust trains its own update from it)."""
        if self.chain is None:
            return weighted_mean(updates, weights or [1.0] * len(updates)), {}
        stack, like = stack_updates(updates)
        self.chain.rule.begin_round(params if params is not None else {}, list(like))
        vector, figures = self.chain(stack)
        self.chain.rule.observe(vector)
        # the scale a norm bound or clipping radius is chosen against
        figures["update_norm_median"] = float(stack.norm(dim=1).median())
        return unflatten(vector, like), figures

    def aggregate(
        self, comm: Communicator, round: int, fit_messages: dict[int, Message], like: Params, ctx: ServerContext
    ) -> AggregateResult:
        """Collect the plaintext updates, let the simulated adversary tamper, then apply the rule (aborting
        the round, model unchanged, when the rule cannot work on what arrived)."""
        completed, updates, weights, replies, failed = self.collect(comm, round, fit_messages, like, ctx)
        if not updates:
            return AggregateResult(None, [], failed, aborted="no client returned a usable update")
        metrics: dict[str, float] = {}
        if self.adversary is not None:
            stack, order = stack_updates(updates)
            stack, metrics = self.adversary.tamper(round, completed, stack)
            updates = [unflatten(row, order) for row in stack]
        t0 = time.perf_counter()
        try:
            delta, figures = self.combine(updates, weights, like)
        except ValueError as exc:
            return AggregateResult(None, completed, failed, aborted=f"robust rule {self.name}: {exc}")
        figures["aggregation_s"] = time.perf_counter() - t0
        metrics = {**weighted_metrics(replies, weights), **metrics, **figures}
        return AggregateResult(delta, completed, failed, float(sum(weights)), metrics, replies)

    def state_dict(self) -> dict[str, Any]:
        """The rule's and the adversary's state (centered clipping's centre, Mimic's estimate)."""
        return {
            "rule": self.chain.rule.state_dict() if self.chain is not None else {},
            "adversary": self.adversary.state_dict() if self.adversary is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if self.chain is not None:
            self.chain.rule.load_state_dict(state.get("rule", {}))
        if self.adversary is not None:
            self.adversary.load_state_dict(state.get("adversary", {}))
