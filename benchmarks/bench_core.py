"""Foundation benchmarks: W1/W2 engine vs the multi-process limit and the bare loop, and the MNIST accuracy targets.

Each measured side runs in a fresh Python process (``python benchmarks/bench_core.py
--inner SIDE WORKLOAD``) so that start-up, peak memory and wall time are its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKLOADS = {
    # W1 cross-device: 1,000 clients, label-Dirichlet 0.5 (seed 0), 50 per round, CNN-S
    "w1": {
        "data.dataset": "mnist",
        "data.num_clients": 1000,
        "data.partition": "dirichlet",
        "data.alpha": 0.5,
        "server.clients_per_round": 50,
        "train.epochs": 1,
        "train.batch_size": 20,
        "train.lr": 0.05,
        "train.momentum": 0.0,
        "task.model": "cnn-s",
        "server.weighting": "examples",
        "run.rounds": 20,
    },
    # W2 cross-silo: 10 clients, Dirichlet 0.5, all per round, CNN-M with momentum
    "w2": {
        "data.dataset": "mnist",
        "data.num_clients": 10,
        "data.partition": "dirichlet",
        "data.alpha": 0.5,
        "server.clients_per_round": 0,
        "server.fraction": 1.0,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.lr": 0.05,
        "train.momentum": 0.9,
        "task.model": "cnn-m",
        "run.rounds": 3,
    },
    "mnist-iid": {
        "data.dataset": "mnist",
        "data.num_clients": 10,
        "data.partition": "iid",
        "server.fraction": 1.0,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.lr": 0.05,
        "train.momentum": 0.9,
        "task.model": "cnn-m",
        "run.rounds": 5,
        "run.eval_every": 1,
    },
    "mnist-dirichlet": {
        "data.dataset": "mnist",
        "data.num_clients": 100,
        "data.partition": "dirichlet",
        "data.alpha": 0.5,
        "server.clients_per_round": 10,
        "train.epochs": 1,
        "train.batch_size": 20,
        "train.lr": 0.05,
        "train.momentum": 0.0,
        "task.model": "cnn-s",
        "run.rounds": 50,
        "run.eval_every": 5,
        # server momentum (FedAvgM, Hsu et al. 2019); plain FedAvg: --set server.optimizer=fedavg
        "server.optimizer": "fedavgm",
        "server.momentum": 0.7,
    },
}
TARGETS = {"mnist-iid": 0.99, "mnist-dirichlet": 0.98}
#: settings a benchmark chooses on a validation split of the training data (``fedguard sweep``'s rule),
#: never on test: each choice trains with data.validation_fraction held out, the best validation
#: accuracy after the last round wins, and the line reports the chosen run's test accuracy (read once)
SELECTED_ON_VALIDATION: dict[str, dict[str, list[object]]] = {
    "mnist-dirichlet": {"server.optimizer": ["fedavg", "fedavgm"]},
}
VALIDATION_FRACTION = 0.1


def _process_age_s() -> float:
    """Seconds since this process started (from /proc, so interpreter start-up counts)."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


