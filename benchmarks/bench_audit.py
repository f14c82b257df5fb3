"""Privacy red-team benchmarks (issue 17): what an attacker recovers, per mechanism.

* ``inversion``: MNIST, CNN-S at its seeded initialisation (round 1), client 0's first 16 images
  attacked one at a time (batch 1, one FedSGD step, lr 0.1) by the curious server with iDLG:
  plaintext, DP-SGD (sigma 1, clip 1: the real client's DP-SGD), and SecAgg+ over 10 clients
  (the 16 images are 16 clients' single-image updates in two rounds of 10 clients, the second
  topped up with 4 other clients; the server sees each round's sum and runs Inverting Gradients
  on it as a batch of 10, each victim image scored against its best match). The noise floor is a uniform
  random image against the truth. Also client-level DP (DP-FedAvg, z 1, central noise: the server
  sees each clipped update before it adds the noise) and local DP (sigma 1, clip 1) under
  ``other_mechanisms``, batch 8 (one step) and a 5-step FedAvg update on 8
  images (batch 8, 5 local epochs), both by Inverting Gradients. Pictures under
  ``benchmarks/results/audit/``.
* ``inversion-secagg``: when does secure aggregation alone leave nothing? The same victim images
  (client 0's first 16) and the same attack budget as ``inversion``'s SecAgg+ row (Inverting Gradients,
  300 iterations, 1 restart), the server seeing only the round's sum over 10 clients, as each client's
  work grows: 1 image and one step (``inversion``'s case), 8 images and one step (a batch-80 gradient),
  8 images and a 5-step FedAvg update (batch 8, 5 local epochs; the attacker unrolls each client's
  training). Two victim clients hold 8 images each; 8 other clients top the round up. Besides the
  noise floor, a blank image and the mean test image against the truth (MNIST is mostly black).
* ``membership``: the released global model of a federated run (10 clients, iid, an MLP trained
  to overfit: 20 rounds of 5 local epochs; the DP run 10 rounds of 2) on a random half of 4,000 MNIST training images
  (2,000 members, the other half the non-members; sized for this shared machine): loss threshold
  and offline LiRA (2 shadow runs on the test set), and the server's attack on client 0's next
  update; plain and DP-SGD at epsilon 3 (RDP accountant).
* ``dp-audit``: the one-run canary audit (Steinke et al. 2023; 1,000 Dirac gradient canaries) of
  DP-SGD (client 0 of mnist-5k over 40 clients, 3 local epochs) and DP-FedAvg (central noise,
  30 rounds at client rate 0.1), each claiming epsilon 2 at delta 1e-6: correct, no-clip and
  seeded-noise variants.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fedguard import Config, Experiment
from fedguard.audit.dp_audit import VARIANTS, audit_dp
from fedguard.audit.inversion import InvertingGradientsConfig, describe
from fedguard.audit.inversion_audit import attack_run, constant_floor, noise_floor
from fedguard.audit.membership_audit import membership_run
from fedguard.audit.pictures import save_grid, save_roc

RESULTS = Path(__file__).resolve().parent / "results" / "audit"

INVERSION = {
    "data.dataset": "mnist",
    "data.max_train_examples": 2000,
    "data.num_clients": 10,
    "data.partition": "iid",
    "task.model": "cnn-s",
    "train.batch_size": 1,
    "train.max_steps": 1,
    "train.lr": 0.1,
    "train.momentum": 0.0,
    "run.seed": 0,
}
DP_SAMPLE = {"dp.mode": "sample", "dp.noise_multiplier": 1.0, "dp.clip": 1.0, "dp.noise_placement": "local"}
SECAGG = {"secure.mode": "secagg", "server.clients_per_round": 10}
#: client-level DP (central noise: the server adds it after it has seen each update) and local DP
DP_CLIENT = {"dp.mode": "client", "dp.noise_multiplier": 1.0, "dp.clip": 1.0, "dp.noise_placement": "central",
             "server.weighting": "uniform"}
DP_LOCAL = {"dp.mode": "local", "dp.noise_multiplier": 1.0, "dp.clip": 1.0, "server.weighting": "uniform"}
BATCH8 = {"train.batch_size": 8}
FEDAVG5 = {"train.batch_size": 8, "train.max_steps": 0, "train.epochs": 5}


def _config(args: argparse.Namespace, *extra: dict[str, Any]) -> Config:
    merged: dict[str, Any] = {**INVERSION, "data.data_dir": args.data_dir, "run.progress": False,
                              "run.report": False}
    for e in extra:
        merged.update(e)
    return Config.load(None, [f"{k}={v}" for k, v in merged.items()] + list(args.set))


def inversion(args: argparse.Namespace) -> dict[str, Any]:
    """Gradient inversion on MNIST/CNN-S: median PSNR/SSIM plaintext, DP-SGD sigma 1, SecAgg+ over 10, noise."""
    torch.set_num_threads(1)
    images = 4 if args.quick else 16
    scale = 10 if args.quick else 1
    # attack budgets sized for this shared 2-core machine (Geiping et al. use far more iterations)
    ig = InvertingGradientsConfig(iterations=400 // scale, restarts=1, tv=1e-4, seed=0)
    ig_secagg = InvertingGradientsConfig(iterations=300 // scale, restarts=1, tv=1e-4, seed=0)
    ig_multi = InvertingGradientsConfig(iterations=450 // scale, restarts=1, tv=1e-4, seed=0, warm_start=2 / 3)
    dlg_iterations, dlg_restarts = 160 // scale, 1
    t0 = time.perf_counter()
    plan = {
        "plain": (_config(args), images, ig),
        "dp_sample": (_config(args, DP_SAMPLE), images, ig),
        "secagg": (_config(args, SECAGG), images, ig_secagg),
        "dp_client": (_config(args, DP_CLIENT), images, ig),
        "dp_local": (_config(args, DP_LOCAL), images, ig),
        "batch8": (_config(args, BATCH8), images, ig),
        "fedavg5": (_config(args, FEDAVG5), min(images, 8), ig_multi),
    }
    runs = {}
    for name, (config, count, budget) in plan.items():
        single = name in ("plain", "dp_sample", "dp_client", "dp_local")
        budget = InvertingGradientsConfig(budget.iterations, dlg_restarts if single else budget.restarts, budget.lr,
                                          budget.tv, budget.seed, budget.warm_start)
        runs[name] = attack_run(config, count, name, ig=budget, dlg_iterations=dlg_iterations)
        print(f"[inversion] {name}: median PSNR {statistics.median(runs[name].psnr):.2f} dB "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    floor_psnr, floor_ssim = noise_floor(runs["plain"].truth, seed=0)
    headline = ("plain", "dp_sample", "secagg")
    out: dict[str, Any] = {
        "psnr_median": {**{k: round(statistics.median(runs[k].psnr), 3) for k in headline},
                        "noise_floor": round(statistics.median(floor_psnr), 3)},
        "ssim_median": {**{k: round(statistics.median(runs[k].ssim), 4) for k in headline},
                        "noise_floor": round(statistics.median(floor_ssim), 4)},
        "other_mechanisms": {k: {"psnr_median": round(statistics.median(runs[k].psnr), 3),
                                 "ssim_median": round(statistics.median(runs[k].ssim), 4)}
                             for k in ("dp_client", "dp_local")},
        "batch8": runs["batch8"].summary(),
        "fedavg5": runs["fedavg5"].summary(),
        "runs": {k: runs[k].summary() for k in (*headline, "dp_client", "dp_local")},
        "noise_floor": {"psnr": [round(v, 2) for v in floor_psnr], "ssim": [round(v, 4) for v in floor_ssim]},
        "attack_settings": {"inverting_gradients": describe(ig), "inverting_gradients_secagg": describe(ig_secagg),
                            "inverting_gradients_fedavg5": describe(ig_multi),
                            "idlg_lbfgs_iterations": dlg_iterations, "idlg_restarts": dlg_restarts},
        "images": images,
        "audit_wall_s": round(time.perf_counter() - t0, 1),
        "config": _config(args).to_dict(),
    }
    folder = RESULTS if not args.quick else Path(args.out)
    grid = save_grid({"true": runs["plain"].truth, **{k: r.reconstructed for k, r in runs.items()}},
                     folder / "inversion.png",
                     {k: [f"{p:.0f}" for p in r.psnr] for k, r in runs.items()})
    out["picture"] = str(grid.relative_to(RESULTS.parent.parent.parent)) if not args.quick else str(grid)
    return out


#: SecAgg+ over 10 clients as each client's work grows (images per client x local steps)
SECAGG_WORK = {
    "secagg_1x1": {},
    "secagg_8x1": {"train.batch_size": 8},
    "secagg_8x5": {"train.batch_size": 8, "train.max_steps": 0, "train.epochs": 5},
}


def inversion_secagg(args: argparse.Namespace) -> dict[str, Any]:
    """Inversion of the SecAgg+ sum over 10 clients as per-client work grows: 1x1, 8 images x 1 step, 8 x 5 steps."""
    torch.set_num_threads(1)
    images = 4 if args.quick else 16
    scale = 10 if args.quick else 1
    ig = InvertingGradientsConfig(iterations=300 // scale, restarts=1, tv=1e-4, seed=0)  # inversion's secagg budget
    t0 = time.perf_counter()
    runs = {}
    for name, extra in SECAGG_WORK.items():
        runs[name] = attack_run(_config(args, SECAGG, extra), images, name, ig=ig)
        print(f"[inversion-secagg] {name}: median PSNR {statistics.median(runs[name].psnr):.2f} dB "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    truth = runs["secagg_1x1"].truth
    floor_psnr, floor_ssim = noise_floor(truth, seed=0)
    # two better-informed guesses than a uniform random image: MNIST is mostly black
    test_x = Experiment(_config(args, SECAGG)).assemble().test.x
    floors = {"noise_floor": (floor_psnr, floor_ssim), "blank_image": constant_floor(truth, torch.zeros_like(truth[0])),
              "mean_test_image": constant_floor(truth, test_x.float().mean(0))}
    out: dict[str, Any] = {
        "psnr_median": {**{k: round(statistics.median(r.psnr), 3) for k, r in runs.items()},
                        **{k: round(statistics.median(p), 3) for k, (p, _) in floors.items()}},
        "ssim_median": {**{k: round(statistics.median(r.ssim), 4) for k, r in runs.items()},
                        **{k: round(statistics.median(q), 4) for k, (_, q) in floors.items()}},
        "runs": {k: r.summary() for k, r in runs.items()},
        "floors": {k: {"psnr": [round(v, 2) for v in p], "ssim": [round(v, 4) for v in q]}
                   for k, (p, q) in floors.items()},
        "attack_settings": {"inverting_gradients": describe(ig)},
        "images": images,
        "audit_wall_s": round(time.perf_counter() - t0, 1),
        "config": {"base": {**INVERSION, **SECAGG}, **SECAGG_WORK},
    }
    folder = RESULTS if not args.quick else Path(args.out)
    grid = save_grid({"true": runs["secagg_1x1"].truth, **{k: r.reconstructed for k, r in runs.items()}},
                     folder / "inversion-secagg.png",
                     {k: [f"{p:.0f}" for p in r.psnr] for k, r in runs.items()})
    out["picture"] = str(grid.relative_to(RESULTS.parent.parent.parent)) if not args.quick else str(grid)
    return out


def inversion_floors(args: argparse.Namespace) -> dict[str, Any]:
    """Guesses that recover nothing against the inversion benchmarks' victim images: uniform noise, blank, mean test."""
    setup = Experiment(_config(args, SECAGG)).assemble()
    images = 4 if args.quick else 16
    truth = setup.client_data(0).subset(list(range(images)), "victim").x  # attack_run's truth, in its order
    floors = {"noise_floor": noise_floor(truth, seed=0),
              "blank_image": constant_floor(truth, torch.zeros_like(truth[0])),
              "mean_test_image": constant_floor(truth, setup.test.x.float().mean(0))}
    return {"psnr_median": {k: round(statistics.median(p), 3) for k, (p, _) in floors.items()},
            "ssim_median": {k: round(statistics.median(q), 4) for k, (_, q) in floors.items()},
            "floors": {k: {"psnr": [round(v, 2) for v in p], "ssim": [round(v, 4) for v in q]}
                       for k, (p, q) in floors.items()},
            "images": images, "config": {**INVERSION, **SECAGG}}


