"""Byzantine robustness benchmarks: ``robustness`` (every attack against every defense), ``robustness-tune``
(the defenses' parameters, chosen on a validation split), ``robustness-strong`` (sign flipping, ALIE, IPM and
min-max at strengths that overpower the mean, against every defense) and ``robust-cost`` (each rule's seconds
per round at 50 and 1,000 clients).

Workload (issue 16): MNIST, CNN-S, 50 clients by label-Dirichlet 0.5, all of them every round, 20 rounds, 10
Byzantine (20%); the backdoor rows use 5 (10%). Every cell trains on the same subset of the MNIST training set
(the first ``TRAIN_EXAMPLES`` = 10,000 images), each client taking 5 local steps of 16 examples per round
(4,000 examples a round in all); the validation split (images 55,000-59,999) and FLTrust's root dataset
(images 50,000-50,099) are held out of it, and the test set is only read for the final figures.

Sizing: the whole matrix within an hour on this two-core machine when idle, aiming at 45 minutes since its
speed varies 1.75x between days. Local training is the cost: a CNN-S step takes 6.7 ms of CPU at batch 8,
10.1 ms at 16 and 18.9 ms at 32 (one thread: 0.84, 0.63, 0.59 ms an example), so a client's round is 67 ms
as 10 steps of 8 and 50 ms as 5 steps of 16, the same 80 examples. A cell is 20 rounds of 50 clients
training, or 40 where the Byzantine clients' update ignores training (Gaussian and the five omniscient
attacks: they train on one example, see ``HostileClient.local_data``), plus about 4 CPU-s of set-up and
evaluation. The matrix's 9 x 12 + 5 = 113 cells: 41 with every client training (no attack, label flip, sign
flip, backdoor) at 20 x 50 x 0.050 + 4 = 54 CPU-s and 72 at 20 x 40 x 0.050 + 4 = 44 CPU-s, 5,382 CPU-s in
all: 45 minutes on two workers. The previous workload (10 steps of 8, and every Byzantine client training)
was 113 x 70 = 7,910 CPU-s, 66 minutes (the first robustness-tune line measured 61-72 CPU-s a cell).
``robustness-tune``: 22 cells (16 with every client training, 6 with 40), then 20 backdoor cells: 1,722 CPU-s
before the 9 server-momentum cells were added, 2,208 CPU-s with them, about 18 minutes. A full-size clean cell
measured 59.7 CPU-s under heavy load (wall 12x its CPU): +-10%.

``robustness-strong``: the papers' default strengths were built to slip past robust rules, not to overpower a
mean (the matrix's FedAvg keeps 93.9-96.1% under sign flipping, ALIE, IPM and min-max), so this benchmark runs
the four at one strength fixed by formula from n and f before any defense result, ``s = 2 (n - f) / f`` = 8 (see
``strong_attacks``): 4 x 12 = 48 cells plus clean FedAvg for reference, 12 sign-flip cells and the clean one
with every client training (54 CPU-s) and 36 with 40 (44 CPU-s): 13 x 54 + 36 x 44 = 2,286 CPU-s, about 19
minutes on two workers. It reads the tune line as the matrix does: run ``robustness-tune`` first. A check after
the formula was committed (FedAvg only, 2,000 validation images, 8 rounds): ALIE at z = 8 9.9-18.4%, min-max at
distance_scale 8 9.8%; sign flipping and IPM at s mirror the mean by construction (tests/test_attack_math.py).

Training hyper-parameters were chosen on the validation split with FedAvg and no attack (20 rounds):
10,000 images and 10 steps of 8 with server momentum 0.9 reached 97.4% (the tune's clean cell; 96.4% in a
first probe); without server momentum 95.7%; local lr 0.1 at batch 8 93.4% at round 15 (stopped); 20,000
images and 12 steps 95.7%; a cosine schedule 95.0%; 4,000 images, one epoch of batch 8, 95.6% at 25 rounds.
5 steps of 16 at lr 0.1 (batch 8's 0.05 scaled linearly, Goyal et al. 2017), the present workload: 96.9%
(a probe on 2026-12-03; 94.4% and 95.4% on the first 1,000 validation images at rounds 10 and 15), within the
1-point spread of the two 10-step runs above, for three quarters of their CPU.

Server momentum of the selection rules. The committed matrix line (every rule at the workload's server momentum
0.9) has Krum at 14.9% without an attack. Krum's formula matches Blanchard et al. 2017 (score: the sum of squared
distances to the n - f - 2 nearest updates; the one lowest-scoring update, unweighted, f = 10 stated), so the cause
is the workload: Krum's aggregate is one client's update, and on label-Dirichlet 0.5 clients it follows the
label mix of whichever client Krum picks (in the momentum-0 probe below it picked client 44, no zeros and a
quarter sevens, four rounds running, later clients 0 and 3, 53-66% sevens); server momentum 0.9 sums about ten
rounds of those picks.
A validation probe (2026-12-03, first 2,000 validation images, the matrix's workload), accuracy at rounds 2, 4, ...:
Krum at momentum 0.9 15.9, 16.5, 16.7, 54.2, 34.9% (stopped at 10); at momentum 0 14.6, 51.1, 42.9, 54.2, 52.5,
70.3, 71.7, 78.0, 83.2, 86.9% (round 20). Multi-Krum, 40 updates averaged, does not have the problem (96.2%
clean in the committed line). So ``robustness-tune`` chooses each selection rule's (krum, multi-krum, bulyan)
server momentum from ``SERVER_MOMENTA`` = {0, 0.5, 0.9} by clean validation accuracy (ties to the larger), as
FedAvg's 0.9 was chosen, and the matrix reads the choice back; the rule was fixed before any test figure with it.
Tune lines without the choice leave every rule at 0.9 (the committed matrix line).

A cell whose training diverges (an attack drives the model to NaN or infinity; the first robustness-strong run,
2026-12-03, ended without a line when sign flipping at s = 8 did so to FedAvg in round 4) stops there, as every
fedguard run does, keeping its last finite model. The cell is recorded, not the benchmark ended: the tables show
that model's accuracy, the line lists the cell under ``diverged`` with the round and cause, and the checks count
it as a defense that did not hold (score 0: the attack succeeded, never a defense at 95%).

Cells run in forked worker processes, one torch thread each, clients in-process: start-up is paid once, the
data is shared by fork, and results come back as JSON files (no pickle). Each cell's wall and CPU seconds are
recorded; on a shared machine the CPU seconds are the fairer figure.

Run: ``python benchmarks/run.py robustness`` (or ``robustness-tune``, ``robustness-strong``; ``--quick`` shrinks
everything for CI).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedguard import Config, Experiment
from fedguard.attacks.data import Trigger, triggered_test_set
from fedguard.attacks.vectors import mirror_multiplier
from fedguard.data.arrays import ArrayDataset
from fedguard.data.registry import load_dataset
from fedguard.health import RunFailed
from fedguard.robust import rules
from fedguard.robust.randomness import secure_generator
from fedguard.robust.root import save_root_data
from fedguard.runtime.forked_job import ForkedJob
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import cnn_s

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "robust"

TRAIN_EXAMPLES = 10000
ROUNDS = 20
BYZANTINE = 10
BACKDOOR_ATTACKERS = 5
VALIDATION = (55000, 60000)
ROOT = (50000, 50100)

WORKLOAD = {
    "data.dataset": "mnist",
    "data.num_clients": 50,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "task.model": "cnn-s",
    "server.fraction": 1.0,
    "train.epochs": 1,
    "train.max_steps": 5,
    "train.batch_size": 16,
    "train.lr": 0.1,
    "train.momentum": 0.9,
    "server.optimizer": "fedavgm",
    "server.momentum": 0.9,
    "server.lr": 1.0,
    "run.rounds": ROUNDS,
    "run.eval_every": 0,
    "run.workers": "1",
    "run.threads": 1,
    "run.client_threads": 1,
    "run.progress": False,
    "run.report": False,
}

#: attacks with the papers' parameters (the [attack] defaults), 10 Byzantine clients from round 1
ATTACKS: dict[str, dict[str, Any]] = {
    "none": {},
    "label-flip": {"attack.name": "label-flip"},
    "sign-flip": {"attack.name": "sign-flip"},
    "gaussian": {"attack.name": "gaussian"},
    "alie": {"attack.name": "alie"},
    "ipm": {"attack.name": "ipm"},
    "min-max": {"attack.name": "min-max"},
    "min-sum": {"attack.name": "min-sum"},
    "mimic": {"attack.name": "mimic"},
}

#: defense parameters chosen by ``robustness-tune`` on the validation split (results/robust/robustness-tune.json)
TUNED: dict[str, Any] = {"tau": 1.0, "norm_bound": 1.0, "noise_std": 0.0}

#: rules whose aggregate is one or a few selected updates rather than an average of all (Blanchard et al. 2017;
#: El Mhamdi et al. 2018): each gets its own server momentum from ``SERVER_MOMENTA``, chosen by robustness-tune
SELECTION_RULES = ("krum", "multi-krum", "bulyan")
SERVER_MOMENTA = (0.0, 0.5, 0.9)


def _momentum(tuned: dict[str, Any], rule: str) -> dict[str, Any]:
    """``server.momentum`` for ``rule`` when the tune line chose one (lines before it: the workload's 0.9)."""
    chosen = tuned.get("server_momentum", {}).get(rule)
    return {} if chosen is None else {"server.momentum": chosen}


def defenses(tuned: dict[str, Any], root_file: str) -> dict[str, dict[str, Any]]:
    """Every defense of the matrix by its configuration name; f is stated (the true count, 10)."""
    f = {"robust.byzantine": BYZANTINE}
    return {
        "fedavg": {},
        "median": {"robust.rule": "median"},
        "trimmed-mean": {"robust.rule": "trimmed-mean", **f},
        **{rule: {"robust.rule": rule, **f, **_momentum(tuned, rule)} for rule in SELECTION_RULES},
        "geometric-median": {"robust.rule": "geometric-median"},
        "centered-clipping": {"robust.rule": "centered-clipping", "robust.tau": tuned["tau"]},
        "fltrust": {"robust.rule": "fltrust", "robust.root_data": root_file},
        "norm-bound": {"robust.rule": "norm-bound", "robust.norm_bound": tuned["norm_bound"]},
        "nnm+trimmed-mean": {"robust.rule": "trimmed-mean", "robust.pre": "nnm", **f},
        "bucketing+centered-clipping": {"robust.rule": "centered-clipping", "robust.pre": "bucketing",
                                        "robust.tau": tuned["tau"]},
    }


def backdoor_defenses(tuned: dict[str, Any], root_file: str) -> dict[str, dict[str, Any]]:
    """The backdoor rows: ``BACKDOOR_DEFENSES``, norm bounding with weak DP among them; f = 5 attackers."""
    out = {k: {**v, **({"robust.byzantine": BACKDOOR_ATTACKERS} if "robust.byzantine" in v else {})}
           for k, v in defenses(tuned, root_file).items()}
    bound = tuned.get("dp_norm_bound", tuned["norm_bound"])  # lines before it had one bound for both
    out["norm-bound+dp"] = {"robust.rule": "norm-bound", "robust.norm_bound": bound,
                            "robust.noise_std": tuned["noise_std"]}
    return {k: out[k] for k in BACKDOOR_DEFENSES}


#: the backdoor rows (each a full run): the baseline, the paper's defense with and without noise, and two others
BACKDOOR_DEFENSES = ("fedavg", "norm-bound", "norm-bound+dp", "trimmed-mean", "fltrust")
BACKDOOR = {"attack.name": "scaling", "attack.count": BACKDOOR_ATTACKERS, "attack.target_class": 0}


@dataclass
class Data:
    """The splits every cell shares (loaded once, shared with the workers by fork)."""

    train: ArrayDataset
    monitor: ArrayDataset  # what each run evaluates on its own (cheap); the figures use ``final``
    final: ArrayDataset
    root_file: str
    triggered: ArrayDataset


@dataclass
class Cell:
    """One run of the matrix."""

    name: str
    overrides: dict[str, Any]
    attack: str
    defense: str
    backdoor: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def load_data(args: argparse.Namespace, out: Path, for_test: bool) -> Data:
    """Training subset, validation (or test) split, root data file and the triggered evaluation set."""
    train, test = load_dataset("mnist", args.data_dir)
    n = 1500 if args.quick else TRAIN_EXAMPLES
    subset = train.subset(np.arange(n), "train")
    validation = train.subset(np.arange(*VALIDATION), "validation")
    root_file = str(save_root_data(train.subset(np.arange(*ROOT), "root"), out / "fltrust-root.safetensors"))
    final = test if for_test else validation
    if args.quick:
        final = final.subset(np.arange(1000), final.name)
    trigger = Trigger(size=3)
    return Data(subset, final.subset(np.arange(1000), "monitor"), final, root_file,
                triggered_test_set(final, trigger, BACKDOOR["attack.target_class"]))


def _overrides(args: argparse.Namespace, cell: Cell) -> list[str]:
    merged: dict[str, Any] = {**WORKLOAD, **cell.overrides}
    if args.quick:
        merged.update({"data.num_clients": 12, "run.rounds": 2})
    return [f"{k}={v}" for k, v in merged.items()]


def run_cell(args: argparse.Namespace, cell: Cell, data: Data, out: Path) -> dict[str, Any]:
    """Train one cell and measure it: accuracy on ``data.final``, ASR for backdoor cells, seconds."""
    config = Config.load(None, _overrides(args, cell))
    c0, t0 = time.process_time(), time.perf_counter()
    diverged = None
    try:
        result = Experiment(config, train=data.train, test=data.monitor, log=lambda s: None).run(
            run_dir=out / cell.name)
    except RunFailed as exc:  # the attack made training diverge: the run kept its last finite model
        if exc.result is None:
            raise
        result, diverged = exc.result, str(exc).split(". ")[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    task = ClassificationTask(lambda: cnn_s(1, 28, 10))
    model = cnn_s(1, 28, 10)
    row: dict[str, Any] = {
        "name": cell.name, "attack": cell.attack, "defense": cell.defense, "backdoor": cell.backdoor,
        "accuracy": task.evaluate(model, result.params, data.final)["accuracy"],
        "diverged": diverged,
        "aborted_rounds": sum(1 for r in result.rows if r.get("aborted")),
        "aggregation_s": _median([r.get("client_aggregation_s") for r in result.rows]),
        # robust chains only: the median over rounds of each round's median client update norm
        "update_norm_median": _median([r.get("client_update_norm_median") for r in result.rows]),
        "median_round_s": result.final.get("median_round_s"),
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
    }
    if cell.backdoor:
        row["asr"] = task.evaluate(model, result.params, data.triggered)["accuracy"]
    return row


def _median(values: list[Any]) -> float | None:
    clean = [float(v) for v in values if isinstance(v, (int, float))]
    return round(statistics.median(clean), 5) if clean else None


def _worker(args: argparse.Namespace, cells: list[Cell], data: Data, out: Path) -> None:
    """Claim cells one at a time (an exclusive lock file each) and leave each result as JSON."""
    torch.set_num_threads(1)
    for cell in cells:
        try:
            fd = os.open(out / f"{cell.name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        row = run_cell(args, cell, data, out)
        (out / f"{cell.name}.json").write_text(json.dumps(row))


def run_cells(args: argparse.Namespace, cells: list[Cell], data: Data, out: Path) -> list[dict[str, Any]]:
    """Every cell, on ``args.workers`` forked processes; rows in the order of ``cells``."""
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, int(getattr(args, "workers", 0) or os.cpu_count() or 1))
    jobs = [ForkedJob(lambda: _worker(args, cells, data, out), out / f"worker-{i}-error.txt", 1, f"worker {i}")
            for i in range(workers)]
    for job in jobs:
        job.start()
    try:
        for job in jobs:
            job.wait()
    finally:
        for job in jobs:
            job.cancel()
    return [json.loads((out / f"{c.name}.json").read_text()) for c in cells]


def _tuned() -> dict[str, Any]:
    path = RESULTS / "robustness-tune.json"
    if path.exists():
        return {**TUNED, **json.loads(path.read_text().strip().splitlines()[-1]).get("chosen", {})}
    return dict(TUNED)


QUICK_ATTACKS = ("none", "sign-flip", "alie")
QUICK_DEFENSES = ("fedavg", "krum", "fltrust", "nnm+trimmed-mean")


def _matrix_cells(data: Data, tuned: dict[str, Any], quick: bool) -> list[Cell]:
    """The matrix's cells, then the backdoor rows (``quick``: a few of each, 12 clients, f = 2)."""
    f_matrix, f_backdoor = (2, 1) if quick else (BYZANTINE, BACKDOOR_ATTACKERS)
    cells = []
    for attack, a in ATTACKS.items():
        for defense, d in defenses(tuned, data.root_file).items():
            if quick and (attack not in QUICK_ATTACKS or defense not in QUICK_DEFENSES):
                continue
            over = {**a, **({"attack.count": f_matrix} if a else {}), **d}
            if "robust.byzantine" in over:
                over["robust.byzantine"] = f_matrix
            cells.append(Cell(f"{attack}__{defense}", over, attack, defense))
    for defense, d in backdoor_defenses(tuned, data.root_file).items():
        if quick and defense not in ("fedavg", "norm-bound+dp"):
            continue
        over = {**BACKDOOR, "attack.count": f_backdoor, **d}
        if "robust.byzantine" in over:
            over["robust.byzantine"] = f_backdoor
        cells.append(Cell(f"backdoor__{defense}", over, "scaling", defense, backdoor=True))
    return cells


def _heatmap(
    table: dict[str, dict[str, float]], path: Path, title: str, diverged: dict[str, str] | None = None
) -> None:
    """``table`` as a heatmap; cells named in ``diverged`` (``ATTACK__DEFENSE`` endings) are marked "(div.)"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks, defense_names = list(table), list(next(iter(table.values())))
    values = np.array([[table[a][d] * 100 for d in defense_names] for a in attacks])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(defense_names), 1.0 + 0.5 * len(attacks)))
    im = ax.imshow(values, cmap="RdYlGn", vmin=10, vmax=100, aspect="auto")
    ax.set_xticks(range(len(defense_names)), defense_names, rotation=45, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i in range(len(attacks)):
        for j in range(len(defense_names)):
            stopped = any(name.endswith(f"{attacks[i]}__{defense_names[j]}") for name in diverged or {})
            ax.text(j, i, f"{values[i, j]:.1f}" + ("\n(div.)" if stopped else ""), ha="center", va="center",
                    fontsize=7)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="test accuracy (%)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``accuracy[attack][defense]`` from the cells' rows: the accuracy of the model each run delivered (for a
    run that diverged, its last finite model's)."""
    accuracy: dict[str, dict[str, float]] = {}
    for r in rows:
        accuracy.setdefault(r["attack"], {})[r["defense"]] = round(r["accuracy"], 4)
    return accuracy


def _standing_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """The table the checks read: a cell whose training diverged scores 0 (the attack stopped training, so the
    defense did not hold, whatever its last finite model scored), the others their accuracy."""
    table = _accuracy_table(rows)
    for r in rows:
        if r.get("diverged"):
            table[r["attack"]][r["defense"]] = 0.0
    return table


def _diverged(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The cells whose training diverged, each with how (round and cause)."""
    return {r["name"]: r["diverged"] for r in rows if r.get("diverged")}


def _cell_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each cell's accuracy and cost, and the CPU seconds of all of them."""
    return {
        "cells": {r["name"]: {k: r.get(k) for k in ("accuracy", "wall_s", "cpu_s", "aborted_rounds", "median_round_s",
                                                     "diverged")}
                  for r in rows},
        "diverged": _diverged(rows),
        "cells_cpu_s": round(sum(r["cpu_s"] for r in rows), 1),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The result line's figures from the cells' rows."""
    matrix = [r for r in rows if not r["backdoor"]]
    backdoor = [r for r in rows if r["backdoor"]]
    accuracy, standing = _accuracy_table(matrix), _standing_table(matrix)
    clean = standing.get("none", {})
    best = {a: max(row.items(), key=lambda kv: kv[1]) for a, row in standing.items()}
    strong = ("alie", "ipm", "min-max", "sign-flip")
    fedavg_acc = {a: standing[a].get("fedavg") for a in standing}
    asr = {r["defense"]: round(r["asr"], 4) for r in backdoor}
    bd_acc = {r["defense"]: round(r["accuracy"], 4) for r in backdoor}
    held = {r["defense"] for r in backdoor if not r.get("diverged")}
    nb = [d for d in ("norm-bound", "norm-bound+dp") if d in asr and d in held]
    return {
        "accuracy": accuracy,
        "backdoor_asr": asr,
        "backdoor_accuracy": bd_acc,
        "clean_cost": {d: round(clean["fedavg"] - v, 4) for d, v in clean.items()} if "fedavg" in clean else {},
        "best_defense": {a: {"defense": d, "accuracy": v} for a, (d, v) in best.items()},
        "defenses_at_95": {a: sorted(d for d, v in row.items() if v >= 0.95) for a, row in standing.items()},
        "checks": {
            "fedavg_below_80": {a: fedavg_acc.get(a) is not None and fedavg_acc[a] < 0.80 for a in strong},
            "a_defense_at_95": {a: a in best and best[a][1] >= 0.95 for a in strong},
            "backdoor_asr_fedavg_at_least_90": asr.get("fedavg", 0) >= 0.90,
            "norm_bound_asr_at_most_10_with_accuracy_97": any(asr[d] <= 0.10 and bd_acc[d] >= 0.97 for d in nb),
        },
        "aggregation_s_per_round": {d: _median([r["aggregation_s"] for r in matrix if r["defense"] == d])
                                    for d in clean},
        **_cell_figures(rows),
    }


def bench_robustness(args: argparse.Namespace) -> dict[str, Any]:
    """Every attack against every defense (MNIST, CNN-S, 50 clients, 10 Byzantine), plus the backdoor rows."""
    t0 = time.perf_counter()
    out = Path(args.out) / f"robustness-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args, out, for_test=True)
    tuned = _tuned()
    cells = _matrix_cells(data, tuned, args.quick)
    rows = run_cells(args, cells, data, out)
    figures = summarize(rows)
    heatmap = (out if args.quick else RESULTS) / "robustness.png"
    _heatmap(figures["accuracy"], heatmap, "test accuracy under attack (MNIST, CNN-S, 50 clients, 10 Byzantine)",
             figures["diverged"])
    figures.update({
        "heatmap": str(heatmap.relative_to(HERE.parent) if heatmap.is_relative_to(HERE.parent) else heatmap),
        "tuned": tuned,
        "workload": {**WORKLOAD, "train_examples": len(data.train), "byzantine": BYZANTINE,
                     "backdoor_attackers": BACKDOOR_ATTACKERS, "test_examples": len(data.final)},
        "workers": max(1, int(getattr(args, "workers", 0) or os.cpu_count() or 1)),
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    return figures


# -- defense parameters on the validation split ---------------------------------------------------

#: centered clipping's radius, in update-norm units (the honest clients' median update norm is recorded per cell)
TAU = (0.3, 1.0, 3.0)
#: norm bounds M as multiples of the honest clients' median update norm ``m``, measured in this tune's clean
#: centered-clipping cells. Sun et al. 2019 bound every update at one fixed M set against the honest updates'
#: norms, so that a boosted (model-replacement) update is cut back to an honest one's size; below 1 the bound
#: clips honest updates too (at 0.125 every update: an unweighted mean of directions, scaled by M)
BOUND_FACTORS = (0.125, 0.25, 0.5, 1.0, 2.0)
#: weak-DP noise as a multiplier z of the mean's per-client sensitivity, sigma = z M / n (the calibration of
#: DP-FedAvg, McMahan et al. 2018, the "weak" DP whose noise Sun et al. 2019 add to the aggregate): at n = 50
#: and d = 28,938 the noise vector's norm is about 3.4 z M, against an aggregate of norm at most M, whatever M.
#: The first grid reached z = 0.2 (sigma 0.002 at M = 0.5); a probe at z = 3 (M = 0.14) fell to 15% validation
#: accuracy by round 4, so the grid stops at 1. A mid-grid probe (M = 0.6, about m / 2, z = 0.3; 2026-12-03)
#: shows the backdoor arriving late: validation ASR 22%, 4%, 29%, 73%, 100% at rounds 4, 8, 12, 16, 20 (final
#: 99.9% at 95.5% accuracy), so a few-round probe says nothing about the 20-round figure
NOISE_MULTIPLIERS = (0.0, 0.1, 0.3, 1.0)


def _tau_cells(f: int) -> list[Cell]:
    """Clean FedAvg, then centered clipping at every ``TAU`` under no attack and ``f`` ALIE, IPM or sign-flipping
    clients."""
    cells = [Cell("none__fedavg", {}, "none", "fedavg")]
    for tau in TAU:
        for attack in ("none", "alie", "ipm", "sign-flip"):
            over = {**ATTACKS[attack], **({"attack.count": f} if attack != "none" else {}),
                    "robust.rule": "centered-clipping", "robust.tau": tau}
            cells.append(Cell(f"{attack}__cc-{tau}", over, attack, f"centered-clipping@{tau}", extra={"tau": tau}))
    return cells


def momentum_cells(f: int) -> list[Cell]:
    """Each selection rule (f stated) without an attack at every server momentum of ``SERVER_MOMENTA``."""
    return [Cell(f"none__{rule}-m{m}", {"robust.rule": rule, "robust.byzantine": f, "server.momentum": m}, "none",
                 f"{rule}@m{m}", extra={"rule": rule, "server_momentum": m})
            for rule in SELECTION_RULES for m in SERVER_MOMENTA]


def choose_server_momentum(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each selection rule's server momentum: the best clean validation accuracy, ties to the larger momentum
    (the workload's 0.9 was chosen that way for FedAvg). Krum aggregates one client's update a round; on
    label-skewed clients it follows the picked client's label mix, and momentum 0.9 sums about ten rounds of
    those picks (see the module docstring's probe)."""
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        key = (r["accuracy"], r["server_momentum"])
        if r["rule"] not in best or key > best[r["rule"]]:
            best[r["rule"]] = key
    return {rule: m for rule, (_, m) in best.items()}


def honest_norm(rows: list[dict[str, Any]]) -> float:
    """The honest clients' typical update norm ``m``: the median over the clean robust cells of each cell's
    median (over rounds) of the round's median update norm."""
    values = [r["update_norm_median"] for r in rows if r["attack"] == "none" and r.get("update_norm_median")]
    if not values:
        raise RuntimeError("no clean robust cell recorded client_update_norm_median")
    return float(statistics.median(values))


def norm_bound_cells(norm: float, clients: int) -> list[Cell]:
    """The backdoor (scaling attack) against norm bounding at ``BOUND_FACTORS`` x ``norm``, each with weak-DP
    noise sigma = z M / ``clients`` for z in ``NOISE_MULTIPLIERS``."""
    cells = []
    for factor in BOUND_FACTORS:
        bound = round(factor * norm, 6)
        for z in NOISE_MULTIPLIERS:
            noise = round(z * bound / clients, 8)
            over = {**BACKDOOR, "robust.rule": "norm-bound", "robust.norm_bound": bound, "robust.noise_std": noise}
            cells.append(Cell(f"backdoor__nb-{factor}m-z{z}", over, "scaling", f"norm-bound@{bound},{noise}",
                              backdoor=True, extra={"factor": factor, "bound": bound, "z": z, "noise": noise}))
    return cells


def _asr_key(row: dict[str, Any]) -> tuple[float, float]:
    return row["asr"], -row["accuracy"]


def choose_norm_bound(rows: list[dict[str, Any]], clean: float) -> dict[str, float]:
    """Sun et al.'s two defenses from the validation backdoor cells, among those whose accuracy is within one
    point of clean FedAvg (all cells when none is): norm bounding alone, the bound with the lowest ASR without
    noise; with weak DP, the (bound, noise > 0) pair with the lowest ASR."""
    ok = [r for r in rows if r["accuracy"] >= clean - 0.01] or rows
    plain = min([r for r in ok if r["noise"] == 0.0] or ok, key=_asr_key)
    noisy = min([r for r in ok if r["noise"] > 0.0] or [plain], key=_asr_key)
    return {"norm_bound": plain["bound"], "dp_norm_bound": noisy["bound"], "noise_std": noisy["noise"]}


def bench_tune(args: argparse.Namespace) -> dict[str, Any]:
    """Centered clipping's tau, norm bounding's M, weak-DP sigma and selection rules' server momentum, on validation."""
    t0 = time.perf_counter()
    out = Path(args.out) / f"robustness-tune-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args, out, for_test=False)
    f = 2 if args.quick else BYZANTINE  # quick: 12 clients, f = 2
    first = _tau_cells(f)[:3] + momentum_cells(f)[:2] if args.quick else _tau_cells(f) + momentum_cells(f)
    rows = run_cells(args, first, data, out)
    for c, r in zip(first, rows, strict=True):
        r.update(c.extra)
    m = honest_norm([r for r in rows if "tau" in r])  # the clean centered-clipping cells, as before
    clients = 12 if args.quick else int(WORKLOAD["data.num_clients"])
    second = norm_bound_cells(m, clients)[:2] if args.quick else norm_bound_cells(m, clients)
    nb = run_cells(args, second, data, out)
    for c, r in zip(second, nb, strict=True):
        r.update(c.extra)
    rows += nb
    cc = [r for r in rows if "tau" in r]
    taus = sorted({r["tau"] for r in cc})
    tau_score = {t: min(r["accuracy"] for r in cc if r["tau"] == t) for t in taus}
    clean = rows[0]["accuracy"]
    momenta = [r for r in rows if "server_momentum" in r]
    return {
        "chosen": {"tau": max(taus, key=lambda t: tau_score[t]), **choose_norm_bound(nb, clean),
                   "server_momentum": choose_server_momentum(momenta)},
        "rule": "tau: best worst-case validation accuracy over none/alie/ipm/sign-flip; norm bound: lowest validation "
                "ASR without noise, with validation accuracy within 1 point of clean FedAvg; weak DP: the (bound, "
                "noise > 0) pair with the lowest ASR likewise; server momentum of krum, multi-krum and bulyan: best "
                "clean validation accuracy, ties to the larger",
        "server_momentum_accuracy": {f"{r['rule']}@{r['server_momentum']}": r["accuracy"] for r in momenta},
        "validation_clean_fedavg": clean,
        "honest_update_norm": round(m, 5),
        "tau_worst_accuracy": tau_score,
        "norm_bound": [{k: r[k] for k in ("factor", "bound", "z", "noise", "accuracy", "asr")} for r in nb],
        "validation_target_met": any(r["asr"] <= 0.10 and r["accuracy"] >= 0.97 for r in nb),
        "cells": {r["name"]: {k: r[k] for k in ("accuracy", "asr", "cpu_s", "update_norm_median") if k in r}
                  for r in rows},
        "wall_s": round(time.perf_counter() - t0, 1),
        "cells_cpu_s": round(sum(r["cpu_s"] for r in rows), 1),
    }


# -- attacks at strengths that overpower the mean ----------------------------------------------------

#: the attacks of the issue's "attacks work" target, in ``robustness-strong``
STRONG_ATTACKS = ("sign-flip", "alie", "ipm", "min-max")


def strong_attacks(n: int, f: int) -> dict[str, dict[str, Any]]:
    """The four attacks at one strength fixed by formula from ``n`` clients per round and ``f`` Byzantine ones,
    before any defense result: ``s = 2 (n - f) / f`` (:func:`fedguard.attacks.vectors.mirror_multiplier`; 8 at
    n = 50, f = 10), the multiplier at which f colluding copies of ``-s`` times the honest mean turn the round's
    mean into ``-(n - f) / n`` times the honest clients' mean (IPM reverses the mean when ``f epsilon > n - f``,
    Xie et al. 2020's inner-product argument; ``s`` is twice that threshold).

    * sign flipping: ``-s`` times the attacker's own update (``attack.sign_flip_scale``): the mean's expected
      value is mirrored, where the papers' scale 1 only shrinks it to ``(n - 2f) / n``;
    * IPM: ``epsilon = s`` (``attack.ipm_epsilon``): the mean is mirrored exactly (the papers' 0.1 leaves
      ``(n - f - 0.1 f) / n``);
    * ALIE: ``z = s`` (``attack.alie_z``): the mean moves by ``f s / n = 2 (n - f) / n`` = 1.6 honest standard
      deviations in every coordinate, the same way every round (Baruch et al.'s ``z_max``, 0.47 here, stays
      inside the honest spread by design);
    * min-max: the bound on the crafted update's distance to the honest ones is ``s`` times the paper's
      (``attack.distance_scale``; the search starts at ``s`` times the paper's ``gamma``), ``p`` = std as in
      the matrix. For ALIE and min-max, whose direction is not ``-mean``, ``s`` is the same multiplier on each
      attack's own scale, not a reversal condition.
    """
    s = round(mirror_multiplier(n, f), 6)
    return {
        "sign-flip": {"attack.name": "sign-flip", "attack.sign_flip_scale": s},
        "alie": {"attack.name": "alie", "attack.alie_z": s},
        "ipm": {"attack.name": "ipm", "attack.ipm_epsilon": s},
        "min-max": {"attack.name": "min-max", "attack.distance_scale": s},
    }


def _strong_cells(data: Data, tuned: dict[str, Any], quick: bool) -> tuple[list[Cell], dict[str, dict[str, Any]]]:
    """Every strong attack against every defense of the matrix, and clean FedAvg for reference (``quick``: 12
    clients, f = 2, every attack against FedAvg and IPM against the median). Also returns the attacks."""
    n, f = (12, 2) if quick else (int(WORKLOAD["data.num_clients"]), BYZANTINE)
    attacks = strong_attacks(n, f)
    cells = [Cell("none__fedavg", {}, "none", "fedavg")]
    for attack, a in attacks.items():
        for defense, d in defenses(tuned, data.root_file).items():
            if quick and defense != "fedavg" and (attack, defense) != ("ipm", "median"):
                continue
            over = {**a, "attack.count": f, **d}
            if "robust.byzantine" in over:
                over["robust.byzantine"] = f
            cells.append(Cell(f"strong-{attack}__{defense}", over, attack, defense))
    return cells, attacks


def summarize_strong(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``robustness-strong`` line's figures: accuracies, the best defense per attack and the two checks."""
    accuracy = _accuracy_table(rows)
    attacked = {a: row for a, row in _standing_table(rows).items() if a != "none"}
    robust = {a: {d: v for d, v in row.items() if d != "fedavg"} for a, row in attacked.items()}
    best = {a: max(row.items(), key=lambda kv: kv[1]) for a, row in robust.items() if row}
    return {
        "accuracy": accuracy,
        "best_defense": {a: {"defense": d, "accuracy": v} for a, (d, v) in best.items()},
        "defenses_at_95": {a: sorted(d for d, v in row.items() if v >= 0.95) for a, row in robust.items()},
        "checks": {
            "fedavg_below_80": {a: "fedavg" in row and row["fedavg"] < 0.80 for a, row in attacked.items()},
            "a_defense_at_95": {a: a in best and best[a][1] >= 0.95 for a in attacked},
        },
        **_cell_figures(rows),
    }


def bench_strong(args: argparse.Namespace) -> dict[str, Any]:
    """Sign flipping, ALIE, IPM and min-max at strengths that overpower the mean (``strong_attacks``), against
    every defense of the matrix, plus clean FedAvg; the matrix's workload, test accuracy after the last round."""
    t0 = time.perf_counter()
    out = Path(args.out) / f"robustness-strong-{int(time.time())}"
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(args, out, for_test=True)
    tuned = _tuned()
    cells, attacks = _strong_cells(data, tuned, args.quick)
    figures = summarize_strong(run_cells(args, cells, data, out))
    heatmap = (out if args.quick else RESULTS) / "robustness-strong.png"
    table = {a: row for a, row in figures["accuracy"].items() if a != "none"}
    _heatmap(table, heatmap, "test accuracy under attacks that overpower the mean (MNIST, CNN-S, 50 clients, 10 "
                             "Byzantine)", figures["diverged"])
    n, f = (12, 2) if args.quick else (int(WORKLOAD["data.num_clients"]), BYZANTINE)
    figures.update({
        "strength": {a: {k: v for k, v in over.items() if k != "attack.name"} for a, over in attacks.items()},
        "multiplier": {"n": n, "f": f, "s": round(mirror_multiplier(n, f), 6), "formula": "s = 2 (n - f) / f"},
        "heatmap": str(heatmap.relative_to(HERE.parent) if heatmap.is_relative_to(HERE.parent) else heatmap),
        "tuned": tuned,
        "workload": {**WORKLOAD, "train_examples": len(data.train), "byzantine": f, "test_examples": len(data.final)},
        "workers": max(1, int(getattr(args, "workers", 0) or os.cpu_count() or 1)),
        "wall_s": round(time.perf_counter() - t0, 1),
    })
    return figures


# -- the rules' own cost ---------------------------------------------------------------------------


def _chain_seconds(name: str, stack: torch.Tensor, f: int, repeats: int) -> tuple[list[float], list[float]]:
    d = stack.shape[1]
    center = torch.zeros(d)
    fns = {
        "fedavg": lambda s: rules.mean(s),
        "median": rules.coordinate_median,
        "trimmed-mean": lambda s: rules.trimmed_mean(s, f),
        "krum": lambda s: rules.krum(s, f),
        "multi-krum": lambda s: rules.multi_krum(s, f, s.shape[0] - f),
        "bulyan": lambda s: rules.bulyan(s, f),
        "geometric-median": lambda s: rules.geometric_median(s),
        "centered-clipping": lambda s: rules.centered_clipping(s, center, 1.0),
        "fltrust": lambda s: rules.fltrust(s, s[0]),
        "norm-bound": lambda s: rules.norm_bound(s, 1.0, 0.001, secure_generator()),
        "nnm+trimmed-mean": lambda s: rules.trimmed_mean(rules.nearest_neighbor_mixing(s, f), f),
        "bucketing+centered-clipping": lambda s: rules.centered_clipping(
            rules.bucketing(s, 2, secure_generator()), center, 1.0),
    }
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fns[name](stack)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def bench_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per aggregation of each rule on CNN-S-sized updates (d = 28,938), n = 50 and n = 1,000 rows,
    f = 20% of n, one torch thread; median of repeats with min and max."""
    torch.set_num_threads(1)
    d = sum(p.numel() for p in cnn_s(1, 28, 10).parameters())
    sizes = (50, 200) if args.quick else (50, 1000)
    out: dict[str, Any] = {"d": d, "threads": 1, "seconds": {}}
    gen = torch.Generator().manual_seed(0)
    for n in sizes:
        stack = torch.randn(n, d, generator=gen) * 0.01
        f = n // 5
        repeats = 5 if n <= 200 else 3
        for name in ("fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan", "geometric-median",
                     "centered-clipping", "fltrust", "norm-bound", "nnm+trimmed-mean", "bucketing+centered-clipping"):
            t, cpu = _chain_seconds(name, stack, f, repeats)
            out["seconds"].setdefault(name, {})[str(n)] = {"median": round(statistics.median(t), 4),
                                                          "min": round(min(t), 4), "max": round(max(t), 4),
                                                          "cpu_median": round(statistics.median(cpu), 4)}
    small = str(sizes[0])
    growth = (sizes[1] / sizes[0]) ** 2
    out["n2d_extrapolated_s"] = {r: round(out["seconds"][r][small]["cpu_median"] * growth, 3)
                                 for r in ("krum", "multi-krum", "bulyan", "nnm+trimmed-mean")}
    out["ratio_to_fedavg"] = {r: {n: round(v[n]["cpu_median"] / max(out["seconds"]["fedavg"][n]["cpu_median"], 1e-6), 1)
                                  for n in v} for r, v in out["seconds"].items()}
    return out


BENCHMARKS = {"robustness": bench_robustness, "robustness-tune": bench_tune, "robustness-strong": bench_strong,
              "robust-cost": bench_cost}
