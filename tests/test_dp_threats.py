"""DP against the adversaries it names (issue 13): noise from secrets, refusals, what leaves a client.

The first test plays finding #1 of the issue: an adversary who knows config.toml regenerates the
DP noise from run.seed and subtracts it. It succeeds with dp.noise_source=seeded (research only)
and fails with the secure default.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedguard import Experiment
from fedguard.cli import main
from fedguard.core.communicator import client_generator
from fedguard.core.pipeline import ClientContext, ConfigurationError
from fedguard.privacy.dpsgd import gaussian_like
from fedguard.privacy.local_dp import PublicReply
from fedguard.privacy.noise import (
    NOT_A_GUARANTEE,
    SeededRandom,
    discrete_gaussian,
    refuse_seeded_noise,
    secure_bits,
    secure_normal,
)

TINY = [
    "run.progress=false",
    "run.report=false",
    "run.workers=1",
    "data.max_train_examples=120",
    "run.rounds=1",
    "train.batch_size=20",
    "dp.accountant=rdp",
    "run.eval_every=0",
]
SIGMA, CLIP = 5.0, 0.1


def _local_dp_run(tmp_path, source: str):
    overrides = [*TINY, "data.num_clients=2", "dp.mode=local", f"dp.noise_multiplier={SIGMA}", f"dp.clip={CLIP}",
                 f"dp.noise_source={source}", "run.seed=7"]
    exp = Experiment(overrides=overrides)
    setup = exp.assemble()
    initial = {k: v.detach().clone() for k, v in setup.model.named_parameters()}
    result = Experiment(overrides=overrides).run(run_dir=tmp_path / source)
    return setup, initial, result


def _regenerated_noise(setup, initial, seed: int, client: int) -> dict[str, torch.Tensor]:
    """What the adversary recomputes from config.toml: the client's generator, replayed past the one
    epoch's shuffle that training draws (it knows the client's example count), then the noise."""
    gen = client_generator(seed, 1, client, "fit")
    torch.randperm(int(setup.parts.sizes()[client]), generator=gen)
    like = {k: torch.zeros_like(v) for k, v in initial.items()}
    return gaussian_like(like, SIGMA * CLIP, gen, SeededRandom())


@pytest.mark.parametrize("source", ["seeded", "secure"])
def test_adversary_with_the_config_subtracts_seeded_noise_but_not_secure_noise(tmp_path, source):
    setup, initial, result = _local_dp_run(tmp_path, source)
    step = {k: result.params[k] - initial[k] for k in initial}  # the server's mean of the 2 noised updates
    noise = [_regenerated_noise(setup, initial, 7, c) for c in (0, 1)]
    residual = math.sqrt(sum(float((step[k] - (noise[0][k] + noise[1][k]) / 2).pow(2).sum()) for k in step))
    noise_norm = math.sqrt(sum(float(((noise[0][k] + noise[1][k]) / 2).pow(2).sum()) for k in step))
    assert noise_norm > 100 * CLIP
    if source == "seeded":  # the noise-free mean of two clipped updates comes back
        assert residual <= CLIP * (1 + 1e-4)
        assert result.final["epsilon_note"] == NOT_A_GUARANTEE
    else:  # the residual is all noise the adversary cannot predict
        assert residual > 50 * CLIP
        assert "epsilon_note" not in result.final


def test_secure_draws_differ_and_have_the_right_moments():
    assert not np.array_equal(secure_bits(4), secure_bits(4))
    z = secure_normal(200_001)
    assert z.shape == (200_001,) and abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_discrete_gaussian_matches_its_distribution(sigma):
    """Canonne, Kamath, Steinke 2020: P(x) proportional to exp(-x^2 / (2 sigma^2)) on the integers."""
    draws = discrete_gaussian(sigma, 200_000)
    assert draws.dtype == np.int64 and draws.shape == (200_000,)
    support = np.arange(-int(8 * sigma) - 2, int(8 * sigma) + 3)
    pmf = np.exp(-support.astype(float) ** 2 / (2 * sigma**2))
    pmf /= pmf.sum()
    assert abs(draws.mean()) < 4 * math.sqrt((pmf * support**2).sum() / 200_000)
    assert draws.var() == pytest.approx((pmf * support**2).sum(), rel=0.02)
    counts = np.array([(draws == x).sum() for x in support])
    expected = pmf * draws.size
    big = expected > 20
    chi2 = float((((counts - expected) ** 2) / expected)[big].sum())
    assert chi2 < big.sum() + 6 * math.sqrt(2 * big.sum())  # far below any real mismatch


def test_network_runtime_refuses_seeded_noise():
    class Cfg:
        class dp:  # noqa: N801
            mode, noise_source = "sample", "seeded"

    with pytest.raises(ConfigurationError, match="dp.noise_source=seeded.*secure"):
        refuse_seeded_noise(Cfg())
    Cfg.dp.noise_source = "secure"
    refuse_seeded_noise(Cfg())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["dp.mode=sample", "dp.noise_multiplier=0"], "dp.noise_multiplier=0 "),
        (["dp.mode=client", "server.weighting=uniform", "dp.noise_multiplier=0", "dp.adaptive_clip=true"],
         "dp.noise_multiplier=0 "),
        (["dp.mode=sample", "dp.delta=1.0"], "dp.delta=1 is not below 1/N"),
        (["dp.mode=client", "server.weighting=uniform", "dp.noise_placement=distributed"],
         "dp.noise_placement=distributed with secure.mode=none"),
        (["dp.mode=client", "server.weighting=uniform", "dp.noise_placement=distributed", "secure.mode=ckks"],
         "dp.noise_placement=distributed with secure.mode=ckks"),
        (["dp.mode=client", "server.weighting=uniform", "secure.mode=ckks"], "the key holder decrypts"),
    ],
)
def test_unsound_settings_are_refused_from_the_cli_before_training(tmp_path, capsys, overrides, message):
    args = ["run", "--out", str(tmp_path / "out"), "--quiet"]
    for item in [*TINY, "data.num_clients=4", *overrides]:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.jsonl"))


def _ctx() -> ClientContext:
    return ClientContext(3, 1, 57, torch.Generator(), {}, {})


def test_public_reply_withholds_the_loss_and_sends_public_counts():
    ctx = _ctx()
    PublicReply("registered").apply({}, ctx)
    assert ctx.reply_meta == {"metrics": {}, "num_examples": 57}
    ctx = _ctx()
    PublicReply("one").apply({}, ctx)
    assert ctx.reply_meta == {"metrics": {}, "num_examples": 1}


@pytest.mark.parametrize("mode", ["sample", "local"])
def test_nothing_unnoised_leaves_a_dp_client(tmp_path, monkeypatch, mode):
    """Every fit reply of a sample- or local-DP run carries no loss and only a public count."""
    from fedguard.runtime.simulation import SerialCommunicator

    seen: list[dict] = []
    original = SerialCommunicator.exchange

    def spy(self, messages):
        out = original(self, messages)
        seen.extend(m.meta for m in out.replies.values() if m.kind == "fit_result")
        return out

    monkeypatch.setattr(SerialCommunicator, "exchange", spy)
    Experiment(overrides=[*TINY, "data.num_clients=3", f"dp.mode={mode}"]).run(run_dir=tmp_path / mode)
    assert len(seen) == 3 and all(meta["metrics"] == {} for meta in seen)
    counts = [meta["num_examples"] for meta in seen]
    assert sum(counts) == 120 if mode == "sample" else counts == [1, 1, 1]  # registered sizes, or 1


@pytest.mark.parametrize(
    "mode",
    [
        ["dp.mode=client", "server.weighting=uniform", "dp.noise_multiplier=1.0", "dp.budget_epsilon=6"],
        ["dp.mode=sample", "dp.local_steps=1", "dp.sample_rate=0.2", "dp.noise_multiplier=0.8",
         "dp.budget_epsilon=1.5"],
    ],
    ids=["client", "sample"],
)
def test_random_dropouts_never_push_epsilon_past_the_budget(mode):
    """Property: whatever number of clients drops (down to what SecAgg+ still unmasks), the ledger
    that plans each round at the fewest survivors ends at or below dp.budget_epsilon."""
    from fedguard.core.pipeline import ServerContext

    budget = float(mode[-1].split("=")[1])
    overrides = [*TINY, "data.num_clients=12", "server.clients_per_round=8", "run.rounds=60",
                 "dp.noise_placement=distributed", "secure.mode=secagg", *mode]
    for seed in range(4):
        ledger = Experiment(overrides=[*overrides, f"run.seed={seed}"]).assemble().pipeline.ledger
        rng = np.random.default_rng(seed)
        stopped = False
        for r in range(1, 61):
            if ledger.would_exceed_budget(r):
                stopped = True
                break
            sampled = ledger.sampler.sample(r)
            fewest = ledger.fewest_completed(r)
            completed = sorted(rng.choice(sampled, size=int(rng.integers(fewest, len(sampled) + 1)), replace=False))
            ledger.record_round(ServerContext(r, sampled, [int(c) for c in completed], 12, torch.Generator()), [])
            assert ledger.report()["epsilon"] <= budget * (1 + 1e-9)
        assert stopped  # the budget binds within 60 rounds, so the check was exercised


def test_budget_holds_with_half_the_clients_dropping(tmp_path):
    """The issue's reproduction: distributed noise under SecAgg+, faults.dropout_rate=0.5."""
    result = Experiment(overrides=[*TINY, "data.num_clients=8", "dp.mode=client", "server.weighting=uniform",
                                   "dp.noise_placement=distributed", "secure.mode=secagg", "dp.noise_multiplier=1.0",
                                   "dp.budget_epsilon=5.7", "run.rounds=8", "faults.dropout_rate=0.5"]
                        ).run(run_dir=tmp_path / "run")
    assert all(row["epsilon"] <= 5.7 for row in result.rows) and result.final["epsilon"] <= 5.7


