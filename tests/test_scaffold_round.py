"""Two SCAFFOLD rounds through the engine (server, clients, state store, aggregator, server optimiser) against a
hand computation of Karimireddy et al. 2020, Algorithm 1, on a tiny linear regression.

Clients hold different numbers of examples (so K, the local steps, differs per client, and the last batch of an
epoch is partial), only some are sampled each round (so ``c`` moves by ``|S|/N`` of the mean ``dc`` and a client's
``c_i`` waits in its state between visits), and the server learning rate is not 1 (it scales ``dy`` only).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedguard.algorithms.fedavg import FedAvg
from fedguard.algorithms.local_sgd import LocalSGD
from fedguard.algorithms.sampling import ClientSampler
from fedguard.algorithms.scaffold import Scaffold
from fedguard.algorithms.server_optimizers import FedAvgServer
from fedguard.core.pipeline import UpdatePipeline
from fedguard.data.arrays import ArrayDataset
from fedguard.engine import Server
from fedguard.runtime.client import ClientApp
from fedguard.runtime.simulation import SerialCommunicator
from fedguard.runtime.state_store import MemoryStateStore
from fedguard.tasks.base import Task

LR, ETA_G, BATCH, EPOCHS, ROUNDS = 0.05, 0.5, 2, 2, 3
SIZES = (5, 3, 4, 6)  # K = 6, 4, 4, 6 steps: ceil(n / 2) per epoch, the last batch of 5 and 3 partial
PER_ROUND = 2


class Linear(Task):
    """Least squares ``0.5 mean (x . w + b - y)^2``."""

    def build_model(self) -> nn.Module:
        model = nn.Module()
        model.w = nn.Parameter(torch.zeros(2))
        model.b = nn.Parameter(torch.zeros(1))
        return model

    def loss(self, model, params, batch):
        x, y = batch
        return 0.5 * ((x @ params["w"] + params["b"] - y) ** 2).mean()

    def evaluate(self, model, params, data):
        return {}


def in_order(n: int, generator: torch.Generator):
    """Each epoch's batches in example order (a shuffle only permutes the same formulas)."""
    for _ in range(EPOCHS):
        yield from torch.arange(n).split(BATCH)


def datasets() -> list[ArrayDataset]:
    g = torch.Generator().manual_seed(3)
    out = []
    for cid, n in enumerate(SIZES):  # each client its own target line: heterogeneous objectives
        x = torch.randn(n, 2, generator=g)
        y = x @ torch.tensor([1.0 + cid, -cid]) + 0.5 * cid
        out.append(ArrayDataset(x, y, f"client-{cid}"))
    return out


def gradient(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The least-squares gradient, by hand."""
    r = x @ p["w"] + p["b"] - y
    return {"w": x.T @ r / len(y), "b": r.mean().reshape(1)}


def paper_round(x, c, cis, sampled, data, option):
    """One round of Algorithm 1 (uniform means, as in the paper)."""
    dys, dcs = [], []
    for i in sampled:
        ci = cis.get(i, {k: torch.zeros_like(v) for k, v in x.items()})
        y, steps = dict(x), 0
        for idx in in_order(len(data[i]), torch.Generator()):
            g = gradient(y, data[i].x[idx], data[i].y[idx])
            y = {k: y[k] - LR * (g[k] - ci[k] + c[k]) for k in y}
            steps += 1
        if option == 2:
            ci_new = {k: ci[k] - c[k] + (x[k] - y[k]) / (steps * LR) for k in x}
        else:
            ci_new = gradient(x, data[i].x, data[i].y)
        dys.append({k: y[k] - x[k] for k in x})
        dcs.append({k: ci_new[k] - ci[k] for k in x})
        cis[i] = ci_new
    mean = lambda ds: {k: sum(d[k] for d in ds) / len(ds) for k in x}  # noqa: E731
    dy, dc = mean(dys), mean(dcs)
    return {k: x[k] + ETA_G * dy[k] for k in x}, {k: c[k] + len(sampled) / len(SIZES) * dc[k] for k in c}


@pytest.mark.parametrize("option", [2, 1])
def test_scaffold_rounds_match_algorithm_1(option):
    task, data, store = Linear(), datasets(), MemoryStateStore()
    torch.manual_seed(0)
    model = task.build_model()
    trainer = LocalSGD(lr=LR, momentum=0.0, sampler=in_order)
    pipeline = UpdatePipeline(FedAvg("uniform"), FedAvgServer(ETA_G), algorithm=Scaffold(option))
    comm = SerialCommunicator(lambda cid: ClientApp(cid, task, model, data[cid], trainer, pipeline, 0, store))
    sampler = ClientSampler(population=len(SIZES), count=PER_ROUND, seed=1)
    server = Server(task, model, pipeline, sampler, comm, None, log=lambda _: None)
    x = {k: v.clone() for k, v in server.params.items()}
    c = {k: torch.zeros_like(v) for k, v in x.items()}
    cis: dict[int, dict[str, torch.Tensor]] = {}
    visited: list[int] = []
    for r in range(1, ROUNDS + 1):
        server.run_round(r, evaluate=False)
        visited += sampler.sample(r)
        x, c = paper_round(x, c, cis, sampler.sample(r), data, option)
        for k in x:
            torch.testing.assert_close(server.params[k], x[k])
            torch.testing.assert_close(server.algorithm_state[f"scaffold/c/{k}"], c[k])
    assert len(set(visited)) < len(visited), "the test should revisit a client (its c_i read back from its state)"
    for i, ci in cis.items():
        for k in ci:
            torch.testing.assert_close(store.load(i)[f"scaffold/ci/{k}"], ci[k])


def test_scaffold_refuses_an_unknown_option():
    from fedguard.core.pipeline import ConfigurationError

    with pytest.raises(ConfigurationError, match="scaffold_option"):
        Scaffold(3)
