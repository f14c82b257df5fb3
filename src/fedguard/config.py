"""Run configuration: typed sections with defaults, help texts and validation.

A configuration is read from TOML, changed with ``section.key=value`` overrides, checked
field by field (a bad value names the key and what is allowed) and saved with each run so
that the run can be repeated exactly. ``fedguard config`` prints the full reference.

:meth:`Config.validate` is the one pass over the whole configuration that every run makes
before it starts a process or writes a file: every value has its field's type, every float
is finite (NaN and infinities are refused unless a field says ``finite=False``) and within
its range, every choice is one of its allowed values, and every name that a registry
resolves (dataset, model, task, and whatever mechanism families add with
:func:`register_check`) is known to it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import tomli_w
import tomllib

from fedguard.algorithms.lr_schedule import SCHEDULES
from fedguard.pipeline.base import ConfigurationError


def option(default: Any, help: str, choices: list[Any] | None = None, min: float | None = None,
           max: float | None = None, finite: bool = True, above: float | None = None) -> Any:
    """A configuration field with its help text and allowed values: ``min`` and ``max`` inclusive,
    ``above`` an exclusive minimum (a value that must be positive: ``above=0.0``); ``finite=False``:
    a float field that accepts NaN and infinities (none of the built-in ones does)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "above": above, "finite": finite}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """[run] the experiment as a whole."""

    name: str = option("fedguard", "Name of the run (used in the run folder name).")
    seed: int = option(0, "Seed for model init, partitioning, sampling and every client's randomness.", min=0)
    rounds: int = option(30, "Number of federated rounds.", min=1)
    eval_every: int = option(1, "Evaluate the global model every k rounds (0: only after the last).", min=0)
    client_eval: bool = option(
        True, "With data.client_test_fraction > 0: at every evaluation each sampled client also scores the global "
        "model on its own test split (the clients_test_* metrics; personalised algorithms also score their own model)."
    )
    out_dir: str = option("runs", "Folder under which each run writes its own folder.")
    workers: str = option("auto", "Client worker processes: 'auto' (one per core) or a number; 1 runs clients in-process.")
    threads: int = option(0, "Torch threads of the server process (0: all cores).", min=0)
    client_threads: int = option(
        1, "Torch threads each simulated client computes with (0: the cores shared among the workers).", min=0
    )
    progress: bool = option(True, "Show the live progress bar.")
    checkpoint_every: int = option(0, "Save a resumable checkpoint every k rounds (0: never).", min=0)
    report: bool = option(True, "Write report.md with plots at the end of the run.")
    loggers: list[str] = option([], "Experiment trackers that also receive every round's figures, the configuration and the report's pictures: tensorboard (event files in RUN_DIR/tensorboard), mlflow (a run at run.mlflow_uri). Each needs its library: pip install 'fedguard[tracking]'.", choices=["tensorboard", "mlflow"])
    mlflow_uri: str = option("", "MLflow tracking URI (empty: a local file store beside the run folder, runs/mlruns; or e.g. sqlite:///mlflow.db, http://host:5000).")
    mlflow_experiment: str = option("", "MLflow experiment the run is logged in (empty: run.name).")
    baseline: str = option("none", "Also run the centralized baseline (one client, all data, same passes) and compare.", choices=["none", "centralized"])
    baseline_threads: int = option(0, "Torch threads of the centralized baseline's lone client (0: as many as one federated client computes with, so that both train at the same speed per example; more threads pay only on otherwise idle cores).", min=0)
    baseline_concurrent: bool = option(False, "Run the centralized baseline at the same time as the federated run, in a forked process on one core (the federated run gets the other cores); needs fork and 2+ cores.")
    runtime: str = option("simulation", "Where simulated clients run: 'simulation' (this machine: in-process or forked workers, see workers) or 'ray' (Ray actors on whatever cluster ray_address reaches; pip install 'fedguard[ray]').", choices=["simulation", "ray"])
    device: str = option("cpu", "Device for models, training and evaluation: cpu, cuda, cuda:<index>, or auto (cuda when available, else cpu). Several simulated clients share one GPU.")
    ray_address: str = option("", "Ray cluster to use with runtime = 'ray': '' starts a local instance (or reuses one already started in this process), 'auto' joins the cluster of this machine, 'HOST:PORT' a head node, 'ray://HOST:PORT' a Ray client server.")
    ray_num_cpus: float = option(1.0, "CPUs reserved by each Ray client worker (an actor running clients one after another).", min=0.0)
    ray_num_gpus: float = option(0.0, "GPUs reserved by each Ray client worker; a fraction (e.g. 0.25) lets several workers share one GPU.", min=0.0)
    ray_timeout_s: float = option(600.0, "A Ray worker that has not answered a batch of clients within this many seconds is restarted and those clients count as dropped (0: wait forever).", min=0.0)
    ray_imports: list[str] = option([], "Modules each Ray worker imports before building its clients (where your own task or data builders register themselves).")


