"""Same seed, same model, bit for bit, across refactors of the round's code.

Each case runs a tiny 2-round experiment and compares the SHA-256 of the final global model
with the value recorded on main before the algorithm contract (issue 15) replaced the
hard-coded FedAvg round. A change in any of these hashes means a refactor changed the numbers;
if a change is *intended* (a new default, a fixed bug), say so in the commit and record the new
hash. The values hold for torch 2.13.0 on CPU with one thread per client (float results of
convolutions may differ on another torch version or CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import numpy as np
import pytest
import torch

from fedguard import ArrayDataset, Experiment

TINY = [
    "run.progress=false",
    "run.report=false",
    "run.workers=1",
    "run.rounds=2",
    "run.eval_every=0",
    "run.threads=1",
    "data.num_clients=4",
    "train.batch_size=32",
]

#: case -> (overrides, SHA-256 of the final model) recorded on main at 173e689
CASES: dict[str, tuple[list[str], str]] = {
    "fedavg": ([], "550eaee8da9e1c200613f55a97f061fb3acd1fa85193879996672f4a5c120dc2"),
    "fedprox": (["train.prox_mu=0.1"], "d29e682a60675a1d1c1cee1a6b230745477f7af76f104a7180305465979bdbcd"),
    "secagg": (
        ["secure.mode=secagg", "server.weighting=uniform", "secure.clip=0.5"],
        "323e9a9978218fb3a929c6ca3126717ef55458b20f5f476cc594d04e44085a18",
    ),
    "dpsgd": (
        ["dp.mode=sample", "dp.noise_multiplier=1.0", "dp.clip=1.0", "train.max_steps=3", "dp.accountant=rdp"],
        "7a1bde0c8ff9416f715c8ff7a1aad8f4bc62d2c65838e740ae48f1600a905872",
    ),
    "dp-client": (
        ["dp.mode=client", "server.weighting=uniform", "dp.noise_multiplier=0.5", "dp.clip=0.5", "dp.accountant=rdp"],
        "36f54406c6dfa4ed7ab60471b3c7cf31e750a72e06947893f4631f7c71b1710d",
    ),
    "median": (["robust.rule=median"], "3a458fe95d2b44bf143b12da656c3718a8d9ed8a1aeb0804f0b3dbe3f7381288"),
    "fedadam-cosine": (
        [
            "server.optimizer=fedadam",
            "server.lr=0.01",
            "train.lr_schedule=cosine",
            "train.weight_decay=0.001",
            "train.max_steps=5",
        ],
        "f323a2919b55844d6e3bf2f359d98cba20104d51ed2711528d0b597a65a7de21",
    ),
    "vae-adam": (
        [
            "task.name=vae",
            "vae.hidden=32",
            "vae.latent=4",
            "vae.iwae_k=2",
            "vae.eval_examples=50",
            "train.prox_mu=0.01",
        ],
        "f38d2ec4b3878527ae5fea8f6e1c3a8e6a3b769743081eba8fd4fa3005e5b0d4",
    ),
    "mae-adam": (
        [
            "task.name=mae",
            "mae.dim=16",
            "mae.depth=1",
            "mae.heads=2",
            "mae.decoder_dim=16",
            "mae.eval_examples=50",
            "mae.probe_examples=60",
            "mae.probe_iters=2",
            "train.max_steps=3",
        ],
        "db4dcab4d623b9197d8e35c7e4d50614588318461dd1db3875f34e11326c31d3",
    ),
}


def model_hash(params: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def reproducible_noise(overrides: list[str]) -> list[str]:
    """Seeded (research-only) DP noise where the configuration offers the choice."""
    from fedguard.config import SECTIONS

    dp = SECTIONS.get("dp")
    if dp is not None and "noise_source" in {f.name for f in dataclasses.fields(dp)}:
        return [*overrides, "dp.noise_source=seeded"]
    return overrides


@functools.lru_cache(maxsize=1)
def data() -> tuple[ArrayDataset, ArrayDataset]:
    """The embedded MNIST subset's first 480 training images and 100 test images (evaluation is not hashed)."""
    from fedguard.data.registry import load_dataset

    train, test = load_dataset("mnist-5k", None)
    return train.subset(np.arange(480), "train"), test.subset(np.arange(100), "test")


def run_case(name: str, tmp_path) -> str:
    overrides, _ = CASES[name]
    train, test = data()
    exp = Experiment(overrides=[*TINY, *reproducible_noise(overrides)], train=train, test=test)
    return model_hash(exp.run(run_dir=tmp_path / name).params)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_gives_the_recorded_model(name, tmp_path):
    expected = CASES[name][1]
    assert run_case(name, tmp_path) == expected, f"{name}: the model changed bit for bit (see this file's docstring)"
