"""run.device: resolving it, placing models, data and DP noise on it, and every message on the CPU.

This machine has no GPU: placement is checked on PyTorch's ``meta`` device (tensors with a
device and a shape but no data), whole runs with ``cpu`` named explicitly, and a CUDA run
where one is visible (skipped here, saying why).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedguard import Experiment
from fedguard.data import ArrayDataset
from fedguard.device import model_on, params_to, resolve_device
from fedguard.pipeline.base import ConfigurationError
from fedguard.privacy.dpsgd import gaussian_like
from fedguard.privacy.noise import SeededRandom
from fedguard.privacy.per_example import _conv, _embedding, _linear, _materialised

SMALL = ["data.num_clients=4", "data.max_train_examples=400", "run.rounds=2", "run.eval_every=1", "run.workers=1",
         "run.progress=false", "run.report=false", "train.max_steps=2"]


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ConfigurationError, match="no CUDA device.*README"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "cuda:0:1", "tpu"):
        with pytest.raises(ConfigurationError, match="not a device"):
            resolve_device(bad)


def test_cuda_index_checked_against_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigurationError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


def test_model_and_data_are_placed_once_and_the_originals_stay():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    assert model_on(model, "cpu") is model
    on_meta = model_on(model, "meta")
    assert on_meta is model_on(model, "meta"), "one copy per process and device"
    assert {t.device.type for t in [*on_meta.parameters(), *on_meta.buffers()]} == {"meta"}
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cpu"}
    data = ArrayDataset(torch.rand(5, 1, 4, 4), torch.arange(5))
    assert data.to("cpu") is data
    moved = data.to("meta")
    assert moved.x.device.type == moved.y.device.type == "meta" and data.x.device.type == "cpu"
    params = params_to(dict(model.named_parameters()), "meta")
    assert all(p.device.type == "meta" for p in params.values())


def test_dp_noise_lands_on_the_device_of_the_gradients_and_is_the_same_noise():
    """DP-SGD's noise on a GPU used to be drawn on the CPU and added to GPU tensors (an error)."""
    grads = {"w": torch.zeros(3, 2, device="meta"), "b": torch.zeros(2, device="meta")}
    seeded = SeededRandom()  # the research-only source: the same noise from the same generator
    noise = gaussian_like(grads, 1.0, torch.Generator().manual_seed(0), seeded)
    assert {v.device.type for v in noise.values()} == {"meta"}
    cpu_noise = gaussian_like({k: torch.zeros(v.shape) for k, v in grads.items()}, 1.0,
                              torch.Generator().manual_seed(0), seeded)
    again = gaussian_like({k: torch.zeros(v.shape) for k, v in grads.items()}, 1.0, torch.Generator().manual_seed(0),
                          seeded)
    assert all(torch.equal(cpu_noise[k], again[k]) for k in grads)


def test_per_example_norms_stay_on_the_device_of_the_activations():
    """The ghost-clipping rules' buffers follow the activations (no CPU tensor mixed in)."""
    batch = 4
    lin = _linear(nn.Linear(3, 2, device="meta"), torch.zeros(batch, 3, device="meta"),
                  torch.zeros(batch, 2, device="meta"))
    conv = _conv(nn.Conv2d(1, 2, 3, device="meta"), torch.zeros(batch, 1, 5, 5, device="meta"),
                 torch.zeros(batch, 2, 3, 3, device="meta"))
    emb = _embedding(nn.Embedding(7, 3, device="meta"), torch.zeros(batch, 5, dtype=torch.long, device="meta"),
                     torch.zeros(batch, 5, 3, device="meta"))
    mat = _materialised({"weight": torch.zeros(batch, 2, 3, device="meta")})
    factors = torch.ones(batch, device="meta")
    for layer in (lin, conv, emb, mat):
        assert layer.sq_norms.device.type == "meta"
        assert {v.device.type for v in layer.combine(factors).values()} == {"meta"}


def test_cpu_named_explicitly_is_the_default_run(tmp_path):
    default = Experiment(overrides=SMALL).run(run_dir=tmp_path / "default")
    explicit = Experiment(overrides=[*SMALL, "run.device=cpu"]).run(run_dir=tmp_path / "cpu")
    for name, value in default.params.items():
        assert torch.equal(explicit.params[name], value)
    assert explicit.final["test_accuracy"] == default.final["test_accuracy"]


def test_generative_tasks_refuse_a_gpu_at_configuration(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    exp = Experiment(overrides=[*SMALL, "task.name=vae", "run.device=cuda"])
    with pytest.raises(ConfigurationError, match="vae task draws its noise on the CPU"):
        exp.assemble()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch on this machine")
@pytest.mark.parametrize("extra", [[], ["dp.mode=sample", "dp.noise_multiplier=1.0", "dp.clip=1.0"]])
def test_a_gpu_run_learns_what_the_cpu_run_learns(tmp_path, extra):
    cpu = Experiment(overrides=[*SMALL, *extra]).run(run_dir=tmp_path / "cpu")
    gpu = Experiment(overrides=[*SMALL, *extra, "run.device=cuda"]).run(run_dir=tmp_path / "gpu")
    assert all(p.device.type == "cpu" for p in gpu.params.values()), "the global model stays on the CPU"
    assert abs(gpu.final["test_accuracy"] - cpu.final["test_accuracy"]) < 0.05
