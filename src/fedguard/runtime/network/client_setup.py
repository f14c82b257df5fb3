"""A network client's application, built from the run's configuration and nothing it does not need.

:meth:`fedguard.experiment.Experiment.assemble` builds a whole run: both datasets converted to
float, every client's partition, the report and tracking machinery. A client process needs its
own partition and the trainer, so this module takes the same steps on what it needs only: the
training labels to partition, the uint8 pixels of its own examples (read from disk when the
dataset allows, :func:`fedguard.data.registry.load_train`), never the test set, and none of the
report, plotting or simulation modules. Its partition, model, trainer and pipeline are those of
the simulation, bit for bit (``tests/test_network_client_setup.py`` checks it against ``assemble``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedguard import builders
from fedguard.algorithms.sampling import ClientSampler, parse_schedule
from fedguard.config import Config
from fedguard.data.arrays import ArrayDataset
from fedguard.data.partition import Partition, configured_partition, train_test_split_per_client
from fedguard.data.registry import load_train
from fedguard.data.validation import stratified_split
from fedguard.device import CPU_ONLY_TASKS, check_device_spec, resolve_device
from fedguard.pipeline.base import ConfigurationError
from fedguard.runtime.client import ClientApp

#: tasks whose builders read only the training set's example shape and class count
SHAPE_ONLY_TASKS = ("classification", "vae", "mae")


class UnknownClient(ConfigurationError):
    """The client's id is not one of the run's clients."""


class TrainSummary(ArrayDataset):
    """What the builders read of a training set that is not held: its first examples, its size
    and its class count (``len`` and ``num_classes`` are those of the whole set)."""

    def __init__(self, head: ArrayDataset, size: int, classes: int) -> None:
        super().__init__(head.x, head.y, head.name)
        self.size, self.classes = size, classes

    def __len__(self) -> int:
        return self.size

    @property
    def num_classes(self) -> int:
        """Classes of the whole training set."""
        return self.classes

    @property
    def labels(self) -> np.ndarray:
        """Refused: the summary holds the first labels only."""
        raise TypeError("a TrainSummary holds the first labels only; read them from the training set")

    def subset(self, indices: Any, name: str | None = None) -> ArrayDataset:
        """Refused: the summary holds the first examples only."""
        raise TypeError("a TrainSummary holds no examples to take; take them from the training set")


def client_sampler(config: Config) -> ClientSampler:
    """Per-round client sampling with the configured join/leave schedule (as ``Experiment.make_sampler``)."""
    s, f, n = config.server, config.faults, config.data.num_clients
    return ClientSampler(n, s.clients_per_round, s.fraction, config.run.seed,
                         parse_schedule(f.join, n, "join"), parse_schedule(f.leave, n, "leave"))


def training_indices(config: Config, labels: np.ndarray) -> np.ndarray:
    """Indices of the examples the clients share out: the first ``data.max_train_examples``,
    less the validation examples the server holds out (as ``Experiment.load_data`` and
    ``split_validation``)."""
    base = np.arange(labels.shape[0])
    n = config.data.max_train_examples
    if n and n < base.size:
        base = base[:n]
    fraction = config.data.validation_fraction
    if not fraction:
        return base
    kept, held = stratified_split(labels[base], fraction, config.run.seed)
    if len(held) == 0:
        raise ConfigurationError(f"data.validation_fraction={fraction:g} of {base.size} training examples "
                                 "holds out none; use a larger fraction")
    return base[kept]


def client_partitions(config: Config, labels: np.ndarray) -> tuple[Partition, Partition | list[np.ndarray]]:
    """(each client's training indices, each client's local test indices) into ``labels``
    (as ``Experiment.make_partitions`` and ``assemble``)."""
    d = config.data
    parts = configured_partition(d, config.run.seed, labels)
    empty = np.flatnonzero(parts.sizes() == 0)
    if empty.size:
        raise ConfigurationError(f"clients {empty[:5].tolist()} got no examples (every client in the population "
                                 "holds at least one); use fewer clients or a larger alpha")
    if d.client_test_fraction > 0:
        return train_test_split_per_client(parts, d.client_test_fraction, config.run.seed)
    return parts, []


def client_device(config: Config) -> torch.device:
    """The device of ``run.device`` on this machine, checked against the task (as ``Experiment.device``)."""
    check_device_spec(config.run.device)
    device = resolve_device(config.run.device)
    if device.type != "cpu" and config.task.name in CPU_ONLY_TASKS:
        raise ConfigurationError(f"run.device = {config.run.device!r}: the {config.task.name} task draws its noise on "
                                 "the CPU and runs there only; use run.device = 'cpu'")
    return device


def build_parts(config: Config, train: ArrayDataset, sizes: list[int],
                log: Callable[[str], None]) -> tuple[Any, torch.nn.Module, ClientSampler, Any, Any]:
    """(task, seeded model, sampler, trainer, pipeline) of the run, built from ``train``
    (the training set or its :class:`TrainSummary`) as ``assemble`` builds them."""
    task = builders.build_task(config, train)
    model = builders.seeded_model(task, config.run.seed)
    sampler = client_sampler(config)
    bctx = builders.BuildContext(config, train, sizes, sampler, task, log)
    return task, model, sampler, builders.build_trainer(bctx), builders.build_pipeline(bctx)


def partition_app(config: Config, client_id: int, store: Any) -> ClientApp:
    """Client ``client_id`` of the run with its partition of the configured dataset, as the
    simulation builds it, having converted to float only its own examples."""
    d = config.data
    full = load_train(d.dataset, d.data_dir or None, download=d.download)
    base = training_indices(config, full.labels)
    parts, local_test = client_partitions(config, full.labels[base])
    if not 0 <= client_id < len(parts):
        raise UnknownClient(f"the run has clients 0..{len(parts) - 1}; this key is for client {client_id}")
    labels = full.labels[base]
    if config.task.name in SHAPE_ONLY_TASKS:
        head = full.subset(base[:4], full.name)
        train: ArrayDataset = TrainSummary(head, int(base.size), int(labels.max()) + 1 if labels.size else 0)
    else:  # a task that reads the training set itself (the GAN's feature classifier)
        train = full.subset(base, full.name)
    task, model, _, trainer, pipeline = build_parts(config, train, parts.sizes().tolist(), lambda text: None)
    data = full.subset(base[parts[client_id]], f"client-{client_id}")
    mine = full.subset(base[local_test[client_id]], f"client-{client_id}-test") if len(local_test) else None
    return ClientApp(client_id, task, model, data, trainer, pipeline, config.run.seed, store, mine,
                     client_device(config))
