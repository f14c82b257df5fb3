"""A user's own example files (fedguard.data.files): what a network client's --data and FLTrust's root data read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fedguard.core.pipeline import ConfigurationError
from fedguard.data.files import load_examples
from fedguard.robust.root import load_root_data
from fedguard.runtime.network.client import ClientSetupError, load_local_data


def test_npz_and_safetensors_give_the_same_scaled_examples(tmp_path) -> None:
    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4) * 7
    y = np.array([3, 1])
    np.savez(tmp_path / "a.npz", x=x, y=y)
    save_file({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, str(tmp_path / "a.safetensors"))
    a, b = load_examples(tmp_path / "a.npz"), load_examples(tmp_path / "a.safetensors", "mine")
    assert a.x.shape == (2, 1, 4, 4) and a.x.dtype == torch.float32 and float(a.x.max()) <= 1.0
    assert torch.equal(a.x, b.x) and torch.equal(a.y, torch.tensor([3, 1])) and a.y.dtype == torch.long
    assert torch.allclose(a.x[0, 0], torch.from_numpy(x[0]).float() / 255.0)
    assert a.name == "a" and b.name == "mine"
    features = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=features, y=np.zeros(3, dtype=np.int64))
    assert torch.allclose(load_examples(tmp_path / "f.npz").x, torch.from_numpy(features))  # floats kept as they are


def test_a_pickled_npz_is_refused(tmp_path) -> None:
    np.savez(tmp_path / "p.npz", x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="pickle"):
        load_examples(tmp_path / "p.npz")


def test_each_caller_names_its_own_setting_for_another_file_type(tmp_path) -> None:
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(ConfigurationError, match="robust.root_data="):
        load_root_data(tmp_path / "d.csv")
    with pytest.raises(ClientSetupError, match="--data "):
        load_local_data(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="npz or .safetensors"):
        load_examples(tmp_path / "d.csv")
