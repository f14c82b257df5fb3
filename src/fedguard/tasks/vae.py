"""Variational autoencoder (Kingma & Welling 2014) as a federated task.

Encoder q(z|x) = N(mu(x), diag(exp(logvar(x)))), decoder p(x|z) (Bernoulli, or Gaussian with
a fixed or learned scalar std), prior p(z) = N(0, I). The training loss is the negative
beta-ELBO per image, ``-E_q[log p(x|z)] + beta * KL(q(z|x) || p(z))``, with the
reparameterisation ``z = mu + exp(logvar / 2) * eps``. Evaluation reports, in nats per image,
the negative ELBO (beta = 1) and the importance-weighted bound of Burda et al. 2016 with k
samples, ``-log (1/k) sum_j p(x, z_j) / q(z_j|x)``, an upper bound on -log p(x) that is
never above the negative ELBO (in expectation) and tightens as k grows.
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
from fedguard.tasks.generative_common import local_update, save_image_grid, save_image_rows, sub_params
from fedguard.types import Params

LOG_2PI = math.log(2 * math.pi)


class VAE(nn.Module):
    """MLP encoder/decoder: ``d -> hidden -> 2*latent`` and ``latent -> hidden -> d``."""

    def __init__(self, shape: tuple[int, ...], hidden: int = 400, latent: int = 20, learn_std: bool = False) -> None:
        super().__init__()
        self.shape, self.latent = tuple(shape), latent
        d = math.prod(shape)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))
        if learn_std:
            self.log_std = nn.Parameter(torch.full((1,), math.log(0.1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder output: ``[mu, logvar]`` concatenated (B, 2 * latent)."""
        return self.encoder(x)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per row, in nats."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def log_likelihood(x: torch.Tensor, out: torch.Tensor, likelihood: str,
                   std: torch.Tensor | float = 1.0) -> torch.Tensor:
    """log p(x|z) per row, summed over pixels; ``x`` and decoder output ``out`` are (..., d).

    Bernoulli: ``out`` are logits. Gaussian: the mean is ``sigmoid(out)`` and ``std`` is the
    per-pixel standard deviation.
    """
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(-1)
    if likelihood == "gaussian":
        std_t = torch.as_tensor(std, dtype=out.dtype)
        z = (x - torch.sigmoid(out)) / std_t
        return (-0.5 * z.pow(2) - torch.log(std_t) - 0.5 * LOG_2PI).sum(-1)
    raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")