def test_ring_share_has_the_planned_sigma_in_levels():
    from types import SimpleNamespace

    from fedguard.privacy.distributed import DiscreteGaussianRingNoise, tau

    noise = DiscreteGaussianRingNoise(1.2, 0.5, 4, 5, ring_clip=1.0, dimension=10_000)
    ctx = SimpleNamespace(step=2.0 / 5000, weight=1, max_weight=1, length=10_000)
    draws = noise.sample(ctx)
    sigma = 1.2 * (0.5 / (2.0 / 5000) + 100) / 2
    assert draws.dtype == np.int64 and draws.std() == pytest.approx(sigma, rel=0.03)
    assert noise.bound(4, 5000) > 10 * sigma * 2 and tau(sigma, 100) < 1e-300


def test_epsilon_against_the_server_and_against_model_users(tmp_path):
    """Central noise: nothing holds against the server (it sees each update). Distributed noise under
    SecAgg+: the server knows the sample, so no amplification: epsilon_server > epsilon_model."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    base = [*TINY, "data.num_clients=8", "server.clients_per_round=4", "run.rounds=3", "dp.mode=client",
            "server.weighting=uniform", "dp.noise_multiplier=1.0"]
    central = Experiment(overrides=base).run(run_dir=tmp_path / "central")
    assert central.final["epsilon_model"] == central.final["epsilon"] > 0
    assert central.final["epsilon_server"] == math.inf and "trusted" in central.final["epsilon_server_note"]
    dist = Experiment(overrides=[*base, "dp.noise_placement=distributed", "secure.mode=secagg"]
                      ).run(run_dir=tmp_path / "dist")
    ledger_rows = dist.rows
    assert all(0 < r["epsilon_model"] < r["epsilon_server"] for r in ledger_rows)
    # the reference: at most 3 un-amplified releases, each at no less than the run's smallest noise
    z = ledger_rows[-1]["dp_noise_multiplier"]
    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(min(z) if isinstance(z, list) else z), 3))
    assert dist.final["epsilon_server"] <= acc.get_epsilon(dist.final["delta"]) + 1e-9


def test_self_sampling_hides_the_sample_from_the_server(tmp_path):
    """Every client is asked each round and flips its own secret coin; under SecAgg+ the server sees the
    sum only, so the amplified epsilon holds against it too (epsilon_server == epsilon_model)."""
    from fedguard.privacy.dpfedavg import SelfSample

    overrides = [*TINY, "data.num_clients=8", "server.clients_per_round=4", "run.rounds=2", "dp.mode=client",
                 "server.weighting=uniform", "dp.noise_multiplier=1.0", "dp.noise_placement=distributed",
                 "secure.mode=secagg", "dp.client_sampling=self"]
    setup = Experiment(overrides=overrides).assemble()
    assert setup.sampler.sample(1) == list(range(8))  # nobody is picked by the server
    step = setup.pipeline.client_steps[0]
    assert isinstance(step, SelfSample) and step.rate == 0.5
    kept = sum(bool(step.apply({"w": torch.ones(3)}, _ctx())["w"].any()) for _ in range(2000))
    assert 900 < kept < 1100  # each client's own coin, rate 0.5
    result = Experiment(overrides=overrides).run(run_dir=tmp_path / "self")
    row = result.rows[-1]
    assert row["sampled_clients"] == 8 and row["dp_sampling_rate"] == 0.5
    assert 0 < row["epsilon_server"] == row["epsilon_model"] < math.inf
    with pytest.raises(ConfigurationError, match="dp.client_sampling=self needs"):
        Experiment(overrides=[*TINY, "dp.mode=client", "server.weighting=uniform", "dp.client_sampling=self"]
                   ).assemble()
