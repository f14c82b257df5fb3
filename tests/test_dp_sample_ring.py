"""Distributed DP-SGD inside the SecAgg+ ring (issue 13, "Distributed DP done in the ring").

With dp.mode=sample, dp.noise_placement=distributed and secure.mode=secagg, each client takes one
clipped, un-noised DP-SGD step and adds its share of the step's noise as discrete Gaussian integers
to its quantized update inside the ring (Kairouz, Liu, Steinke 2021). The tests play the curious
server (it only ever holds integers; the noise is in no float a client computes), measure the
noise in the unmasked sum against what the ledger charges, and check the charge with dp-accounting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedguard import ConfigurationError, Experiment
from fedguard.engine import Server
from fedguard.privacy.distributed import DPSGDRingNoise
from fedguard.privacy.dpsgd import DPSGD
from fedguard.runtime.simulation import SerialCommunicator
from fedguard.runtime.state_store import MemoryStateStore
from fedguard.secure.protocol import flatten_sorted
from fedguard.secure.secagg_aggregator import SecAggAggregator

LR, CLIP, RATE, Z = 0.05, 1.0, 0.1, 1.5
RING = [
    "run.progress=false",
    "run.report=false",
    "run.workers=1",
    "data.max_train_examples=480",
    "data.num_clients=4",
    "run.rounds=1",
    "run.eval_every=0",
    "dp.accountant=rdp",
    "dp.mode=sample",
    "dp.noise_placement=distributed",
    "dp.local_steps=1",
    f"dp.sample_rate={RATE}",
    f"dp.clip={CLIP}",
    f"dp.noise_multiplier={Z}",
    f"train.lr={LR}",
    "secure.mode=secagg",
]


def _server(*extra: str):
    """An engine server over in-process clients, and the experiment's setup."""
    setup = Experiment(overrides=[*RING, *extra], log=lambda s: None).assemble()
    store = MemoryStateStore()
    comm = SerialCommunicator(lambda cid: setup.make_client(cid, store))
    return Server(setup.task, setup.model, setup.pipeline, setup.sampler, comm, setup.test, 0, 1, lambda s: None), setup


class _Spy:
    """Records each client's float update as it enters the ring, and the unmasked ring sum."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.updates: dict[int, tuple[np.ndarray, int]] = {}
        self.sums: list[tuple[object, np.ndarray, int]] = []
        finalize, checked = SecAggAggregator.client_finalize, SecAggAggregator._range_checked
        spy = self

        def client_finalize(agg, update, ctx):
            spy.updates[ctx.client_id] = (flatten_sorted(update).double().numpy().copy(), int(ctx.num_examples))
            return finalize(agg, update, ctx)

        def range_checked(agg, config, ring_sum, n):
            spy.sums.append((config, np.array(ring_sum, copy=True), n))
            return checked(agg, config, ring_sum, n)

        monkeypatch.setattr(SecAggAggregator, "client_finalize", client_finalize)
        monkeypatch.setattr(SecAggAggregator, "_range_checked", range_checked)


def test_ring_noise_has_the_std_the_ledger_charges(monkeypatch) -> None:
    """End to end: unmasked sum minus the noise-free sum of the clients' encoded steps, over every
    coordinate, has the std of the shares; its honest part is the ledger's multiplier x Delta."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    spy = _Spy(monkeypatch)
    server, setup = _server()
    noise = setup.pipeline.aggregator.settings.ring_noise
    assert isinstance(noise, DPSGDRingNoise) and noise.shares == 1  # 4 clients, 2 survivors needed, 1 colludes
    record = server.run_round(1, False)
    assert record.aborted is None and record.completed == 4
    (config, ring_sum, n), = spy.sums
    q, weight = config.quantizer, noise.max_weight
    noisy = q.centred(ring_sum, n).astype(np.float64) * q.step - n * q.clip
    exact = sum(w / weight * u for u, w in spy.updates.values())
    measured = float(np.std((noisy - exact) / q.step))
    d = exact.size
    delta_levels = LR * CLIP / (RATE * weight * q.step) + math.sqrt(d)  # one example, plus the rounding term
    charged = setup.pipeline.ledger.report()["dp_noise_multiplier"]
    assert charged == pytest.approx(Z * math.sqrt(3))  # 3 honest shares of the full noise each
    claimed = charged * delta_levels * math.sqrt(4 / 3)  # the colluder's share is there too, just not counted
    print(f"ring noise std {measured:.2f} levels, claimed {claimed:.2f} (d={d}, Delta={delta_levels:.1f})")
    assert measured == pytest.approx(claimed, rel=0.02)
    assert math.sqrt(d) / delta_levels < 0.1  # rounding is a small part of the sensitivity
    # the charge: one Poisson-subsampled Gaussian step at the honest shares' multiplier, as dp-accounting says
    acc = RdpAccountant()
    acc.compose(PoissonSampledDpEvent(RATE, GaussianDpEvent(charged)))
    report = setup.pipeline.ledger.report()
    assert report["epsilon"] == pytest.approx(acc.get_epsilon(report["delta"]), rel=1e-9)
    # the clients' own secret Poisson masks amplify against the server too
    assert report["epsilon_server"] == report["epsilon_model"] == report["epsilon"]


