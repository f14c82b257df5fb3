"""The privacy ledger against the reference library, budget and target modes, the delta rule."""

import math

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from fedguard.algorithms.sampling import ClientSampler
from fedguard.messages import Message
from fedguard.pipeline.base import ServerContext
from fedguard.privacy.accountant import GaussianStep, calibrate_noise, default_delta, epsilon, history_of
from fedguard.privacy.dpfedavg import update_noise_multiplier
from fedguard.privacy.ledger import ClientLevelLedger, LocalLedger, SampleLevelLedger
from fedguard.runtime.base import client_generator


def reference(q: float, sigma: float, steps: int, delta: float, kind: str) -> float:
    """Epsilon straight from dp-accounting, as its documentation shows."""
    accountant = PLDAccountant() if kind == "pld" else RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


def sig3(x: float) -> str:
    return f"{x:.3g}"


def ctx(round: int, completed: list[int]) -> ServerContext:
    return ServerContext(round, completed, completed, 100, client_generator(0, round, -1, "server"))


def reply(cid: int, q: float, sigma: float, steps: int) -> Message:
    meta = {"num_examples": 10, "dp_sgd": {"sample_rate": q, "noise_multiplier": sigma, "steps": steps}}
    return Message("fit_result", 1, cid, meta, {})


def test_epsilon_matches_values_measured_with_opacus_and_prv_accountant():
    # sigma=1, q=0.01, 1000 steps, delta=1e-5: Opacus RDP 2.1014, prv-accountant 1.8282 (notes)
    h = history_of([(GaussianStep(1.0, 0.01), 1000)])
    assert sig3(epsilon(h, 1e-5, "rdp")) == "2.1"
    assert epsilon(h, 1e-5, "rdp") == pytest.approx(2.1014, abs=1e-4)
    assert epsilon(h, 1e-5, "pld") == pytest.approx(1.8282, abs=1e-4)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_sample_level_ledger_equals_reference_per_client(kind):
    ledger = SampleLevelLedger(1e-5, kind)
    # client 3 takes part in rounds 1 and 3 (20 steps each), client 5 only in round 2
    ledger.record_round(ctx(1, [3]), [reply(3, 0.05, 1.1, 20)])
    ledger.record_round(ctx(2, [5]), [reply(5, 0.05, 1.1, 20)])
    ledger.record_round(ctx(3, [3]), [reply(3, 0.05, 1.1, 20)])
    expected = reference(0.05, 1.1, 40, 1e-5, kind)
    assert sig3(ledger.epsilon_of(3)) == sig3(expected)
    assert sig3(ledger.epsilon_of(5)) == sig3(reference(0.05, 1.1, 20, 1e-5, kind))
    row = ledger.report()
    assert sig3(row["epsilon"]) == sig3(expected) and row["dp_worst_client"] == 3
    assert row["dp_sampling_rate"] == 0.05 and row["dp_noise_multiplier"] == 1.1 and row["dp_steps"] == 40
    assert row["delta"] == 1e-5 and row["dp_accountant"] == kind


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_client_level_ledger_equals_reference(kind):
    ledger = ClientLevelLedger(1e-4, kind, 0.05, lambda completed: 1.2, 1.2)
    for r in range(1, 61):
        ledger.record_round(ctx(r, [1, 2]), [])
    assert sig3(ledger.report()["epsilon"]) == sig3(reference(0.05, 1.2, 60, 1e-4, kind))
    assert ledger.report()["dp_steps"] == 60


def test_worst_client_is_found_among_many_different_histories():
    ledger = SampleLevelLedger(1e-5, "pld")
    for cid in range(4):
        ledger.spend(cid, [(GaussianStep(1.0, 0.01 + 0.01 * cid), 100 - 20 * cid)])
    exact = {cid: ledger.epsilon_of(cid) for cid in range(4)}
    party, value = ledger.worst()
    assert value == max(exact.values()) and exact[party] == value


