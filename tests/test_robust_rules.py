"""The robust rules and pre-aggregators against the papers' formulas, written out independently here,
and against small adversarial cases (the Byzantine rows are the adversary)."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedguard.robust import rules
from fedguard.robust.randomness import secure_generator


def _honest(n: int, d: int, seed: int = 0, spread: float = 0.1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * spread + 1.0


def _krum_score_reference(stack: torch.Tensor, f: int) -> list[float]:
    """Blanchard et al. 2017, literally: for each i, the n - f - 2 smallest ||x_i - x_j||^2 over j != i, summed."""
    n = stack.shape[0]
    scores = []
    for i in range(n):
        dists = sorted(float((stack[i] - stack[j]).pow(2).sum()) for j in range(n) if j != i)
        scores.append(sum(dists[: n - f - 2]))
    return scores


def test_mean_median_trimmed_mean_match_their_definitions() -> None:
    stack = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, -1000.0]])
    assert torch.equal(rules.mean(stack), stack.mean(dim=0))
    w = torch.tensor([1.0, 1.0, 2.0, 0.0])
    assert torch.allclose(rules.mean(stack, w), torch.tensor([2.25, 22.5]))
    assert torch.equal(rules.coordinate_median(stack), torch.tensor([2.5, 15.0]))
    assert torch.equal(rules.coordinate_median(stack[:3]), torch.tensor([2.0, 20.0]))
    assert torch.equal(rules.trimmed_mean(stack, 1), torch.tensor([2.5, 15.0]))
    assert torch.equal(rules.trimmed_mean(stack, 0), stack.mean(dim=0))
    with pytest.raises(ValueError, match="n > 2f"):
        rules.trimmed_mean(stack, 2)


def test_squared_distances_match_cdist() -> None:
    stack = _honest(7, 30, spread=3.0)
    assert torch.allclose(rules.squared_distances(stack), torch.cdist(stack, stack).pow(2), atol=1e-9)


def test_krum_scores_match_the_paper_and_krum_needs_n_above_2f_plus_2() -> None:
    stack = _honest(9, 20, spread=1.0)
    f = 3
    reference = torch.tensor(_krum_score_reference(stack, f), dtype=torch.float64)
    assert torch.allclose(rules.krum_scores(stack, f), reference)
    vec, kept = rules.krum(stack, f)
    assert kept == [int(torch.tensor(_krum_score_reference(stack, f)).argmin())] and torch.equal(vec, stack[kept[0]])
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        rules.krum(stack[:8], f)  # n = 8 = 2f + 2: the paper's condition fails
    with pytest.raises(ValueError, match="1 <= m <= n"):
        rules.multi_krum(stack, f, 0)


def test_krum_and_multi_krum_keep_colluding_outliers_out() -> None:
    honest = _honest(8, 50)
    attackers = torch.full((3, 50), -50.0, dtype=torch.float64)  # identical: they vouch for each other
    stack = torch.cat([honest, attackers])
    _, kept = rules.krum(stack, 3)
    assert kept[0] < 8
    mean, kept = rules.multi_krum(stack, 3, 8)
    assert kept == list(range(8)) and torch.allclose(mean, honest.mean(dim=0))


def _bulyan_reference(stack: torch.Tensor, f: int) -> torch.Tensor:
    """El Mhamdi et al. 2018 written out: theta = n - 2f rounds of Krum on the remaining rows, then per
    coordinate the mean of the beta = theta - 2f selected values closest to the median."""
    n = stack.shape[0]
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        sub = stack[remaining]
        m = len(remaining)
        k = max(1, min(m - 1, m - f - 2))
        scores = []
        for i in range(m):
            d = sorted(float((sub[i] - sub[j]).pow(2).sum()) for j in range(m) if j != i)
            scores.append(sum(d[:k]))
        selected.append(remaining.pop(min(range(m), key=lambda i: scores[i])))
    chosen = stack[selected]
    beta = n - 4 * f
    out = torch.empty(stack.shape[1], dtype=stack.dtype)
    for j in range(stack.shape[1]):
        column = chosen[:, j]
        ordered, half = column.sort().values, len(column) // 2
        med = ordered[half] if len(column) % 2 else ordered[half - 1 : half + 1].mean()
        closest = sorted(column.tolist(), key=lambda v: abs(v - float(med)))[:beta]
        out[j] = sum(closest) / beta
    return out


def test_bulyan_matches_the_paper_and_needs_n_at_least_4f_plus_3() -> None:
    stack = _honest(11, 6, spread=1.0)
    f = 2
    vec, selected = rules.bulyan(stack, f)
    assert len(selected) == 11 - 2 * f
    assert torch.allclose(vec, _bulyan_reference(stack, f), atol=1e-12)
    with pytest.raises(ValueError, match="4f \\+ 3"):
        rules.bulyan(stack[:10], f)


def test_bulyan_resists_outliers_that_krum_alone_would_average_in() -> None:
    honest = _honest(12, 40)
    attackers = honest.mean(dim=0) + torch.tensor([30.0] + [0.0] * 39, dtype=torch.float64)  # one huge coordinate
    stack = torch.cat([honest, attackers.repeat(3, 1)])
    vec, _ = rules.bulyan(stack, 3)
    assert float((vec - honest.mean(dim=0)).abs().max()) < 0.5


def test_geometric_median_minimises_the_sum_of_distances() -> None:
    stack = _honest(9, 5, spread=2.0)
    z, steps = rules.geometric_median(stack, max_iter=500, tol=1e-12)
    objective = (stack - z).norm(dim=1).sum()
    gen = torch.Generator().manual_seed(1)
    for _ in range(50):  # no nearby point does better (first-order optimality, checked by sampling)
        probe = z + 1e-3 * torch.randn(z.shape, generator=gen, dtype=torch.float64)
        assert float((stack - probe).norm(dim=1).sum()) >= float(objective) - 1e-9
    grad = ((z - stack) / (z - stack).norm(dim=1, keepdim=True)).sum(dim=0)
    assert float(grad.norm()) < 1e-4 and steps > 1
    line = torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]], dtype=torch.float64)
    assert abs(float(rules.geometric_median(line, max_iter=1000, tol=1e-15)[0]) - 2.0) < 1e-3  # 1-D: the median


def test_geometric_median_breakdown_under_a_minority_of_outliers() -> None:
    honest = _honest(11, 20)
    stack = torch.cat([honest, torch.full((5, 20), 1e6, dtype=torch.float64)])
    z, _ = rules.geometric_median(stack)
    assert float((z - honest.mean(dim=0)).norm()) < 1.0  # the mean is ~3e5 away


def test_centered_clipping_is_the_mean_without_clipping_and_bounds_each_row_by_tau_over_n() -> None:
    stack = _honest(6, 10)
    center = torch.zeros(10, dtype=torch.float64)
    assert torch.allclose(rules.centered_clipping(stack, center, tau=1e9), stack.mean(dim=0))
    tau = 0.5
    clean = rules.centered_clipping(stack, center, tau)
    poisoned = stack.clone()
    poisoned[0] = 1e6
    moved = rules.centered_clipping(poisoned, center, tau)
    assert float((moved - clean).norm()) <= 2 * tau / 6 + 1e-9  # one row changes the result by <= 2 tau / n
    with pytest.raises(ValueError, match="tau > 0"):
        rules.centered_clipping(stack, center, tau=0.0)


def test_fltrust_follows_cao_et_al() -> None:
    g0 = torch.tensor([1.0, 0.0])
    stack = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-5.0, 0.0], [0.0, 3.0]])
    out, scores = rules.fltrust(stack, g0)
    expected_scores = torch.tensor([1.0, 2**-0.5, 0.0, 0.0])  # ReLU(cos)
    assert torch.allclose(scores, expected_scores)
    rescaled = torch.tensor([[1.0, 0.0], [2**-0.5, 2**-0.5]])  # each x_i scaled to ||g0|| = 1
    expected = (expected_scores[:2, None] * rescaled).sum(0) / expected_scores.sum()
    assert torch.allclose(out, expected)
    boosted = stack.clone()
    boosted[1] *= 1000  # a scaled update gains nothing: it is renormalised to ||g0||
    assert torch.allclose(rules.fltrust(boosted, g0)[0], out)
    zero, _ = rules.fltrust(stack[2:3], g0)  # nothing trusted: no update
    assert torch.equal(zero, torch.zeros(2))


def test_norm_bound_clips_every_row_and_adds_noise_of_the_stated_size() -> None:
    stack = torch.cat([_honest(4, 100, spread=0.01) * 0.01, torch.full((1, 100), 50.0, dtype=torch.float64)])
    clipped = rules.clip_rows(stack, 0.5)
    assert float(clipped.norm(dim=1).max()) <= 0.5 + 1e-9
    assert torch.allclose(clipped[:4], stack[:4])  # small rows untouched
    assert torch.allclose(rules.norm_bound(stack, 0.5), clipped.mean(dim=0))
    big = torch.zeros(3, 20000, dtype=torch.float64)
    noisy = rules.norm_bound(big, 1.0, noise_std=0.1, generator=secure_generator())
    assert abs(float(noisy.std()) - 0.1) < 0.005
    with pytest.raises(ValueError, match="generator"):
        rules.norm_bound(big, 1.0, noise_std=0.1)


def test_nearest_neighbor_mixing_averages_each_rows_n_minus_f_nearest() -> None:
    stack = _honest(7, 4, spread=2.0)
    f = 2
    out = rules.nearest_neighbor_mixing(stack, f)
    for i in range(7):
        order = sorted(range(7), key=lambda j: float((stack[i] - stack[j]).pow(2).sum()))
        assert torch.allclose(out[i], stack[order[: 7 - f]].mean(dim=0))
    with pytest.raises(ValueError, match="n > f"):
        rules.nearest_neighbor_mixing(stack[:2], 2)


def test_bucketing_averages_disjoint_groups_with_an_unpredictable_shuffle() -> None:
    eye = torch.eye(7, dtype=torch.float64)
    out = rules.bucketing(eye, 2, secure_generator())
    assert out.shape == (rules.buckets_after(7, 2), 7) == (4, 7)
    assert torch.allclose(out.sum(dim=0) * 0 + (out > 0).sum(dim=0), torch.ones(7, dtype=torch.float64))
    assert sorted(int((row > 0).sum()) for row in out) == [1, 2, 2, 2]
    # the adversary (who knows run.seed) cannot predict the grouping: repeated draws differ
    draws = [rules.bucketing(eye, 2, secure_generator()) for _ in range(20)]
    groupings = {tuple(tuple(int(i) for i in row.nonzero().flatten()) for row in draw) for draw in draws}
    assert len(groupings) > 1


def test_robust_rules_resist_a_colluding_minority_that_breaks_the_mean() -> None:
    honest = _honest(20, 30)
    target = honest.mean(dim=0)
    attackers = torch.full((4, 30), -100.0, dtype=torch.float64)
    stack = torch.cat([honest, attackers])
    f = 4
    assert float((rules.mean(stack) - target).norm()) > 50
    candidates = {
        "median": rules.coordinate_median(stack),
        "trimmed-mean": rules.trimmed_mean(stack, f),
        "krum": rules.krum(stack, f)[0],
        "multi-krum": rules.multi_krum(stack, f, 24 - f)[0],
        "geometric-median": rules.geometric_median(stack)[0],
        "centered-clipping": rules.centered_clipping(stack, torch.zeros(30, dtype=torch.float64), tau=2.0, iters=3),
        "nnm+trimmed-mean": rules.trimmed_mean(rules.nearest_neighbor_mixing(stack, f), f),
    }
    for name, vec in candidates.items():
        assert float((vec - target).norm()) < 2.5, name


@pytest.mark.parametrize("n,f", [(5, 1), (10, 3)])
def test_multi_krum_keeps_the_m_best_scores(n: int, f: int) -> None:
    stack = _honest(n, 8, seed=n, spread=1.0)
    scores = _krum_score_reference(stack, f)
    m = n - f
    best = sorted(range(n), key=lambda i: scores[i])[:m]
    vec, kept = rules.multi_krum(stack, f, m)
    assert kept == sorted(best) and torch.allclose(vec, stack[best].mean(dim=0))
    assert list(itertools.chain(kept)) == sorted(kept)
