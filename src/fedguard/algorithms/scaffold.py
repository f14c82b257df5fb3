"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning").

Control variates correct each client's drift. The server keeps ``c``; each client keeps its own
``c_i`` between rounds, in its state store (never on the server; zero at first). Algorithm 1:

* server -> client: ``x`` and ``c``;
* client: ``y = x``; K local steps ``y <- y - eta_l (g_i(y) + c - c_i)``;
  option II (the default, ``algorithm.scaffold_option = 2``): ``c_i+ = c_i - c + (x - y) / (K eta_l)``,
  the mean corrected step, K the steps this client took; option I (``= 1``): ``c_i+ = g_i(x)``, the
  gradient of the client's loss at the server model over all its examples (one more pass over its
  data; it "can be more stable than II depending on the application", in the paper's words; on
  MNIST's two-class shards at 10% participation it was far less stable: see benchmarks/bench_noniid.py);
  sends ``dy = y - x`` and ``dc = c_i+ - c_i``;
* server: ``x <- x + eta_g mean(dy)`` (the pipeline's server optimiser, ``server.lr`` = eta_g);
  ``c <- c + |S| / N * mean(dc)`` over the clients S that completed, N the population.

With local momentum beta (``train.momentum``) a step moves about ``eta_l / (1 - beta)`` per
gradient, so option II divides by ``K eta_l / (1 - beta)``: exact for plain SGD (beta = 0), the
same estimate of the mean local gradient otherwise. The mean is the aggregator's
(``server.weighting``; the paper's is uniform).

``dc`` travels in the payload as ``scaffold/dc/NAME``, through the same client steps and the
same (possibly secure) aggregator as the model update. Differential privacy clips and accounts
for the model update only, so SCAFFOLD with a ``[dp]`` mode is refused at configuration.
"""

from __future__ import annotations

from typing import Any

import torch

from fedguard.algorithms.local_sgd import corrected
from fedguard.core.algorithm import ClientResult, LocalTraining, ModelDelta, model_part, prefixed, unprefixed
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.types import Params

NAME = "scaffold"
#: server control variate ``c`` in the broadcast and the server state
C = f"{NAME}/c"
#: the client's ``c_i`` in its state
CI = f"{NAME}/ci"
#: the client's ``c_i+ - c_i`` in the payload
DC = f"{NAME}/dc"


class Scaffold(ModelDelta):
    """SCAFFOLD with option ``option`` (1 or 2) control variates; see the module docstring.

    ``chunk``: examples per forward pass of option I's gradient (the mean over all of them is the same).
    """

    name = NAME

    def __init__(self, option: int = 2, chunk: int = 512) -> None:
        if option not in (1, 2):
            raise ConfigurationError(f"algorithm.scaffold_option must be 1 or 2, got {option}")
        self.option, self.chunk = option, chunk

    def check(self, task: Any) -> None:
        from fedguard.tasks.base import Task

        if type(task).local_train is not Task.local_train:
            raise ConfigurationError(f"algorithm.name = 'scaffold' corrects every local SGD gradient, but task "
                                     f"{getattr(task, 'name', task)!r} trains with its own loop; use fedavg or fedprox")

    def sends_extra(self) -> bool:
        return True

    def server_init(self, params: Params) -> Params:
        return prefixed(C, {k: torch.zeros_like(v) for k, v in params.items()})

    def broadcast(self, params: Params, state: Params, round: int) -> tuple[Params, dict[str, Any]]:
        return {**params, **state}, {}

    def payload_like(self, params: Params) -> Params:
        return {**params, **prefixed(DC, params)}

    def server_apply(
        self, params: Params, state: Params, aggregate: Params, optimizer: Any, ctx: Any
    ) -> tuple[Params, Params]:
        new_params = optimizer.step(params, model_part(aggregate))
        share = len(ctx.completed) / ctx.population
        dc = unprefixed(DC, aggregate)
        c = unprefixed(C, state)
        return new_params, prefixed(C, {k: c[k] + share * dc[k] for k in c})

    def client_update(self, received: Params, ctx: Any, local: LocalTraining) -> ClientResult:
        x = model_part(received)
        c = unprefixed(C, received)
        ci = {k: v.to(local.device) for k, v in unprefixed(CI, ctx.state).items()} or {
            k: torch.zeros_like(v) for k, v in x.items()
        }
        trainer = corrected(local.trainer, {k: c[k] - ci[k] for k in x}, "SCAFFOLD")
        y, metrics = local.train(x, ctx.generator, trainer)
        steps = metrics.get("steps", 0.0)
        with torch.no_grad():
            dy = {k: y[k] - x[k] for k in x}
        if steps <= 0:
            ci_new = dict(ci)
        elif self.option == 1:
            ci_new = full_gradient(x, local, self.chunk)
        else:
            with torch.no_grad():
                # option II: c_i+ = c_i - c + (x - y) / (K eta_l), eta_l the effective step (see the module docstring)
                scale = (1.0 - trainer.momentum) / (steps * trainer.lr * trainer.lr_scale)
                ci_new = {k: ci[k] - c[k] - dy[k] * scale for k in x}
        with torch.no_grad():
            dc = {k: (ci_new[k] - ci[k]).cpu() for k in x}
            payload = {**{k: v.cpu() for k, v in dy.items()}, **prefixed(DC, dc)}
        return ClientResult(payload, metrics, prefixed(CI, {k: v.cpu() for k, v in ci_new.items()}))

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "scaffold_option": self.option}


def full_gradient(x: Params, local: LocalTraining, chunk: int) -> Params:
    """Option I's ``g_i(x)``: the gradient of the mean loss over all the client's examples at ``x``, plus the
    trainer's weight decay (part of the local objective its steps descend), accumulated chunk by chunk."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in x.items()}
    total = {k: torch.zeros_like(v) for k, v in x.items()}
    data, n = local.data, len(local.data)
    for idx in torch.arange(n, device=data.x.device).split(chunk):
        loss = local.task.loss(local.model, params, (data.x[idx], data.y[idx])) * (len(idx) / n)  # type: ignore[attr-defined]
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            total[k].add_(g)
    decay = float(getattr(local.trainer, "weight_decay", 0.0))
    return {k: total[k] + decay * x[k].detach() for k in x} if decay else total


def build(config: Any) -> Scaffold:
    """SCAFFOLD with ``algorithm.scaffold_option`` (eta_g is ``server.lr``, eta_l ``train.lr``)."""
    return Scaffold(int(config.algorithm.scaffold_option))
