"""Partitioners: coverage, reproducibility, skew behaviour, parameter checks, reports."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from fedguard.data import (
    dirichlet,
    iid,
    label_matrix,
    partition,
    partition_summary,
    quantity_skew,
    shards,
    train_test_split_per_client,
)
from fedguard.data.partition import describe_partition
from fedguard.report.partition_plot import plot_label_heatmap, select_clients

# MNIST's training label counts (see ../shared/data/README.md), so no data files are needed.
MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
SCHEMES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("shards", {"shards_per_client": 2}),
    ("quantity", {"alpha": 1.0}),
]


@pytest.fixture(scope="module")
def mnist_labels() -> np.ndarray:
    rng = np.random.default_rng(123)
    return rng.permutation(np.repeat(np.arange(10), MNIST_COUNTS))


@pytest.fixture(scope="module")
def balanced_labels() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.permutation(np.repeat(np.arange(10), 600))


def _assert_exact_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each client's indices are sorted and unique"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_every_example_assigned_exactly_once(balanced_labels, scheme, kwargs):
    parts = partition(balanced_labels, 50, scheme, 0, **kwargs)
    _assert_exact_cover(parts, balanced_labels.size, 50)


@pytest.mark.parametrize(("scheme", "kwargs"), SCHEMES)
def test_same_seed_same_split_other_seed_different(balanced_labels, scheme, kwargs):
    a = partition(balanced_labels, 20, scheme, 3, **kwargs)
    b = partition(balanced_labels, 20, scheme, 3, **kwargs)
    c = partition(balanced_labels, 20, scheme, 4, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_seed_semantics_are_pinned():
    # Benchmarks define partitions as "label-Dirichlet alpha 0.5 (numpy seed 0)": keep them.
    parts = dirichlet(np.arange(200) % 10, 5, 0.5, seed=0)
    assert [len(p) for p in parts] == [39, 33, 53, 23, 52]
    assert parts[0][:10].tolist() == [4, 5, 8, 14, 15, 33, 38, 40, 43, 55]


def test_label_skew_grows_as_alpha_falls(mnist_labels):
    stats = {a: partition_summary(mnist_labels, dirichlet(mnist_labels, 20, a, 0)) for a in (100, 1, 0.1)}
    entropy = [stats[a]["mean_label_entropy_bits"] for a in (100, 1, 0.1)]
    distance = [stats[a]["mean_tv_from_global"] for a in (100, 1, 0.1)]
    assert entropy[0] > entropy[1] > entropy[2]
    assert distance[0] < distance[1] < distance[2]
    assert stats[100]["mean_tv_from_global"] < 0.1 < 0.5 < stats[0.1]["mean_tv_from_global"]


def test_shards_give_each_client_at_most_k_classes(balanced_labels):
    # 600 examples per class, shards of 6000 / (100 * 2) = 30: shards never straddle classes.
    parts = shards(balanced_labels, 100, shards_per_client=2, seed=0)
    classes = (label_matrix(balanced_labels, parts, 10) > 0).sum(axis=1)
    assert classes.max() <= 2
    assert {len(p) for p in parts} == {60}


def test_shards_on_unaligned_classes_stay_pathological(mnist_labels):
    parts = shards(mnist_labels, 100, shards_per_client=2, seed=0)
    classes = (label_matrix(mnist_labels, parts, 10) > 0).sum(axis=1)
    assert classes.max() <= 4
    assert classes.mean() < 2.5


def test_quantity_skew_unequal_sizes_iid_labels(mnist_labels):
    parts = quantity_skew(mnist_labels, 50, alpha=0.5, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 1
    assert sizes.max() > 5 * sizes.min()
    assert partition_summary(mnist_labels, parts)["mean_tv_from_global"] < 0.2


def test_iid_sizes_differ_by_at_most_one(mnist_labels):
    sizes = [len(p) for p in iid(mnist_labels, 7, seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_thousand_clients_alpha_half_on_60000_labels(mnist_labels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first draw must already satisfy min_size
        parts = dirichlet(mnist_labels, 1000, alpha=0.5, seed=0)
    _assert_exact_cover(parts, 60000, 1000)
    assert min(len(p) for p in parts) >= 1


def test_dirichlet_tops_up_when_draws_leave_clients_short(mnist_labels):
    with pytest.warns(UserWarning, match="moved"):
        parts = dirichlet(mnist_labels, 1000, alpha=0.1, seed=0, min_size=5)
    _assert_exact_cover(parts, 60000, 1000)
    assert min(len(p) for p in parts) >= 5


@pytest.mark.parametrize(
    ("call", "param"),
    [
        (lambda y: partition(y, 10, "dirichlet", 0, alpha=0), "alpha"),
        (lambda y: partition(y, 10, "dirichlet", 0, alpha=-1.0), "alpha"),
        (lambda y: partition(y, 10, "quantity", 0, alpha=float("nan")), "alpha"),
        (lambda y: partition(y, 6001, "iid", 0), "num_clients"),
        (lambda y: partition(y, 0, "iid", 0), "num_clients"),
        (lambda y: partition(y, 7, "shards", 0, shards_per_client=2), "shards_per_client"),
        (lambda y: partition(y, 10, "shards", 0, shards_per_client=0), "shards_per_client"),
        (lambda y: partition(y, 10, "dirichlet", 0, min_size=601), "min_size"),
        (lambda y: partition(y, 10, "bogus", 0), "scheme"),
        (lambda y: partition(y, 10, "iid", 0, alpha=1.0), "alpha"),
        (lambda y: train_test_split_per_client(iid(y, 3), test_fraction=1.5), "test_fraction"),
    ],
)
def test_bad_parameters_name_the_parameter(balanced_labels, call, param):
    with pytest.raises(ValueError, match=param):
        call(balanced_labels)


def test_unknown_scheme_lists_the_allowed_ones(balanced_labels):
    with pytest.raises(ValueError, match="iid, dirichlet, shards, quantity"):
        partition(balanced_labels, 10, "label-skew", 0)


def test_train_test_split_per_client(balanced_labels):
    parts = dirichlet(balanced_labels, 20, 0.5, seed=0)
    train, test = train_test_split_per_client(parts, test_fraction=0.25, seed=1)
    again = train_test_split_per_client(parts, test_fraction=0.25, seed=1)
    for part, tr, te, tr2 in zip(parts, train, test, again[0], strict=True):
        assert np.array_equal(np.union1d(tr, te), part)
        assert np.intersect1d(tr, te).size == 0
        assert len(tr) >= 1
        assert abs(len(te) - 0.25 * len(part)) <= 1
        assert np.array_equal(tr, tr2)


def test_label_matrix_summary_and_table(balanced_labels):
    parts = shards(balanced_labels, 100, 2, seed=0)
    matrix = label_matrix(balanced_labels, parts, 10)
    assert matrix.shape == (100, 10)
    assert matrix.sum() == balanced_labels.size
    assert np.array_equal(matrix.sum(axis=0), np.bincount(balanced_labels))
    s = partition_summary(balanced_labels, parts, 10)
    assert (s["size_min"], s["size_median"], s["size_max"], s["empty_clients"]) == (60, 60, 60, 0)
    assert s["mean_classes_per_client"] <= 2
    text = describe_partition(balanced_labels, parts, 10, max_rows=5)
    assert "100 clients, 6000 examples, 10 classes" in text
    assert "(5 of 100 clients shown" in text


def test_heatmap_png_shows_at_most_100_clients(tmp_path, mnist_labels):
    parts = dirichlet(mnist_labels, 1000, 0.5, seed=0)
    path = plot_label_heatmap(label_matrix(mnist_labels, parts, 10), tmp_path / "p" / "heat.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = select_clients(1000)
    assert shown.size == 100 and shown[0] == 0 and shown[-1] == 999