@dataclass
class DataConfig:
    """[data] the dataset and how it is split among clients."""

    dataset: str = option("mnist-5k", "Dataset: mnist-5k (embedded, offline), mnist, fashion-mnist, emnist-digits, cifar10, cifar100, medmnist:<flag>.")
    data_dir: str = option("", "Folder with the dataset files (not needed for mnist-5k).")
    download: bool = option(False, "Download missing standard files (checksums verified) when the network allows.")
    num_clients: int = option(10, "Number of clients the training set is split into.", min=1)
    partition: str = option("dirichlet", "Partitioner.", choices=["iid", "dirichlet", "shards", "quantity"])
    alpha: float = option(1.0, "Dirichlet concentration (label skew for 'dirichlet', size skew for 'quantity'); smaller is more skewed.", above=0.0)
    shards_per_client: int = option(2, "Classes-per-client shards for 'shards' (McMahan et al. 2017).", min=1)
    client_test_fraction: float = option(0.0, "Share of each client's data held out as its local test split.", min=0.0, max=0.9)
    validation_fraction: float = option(0.0, "Share of the training data the server holds out (stratified by label, seeded, taken before partitioning: no client trains on it) to choose hyper-parameters on. Then per-round metrics are validation metrics (val_*) and the test set is evaluated once, after the last round. Never taken from the test set.", min=0.0, max=0.5)
    max_train_examples: int = option(0, "Use only the first N training examples (0: all).", min=0)


@dataclass
class TaskConfig:
    """[task] what is learned."""

    name: str = option("classification", "Task.", choices=["classification", "vae", "mae", "gan"])
    model: str = option("cnn-s", "Classifier model.", choices=["cnn-s", "cnn-m", "mlp"])
    norm: str = option("none", "Normalisation layers in the CNN (DP-SGD needs 'group' or 'none').", choices=["none", "group", "batch"])


@dataclass
class TrainConfig:
    """[train] each client's local update."""

    epochs: int = option(1, "Local epochs per round.", min=1)
    batch_size: int = option(32, "Local batch size.", min=1)
    lr: float = option(0.02, "Local SGD learning rate.", min=0.0)
    momentum: float = option(0.9, "Local SGD momentum (the client optimiser restarts each round).", min=0.0, max=0.999)
    weight_decay: float = option(0.0, "Local L2 weight decay.", min=0.0)
    prox_mu: float = option(0.0, "FedProx proximal term mu (0: FedAvg).", min=0.0)
    max_steps: int = option(0, "Cap on local steps per round (0: no cap).", min=0)
    lr_schedule: str = option(
        "constant", "Local learning rate over rounds: constant, or cosine (from lr in round 1 towards 0 at the end); "
        "applies to every local optimiser (SGD, the generative tasks' Adam).", choices=SCHEDULES
    )


@dataclass
class ServerConfig:
    """[server] sampling, aggregation and the server optimiser."""

    clients_per_round: int = option(0, "Clients sampled per round (0: use 'fraction').", min=0)
    fraction: float = option(1.0, "Fraction of available clients sampled per round.", min=0.0, max=1.0)
    min_clients: int = option(1, "Fewest completed clients for a round to update the model.", min=1)
    weighting: str = option("examples", "FedAvg weights.", choices=["examples", "uniform"])
    optimizer: str = option("fedavg", "Server optimiser (Reddi et al. 2021).", choices=["fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi"])
    lr: float = option(1.0, "Server learning rate eta.", min=0.0)
    momentum: float = option(0.9, "FedAvgM server momentum.", min=0.0, max=0.999)
    beta1: float = option(0.9, "Adaptive optimisers' first-moment decay.", min=0.0, max=0.999999)
    beta2: float = option(0.99, "FedAdam/FedYogi second-moment decay.", min=0.0, max=0.999999)
    tau: float = option(1e-3, "Adaptivity tau (v starts at tau^2).", above=0.0)


