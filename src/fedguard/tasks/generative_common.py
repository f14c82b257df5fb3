"""Pieces shared by the generative tasks (VAE, MAE, GAN): seeded randomness, local Adam (the
engine's one local loop with the Adam rule), image grids for the run report.

Randomness inside a loss (a VAE's reparameterisation noise, an MAE's masks, a GAN's latent
codes) comes from torch's global generator, re-seeded from the client's own generator at the
start of each local update (:func:`seeded_global_rng`), so a run is reproducible whichever
worker process trains which client.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedguard.algorithms.local_sgd import LocalSGD
from fedguard.algorithms.update_rules import Adam as Adam  # re-exported: the GAN and FID probes step with it
from fedguard.algorithms.update_rules import AdamRule
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset

OPTIMIZERS = ["adam", "sgd"]


def seed_from(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (advances it)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with torch's global CPU generator seeded, restoring it afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def single_thread() -> Iterator[None]:
    """Run a block with one torch thread, restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def adam_local_train(
    task: Any,
    model: nn.Module,
    params: Params,
    data: ArrayDataset,
    trainer: Any,
    generator: torch.Generator,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> tuple[Params, dict[str, float]]:
    """A client's local update with Adam (fresh moments each round) instead of SGD.

    The engine's one local loop (:class:`~fedguard.algorithms.local_sgd.LocalSGD`) with the
    Adam update rule: batches, the gradient estimator (e.g. DP-SGD's clipped, noised
    per-example gradients), the step cap, weight decay and the FedProx term all come from the
    engine's ``trainer``, so privacy mechanisms apply unchanged; only the update rule differs.
    """
    adam = LocalSGD(
        lr=lr,
        weight_decay=getattr(trainer, "weight_decay", 0.0),
        prox_mu=getattr(trainer, "prox_mu", 0.0),
        steps_limit=getattr(trainer, "steps_limit", None),
        sampler=trainer.sampler,
        gradient=trainer.gradient,
        correction=getattr(trainer, "correction", None),
        rule=AdamRule(betas),
    )
    return adam.train(task, model, params, data, generator)


def local_update(
    task: Any,
    model: nn.Module,
    params: Params,
    data: ArrayDataset,
    trainer: Any,
    generator: torch.Generator,
    optimizer: str,
    lr: float,
) -> tuple[Params, dict[str, float]]:
    """The configured local update (Adam or the engine's SGD), with seeded loss randomness."""
    with seeded_global_rng(seed_from(generator)):
        if optimizer == "adam":
            return adam_local_train(task, model, params, data, trainer, generator, lr * lr_scale_of(trainer))
        return trainer.train(task, model, params, data, generator)


def lr_scale_of(trainer: Any) -> float:
    """The round's learning-rate factor the engine's trainer carries (1 without a schedule)."""
    return float(getattr(trainer, "lr_scale", 1.0))


def sub_params(params: Params, prefix: str) -> Params:
    """The entries of ``params`` under ``prefix.`` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in params.items() if k.startswith(prefix + ".")}


def bound_model(model: nn.Module, params: Params) -> nn.Module:
    """A copy of ``model`` holding ``params`` (to call methods other than ``forward``)."""
    copy = deepcopy(model)
    with torch.no_grad():
        for name, p in copy.named_parameters():
            p.copy_(params[name])
    return copy


def _as_grid(images: torch.Tensor, nrow: int, pad: int = 1) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] tiled into one (H', W') or (H', W', 3) array."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    ncol = nrow
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(c, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid[0] if c == 1 else grid.permute(1, 2, 0)


def save_image_rows(rows: list[tuple[str, torch.Tensor]], path: Path, ncol: int, title: str = "") -> Path:
    """Save labelled rows of images (each (N, C, H, W) in [0, 1]) as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    height = len(rows) * 0.45 * _height(rows[0][1], ncol) + 0.6
    fig, axes = plt.subplots(len(rows), 1, figsize=(ncol * 0.45 + 1.2, height))
    axes_list = [axes] if len(rows) == 1 else list(axes)
    for ax, (label, images) in zip(axes_list, rows, strict=True):
        ax.imshow(_as_grid(images, ncol).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _height(images: torch.Tensor, ncol: int) -> int:
    return (len(images) + ncol - 1) // ncol


def save_image_grid(images: torch.Tensor, path: Path, ncol: int = 8, title: str = "") -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid."""
    return save_image_rows([("", images)], path, ncol, title)
