"""Federated GAN (FedGAN, Rasouli et al. 2020): generator and discriminator both trained
locally on each client, both aggregated by the server each round with the configured
aggregator (they are one ``nn.Module``, so one parameter dict with ``generator.`` and
``discriminator.`` prefixes goes through the ordinary update pipeline).

Each local step takes a batch of the client's real images, updates the discriminator on it
and on as many generated images, then updates the generator against the updated
discriminator (Adam for both, fresh moments each round). Losses, on discriminator logits:

* ``nonsaturating`` (Goodfellow et al. 2014): D: ``softplus(-D(x)) + softplus(D(G(z)))``;
  G: ``softplus(-D(G(z)))``
* ``hinge`` (Lim & Ye 2017): D: ``relu(1 - D(x)) + relu(1 + D(G(z)))``; G: ``-D(G(z))``
* ``lsgan`` (Mao et al. 2017): D: ``((D(x) - 1)^2 + D(G(z))^2) / 2``; G: ``(D(G(z)) - 1)^2 / 2``

Sampling needs only the generator and fresh noise, never client data. Quality is the
Frechet distance to the test images in the features of a classifier of the same domain
(:mod:`fedguard.tasks.frechet`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Batch, Task
from fedguard.tasks.frechet import FrechetScorer, frechet_distance
from fedguard.tasks.generative_common import (
    Adam,
    lr_scale_of,
    save_image_grid,
    save_image_rows,
    seed_from,
    seeded_global_rng,
    sub_params,
)
from fedguard.types import Params

GAN_LOSSES = ["nonsaturating", "hinge", "lsgan"]
GRID_SEED = 1234
EVAL_SEED = 4321


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's mean loss on logits of real and generated images."""
    if kind == "nonsaturating":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind == "lsgan":
        return 0.5 * ((real - 1).pow(2).mean() + fake.pow(2).mean())
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The generator's mean loss on the discriminator's logits of generated images."""
    if kind == "nonsaturating":
        return F.softplus(-fake).mean()
    if kind == "hinge":
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * (fake - 1).pow(2).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


class GAN(nn.Module):
    """MLP generator ``latent -> h -> 2h -> d`` (sigmoid) and discriminator ``d -> 2h -> h -> 1``,
    LeakyReLU(0.2). The generator normalises its hidden layers with ``g_norm``: ``batch``
    (BatchNorm on the statistics of the batch being generated, never running averages, so the
    model holds parameters only), ``layer`` or ``none``; the discriminator may use dropout."""

    def __init__(self, shape: tuple[int, ...], latent: int = 64, hidden: int = 256, g_norm: str = "batch",
                 d_dropout: float = 0.0) -> None:
        super().__init__()
        self.shape, self.latent = tuple(shape), latent
        d = math.prod(shape)

        def g_block(i: int, o: int) -> list[nn.Module]:
            norms = {"layer": [nn.LayerNorm(o)], "batch": [nn.BatchNorm1d(o, track_running_stats=False)], "none": []}
            norm: list[nn.Module] = norms[g_norm]
            return [nn.Linear(i, o), *norm, nn.LeakyReLU(0.2)]

        def d_block(i: int, o: int) -> list[nn.Module]:
            drop: list[nn.Module] = [nn.Dropout(d_dropout)] if d_dropout > 0 else []
            return [nn.Linear(i, o), nn.LeakyReLU(0.2), *drop]

        self.generator = nn.Sequential(
            *g_block(latent, hidden), *g_block(hidden, 2 * hidden), nn.Linear(2 * hidden, d), nn.Sigmoid(),
            nn.Unflatten(1, self.shape),
        )
        self.discriminator = nn.Sequential(
            nn.Flatten(), *d_block(d, 2 * hidden), *d_block(2 * hidden, hidden), nn.Linear(hidden, 1), nn.Flatten(0),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images for latent codes ``z``."""
        return self.generator(z)


