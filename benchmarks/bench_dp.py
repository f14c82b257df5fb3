"""Differential-privacy benchmarks: sample-level accuracy, the client-level curves, DP-SGD overhead.

Every accuracy below is chosen on validation and measured on test (issue 19): the runs hold out a
stratified 10% of the MNIST training set (``data.validation_fraction = 0.1``, 6,000 images taken
before partitioning, so no client trains on them); settings are ranked by the last round's
validation accuracy, and the test set is read once, for the chosen setting, after its last round.
The validation images are the server's own: choosing on them spends none of the clients' privacy
budget. Candidate runs are given the validation set in place of the test set, so they cannot read
it at all.

* ``dp-sample-tune``: the local lr and server momentum of ``dp-sample``, 3 x 2 grid (``SAMPLE_LR`` x
  ``SAMPLE_MOMENTUM``), each a ``TUNE_ROUNDS``-round run with dp-sample's DP configuration and noise
  multiplier (calibrated for dp-sample's 100 rounds; a tune run spends less epsilon, never more).
  Its result line, committed as results/dp/dp-sample-tune.json, is what ``dp-sample`` reads.
* ``dp-sample``: full MNIST less the validation split, 100 clients by label-Dirichlet 0.5, CNN-S,
  DP-SGD with every client's epsilon at most 3 against the server and model users alike (delta
  1e-5; the Poisson masks are each client's secret), noise from the secure source split among the
  clients (distributed, one DP-SGD step per round, discrete Gaussian shares added in the SecAgg+
  ring), shares sized so that the noise of all but one colluding client of the fewest survivors
  (secure.min_survivors=90) gives the epsilon. lr and server momentum from dp-sample-tune
  (``validation_selected: false`` and the old values, lr 3.0 and momentum 0.9 picked on test by an
  earlier session, when its line is absent). It trains without the validation part, as the tune
  did: the chosen setting is measured on exactly the partition, client sizes and noise it was
  chosen with (retraining on all 60,000 images would change every client's data and share).
  ``dp-sample-local``: the same with each client adding all of its noise (no trust in anyone), on
  all 60,000 images with dp-sample's old settings: not chosen on validation (its line says so).
* ``dp-client``: W1's 1,000 clients (Dirichlet 0.5), 100 per round, 60 rounds, DP-FedAvg with
  central noise and adaptive clipping at three noise multipliers, delta 1e-5: the accuracy-epsilon
  curve. At each noise level, and for the non-private reference, the server lr is chosen among
  ``CLIENT_SERVER_LR`` on validation; the test accuracy is the chosen run's.
* ``dp-client-secagg``: dp-client at z 1.0 with the noise split among the clients as discrete Gaussian
  shares in the SecAgg+ ring (1 colluding client), fixed clip 0.5 (adaptive clipping is refused there), the
  server lr chosen on validation likewise: the server sees only noised sums, so epsilon against it is finite
  (each client's un-amplified composition over the rounds it took part in: the server knows its sample).
* ``dp-ftrl``: the same partition, DP-FTRL with tree aggregation (no sampling: each client once per
  epoch of 10 rounds of 100 clients; 6 trees), at four node-noise multipliers, the server lr chosen
  likewise.
  Both curves report epsilon against model users and against the server: the server adds the
  noise and sees each clipped update, so the latter is infinite (null in JSON); a finite
  server-side figure needs distributed noise under SecAgg+ (dp-sample has it). Full runs write the
  curve to results/dp/dp-client.png and dp-ftrl.png.
* ``dp-overhead``: one local epoch of DP-SGD (fast per-example clipping) against the same
  non-private epoch, interleaved in one process at one thread, median of several repeats.

Sizing (an idle 2-core machine; estimates from CPU seconds of short runs of the same configuration
at full data, measured at load 7-9 and divided by the 2 worker processes): a dp-sample round costs
about 10 CPU-s in the workers (100 clients' DP-SGD steps and SecAgg+), so about 5-6 s wall; 30-round
tune runs are then about 3 minutes each, the grid of 6 about 18-20 minutes, and dp-sample's 100 rounds
about 10-12 minutes. A dp-client or dp-ftrl round (100 clients, one epoch of about 54 images) costs
about 3.5 CPU-s in the workers (4.3 for dp-ftrl) and 0.3-0.5 s on the server: a 60-round run is
about 2.5-3 minutes, so dp-client's 8 runs (3 noise levels and the reference, 2 server lrs each)
about 20-22 minutes and dp-ftrl's 8 runs (4 noise levels, 2 server lrs each) 21-24 minutes.
``--quick`` shrinks every run to a few rounds on 6,000 images (one noise level, both candidates;
the tune: 2 candidates of 2 rounds). Wall times grow with other jobs on the cores: at load 10 a
round took 10-20 times its idle estimate here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedguard import Config, Experiment, builders
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.data.arrays import ArrayDataset
from fedguard.data.registry import load_dataset
from fedguard.health import RunFailed
from fedguard.privacy.accountant import GaussianStep, calibrate_noise, history_of
from fedguard.privacy.dpsgd import DPSGD, DPSGDPlan
from fedguard.privacy.noise import SecureRandom
from fedguard.privacy.per_example import FastClippedSum, VmapClippedSum
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import cnn_s

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "dp"

#: the server's validation share of the MNIST training set (stratified, before partitioning)
VALIDATION_FRACTION = 0.1

MNIST_100 = {
    "data.dataset": "mnist",
    "data.num_clients": 100,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "task.model": "cnn-s",
    "task.norm": "none",
    "server.fraction": 1.0,
}

#: dp-sample's lr and server momentum before dp-sample-tune: picked on the test set by an earlier session
SAMPLE_DEFAULTS: dict[str, float] = {"train.lr": 3.0, "server.momentum": 0.9}

#: sample-level DP, noise split among the clients (DP-SGD on the union of their data); lr and momentum: tuned
DP_SAMPLE = {
    **MNIST_100,
    "data.validation_fraction": VALIDATION_FRACTION,
    "dp.mode": "sample",
    "dp.noise_placement": "distributed",
    "dp.local_steps": 1,
    "dp.sample_rate": 0.1,
    "dp.clip": 1.0,
    "dp.target_epsilon": 3.0,
    "dp.delta": 1e-5,
    **SAMPLE_DEFAULTS,
    "train.momentum": 0.0,
    "server.optimizer": "fedavgm",
    "secure.mode": "secagg",
    "secure.clip": 2.0,
    "secure.min_survivors": 90,
    "dp.colluding_clients": 1,
    "dp.noise_source": "secure",
    "run.rounds": 100,
    "run.eval_every": 10,
}

#: sample-level DP with all of each client's noise added on the client (dp-sample's old settings, all data)
DP_SAMPLE_LOCAL = {**DP_SAMPLE, "dp.noise_placement": "local", "secure.mode": "none", "secure.clip": 1.0,
                   "secure.min_survivors": 0, "data.validation_fraction": 0.0}

#: dp-sample-tune's grid and run length (each run at dp-sample's noise multiplier)
SAMPLE_LR = (1.5, 3.0, 6.0)
SAMPLE_MOMENTUM = (0.8, 0.9)
TUNE_ROUNDS = 30

#: client-level DP on W1's partition (1,000 clients, Dirichlet 0.5, seed 0), 100 per round
DP_CLIENT = {
    "data.dataset": "mnist",
    "data.num_clients": 1000,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "data.validation_fraction": VALIDATION_FRACTION,
    "task.model": "cnn-s",
    "server.clients_per_round": 100,
    "server.weighting": "uniform",
    "train.epochs": 1,
    "train.batch_size": 20,
    "train.lr": 0.05,
    "train.momentum": 0.0,
    "server.optimizer": "fedavgm",
    "server.lr": 1.0,
    "server.momentum": 0.9,
    "dp.mode": "client",
    "dp.clip": 0.5,
    "dp.adaptive_clip": True,
    "dp.delta": 1e-5,
    "run.rounds": 60,
    "run.eval_every": 0,
}
CLIENT_NOISE = (0.5, 1.0, 2.0)

#: the same with the noise split among the clients as discrete Gaussian shares in the SecAgg+ ring: the server
#: never sees an un-noised update, so epsilon against it is finite (each client's un-amplified composition: the
#: server knows its own sample). Fixed clip 0.5 (adaptive clipping would send each client's clip indicator
#: outside the secure sum: refused), the 1 colluding client of the default.
#: Shares are sized for ``secure.min_survivors`` = 70 (Poisson sampling of 1,000 at q 0.1: 100 +- 9.5 a round, fewer
#: than 70 about once in 1,000 rounds); SecAgg+'s default (12) made 100 clients add about 3x the noise z asks
#: (the committed 2026-12-03 line: 85.1% at eps_model 1.05, eps_server 5.90).
DP_CLIENT_SECAGG = {**{k: v for k, v in DP_CLIENT.items() if k != "dp.adaptive_clip"},
                    "dp.noise_placement": "distributed", "secure.mode": "secagg", "dp.colluding_clients": 1,
                    "secure.min_survivors": 70}
CLIENT_SECAGG_NOISE = (1.0,)

#: DP-FTRL on the same partition: 100 clients per round, each once per 10-round epoch (tree)
DP_FTRL = {**{k: v for k, v in DP_CLIENT.items() if not k.startswith("dp.")}, "dp.mode": "ftrl", "dp.clip": 0.5,
           "dp.delta": 1e-5}
FTRL_NOISE = (1.0, 2.0, 4.0, 8.0)  # epsilon against model users about 34, 14, 6.0, 2.7 (RDP, delta 1e-5)

#: the server lr each point of the client-level curves is chosen among (on validation)
CLIENT_SERVER_LR = (0.3, 1.0)

QUICK_CLIENT = {
    "run.rounds": 3,
    "data.max_train_examples": 6000,
    "data.num_clients": 100,
    "server.clients_per_round": 10,
    "dp.quantile_noise": 2.5,  # the default (expected clients / 20 = 0.5) is refused for z >= 1 at 10 per round
}


def _finite(value: float) -> float | None:
    """JSON has no infinity: an epsilon that holds against nobody (the trusted server) is null."""
    return value if math.isfinite(value) else None


def _overrides(cfg: dict[str, Any], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> list[str]:
    merged = {**cfg, "data.data_dir": args.data_dir, "run.progress": False, "run.report": False, **(extra or {})}
    return [f"{k}={v}" for k, v in merged.items()]


def _run(cfg: dict[str, Any], args: argparse.Namespace, name: str, extra: dict[str, Any] | None = None):
    config = Config.load(None, _overrides(cfg, args, extra))
    t0 = time.perf_counter()
    result = Experiment(config).run(run_dir=Path(args.out) / f"{name}-{int(time.time())}")
    return result, config, time.perf_counter() - t0


def _quick(args: argparse.Namespace) -> dict[str, Any]:
    return {"run.rounds": 3, "data.max_train_examples": 6000, "run.eval_every": 0} if args.quick else {}


# -- choosing on validation -----------------------------------------------------------------------


@dataclass
class Splits:
    """The training set (the runs take the validation split out of it themselves), the validation split, test."""

    train: ArrayDataset
    validation: ArrayDataset
    test: ArrayDataset


@dataclass
class Trial:
    """One candidate setting, trained on the training data less validation and scored on validation."""

    setting: dict[str, Any]
    config: Config
    score: float | None = None
    final: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] | None = None
    error: str | None = None
    wall_s: float = 0.0

    def row(self) -> dict[str, Any]:
        """What the result line keeps of a candidate (its validation figure, never a test one)."""
        return {"setting": self.setting, "validation_accuracy": self.score,
                "validation_loss": self.final.get("val_loss"), "error": self.error,
                "wall_s": round(self.wall_s, 1)}


def load_splits(args: argparse.Namespace, cfg: dict[str, Any], extra: dict[str, Any]) -> Splits:
    """MNIST (cut to ``data.max_train_examples`` if set) and the validation split the runs of ``cfg`` hold out."""
    config = Config.load(None, _overrides(cfg, args, extra))
    train, test = Experiment(config).load_data()
    _, validation = Experiment(config).split_validation(train)
    if validation is None:
        raise ValueError("choosing on validation needs data.validation_fraction > 0")
    return Splits(train, validation, test)


def train_trial(cfg: dict[str, Any], args: argparse.Namespace, name: str, extra: dict[str, Any],
                setting: dict[str, Any], data: Splits) -> Trial:
    """Train one candidate. The run is handed the validation split as its test set: it cannot read the test set."""
    config = Config.load(None, _overrides(cfg, args, {**extra, **setting}))
    trial = Trial(setting, config)
    label = "-".join(f"{k.split('.')[-1]}{v}" for k, v in setting.items())
    t0 = time.perf_counter()
    try:
        result = Experiment(config, train=data.train, test=data.validation, quiet=True).run(
            run_dir=Path(args.out) / f"{name}-{label}-{int(time.time())}")
        trial.final, trial.params = result.final, result.params
        value = result.final.get("val_accuracy")
        trial.score = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    except RunFailed as exc:  # diverged: ranked last
        trial.error = str(exc).split(". ")[0]
        trial.final = exc.result.final if exc.result is not None else {}
    trial.wall_s = time.perf_counter() - t0
    return trial


def choose(trials: list[Trial]) -> Trial:
    """The candidate with the best last-round validation accuracy, ties to the lower validation loss (then the
    first listed); failed runs are never chosen."""
    usable = [t for t in trials if t.score is not None and t.error is None]
    if not usable:
        raise RuntimeError("every candidate failed: " + "; ".join(f"{t.setting}: {t.error}" for t in trials))
    return max(usable, key=lambda t: (t.score or 0.0, -float(t.final.get("val_loss", 0.0))))


def read_test_accuracy(trial: Trial, data: Splits) -> float:
    """The chosen run's accuracy on the test set: the one time a curve point reads it."""
    task = builders.build_task(trial.config, data.train)
    model = builders.seeded_model(task, trial.config.run.seed)
    assert trial.params is not None
    return float(task.evaluate(model, trial.params, data.test)["accuracy"])


