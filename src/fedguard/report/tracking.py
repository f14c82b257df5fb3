"""Experiment tracking where users already look: TensorBoard and MLflow (``run.loggers``).

Each tracker receives what metrics.jsonl receives (every numeric figure of every round: losses,
test or validation metrics, epsilon, bytes sent and received, seconds), the configuration as
parameters (``section.key``), and at the end the summary (as ``final/<figure>``) and the
report's pictures. Neither library is needed for a default install: ``pip install
'fedguard[tracking]'`` (or ``[tensorboard]``, ``[mlflow]``) adds them, and asking for a tracker
whose library is missing is refused before the run starts.

* ``tensorboard``: event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs``):
  scalars per round, the configuration as hyper-parameters (HParams tab) and as text, the
  pictures as images.
* ``mlflow``: one MLflow run per fedguard run, in the experiment ``run.mlflow_experiment``
  (default: ``run.name``) at ``run.mlflow_uri`` (default: a local file store beside the run
  folder, ``runs/mlruns``; or a database or server URI); the pictures and report.md as
  artifacts. The MLflow run's id is kept in ``RUN_DIR/mlflow_run.json`` so that a resumed run
  logs into the same MLflow run.

A tracker that fails during a run (a server that went away) is dropped with one line in the
run log; the run and its own files go on.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

#: tracker name -> the module its library provides (what the configuration check looks for)
TRACKER_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}
#: what to install for each tracker
INSTALL_HINT = {"tensorboard": "pip install 'fedguard[tensorboard]'", "mlflow": "pip install 'fedguard[mlflow]'"}


def check_loggers(names: Any) -> None:
    """Configuration check of ``run.loggers``: each tracker's library is installed."""
    for name in names:
        if name not in TRACKER_MODULES:
            raise ValueError(f"{name!r} is not a tracker; choose from {sorted(TRACKER_MODULES)}")
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ValueError(f"{name!r} needs the {TRACKER_MODULES[name]} package, which is not installed: "
                             f"{INSTALL_HINT[name]}")


def numeric_figures(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row or summary (what a tracker can plot)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_config(config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{"section.key": "value"}`` for every option (lists as comma-separated text)."""
    out = {}
    for section, values in config.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return out


class Tracker(Protocol):
    """What the run tells a tracker."""

    def log_round(self, round: int, figures: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, float], pictures: list[tuple[str, Path]], files: list[Path],
               failed: bool) -> None: ...


class TensorBoardTracker:
    """Scalars, hyper-parameters, configuration text and pictures in TensorBoard event files."""

    def __init__(self, run_dir: Path, config: dict[str, dict[str, Any]], config_toml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self._hparams = hparams
        self.params = {k: _hparam_value(v) for k, v in flat_config(config).items()}
        self.writer.add_text("config", "```toml\n" + config_toml.strip() + "\n```", 0)
        self.last_round = 0

    def log_round(self, round: int, figures: dict[str, float]) -> None:
        for key, value in figures.items():
            self.writer.add_scalar(key, value, round)
        self.last_round = round
        self.writer.flush()

    def finish(self, summary: dict[str, float], pictures: list[tuple[str, Path]], files: list[Path],
               failed: bool) -> None:
        final = {f"final/{k}": v for k, v in summary.items()}
        for key, value in final.items():
            self.writer.add_scalar(key, value, self.last_round)
        # the HParams tab: the configuration beside the final figures (torch's add_hparams would
        # open a second log folder)
        for event in self._hparams(self.params, final):
            self.writer.file_writer.add_summary(event)
        for caption, path in pictures:
            image = _read_png(path)
            if image is not None:
                self.writer.add_image(caption, image, self.last_round, dataformats="HWC")
        self.writer.close()


def _hparam_value(value: str) -> Any:
    """A configuration value as the HParams plugin shows it: numbers and booleans as such."""
    if value in ("True", "False"):
        return value == "True"
    try:
        number = float(value)
    except ValueError:
        return value
    return number if math.isfinite(number) else value


def _read_png(path: Path) -> Any:
    from matplotlib.image import imread

    try:
        image = imread(str(path))
    except (OSError, ValueError):
        return None
    return image[..., :3] if image.ndim == 3 else image[..., None].repeat(3, axis=-1)


class MLflowTracker:
    """One MLflow run: parameters, per-round metrics (step = round), final figures, artifacts."""

    def __init__(self, run_dir: Path, config: dict[str, dict[str, Any]], uri: str, experiment: str,
                 resume: bool) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store in maintenance mode and asks for this opt-in to use it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.id_file = run_dir / "mlflow_run.json"
        if resume and self.id_file.exists():
            self.run_id = json.loads(self.id_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = self._experiment_id(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        self.id_file.write_text(json.dumps({"tracking_uri": uri, "experiment": experiment, "run_id": self.run_id}))
        params = [Param(k, v[:6000]) for k, v in flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created meanwhile by another run (the concurrent baseline)
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _metrics(self, figures: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in figures.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log_round(self, round: int, figures: dict[str, float]) -> None:
        self._metrics(figures, round)
        self.last_round = round

    def finish(self, summary: dict[str, float], pictures: list[tuple[str, Path]], files: list[Path],
               failed: bool) -> None:
        self._metrics({f"final/{k}": v for k, v in summary.items()}, getattr(self, "last_round", 0))
        for _caption, path in pictures:
            if Path(path).exists():
                self.client.log_artifact(self.run_id, str(path), "plots")
        for path in files:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


class Trackers:
    """The run's trackers; one that raises is dropped with a line in the run log."""

    def __init__(self, trackers: dict[str, Tracker], log: Callable[[str], None]) -> None:
        self.trackers, self.log = trackers, log

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                call(tracker)
            except Exception as exc:  # a tracker must never cost the run
                self.log(f"tracking: {name} failed ({what}): {type(exc).__name__}: {exc}; going on without it")
                del self.trackers[name]

    def log_round(self, row: dict[str, Any]) -> None:
        """One round's numeric figures (step = round)."""
        figures = numeric_figures({k: v for k, v in row.items() if k != "round"})
        self._each("round", lambda t: t.log_round(int(row["round"]), figures))

    def finish(self, summary: dict[str, Any], pictures: list[tuple[str, Path]], files: list[Path],
               failed: bool) -> None:
        """The final figures, the pictures and the run's files; closes every tracker."""
        figures = numeric_figures(summary)
        self._each("finish", lambda t: t.finish(figures, pictures, files, failed))
        self.trackers = {}


def default_mlflow_uri(run_dir: Path) -> str:
    """A local file store beside the run folder: ``<parent of RUN_DIR>/mlruns`` (``runs/mlruns``)."""
    return (Path(run_dir).resolve().parent / "mlruns").as_uri()


def start_trackers(config: Any, run_dir: Path, resume: bool, log: Callable[[str], None]) -> Trackers:
    """The trackers named in ``run.loggers``, started for ``run_dir``."""
    trackers: dict[str, Tracker] = {}
    run = config.run
    for name in run.loggers:
        try:
            if name == "tensorboard":
                trackers[name] = TensorBoardTracker(run_dir, config.to_dict(), config.to_toml())
            elif name == "mlflow":
                uri = run.mlflow_uri or default_mlflow_uri(run_dir)
                trackers[name] = MLflowTracker(run_dir, config.to_dict(), uri, run.mlflow_experiment or run.name,
                                               resume)
        except Exception as exc:  # e.g. an unreachable tracking server: the run goes on
            log(f"tracking: cannot start {name}: {type(exc).__name__}: {exc}; going on without it")
    return Trackers(trackers, log)
