"""data.validation_fraction and fedguard sweep: settings chosen on validation, test read once.

The adversary here is the experimenter's own bias: a figure tuned on the test set. The tests
check that the validation examples come from the training data only (never from test, never
given to a client), that per-round metrics are validation metrics, that the test set is
evaluated exactly once, and that a sweep ranks on validation figures.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedguard import Config, Experiment
from fedguard.cli import main as cli_main
from fedguard.data.validation import stratified_split
from fedguard.sweep import grid
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import build_classifier

TINY = ["data.max_train_examples=600", "data.num_clients=3", "run.rounds=2", "train.batch_size=50", "run.workers=1"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    kept, held = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(kept, held)) == 0 and len(kept) + len(held) == 200
    assert Counter(labels[held].tolist()) == {0: 20, 1: 10, 2: 6, 3: 4}
    again, held_again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(held, held_again)
    assert not np.array_equal(held, stratified_split(labels, 0.2, seed=1)[1])
    # a class with one example stays in training
    assert stratified_split(np.array([0, 0, 0, 0, 1]), 0.5, 0)[1].tolist() != [4]


class CountingTask(ClassificationTask):
    """Records which data set each evaluation read."""

    def __init__(self) -> None:
        super().__init__(lambda: build_classifier("cnn-s", 1, 28, 10))
        self.evaluated: list[str] = []

    def evaluate(self, model: Any, params: Any, data: Any) -> dict[str, float]:
        self.evaluated.append(data.name)
        return super().evaluate(model, params, data)


def test_validation_metrics_per_round_and_the_test_set_read_once(tmp_path: Path) -> None:
    task = CountingTask()
    config = Config.load(None, [*TINY, "run.rounds=3", "data.validation_fraction=0.2", "run.report=true"])
    result = Experiment(config, task=task, quiet=True).run(run_dir=tmp_path / "run")
    # validation after each of the 3 rounds (the final figures reuse the last one), then the test set once
    assert Counter(task.evaluated) == {"mnist-5k-train-validation": 3, "mnist-5k-test": 1}
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_accuracy" in r and "val_loss" in r and not any(k.startswith("test_") for k in r) for r in rows)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["val_accuracy"] == rows[-1]["val_accuracy"] and 0 < summary["test_accuracy"] <= 1
    # the validation examples came out of the training data before partitioning: no client has them
    assert sum(json.loads((result.run_dir / "partition.json").read_text())["sizes"]) == 600 - 120
    report = (result.run_dir / "report.md").read_text()
    assert "chosen on the validation figures" in report and "val_accuracy" in report


def test_without_validation_the_rounds_report_test_metrics(tmp_path: Path) -> None:
    task = CountingTask()
    Experiment(Config.load(None, [*TINY, "run.report=false"]), task=task, quiet=True).run(run_dir=tmp_path / "run")
    assert set(task.evaluated) == {"mnist-5k-test"}


def test_sweep_grid_axes_and_fixed_values() -> None:
    fixed, points = grid(Config(), ["train.lr=0.01,0.1", "server.optimizer=fedavg,fedavgm", "run.rounds=2",
                                    "faults.join=0-1@2,2-3@3"])
    assert fixed == ["run.rounds=2", "faults.join=0-1@2,2-3@3"]  # a list option keeps its commas
    assert points == [{"train.lr": "0.01", "server.optimizer": "fedavg"},
                      {"train.lr": "0.01", "server.optimizer": "fedavgm"},
                      {"train.lr": "0.1", "server.optimizer": "fedavg"},
                      {"train.lr": "0.1", "server.optimizer": "fedavgm"}]


def test_cli_sweep_ranks_on_validation_and_writes_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three learning rates, one of which diverges: ranked by val_accuracy, the diverged one last."""
    out = tmp_path / "sweep"
    rc = cli_main(["sweep", *_sets(*TINY, "run.rounds=1", "run.report=false", "train.lr=0.05,1e9,0.005"),
                   "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "data.validation_fraction=0.1" in printed  # the sweep's default split, said aloud
    result = json.loads((out / "sweep.json").read_text())
    assert result["metric"] == "val_accuracy" and result["higher_is_better"] is True
    points = result["points"]
    assert [p["overrides"]["train.lr"] for p in points][-1] == "1e9" and points[-1]["score"] is None
    assert "diverged" in points[-1]["error"]
    scores = [p["score"] for p in points[:2]]
    assert scores == sorted(scores, reverse=True)
    for p in points[:2]:
        summary = json.loads((Path(p["run_dir"]) / "summary.json").read_text())
        assert summary["val_accuracy"] == p["score"]
        assert Config.load(Path(p["run_dir"]) / "config.toml").data.validation_fraction == 0.1
    table = (out / "sweep.md").read_text()
    assert table.splitlines()[0].startswith("| rank | train.lr | val_accuracy (higher is better)")
    assert "Chosen on validation: rank 1; its test_accuracy" in table and table in printed + "\n"


def test_sweep_refuses_a_bad_point_before_running_any(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["sweep", *_sets(*TINY, "train.lr=0.05,nan"), "--out", str(tmp_path / "s")])
    assert rc == 2 and "train.lr: nan is not a finite number" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