def negative_elbo(
    x: torch.Tensor, out: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, likelihood: str,
    beta: float = 1.0, std: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``(-log p(x|z) + beta * KL, -log p(x|z), KL)`` for one sample z per row."""
    nll = -log_likelihood(x, out, likelihood, std)
    kl = gaussian_kl(mu, logvar)
    return nll + beta * kl, nll, kl


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))) summed over the last axis."""
    return (-0.5 * (LOG_2PI + logvar + (z - mu).pow(2) / logvar.exp())).sum(-1)


class VAETask(Task):
    """Federated VAE on images in [0, 1]; see the module docstring for the objective."""

    name = "vae"
    primary_metric = "iwae_nll"
    higher_is_better = False

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int = 400,
        latent: int = 20,
        beta: float = 1.0,
        likelihood: str = "bernoulli",
        binarize: bool = True,
        gaussian_std: float = 0.0,
        iwae_k: int = 100,
        eval_examples: int = 2000,
        optimizer: str = "adam",
        lr: float = 1e-3,
    ) -> None:
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be bernoulli or gaussian, got {likelihood!r}")
        self.shape, self.hidden, self.latent, self.beta = tuple(shape), hidden, latent, beta
        self.likelihood, self.gaussian_std = likelihood, gaussian_std
        self.binarize = binarize and likelihood == "bernoulli"
        self.iwae_k, self.eval_examples = iwae_k, eval_examples
        self.optimizer, self.lr = optimizer, lr

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        learn = self.likelihood == "gaussian" and self.gaussian_std <= 0
        return VAE(self.shape, self.hidden, self.latent, learn_std=learn)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the likelihood sees them: flattened, thresholded at 0.5 if binarized."""
        flat = x.flatten(1)
        return (flat > 0.5).to(flat.dtype) if self.binarize else flat

    def std(self, params: Params) -> torch.Tensor | float:
        """The Gaussian decoder's std (learned or fixed); unused for Bernoulli."""
        if "log_std" in params:
            return params["log_std"].exp()
        return self.gaussian_std if self.gaussian_std > 0 else 1.0

    def encode(self, model: nn.Module, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x)."""
        h = functional_call(model.encoder, sub_params(params, "encoder"), (x,))
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, model: nn.Module, params: Params, z: torch.Tensor) -> torch.Tensor:
        """Decoder output (logits, or pre-sigmoid means) for latent codes ``z``."""
        return functional_call(model.decoder, sub_params(params, "decoder"), (z,))

    def terms(self, model: nn.Module, params: Params, x: torch.Tensor, beta: float,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image (-beta-ELBO, reconstruction NLL, KL) with one reparameterised sample."""
        target = self.prepare(x)
        mu, logvar = self.encode(model, params, x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps
        out = self.decode(model, params, z)
        return negative_elbo(target, out, mu, logvar, self.likelihood, beta, self.std(params))

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        return self.terms(model, params, batch[0], self.beta)[0].mean()

    def local_train(self, model: nn.Module, params: Params, data: ArrayDataset, trainer: Any,
                    generator: torch.Generator) -> tuple[Params, dict[str, float]]:
        return local_update(self, model, params, data, trainer, generator, self.optimizer, self.lr)

    # -- metrics --------------------------------------------------------------------------------
    @torch.no_grad()
    def iwae_nll(self, model: nn.Module, params: Params, x: torch.Tensor, k: int,
                 generator: torch.Generator) -> torch.Tensor:
        """Per-image importance-weighted bound ``-log (1/k) sum_j p(x, z_j) / q(z_j|x)``."""
        target = self.prepare(x)
        mu, logvar = self.encode(model, params, x)
        eps = torch.randn((k, *mu.shape), generator=generator, dtype=mu.dtype)
        z = mu + (0.5 * logvar).exp() * eps  # (k, B, latent)
        out = self.decode(model, params, z)
        log_px = log_likelihood(target.expand(k, *target.shape), out, self.likelihood, self.std(params))
        log_pz = (-0.5 * (LOG_2PI + z.pow(2))).sum(-1)
        log_w = log_px + log_pz - log_normal(z, mu, logvar)
        return -(torch.logsumexp(log_w, dim=0) - math.log(k))

    @torch.no_grad()
    def metrics(self, model: nn.Module, params: Params, data: ArrayDataset, k: int,
                batch_size: int = 100) -> dict[str, float]:
        """Mean -ELBO, its two terms and the k-sample IWAE bound (nats per image) on ``data``."""
        gen = torch.Generator().manual_seed(0)
        sums = {"neg_elbo": 0.0, "recon_nll": 0.0, "kl": 0.0, "iwae_nll": 0.0}
        for start in range(0, len(data), batch_size):
            x = data.x[start : start + batch_size]
            neg, nll, kl = self.terms(model, params, x, 1.0, gen)
            sums["neg_elbo"] += float(neg.sum())
            sums["recon_nll"] += float(nll.sum())
            sums["kl"] += float(kl.sum())
            sums["iwae_nll"] += float(self.iwae_nll(model, params, x, k, gen).sum())
        n = max(len(data), 1)
        return {key: value / n for key, value in sums.items()}

    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        n = self.eval_examples
        subset = data if not n or n >= len(data) else data.subset(torch.arange(n))
        return self.metrics(model, params, subset, self.iwae_k)

    def final_metrics(self, model: nn.Module, params: Params, train: ArrayDataset,
                      test: ArrayDataset) -> dict[str, float]:
        full = self.metrics(model, params, test, self.iwae_k)
        return {f"final_{k}": v for k, v in full.items()} | {"final_iwae_k": float(self.iwae_k),
                                                               "final_examples": float(len(test))}

    # -- pictures -------------------------------------------------------------------------------
    def mean_image(self, model: nn.Module, params: Params, z: torch.Tensor) -> torch.Tensor:
        """Decoder mean for ``z`` as images in [0, 1]."""
        return torch.sigmoid(self.decode(model, params, z)).reshape(len(z), *self.shape)

    @torch.no_grad()
    def report_figures(self, model: nn.Module, params: Params, data: ArrayDataset, out_dir: Path,
                       tag: str) -> list[tuple[str, Path]]:
        gen = torch.Generator().manual_seed(0)
        samples = self.mean_image(model, params, torch.randn(64, self.latent, generator=gen))
        figs = [("VAE: samples from the prior (decoder means)",
                 save_image_grid(samples, out_dir / f"vae_samples_{tag}.png", 8))]
        x = data.x[:16]
        mu, _ = self.encode(model, params, x)
        recon = self.mean_image(model, params, mu)
        shown = self.prepare(x).reshape(x.shape)
        figs.append(("VAE: test images (top) and their reconstructions (bottom, decoder mean at z = mu)",
                     save_image_rows([("test", shown), ("recon", recon)], out_dir / f"vae_recon_{tag}.png", 16)))
        figs.append(("VAE: latent interpolation between pairs of test images (z = mu, linear path)",
                     self._interpolation(model, params, data, out_dir / f"vae_interp_{tag}.png")))
        return figs

    def _interpolation(self, model: nn.Module, params: Params, data: ArrayDataset, path: Path) -> Path:
        rows = []
        for a, b in _pairs_of_different_labels(data, 4):
            mu, _ = self.encode(model, params, data.x[[a, b]])
            t = torch.linspace(0, 1, 10).unsqueeze(1)
            z = (1 - t) * mu[0] + t * mu[1]
            rows.append((f"{int(data.y[a])}->{int(data.y[b])}", self.mean_image(model, params, z)))
        return save_image_rows(rows, path, 10)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "hidden": self.hidden, "latent": self.latent, "beta": self.beta,
                "likelihood": self.likelihood, "binarize": self.binarize, "iwae_k": self.iwae_k}


def _pairs_of_different_labels(data: ArrayDataset, count: int) -> list[tuple[int, int]]:
    """``count`` disjoint pairs of consecutive examples with different labels."""
    pairs, i = [], 0
    while len(pairs) < count and i + 1 < len(data):
        j = i + 1
        while j < len(data) and int(data.y[j]) == int(data.y[i]):
            j += 1
        if j < len(data):
            pairs.append((i, j))
        i = j + 1
    return pairs
