"""Scale benchmarks: the Ray runtime against the fork pool (W1), populations of 100,000 clients,
and W2 on a GPU against the CPU.

Each measured run is a fresh Python process (``python benchmarks/bench_scale.py --inner KIND
JSON``), so its start-up, peak memory and wall time are its own; peak memory is the peak of the
summed proportional set size (PSS) of the process and its children: for a Ray run that started
its own local instance, Ray's daemons, its object store and its workers are among them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_core import PeakMemory, _process_age_s, overrides  # noqa: E402

#: populations of the ``population`` benchmark: (clients, clients per round)
POPULATION_ROWS = [(10_000, 1_000), (30_000, 1_000), (100_000, 1_000), (100_000, 100)]
POPULATION_CONFIG = {
    "data.partition": "quantity",  # Dirichlet(1.0) client sizes, every client at least one example
    "data.alpha": 1.0,
    "task.model": "cnn-s",
    "train.epochs": 1,
    "train.batch_size": 20,
    "train.lr": 0.05,
    "train.momentum": 0.0,
    "run.rounds": 5,
    "run.eval_every": 0,
    "run.progress": False,
    "run.report": False,
}


def mnist_and_fashion(data_dir: str):
    """MNIST and Fashion-MNIST training sets side by side: 120,000 distinct images, 20 classes.

    Labels 0-9 are the digits, 10-19 the garments; the test set joins both test sets. Enough
    distinct examples for 100,000 clients to hold at least one each, none used twice. Each
    source is copied into place and released before the next is read (no second full copy).
    """
    import torch

    from fedguard.data import ArrayDataset, load_dataset

    sizes = {"train": (60_000, 60_000), "test": (10_000, 10_000)}
    xs = {k: torch.empty((sum(n), 1, 28, 28)) for k, n in sizes.items()}
    ys: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    for i, name in enumerate(("mnist", "fashion-mnist")):
        for split, data in zip(("train", "test"), load_dataset(name, data_dir), strict=True):
            start = sum(sizes[split][:i])
            xs[split][start : start + len(data)] = data.x
            ys[split].append(data.y + 10 * i)
        del data
    return tuple(ArrayDataset(xs[k], torch.cat(ys[k]), f"mnist+fashion-{k}") for k in ("train", "test"))


def inner_population(spec: dict[str, object]) -> dict[str, object]:
    import numpy as np

    from fedguard import Config, Experiment

    with PeakMemory() as mem:
        train, test = mnist_and_fashion(str(spec["data_dir"]))
        cfg = {**POPULATION_CONFIG, "data.num_clients": spec["clients"], "server.clients_per_round": spec["per_round"],
               **spec.get("extra", {})}
        config = Config.load(None, [f"{k}={v}" for k, v in cfg.items()])
        exp = Experiment(config, train=train, test=test)
        del train, test
        result = exp.run(run_dir=Path(str(spec["out"])) / f"population-{spec['clients']}-{os.getpid()}")
    sizes = json.loads((result.run_dir / "partition.json").read_text())["sizes"]
    rounds = [r["round_s"] for r in result.rows]
    return {
        "clients": spec["clients"],
        "per_round": spec["per_round"],
        "median_round_s": round(statistics.median(rounds), 3),
        "min_round_s": round(min(rounds), 3),
        "max_round_s": round(max(rounds), 3),
        "peak_rss_mb": round(mem.mb, 1),
        "startup_s": round(result.timings["startup_s"], 2),
        "total_wall_s": round(_process_age_s(), 1),
        "examples_per_client_mean": round(float(np.mean(sizes)), 3),
        "examples_per_client_max": int(np.max(sizes)),
        "round_s": rounds,
        "test_accuracy": result.final.get("test_accuracy"),
        "config": config.to_dict(),
    }


def inner_run(spec: dict[str, object]) -> dict[str, object]:
    """One workload run (W1/W2) with the given overrides, timed and measured."""
    from fedguard import Config, Experiment

    with PeakMemory() as mem:
        config = Config.load(None, overrides(str(spec["workload"]), str(spec["data_dir"]), spec.get("extra", {})))
        result = Experiment(config).run(run_dir=Path(str(spec["out"])) / f"{spec['workload']}-{os.getpid()}")
    log = (result.run_dir / "log.txt").read_text()
    ready = re.search(r"Ray runtime: (\d+) workers, ready in ([0-9.]+) s", log)
    rounds = [r["round_s"] for r in result.rows]
    return {
        "round_s": rounds,
        "median_round_s": statistics.median(rounds),
        "first_round_s": rounds[0],
        "startup_s": result.timings["startup_s"],
        "ray_ready_s": float(ready.group(2)) if ready else None,
        "ray_workers": int(ready.group(1)) if ready else None,
        "total_wall_s": _process_age_s(),
        "peak_rss_mb": mem.mb,
        "accuracy": result.final.get("test_accuracy"),
        "config": config.to_dict(),
    }


def _spawn(kind: str, spec: dict[str, object]) -> dict[str, object]:
    cmd = [sys.executable, str(Path(__file__)), "--inner", kind, json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _user_overrides(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in getattr(args, "set", None) or [])


def ray_w1(args: argparse.Namespace) -> dict[str, object]:
    """W1 on the Ray runtime against the fork pool, interleaved in one benchmark run."""
    extra: dict[str, object] = {"run.rounds": 3} if args.quick else {}
    extra.update(_user_overrides(args))
    repeats = 1 if args.quick else 3
    base = {"workload": "w1", "data_dir": args.data_dir, "out": args.out}
    rays, forks, loads = [], [], []
    for _ in range(repeats):
        loads.append(round(os.getloadavg()[0], 2))
        rays.append(_spawn("run", {**base, "extra": {**extra, "run.runtime": "ray"}}))
        forks.append(_spawn("run", {**base, "extra": extra}))
    ray_med = statistics.median(m for r in rays for m in r["round_s"])
    fork_med = statistics.median(m for f in forks for m in f["round_s"])
    ray_all = [m for r in rays for m in r["round_s"]]
    fork_all = [m for f in forks for m in f["round_s"]]
    return {
        "name": "ray-w1",
        "median_round_s": round(ray_med, 4),
        "fork_median_round_s": round(fork_med, 4),
        "ratio": round(ray_med / fork_med, 3),
        "startup_s": round(statistics.median(r["startup_s"] for r in rays), 2),
        "fork_startup_s": round(statistics.median(f["startup_s"] for f in forks), 2),
        "ray_ready_s": round(statistics.median(r["ray_ready_s"] for r in rays), 2),
        "min_round_s": round(min(ray_all), 4),
        "max_round_s": round(max(ray_all), 4),
        "fork_min_round_s": round(min(fork_all), 4),
        "fork_max_round_s": round(max(fork_all), 4),
        "ray_medians_per_repeat": [round(statistics.median(r["round_s"]), 4) for r in rays],
        "fork_medians_per_repeat": [round(statistics.median(f["round_s"]), 4) for f in forks],
        "ray_workers": rays[0]["ray_workers"],
        "total_wall_s": round(statistics.median(r["total_wall_s"] for r in rays), 2),
        "fork_total_wall_s": round(statistics.median(f["total_wall_s"] for f in forks), 2),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rays), 1),
        "fork_peak_rss_mb": round(max(f["peak_rss_mb"] for f in forks), 1),
        "accuracy": rays[0]["accuracy"],
        "fork_accuracy": forks[0]["accuracy"],
        "load_before_each_repeat": loads,
        "repeats": repeats,
        "config": rays[0]["config"],
    }


def population(args: argparse.Namespace) -> dict[str, object]:
    """Populations of 10,000 to 100,000 clients (1,000 or 100 per round): seconds per round and peak memory."""
    rows_spec = [(10_000, 1_000), (100_000, 1_000)] if args.quick else POPULATION_ROWS
    extra: dict[str, object] = {"run.rounds": 2} if args.quick else {}
    extra.update(_user_overrides(args))
    rows = []
    for clients, per_round in rows_spec:
        spec = {"clients": clients, "per_round": per_round, "data_dir": args.data_dir, "out": args.out, "extra": extra}
        rows.append(_spawn("population", spec))
    top = max(rows, key=lambda r: (r["clients"], r["per_round"]))
    return {
        "name": "population",
        "rows": [{k: r[k] for k in ("clients", "per_round", "median_round_s", "peak_rss_mb", "min_round_s",
                                    "max_round_s", "startup_s", "examples_per_client_mean",
                                    "examples_per_client_max", "test_accuracy")} for r in rows],
        "peak_rss_mb": top["peak_rss_mb"],
        "median_round_s": top["median_round_s"],
        "dataset": "mnist+fashion-mnist training sets (120,000 distinct images, 20 classes)",
        "config": top["config"],
    }


def gpu(args: argparse.Namespace) -> dict[str, object]:
    """W2 (CNN-M, 10 clients) on the GPU against the CPU, or why it was skipped."""
    import torch

    if not torch.cuda.is_available():
        return {
            "name": "gpu",
            "skipped": True,
            "reason": f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                      f"CUDA build: {torch.version.cuda or 'none'}): no GPU to measure on this machine",
        }
    extra: dict[str, object] = {"run.rounds": 1} if args.quick else {}
    extra.update(_user_overrides(args))
    base = {"workload": "w2", "data_dir": args.data_dir, "out": args.out}
    cuda = _spawn("run", {**base, "extra": {**extra, "run.device": "cuda", "run.workers": "1"}})
    cpu = _spawn("run", {**base, "extra": extra})
    return {
        "name": "gpu",
        "skipped": False,
        "device": torch.cuda.get_device_name(0),
        "median_round_s": round(cuda["median_round_s"], 4),
        "cpu_median_round_s": round(cpu["median_round_s"], 4),
        "speedup": round(cpu["median_round_s"] / cuda["median_round_s"], 2),
        "accuracy": cuda["accuracy"],
        "cpu_accuracy": cpu["accuracy"],
        "round_s": cuda["round_s"],
        "cpu_round_s": cpu["round_s"],
        "config": cuda["config"],
    }


BENCHMARKS = {"ray-w1": ray_w1, "population": population, "gpu": gpu}


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--inner":
    kind, spec_json = sys.argv[2:4]
    spec = json.loads(spec_json)
    t0 = time.time()
    figures = inner_population(spec) if kind == "population" else inner_run(spec)
    print(json.dumps(figures, default=str))