class PeakMemory:
    """Peak proportional set size (PSS) of this process and its children, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self, pid: int) -> list[int]:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return [pid]
        return [pid] + [p for k in kids for p in self._tree(int(k))]

    def _pss_kb(self, pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, sum(self._pss_kb(p) for p in self._tree(os.getpid())))
            self._stop.wait(0.2)

    @property
    def mb(self) -> float:
        return self.peak_kb / 1024


def overrides(name: str, data_dir: str, extra: dict[str, object] | None = None) -> list[str]:
    cfg = {**WORKLOADS[name], "data.data_dir": data_dir, "run.progress": False, "run.report": False, **(extra or {})}
    cfg.setdefault("run.eval_every", 0)
    return [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in cfg.items()]


def inner_engine(name: str, data_dir: str, out: str, extra: dict[str, object]) -> dict[str, object]:
    from fedguard import Config, Experiment

    with PeakMemory() as mem:
        config = Config.load(None, overrides(name, data_dir, extra))
        result = Experiment(config).run(run_dir=Path(out) / f"{name}-engine-{os.getpid()}")
    rounds = [r["round_s"] for r in result.rows]
    return {
        "round_s": rounds,
        "median_round_s": statistics.median(rounds),
        "first_round_s": rounds[0],
        "startup_s": result.timings["startup_s"],
        "total_wall_s": _process_age_s(),
        "cpu_s": _cpu_s(),
        "peak_rss_mb": mem.mb,
        "accuracy": result.final["test_accuracy"],
        "final": result.final,
        "rows": result.rows,
        "config": config.to_dict(),
    }


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and its reaped children (worker processes)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def inner_bare(name: str, data_dir: str, extra: dict[str, object], limit: bool = False) -> dict[str, object]:
    """The 1-process bare loop, or (``limit``) the same computation across one forked 1-thread process per core."""
    import torch
    from bare_loop import accuracy, run_bare, run_limit, usable_cores

    from fedguard import Config, Experiment

    bare_threads = int(extra.pop(BARE_THREADS, 0))
    if bare_threads and not limit:
        torch.set_num_threads(bare_threads)

    with PeakMemory() as mem:
        exp = Experiment(Config.load(None, overrides(name, data_dir, extra)))
        setup = exp.assemble()
        schedule = [setup.sampler.sample(r) for r in range(1, exp.config.run.rounds + 1)]
        t = exp.config.train
        torch.manual_seed(exp.config.run.seed)
        loop = run_limit if limit else run_bare
        model, seconds = loop(
            setup.model, setup.train.x, setup.train.y, setup.parts, schedule, t.batch_size, t.lr, t.momentum, t.epochs
        )
        acc = accuracy(model, setup.test.x, setup.test.y)
    return {
        "round_s": seconds,
        "median_round_s": statistics.median(seconds),
        "total_wall_s": _process_age_s(),
        "cpu_s": _cpu_s(),
        "peak_rss_mb": mem.mb,
        "accuracy": acc,
        "round_examples": [int(sum(len(setup.parts[c]) for c in sampled)) for sampled in schedule],
        **({"procs": usable_cores()} if limit else {}),
    }


BARE_THREADS = "bare.threads"  # not a config key: the bare loop's torch threads (0: all cores)
ONE_THREAD = {"run.workers": "1", "run.threads": 1, BARE_THREADS: 1}


REPEATS = "bench.repeats"  # not a config key: how many interleaved repeats a speed benchmark runs


def _sets(args: argparse.Namespace) -> dict[str, object]:
    """The ``--set SECTION.KEY=VALUE`` overrides as a dict (values as given)."""
    return dict(item.split("=", 1) for item in getattr(args, "set", None) or [])


def _spawn(side: str, name: str, args: argparse.Namespace, extra: dict[str, object]) -> dict[str, object]:
    extra = {**extra, **_sets(args)}
    extra.pop(REPEATS, None)
    if side == "engine":
        extra = {k: v for k, v in extra.items() if k != BARE_THREADS}
    cmd = [sys.executable, str(Path(__file__)), "--inner", side, name, args.data_dir, args.out, json.dumps(extra)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{side} {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _repeats(args: argparse.Namespace) -> int:
    return int(_sets(args).get(REPEATS, 1 if args.quick else 3))


def first_round_excess(round_s: list[float], examples: list[int]) -> float:
    """The first round's seconds per example over the median round's (1.0: no first-round penalty).

    Rounds of W1 sample different clients, hence train different numbers of examples (its first
    round trains 6.7% more than the median one): per example, the comparison is like for like.
    """
    per_example = [s / n for s, n in zip(round_s, examples, strict=True)]
    return per_example[0] / statistics.median(per_example)


def _spread(runs: list[dict[str, object]], prefix: str, examples: list[int]) -> dict[str, object]:
    """Median, min and max over repeats of each repeat's median round; first round; CPU; per-round seconds."""
    medians = [statistics.median(r["round_s"]) for r in runs]
    return {
        f"{prefix}median_round_s": round(statistics.median(medians), 4),
        f"{prefix}min_round_s": round(min(medians), 4),
        f"{prefix}max_round_s": round(max(medians), 4),
        f"{prefix}first_round_s": round(statistics.median(r["round_s"][0] for r in runs), 4),
        f"{prefix}first_round_excess": round(
            statistics.median(first_round_excess(r["round_s"], examples) for r in runs), 3
        ),
        f"{prefix}total_wall_s": round(statistics.median(r["total_wall_s"] for r in runs), 2),
        f"{prefix}cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 2),
        f"{prefix}peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        f"{prefix}accuracy": runs[0]["accuracy"],
        f"{prefix}round_s": [[round(x, 4) for x in r["round_s"]] for r in runs],
    }


