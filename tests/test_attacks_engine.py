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
        (["attack.name=sign-flip", "attack.count=2", "attack.sign_flip_scale=0"], "sign_flip_scale must be > 0"),
        (["attack.name=min-max", "attack.count=2", "attack.distance_scale=0"], "distance_scale must be > 0"),
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


def _fit(setup, cid: int, round: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Client ``cid``'s update from the initial model in ``round``, and that model."""
    from fedguard.core.messages import Message
    from fedguard.runtime.state_store import MemoryStateStore

    params = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    reply = setup.make_client(cid, MemoryStateStore()).handle(Message("fit", round, cid, {}, params))
    return reply.tensors, params


def test_a_backdoor_attacker_trains_on_its_poisoned_data_and_learns_the_trigger() -> None:
    """The BadNets attacker (Gu et al. 2017) of a scaling attack stamps the trigger the evaluation uses on half
    its examples, relabels them, and its local model learns it: ASR > 90% on its own triggered images of the
    other classes (the trigger the benchmark's triggered test set carries). Before the fix, the attacker's
    data was never poisoned and this rate sat at chance level."""
    from fedguard.attacks.adversary import trigger_of
    from fedguard.attacks.data import Trigger, triggered_test_set
    from fedguard.tasks.classification import ClassificationTask

    attack = ["attack.name=scaling", "attack.clients=0", "attack.boost=4", "attack.target_class=0",
              "train.epochs=5", "train.batch_size=16", "train.lr=0.05", "train.momentum=0.9"]
    setup = Experiment(overrides=[*SMALL, *attack]).assemble()
    assert trigger_of(setup.config.attack) == Trigger(size=3)  # what triggered_test_set is given in the benchmark
    update, params = _fit(setup, 0)
    honest_update, _ = _fit(setup, 1)
    local = {k: params[k] + update[k] / 4 for k in params}  # the attacker's trained model (boost 4 undone)
    triggered = triggered_test_set(setup.client_data(0), trigger_of(setup.config.attack), 0)
    task = ClassificationTask(lambda: setup.model)
    assert task.evaluate(setup.model, local, triggered)["accuracy"] > 0.9
    honest = {k: params[k] + honest_update[k] for k in params}
    assert task.evaluate(setup.model, honest, triggered)["accuracy"] < 0.5  # an honest client learns no trigger
    late, _ = _fit(Experiment(overrides=[*SMALL, *attack, "attack.start_round=2"]).assemble(), 0)
    early = {k: params[k] + late[k] for k in params}  # honest before start_round: no trigger, no boost
    assert task.evaluate(setup.model, early, triggered)["accuracy"] < 0.5


def test_a_backdoor_run_reports_the_attack_success_rate_each_evaluation(tmp_path) -> None:
    """issue 16's metric: under a BadNets or scaling attack every evaluation adds the ASR; other runs do not."""
    attack = ["attack.name=backdoor", "attack.clients=0-1", "run.rounds=1", "run.eval_every=1"]
    result = Experiment(overrides=[*SMALL, *attack]).run(run_dir=tmp_path / "bd")
    assert 0.0 <= result.rows[-1]["test_attack_success_rate"] <= 1.0
    assert "test_attack_success_rate" in result.final
    clean = Experiment(overrides=[*SMALL, "run.rounds=1", "attack.name=sign-flip", "attack.clients=0"]).assemble()
    assert not hasattr(clean.task, "attack_success_rate")


def test_norm_bounding_caps_a_model_replacement_attacker_at_an_honest_share() -> None:
    """A scaling (model-replacement) attacker boosts its update 1,000-fold (Bagdasaryan et al. 2020). Norm
    bounding (Sun et al. 2019) clips each client's *update* before the mean, so the attacker moves the
    aggregate by at most M / n, whatever its boost, and honest updates under the bound pass unchanged."""
    honest = [{"w": torch.full((4,), 0.1 * (1 + i % 3)), "b": torch.tensor([0.05])} for i in range(9)]
    direction = {"w": torch.tensor([1.0, -1.0, 1.0, -1.0]), "b": torch.tensor([1.0])}
    attacker = {k: 1000.0 * v for k, v in direction.items()}
    bound = 1.0
    rule = RobustAggregator(Chain(NormBound(bound)))
    clean, _ = rule.combine(honest)
    attacked, figures = rule.combine([*honest, attacker])
    shift = torch.cat([attacked[k] - clean[k] * 9 / 10 for k in ("w", "b")])
    unit = torch.cat([direction["w"], direction["b"]])
    assert torch.allclose(shift, unit / unit.norm() * bound / 10, atol=1e-6)  # clipped to M, weight 1/n
    for k in clean:  # every honest update is within the bound: their mean is untouched
        assert torch.allclose(clean[k], torch.stack([h[k] for h in honest]).mean(0))
    assert figures["clipped_share"] == pytest.approx(0.1)
