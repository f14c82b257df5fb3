"""The Frechet distance and its feature classifier: exact values, caching, sanity ordering."""

import json

import pytest
import torch

from fedguard.data.registry import load_dataset
from fedguard.tasks.frechet import (
    ClassifierSettings,
    FrechetScorer,
    feature_classifier,
    frechet_distance,
    gaussian_stats,
    sanity_scores,
)


def test_one_dimensional_value_by_hand():
    # N(0, 1) vs N(2, 4): (0 - 2)^2 + 1 + 4 - 2 sqrt(1 * 4) = 5
    fd = frechet_distance(torch.zeros(1), torch.ones(1, 1), torch.full((1,), 2.0), torch.full((1, 1), 4.0))
    assert fd == pytest.approx(5.0)


def test_matches_scipy_sqrtm_and_is_zero_on_itself():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 6, generator=g), torch.randn(300, 6, generator=g) * 1.5 + 0.3
    (m1, c1), (m2, c2) = gaussian_stats(a), gaussian_stats(b)
    root = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum() + torch.trace(c1) + torch.trace(c2)) - 2 * float(root.trace())
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-8)


@pytest.fixture(scope="module")
def mnist_small():
    train, test = load_dataset("mnist-5k")
    return train.subset(torch.arange(2000), "mnist-2k"), test


def test_classifier_is_cached_and_sanity_ordering_holds(tmp_path, mnist_small):
    train, test = mnist_small
    settings = ClassifierSettings(epochs=1)
    net, info = feature_classifier(train, settings, tmp_path)
    assert info["train_accuracy"] > 0.6 and info["examples"] == 2000
    (meta,) = tmp_path.glob("fd-classifier-*.json")
    assert json.loads(meta.read_text())["settings"]["epochs"] == 1
    cached, _ = feature_classifier(train, settings, tmp_path)  # loaded, not retrained
    x = test.x[:50]
    assert torch.equal(net.features(x), cached.features(x))
    scores = sanity_scores(FrechetScorer(cached), train, test, 500)
    # real train vs real test must score far lower than noise or a collapsed generator
    for bad in ("noise", "collapsed", "one_class"):
        assert scores[bad] > 5 * scores["real"], (bad, scores)
