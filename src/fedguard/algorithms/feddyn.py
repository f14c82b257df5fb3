"""FedDyn (Acar et al. 2021, "Federated Learning Based on Dynamic Regularization").

Each sampled client k keeps ``g_k`` (the gradient of its loss at its last local model; zero at
first) in its state store and minimises (Algorithm 1)

    L_k(theta) - <g_k, theta> + alpha / 2 * ||theta - theta^{t-1}||^2

from the global model ``theta^{t-1}``; then ``g_k <- g_k - alpha (theta_k^t - theta^{t-1})``.
It sends only ``theta_k^t - theta^{t-1}``, so DP and secure aggregation see a model update.
The server keeps ``h`` (zero at first), with m the population and P the clients that completed:

    h^t = h^{t-1} - alpha / m * sum_{k in P} (theta_k^t - theta^{t-1})
    theta^t = mean_{k in P} theta_k^t - h^t / alpha

The last line is applied as the server optimiser's step with the update ``mean - h^t / alpha``
(exact for FedAvg at ``server.lr = 1``). The linear and proximal terms enter each local
gradient as a correction ``-g_k + alpha (theta - theta^{t-1})`` (``algorithm.feddyn_alpha``).
"""

from __future__ import annotations

from typing import Any

import torch

from fedguard.algorithms.local_sgd import corrected
from fedguard.core.algorithm import ClientResult, LocalTraining, ModelDelta, model_part, prefixed, unprefixed
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.types import Params

NAME = "feddyn"
#: the server's ``h``
H = f"{NAME}/h"
#: the client's ``g_k``
G = f"{NAME}/g"


class FedDyn(ModelDelta):
    """FedDyn with regulariser weight ``alpha``; see the module docstring."""

    name = NAME

    def __init__(self, alpha: float = 0.01) -> None:
        if alpha <= 0:
            raise ConfigurationError("algorithm.feddyn_alpha must be positive for FedDyn")
        self.alpha = alpha

    def check(self, task: Any) -> None:
        from fedguard.tasks.base import Task

        if type(task).local_train is not Task.local_train:
            raise ConfigurationError(f"algorithm.name = 'feddyn' adds its terms to every local SGD gradient, but task "
                                     f"{getattr(task, 'name', task)!r} trains with its own loop; use fedavg or fedprox")

    def server_init(self, params: Params) -> Params:
        return prefixed(H, {k: torch.zeros_like(v) for k, v in params.items()})

    def server_apply(
        self, params: Params, state: Params, aggregate: Params, optimizer: Any, ctx: Any
    ) -> tuple[Params, Params]:
        share = len(ctx.completed) / ctx.population
        h = {k: v - self.alpha * share * aggregate[k] for k, v in unprefixed(H, state).items()}
        step = {k: aggregate[k] - h[k] / self.alpha for k in aggregate}
        return optimizer.step(params, step), prefixed(H, h)

    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        start = model_part(received)
        g = {k: v.to(local.device) for k, v in unprefixed(G, ctx.state).items()} or {
            k: torch.zeros_like(v) for k, v in start.items()
        }
        trainer = corrected(local.trainer, {k: -g[k] for k in start}, "FedDyn", prox_mu=self.alpha)
        trained, metrics = local.train(start, ctx.generator, trainer)
        with torch.no_grad():
            update = {k: trained[k] - start[k] for k in start}
            g_new = {k: (g[k] - self.alpha * update[k]).cpu() for k in start}
        return ClientResult({k: v.cpu() for k, v in update.items()}, metrics, prefixed(G, g_new))

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "alpha": self.alpha}


def build(config: Any) -> FedDyn:
    """FedDyn with ``algorithm.feddyn_alpha``."""
    return FedDyn(config.algorithm.feddyn_alpha)
