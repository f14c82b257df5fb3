"""Generative benchmarks: VAE, MAE and GAN, federated (10 clients, label-Dirichlet 0.5) vs the
centralized baseline (one client holding all the data, same rounds and local epochs).

    python benchmarks/run.py vae   # fed_iwae_nll, central_iwae_nll (nats, lower is better)
    python benchmarks/run.py mae   # fed_probe_acc, central_probe_acc, pixel_probe_acc
    python benchmarks/run.py mae-untrained   # the same probes on the untrained encoder (diagnostic)
    python benchmarks/run.py gan   # fed_fd, central_fd, real_fd (FD in MNIST-classifier features)

``--quick`` shrinks each run (embedded mnist-5k, 3 rounds) for CI; README figures use full runs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from fedguard import Experiment
from fedguard.config import Config
from fedguard.experiment import RunResult

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
    "mae.lr": 5e-4,
    "server.lr": 1.5,
    "train.lr_schedule": "cosine",
}
GAN = {
    "task.name": "gan",
    "run.rounds": 30,
    "run.eval_every": 5,
    "gan.hidden": 256,
    "gan.latent": 64,
    "gan.lr": 4e-4,
    "gan.eval_samples": 2000,
    "gan.final_samples": 10000,
    "run.threads": 0,
}
QUICK = {"data.dataset": "mnist-5k", "run.rounds": 3, "run.eval_every": 1}


def _config(args: Any, task: dict[str, Any], name: str) -> Config:
    values = {**FEDERATED, **task, **(QUICK if args.quick else {}), "run.name": name, "run.out_dir": args.out}
    if not args.quick:
        values["data.data_dir"] = args.data_dir
    values.update(item.split("=", 1) for item in getattr(args, "set", None) or [])
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
    """MAE: linear-probe accuracy of the encoder (federated, centralized) vs raw pixels."""
    result, config, wall = _run(args, MAE, "bench-mae")
    fed, central = result.final, result.baseline.final
    return {
        "fed_probe_acc": fed["probe_acc"],
        "central_probe_acc": central["probe_acc"],
        "pixel_probe_acc": fed["pixel_probe_acc"],
        "fed_probe_acc_mean": fed["probe_acc_mean"],
        "central_probe_acc_mean": central["probe_acc_mean"],
        "fed_masked_mse": fed["final_masked_mse"],
        "central_masked_mse": central["final_masked_mse"],
        "model_params": _params(result),
        **wall,
        "run_dir": str(result.run_dir),
        "config": config.to_dict(),
    }


def bench_mae_untrained(args: Any) -> dict[str, Any]:
    """MAE diagnostic: the same probes on the untrained (seeded) encoder of the `mae` workload,
    i.e. what the architecture's random features alone give."""
    from fedguard import builders

    config = _config(args, MAE, "bench-mae-untrained")
    t0 = time.perf_counter()
    train, test = Experiment(config).load_data()
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
    """GAN: FD in MNIST-classifier features, federated vs centralized vs real train images."""
    result, config, wall = _run(args, GAN, "bench-gan")
    fed, central = result.final, result.baseline.final
    sanity = _fd_sanity(config, int(fed["final_fd_samples"]))
    return {
        "fed_fd": fed["final_fd"],
        "central_fd": central["final_fd"],
        "real_fd": sanity.pop("real"),
        "fd_classifier_test_acc": sanity.pop("classifier_test_acc"),
        **{f"{k}_fd": v for k, v in sanity.items()},
        "fd_samples": fed["final_fd_samples"],
        "model_params": _params(result),
        **wall,
        "run_dir": str(result.run_dir),
        "config": config.to_dict(),
    }


def _fd_sanity(config: Config, n: int) -> dict[str, float]:
    """FD of real training images (and of noise, collapsed sets) against the test images, and
    the feature classifier's test accuracy."""
    from fedguard.tasks.frechet import ClassifierSettings, FrechetScorer, accuracy, feature_classifier, sanity_scores

    train, test = Experiment(config).load_data()
    net, _ = feature_classifier(train, ClassifierSettings(epochs=config.gan.fd_epochs))
    with torch.no_grad():
        scores = sanity_scores(FrechetScorer(net), train, test, n)
    return {**scores, "classifier_test_acc": accuracy(net, test)}


BENCHMARKS = {"vae": bench_vae, "mae": bench_mae, "mae-untrained": bench_mae_untrained, "gan": bench_gan}
