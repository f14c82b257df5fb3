"""Differential-privacy benchmarks: sample-level accuracy, the client-level curve, DP-SGD overhead.

* ``dp-sample``: full MNIST, 100 clients by label-Dirichlet 0.5, CNN-S, DP-SGD with every client's
  epsilon at most 3 against the server and model users alike (delta 1e-5; the Poisson masks are
  each client's secret), noise from the secure source split among the clients (distributed, one
  DP-SGD step per round, discrete Gaussian shares added in the SecAgg+ ring), shares sized so that
  the noise of all but one colluding client of the fewest survivors (secure.min_survivors=90) gives
  the epsilon.
  ``dp-sample-local``: the same with each client adding all of its noise (no trust in anyone).
* ``dp-client``: W1's 1,000 clients, DP-FedAvg at three noise multipliers: the accuracy-epsilon
  curve, epsilon from the ledger.
* ``dp-ftrl``: the same partition, DP-FTRL with tree aggregation (no sampling: each client once
  per epoch of 10 rounds of 100 clients), at three node-noise multipliers: the accuracy-epsilon
  curve, epsilon against model users and against the server (infinite: it adds the noise).
* ``dp-overhead``: one local epoch of DP-SGD (fast per-example clipping) against the same
  non-private epoch, interleaved in one process at one thread, median of several repeats.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedguard import Config, Experiment
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.data.registry import load_dataset
from fedguard.privacy.dpsgd import DPSGD, DPSGDPlan
from fedguard.privacy.noise import SecureRandom
from fedguard.privacy.per_example import FastClippedSum, VmapClippedSum
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import cnn_s

MNIST_100 = {
    "data.dataset": "mnist",
    "data.num_clients": 100,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "task.model": "cnn-s",
    "task.norm": "none",
    "server.fraction": 1.0,
}

#: sample-level DP, noise split among the clients (DP-SGD on the union of their data)
DP_SAMPLE = {
    **MNIST_100,
    "dp.mode": "sample",
    "dp.noise_placement": "distributed",
    "dp.local_steps": 1,
    "dp.sample_rate": 0.1,
    "dp.clip": 1.0,
    "dp.target_epsilon": 3.0,
    "dp.delta": 1e-5,
    "train.lr": 3.0,
    "train.momentum": 0.0,
    "server.optimizer": "fedavgm",
    "server.momentum": 0.9,
    "secure.mode": "secagg",
    "secure.clip": 2.0,
    "secure.min_survivors": 90,
    "dp.colluding_clients": 1,
    "dp.noise_source": "secure",
    "run.rounds": 100,
    "run.eval_every": 10,
}

#: sample-level DP with all of each client's noise added on the client
DP_SAMPLE_LOCAL = {**DP_SAMPLE, "dp.noise_placement": "local", "secure.mode": "none", "secure.clip": 1.0,
                   "secure.min_survivors": 0}

#: client-level DP on W1's partition (1,000 clients, Dirichlet 0.5, seed 0), 100 per round
DP_CLIENT = {
    "data.dataset": "mnist",
    "data.num_clients": 1000,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
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
    "run.rounds": 60,
    "run.eval_every": 0,
}
CLIENT_NOISE = (0.5, 1.0, 2.0)

#: DP-FTRL on the same partition: 100 clients per round, each once per 10-round epoch (tree)
DP_FTRL = {**{k: v for k, v in DP_CLIENT.items() if not k.startswith("dp.")}, "dp.mode": "ftrl", "dp.clip": 0.5}
FTRL_NOISE = (1.0, 2.0, 4.0)
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


def sample_level(cfg: dict[str, Any], name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Accuracy and the largest client epsilon of one sample-level run."""
    result, config, wall = _run(cfg, args, name, _quick(args))
    final = result.final
    return {
        "accuracy": final["test_accuracy"],
        "epsilon_server": _finite(final["epsilon_server"]),
        "epsilon_model": final["epsilon_model"],
        "epsilon_max": final["epsilon"],
        "delta": final["delta"],
        "noise_source": final["dp_noise_source"],
        "noise_multiplier": final["dp_noise_multiplier"],
        "sampling_rate": final["dp_sampling_rate"],
        "steps": final["dp_steps"],
        "clients_accounted": final["dp_clients_accounted"],
        "accuracy_per_round": {r["round"]: r["test_accuracy"] for r in result.rows if r.get("test_accuracy")},
        "epsilon_per_round": [round(r["epsilon"], 4) for r in result.rows],
        "wall_s": round(wall, 1),
        "config": config.to_dict(),
    }


def dp_sample(args: argparse.Namespace) -> dict[str, Any]:
    """Sample-level DP, 100 MNIST clients: accuracy with every client's epsilon <= 3 (distributed noise)."""
    return sample_level(DP_SAMPLE, "dp-sample", args)


def dp_sample_local(args: argparse.Namespace) -> dict[str, Any]:
    """Sample-level DP, 100 MNIST clients, each client adding all its noise: accuracy at epsilon <= 3."""
    return sample_level(DP_SAMPLE_LOCAL, "dp-sample-local", args)


def dp_client(args: argparse.Namespace) -> dict[str, Any]:
    """Client-level DP-FedAvg on W1's 1,000 clients: accuracy and ledger epsilon at three noise levels."""
    points, config = [], None
    for z in CLIENT_NOISE:
        extra = {"dp.noise_multiplier": z, **(QUICK_CLIENT if args.quick else {})}
        result, config, wall = _run(DP_CLIENT, args, f"dp-client-z{z}", extra)
        final = result.final
        points.append({
            "noise_multiplier": z,
            "epsilon": final["epsilon"],
            "epsilon_model": final["epsilon_model"],
            "epsilon_server": _finite(final["epsilon_server"]),
            "accuracy": final["test_accuracy"],
            "delta": final["delta"],
            "rounds": final["rounds"],
            "sampling_rate": final["dp_sampling_rate"],
            "wall_s": round(wall, 1),
        })
    base, _, wall = _run(DP_CLIENT, args, "dp-client-nodp", {"dp.mode": "none", **(QUICK_CLIENT if args.quick else {})})
    baseline = {"accuracy": base.final["test_accuracy"], "wall_s": round(wall, 1)}
    return {"points": points, "no_dp": baseline, "config": config.to_dict() if config else {}}


def dp_ftrl(args: argparse.Namespace) -> dict[str, Any]:
    """DP-FTRL (tree aggregation) on W1's 1,000 clients: accuracy and epsilon at three node-noise levels."""
    points, config = [], None
    for z in FTRL_NOISE:
        extra = {"dp.noise_multiplier": z, **(QUICK_CLIENT if args.quick else {})}
        result, config, wall = _run(DP_FTRL, args, f"dp-ftrl-z{z}", extra)
        final = result.final
        points.append({
            "noise_multiplier": z,
            "epsilon_model": final["epsilon_model"],
            "epsilon_server": _finite(final["epsilon_server"]),
            "accuracy": final["test_accuracy"],
            "delta": final["delta"],
            "rounds": final["rounds"],
            "rounds_per_tree": final["dp_rounds_per_tree"],
            "wall_s": round(wall, 1),
        })
    return {"points": points, "config": config.to_dict() if config else {}}


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
    "dp-sample": dp_sample,
    "dp-sample-local": dp_sample_local,
    "dp-client": dp_client,
    "dp-ftrl": dp_ftrl,
    "dp-overhead": dp_overhead,
}