def select(cfg: dict[str, Any], args: argparse.Namespace, name: str, extra: dict[str, Any],
           settings: list[dict[str, Any]], data: Splits) -> tuple[Trial, list[Trial], float]:
    """Train every setting, choose on validation, then read the test set once: (chosen, all, test accuracy)."""
    trials = [train_trial(cfg, args, name, extra, s, data) for s in settings]
    best = choose(trials)
    return best, trials, read_test_accuracy(best, data)


# -- sample-level ---------------------------------------------------------------------------------


def sample_noise(cfg: dict[str, Any]) -> float:
    """dp-sample's noise multiplier as its build calibrates it: every client (server.fraction 1) takes
    ``dp.local_steps`` steps a round at the fixed rate ``dp.sample_rate`` for ``run.rounds`` rounds."""
    if cfg.get("server.fraction") != 1.0:
        raise ValueError("the tune's calibration assumes every client in every round (server.fraction = 1)")
    steps = int(cfg["run.rounds"]) * int(cfg["dp.local_steps"])
    plan = lambda s: history_of([(GaussianStep(s, float(cfg["dp.sample_rate"])), steps)])  # noqa: E731
    return calibrate_noise(plan, float(cfg["dp.target_epsilon"]), float(cfg["dp.delta"]), Config().dp.accountant)


