"""Adversaries in real rounds, and the configuration-time refusals of the robust family.

The adversary in each test is named: a group of colluding Byzantine clients (who know the configuration,
``run.seed`` included) attacking the global model through their updates.
"""

from __future__ import annotations

import pytest
import torch

from fedguard import ConfigurationError, Experiment
from fedguard.attacks.adversary import OmniscientAdversary
from fedguard.attacks.config import AttackConfig, byzantine_clients, parse_clients
from fedguard.attacks.vectors import alie_z, ipm
from fedguard.robust.aggregators import RobustAggregator
from fedguard.robust.defenses import Bucketing, Chain, NormBound, TrimmedMean

SMALL = ["run.progress=false", "run.report=false", "data.max_train_examples=1200", "data.num_clients=8",
         "data.partition=iid", "run.workers=1"]


def test_byzantine_clients_are_listed_or_drawn_from_the_seed() -> None:
    assert parse_clients(["0-2", "5"], 10) == [0, 1, 2, 5]
    with pytest.raises(ValueError, match="outside"):
        parse_clients(["8-12"], 10)
    drawn = byzantine_clients(AttackConfig(name="ipm", count=3), 10, seed=1)
    assert len(drawn) == 3 and drawn == byzantine_clients(AttackConfig(name="ipm", count=3), 10, seed=1)


def test_omniscient_adversary_crafts_from_honest_rows_only() -> None:
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(6, 20, generator=gen)
    ids = [3, 7, 8, 11, 12, 20]
    adversary = OmniscientAdversary(AttackConfig(name="ipm", ipm_epsilon=0.5), frozenset({7, 20}), 25)
    garbage = stack.clone()
    garbage[[1, 5]] = 1e6  # whatever the Byzantine clients sent is ignored
    out, figures = adversary.tamper(1, ids, garbage)
    honest = stack[[0, 2, 3, 4]]
    assert torch.equal(out[[0, 2, 3, 4]], honest) and figures["byzantine_updates"] == 2
    assert torch.allclose(out[1], ipm(honest, 0.5)) and torch.equal(out[1], out[5])
    late = OmniscientAdversary(AttackConfig(name="alie", start_round=3), frozenset({7}), 25)
    assert torch.equal(late.tamper(2, ids, stack)[0], stack)  # honest before start_round
    alie = OmniscientAdversary(AttackConfig(name="alie"), frozenset({7, 20}), 25).tamper(1, ids, stack)[0]
    z = alie_z(6, 2)
    assert torch.allclose(alie[1], honest.mean(0) + z * honest.std(0), atol=1e-6)


def test_bucketing_and_weak_dp_noise_cannot_be_predicted_from_the_seed() -> None:
    """A client that knows run.seed cannot predict its bucket or the server's noise: the same updates give
    different aggregates on every call."""
    updates = [{"w": torch.full((4,), float(v))} for v in range(8)]
    bucketed = RobustAggregator(Chain(TrimmedMean(1), [Bucketing(2)]))
    results = {tuple(bucketed.combine(updates)[0]["w"].tolist()) for _ in range(10)}
    assert len(results) > 1
    noisy = RobustAggregator(Chain(NormBound(100.0, noise_std=0.1)))
    assert not torch.equal(noisy.combine(updates)[0]["w"], noisy.combine(updates)[0]["w"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["robust.rule=krum"], "needs robust.byzantine"),
        (["robust.rule=trimmed-mean"], "needs robust.byzantine"),
        (["robust.rule=krum", "robust.byzantine=3"], "n > 2f \\+ 2.*n=8"),
        (["robust.rule=bulyan", "robust.byzantine=2"], "n >= 4f \\+ 3"),
        (["robust.rule=trimmed-mean", "robust.byzantine=2", "robust.pre=bucketing"], "n > 2f.*after bucketing"),
        (["robust.rule=fltrust"], "root_data"),
        (["robust.pre=nnm"], "needs a rule after it"),
        (["attack.name=ipm"], "needs Byzantine clients"),
        (["attack.name=ipm", "attack.count=2", "secure.mode=secagg"], "omniscient.*secure.mode=secagg"),
    ],
)
def test_invalid_robust_configurations_are_refused_before_training(overrides: list[str], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Experiment(overrides=[*SMALL, *overrides]).assemble()


def _accuracy(tmp_path, name: str, overrides: list[str]) -> float:
    overrides = [*SMALL, "run.rounds=3", "run.eval_every=0", "train.lr=0.05", *overrides]
    result = Experiment(overrides=overrides).run(run_dir=tmp_path / name)
    return float(result.final["test_accuracy"])


def test_colluding_noise_attackers_break_fedavg_but_not_the_median(tmp_path) -> None:
    """Two of eight clients send large Gaussian noise every round."""
    attack = ["attack.name=gaussian", "attack.clients=0-1", "attack.gaussian_sigma=1.0"]
    fedavg = _accuracy(tmp_path, "fedavg", attack)
    median = _accuracy(tmp_path, "median", [*attack, "robust.rule=median"])
    assert fedavg < 0.2 and median > 0.5, (fedavg, median)


def test_omniscient_ipm_attack_runs_through_a_robust_rule(tmp_path) -> None:
    attack = ["attack.name=ipm", "attack.clients=0-1", "attack.ipm_epsilon=10"]
    fedavg = _accuracy(tmp_path, "ipm-fedavg", attack)
    trimmed = _accuracy(tmp_path, "ipm-tm", [*attack, "robust.rule=trimmed-mean", "robust.byzantine=2"])
    assert fedavg < 0.2 and trimmed > 0.5, (fedavg, trimmed)
