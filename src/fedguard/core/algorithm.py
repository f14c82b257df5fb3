"""The federated algorithm as an object: what the server sends, what a client computes, what the server does with it.

In the spirit of fedjax's ``FederatedAlgorithm(init, apply)`` and pfl's ``train_one_user`` +
``process_aggregated_statistics``, an :class:`Algorithm` is four functions around the update
pipeline of :mod:`fedguard.core.pipeline`:

1. :meth:`~Algorithm.server_init`: the algorithm's server state besides the model (SCAFFOLD's
   global control variate, FedDyn's ``h``); empty for FedAvg;
2. :meth:`~Algorithm.broadcast`: the tensors (the model, plus e.g. the control variate) and
   small JSON metadata of a round's fit message;
3. :meth:`~Algorithm.client_update`: from the received tensors, the client's
   :class:`~fedguard.core.pipeline.ClientContext` (its persistent state included) and its
   :class:`LocalTraining` (task, model, data, trainer) -> a :class:`ClientResult`: one payload
   of named tensors, metrics, and the algorithm's new client state;
4. :meth:`~Algorithm.server_apply`: the aggregated payload (after the pipeline's aggregator and
   server steps) -> new model and server state.

The payload goes through the pipeline's client steps (clip, noise, mask, encrypt) and the one
aggregator exactly as FedAvg's update did, so secure aggregation and robust rules work on
whatever an algorithm sends. Tensors of the payload that are not the model update are named
``ALGORITHM/...`` (a ``/`` never appears in a parameter name); :meth:`Algorithm.extra_accounting`
says how differential privacy accounts for them, and
:meth:`~fedguard.core.pipeline.UpdatePipeline.validate` refuses DP over a payload with parts
that nobody accounts for.

:class:`ModelDelta` is the base every built-in algorithm extends: train locally from the
broadcast model, send ``trained - global``, apply the (weighted) mean with the server optimiser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from fedguard.core.types import Params

#: separates an algorithm's own tensors (``scaffold/c/conv1.weight``) from the model's names
SEP = "/"


class Trainer(Protocol):
    """A client's local training (:class:`fedguard.algorithms.local_sgd.LocalSGD`): the one loop
    with its slots, which privacy mechanisms and algorithms fill and tasks' own loops read."""

    lr: float
    #: this round's factor on ``lr`` (the server's schedule)
    lr_scale: float
    weight_decay: float
    prox_mu: float
    #: cap on local steps (None: as many as the sampler yields)
    steps_limit: int | None
    #: ``sampler(n, generator)`` yields each step's example indices
    sampler: Any
    #: ``gradient(loss_of, params, batch, generator)`` -> (gradients, mean loss)
    gradient: Any

    def scaled(self, lr_scale: float) -> Trainer:
        """This trainer at the round's learning-rate factor."""
        ...

    def train(
        self, task: Any, model: nn.Module, params: Params, data: Any, generator: torch.Generator
    ) -> tuple[Params, dict[str, float]]:
        """Train from ``params`` on ``data``; new parameters and loss statistics."""
        ...


class LocalTask(Protocol):
    """What an algorithm needs of a task (see :class:`fedguard.tasks.base.Task`)."""

    def local_train(
        self, model: nn.Module, params: Params, data: Any, trainer: Any, generator: torch.Generator
    ) -> tuple[Params, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, params: Params, data: Any) -> dict[str, float]: ...


@dataclass
class LocalTraining:
    """What the client runtime hands an algorithm: its task, model, data and trainer, on its device."""

    task: LocalTask
    model: nn.Module
    #: the client's training examples (an ``ArrayDataset``), already on ``device``
    data: Any
    trainer: Trainer
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def train(self, params: Params, generator: torch.Generator, trainer: Any = None) -> tuple[Params, dict[str, float]]:
        """The task's local update from ``params`` (with ``trainer``, default this client's)."""
        return self.task.local_train(self.model, params, self.data, trainer or self.trainer, generator)

    def evaluate(self, params: Params, data: Any) -> dict[str, float]:
        """The task's metrics of ``params`` on ``data`` (moved to this client's device)."""
        return self.task.evaluate(self.model, params, data.to(self.device))

    def to_device(self, tensors: Params) -> Params:
        """Tensors on this client's device."""
        return {k: v.to(self.device) for k, v in tensors.items()}


@dataclass
class ClientResult:
    """What one client's local computation produced."""

    #: the named tensors sent through the pipeline (the model update, plus ``ALGORITHM/...`` parts)
    payload: Params
    metrics: dict[str, float]
    #: entries to write into the client's persistent state (tensors or JSON values)
    state: dict[str, Any] = field(default_factory=dict)


def model_part(tensors: Params) -> Params:
    """The model's tensors among ``tensors`` (names without ``/``)."""
    return {k: v for k, v in tensors.items() if SEP not in k}


def prefixed(prefix: str, tensors: Params) -> Params:
    """``tensors`` named ``prefix/name``."""
    return {f"{prefix}{SEP}{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: Params) -> Params:
    """The tensors named ``prefix/name``, named ``name``."""
    head = prefix + SEP
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


class Algorithm:
    """A federated algorithm; see the module docstring. Override what differs from FedAvg."""

    name = "algorithm"

    def check(self, task: Any) -> None:
        """Refuse (with ``ConfigurationError``) a task this algorithm cannot train."""

    def extra_accounting(self) -> str | None:
        """How DP accounts for the payload's parts beyond the model update; None when it does not.

        An algorithm whose payload is only the model update never needs to answer.
        """
        return None

    def sends_extra(self) -> bool:
        """Whether the payload holds tensors beyond the model update."""
        return False

    # -- server ---------------------------------------------------------------------------
    def server_init(self, params: Params) -> Params:
        """The algorithm's server state besides the model (tensors; checkpointed)."""
        return {}

    def broadcast(self, params: Params, state: Params, round: int) -> tuple[Params, dict[str, Any]]:
        """The tensors and metadata of round ``round``'s fit message."""
        return params, {}

    def payload_like(self, params: Params) -> Params:
        """Tensors with the names, shapes and dtypes of one client's payload (what aggregators check)."""
        return params

    def server_apply(
        self, params: Params, state: Params, aggregate: Params, optimizer: Any, ctx: Any
    ) -> tuple[Params, Params]:
        """New (model, server state) from the aggregated payload; ``optimizer`` is the pipeline's."""
        return optimizer.step(params, aggregate), state

    # -- client ---------------------------------------------------------------------------
    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        """One client's round: ``received`` are the broadcast tensors on the client's device."""
        raise NotImplementedError

    def client_evaluate(self, received: Params, ctx: Any, local: LocalTraining, test: Any) -> dict[str, float]:
        """Metrics on the client's own test split; personalised algorithms add ``personalized_*``."""
        return local.evaluate(model_part(received), test)

    def describe(self) -> dict[str, Any]:
        """Settings worth recording with the run."""
        return {"algorithm": self.name}


class ModelDelta(Algorithm):
    """Train locally from the broadcast model and send ``trained - global`` (FedAvg's round).

    The server applies the aggregate (the weighted mean of the updates) with the pipeline's
    server optimiser (FedAvg, FedAdam, ...). Subclasses change the local objective or add state.
    """

    name = "model-delta"

    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        start = model_part(received)
        trained, metrics = local.train(start, ctx.generator)
        with torch.no_grad():  # the update leaves the device here: client steps and the wire work on the CPU
            update = {k: (trained[k] - start[k]).cpu() for k in start}
        return ClientResult(update, metrics)
