"""DP steps: Poisson sampling, noise standard deviations, update clipping, adaptive clipping."""

import math

import pytest
import torch

from fedguard.messages import Message
from fedguard.pipeline.base import ClientContext, ServerContext
from fedguard.privacy.dpfedavg import (
    AdaptiveClip,
    ClipUpdate,
    DistributedNoise,
    DPFedAvgNoise,
    clip_update,
    global_norm,
)
from fedguard.privacy.dpsgd import DPSGD, DPSGDPlan, DPSGDReport
from fedguard.privacy.local_dp import LocalGaussian
from fedguard.privacy.per_example import FastClippedSum
from fedguard.runtime.base import client_generator
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import MLP

TASK = ClassificationTask(lambda: None)


def client_ctx(cid: int = 0, instructions: dict | None = None) -> ClientContext:
    return ClientContext(cid, 1, 100, client_generator(0, 1, cid, "fit"), instructions or {}, {})


def server_ctx(completed: list[int]) -> ServerContext:
    return ServerContext(1, completed, completed, 100, client_generator(0, 1, -1, "server"))


def big_update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(200, 100, generator=g) * 3, "b": torch.randn(100, generator=g)}


def test_poisson_sampler_rate_and_steps():
    plan = DPSGDPlan(1.0, 1.0, sample_rate=0.05, steps=400)
    dpsgd = DPSGD(plan, engine=None)  # type: ignore[arg-type]
    sizes = [len(idx) for idx in dpsgd.sample(1000, torch.Generator().manual_seed(0))]
    assert len(sizes) == 400
    assert sum(sizes) / 400 == pytest.approx(50, rel=0.03)
    assert min(sizes) < 40 < 60 < max(sizes)  # varies from step to step, unlike fixed batches
    auto = DPSGDPlan(1.0, 1.0, batch_size=32, epochs=2)
    assert auto.rate(320) == pytest.approx(0.1) and auto.local_steps(320) == 20
    assert DPSGDPlan(1.0, 1.0, batch_size=32, steps=50, steps_limit=7).local_steps(320) == 7


def test_dpsgd_noise_std_matches_sigma_times_clip():
    model = MLP(4, 8, 3)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    sigma, clip, n, q = 1.3, 0.7, 200, 0.1
    dpsgd = DPSGD(DPSGDPlan(sigma, clip, sample_rate=q, steps=1), FastClippedSum(model, TASK.loss))
    gen = torch.Generator().manual_seed(0)
    next(iter(dpsgd.sample(n, gen)))  # sets the expected batch q * n
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    draws = torch.cat([torch.cat([g.flatten() for g in dpsgd.gradient(None, params, empty, gen)[0]])
                       for _ in range(400)])
    # an empty batch gives pure noise / (q n): its std is sigma * C / (q n); 26,800 draws put the 2%
    # tolerance at 4.6 standard errors of the std (40 calls: 1.5, a failure about 1 run in 7)
    assert float(draws.std()) * q * n == pytest.approx(sigma * clip, rel=0.02)
    assert abs(float(draws.mean())) * q * n < 0.02


def test_dpsgd_report_tells_the_ledger_what_ran():
    ctx = client_ctx()
    DPSGDReport(DPSGDPlan(1.1, 1.0, batch_size=20, epochs=1)).apply({}, ctx)
    assert ctx.reply_meta["dp_sgd"] == {"sample_rate": 0.2, "noise_multiplier": 1.1, "steps": 5}


def test_update_clip_bound_holds_for_every_update():
    for seed in range(20):
        update = big_update(seed)
        clipped, norm = clip_update(update, 2.5)
        assert norm == pytest.approx(global_norm(update))
        assert global_norm(clipped) <= 2.5 * (1 + 1e-6)
    small = {"w": torch.full((3,), 0.1)}
    assert torch.equal(clip_update(small, 2.5)[0]["w"], small["w"])


def test_central_noise_std_and_fixed_denominator():
    clip_step = ClipUpdate(0.5, expected_clients=10)
    clip_step.configure(1, {})
    step = DPFedAvgNoise(clip_step, noise_multiplier=2.0, expected_clients=10)
    zero = {"w": torch.zeros(100_000)}
    out = step.apply(zero, server_ctx(list(range(8))))["w"]
    assert float(out.std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.02)
    mean = {"w": torch.ones(4)}
    quiet = DPFedAvgNoise(clip_step, 0.0, 10).apply(mean, server_ctx(list(range(8))))["w"]
    assert torch.allclose(quiet, torch.full((4,), 0.8))  # sum of 8 updates over 10 expected


def test_distributed_shares_sum_to_the_central_std():
    shares = 16
    step = DistributedNoise(noise_multiplier=1.5, shares=shares, clip=1.0)
    zero = {"w": torch.zeros(20_000)}
    total = sum(step.apply(zero, client_ctx(cid, {"dp_clip": 1.0}))["w"] for cid in range(shares))
    assert float(total.std()) == pytest.approx(1.5, rel=0.03)


def test_local_dp_clips_then_noises():
    step = LocalGaussian(clip=1.0, noise_multiplier=0.5)
    out = step.apply(big_update(), client_ctx())
    noise_free = clip_update(big_update(), 1.0)[0]
    residual = torch.cat([(out[k] - noise_free[k]).flatten() for k in out])
    assert float(residual.std()) == pytest.approx(0.5, rel=0.03)
    assert step.ledger_noise_multiplier == 0.25


def test_adaptive_clip_moves_toward_the_target_quantile():
    clip = ClipUpdate(1.0, expected_clients=50, adaptive=AdaptiveClip(0.5, 0.2, count_noise=0.0))
    norms = torch.linspace(0.1, 10.0, 50)  # median about 5
    for r in range(1, 60):
        instructions: dict = {}
        clip.configure(r, instructions)
        replies = []
        for cid, norm in enumerate(norms):
            ctx = client_ctx(cid, instructions)
            clipped = clip.apply({"w": torch.tensor([float(norm)])}, ctx)
            assert abs(float(clipped["w"])) <= instructions["dp_clip"] * (1 + 1e-6)
            replies.append(Message("fit_result", r, cid, dict(ctx.reply_meta), {}))
        clip.observe_replies(replies, ServerContext(r, [], [], 50, client_generator(0, r, -1, "server")))
    assert 4.0 < clip.clip < 6.5
    assert clip.clip_of_round(1) == 1.0 and math.isclose(clip.state_dict()["clip"], clip.clip)


def test_poisson_client_sampling_for_client_level_accounting():
    from fedguard.algorithms.sampling import ClientSampler

    sampler = ClientSampler(1000, 50, poisson=True, seed=3)
    counts = [len(sampler.sample(r)) for r in range(1, 201)]
    assert sampler.sampling_rate == 0.05
    assert sum(counts) / len(counts) == pytest.approx(50, rel=0.05)
    assert len(set(counts)) > 5  # the cohort size varies, as Poisson sampling does
    assert sampler.sample(7) == sampler.sample(7) == sorted(sampler.sample(7))
    fixed = ClientSampler(1000, 50, seed=3)
    assert all(len(fixed.sample(r)) == 50 for r in range(1, 5)) and fixed.sampling_rate == 0.05
