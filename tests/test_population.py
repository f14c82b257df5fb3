"""Large populations: compact partitions and samplers whose memory does not grow per client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedguard import Experiment
from fedguard.algorithms.sampling import ClientSampler
from fedguard.data import ArrayDataset, Partition, label_matrix, partition
from fedguard.pipeline.base import ConfigurationError


def test_partition_reads_like_a_list_of_index_arrays():
    parts = [np.array([3, 5]), np.array([], dtype=np.int64), np.array([0, 1, 9])]
    compact = Partition.from_parts(parts)
    assert len(compact) == 3
    assert [p.tolist() for p in compact] == [[3, 5], [], [0, 1, 9]]
    assert compact[-1].tolist() == [0, 1, 9] and compact[2].dtype == np.int64
    assert [p.tolist() for p in compact[1:]] == [[], [0, 1, 9]]
    assert compact.sizes().tolist() == [2, 0, 3]
    with pytest.raises(IndexError, match="out of range"):
        compact[3]
    with pytest.raises(ValueError, match="offsets"):
        Partition(np.arange(4), np.array([0, 3, 2, 4]))


def test_100k_clients_cost_two_arrays_not_an_object_per_client():
    labels = np.random.default_rng(0).integers(0, 10, size=120_000)
    parts = partition(labels, 100_000, "quantity", 0, alpha=1.0)
    assert isinstance(parts, Partition)
    assert parts.nbytes == 8 * (120_000 + 100_001)  # one int64 per example and per client boundary
    assert parts.sizes().min() >= 1 and parts.sizes().sum() == 120_000
    assert np.array_equal(np.sort(parts.indices), np.arange(120_000))
    assert label_matrix(labels, parts, 10).sum() == 120_000


def test_partitioners_give_the_same_split_as_lists_did():
    """The compact form changes storage, not the split: the per-client arrays of the old list form."""
    labels = np.random.default_rng(1).integers(0, 10, size=3_000)
    parts = partition(labels, 40, "dirichlet", 5, alpha=0.5)
    assignment = np.empty(labels.size, dtype=np.int64)
    for cid, idx in enumerate(parts):
        assignment[idx] = cid
    order = np.argsort(assignment, kind="stable")
    bounds = np.cumsum(np.bincount(assignment, minlength=40))[:-1]
    for old, new in zip(np.split(order, bounds), parts, strict=True):
        assert np.array_equal(old, new)


def test_sampler_over_100k_clients_without_per_client_lists():
    sampler = ClientSampler(100_000, 1_000, seed=3, leave={7: 2})
    first, second = sampler.sample(1), sampler.sample(2)
    assert len(first) == len(second) == 1_000 and first == sorted(first)
    assert all(type(c) is int for c in first)
    assert sampler.available_ids(2).size == 99_999 and 7 not in sampler.available_ids(2)
    assert sampler.sample(1) == first  # reproducible from (seed, round)


def test_a_client_without_examples_is_refused_at_configuration():
    x = torch.rand(20, 1, 4, 4)
    data = ArrayDataset(x, torch.arange(20) % 2)
    parts = [np.arange(10), np.arange(10, 20), np.array([], dtype=np.int64)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    exp = Experiment(overrides=["run.progress=false"], model=model, train=data, test=data, partitions=parts)
    with pytest.raises(ConfigurationError, match=r"clients \[2\] got no examples"):
        exp.assemble()
