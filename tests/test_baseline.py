"""The centralized baseline trains at the speed of one federated client on the same data.

It used to give its lone client every core's torch threads: on two cores that is about 1.5x
faster when nothing else runs, and 4-8x slower per example as soon as other processes compete
for the cores (measured: 65-144 s against 17-19 s per round at one thread, load average 17-21),
which is how a shared machine runs. Now it computes with as many threads as a federated client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fedguard import Config, Experiment
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import build_classifier

SMALL = ["run.progress=false", "run.report=false", "data.max_train_examples=300", "data.num_clients=3",
         "run.rounds=1", "run.baseline=centralized"]


class ThreadsReporting(ClassificationTask):
    """A classifier whose clients report how many torch threads they trained with."""

    def local_train(self, model: Any, params: Any, data: Any, trainer: Any, generator: Any) -> Any:
        trained, metrics = super().local_train(model, params, data, trainer, generator)
        return trained, {**metrics, "threads": float(torch.get_num_threads())}


def _task() -> ThreadsReporting:
    return ThreadsReporting(lambda: build_classifier("cnn-s", 1, 28, 10))


def test_the_baseline_client_computes_with_a_federated_clients_threads(tmp_path: Path) -> None:
    result = Experiment(Config.load(None, SMALL), task=_task(), quiet=True).run(run_dir=tmp_path / "run")
    assert result.baseline is not None
    assert result.rows[0]["client_threads"] == 1.0
    assert result.baseline.rows[0]["client_threads"] == 1.0
    assert Config.load(result.baseline.run_dir / "config.toml").run.client_threads == 1


@pytest.mark.slow
def test_baseline_time_per_example_is_a_federated_clients(tmp_path: Path) -> None:
    """The same 4,000 examples, one round each, both in this process at one thread."""
    overrides = ["run.progress=false", "run.report=false", "run.rounds=2", "run.workers=1",
                 "run.baseline=centralized", "run.eval_every=0"]
    start = time.perf_counter()
    result = Experiment(Config.load(None, overrides), quiet=True).run(run_dir=tmp_path / "run")
    assert result.baseline is not None and time.perf_counter() - start > 0
    federated = min(r["round_s"] for r in result.rows)
    centralized = min(r["round_s"] for r in result.baseline.rows)
    assert centralized / federated < 1.5, (centralized, federated)
