"""Attacks as functions, against the papers' formulas: model poisoning over update vectors, data poisoning
over images and labels."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from fedguard.attacks import data as poison
from fedguard.attacks import vectors as atk
from fedguard.data.arrays import ArrayDataset
from fedguard.robust import rules


def _honest(n: int = 12, d: int = 40, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.5 + 0.2


def test_non_omniscient_model_poisoning() -> None:
    u = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(atk.sign_flip(u), -u)
    assert torch.equal(atk.scale(u, 10.0), 10 * u)
    assert atk.model_replacement_boost(50, 1) == 50.0 and atk.model_replacement_boost(50, 5, 0.5) == 20.0
    noise = atk.gaussian(torch.zeros(50000), 2.0, torch.Generator().manual_seed(0))
    assert abs(float(noise.std()) - 2.0) < 0.05 and abs(float(noise.mean())) < 0.05


def test_alie_uses_baruch_et_al_z_and_the_honest_mean_and_std() -> None:
    # s = floor(50/2 + 1) - 10 = 16 supporters, z = Phi^-1((50 - 16) / 50)
    assert atk.alie_z(50, 10) == pytest.approx(NormalDist().inv_cdf(34 / 50))
    assert atk.alie_z(50, 10) == pytest.approx(0.4677, abs=1e-4)
    h = _honest()
    v = atk.alie(h, 1.5)
    assert torch.allclose(v, h.mean(0) + 1.5 * h.std(0, unbiased=True))
    with pytest.raises(ValueError, match="undefined"):
        atk.alie_z(10, 6)


def test_ipm_reverses_the_mean_when_f_epsilon_exceeds_n_minus_f() -> None:
    h = _honest()
    v = atk.ipm(h, 0.1)
    assert torch.allclose(v, -0.1 * h.mean(0))
    true = h.mean(0)
    f, honest_n = 4, h.shape[0]  # n - f = 12 honest rows
    for eps, sign in ((0.1, 1), (2 * honest_n / f, -1)):
        agg = rules.mean(torch.cat([h, atk.ipm(h, eps).repeat(f, 1)]))
        assert sign * float(agg @ true) > 0


def test_the_mirror_multiplier_turns_the_mean_into_minus_the_honest_share() -> None:
    n, f = 50, 10
    s = atk.mirror_multiplier(n, f)
    assert s == 8.0 and ((n - f) - f * s) / n == -(n - f) / n
    for bad in ((10, 0), (10, 10)):
        with pytest.raises(ValueError, match="1 <= f < n"):
            atk.mirror_multiplier(*bad)


def test_ipm_at_the_mirror_multiplier_is_minus_epsilon_times_the_honest_mean_and_mirrors_fedavg() -> None:
    h = _honest(16)
    f = 4
    n = h.shape[0] + f
    eps = atk.mirror_multiplier(n, f)
    v = atk.ipm(h, eps)
    assert torch.allclose(v, -eps * h.mean(0))
    fedavg = rules.mean(torch.cat([h, v.repeat(f, 1)]))
    assert torch.allclose(fedavg, -(n - f) / n * h.mean(0))  # the honest clients' share, reversed
    assert float(fedavg @ h.mean(0)) < 0


def test_scaled_sign_flipping_mirrors_the_mean_and_plain_flipping_only_shrinks_it() -> None:
    h = _honest(16)
    f = 4
    n = h.shape[0] + f
    u = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(atk.sign_flip(u, 2.5), -2.5 * u) and torch.equal(atk.sign_flip(u), -u)
    own = h.mean(0).repeat(f, 1)  # the Byzantine clients' own updates, at the honest mean
    mirrored = rules.mean(torch.cat([h, atk.sign_flip(own, atk.mirror_multiplier(n, f))]))
    assert torch.allclose(mirrored, -(n - f) / n * h.mean(0))
    shrunk = rules.mean(torch.cat([h, atk.sign_flip(own)]))
    assert torch.allclose(shrunk, (n - 2 * f) / n * h.mean(0)) and float(shrunk @ h.mean(0)) > 0


def test_alie_at_a_large_z_moves_every_coordinate_of_the_mean_by_f_z_over_n_standard_deviations() -> None:
    h = _honest(16)
    f = 4
    n = h.shape[0] + f
    z = atk.mirror_multiplier(n, f)
    fedavg = rules.mean(torch.cat([h, atk.alie(h, z).repeat(f, 1)]))
    sigma = h.std(0, unbiased=True)
    assert torch.allclose(fedavg - h.mean(0), f * z / n * sigma)  # 2 (n - f) / n = 1.6 deviations here
    assert bool(((fedavg - h.mean(0)) > sigma).all())


@pytest.mark.parametrize("perturbation", ["std", "unit-vec"])
def test_min_max_with_a_distance_scale_keeps_the_scaled_bound_and_goes_further(perturbation: str) -> None:
    h = _honest()
    scale = 8.0
    mu = h.mean(0)
    p = {"std": h.std(0, unbiased=True), "unit-vec": mu / mu.norm()}[perturbation]
    diameter = float(torch.cdist(h, h).max())
    gammas = {}
    for k in (1.0, scale):
        v = atk.min_max(h, perturbation, distance_scale=k)
        gammas[k] = float(((mu - v) @ p) / (p @ p))
        assert float((h - v).norm(dim=1).max()) <= k * diameter + 1e-9
        assert float((h - (mu - (gammas[k] + 1e-3) * p)).norm(dim=1).max()) > k * diameter  # maximal
    assert gammas[scale] > 4 * gammas[1.0]
    assert torch.equal(atk.min_max(h, perturbation), atk.min_max(h, perturbation, distance_scale=1.0))
    v = atk.min_sum(h, perturbation, distance_scale=scale)
    assert float((h - v).pow(2).sum()) <= scale**2 * float(torch.cdist(h, h).pow(2).sum(dim=1).min()) + 1e-9
    with pytest.raises(ValueError, match="distance_scale must be > 0"):
        atk.min_max(h, perturbation, distance_scale=0.0)


@pytest.mark.parametrize("perturbation", ["std", "unit-vec", "sign"])
def test_min_max_takes_the_largest_gamma_within_the_honest_diameter(perturbation: str) -> None:
    h = _honest()
    v = atk.min_max(h, perturbation)
    mu = h.mean(0)
    diameter = float(torch.cdist(h, h).max())
    assert float((h - v).norm(dim=1).max()) <= diameter + 1e-9
    p = {"std": h.std(0, unbiased=True), "unit-vec": mu / mu.norm(), "sign": mu.sign()}[perturbation]
    gamma = float(((mu - v) @ p) / (p @ p))
    assert torch.allclose(v, mu - gamma * p)
    assert gamma > 0 and float((h - (mu - (gamma + 1e-3) * p)).norm(dim=1).max()) > diameter  # maximal


def test_min_sum_scores_no_worse_than_the_best_honest_update() -> None:
    h = _honest()
    v = atk.min_sum(h)
    sums = torch.cdist(h, h).pow(2).sum(dim=1)
    assert float((h - v).pow(2).sum()) <= float(sums.min()) + 1e-9
    mu, p = h.mean(0), h.std(0, unbiased=True)
    gamma = float(((mu - v) @ p) / (p @ p))
    assert float((h - (mu - (gamma + 1e-3) * p)).pow(2).sum()) > float(sums.min())
    with pytest.raises(ValueError, match="perturbation"):
        atk.min_sum(h, "zipf")


def test_min_max_update_is_chosen_by_krum_over_honest_ones() -> None:
    h = _honest(20)
    f = 5
    stack = torch.cat([h, atk.min_sum(h).repeat(f, 1)])
    _, kept = rules.krum(stack, f)
    assert kept[0] >= 20  # the attack hides as the most central update: it was built to


def test_mimic_copies_the_honest_client_farthest_along_the_main_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(10, 30, generator=gen, dtype=torch.float64) * 0.01
    h[:, 0] += torch.linspace(-1, 1, 10, dtype=torch.float64)  # most variance along coordinate 0
    ids = list(range(100, 110))
    mimic = atk.Mimic(warmup=2)
    for _ in range(3):
        v = mimic(h, ids, torch.Generator().manual_seed(1))
    assert mimic.target in (100, 109) and torch.equal(v, h[ids.index(mimic.target)])
    shuffled = [ids[i] for i in reversed(range(10))]
    v = mimic(h.flip(0), shuffled, torch.Generator().manual_seed(1))
    assert torch.equal(v, h[ids.index(mimic.target)])  # the target is a client, not a row position


def test_label_flipping_and_the_badnets_trigger() -> None:
    assert torch.equal(poison.flip_labels(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))
    x = torch.zeros(2, 1, 28, 28)
    t = poison.Trigger(size=3, value=1.0, margin=1)
    stamped = t.apply(x)
    assert float(stamped.sum()) == 2 * 9 and torch.equal(stamped[0, 0, 24:27, 24:27], torch.ones(3, 3))
    assert float(x.sum()) == 0.0  # the input is not modified
    with pytest.raises(ValueError, match="does not fit"):
        poison.Trigger(size=30).apply(x)


def test_backdoor_poisoning_and_the_triggered_test_set() -> None:
    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(100, 1, 28, 28) * 0.5, torch.randint(0, 10, (100,), generator=gen))
    t = poison.Trigger()
    poisoned = poison.poison_backdoor(data, t, target=7, fraction=0.3, generator=gen)
    stamped = (poisoned.x[:, 0, 24:27, 24:27] == 1.0).flatten(1).all(dim=1)
    assert int(stamped.sum()) == 30 and bool((poisoned.y[stamped] == 7).all())
    assert torch.equal(poisoned.x[~stamped], data.x[~stamped]) and torch.equal(poisoned.y[~stamped], data.y[~stamped])
    test = poison.triggered_test_set(data, t, 7)
    assert len(test) == int((data.y != 7).sum()) and bool((test.y == 7).all())
    flipped = poison.flip_dataset(data, 10)
    assert torch.equal(flipped.y, 9 - data.y)


def test_hostile_client_poisons_only_its_own_data_and_update() -> None:
    from fedguard.attacks.adversary import HostileClient
    from fedguard.attacks.config import AttackConfig

    gen = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.rand(40, 1, 28, 28) * 0.5, torch.randint(0, 10, (40,), generator=gen), "client-3")
    update = {"w": torch.ones(3)}
    flipper = HostileClient(AttackConfig(name="label-flip", start_round=2), frozenset({3}), 10)
    assert not flipper.active(3, 1) and flipper.active(3, 2) and not flipper.active(4, 5)
    assert torch.equal(flipper.local_data(3, data).y, 9 - data.y) and flipper.trains()
    scaler = HostileClient(AttackConfig(name="scaling", poison_fraction=0.25), frozenset({3}), 10, boost=10.0)
    poisoned = scaler.local_data(3, data)
    assert int((poisoned.y != data.y).sum()) <= 10 and poisoned is scaler.local_data(3, data)  # poisoned once
    assert torch.equal(scaler.update(update, gen)["w"], torch.full((3,), 10.0))
    noise = HostileClient(AttackConfig(name="gaussian", gaussian_sigma=2.0), frozenset({3}), 10)
    assert not noise.trains() and noise.update(update, gen)["w"].shape == (3,)
    omni = HostileClient(AttackConfig(name="alie"), frozenset({3}), 10)
    assert not omni.trains() and torch.equal(omni.update(update, gen)["w"], torch.zeros(3))
    for skipper in (noise, omni):  # their update ignores training: one example, not the client's data
        one = skipper.local_data(3, data)
        assert len(one) == 1 and torch.equal(one.x[0], data.x[0])


def test_backdoor_evaluation_reports_the_attack_success_rate() -> None:
    from torch import nn

    from fedguard.attacks.evaluation import BackdoorEvaluation
    from fedguard.tasks.classification import ClassificationTask

    class CornerDetector(nn.Module):
        """Class 0 when the bottom-right 3x3 patch is bright, else the true class is unknown: class 5."""

        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bright = (x[:, 0, 24:27, 24:27].mean(dim=(1, 2)) > 0.99).float()
            logits = torch.zeros(x.shape[0], 10) + self.bias
            logits[:, 0] += 10 * bright
            logits[:, 5] += 5
            return logits

    task = BackdoorEvaluation(ClassificationTask(CornerDetector), poison.Trigger(), target=0)
    model = task.build_model()
    params = dict(model.named_parameters())
    test = ArrayDataset(torch.rand(30, 1, 28, 28) * 0.5, torch.tensor([0, 5, 7] * 10))
    metrics = task.evaluate(model, params, test)
    assert metrics["accuracy"] == pytest.approx(1 / 3) and metrics["attack_success_rate"] == 1.0
