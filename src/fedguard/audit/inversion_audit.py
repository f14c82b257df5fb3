"""``fedguard audit inversion``: the curious server inverts what one client's round sends it.

The victim is client 0 of the configured run; its first ``images`` examples are split into
updates of ``per_update`` images (the configured batch size and local steps). Each update is
produced by the real client code (:func:`~fedguard.audit.knowledge.observe_update`: local SGD,
and DP-SGD or DP-FedAvg clipping and noise when configured); the attack sees only that update,
or, with secure aggregation, only the sum of the ``secagg_clients`` updates of the round (the
victim's and those of ``secagg_clients - 1`` other clients, each on their own first examples),
which it divides by the number of clients it ran the protocol with (FedAvg's mean; the batch
label counts are read from it) and matches by simulating each client's local training.
Single-example updates are attacked with iDLG, the rest with Inverting Gradients. Reported:
PSNR and SSIM of each true image against its best-matching reconstruction, and the noise
floor (a uniform random image against the truth).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedguard.config import Config
from fedguard.experiment import Experiment

from .image_metrics import best_match, psnr, ssim
from .inversion import InvertingGradientsConfig, dlg, inverting_gradients
from .knowledge import AttackKnowledge, knowledge_of, observe_update, sum_updates

__all__ = ["InversionResult", "attack_run", "constant_floor", "noise_floor"]


@dataclass
class InversionResult:
    """Per-image figures of one attacked configuration, and the reconstructions."""

    label: str
    psnr: list[float]
    ssim: list[float]
    truth: torch.Tensor
    reconstructed: torch.Tensor
    label_accuracy: float
    attack: str
    knowledge: dict[str, Any]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Medians and per-image figures (JSON-ready)."""
        return {
            "psnr_median": round(statistics.median(self.psnr), 3),
            "ssim_median": round(statistics.median(self.ssim), 4),
            "psnr": [round(v, 2) for v in self.psnr],
            "ssim": [round(v, 4) for v in self.ssim],
            "label_accuracy": round(self.label_accuracy, 3),
            "attack": self.attack,
            "knowledge": self.knowledge,
            "wall_s": round(self.wall_s, 1),
            **self.extra,
        }


def _attack(knowledge: AttackKnowledge, update: dict[str, torch.Tensor], count: int,
            ig: InvertingGradientsConfig, dlg_iterations: int, seed: int):
    if count == 1 and knowledge.steps == 1:
        return dlg(knowledge, update, iterations=dlg_iterations, restarts=ig.restarts, seed=seed), "iDLG"
    cfg = InvertingGradientsConfig(ig.iterations, ig.restarts, ig.lr, ig.tv, seed, ig.warm_start)
    return inverting_gradients(knowledge, update, count, cfg), "inverting-gradients"


