"""FedPer (Arivazhagan et al. 2019, "Federated Learning with Personalization Layers").

The model is split into a shared body and a head of the last ``algorithm.fedper_head``
parameter tensors (by default the last layer's weight and bias). Each client keeps its own
head in its state store (the global initial head at its first round), trains body and head
together from ``(global body, own head)``, sends only the body's update and keeps the trained
head. The server averages body updates; the global head stays at its initial value (a head is
never shared). Evaluation on the client's own test split (``data.client_test_fraction``)
reports the global model's metrics and those of (global body, own head) as ``personalized_*``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedguard.core.algorithm import ClientResult, LocalTraining, ModelDelta, model_part, prefixed, unprefixed
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.types import Params

NAME = "fedper"
#: the client's own head in its state
HEAD = f"{NAME}/head"


class FedPer(ModelDelta):
    """Shared body, local heads of the last ``head`` parameter tensors; see the module docstring."""

    name = NAME

    def __init__(self, head: int = 2) -> None:
        self.head = head

    def head_names(self, params: Params) -> list[str]:
        """The parameter names that form the local head: the last ``head`` of ``params``, which must be
        in the model's order (``named_parameters()``; a received message's tensors are not)."""
        names = list(params)
        if self.head >= len(names):
            raise ConfigurationError(f"algorithm.fedper_head = {self.head} leaves no shared body in a model of "
                                     f"{len(names)} parameter tensors")
        return names[-self.head:]

    def check(self, task: Any) -> None:
        self.head_names(dict(task.build_model().named_parameters()))

    def payload_like(self, params: Params) -> Params:
        head = set(self.head_names(params))
        return {k: v for k, v in params.items() if k not in head}

    def server_apply(
        self, params: Params, state: Params, aggregate: Params, optimizer: Any, ctx: Any
    ) -> tuple[Params, Params]:
        full = {k: aggregate[k] if k in aggregate else torch.zeros_like(v) for k, v in params.items()}
        return optimizer.step(params, full), state

    def _personal(self, received: Params, ctx: Any, local: LocalTraining) -> Params:
        """The global body with this client's own head (the global head before its first round)."""
        w = model_part(received)
        own = unprefixed(HEAD, ctx.state)
        return {k: own[k].to(local.device) if k in own else w[k] for k, _ in local.model.named_parameters()}

    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        start = self._personal(received, ctx, local)
        head = set(self.head_names(dict(local.model.named_parameters())))
        trained, metrics = local.train(start, ctx.generator)
        with torch.no_grad():
            update = {k: (trained[k] - start[k]).cpu() for k in start if k not in head}
            own = {k: trained[k].detach().cpu() for k in start if k in head}
        return ClientResult(update, metrics, prefixed(HEAD, own))

    def client_evaluate(self, received: Params, ctx: Any, local: LocalTraining, test: Any) -> dict[str, float]:
        metrics = local.evaluate(model_part(received), test)
        personal = local.evaluate(self._personal(received, ctx, local), test)
        metrics.update({f"personalized_{k}": x for k, x in personal.items()})
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "head": self.head}


def build(config: Any) -> FedPer:
    """FedPer with ``algorithm.fedper_head``."""
    return FedPer(config.algorithm.fedper_head)
