"""Generative benchmarks: VAE, MAE and GAN, federated (10 clients, label-Dirichlet 0.5) vs the
centralized baseline (one client holding all the data, same rounds and local epochs).

    python benchmarks/run.py vae        # fed_iwae_nll, central_iwae_nll (nats, lower is better)
    python benchmarks/run.py mae-tune   # the MAE's local and server lr, chosen on validation (before mae)
    python benchmarks/run.py mae        # fed_probe_acc, central_probe_acc, pixel_probe_acc
    python benchmarks/run.py mae-untrained   # the same probes on the untrained encoder (diagnostic)
    python benchmarks/run.py gan-tune   # the GAN's Adam lr and round count, chosen on validation (before gan)
    python benchmarks/run.py gan        # fed_fd, central_fd, real_fd (FD in MNIST-classifier features)

Choosing on validation (issue 19). The MAE and GAN runs hold out a stratified 10% of the MNIST training
set (``data.validation_fraction = 0.1``: 6,000 images taken before partitioning, so no client trains on
them). ``mae-tune`` and ``gan-tune`` train every candidate on the other 54,000 images and hand it the
validation images in place of the test set, so no candidate can read the test set; their result lines,
committed as results/generative/mae-tune.json and gan-tune.json, are what ``mae`` and ``gan`` read. These
train with the chosen settings on the same 54,000 images (the partition the settings were chosen on),
report validation figures every round and read the test set once, after the last round; their lines carry
``validation_selected``, the settings used (``tuned``) and the tune line's provenance (``tune``). Without a
tune line they use the old settings (``MAE_OLD``, ``GAN_OLD``: picked on test by an earlier session) and
say ``validation_selected: false``. The centralized baselines take the federated run's chosen settings
(the comparison is at the same settings, as before; they are not tuned on their own).

* ``gan-tune`` (FedGAN, Rasouli et al. 2020): the Adam lr in ``GAN_TUNE_LR``, one ``GAN_TUNE_ROUNDS``-round
  federated run each, scored every ``GAN_TUNE_EVERY`` rounds by the FD (Heusel et al. 2017) of 6,000
  generated images against the 6,000 validation images, in the features of the classifier trained on the
  54,000 training images only; the (lr, round) with the lowest validation FD wins, so the round count is
  read off the validation curve (a run of R rounds is the first R rounds of a longer one: the lr is
  constant). Sizing: a federated round took 6.26 s in gan.json (idle 2 cores, 60,000 images), so about
  5.6 s on 54,000: 3 x 40 rounds are 11-13 minutes, plus the feature classifier of the 54,000 images
  (trained once, then cached: under a minute) and 24 FD evaluations (about 1 s each): 13-15 minutes.
* ``mae-tune`` (He et al. 2022): local Adam lr x server lr (``MAE_TUNE``, 2 x 2, both of the old values'
  neighbours included), each a ``MAE_TUNE_ROUNDS``-round federated run (a shortened proxy of mae's 25: the
  cosine schedule spans the 12) scored by the linear probe fitted on the training images' features and
  measured on the validation images; ties to the lower validation masked MSE. The probe's L2 penalty is
  chosen inside the task in every run, the tune's and mae's (``mae.probe_l2_grid``: each probe, the
  raw-pixel one too, picks its own on a seeded 10% of its training images, then refits on all of them).
  Sizing: a federated round took 19.8 s in mae-2026-12-02.json (with the baseline beside it on the other core), so
  12 rounds on 54,000 images at most about 3.6 minutes, and the probes about 1.5-2.5 minutes a candidate
  (that line's final metrics took 107 s with one fixed penalty; the grid's warm-started stronger penalties
  converge fast): 4 candidates about 20-25 minutes on an idle 2-core machine. ``mae`` itself then takes
  about 12-14 minutes (25 rounds, and the probes run twice: on validation, then once on test). Measured on
  2026-12-03, a slow day (37 s per federated round): mae-tune 31 min, mae 29 min (788 s of final metrics).

``--quick`` shrinks each run (embedded mnist-5k, 3 rounds; the tunes: 2 candidates of 2 rounds) for CI;
README figures use full runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedguard import ArrayDataset, Experiment
from fedguard.config import Config
from fedguard.experiment import RunResult
from fedguard.health import RunFailed

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "generative"

#: the server's validation share of the training set (stratified, before partitioning): what settings are chosen on
VALIDATION_FRACTION = 0.1
#: the probe's L2 penalties, each probe choosing its own on a seeded 10% of its training images (never on test)
PROBE_L2_GRID = "0.0001,0.001,0.01"

FEDERATED = {
    "data.dataset": "mnist",
    "data.num_clients": 10,
    "data.partition": "dirichlet",
    "data.alpha": 0.5,
    "server.fraction": 1.0,
    "train.epochs": 1,
    "train.batch_size": 64,
    "run.seed": 0,
    "run.progress": False,
    "run.baseline": "centralized",
    "run.threads": 1,
}

VAE = {
    "task.name": "vae",
    "run.rounds": 30,
    "run.eval_every": 5,
    "train.batch_size": 32,
    "vae.hidden": 400,
    "vae.latent": 20,
    "vae.iwae_k": 100,
    "vae.eval_examples": 1000,
    "vae.lr": 3e-3,
}
MAE = {
    "task.name": "mae",
    "run.rounds": 25,
    "run.eval_every": 5,
    "run.threads": 0,
    "run.baseline_concurrent": True,
    "mae.patch": 7,
    "mae.dim": 128,
    "mae.depth": 4,
    "mae.decoder_dim": 64,
    "mae.decoder_depth": 1,
    "mae.pool": "tokens",
    "mae.extra_pools": "mean",
    "mae.eval_examples": 1000,
    "mae.probe_l2_grid": PROBE_L2_GRID,
    "train.lr_schedule": "cosine",
    "data.validation_fraction": VALIDATION_FRACTION,
}
GAN = {
    "task.name": "gan",
    "run.eval_every": 5,
    "gan.hidden": 256,
    "gan.latent": 64,
    "gan.eval_samples": 2000,
    "gan.final_samples": 10000,
    "run.threads": 0,
    "data.validation_fraction": VALIDATION_FRACTION,
}
QUICK = {"data.dataset": "mnist-5k", "run.rounds": 3, "run.eval_every": 1}

#: the settings before the tunes, picked on the test set by an earlier session (used, and said, without a tune line)
MAE_OLD: dict[str, Any] = {"mae.lr": 5e-4, "server.lr": 1.5}
GAN_OLD: dict[str, Any] = {"gan.lr": 4e-4, "run.rounds": 30}
#: mae-tune's grid (local Adam lr x server lr) and run length (mae runs ``MAE["run.rounds"]``)
MAE_TUNE = [{"mae.lr": lr, "server.lr": server} for lr in (5e-4, 1e-3) for server in (1.0, 1.5)]
MAE_TUNE_ROUNDS = 12
#: gan-tune's Adam learning rates, run length and evaluation interval (the candidate round counts)
GAN_TUNE_LR = (2e-4, 4e-4, 8e-4)
GAN_TUNE_ROUNDS = 40
GAN_TUNE_EVERY = 5
#: generated images of each validation FD (capped at the validation set's size: all 6,000 of its images)
GAN_TUNE_SAMPLES = 6000
#: what every candidate run changes: no baseline, no report, and the validation images in the test set's place
TUNE_RUN: dict[str, Any] = {"data.validation_fraction": 0.0, "run.baseline": "none",
                            "run.baseline_concurrent": False, "run.report": False}
#: the tune line's fields a main benchmark copies as its provenance
PROVENANCE = ("date", "commit", "quick", "tune_rounds", "validation_fd", "validation_probe_acc")


def _config(args: Any, task: dict[str, Any], name: str, extra: dict[str, Any] | None = None) -> Config:
    """The workload ``task`` (shrunk by ``--quick``), then ``--set`` overrides, then ``extra`` (a tune's)."""
    values = {**FEDERATED, **task, **(QUICK if args.quick else {}), "run.name": name, "run.out_dir": args.out}
    if not args.quick:
        values["data.data_dir"] = args.data_dir
    values.update(item.split("=", 1) for item in getattr(args, "set", None) or [])
    values.update(extra or {})
    return Config.load(None, [f"{k}={_text(v)}" for k, v in values.items()])


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _run(args: Any, task: dict[str, Any], name: str) -> tuple[RunResult, Config, dict[str, Any]]:
    config = _config(args, task, name)
    t0 = time.perf_counter()
    result = Experiment(config).run()
    assert result.baseline is not None
    wall = {
        "fed_wall_s": round(result.timings["total_s"], 1),
        "central_wall_s": round(result.baseline.timings["total_s"], 1),
        "bench_total_s": round(time.perf_counter() - t0, 1),
        "fed_median_round_s": round(result.final["median_round_s"], 2),
        "central_median_round_s": round(result.baseline.final["median_round_s"], 2),
        "fed_final_metrics_s": round(result.final["final_metrics_s"], 1),
        "central_final_metrics_s": round(result.baseline.final["final_metrics_s"], 1),
    }
    return result, config, wall


def _params(result: RunResult) -> int:
    return int(sum(v.numel() for v in result.params.values()))


def bench_vae(args: Any) -> dict[str, Any]:
    """VAE: test IWAE NLL (k = 100, nats per image), federated vs centralized."""
    result, config, wall = _run(args, VAE, "bench-vae")
    fed, central = result.final, result.baseline.final
    return {
        "fed_iwae_nll": fed["final_iwae_nll"],
        "central_iwae_nll": central["final_iwae_nll"],
        "fed_neg_elbo": fed["final_neg_elbo"],
        "central_neg_elbo": central["final_neg_elbo"],
        "gap_nats": fed["final_iwae_nll"] - central["final_iwae_nll"],
        "model_params": _params(result),
        **wall,
        "run_dir": str(result.run_dir),
        "config": config.to_dict(),
    }


def bench_mae(args: Any) -> dict[str, Any]:
    """MAE (He et al. 2022): linear-probe accuracy of the encoder (federated, centralized) vs raw pixels, the
    settings from mae-tune (chosen on validation), the test set read once after the last round."""
    chosen, source = tuned("mae-tune", MAE_OLD)
    result, config, wall = _run(args, {**MAE, **chosen}, "bench-mae")
    fed, central = result.final, result.baseline.final
    return {
        "fed_probe_acc": fed["probe_acc"],
        "central_probe_acc": central["probe_acc"],
        "pixel_probe_acc": fed["pixel_probe_acc"],
        "fed_probe_acc_mean": fed["probe_acc_mean"],
        "central_probe_acc_mean": central["probe_acc_mean"],
        "fed_masked_mse": fed["final_masked_mse"],
        "central_masked_mse": central["final_masked_mse"],
        "fed_val_probe_acc": fed.get("val_probe_acc"),
        "central_val_probe_acc": central.get("val_probe_acc"),
        "pixel_val_probe_acc": fed.get("val_pixel_probe_acc"),
        "fed_probe_l2": fed["probe_l2"],
        "pixel_probe_l2": fed["pixel_probe_l2"],
        "model_params": _params(result),
        **_selection(chosen, source, args),
        **wall,
        "run_dir": str(result.run_dir),
        "config": config.to_dict(),
    }


def bench_mae_untrained(args: Any) -> dict[str, Any]:
    """MAE diagnostic: the same probes on the untrained (seeded) encoder of the `mae` workload,
    i.e. what the architecture's random features alone give (fitted on mae's training images less validation)."""
    from fedguard import builders

    config = _config(args, MAE, "bench-mae-untrained")
    t0 = time.perf_counter()
    experiment = Experiment(config)
    train, test = experiment.load_data()
    train, _ = experiment.split_validation(train)
    task = builders.build_task(config, train)
    model = builders.seeded_model(task, config.run.seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    results = task.probes(model, params, task.probe_split(train), test)
    return {
        "untrained_probe_acc": results[task.pool]["test_acc"],
        **{f"untrained_probe_acc_{p}": r["test_acc"] for p, r in results.items() if p != task.pool},
        "model_params": sum(v.numel() for v in params.values()),
        "probe_s": round(time.perf_counter() - t0, 1),
        "config": config.to_dict(),
    }


def bench_gan(args: Any) -> dict[str, Any]:
    """GAN (FedGAN, Rasouli et al. 2020): FD (Heusel et al. 2017) in MNIST-classifier features, federated vs
    centralized vs real training images; lr and rounds from gan-tune (chosen on validation FD), the test set read
    once after the last round."""
    chosen, source = tuned("gan-tune", GAN_OLD)
    result, config, wall = _run(args, {**GAN, **chosen}, "bench-gan")
    fed, central = result.final, result.baseline.final
    sanity = _fd_sanity(config, int(fed["final_fd_samples"]))
    return {
        "fed_fd": fed["final_fd"],
        "central_fd": central["final_fd"],
        "real_fd": sanity.pop("real"),
        "fd_classifier_test_acc": sanity.pop("classifier_test_acc"),
        **{f"{k}_fd": v for k, v in sanity.items()},
        "fd_samples": fed["final_fd_samples"],
        "fed_val_fd": fed.get("val_final_fd"),
        "central_val_fd": central.get("val_final_fd"),
        "model_params": _params(result),
        **_selection(chosen, source, args),
        **wall,
        "run_dir": str(result.run_dir),
        "config": config.to_dict(),
    }


def _fd_sanity(config: Config, n: int) -> dict[str, float]:
    """FD of real training images (and of noise, collapsed sets) against the test images, and the feature
    classifier's test accuracy; the classifier is the runs' own, trained on the training images less validation."""
    from fedguard.tasks.frechet import ClassifierSettings, FrechetScorer, accuracy, feature_classifier, sanity_scores

    experiment = Experiment(config)
    train, test = experiment.load_data()
    train, _ = experiment.split_validation(train)
    net, _ = feature_classifier(train, ClassifierSettings(epochs=config.gan.fd_epochs))
    with torch.no_grad():
        scores = sanity_scores(FrechetScorer(net), train, test, n)
    return {**scores, "classifier_test_acc": accuracy(net, test)}


# -- choosing on validation (issue 19) ------------------------------------------------------------


def tuned(name: str, old: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The settings of the committed tune line results/generative/NAME.json (its last line) and that line's
    provenance; ``old`` and None when there is no line."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return dict(old), None
    line = json.loads(path.read_text().strip().splitlines()[-1])
    chosen = {k: line["chosen"][k] for k in old}
    return chosen, {k: line[k] for k in PROVENANCE if k in line}


def _selection(chosen: dict[str, Any], source: dict[str, Any] | None, args: Any) -> dict[str, Any]:
    """What a main benchmark says of its settings: chosen on validation (a full tune line, a full run) or not."""
    return {"validation_selected": source is not None and not source.get("quick") and not args.quick,
            "tuned": chosen, "tune": source}


@dataclass
class Candidate:
    """One candidate setting of a tune, trained on the training images less validation, scored on validation."""

    setting: dict[str, Any]
    config: Config
    final: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0


def validation_data(config: Config) -> tuple[ArrayDataset, ArrayDataset]:
    """The training images less the validation split, and the validation split, exactly as the main benchmark's
    runs hold it out (``data.validation_fraction``); the test set is dropped unread."""
    experiment = Experiment(config)
    train, _ = experiment.load_data()
    kept, validation = experiment.split_validation(train)
    if validation is None:
        raise ValueError("choosing on validation needs data.validation_fraction > 0")
    return kept, validation


def run_candidate(args: Any, task: dict[str, Any], name: str, extra: dict[str, Any], setting: dict[str, Any],
                  data: tuple[ArrayDataset, ArrayDataset]) -> Candidate:
    """Train one candidate. The run is handed the validation images as its test set: whatever it evaluates
    (every round's figures, the final metrics) is computed on validation, and it never holds the test set."""
    config = _config(args, task, name, {**TUNE_RUN, **extra, **setting})
    candidate = Candidate(setting, config)
    label = "-".join(f"{k.split('.')[-1]}{v}" for k, v in setting.items())
    t0 = time.perf_counter()
    try:
        result = Experiment(config, train=data[0], test=data[1], quiet=True).run(
            run_dir=Path(args.out) / f"{name}-{label}-{int(time.time())}")
        candidate.final, candidate.rows = result.final, result.rows
    except RunFailed as exc:  # diverged: never chosen
        candidate.error = str(exc).split(". ")[0]
    candidate.wall_s = round(time.perf_counter() - t0, 1)
    return candidate


def fd_curve(candidate: Candidate) -> dict[int, float]:
    """A GAN candidate's validation FD at each evaluated round (its run's test slot held the validation images)."""
    if candidate.error is not None:
        return {}
    values = {int(r["round"]): r.get("test_fd") for r in candidate.rows}
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def choose_gan(candidates: list[Candidate]) -> tuple[Candidate, int, float]:
    """The (candidate, round) with the lowest validation FD, ties to the earlier round, then the first listed;
    failed runs are never chosen."""
    best: tuple[Candidate, int, float] | None = None
    for candidate in candidates:
        for rnd, fd in fd_curve(candidate).items():
            if best is None or (fd, rnd) < (best[2], best[1]):
                best = (candidate, rnd, fd)
    if best is None:
        raise RuntimeError("every candidate failed: " + "; ".join(f"{c.setting}: {c.error}" for c in candidates))
    return best


def gan_tune(args: Any) -> dict[str, Any]:
    """The GAN's Adam lr and round count, chosen by FD against the validation images (FedGAN, Rasouli et al.
    2020; FD, Heusel et al. 2017)."""
    t0 = time.perf_counter()
    rounds, every = (2, 1) if args.quick else (GAN_TUNE_ROUNDS, GAN_TUNE_EVERY)
    extra = {"run.rounds": rounds, "run.eval_every": every, "gan.eval_samples": GAN_TUNE_SAMPLES,
             "gan.final_samples": GAN_TUNE_SAMPLES}
    data = validation_data(_config(args, GAN, "gan-tune"))
    grid = [{"gan.lr": lr} for lr in (GAN_TUNE_LR[:2] if args.quick else GAN_TUNE_LR)]
    candidates = [run_candidate(args, GAN, "gan-tune", extra, g, data) for g in grid]
    best, best_round, best_fd = choose_gan(candidates)
    return {
        "chosen": {**best.setting, "run.rounds": best_round},
        "rule": f"the (lr, round) with the lowest FD of {min(GAN_TUNE_SAMPLES, len(data[1]))} generated images "
                "against the validation images (every eval round), ties to the earlier round; features of the "
                "classifier trained on the training images less validation; the runs never see the test set",
        "validation_fd": best_fd,
        "candidates": [{"setting": c.setting, "validation_fd_per_round": fd_curve(c), "error": c.error,
                        "wall_s": c.wall_s} for c in candidates],
        "tune_rounds": rounds,
        "eval_every": every,
        "fd_samples": min(GAN_TUNE_SAMPLES, len(data[1])),
        "train_examples": len(data[0]),
        "validation_examples": len(data[1]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": best.config.to_dict(),
    }


def _probe_score(candidate: Candidate) -> float | None:
    """A MAE candidate's validation probe accuracy (None: failed)."""
    value = candidate.final.get("probe_acc")
    ok = candidate.error is None and isinstance(value, (int, float)) and math.isfinite(value)
    return float(value) if ok else None


def choose_mae(candidates: list[Candidate]) -> Candidate:
    """The candidate with the best validation probe accuracy, ties to the lower validation masked MSE (then the
    first listed); failed runs are never chosen."""
    usable = [c for c in candidates if _probe_score(c) is not None]
    if not usable:
        raise RuntimeError("every candidate failed: " + "; ".join(f"{c.setting}: {c.error}" for c in candidates))
    return max(usable, key=lambda c: (_probe_score(c), -float(c.final.get("final_masked_mse", math.inf))))


def mae_tune(args: Any) -> dict[str, Any]:
    """The MAE's local Adam lr and server lr, chosen by the linear probe's validation accuracy (He et al. 2022)."""
    t0 = time.perf_counter()
    rounds = 2 if args.quick else MAE_TUNE_ROUNDS
    extra = {"run.rounds": rounds, "run.eval_every": 0, "mae.extra_pools": ""}
    data = validation_data(_config(args, MAE, "mae-tune"))
    grid = MAE_TUNE[:2] if args.quick else MAE_TUNE
    candidates = [run_candidate(args, MAE, "mae-tune", extra, g, data) for g in grid]
    best = choose_mae(candidates)
    return {
        "chosen": best.setting,
        "rule": "the best probe accuracy on the validation images (the probe fitted on the training images' "
                "features, its L2 penalty chosen on a seeded 10% of those), ties to the lower validation masked "
                "MSE; the runs never see the test set",
        "validation_probe_acc": _probe_score(best),
        "validation_pixel_probe_acc": best.final.get("pixel_probe_acc"),
        "probe_l2": best.final.get("probe_l2"),
        "pixel_probe_l2": best.final.get("pixel_probe_l2"),
        "candidates": [{"setting": c.setting, "validation_probe_acc": _probe_score(c),
                        "validation_masked_mse": c.final.get("final_masked_mse"), "probe_l2": c.final.get("probe_l2"),
                        "error": c.error, "wall_s": c.wall_s} for c in candidates],
        "tune_rounds": rounds,
        "for_rounds": MAE["run.rounds"],
        "train_examples": len(data[0]),
        "validation_examples": len(data[1]),
        "wall_s": round(time.perf_counter() - t0, 1),
        "config": best.config.to_dict(),
    }


BENCHMARKS = {"vae": bench_vae, "mae": bench_mae, "mae-untrained": bench_mae_untrained, "gan": bench_gan,
              "mae-tune": mae_tune, "gan-tune": gan_tune}
