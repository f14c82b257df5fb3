"""Ditto (Li et al. 2021, "Ditto: Fair and Robust Federated Learning Through Personalization").

The global model is trained as in FedAvg: each sampled client k runs its local optimiser from
``w^t`` and sends ``w_k - w^t``. Each client also keeps a personal model ``v_k`` in its state
store (``w^t`` at its first round) and, in the same round, takes the same number of local
steps on (Algorithm 1)

    F_k(v) + lambda / 2 * ||v - w^t||^2

i.e. ``v <- v - eta (grad F_k(v) + lambda (v - w^t))``. The personal model never leaves the
client; evaluation on the client's own test split (``data.client_test_fraction``) reports the
global model's metrics and the personal model's as ``personalized_*``.
"""

from __future__ import annotations

from typing import Any

from fedguard.algorithms.local_sgd import corrected
from fedguard.core.algorithm import ClientResult, LocalTraining, ModelDelta, model_part, prefixed, unprefixed
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.types import Params

NAME = "ditto"
#: the client's personal model in its state
V = f"{NAME}/v"


class Ditto(ModelDelta):
    """Ditto with personalisation strength ``lam``; see the module docstring."""

    name = NAME

    def __init__(self, lam: float = 0.1) -> None:
        self.lam = lam

    def check(self, task: Any) -> None:
        from fedguard.tasks.base import Task

        if type(task).local_train is not Task.local_train:
            raise ConfigurationError(f"algorithm.name = 'ditto' trains personal models with the engine's SGD, but task "
                                     f"{getattr(task, 'name', task)!r} trains with its own loop; use fedavg or fedprox")

    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        result = super().client_update(received, ctx, local)
        w = model_part(received)
        v = {k: t.to(local.device) for k, t in unprefixed(V, ctx.state).items()} or dict(w)
        # lambda (v - w) = lambda v - lambda w: weight decay lambda plus the constant correction -lambda w
        trainer = corrected(local.trainer, {k: -self.lam * w[k] for k in w}, "Ditto",
                            prox_mu=0.0, weight_decay=local.trainer.weight_decay + self.lam)
        v_new, personal = local.train(v, ctx.generator, trainer)
        result.metrics.update({f"personalized_{k}": x for k, x in personal.items()})
        result.state.update(prefixed(V, {k: t.detach().cpu() for k, t in v_new.items()}))
        return result

    def client_evaluate(self, received: Params, ctx: Any, local: LocalTraining, test: Any) -> dict[str, float]:
        w = model_part(received)
        metrics = local.evaluate(w, test)
        v = {k: t.to(local.device) for k, t in unprefixed(V, ctx.state).items()} or w
        metrics.update({f"personalized_{k}": x for k, x in local.evaluate(v, test).items()})
        return metrics

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "lambda": self.lam}


def build(config: Any) -> Ditto:
    """Ditto with ``algorithm.ditto_lambda``."""
    return Ditto(config.algorithm.ditto_lambda)
