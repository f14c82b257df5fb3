"""Privacy red-team benchmarks (issue 17): what an attacker recovers, per mechanism.

* ``inversion``: MNIST, CNN-S at its seeded initialisation (round 1), client 0's first 16 images
  attacked one at a time (batch 1, one FedSGD step, lr 0.1) by the curious server with iDLG:
  plaintext, DP-SGD (sigma 1, clip 1: the real client's DP-SGD), and SecAgg+ over 10 clients
  (the 16 images are 16 clients' single-image updates in two rounds of 10 clients, the second
  topped up with 4 other clients; the server sees each round's sum and runs Inverting Gradients
  on it as a batch of 10, each victim image scored against its best match). The noise floor is a uniform
  random image against the truth. Also batch 8 (one step) and a 5-step FedAvg update on 8
  images (batch 8, 5 local epochs), both by Inverting Gradients. Pictures under
  ``benchmarks/results/audit/``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from fedguard import Config
from fedguard.audit.inversion import InvertingGradientsConfig, describe
from fedguard.audit.inversion_audit import attack_run, noise_floor
from fedguard.audit.pictures import save_grid

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
    ig = InvertingGradientsConfig(iterations=800 // scale, restarts=2, tv=1e-4, seed=0)
    ig_secagg = InvertingGradientsConfig(iterations=600 // scale, restarts=1, tv=1e-4, seed=0)
    ig_multi = InvertingGradientsConfig(iterations=900 // scale, restarts=1, tv=1e-4, seed=0, warm_start=2 / 3)
    dlg_iterations = 300 // scale
    t0 = time.perf_counter()
    runs = {
        "plain": attack_run(_config(args), images, "plain", ig=ig, dlg_iterations=dlg_iterations),
        "dp_sample": attack_run(_config(args, DP_SAMPLE), images, "dp_sample", ig=ig, dlg_iterations=dlg_iterations),
        "secagg": attack_run(_config(args, SECAGG), images, "secagg", ig=ig_secagg, dlg_iterations=dlg_iterations),
        "batch8": attack_run(_config(args, BATCH8), images, "batch8", ig=ig),
        "fedavg5": attack_run(_config(args, FEDAVG5), images, "fedavg5", ig=ig_multi),
    }
    floor_psnr, floor_ssim = noise_floor(runs["plain"].truth, seed=0)
    headline = ("plain", "dp_sample", "secagg")
    out: dict[str, Any] = {
        "psnr_median": {**{k: round(statistics.median(runs[k].psnr), 3) for k in headline},
                        "noise_floor": round(statistics.median(floor_psnr), 3)},
        "ssim_median": {**{k: round(statistics.median(runs[k].ssim), 4) for k in headline},
                        "noise_floor": round(statistics.median(floor_ssim), 4)},
        "batch8": runs["batch8"].summary(),
        "fedavg5": runs["fedavg5"].summary(),
        "runs": {k: runs[k].summary() for k in headline},
        "noise_floor": {"psnr": [round(v, 2) for v in floor_psnr], "ssim": [round(v, 4) for v in floor_ssim]},
        "attack_settings": {"inverting_gradients": describe(ig), "inverting_gradients_secagg": describe(ig_secagg),
                            "inverting_gradients_fedavg5": describe(ig_multi),
                            "idlg_lbfgs_iterations": dlg_iterations, "idlg_restarts": ig.restarts},
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


BENCHMARKS = {"inversion": inversion}
