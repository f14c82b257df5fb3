"""The benchmarks' multi-process limit computes the same FedAvg as the 1-process bare loop."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
bare_loop = pytest.importorskip("bare_loop")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_limit_equals_bare_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(120, 1, 4, 4, generator=gen), torch.randint(0, 3, (120,), generator=gen)
    parts = np.array_split(np.random.default_rng(0).permutation(120), 6)
    schedule = [[0, 2, 3, 5], [1, 4, 5]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bare, bare_s = bare_loop.run_bare(_model(), x, y, parts, schedule, 8, 0.1, 0.9)
    finally:
        torch.set_num_threads(threads)
    limit, limit_s = bare_loop.run_limit(_model(), x, y, parts, schedule, 8, 0.1, 0.9, procs=2)
    assert len(bare_s) == len(limit_s) == 2
    for k, v in bare.state_dict().items():
        assert not torch.equal(v, _model().state_dict()[k])  # trained
        torch.testing.assert_close(limit.state_dict()[k], v, rtol=1e-5, atol=1e-6)
