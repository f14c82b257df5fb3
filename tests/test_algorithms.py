"""The algorithm contract and the algorithms on it, checked against the papers' update formulas.

A quadratic task (loss 0.5 ||w - a||^2, gradient w - a) makes each local step computable by
hand, so each client and server rule is compared with its formula in the paper.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedguard import Experiment
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.algorithms.server_optimizers import FedAvgServer
from fedguard.core.algorithm import LocalTraining, ModelDelta
from fedguard.core.pipeline import ClientContext, ConfigurationError, PrivacyLedger, UpdatePipeline
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Task

LR, STEPS = 0.1, 4


class Quadratic(Task):
    """loss(w) = 0.5 ||w - a||^2 whatever the batch; a two-tensor 'model' (body w, head b)."""

    def __init__(self, a: float = 1.0) -> None:
        self.a = a

    def build_model(self) -> nn.Module:
        model = nn.Module()
        model.w = nn.Parameter(torch.zeros(3))
        model.b = nn.Parameter(torch.zeros(2))
        return model

    def loss(self, model, params, batch):
        return 0.5 * sum(((p - self.a) ** 2).sum() for p in params.values())

    def evaluate(self, model, params, data):
        return {"loss": float(self.loss(model, params, None))}


def local(task: Task | None = None) -> LocalTraining:
    data = ArrayDataset(torch.zeros(STEPS, 1), torch.zeros(STEPS, dtype=torch.long), "d")
    trainer = LocalSGD(lr=LR, momentum=0.0, sampler=ShuffledEpochs(1, 1))
    task = task or Quadratic()
    return LocalTraining(task, task.build_model(), data, trainer)


def context(state=None) -> ClientContext:
    return ClientContext(0, 1, STEPS, torch.Generator().manual_seed(0), {}, dict(state or {}))


def params(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "b": torch.full((2,), value)}


def sgd(start: torch.Tensor, grad) -> torch.Tensor:
    y = start.clone()
    for _ in range(STEPS):
        y = y - LR * grad(y)
    return y


class _DP(PrivacyLedger):
    name = "dp"


class _SendsMore(ModelDelta):
    name = "more"

    def sends_extra(self) -> bool:
        return True


def test_dp_over_extra_payload_parts_is_refused():
    from fedguard.algorithms.fedavg import FedAvg

    with pytest.raises(ConfigurationError, match="beyond the model update"):
        UpdatePipeline(FedAvg(), FedAvgServer(), ledger=_DP(), algorithm=_SendsMore()).validate()
    UpdatePipeline(FedAvg(), FedAvgServer(), ledger=_DP(), algorithm=ModelDelta()).validate()  # model update only
    UpdatePipeline(FedAvg(), FedAvgServer(), algorithm=_SendsMore()).validate()  # no DP: nothing to account


def test_model_delta_sends_trained_minus_global():
    w = params(0.5)
    result = ModelDelta().client_update(w, context(), local())
    for k in w:
        torch.testing.assert_close(result.payload[k], sgd(w[k], lambda u: u - 1.0) - w[k])
    assert result.state == {}


def test_fedprox_name_needs_its_mu():
    with pytest.raises(ConfigurationError, match="prox_mu"):
        Experiment(overrides=["algorithm.name=fedprox", "run.progress=false"]).assemble()
    setup = Experiment(overrides=["algorithm.name=fedprox", "train.prox_mu=0.1", "run.progress=false"]).assemble()
    assert setup.pipeline.algorithm.name == "fedprox" and setup.pipeline.algorithm.mu == 0.1