def test_distributed_noise_dropouts_lower_the_round_noise():
    shares = 10
    ledger = ClientLevelLedger(1e-4, "rdp", 0.1, lambda c: 1.0 * math.sqrt(c / shares), 1.0)
    ledger.record_round(ctx(1, list(range(10))), [])
    full = ledger.report()["epsilon"]
    ledger2 = ClientLevelLedger(1e-4, "rdp", 0.1, lambda c: 1.0 * math.sqrt(c / shares), 1.0)
    ledger2.record_round(ctx(1, list(range(6))), [])  # 4 of 10 dropped: 60% of the variance
    assert ledger2.report()["epsilon"] > full
    assert ledger2.report()["dp_noise_multiplier"] == pytest.approx(math.sqrt(0.6))


def test_local_ledger_charges_half_the_multiplier_per_round():
    ledger = LocalLedger(1e-3, "rdp", 4.0)
    for r in range(1, 4):
        ledger.record_round(ctx(r, [0, 1] if r < 3 else [1]), [])
    gaussian = RdpAccountant()
    gaussian.compose(dp_accounting.GaussianDpEvent(4.0), 3)
    assert ledger.epsilon_of(1) == pytest.approx(gaussian.get_epsilon(1e-3))
    assert ledger.epsilon_of(0) < ledger.epsilon_of(1)


def test_budget_mode_stops_before_the_round_that_would_exceed():
    sampler = ClientSampler(10, 0, 1.0)
    plan = lambda cid: [(GaussianStep(2.0, 0.1), 10)]  # noqa: E731
    ledger = SampleLevelLedger(1e-5, "rdp", budget=3.0, sampler=sampler, planner=plan)
    rounds = 0
    while not ledger.would_exceed_budget(rounds + 1):
        rounds += 1
        ledger.record_round(ctx(rounds, list(range(10))), [reply(c, 0.1, 2.0, 10) for c in range(10)])
        assert ledger.report()["epsilon"] <= 3.0
    assert rounds >= 3
    one_more = history_of([(GaussianStep(2.0, 0.1), 10 * (rounds + 1))])
    assert epsilon(one_more, 1e-5, "rdp") > 3.0


def test_target_epsilon_calibration_meets_the_target_closely():
    make = lambda s: history_of([(GaussianStep(s, 0.02), 500)])  # noqa: E731
    sigma = calibrate_noise(make, 2.0, 1e-5, "rdp")
    assert epsilon(make(sigma), 1e-5, "rdp") <= 2.0
    assert epsilon(make(sigma * 0.99), 1e-5, "rdp") > 2.0


def test_adaptive_clipping_composition_equals_one_gaussian():
    # Andrew et al. 2021, Thm 1: update noise z_u and count noise sigma_b compose to z
    z, sigma_b = 1.0, 2.5
    z_update = update_noise_multiplier(z, sigma_b)
    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_update),
                                          dp_accounting.GaussianDpEvent(2 * sigma_b)])
    a, b = RdpAccountant(), RdpAccountant()
    a.compose(dp_accounting.PoissonSampledDpEvent(0.05, both), 100)
    b.compose(dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(z)), 100)
    assert a.get_epsilon(1e-4) == pytest.approx(b.get_epsilon(1e-4), rel=1e-9)
    assert z_update > z


def test_default_delta_is_below_one_over_n():
    for n, expected in [(60000, 1e-5), (1000, 1e-4), (600, 1e-3), (100000, 1e-6), (1, 0.1)]:
        assert default_delta(n) == pytest.approx(expected)
        assert default_delta(n) < 1 / n


def test_ledger_state_round_trip():
    ledger = SampleLevelLedger(1e-5, "rdp")
    ledger.record_round(ctx(1, [0, 4]), [reply(0, 0.1, 1.0, 5), reply(4, 0.2, 1.0, 5)])
    again = SampleLevelLedger(1e-5, "rdp")
    again.load_state_dict(ledger.state_dict())
    assert again.histories == ledger.histories and again.report() == ledger.report()


def test_no_noise_means_infinite_epsilon():
    assert math.isinf(epsilon(history_of([(GaussianStep(0.0, 0.1), 3)]), 1e-5, "pld"))