MEMBERSHIP = {
    "data.dataset": "mnist",
    "data.max_train_examples": 4000,
    "data.num_clients": 10,
    "data.partition": "iid",
    "task.model": "mlp",
    "train.batch_size": 32,
    "train.epochs": 5,
    "train.lr": 0.05,
    "train.momentum": 0.9,
    "run.rounds": 20,
    "run.seed": 0,
}
MEMBERSHIP_DP = {"dp.mode": "sample", "dp.target_epsilon": 3.0, "dp.delta": 1e-5, "dp.clip": 1.0,
                 "dp.accountant": "rdp",
                 "train.momentum": 0.0, "train.lr": 0.5, "train.epochs": 2, "run.rounds": 10}


def membership(args: argparse.Namespace) -> dict[str, Any]:
    """Membership inference on an overfit federated MLP (4,000 members): plain and DP-SGD at epsilon 3."""
    torch.set_num_threads(1)
    quick = {"data.max_train_examples": 1000, "run.rounds": 2} if args.quick else {}
    shadows = 1 if args.quick else 2
    base = {**MEMBERSHIP, **quick}
    out_dir = Path(args.out) / f"membership-{int(time.time())}"
    t0 = time.perf_counter()
    results = {}
    for name, extra in (("plain", {}), ("dp", MEMBERSHIP_DP)):
        merged = {**base, **extra, "data.data_dir": args.data_dir, "run.progress": False, "run.report": False}
        config = Config.load(None, [f"{k}={v}" for k, v in merged.items()] + list(args.set))
        results[name] = membership_run(config, out_dir / name, shadows=shadows, label=name)
        print(f"[membership] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    headline = {name: r.summaries["lira_offline"].row() for name, r in results.items()}
    out: dict[str, Any] = {key: {name: row[key] for name, row in headline.items()}
                           for key in ("auc", "tpr_at_0.001", "tpr_at_0.01", "auc_ci")}
    out["headline_attack"] = "lira_offline (released global model)"
    out["attacks"] = {name: r.summary() for name, r in results.items()}
    out["audit_wall_s"] = round(time.perf_counter() - t0, 1)
    folder = RESULTS if not args.quick else out_dir
    curves = {f"{name} {attack}": curve for name, r in results.items() for attack, curve in r.curves.items()}
    roc = save_roc(curves, folder / "membership_roc.png", "MNIST, overfit federated MLP, 2,000 members")
    out["picture"] = str(roc.relative_to(RESULTS.parent.parent.parent)) if not args.quick else str(roc)
    out["config"] = {name: {**base, **extra} for name, extra in (("plain", {}), ("dp", MEMBERSHIP_DP))}
    return out


DP_AUDIT = {
    "sample": {"data.num_clients": 40, "train.batch_size": 10, "train.epochs": 3, "train.momentum": 0.0,
               "train.lr": 0.1, "dp.mode": "sample", "dp.clip": 1.0, "dp.target_epsilon": 2.0, "dp.delta": 1e-6,
               "run.rounds": 1},
    "client": {"data.num_clients": 100, "server.clients_per_round": 10, "server.weighting": "uniform",
               "run.rounds": 30, "dp.mode": "client", "dp.clip": 1.0, "dp.target_epsilon": 2.0, "dp.delta": 1e-6,
               "dp.noise_placement": "central"},
}


def dp_audit(args: argparse.Namespace) -> dict[str, Any]:
    """One-run canary audit: DP-SGD and DP-FedAvg (epsilon 2 claimed), correct and broken variants."""
    torch.set_num_threads(1)
    canaries = 200 if args.quick else 1000
    t0 = time.perf_counter()
    audits = []
    for cfg in DP_AUDIT.values():
        merged = {**cfg, "run.progress": False, "run.report": False, "run.seed": 0}
        config = Config.load(None, [f"{k}={v}" for k, v in merged.items()] + list(args.set))
        for variant in VARIANTS:
            audits.append(audit_dp(config, variant, canaries).row())
    return {"audits": audits, "canaries": canaries, "confidence": 0.95,
            "audit_wall_s": round(time.perf_counter() - t0, 1), "config": DP_AUDIT}


BENCHMARKS = {"inversion": inversion, "inversion-secagg": inversion_secagg, "inversion-floors": inversion_floors,
              "membership": membership, "dp-audit": dp_audit}