def attack_run(config: Config, images: int = 16, label: str = "", secagg_clients: int = 0,
               ig: InvertingGradientsConfig | None = None, dlg_iterations: int = 200) -> InversionResult:
    """Attack client 0's updates in the configured run (round 1, the seeded initial global model).

    ``secagg_clients`` 0 takes ``server.clients_per_round`` (or all clients) when ``secure.mode`` is
    not ``none``; then the attack sees only the sum of that many clients' updates.
    """
    ig = ig or InvertingGradientsConfig(seed=config.run.seed)
    secure = getattr(config, "secure", None)
    hidden = secure is not None and secure.mode != "none"
    if hidden:  # the client updates are computed in plaintext; the server's view is their sum
        config = copy.deepcopy(config)
        config.secure.mode = "none"
        secagg_clients = secagg_clients or config.server.clients_per_round or config.data.num_clients
    t0 = time.perf_counter()
    setup = Experiment(config).assemble()
    global_params = {k: v.detach().clone() for k, v in setup.model.state_dict().items()}
    victim = setup.client_data(0)
    images = min(images, len(victim))
    per_update = min(config.train.batch_size * max(config.train.max_steps, 1), images) \
        if config.train.max_steps else min(config.train.batch_size, images)
    chunks = [list(range(a, min(a + per_update, images))) for a in range(0, images, per_update)]
    group = secagg_clients if hidden else 1
    truth, recon, labels_ok = [], [], []
    attack_name, knowledge = "", knowledge_of(setup, global_params, per_update)
    for first in range(0, len(chunks), group):
        # one round: each victim chunk is one client's update; with secure aggregation up to ``group`` of them
        # (topped up with other clients' updates on their own first examples) reach the server only as a sum
        mine = chunks[first : first + group]
        data = victim.subset([i for c in mine for i in c], "victim")
        updates = [observe_update(setup, victim.subset(c, "victim"), global_params, client_id=0) for c in mine]
        updates += [observe_update(setup, setup.client_data(c).subset(list(range(per_update)), "other"),
                                   global_params, client_id=c) for c in range(1, group - len(mine) + 1)]
        count = per_update * len(updates)
        knowledge = knowledge_of(setup, global_params, per_update)
        update = sum_updates(updates)
        if hidden:  # the server ran SecAgg with these clients: it knows their number and divides (FedAvg's mean)
            knowledge = AttackKnowledge(**{**knowledge.__dict__, "num_examples": count, "clients": len(updates)})
            knowledge.notes = {"sees": f"the sum of {group} clients' updates (secure aggregation), "
                                       "attacked as their mean"}
            update = {k: v / len(updates) for k, v in update.items()}
        result, attack_name = _attack(knowledge, update, count, ig, dlg_iterations, config.run.seed + first)
        truth.append(data.x)
        recon.append(result.images[best_match(result.images, data.x)])
        true_labels, got = data.y.tolist(), result.labels.tolist()
        labels_ok.append(sum(min(true_labels.count(c), got.count(c)) for c in set(true_labels)) / len(true_labels))
    truth_t, recon_t = torch.cat(truth), torch.cat(recon)
    return InversionResult(
        label or _describe(config, hidden),
        [psnr(r, t) for r, t in zip(recon_t, truth_t, strict=True)],
        [ssim(r, t) for r, t in zip(recon_t, truth_t, strict=True)],
        truth_t, recon_t, statistics.fmean(labels_ok), attack_name, knowledge.describe(),
        time.perf_counter() - t0,
        {"images": images, "per_update": per_update, "secagg_clients": secagg_clients if hidden else 0},
    )


def noise_floor(truth: torch.Tensor, seed: int = 0) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of uniform random images against the truth: what a reconstruction knowing nothing scores."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(truth.shape, generator=generator)
    pairs = list(zip(noise, truth, strict=True))
    return [psnr(n, t) for n, t in pairs], [ssim(n, t) for n, t in pairs]


def constant_floor(truth: torch.Tensor, guess: torch.Tensor) -> tuple[list[float], list[float]]:
    """PSNR and SSIM of one fixed image against each true image: a blank image, or the data's mean image (a guess
    knowing only the distribution). On MNIST these score far above a uniform random image: a reconstruction must
    beat them, not only the noise floor, to show that anything was recovered."""
    return [psnr(guess, t) for t in truth], [ssim(guess, t) for t in truth]


def _describe(config: Config, hidden: bool) -> str:
    dp = getattr(config, "dp", None)
    parts = [f"dp={dp.mode}" if dp is not None and dp.mode != "none" else "plaintext"]
    if hidden:
        parts.append("secure aggregation")
    return ", ".join(parts)


def write_outputs(results: list[InversionResult], out_dir: Path, floor: tuple[list[float], list[float]]) -> Path:
    """The picture grid (true | each reconstruction) in ``out_dir``."""
    from .pictures import save_grid

    rows = {"true": results[0].truth, **{r.label: r.reconstructed for r in results}}
    captions = {r.label: [f"{p:.1f} dB" for p in r.psnr] for r in results}
    return save_grid(rows, out_dir / "inversion.png", captions)
