"""Membership inference: was this example in the training data of a released model or of a client's update?

* Loss threshold: Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting" (CSF): members have lower loss; the score is ``-loss``.
* Offline LiRA: Carlini, Chien, Nasr, Song, Terzis, Tramer 2022, "Membership Inference Attacks
  From First Principles" (S&P), Algorithm 1 without IN models: the attacker trains shadow models
  on its own data (never on the targets), fits a Gaussian to each target's logit-scaled confidence
  ``phi = log(p_y / (1 - p_y))`` under those OUT models and scores the one-sided test
  ``(phi_target - mu_out) / sigma_out`` (higher: member). With few shadow models the variance is
  pooled over all examples, as the paper recommends ("fixed variance").
* Against one client's update: the server holds the round's global parameters and the client's
  update, so it scores ``loss(global) - loss(global + update)`` (the drop the client's training
  caused), a loss-difference attack in the spirit of Yeom et al. applied to the update.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedguard.data.arrays import ArrayDataset
from fedguard.types import Params

__all__ = ["per_example", "loss_threshold_scores", "lira_offline_scores", "update_scores"]


@torch.no_grad()
def per_example(model: nn.Module, params: Params, data: ArrayDataset,
                batch: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Each example's cross-entropy loss and logit-scaled confidence ``phi`` (computed stably from logits)."""
    losses, phis = [], []
    for start in range(0, len(data), batch):
        x, y = data.x[start : start + batch], data.y[start : start + batch]
        logits = functional_call(model, params, (x,)).double()
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], float("-inf"))
        phis.append(true - torch.logsumexp(others, 1))
    return torch.cat(losses).numpy(), torch.cat(phis).numpy()


def loss_threshold_scores(losses: np.ndarray) -> np.ndarray:
    """Yeom et al. 2018: the lower the loss, the likelier a member (thresholds swept by the ROC)."""
    return -np.asarray(losses, dtype=np.float64)


def lira_offline_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, fixed_variance: bool = True) -> np.ndarray:
    """Offline LiRA (Carlini et al. 2022): ``(phi - mu_out) / sigma_out`` per example.

    ``shadow_phi`` is (shadow models, examples), from models that never trained on the examples.
    """
    shadow_phi = np.asarray(shadow_phi, dtype=np.float64)
    mu = shadow_phi.mean(0)
    if fixed_variance or shadow_phi.shape[0] < 2:
        sigma = np.full_like(mu, max(float(np.std(shadow_phi - mu)), 1e-6))
    else:
        sigma = np.maximum(shadow_phi.std(0, ddof=1), 1e-6)
    return (np.asarray(target_phi, dtype=np.float64) - mu) / sigma


def update_scores(model: nn.Module, global_params: Params, update: Params, data: ArrayDataset) -> np.ndarray:
    """The curious server on one client's update: how much the update lowered each example's loss."""
    local = {k: global_params[k] + update[k].to(global_params[k].dtype) for k in global_params}
    before, _ = per_example(model, global_params, data)
    after, _ = per_example(model, local, data)
    return before - after