#: the federated algorithms (each built by fedguard.algorithms.registry)
ALGORITHMS = ["fedavg", "fedprox", "scaffold", "feddyn", "ditto", "fedper"]


@dataclass
class AlgorithmConfig:
    """[algorithm] the federated algorithm: what clients compute and send, and how the server applies it."""

    name: str = option("fedavg", "Federated algorithm: fedavg, fedprox (FedAvg with train.prox_mu > 0, Li et al. 2020), scaffold (control variates, Karimireddy et al. 2020), feddyn (dynamic regularisation, Acar et al. 2021), ditto (personal models, Li et al. 2021), fedper (local heads, Arivazhagan et al. 2019).", choices=ALGORITHMS)
    scaffold_option: int = option(2, "SCAFFOLD's control variate (Karimireddy et al. 2020, Algorithm 1): 2 (option II, the mean corrected local step) or 1 (option I, the client's gradient at the server model over all its examples: one more pass over its data).", choices=[1, 2])
    feddyn_alpha: float = option(0.01, "FedDyn's alpha: weight of the dynamic regulariser.", min=0.0)
    ditto_lambda: float = option(0.1, "Ditto's lambda: how strongly each personal model is pulled towards the global one.", min=0.0)
    fedper_head: int = option(2, "FedPer: how many of the model's last parameter tensors form each client's own head (2: the last layer's weight and bias).", min=1)


@dataclass
class FaultsConfig:
    """[faults] simulated failures and client availability."""

    dropout_rate: float = option(0.0, "Probability that a sampled client fails mid-round.", min=0.0, max=1.0)
    dropout_stage: str = option("fit", "Message kind at which simulated failures happen (e.g. fit, secagg/unmask).")
    join: list[str] = option([], "Clients joining late, as 'FIRST-LAST@ROUND' (e.g. '0-9@5').")
    leave: list[str] = option([], "Clients leaving, as 'FIRST-LAST@ROUND' (gone from that round on).")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "task": TaskConfig,
    "train": TrainConfig,
    "server": ServerConfig,
    "algorithm": AlgorithmConfig,
    "faults": FaultsConfig,
}


def register_section(name: str, cls: type) -> None:
    """Add a configuration section (used by mechanism families: dp, secure, robust, ...)."""
    SECTIONS[name] = cls


#: a check of one key's value against a registry: raises ValueError naming the allowed values
NameCheck = Callable[[Any], None]
#: ``section.key -> check``, run by :meth:`Config.validate` after the field-by-field pass
CHECKS: dict[str, NameCheck] = {}


def register_check(key: str, check: NameCheck) -> None:
    """Have :meth:`Config.validate` check ``section.key`` with ``check(value)``, which raises
    ``ValueError`` (or :class:`ConfigurationError`) with the allowed values when the value is
    not known (e.g. a name that a family's registry resolves). Keys of sections that are not
    registered are skipped."""
    CHECKS[key] = check


def _check_dataset(name: Any) -> None:
    from fedguard.data.registry import dataset_spec

    dataset_spec(str(name))


def _check_task(name: Any) -> None:
    import fedguard.plugins  # noqa: F401  (every family registers its tasks)
    from fedguard.builders import TASK_BUILDERS

    if name not in TASK_BUILDERS:
        raise ValueError(f"{name!r} is not available; choose one of {sorted(TASK_BUILDERS)}")


def _check_loggers(names: Any) -> None:
    from fedguard.report.tracking import check_loggers

    check_loggers(names)


register_check("data.dataset", _check_dataset)
register_check("run.loggers", _check_loggers)
register_check("task.name", _check_task)


def _section_factory(name: str) -> Any:
    return field(default_factory=lambda: SECTIONS[name]())


