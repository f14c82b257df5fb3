"""The Python API: one object that runs a whole federated experiment, as the CLI does.

    from fedguard import Experiment
    result = Experiment(overrides=["run.rounds=5"]).run()

A user brings their own model, loss and data with ``Experiment(model=..., loss_fn=...,
train=..., test=...)``; the built-in tasks go through the same path.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset

from fedguard import __version__, builders, health, plugins  # noqa: F401  (plugins registers families)
from fedguard.algorithms.lr_schedule import schedule_fit_config
from fedguard.algorithms.sampling import ClientSampler, parse_schedule
from fedguard.checkpoint import load_state, save_state
from fedguard.config import Config
from fedguard.data.arrays import ArrayDataset
from fedguard.data.partition import (
    Partition,
    configured_partition,
    label_matrix,
    train_test_split_per_client,
)
from fedguard.data.registry import load_dataset
from fedguard.data.validation import stratified_split
from fedguard.device import CPU_ONLY_TASKS, check_device_spec, resolve_device
from fedguard.engine import Server
from fedguard.pipeline.base import ConfigurationError
from fedguard.report.markdown import curve_pictures, write_comparison, write_report
from fedguard.report.metrics import MetricsWriter, json_safe, read_metrics
from fedguard.report.partition_plot import plot_label_heatmap
from fedguard.report.progress import RunProgress, print_summary, round_line
from fedguard.report.tracking import Trackers, default_mlflow_uri, start_trackers
from fedguard.runtime.base import Communicator, FaultModel
from fedguard.runtime.client import ClientApp
from fedguard.runtime.forked_job import ForkedJob, fork_available
from fedguard.runtime.simulation import (
    SerialCommunicator,
    WorkerPoolCommunicator,
    default_workers,
    temp_state_dir,
)
from fedguard.runtime.state_store import DirectoryStateStore, MemoryStateStore
from fedguard.tasks.base import Task
from fedguard.tasks.classification import ClassificationTask


@dataclass
class RunResult:
    """What a finished run left behind."""

    run_dir: Path
    rows: list[dict[str, Any]]
    final: dict[str, Any]
    params: dict[str, torch.Tensor]
    stopped_early: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    baseline: RunResult | None = None


#: builds a run's communicator from its assembled setup (the network server's, for one)
CommunicatorFactory = Callable[["Setup"], Communicator]

#: what turns a federated configuration into its centralized baseline
CENTRALIZED_OVERRIDES: dict[str, Any] = {
    "data.num_clients": 1,
    "data.partition": "iid",
    "server.clients_per_round": 0,
    "server.fraction": 1.0,
    "server.min_clients": 1,
    "faults.dropout_rate": 0.0,
    "faults.join": [],
    "faults.leave": [],
    "run.baseline": "none",
    "run.workers": "1",
    "run.runtime": "simulation",
    "server.optimizer": "fedavg",
    "server.lr": 1.0,
}


@dataclass
class Setup:
    """Every part of a run, built from the configuration, before any training."""

    config: Config
    train: ArrayDataset
    test: ArrayDataset
    #: each client's example indices, compact (two arrays whatever the number of clients)
    parts: Partition
    task: Task
    model: nn.Module
    sampler: ClientSampler
    trainer: Any
    pipeline: Any
    #: each client's local test indices (empty without data.client_test_fraction)
    local_test: Partition | list[np.ndarray] = field(default_factory=list)
    #: where this process trains and evaluates (``run.device``)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: the server's validation set (None without data.validation_fraction)
    validation: ArrayDataset | None = None

    def make_client(self, cid: int, store: Any) -> ClientApp:
        """Client ``cid`` with its own slice of the data."""
        local_test = self.train.subset(self.local_test[cid], f"client-{cid}-test") if len(self.local_test) else None
        return ClientApp(
            cid,
            self.task,
            self.model,
            self.client_data(cid),
            self.trainer,
            self.pipeline,
            self.config.run.seed,
            store,
            local_test,
            self.device,
        )

    def client_data(self, cid: int) -> ArrayDataset:
        """Client ``cid``'s own examples (sliced on demand: cheap, and nothing to copy up front)."""
        if not 0 <= cid < len(self.parts):
            raise ValueError(f"unknown client {cid}: this run has clients 0..{len(self.parts) - 1}")
        return self.train.subset(self.parts[cid], f"client-{cid}")


