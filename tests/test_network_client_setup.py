"""A network client builds only its own part of the run, and that part is the simulation's, bit for bit."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import fedguard.plugins  # noqa: F401  (registers every section)
from fedguard.config import Config
from fedguard.data import arrays, registry
from fedguard.data.idx import read_idx, read_idx_rows
from fedguard.experiment import Experiment
from fedguard.messages import Message
from fedguard.runtime.network.client_setup import UnknownClient, partition_app
from fedguard.runtime.state_store import MemoryStateStore

CONFIGS = [
    ["data.num_clients=7"],
    ["data.num_clients=5", "data.validation_fraction=0.1", "data.client_test_fraction=0.2",
     "data.max_train_examples=3000", "data.partition=iid", "train.max_steps=3"],
    ["data.num_clients=4", "train.prox_mu=0.1", "train.max_steps=3"],
    ["data.num_clients=4", "dp.mode=sample", "dp.noise_source=seeded", "train.max_steps=3"],
]


@pytest.mark.parametrize("sets", CONFIGS)
def test_the_client_setup_is_the_simulations(sets: list[str]) -> None:
    """Same examples (and local test examples), same model, same reply to a fit request as
    ``Experiment.assemble().make_client``."""
    setup = Experiment(Config.load(None, sets), log=lambda text: None).assemble()
    for cid in (0, len(setup.parts) - 1):
        sim, net = setup.make_client(cid, MemoryStateStore()), partition_app(Config.load(None, sets), cid, None)
        assert torch.equal(sim.data.x, net.data.x) and torch.equal(sim.data.y, net.data.y)
        assert (sim.test_data is None) == (net.test_data is None)
        if sim.test_data is not None:
            assert torch.equal(sim.test_data.x, net.test_data.x) and torch.equal(sim.test_data.y, net.test_data.y)
        params = {k: v.detach().clone() for k, v in sim.model.state_dict().items()}
        a, b = (app.handle(Message("fit", 1, cid, {}, dict(params))) for app in (sim, net))
        assert a.meta == b.meta and a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_a_client_converts_only_its_own_examples_and_never_loads_the_test_set(monkeypatch) -> None:
    """The regression of issue 19: a client took its partition out of the whole run's setup
    (both datasets as float32, every partition)."""
    converted: list[int] = []
    convert = arrays.from_uint8_images

    def counting(images, labels, name, layout="NHW"):
        converted.append(len(images))
        return convert(images, labels, name, layout)

    def refuse(*args, **kwargs):
        raise AssertionError("a client loaded the whole dataset (train and test)")

    monkeypatch.setattr(arrays, "from_uint8_images", counting)
    monkeypatch.setattr(registry, "load_dataset", refuse)
    monkeypatch.setattr(registry, "load_mnist_5k", refuse)
    app = partition_app(Config.load(None, ["data.num_clients=8"]), 3, None)
    assert max(converted) == len(app.data) < 4000 // 4
    assert sum(converted) <= len(app.data) + 4  # its examples and the four the builders look at
    with pytest.raises(UnknownClient, match="clients 0..7"):
        partition_app(Config.load(None, ["data.num_clients=8"]), 8, None)


def test_idx_rows_are_streamed_exactly(tmp_path: Path) -> None:
    """Rows read from a gzip IDX file in chunks equal those of the whole file, in any order."""
    images = np.random.default_rng(0).integers(0, 256, (50, 3, 2), dtype=np.uint8)
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in images.shape)
                                   + images.tobytes()))
    rows = np.array([49, 0, 7, 7, 23, 48])
    assert np.array_equal(read_idx_rows(path, rows, chunk_rows=4), read_idx(path)[rows])
    assert read_idx_rows(path, np.array([], dtype=np.int64)).shape == (0, 3, 2)
    with pytest.raises(IndexError):
        read_idx_rows(path, np.array([50]))