@dataclass
class Config:
    """The whole configuration: one attribute per section."""

    sections: dict[str, Any] = field(default_factory=lambda: {k: v() for k, v in SECTIONS.items()})

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain dict of every section and value."""
        return {k: dataclasses.asdict(v) for k, v in self.sections.items()}

    def to_toml(self) -> str:
        """The resolved configuration as TOML (what a run saves)."""
        return tomli_w.dumps(self.to_dict())

    def validate(self, skip: tuple[str, ...] = ()) -> Config:
        """Check the whole configuration in one pass (see the module's docstring); the first
        problem raises :class:`ConfigurationError` naming the key and what is allowed.
        Values set as attributes are parsed to their field's type here. ``skip`` names keys
        whose registry check does not apply (e.g. ``data.dataset`` when the user gives the
        data). Returns the configuration."""
        for section, obj in self.sections.items():
            hints = get_type_hints(type(obj))
            for f in dataclasses.fields(obj):
                key = f"{section}.{f.name}"
                setattr(obj, f.name, _coerce(key, getattr(obj, f.name), hints[f.name], f.metadata))
        for key, check in CHECKS.items():
            section, _, name = key.partition(".")
            if key in skip or section not in self.sections or not hasattr(self.sections[section], name):
                continue
            try:
                check(getattr(self.sections[section], name))
            except ConfigurationError:
                raise
            except ValueError as exc:
                raise ConfigurationError(f"{key}: {exc}") from exc
        return self

    def set(self, key: str, value: Any) -> None:
        """Set ``section.key`` to ``value`` (strings are parsed to the field's type)."""
        section, _, name = key.partition(".")
        if not name:
            raise ConfigurationError(f"override {key!r} must look like section.key=value")
        if section not in self.sections:
            raise ConfigurationError(_unknown("section", section, list(self.sections)))
        obj = self.sections[section]
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if name not in fields:
            raise ConfigurationError(_unknown(f"key in [{section}]", name, list(fields), section))
        hint = get_type_hints(type(obj))[name]
        setattr(obj, name, _coerce(f"{section}.{name}", value, hint, fields[name].metadata))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from nested dicts (e.g. parsed TOML); unknown keys are refused."""
        config = cls()
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigurationError(f"[{section}] must be a table of key = value pairs")
            for key, value in values.items():
                config.set(f"{section}.{key}", value)
        return config

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
        """Read a TOML file (optional) and apply ``section.key=value`` overrides."""
        data: dict[str, Any] = {}
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except FileNotFoundError as exc:
                raise ConfigurationError(f"config file {path} not found") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from exc
        config = cls.from_dict(data)
        for item in overrides or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigurationError(f"override {item!r} must look like section.key=value")
            config.set(key.strip(), value.strip())
        return config.validate()


def _unknown(what: str, name: str, known: list[str], section: str | None = None) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}.{hint} Known: {', '.join(sorted(known))}."


def _coerce(key: str, value: Any, hint: Any, meta: Any) -> Any:
    try:
        parsed = _parse(value, hint)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{key}: cannot use {value!r}: {exc}") from exc
    if meta.get("finite", True):
        _require_finite(key, parsed)
    choices, lo, hi, above = meta.get("choices"), meta.get("min"), meta.get("max"), meta.get("above")
    for item in parsed if isinstance(parsed, list) else [parsed]:
        if choices and item not in choices:
            raise ConfigurationError(f"{key}: {item!r} is not allowed; choose one of {choices}")
        if above is not None and isinstance(item, (int, float)) and not item > above:
            raise ConfigurationError(f"{key} must be > {above}, got {item!r}")
        if lo is not None and isinstance(item, (int, float)) and item < lo:
            raise ConfigurationError(f"{key}: {item!r} is below the minimum {lo}")
        if hi is not None and isinstance(item, (int, float)) and item > hi:
            raise ConfigurationError(f"{key}: {item!r} is above the maximum {hi}")
    return parsed


def _require_finite(key: str, value: Any) -> None:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigurationError(f"{key}: {item!r} is not a finite number; NaN and infinities are refused")


def _parse(value: Any, hint: Any) -> Any:
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return [_parse(v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected a whole number")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError("expected a string")
        return str(value)
    raise TypeError(f"unsupported option type {hint}")


def reference_markdown() -> str:
    """The configuration reference (every section, key, type, default and help) as Markdown."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"### [{section}]\n\n{(cls.__doc__ or '').strip()}\n")
        lines.append("| key | type | default | meaning |\n|---|---|---|---|")
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = f" One of: {', '.join(map(str, f.metadata['choices']))}." if f.metadata.get("choices") else ""
            typename = getattr(hints[f.name], "__name__", str(hints[f.name]))
            lines.append(f"| `{f.name}` | {typename} | `{default!r}` | {f.metadata['help']}{allowed} |")
        lines.append("")
    return "\n".join(lines)