def speed_benchmark(name: str, args: argparse.Namespace, one_thread: bool = False) -> dict[str, object]:
    """Engine, the machine's limit and the bare loop on the same workload, each in its own
    process, alternated ``bench.repeats`` times (default 3) within one run.

    By default each side uses the whole machine the way it would in practice: the engine runs
    one client per core at one thread each; the *limit* is the bare computation split across one
    forked 1-thread process per usable core (the best a hand-written loop can do here); the bare
    loop runs clients one after another with torch's threads on all cores. ``one_thread`` pins
    the engine (in-process, ``run.workers=1``) and the bare loop to one thread, which isolates the
    engine's own overhead from the parallel speed-up (no limit side: at one thread it is the bare loop).

    A side's speed is the median over repeats of each repeat's median round (min and max over
    repeats beside it); ``ratio`` is engine over bare loop, ``limit_ratio`` engine over limit;
    ``first_round_excess`` the first round's seconds per example over the median round's.
    """
    extra: dict[str, object] = {"run.rounds": 3 if name == "w1" else 1} if args.quick else {}
    if one_thread:
        extra.update(ONE_THREAD)
    sides = ("engine", "bare") if one_thread else ("engine", "limit", "bare")
    runs: dict[str, list[dict[str, object]]] = {side: [] for side in sides}
    for _ in range(_repeats(args)):
        for side in sides:
            runs[side].append(_spawn(side, name, args, extra))
    engines, examples = runs["engine"], runs["bare"][0]["round_examples"]
    figures: dict[str, object] = {"name": f"{name}-1thread" if one_thread else name, **_spread(engines, "", examples)}
    figures["startup_s"] = round(statistics.median(e["startup_s"] for e in engines), 3)
    figures.update(_spread(runs["bare"], "bare_", examples))
    figures["ratio"] = round(figures["median_round_s"] / figures["bare_median_round_s"], 3)
    if not one_thread:
        figures.update(_spread(runs["limit"], "limit_", examples))
        figures["limit_ratio"] = round(figures["median_round_s"] / figures["limit_median_round_s"], 3)
        figures["limit_procs"] = runs["limit"][0]["procs"]
    figures["round_examples"] = examples
    figures["repeats"] = len(engines)
    figures["config"] = engines[0]["config"]
    return figures


def accuracy_benchmark(name: str, args: argparse.Namespace) -> dict[str, object]:
    """Rounds until the target accuracy, final accuracy and wall time."""
    extra: dict[str, object] = {"run.eval_every": 1}
    if args.quick:
        extra.update({"run.rounds": 2, "data.max_train_examples": 6000})
    if name in SELECTED_ON_VALIDATION:
        return validated_accuracy_benchmark(name, args, extra)
    result = _spawn("engine", name, args, extra)
    target = TARGETS[name]
    hits = [r["round"] for r in result["rows"] if (r.get("test_accuracy") or 0) >= target]
    return {
        "name": name,
        "accuracy": result["accuracy"],
        "rounds": len(result["rows"]),
        "target": target,
        "rounds_to_target": hits[0] if hits else None,
        "accuracy_per_round": [r.get("test_accuracy") for r in result["rows"]],
        "wall_s": round(result["total_wall_s"], 1),
        "validation_selected": False,
        "config": result["config"],
    }