def tuned_sample() -> tuple[dict[str, float], dict[str, Any] | None]:
    """dp-sample's lr and momentum from the committed dp-sample-tune line, and that line's provenance
    (None, with the old values, when there is no line)."""
    path = RESULTS / "dp-sample-tune.json"
    if not path.exists():
        return dict(SAMPLE_DEFAULTS), None
    line = json.loads(path.read_text().strip().splitlines()[-1])
    chosen = {k: float(line["chosen"][k]) for k in SAMPLE_DEFAULTS}
    source = {k: line.get(k) for k in ("date", "commit", "quick", "noise_multiplier", "charged_noise_multiplier",
                                       "tune_rounds")}
    return chosen, source


def sample_level(cfg: dict[str, Any], name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy and the largest client epsilon of one sample-level run (test set read after the last round)."""
    result, config, wall = _run(cfg, args, name, _quick(args))
    final = result.final
    monitor = "val_accuracy" if config.data.validation_fraction else "test_accuracy"
    return {
        "accuracy": final["test_accuracy"],
        "validation_accuracy": final.get("val_accuracy"),
        "epsilon_server": _finite(final["epsilon_server"]),
        "epsilon_model": final["epsilon_model"],
        "epsilon_max": final["epsilon"],
        "delta": final["delta"],
        "noise_source": final["dp_noise_source"],
        "noise_multiplier": final["dp_noise_multiplier"],
        "sampling_rate": final["dp_sampling_rate"],
        "steps": final["dp_steps"],
        "clients_accounted": final["dp_clients_accounted"],
        f"{monitor}_per_round": {r["round"]: r[monitor] for r in result.rows if r.get(monitor)},
        "epsilon_per_round": [round(r["epsilon"], 4) for r in result.rows],
        "wall_s": round(wall, 1),
        "config": config.to_dict(),
    }


def dp_sample_tune(args: argparse.Namespace) -> dict[str, Any]:
    """dp-sample's local lr and server momentum, chosen on the validation split (short runs at its noise)."""
    t0 = time.perf_counter()
    target = {**DP_SAMPLE, **_quick(args)}
    z = sample_noise(target)
    rounds = 2 if args.quick else TUNE_ROUNDS
    extra = {**_quick(args), "run.rounds": rounds, "run.eval_every": 0 if args.quick else 10,
             "dp.target_epsilon": 0, "dp.noise_multiplier": z}
    grid = [{"train.lr": lr, "server.momentum": m} for lr in SAMPLE_LR for m in SAMPLE_MOMENTUM]
    if args.quick:
        grid = [g for g in grid if g["server.momentum"] == 0.9][:2]
    data = load_splits(args, DP_SAMPLE, extra)
    trials = [train_trial(DP_SAMPLE, args, "dp-sample-tune", extra, g, data) for g in grid]
    best = choose(trials)
    return {
        "chosen": best.setting,
        "rule": "the best last-round validation accuracy, ties to the lower validation loss (validation: 10% of "
                "the training set, stratified; the runs never see the test set)",
        "validation_accuracy": best.score,
        "candidates": [t.row() for t in trials],
        "noise_multiplier": z,
        "charged_noise_multiplier": best.final.get("dp_noise_multiplier"),
        "tune_rounds": rounds,
        "for_rounds": target["run.rounds"],
        "epsilon_server_tune": _finite(best.final.get("epsilon_server", math.inf)),
        "epsilon_model_tune": best.final.get("epsilon_model"),
        "delta": best.final.get("delta"),
        "validation_examples": len(data.validation),
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": best.config.to_dict(),
    }


def dp_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Sample-level DP, 100 MNIST clients: accuracy with every client's epsilon <= 3 (distributed noise)."""
    chosen, source = tuned_sample()
    figures = sample_level({**DP_SAMPLE, **chosen}, "dp-sample", args)
    selected = source is not None and not source.get("quick")
    figures.update({"validation_selected": selected, "tuned": chosen, "tune": source})
    # the multiplier the ledger charges (the plan's, times sqrt(honest / planned shares)): the same noise as tuned
    if selected and not args.quick:
        figures["tune_noise_matches"] = math.isclose(figures["noise_multiplier"], source["charged_noise_multiplier"],
                                                     rel_tol=1e-6)
    return figures


def dp_sample_local(args: argparse.Namespace) -> dict[str, Any]:
    """Sample-level DP, 100 MNIST clients, each client adding all its noise: accuracy at epsilon <= 3."""
    return {**sample_level(DP_SAMPLE_LOCAL, "dp-sample-local", args), "validation_selected": False}


# -- client-level curves --------------------------------------------------------------------------


def _curve_plot(points: list[dict[str, Any]], reference: float | None, path: Path, title: str) -> None:
    """Test accuracy against epsilon against model users (log scale), one point per noise multiplier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    xs = [p["epsilon_model"] for p in points]
    ys = [100 * p["accuracy"] for p in points]
    ax.plot(xs, ys, "o-")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"z={p['noise_multiplier']:g}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if reference is not None:
        ax.axhline(100 * reference, ls="--", color="gray", label="no DP")
        ax.legend(loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel(f"epsilon against model users (delta {points[0]['delta']:g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curve_point(z: float, best: Trial, trials: list[Trial], accuracy: float) -> dict[str, Any]:
    final = best.final
    return {
        "noise_multiplier": z,
        "accuracy": accuracy,
        "validation_accuracy": best.score,
        "epsilon_model": final["epsilon_model"],
        "epsilon_server": _finite(final["epsilon_server"]),
        "delta": final["delta"],
        "rounds": final["rounds"],
        "chosen": best.setting,
        "candidates": [t.row() for t in trials],
        "wall_s": round(sum(t.wall_s for t in trials), 1),
        **{k: final[k] for k in ("dp_sampling_rate", "dp_rounds_per_tree") if k in final},
    }


def client_curve(cfg: dict[str, Any], levels: tuple[float, ...], name: str, args: argparse.Namespace,
                 reference: bool) -> dict[str, Any]:
    """One point per noise multiplier (server lr chosen on validation), the no-DP reference, the plot."""
    t0 = time.perf_counter()
    quick = QUICK_CLIENT if args.quick else {}
    settings = [{"server.lr": lr} for lr in CLIENT_SERVER_LR]
    data = load_splits(args, cfg, quick)
    points, config = [], None
    for z in (levels[1:2] or levels[:1]) if args.quick else levels:
        best, trials, accuracy = select(cfg, args, f"{name}-z{z}", {"dp.noise_multiplier": z, **quick}, settings,
                                        data)
        points.append(_curve_point(z, best, trials, accuracy))
        config = best.config
    figures: dict[str, Any] = {"points": points, "validation_selected": True}
    base_accuracy = None
    if reference:
        best, trials, base_accuracy = select(cfg, args, f"{name}-nodp", {"dp.mode": "none", **quick}, settings, data)
        figures["no_dp"] = {"accuracy": base_accuracy, "validation_accuracy": best.score, "chosen": best.setting,
                            "candidates": [t.row() for t in trials], "wall_s": round(sum(t.wall_s for t in trials), 1)}
    plot = (Path(args.out) if args.quick else RESULTS) / f"{name}.png"
    _curve_plot(points, base_accuracy, plot, f"{name}: MNIST, {cfg['data.num_clients']} clients, "
                f"{cfg['server.clients_per_round']} per round, {cfg['run.rounds']} rounds")
    figures.update({
        "plot": str(plot.relative_to(HERE.parent) if plot.is_relative_to(HERE.parent) else plot),
        "train_examples": len(data.train) - len(data.validation),
        "validation_examples": len(data.validation),
        "rule": "server lr by the best last-round validation accuracy per noise level; test read once, chosen run",
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": config.to_dict() if config else {},
    })
    return figures


def dp_client(args: argparse.Namespace) -> dict[str, Any]:
    """Client-level DP-FedAvg on W1's 1,000 clients: the accuracy-epsilon curve, settings chosen on validation."""
    return client_curve(DP_CLIENT, CLIENT_NOISE, "dp-client", args, reference=True)


def dp_client_secagg(args: argparse.Namespace) -> dict[str, Any]:
    """Client-level DP-FedAvg with distributed noise in the SecAgg+ ring: a finite epsilon against the server."""
    cfg = {**DP_CLIENT_SECAGG, "secure.min_survivors": 5} if args.quick else DP_CLIENT_SECAGG  # quick: 10 a round
    return client_curve(cfg, CLIENT_SECAGG_NOISE, "dp-client-secagg", args, reference=False)


def dp_ftrl(args: argparse.Namespace) -> dict[str, Any]:
    """DP-FTRL (tree aggregation) on W1's 1,000 clients: the accuracy-epsilon curve, chosen on validation."""
    return client_curve(DP_FTRL, FTRL_NOISE, "dp-ftrl", args, reference=False)


# -- DP-SGD's cost --------------------------------------------------------------------------------


def _client_data(args: argparse.Namespace, n: int):
    try:
        train, _ = load_dataset("mnist", args.data_dir)
    except (FileNotFoundError, ValueError):
        train, _ = load_dataset("mnist-5k", None)
    return train.subset(torch.arange(min(n, len(train))), "client")


def _epoch_seconds(trainer: LocalSGD, task, model, params, data, seed: int) -> float:
    t0 = time.perf_counter()
    trainer.train(task, model, params, data, torch.Generator().manual_seed(seed))
    return time.perf_counter() - t0


def overhead(args: argparse.Namespace, norm: str, batch: int, repeats: int, engine: str = "fast") -> dict[str, Any]:
    """Median seconds of one local epoch, DP-SGD vs plain SGD, alternated in this process."""
    data = _client_data(args, 1000 if args.quick else 5000)
    task = ClassificationTask(lambda: cnn_s(1, 28, 10, norm))
    torch.manual_seed(0)
    model = task.build_model()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    n = len(data)
    plain = LocalSGD(lr=0.05, sampler=ShuffledEpochs(1, batch))
    clipped = FastClippedSum(model, task.loss) if engine == "fast" else VmapClippedSum(model, task.loss)
    dpsgd = DPSGD(DPSGDPlan(1.0, 1.0, sample_rate=batch / n, epochs=1), clipped, SecureRandom())
    private = LocalSGD(lr=0.05, sampler=dpsgd.sample, gradient=dpsgd.gradient)
    _epoch_seconds(plain, task, model, params, data, 0)  # warm-up
    _epoch_seconds(private, task, model, params, data, 0)
    dp_s, plain_s = [], []
    for rep in range(repeats):
        plain_s.append(_epoch_seconds(plain, task, model, params, data, rep))
        dp_s.append(_epoch_seconds(private, task, model, params, data, rep))
    dp_med, plain_med = statistics.median(dp_s), statistics.median(plain_s)
    return {"dp_epoch_s": round(dp_med, 4), "plain_epoch_s": round(plain_med, 4), "ratio": round(dp_med / plain_med, 3),
            "examples": n, "batch": batch, "norm": norm, "engine": engine, "repeats": repeats,
            "noise_source": dpsgd.source.name}


def dp_overhead(args: argparse.Namespace) -> dict[str, Any]:
    """One DP-SGD local epoch vs the same plain epoch (CNN-S, 1 thread, median of interleaved repeats)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        repeats = 3 if args.quick else 7
        head = overhead(args, "none", 64, repeats)
        variants = [overhead(args, "group", 64, repeats), overhead(args, "none", 32, repeats)]
        if not args.quick:
            variants.append(overhead(args, "none", 64, 3, engine="vmap"))
    finally:
        torch.set_num_threads(threads)
    return {**head, "variants": variants}


BENCHMARKS = {
    "dp-sample-tune": dp_sample_tune,
    "dp-sample": dp_sample,
    "dp-sample-local": dp_sample_local,
    "dp-client": dp_client,
    "dp-client-secagg": dp_client_secagg,
    "dp-ftrl": dp_ftrl,
    "dp-overhead": dp_overhead,
}