def test_curious_server_sees_integers_and_no_client_has_float_noise(monkeypatch) -> None:
    """The clients' DP-SGD draws no float noise: the update that enters the ring is exactly
    -lr * clipped sum / (q n); the server receives only integer tensors (the masked ring vectors)."""
    spy = _Spy(monkeypatch)
    server, setup = _server()
    dpsgd = setup.trainer.gradient.__self__
    assert isinstance(dpsgd, DPSGD) and dpsgd.plan.in_ring
    sums: list[dict[str, torch.Tensor]] = []
    engine, source = dpsgd.engine, dpsgd.source

    def recording_engine(params, batch, clip):
        result = engine(params, batch, clip)
        sums.append({k: g.detach().clone() for k, g in zip(params, result.grads, strict=True)})
        return result

    class NoNormal:
        def uniform(self, n, generator):
            return source.uniform(n, generator)

        def normal(self, *args, **kwargs):
            raise AssertionError("float noise drawn in training")

    dpsgd.engine, dpsgd.source = recording_engine, NoNormal()
    replies = []
    exchange = server.comm.exchange

    def recording_exchange(messages):
        ex = exchange(messages)
        replies.extend(ex.replies.values())
        return ex

    server.comm.exchange = recording_exchange
    assert server.run_round(1, False).aborted is None
    assert len(sums) == len(spy.updates) == 4  # one Poisson batch per client (none empty at q n = 12), in order
    for clipped, (cid, (update, n)) in zip(sums, spy.updates.items(), strict=True):
        expected = (-LR * flatten_sorted(clipped).double() / (RATE * n)).numpy()
        float_share = LR * Z * CLIP / (RATE * n)  # the std a float share of the step's noise had (1 share)
        gap = float(np.abs(update - expected).max())  # float32 rounding of new - old parameters only
        print(f"client {cid}: |update - noise-free step| <= {gap:.2e}, a float share's std {float_share:.2e}")
        assert gap < 1e-5 * float_share, cid
    assert replies
    assert all(not t.is_floating_point() for msg in replies for t in msg.tensors.values())
    fits = [m for m in replies if m.kind == "fit_result"]
    assert len(fits) == 4 and all(m.meta.get("num_examples") is None and not m.meta.get("metrics") for m in fits)


@pytest.mark.parametrize("steps", ["2", "0"])
def test_more_than_one_local_step_is_refused(steps: str) -> None:
    with pytest.raises(ConfigurationError, match=r"needs dp.local_steps=1, not .*one DP-SGD step.*Set those, or use "
                                                 r"dp.noise_placement=local"):
        Experiment(overrides=[*RING, f"dp.local_steps={steps}"]).assemble()


def test_adaptive_optimiser_and_stateful_algorithms_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="algorithm.name=scaffold keeps or sends state"):
        Experiment(overrides=[*RING, "algorithm.name=scaffold"]).assemble()


def test_a_ring_too_coarse_for_the_step_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"rounding to levels of .* Raise secure.ring_bits"):
        Experiment(overrides=[*RING, "secure.ring_bits=24"]).assemble()


def test_share_follows_the_rounds_learning_rate_and_the_client_weight() -> None:
    """sigma = z (lr * lr_scale * C * w / (q n M step) + sqrt(d)) / sqrt(shares), in levels; the
    server's range check (at lr_scale 1, w = n) covers every client's share."""
    from types import SimpleNamespace

    noise = DPSGDRingNoise(2.0, CLIP, 4, 3, ring_clip=1.0, dimension=10_000, sample_rate=RATE, lr=LR, max_weight=300)
    step, n = 2.0 / 50_000, 200
    client = SimpleNamespace(instructions={"lr_scale": 0.5}, num_examples=n)
    ctx = SimpleNamespace(client=client, step=step, weight=n, max_weight=300, length=10_000)
    sigma = 2.0 * (LR * 0.5 * CLIP / (RATE * 300 * step) + 100) / 2
    draws = noise.sample(ctx)
    assert draws.dtype == np.int64 and draws.std() == pytest.approx(sigma, rel=0.03)
    full = 2.0 * (LR * CLIP / (RATE * 300 * step) + 100) / 2
    assert noise.bound(4, 50_000) >= 12 * 2 * full