class GANTask(Task):
    """FedGAN on images in [0, 1]; the quality metric is ``fd`` (lower is better)."""

    name = "gan"
    primary_metric = "fd"
    higher_is_better = False

    def __init__(self, shape: tuple[int, ...], scorer: FrechetScorer, latent: int = 64, hidden: int = 256,
                 g_norm: str = "batch", d_dropout: float = 0.0, loss: str = "nonsaturating", d_steps: int = 1,
                 lr: float = 4e-4, beta1: float = 0.5,
                 eval_samples: int = 2000, final_samples: int = 10000, feature_name: str = "classifier") -> None:
        if loss not in GAN_LOSSES:
            raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {loss!r}")
        self.shape, self.scorer, self.latent, self.hidden = tuple(shape), scorer, latent, hidden
        self.g_norm, self.d_dropout = g_norm, d_dropout
        self.kind, self.d_steps, self.lr, self.beta1 = loss, d_steps, lr, beta1
        self.eval_samples, self.final_samples, self.feature_name = eval_samples, final_samples, feature_name
        #: per (image set, size): the set itself (so that its id stays unique) and its feature statistics
        self._ref: dict[tuple[int, int], tuple[ArrayDataset, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.progress: dict[int, torch.Tensor] = {}

    def build_model(self) -> nn.Module:
        return GAN(self.shape, self.latent, self.hidden, self.g_norm, self.d_dropout)

    # -- losses -----------------------------------------------------------------------------------
    def generate(self, model: nn.Module, params: Params, z: torch.Tensor) -> torch.Tensor:
        """Images from latent codes ``z`` under ``params``."""
        return functional_call(model.generator, sub_params(params, "generator"), (z,))

    def critic(self, model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Discriminator logits (B,) of images ``x`` under ``params``."""
        return functional_call(model.discriminator, sub_params(params, "discriminator"), (x,))

    def d_loss(self, model: nn.Module, params: Params, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Discriminator loss on ``real`` and on images generated from ``z`` (no gradient to G)."""
        with torch.no_grad():
            fake = self.generate(model, params, z)
        return discriminator_loss(self.critic(model, params, real), self.critic(model, params, fake), self.kind)

    def g_loss(self, model: nn.Module, params: Params, z: torch.Tensor) -> torch.Tensor:
        """Generator loss for images generated from ``z``."""
        return generator_loss(self.critic(model, params, self.generate(model, params, z)), self.kind)

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """The discriminator's loss on ``batch`` (training alternates; see :meth:`local_train`)."""
        x = batch[0]
        return self.d_loss(model, params, x, torch.randn(len(x), self.latent))

    def local_train(self, model: nn.Module, params: Params, data: ArrayDataset, trainer: Any,
                    generator: torch.Generator) -> tuple[Params, dict[str, float]]:
        """Alternating D and G Adam steps over the trainer's batches of the client's images."""
        current = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        d_keys = [k for k in current if k.startswith("discriminator.")]
        g_keys = [k for k in current if k.startswith("generator.")]
        lr = self.lr * lr_scale_of(trainer)
        opt_d = Adam([current[k] for k in d_keys], lr, (self.beta1, 0.999))
        opt_g = Adam([current[k] for k in g_keys], lr, (self.beta1, 0.999))
        limit = getattr(trainer, "steps_limit", None)
        d_losses, g_losses = [], []
        with seeded_global_rng(seed_from(generator)):
            for idx in trainer.sampler(len(data), generator):
                if limit is not None and len(g_losses) >= limit:
                    break
                real = data.x[idx]
                for _ in range(self.d_steps):
                    z = torch.randn(len(real), self.latent)
                    d_losses.append(opt_d.minimise(self.d_loss(model, current, real, z)))
                g_losses.append(opt_g.minimise(self.g_loss(model, current, torch.randn(len(real), self.latent))))
        trained = {k: v.detach() for k, v in current.items()}
        d_mean = sum(d_losses) / len(d_losses) if d_losses else float("nan")
        g_mean = sum(g_losses) / len(g_losses) if g_losses else float("nan")
        return trained, {"train_loss": d_mean, "d_loss": d_mean, "g_loss": g_mean, "steps": float(len(g_losses))}

    # -- metrics ----------------------------------------------------------------------------------
    @torch.no_grad()
    def samples(self, model: nn.Module, params: Params, n: int, seed: int, batch_size: int = 1000) -> torch.Tensor:
        """``n`` generated images from noise seeded with ``seed`` (no data involved)."""
        z = torch.randn(n, self.latent, generator=torch.Generator().manual_seed(seed))
        return torch.cat([self.generate(model, params, z[i : i + batch_size]) for i in range(0, n, batch_size)])

    def reference(self, data: ArrayDataset, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature statistics of the first ``n`` images of ``data``, computed once per image set and size (a run
        with a validation split scores the validation and the test images at the same size: neither may be
        scored against the other's statistics)."""
        n = min(n, len(data))
        key = (id(data), n)
        if key not in self._ref:
            self._ref[key] = (data, self.scorer.stats(data.x[:n]))
        return self._ref[key][1]

    def fd(self, model: nn.Module, params: Params, data: ArrayDataset, n: int) -> float:
        """FD between ``n`` generated images and the first ``n`` images of ``data``."""
        n = min(n, len(data))
        return frechet_distance(*self.scorer.stats(self.samples(model, params, n, EVAL_SEED)), *self.reference(data, n))

    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        return {"fd": self.fd(model, params, data, self.eval_samples)}

    def final_metrics(self, model: nn.Module, params: Params, train: ArrayDataset,
                      test: ArrayDataset) -> dict[str, float]:
        n = min(self.final_samples, len(test))
        return {"final_fd": self.fd(model, params, test, n), "final_fd_samples": float(n)}

    # -- pictures ---------------------------------------------------------------------------------
    def on_evaluate(self, model: nn.Module, params: Params, round: int, out_dir: Path) -> None:
        """Keep the fixed-noise samples of this round for the progress figure, and save them."""
        grid = self.samples(model, params, 64, GRID_SEED)
        self.progress[round] = grid[:16]
        save_image_grid(grid, out_dir / "gan_rounds" / f"round_{round:04d}.png", 8, f"round {round}")

    def report_figures(self, model: nn.Module, params: Params, data: ArrayDataset, out_dir: Path,
                       tag: str) -> list[tuple[str, Path]]:
        grid = self.samples(model, params, 64, GRID_SEED)
        figs = [(f"GAN: 64 samples of the final generator (fixed noise); FD in {self.feature_name} features",
                 save_image_grid(grid, out_dir / f"gan_samples_{tag}.png", 8))]
        if self.progress:
            rounds = _spread(sorted(self.progress), 6)
            rows = [(f"round {r}", self.progress[r]) for r in rounds]
            figs.append(("GAN: the same 16 noise vectors at several rounds (progress)",
                         save_image_rows(rows, out_dir / f"gan_progress_{tag}.png", 16)))
        return figs

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "latent": self.latent, "hidden": self.hidden, "g_norm": self.g_norm,
                "d_dropout": self.d_dropout, "loss": self.kind,
                "d_steps": self.d_steps, "fd_features": self.feature_name}


def _spread(items: list[int], count: int) -> list[int]:
    """Up to ``count`` items evenly spread over ``items``, always with the first and last."""
    if len(items) <= count:
        return items
    picks = {items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)
