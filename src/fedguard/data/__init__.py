"""fedguard.data: datasets (loaded offline from official files) and client partitioners."""

from fedguard.data.arrays import ArrayDataset
from fedguard.data.partition import (
    Partition,
    describe_partition,
    dirichlet,
    iid,
    label_matrix,
    partition,
    partition_summary,
    quantity_skew,
    shards,
    train_test_split_per_client,
)
from fedguard.data.registry import (
    ChecksumMismatchError,
    DatasetNotFoundError,
    dataset_names,
    load_dataset,
)

__all__ = [
    "ArrayDataset",
    "ChecksumMismatchError",
    "DatasetNotFoundError",
    "Partition",
    "dataset_names",
    "describe_partition",
    "dirichlet",
    "iid",
    "label_matrix",
    "load_dataset",
    "partition",
    "partition_summary",
    "quantity_skew",
    "shards",
    "train_test_split_per_client",
]