def _as_array_dataset(data: ArrayDataset | Dataset | None, name: str) -> ArrayDataset | None:
    if data is None or isinstance(data, ArrayDataset):
        return data
    return ArrayDataset.from_torch(data, name)


class Experiment:
    """A federated run assembled from a :class:`Config` and, optionally, the user's own parts.

    ``model``/``loss_fn`` make a classification task from any ``nn.Module``; ``task`` takes
    any :class:`Task`; ``train``/``test`` take an :class:`ArrayDataset` or any map-style
    ``torch.utils.data.Dataset`` of (input, label); ``partitions`` fixes each client's
    example indices instead of the configured partitioner.

    While it runs, it prints a progress bar on a terminal (one plain line per round
    otherwise; none with ``run.progress = false``), the run log's lines, and at the end the
    summary and the run folder's path; ``quiet=True`` prints nothing. ``log`` receives the run
    log's lines instead of the console. The run log is also written to ``RUN_DIR/log.txt``.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        overrides: list[str] | None = None,
        model: nn.Module | None = None,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        task: Task | None = None,
        train: ArrayDataset | Dataset | None = None,
        test: ArrayDataset | Dataset | None = None,
        partitions: Sequence[np.ndarray] | None = None,
        log: Callable[[str], None] | None = None,
        quiet: bool = False,
    ) -> None:
        self.config = config or Config()
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigurationError(f"override {item!r} must look like section.key=value")
            self.config.set(key.strip(), value.strip())
        if model is not None and task is not None:
            raise ConfigurationError("give either model (with loss_fn) or task, not both")
        if model is not None:
            template = copy.deepcopy(model)
            kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
            task = ClassificationTask(lambda: copy.deepcopy(template), **kwargs)
        self.user_task = task
        self.train = _as_array_dataset(train, "train")
        self.test = _as_array_dataset(test, "test")
        if (self.train is None) != (self.test is None):
            raise ConfigurationError("give both train and test datasets, or neither")
        self.partitions = partitions
        self._log_fn = log
        self._log_lines: list[str] = []
        self._log_file: TextIO | None = None
        self.quiet = quiet
        self._progress: RunProgress | None = None
        self._title = "fedguard run summary"
        #: torch threads each simulated client computed with (set when the clients are built)
        self._client_threads: int | None = None
        #: the task's primary metric and whether higher is better (set when the run is assembled)
        self.primary_metric: tuple[str, bool] = ("accuracy", True)
        #: the cores this run may use (None: all); set when the baseline runs beside it
        self._cores: int | None = None

    # -- assembly -------------------------------------------------------------------------
    def log(self, text: str, echo: bool = True) -> None:
        """Record a line in the run log (log.txt) and show it (``log``, or the console unless quiet)."""
        self._log_lines.append(text)
        if self._log_file is not None:
            self._log_file.write(text + "\n")
            self._log_file.flush()
        if not echo:
            return
        if self._log_fn is not None:
            self._log_fn(text)
        elif not self.quiet:
            if self._progress is not None:
                self._progress.log(text)
            else:
                print(text, flush=True)

    def _open_log(self, run_dir: Path, append: bool) -> None:
        """Start writing the run log into RUN_DIR/log.txt, beginning with the lines logged so far."""
        self._log_file = (run_dir / "log.txt").open("a" if append else "w")
        self._log_file.write("".join(line + "\n" for line in self._log_lines))
        self._log_file.flush()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _progress_mode(self) -> str:
        if self.quiet or not self.config.run.progress:
            return "off"
        return "bar" if Console().is_terminal else "lines"

    def load_data(self) -> tuple[ArrayDataset, ArrayDataset]:
        """The configured (or given) train and test sets."""
        if self.train is not None and self.test is not None:
            train, test = self.train, self.test
        else:
            d = self.config.data
            train, test = load_dataset(d.dataset, d.data_dir or None, download=d.download)
        n = self.config.data.max_train_examples
        if n and n < len(train):
            train = train.subset(np.arange(n), train.name)
        return train, test

    def split_validation(self, train: ArrayDataset) -> tuple[ArrayDataset, ArrayDataset | None]:
        """(training set without the validation examples, validation set), or (train, None)
        without ``data.validation_fraction``: see :mod:`fedguard.data.validation`."""
        fraction = self.config.data.validation_fraction
        if not fraction:
            return train, None
        kept, held = stratified_split(train.labels, fraction, self.config.run.seed)
        if len(held) == 0:
            raise ConfigurationError(f"data.validation_fraction={fraction:g} of {len(train)} training examples "
                                     "holds out none; use a larger fraction")
        return train.subset(kept, train.name), train.subset(held, f"{train.name}-validation")

    def make_partitions(self, train: ArrayDataset) -> Partition:
        """Each client's example indices."""
        if self.partitions is not None:
            parts = Partition.from_parts(self.partitions)
            if self.config.data.num_clients != len(parts):
                self.config.set("data.num_clients", len(parts))
            return parts
        return configured_partition(self.config.data, self.config.run.seed, train.labels)

    def make_sampler(self) -> ClientSampler:
        """Per-round client sampling with the configured join/leave schedule."""
        s, f, n = self.config.server, self.config.faults, self.config.data.num_clients
        return ClientSampler(
            n,
            s.clients_per_round,
            s.fraction,
            self.config.run.seed,
            parse_schedule(f.join, n, "join"),
            parse_schedule(f.leave, n, "leave"),
        )

    def workers(self, per_round: int) -> int:
        """How many client worker processes to use."""
        value = self.config.run.workers
        if value == "auto":
            return default_workers(per_round, self._cores)
        try:
            count = int(value)
        except ValueError as exc:
            raise ConfigurationError(f"run.workers: {value!r} must be 'auto' or a whole number") from exc
        if count < 1:
            raise ConfigurationError("run.workers: must be at least 1")
        return count

    def assemble(self) -> Setup:
        """Build every part of the run from the configuration (no training yet)."""
        cfg = self.config
        train, test = self.load_data()
        train, validation = self.split_validation(train)
        parts = self.make_partitions(train)
        empty = np.flatnonzero(parts.sizes() == 0)
        if empty.size:
            raise ConfigurationError(f"clients {empty[:5].tolist()} got no examples (every client in the population "
                                     "holds at least one); use fewer clients or a larger alpha")
        local_test: Partition | list[np.ndarray] = []
        if cfg.data.client_test_fraction > 0:
            parts, local_test = train_test_split_per_client(parts, cfg.data.client_test_fraction, cfg.run.seed)
        task = builders.wrap_task(cfg, self.user_task or builders.build_task(cfg, train))
        model = builders.seeded_model(task, cfg.run.seed)
        sampler = self.make_sampler()
        bctx = builders.BuildContext(cfg, train, parts.sizes().tolist(), sampler, task, self.log)
        trainer = builders.build_trainer(bctx)
        pipeline = builders.build_pipeline(bctx)
        device = self.device()
        return Setup(cfg, train, test, parts, task, model, sampler, trainer, pipeline, local_test, device,
                     validation=validation)

    def device(self) -> torch.device:
        """The device of ``run.device`` on this machine, checked against the task.

        Under ``run.runtime = "ray"`` the workers hold the GPUs: a server without the device
        evaluates on its CPU instead (and says so).
        """
        cfg = self.config
        check_device_spec(cfg.run.device)
        try:
            device = resolve_device(cfg.run.device)
        except ConfigurationError as exc:
            if cfg.run.runtime != "ray":
                raise
            self.log(f"run.device: the server evaluates on the CPU ({exc}); the Ray workers train on {cfg.run.device}")
            device = torch.device("cpu")
        on_gpu = device.type != "cpu" or (cfg.run.runtime == "ray" and cfg.run.ray_num_gpus > 0)
        if on_gpu and self.user_task is None and cfg.task.name in CPU_ONLY_TASKS:
            raise ConfigurationError(f"run.device = {cfg.run.device!r}: the {cfg.task.name} task draws its noise on "
                                     "the CPU and runs there only; use run.device = 'cpu'")
        return device

    # -- running --------------------------------------------------------------------------
    def run(
        self,
        run_dir: str | Path | None = None,
        resume: str | Path | None = None,
        communicator: CommunicatorFactory | None = None,
    ) -> RunResult:
        """Run every round, write the run folder, return the result.

        With ``run.baseline = "centralized"`` the same configuration is then run with one
        client holding all the data (after it, or beside it in a forked process with
        ``run.baseline_concurrent``), and the report compares the two. ``communicator``
        builds the runtime from the assembled :class:`Setup` (the network server passes
        its own); by default clients run in the simulation. The caller's torch thread count is
        restored afterwards.
        """
        threads = torch.get_num_threads()
        try:
            return self._run(run_dir, resume, communicator)
        finally:
            torch.set_num_threads(threads)

    def _run(
        self, run_dir: str | Path | None, resume: str | Path | None, communicator: CommunicatorFactory | None
    ) -> RunResult:
        self.config.validate(skip=("data.dataset",) if self.train is not None else ())
        run_cfg = self.config.run
        if run_cfg.baseline_concurrent and run_cfg.baseline != "centralized":
            raise ConfigurationError("run.baseline_concurrent runs the centralized baseline beside the federated run; "
                                     "set run.baseline = 'centralized' too, or drop run.baseline_concurrent")
        if run_cfg.baseline == "centralized" and run_cfg.baseline_concurrent and self._can_run_concurrently():
            return self._run_with_concurrent_baseline(run_dir, resume, communicator)
        result = self._run_federated(run_dir, resume, communicator)
        if run_cfg.baseline == "centralized":
            result.baseline = self._run_centralized(result.run_dir)
            write_comparison(result.run_dir, result.final, result.baseline.final)
        return result

    def _core_count(self) -> int:
        """The cores this run may use: all of the machine's unless the baseline runs beside it."""
        return self._cores or os.cpu_count() or 1

    def _run_dir_for(self, run_dir: str | Path | None, resume: str | Path | None) -> Path:
        """The folder a run writes: the resumed one, the given one, or a new timestamped one."""
        return Path(resume) if resume else Path(run_dir or self._new_run_dir())

    def _can_run_concurrently(self) -> bool:
        cores = os.cpu_count() or 1
        if cores < 2 or not fork_available():
            why = f"this machine has {cores} core" if cores < 2 else "this platform cannot fork"
            self.log(f"run.baseline_concurrent: {why}; the centralized baseline runs after the federated run")
            return False
        return True

    def _run_with_concurrent_baseline(
        self, run_dir: str | Path | None, resume: str | Path | None, communicator: CommunicatorFactory | None
    ) -> RunResult:
        """The federated run on all cores but one while the centralized baseline trains on
        the last one, in a forked process that leaves its results in ``RUN_DIR/centralized``."""
        run_path = self._run_dir_for(run_dir, resume)
        run_path.mkdir(parents=True, exist_ok=True)
        self.train, self.test = self.load_data()  # loaded once, shared with the child by fork
        base_dir = run_path / "centralized"
        base_dir.mkdir(exist_ok=True)
        job = ForkedJob(lambda: self._centralized_in_child(base_dir), base_dir / "error.txt", 1,
                        "the centralized baseline")
        self._cores = max(1, self._core_count() - 1)
        self.log(f"running the centralized baseline beside the federated run: the baseline on 1 core, "
                 f"the federated run on {self._cores}")
        job.start()
        try:
            result = self._run_federated(run_path, resume, communicator)
            try:
                job.wait()
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}; the federated run itself finished and is complete in {run_path}") from exc
        finally:
            job.cancel()
            self._cores = None
        result.baseline = load_run_result(base_dir)
        write_comparison(result.run_dir, result.final, result.baseline.final)
        return result

    def _centralized_in_child(self, base_dir: Path) -> None:
        """The baseline's body in the forked child: train, then leave timings beside its results."""
        baseline = self._run_centralized(base_dir.parent, cores=1, progress=False)
        (base_dir / "timings.json").write_text(json.dumps(baseline.timings))

    def _run_federated(
        self, run_dir: str | Path | None, resume: str | Path | None, communicator: CommunicatorFactory | None = None
    ) -> RunResult:
        cfg = self.config
        t_start = time.perf_counter()
        threads = cfg.run.threads or self._cores  # 0: leave torch's default (every core)
        if threads and self._cores:
            threads = min(threads, self._cores)
        if threads:
            torch.set_num_threads(threads)
        setup = self.assemble()
        self.primary_metric = (setup.task.primary_metric, setup.task.higher_is_better)
        run_dir = self._run_dir_for(run_dir, resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
        self._write_partition(run_dir, setup.train, setup.parts)

        state_dir: str | None = None
        if communicator is not None:
            comm = communicator(setup)
        elif cfg.run.runtime == "ray":
            comm = self._ray(setup)
        else:
            comm, state_dir = self._simulation(setup)
        server = Server(
            setup.task,
            setup.model,
            setup.pipeline,
            setup.sampler,
            comm,
            setup.validation if setup.validation is not None else setup.test,
            cfg.run.seed,
            cfg.server.min_clients,
            self.log,
            federated_eval=bool(setup.local_test) and cfg.run.client_eval,
            fit_config=schedule_fit_config(cfg.train.lr_schedule, cfg.run.rounds),
            device=setup.device,
            eval_prefix="val" if setup.validation is not None else "test",
        )
        first_round = 1
        if resume:
            server.load_state_dict(load_state(run_dir))
            first_round = server.round + 1
        t_ready = time.perf_counter()
        try:
            result = self._loop(server, run_dir, first_round, bool(resume), setup)
        finally:
            comm.close()
            if state_dir:
                shutil.rmtree(state_dir, ignore_errors=True)
        result.timings.update({"startup_s": t_ready - t_start, "total_s": time.perf_counter() - t_start})
        return result

    def _simulation(self, setup: Setup) -> tuple[Communicator, str]:
        """The in-process or worker-pool communicator, and its clients' state folder."""
        cfg, sampler = self.config, setup.sampler
        n_workers = self.workers(sampler.per_round(sampler.population))
        state_dir = temp_state_dir()
        store = DirectoryStateStore(state_dir) if n_workers > 1 else MemoryStateStore()

        def make_client(cid: int) -> ClientApp:
            return setup.make_client(cid, store)

        faults = FaultModel(cfg.faults.dropout_rate, cfg.run.seed, (cfg.faults.dropout_stage,))
        threads = cfg.run.client_threads or max(1, self._core_count() // n_workers)
        self._client_threads = threads
        comm: Communicator = (
            WorkerPoolCommunicator(make_client, n_workers, faults, lambda c: len(setup.parts[c]), threads)
            if n_workers > 1
            else SerialCommunicator(make_client, faults, threads)
        )
        return comm, state_dir

    def _ray(self, setup: Setup) -> Communicator:
        """Clients in Ray actors (``run.runtime = "ray"``), built on each worker from the configuration."""
        from fedguard.runtime.ray_runtime import RayCommunicator, RaySettings

        if self.user_task is not None:
            raise ConfigurationError(
                "run.runtime = 'ray' builds each client from the configuration on the Ray workers, and a model or task "
                "passed to Experiment(...) cannot travel there without pickle. Register a builder for it in "
                "fedguard.builders.TASK_BUILDERS inside a module of yours, name the task in task.name and the module "
                "in run.ray_imports; or use run.runtime = 'simulation'"
            )
        cfg = self.config
        faults = FaultModel(cfg.faults.dropout_rate, cfg.run.seed, (cfg.faults.dropout_stage,))
        comm = RayCommunicator(setup, RaySettings.from_config(cfg), faults)
        self.log(f"Ray runtime: {len(comm.workers)} workers, ready in {comm.startup_s:.1f} s")
        return comm

    def _run_centralized(self, run_dir: Path, cores: int | None = None, progress: bool = True) -> RunResult:
        """The same task, model, training and rounds with one client holding all the data
        (on at most ``cores`` cores, default all).

        The lone client computes with as many torch threads as one federated client did
        (``run.baseline_threads`` to change it), so that it trains at a federated client's speed
        per example: a client with all the cores' threads runs up to 8x slower per example as
        soon as other processes compete for the cores (each parallel step waits for its slowest
        thread), and only about 1.5x faster on two idle cores.
        """
        base = Config.from_dict(self.config.to_dict())
        for key, value in CENTRALIZED_OVERRIDES.items():
            base.set(key, value)
        threads = self.config.run.baseline_threads or self._client_threads or self.config.run.client_threads or 1
        base.set("run.client_threads", threads)
        if not base.run.mlflow_uri:  # the baseline's MLflow run goes where the federated run's went
            base.set("run.mlflow_uri", default_mlflow_uri(run_dir))
        if not progress:
            base.set("run.progress", False)
        self.log("running the centralized baseline (one client, all the data, same passes)")
        sub = Experiment(base, task=self.user_task, train=self.train, test=self.test, log=self._log_fn,
                         quiet=self.quiet or not progress)
        sub._title = "centralized baseline summary"
        sub._cores = cores
        return sub._run_federated(run_dir / "centralized", None)

    def _loop(self, server: Server, run_dir: Path, first: int, append: bool, setup: Setup) -> RunResult:
        cfg, task = self.config, setup.task
        rounds, every = cfg.run.rounds, cfg.run.eval_every
        writer = MetricsWriter(run_dir / "metrics.jsonl", append=append)
        progress = RunProgress(rounds, first, task.primary_metric, self._progress_mode())
        stopped: str | None = None
        diverged: str | None = None
        self._open_log(run_dir, append)
        self.log(f"fedguard {__version__}: {'resuming' if append else 'starting'} {run_dir} at round {first} "
                 f"of {rounds}", echo=False)
        self._progress = progress
        trackers = start_trackers(cfg, run_dir, append, self.log)
        try:
            with progress:
                for r in range(first, rounds + 1):
                    if server.pipeline.ledger.would_exceed_budget(r):
                        stopped = f"privacy budget: round {r} would exceed it; stopped after round {r - 1}"
                        self.log(stopped)
                        break
                    evaluate = r == rounds or (every > 0 and r % every == 0)
                    last_params = server.params
                    record = server.run_round(r, evaluate)
                    row = record.row()
                    what = health.divergence(row, server.params)
                    if what is not None:
                        server.params, server.round = last_params, r - 1
                        kept = f"round {r - 1}'s model" if r > 1 else "the initial model"
                        diverged = stopped = (
                            f"training diverged in round {r}: {what}. Likely cause: {health.likely_cause(cfg)}. "
                            f"The run stopped; model.safetensors holds {kept}, the last finite one"
                        )
                        self.log(stopped, echo=False)
                        writer.write({**row, "aborted": f"diverged: {what}"})
                        trackers.log_round(row)
                        break
                    if evaluate and cfg.run.report:
                        task.on_evaluate(setup.model, server.params, r, run_dir / "plots")
                    writer.write(row)
                    trackers.log_round(row)
                    progress.update(row)
                    self.log(f"round {r}/{rounds}  {round_line(row, rounds, task.primary_metric)}  "
                             f"{row['seconds']:.2f} s", echo=False)
                    if cfg.run.checkpoint_every and r % cfg.run.checkpoint_every == 0:
                        save_state(run_dir, server.state_dict())
        finally:
            self._progress = None
            writer.close()
            save_file({k: v.contiguous() for k, v in server.params.items()}, str(run_dir / "model.safetensors"))
        rows = read_metrics(run_dir / "metrics.jsonl")
        failure = f"{diverged} (run folder: {run_dir})" if diverged else None
        ran = [row for row in rows if row["round"] >= first]
        if failure is None and ran and all(row.get("aborted") for row in ran):
            failure = (f"no round updated the model: all {len(ran)} rounds were aborted (round {ran[-1]['round']}: "
                       f"{ran[-1]['aborted']}); the model is the initial one (run folder: {run_dir})")
        try:
            final = self._finish(server, run_dir, rows, setup, stopped, trackers, failure is not None)
        finally:
            self._close_log()
        result = RunResult(run_dir, rows, final, server.params, stopped)
        if failure:
            raise health.RunFailed(failure, result)
        return result

    def _finish(
        self, server: Server, run_dir: Path, rows: list[dict[str, Any]], setup: Setup, stopped: str | None,
        trackers: Trackers, failed: bool,
    ) -> dict[str, Any]:
        task, model, train, test, validation = setup.task, setup.model, setup.train, setup.test, setup.validation
        final: dict[str, Any] = {f"{server.eval_prefix}_{k}": v for k, v in server.evaluate().items()}
        t_final = time.perf_counter()
        if validation is not None:
            # what the settings are chosen on; then the test set, read this once
            chosen_on = task.final_metrics(model, server.params, train, validation)
            final.update({f"val_{k}": v for k, v in chosen_on.items()})
            held_out, server.test_data = server.test_data, test  # the server's evaluation, on its device
            try:
                final.update({f"test_{k}": v for k, v in server.evaluate().items()})
            finally:
                server.test_data = held_out
        final.update(task.final_metrics(model, server.params, train, test))
        evaluated = [r for r in rows if any(k.startswith("clients_test_") for k in r)]
        if evaluated:  # the clients' own test splits: the global model's and, if personalised, their own models'
            final.update({k: v for k, v in evaluated[-1].items() if k.startswith("clients_test_")})
        final["final_metrics_s"] = time.perf_counter() - t_final
        final.update(server.pipeline.ledger.report())
        final["rounds"] = server.round
        final["total_bytes_sent"] = sum(r["bytes_sent"] for r in rows)
        final["total_bytes_received"] = sum(r["bytes_received"] for r in rows)
        final["median_round_s"] = float(np.median([r["round_s"] for r in rows])) if rows else 0.0
        if stopped:
            final["stopped"] = stopped
        (run_dir / "summary.json").write_text(json.dumps(json_safe(final), indent=1, default=str, allow_nan=False))
        if self.config.run.report:
            figures = task.report_figures(model, server.params, test, run_dir / "plots", "final")
            figures = [("Label distribution per client", run_dir / "plots" / "partition.png"), *figures]
            write_report(run_dir, rows, final, figures, self.config.to_toml(), task.primary_metric)
            pictures = [*curve_pictures(run_dir), *figures]
        else:
            pictures = [("Label distribution per client", run_dir / "plots" / "partition.png")]
        files = [run_dir / name for name in ("config.toml", "summary.json", "metrics.jsonl", "report.md", "log.txt")]
        trackers.finish(final, pictures, files, failed)
        print_summary(final, run_dir, enabled=not self.quiet, title=self._title)
        return final

    def _new_run_dir(self) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(self.config.run.out_dir) / f"{self.config.run.name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        return path

    def _write_partition(self, run_dir: Path, train: ArrayDataset, parts: Partition) -> None:
        classes = max(train.num_classes, 1)
        matrix = label_matrix(train.labels, parts, classes)
        (run_dir / "plots").mkdir(exist_ok=True)
        plot_label_heatmap(matrix, run_dir / "plots" / "partition.png")
        (run_dir / "partition.json").write_text(
            json.dumps({"sizes": parts.sizes().tolist(), "label_counts": matrix.tolist()})
        )


def load_run_result(run_dir: Path) -> RunResult:
    """A finished run read back from its folder (metrics.jsonl, summary.json, model.safetensors
    and, where present, timings.json)."""
    final = json.loads((run_dir / "summary.json").read_text())
    timings_path = run_dir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    return RunResult(run_dir, read_metrics(run_dir / "metrics.jsonl"), final,
                     load_file(str(run_dir / "model.safetensors")), final.get("stopped"), timings)


def run_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> RunResult:
    """Load a TOML configuration, apply overrides, run it."""
    return Experiment(Config.load(path, overrides)).run()
