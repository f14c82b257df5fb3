"""Registers the generative tasks: their config sections ``[vae]``, ``[mae]``, ``[gan]`` and
their builders for ``task.name = "vae" | "mae" | "gan"``.

Imported once by :mod:`fedguard.plugins`. Each task is an ordinary :class:`~fedguard.tasks.base.Task`;
the engine has no special path for any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedguard.builders import TASK_BUILDERS
from fedguard.config import Config, option, register_section
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Task
from fedguard.tasks.generative_common import OPTIMIZERS

POOLS = ["tokens", "mean", "grid"]

ADAM_HELP = "Local update rule: adam, or sgd (the engine's LocalSGD: train.lr, train.momentum)."


@dataclass
class VAEConfig:
    """[vae] the variational autoencoder task (task.name = "vae")."""

    hidden: int = option(400, "Width of the encoder's and the decoder's hidden layer.", min=1)
    latent: int = option(20, "Latent dimensions.", min=1)
    beta: float = option(1.0, "KL weight in the training loss (1: the ELBO); metrics always use 1.", min=0.0)
    likelihood: str = option("bernoulli", "Decoder likelihood p(x|z).", choices=["bernoulli", "gaussian"])
    binarize: bool = option(True, "Bernoulli only: threshold pixels at 0.5 so that log p(x) is a discrete likelihood.")
    gaussian_std: float = option(0.0, "Gaussian only: the decoder's per-pixel std (0: one learned scalar).", min=0.0)
    iwae_k: int = option(100, "Importance samples k of the IWAE log-likelihood bound.", min=1)
    eval_examples: int = option(2000, "Test images per evaluation round (0: all); final metrics use all.", min=0)
    optimizer: str = option("adam", ADAM_HELP, choices=OPTIMIZERS)
    lr: float = option(1e-3, "Local Adam learning rate (optimizer=adam).", min=0.0)


def build_vae(config: Config, train: ArrayDataset) -> Task:
    """The VAE task for images shaped like ``train``'s."""
    from fedguard.tasks.vae import VAETask

    c = config.vae
    return VAETask(tuple(train.x.shape[1:]), c.hidden, c.latent, c.beta, c.likelihood, c.binarize,
                   c.gaussian_std, c.iwae_k, c.eval_examples, c.optimizer, c.lr)


register_section("vae", VAEConfig)
TASK_BUILDERS["vae"] = build_vae


@dataclass
class MAEConfig:
    """[mae] the masked autoencoder task (task.name = "mae")."""

    patch: int = option(7, "Patch side in pixels (must divide the image side).", min=1)
    mask_ratio: float = option(0.75, "Share of patches hidden from the encoder.", min=0.0, max=0.99)
    norm_pix_loss: bool = option(False, "Reconstruct each patch's normalised pixels (minus its mean, over its std; "
                                 "He et al. 2022); masked_mse is then in those units.")
    dim: int = option(128, "Encoder width.", min=1)
    depth: int = option(4, "Encoder transformer blocks.", min=1)
    heads: int = option(4, "Attention heads of the encoder (the decoder always has 4).", min=1)
    decoder_dim: int = option(64, "Decoder width.", min=1)
    decoder_depth: int = option(1, "Decoder transformer blocks.", min=1)
    pool: str = option("tokens", "Encoder features of the linear probe: all patch tokens concatenated (tokens), "
                       "their mean (mean) or their means per image quarter (grid).", choices=POOLS)
    extra_pools: list[str] = option([], "More pools to probe as well, reported as probe_acc_<pool>.")
    probe_examples: int = option(0, "Labelled training images the linear probe is fitted on (0: all).", min=0)
    probe_iters: int = option(300, "L-BFGS iterations of the linear probe.", min=1)
    probe_l2: float = option(1e-4, "L2 penalty of the linear probe (when probe_l2_grid is empty).", min=0.0)
    probe_l2_grid: list[float] = option(
        [], "L2 penalties to choose from on a held-out 10% of the probe's training images (each probe, the "
        "raw-pixel one too, picks its own; empty: use probe_l2)."
    )
    eval_examples: int = option(2000, "Test images per evaluation round (0: all); final metrics use all.", min=0)
    optimizer: str = option("adam", ADAM_HELP, choices=OPTIMIZERS)
    lr: float = option(1e-3, "Local Adam learning rate (optimizer=adam).", min=0.0)


def build_mae(config: Config, train: ArrayDataset) -> Task:
    """The MAE task for images shaped like ``train``'s."""
    from fedguard.tasks.mae import MAETask

    c = config.mae
    return MAETask(tuple(train.x.shape[1:]), c.patch, c.dim, c.depth, c.heads, c.decoder_dim, c.decoder_depth,
                   c.mask_ratio, c.pool, tuple(c.extra_pools), c.probe_examples, c.probe_iters, c.probe_l2,
                   c.eval_examples, c.optimizer, c.lr, tuple(float(v) for v in c.probe_l2_grid),
                   c.norm_pix_loss)


register_section("mae", MAEConfig)
TASK_BUILDERS["mae"] = build_mae


@dataclass
class GANConfig:
    """[gan] the federated GAN task (task.name = "gan")."""

    latent: int = option(64, "Generator noise dimensions.", min=1)
    hidden: int = option(256, "Width h of the MLPs (G: latent-h-2h-image, D: image-2h-h-1).", min=1)
    g_norm: str = option("batch", "Generator hidden-layer normalisation (batch: statistics of the generated batch, "
                         "no running averages).", choices=["batch", "layer", "none"])
    d_dropout: float = option(0.0, "Dropout after each discriminator hidden layer.", min=0.0, max=0.9)
    loss: str = option("nonsaturating", "GAN loss.", choices=["nonsaturating", "hinge", "lsgan"])
    d_steps: int = option(1, "Discriminator steps per generator step.", min=1)
    lr: float = option(4e-4, "Adam learning rate of both networks (2e-4, the DCGAN value, trained slower; "
                       "see docs/generative.md).", min=0.0)
    beta1: float = option(0.5, "Adam beta1 of both networks.", min=0.0, max=0.999)
    eval_samples: int = option(2000, "Generated and test images per evaluation round's FD.", min=2)
    final_samples: int = option(10000, "Generated and test images of the final FD.", min=2)
    fd_epochs: int = option(2, "Epochs of the FD feature classifier (trained once per dataset, then cached).", min=1)


def build_gan(config: Config, train: ArrayDataset) -> Task:
    """The GAN task, with the FD feature classifier of ``train`` (cached after the first run)."""
    from fedguard.tasks.frechet import ClassifierSettings, FrechetScorer, feature_classifier
    from fedguard.tasks.gan import GANTask

    c = config.gan
    net, _ = feature_classifier(train, ClassifierSettings(epochs=c.fd_epochs))
    return GANTask(tuple(train.x.shape[1:]), FrechetScorer(net), c.latent, c.hidden, c.g_norm, c.d_dropout,
                   c.loss, c.d_steps, c.lr, c.beta1, c.eval_samples, c.final_samples,
                   f"{config.data.dataset}-classifier")


register_section("gan", GANConfig)
TASK_BUILDERS["gan"] = build_gan