def validated_accuracy_benchmark(name: str, args: argparse.Namespace, extra: dict[str, object]) -> dict[str, object]:
    """Each choice of :data:`SELECTED_ON_VALIDATION` trained with a validation split held out; the
    best final validation accuracy is chosen and its test accuracy (the test set read once) reported."""
    import itertools

    axes = SELECTED_ON_VALIDATION[name]
    runs = []
    for combo in itertools.product(*axes.values()):
        choice = dict(zip(axes, combo, strict=True))
        result = _spawn("engine", name, args, {**extra, "data.validation_fraction": VALIDATION_FRACTION, **choice})
        runs.append((choice, result))
    chosen, best = max(runs, key=lambda run: run[1]["final"]["val_accuracy"])
    target = TARGETS[name]
    val_rounds = [r.get("val_accuracy") for r in best["rows"]]
    hits = [r["round"] for r in best["rows"] if (r.get("val_accuracy") or 0) >= target]
    return {
        "name": name,
        "accuracy": best["accuracy"],
        "target": target,
        "target_met": best["accuracy"] >= target,
        "validation_selected": True,
        "chosen": chosen,
        "validation_fraction": VALIDATION_FRACTION,
        "candidates": [{**choice, "val_accuracy": r["final"]["val_accuracy"], "wall_s": round(r["total_wall_s"], 1)}
                       for choice, r in runs],
        "rounds": len(best["rows"]),
        "val_accuracy_per_round": val_rounds,
        "rounds_to_target_on_validation": hits[0] if hits else None,
        "wall_s": round(best["total_wall_s"], 1),
        "config": best["config"],
    }


def step_benchmark(name: str, args: argparse.Namespace) -> dict[str, object]:
    """The engine's local step against the bare loop's, alternated in one process (see step_overhead.py):
    400 pairs (40 with ``--quick``), ``--set`` overrides applied to the workload."""
    from step_overhead import measure

    extra = _sets(args)
    pairs = int(extra.pop("bench.pairs", 40 if args.quick else 400))
    return {"name": f"{name}-step", **measure(name, args.data_dir, 0, pairs, extra)}


BENCHMARKS = {
    "w1": lambda args: speed_benchmark("w1", args),
    "w2": lambda args: speed_benchmark("w2", args),
    "w1-1thread": lambda args: speed_benchmark("w1", args, one_thread=True),
    "w2-1thread": lambda args: speed_benchmark("w2", args, one_thread=True),
    "w2-step": lambda args: step_benchmark("w2", args),
    "mnist-iid": lambda args: accuracy_benchmark("mnist-iid", args),
    "mnist-dirichlet": lambda args: accuracy_benchmark("mnist-dirichlet", args),
}
BENCHMARKS["w1"].__doc__ = "W1 cross-device speed: engine vs multi-process limit and bare loop (CNN-S, 1,000 clients)"
BENCHMARKS["w2"].__doc__ = "W2 cross-silo speed: engine vs multi-process limit and bare loop (CNN-M, 10 clients)"
BENCHMARKS["w1-1thread"].__doc__ = "W1 at one thread on both sides (engine in-process): the engine's own overhead"
BENCHMARKS["w2-1thread"].__doc__ = "W2 at one thread on both sides (engine in-process): the engine's own overhead"
BENCHMARKS["w2-step"].__doc__ = "W2's local step, engine vs bare loop, alternated in one 1-thread process (CPU time)"
BENCHMARKS["mnist-iid"].__doc__ = "CNN-M, 10 IID clients: accuracy within 5 rounds (target 99.0%)"
BENCHMARKS[
    "mnist-dirichlet"
].__doc__ = "CNN-S, 100 Dirichlet-0.5 clients, 10/round: accuracy in 50 rounds (target 98.0%)"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--inner":
    side, name, data_dir, out, extra_json = sys.argv[2:7]
    sys.path.insert(0, str(HERE))
    extra = json.loads(extra_json)
    if side == "engine":
        figures = inner_engine(name, data_dir, out, extra)
    else:
        figures = inner_bare(name, data_dir, extra, limit=side == "limit")
    print(json.dumps(figures, default=str))
