"""The update pipeline: small steps chained between a client's local update and the new model.

Like optax's ``chain`` and TensorFlow Federated's aggregator factories, each privacy, security
or robustness mechanism is a step with a place in one pipeline:

* client steps transform a client's update before it leaves the client (clip, noise,
  compress, mask, encrypt);
* exactly one :class:`Aggregator` turns the clients' replies into one aggregate update
  (weighted mean, robust rules, secure sum, encrypted sum);
* server steps transform the aggregate (central DP noise);
* a :class:`ServerOptimizer` applies it to the global model (FedAvg, FedAdam, ...);
* a :class:`PrivacyLedger` accounts for what each round spent.

:meth:`UpdatePipeline.validate` refuses invalid combinations when the run is configured,
before any training.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedguard.core.algorithm import Algorithm, ModelDelta
from fedguard.core.communicator import Communicator
from fedguard.core.messages import Message
from fedguard.core.types import Params


class ConfigurationError(ValueError):
    """An invalid configuration or combination of mechanisms, found before training."""


@dataclass
class ClientContext:
    """What a client step may read or write about the current client and round."""

    client_id: int
    round: int
    num_examples: int
    generator: torch.Generator
    #: the fit instruction's metadata (what the server broadcast this round)
    instructions: dict[str, Any]
    #: persistent client state (tensors or JSON values), saved between rounds
    state: dict[str, Any]
    #: metadata to send back with the update
    reply_meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerContext:
    """What a server step may read about the current round."""

    round: int
    sampled: list[int]
    completed: list[int]
    population: int
    generator: torch.Generator
    log: Callable[[str], None] = print


class ClientStep:
    """A transform applied by each client to its update before sending it."""

    name = "client-step"
    #: True when the server can no longer read individual updates after this step
    hides_individual_updates = False

    def configure(self, round: int, instructions: dict[str, Any]) -> None:
        """Server side: add what clients need for this round to the broadcast metadata."""

    def local_data(self, data: Any, ctx: ClientContext) -> Any:
        """Client side, before local training: the examples (an ``ArrayDataset``) this client trains on this
        round; a simulated data-poisoning attacker (label flipping, BadNets) returns altered ones."""
        return data

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        """Client side: transform the update."""
        return update

    def observe_replies(self, replies: list[Message], ctx: ServerContext) -> None:
        """Server side: read what this step's clients reported (e.g. for adaptive clipping)."""

    def client_handlers(self) -> dict[str, Callable[..., Message]]:
        """Extra message kinds this step answers on the client (e.g. key exchange)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class ServerStep:
    """A transform of the aggregate update on the server (e.g. central DP noise)."""

    name = "server-step"

    def apply(self, delta: Params, ctx: ServerContext) -> Params:
        return delta

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class AggregateResult:
    """The outcome of one round's aggregation."""

    delta: Params | None
    completed: list[int]
    failed: dict[int, str]
    weight: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    replies: list[Message] = field(default_factory=list)
    aborted: str | None = None


class Aggregator(ABC):
    """Collects the sampled clients' updates through the communicator and combines them."""

    name = "aggregator"
    #: True when the rule needs to read each client's update in the clear (Krum, median...)
    needs_individual_updates = False
    #: True when the server never sees individual updates (secure sum, encrypted sum)
    hides_individual_updates = False

    @abstractmethod
    def aggregate(
        self,
        comm: Communicator,
        round: int,
        fit_messages: dict[int, Message],
        like: Params,
        ctx: ServerContext,
    ) -> AggregateResult:
        """Send ``fit_messages``, collect replies, return the aggregate update."""

    def client_handlers(self) -> dict[str, Callable[..., Message]]:
        """Extra message kinds this aggregator's protocol needs clients to answer."""
        return {}

    def client_finalize(self, update: Params, ctx: ClientContext) -> tuple[Params, dict[str, Any]]:
        """Client side, last step: encode the update for this aggregator (mask, encrypt)."""
        return update, {}


class ServerOptimizer(ABC):
    """Applies the aggregate update (the pseudo-gradient's negative) to the global model."""

    name = "server-optimizer"

    @abstractmethod
    def step(self, params: Params, delta: Params) -> Params:
        """New global parameters from the current ones and the aggregate update."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class PrivacyLedger:
    """Accounts for privacy spent; the default spends nothing and reports nothing."""

    name = "none"

    def record_round(self, ctx: ServerContext, replies: list[Message]) -> None:
        """Account for one completed round."""

    def report(self) -> dict[str, Any]:
        """Privacy figures so far (empty when no DP mechanism is on)."""
        return {}

    def would_exceed_budget(self, next_round: int) -> bool:
        """True when running ``next_round`` would spend beyond the configured budget."""
        return False

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@dataclass
class UpdatePipeline:
    """The federated algorithm, client steps, one aggregator, server steps, a server optimiser and a ledger.

    The algorithm (:mod:`fedguard.core.algorithm`) decides what a client computes and sends and
    how the server applies the aggregate; the steps in between see one named-tensor payload.
    """

    aggregator: Aggregator
    server_optimizer: ServerOptimizer
    client_steps: list[ClientStep] = field(default_factory=list)
    server_steps: list[ServerStep] = field(default_factory=list)
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)
    algorithm: Algorithm = field(default_factory=ModelDelta)

    def validate(self) -> None:
        """Refuse combinations that cannot work, saying why and what to use instead."""
        if self.ledger.name != "none" and self.algorithm.sends_extra() and self.algorithm.extra_accounting() is None:
            raise ConfigurationError(
                f"algorithm {self.algorithm.name!r} sends tensors beyond the model update (its "
                f"'{self.algorithm.name}/...' payload parts), and differential privacy ({self.ledger.name}) would clip "
                "and account for the model update only. Use an algorithm whose payload is the model update "
                "(fedavg, fedprox, feddyn, ditto, fedper), or drop the dp section."
            )
        hiders = [s.name for s in self.client_steps if s.hides_individual_updates]
        if self.aggregator.hides_individual_updates:
            hiders.append(self.aggregator.name)
        if hiders and self.aggregator.needs_individual_updates:
            raise ConfigurationError(
                f"aggregator {self.aggregator.name!r} needs each client's update in the clear, "
                f"but {', '.join(hiders)} hides individual updates from the server. Use a rule "
                "that works on sums (FedAvg, with client-side clipping and distributed DP noise "
                "for robustness and privacy), or drop secure aggregation/encryption."
            )

    def client_handlers(self) -> dict[str, Callable[..., Message]]:
        """All extra message kinds clients must answer for this pipeline."""
        handlers: dict[str, Callable[..., Message]] = {}
        for step in self.client_steps:
            handlers.update(step.client_handlers())
        handlers.update(self.aggregator.client_handlers())
        return handlers

    def describe(self) -> dict[str, Any]:
        """Names of the steps, in order, for the run record."""
        return {
            "algorithm": self.algorithm.name,
            "client_steps": [s.name for s in self.client_steps],
            "aggregator": self.aggregator.name,
            "server_steps": [s.name for s in self.server_steps],
            "server_optimizer": self.server_optimizer.name,
            "ledger": self.ledger.name,
        }
