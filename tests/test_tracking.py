"""TensorBoard and MLflow tracking, read back with the libraries themselves.

The event files are read with TensorBoard's EventAccumulator, the MLflow runs from MLflow's
local file store with its client: every round's figures from metrics.jsonl (losses, accuracy,
epsilon, bytes) at step = round, the configuration as parameters, the report's pictures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedguard.cli import main as cli_main
from fedguard.report import tracking

TINY = ["data.max_train_examples=300", "data.num_clients=3", "run.rounds=2", "train.batch_size=50", "run.workers=1",
        "dp.mode=client", "dp.noise_multiplier=0.5", "dp.clip=5", "server.weighting=uniform"]


def _sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_rounds_figures_config_and_pictures(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra: pip install 'fedguard[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    assert cli_main(["run", "--quiet", *_sets(*TINY, "run.loggers=tensorboard"), "--out", str(run_dir)]) == 0
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    rows = _rows(run_dir)
    for key in ("train_loss", "test_accuracy", "test_loss", "epsilon", "bytes_sent", "bytes_received", "round_s"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2], key
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert rows[-1]["epsilon"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert events.Scalars("final/test_accuracy")[-1].value == pytest.approx(summary["test_accuracy"])
    assert "Held-out metrics per round" in tags["images"] and "Label distribution per client" in tags["images"]
    assert "config/text_summary" in tags["tensors"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[train]" in config_text and "lr = 0.02" in config_text
    hparams = events.PluginTagToContent("hparams")
    assert hparams, "the configuration is in the HParams tab"


def test_mlflow_file_store_holds_params_metrics_artifacts_and_status(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="mlflow is an optional extra: pip install 'fedguard[mlflow]'")
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "one"
    assert cli_main(["run", "--quiet", *_sets(*TINY, "run.loggers=mlflow", "run.name=exp"), "--out",
                     str(run_dir)]) == 0
    store = tmp_path / "runs" / "mlruns"  # the default: a local file store beside the run folder
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("exp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "one" and run.info.status == "FINISHED"
    assert json.loads((run_dir / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    params = run.data.params
    assert params["train.lr"] == "0.02" and params["dp.mode"] == "client" and params["data.num_clients"] == "3"
    rows = _rows(run_dir)
    for key in ("train_loss", "test_accuracy", "epsilon", "bytes_sent", "bytes_received"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([r[key] for r in rows], rel=1e-6), key
    assert run.data.metrics["final/test_accuracy"] == pytest.approx(json.loads((run_dir / "summary.json").read_text())
                                                                    ["test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "config.toml", "metrics.jsonl", "summary.json", "plots"} <= artifacts
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/metrics.png", "plots/partition.png"} <= pictures

    # a run that fails is marked FAILED in the same experiment
    failed_dir = tmp_path / "runs" / "two"
    assert cli_main(["run", "--quiet", *_sets(*TINY, "run.loggers=mlflow", "run.name=exp", "train.lr=1e9",
                                              "dp.mode=none"), "--out", str(failed_dir)]) == 1
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"one": "FINISHED", "two": "FAILED"}


def test_a_tracker_whose_library_is_missing_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(tracking.TRACKER_MODULES, "tensorboard", "fedguard_no_such_module")
    assert cli_main(["run", *_sets("run.loggers=tensorboard")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run.loggers: 'tensorboard' needs the fedguard_no_such_module package" in err
    assert "pip install 'fedguard[tensorboard]'" in err
    assert list(tmp_path.iterdir()) == []
    assert cli_main(["run", *_sets("run.loggers=wandb")]) == 2
    assert "run.loggers: 'wandb' is not allowed; choose one of ['tensorboard', 'mlflow']" in capsys.readouterr().err


def test_a_failing_tracker_is_dropped_and_the_run_goes_on() -> None:
    class Broken:
        def log_round(self, round: int, figures: dict) -> None:
            raise ConnectionError("tracking server gone")

        def finish(self, *args: object) -> None:
            raise AssertionError("a dropped tracker is not called again")

    lines: list[str] = []
    trackers = tracking.Trackers({"mlflow": Broken()}, lines.append)  # type: ignore[dict-item]
    trackers.log_round({"round": 1, "train_loss": 0.5})
    trackers.finish({"test_accuracy": 0.9}, [], [], False)
    assert lines == ["tracking: mlflow failed (round): ConnectionError: tracking server gone; going on without it"]
