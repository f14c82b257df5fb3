"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): one algorithm, FedAvg being FedProx with mu = 0.

Each sampled client k starts from the global model w^t and minimises, with its local optimiser,

    h_k(w) = F_k(w) + mu / 2 * ||w - w^t||^2

then sends ``w_k - w^t``; the server applies the weighted mean with its optimiser (FedAvg:
``w^{t+1} = w^t + eta * mean_k(w_k - w^t)``). The proximal term ``mu (w - w^t)`` is added to
every local gradient by the trainer (``train.prox_mu``), so it applies to any local optimiser
(the engine's SGD, the generative tasks' Adam).
"""

from __future__ import annotations

from typing import Any

from fedguard.core.algorithm import ModelDelta
from fedguard.core.pipeline import ConfigurationError


class FedProx(ModelDelta):
    """FedAvg's round; with ``mu > 0`` the local objective carries FedProx's proximal term."""

    def __init__(self, mu: float = 0.0, name: str = "fedavg") -> None:
        self.mu, self.name = mu, name

    def describe(self) -> dict[str, Any]:
        return {"algorithm": self.name, "prox_mu": self.mu}


def build(config: Any) -> FedProx:
    """FedAvg, or FedProx with ``train.prox_mu`` (``algorithm.name = fedprox`` requires mu > 0)."""
    name, mu = config.algorithm.name, config.train.prox_mu
    if name == "fedprox" and mu <= 0:
        raise ConfigurationError("algorithm.name = 'fedprox' needs its proximal weight: set train.prox_mu > 0 "
                                 "(e.g. 0.01); with train.prox_mu = 0 it is FedAvg")
    return FedProx(mu, "fedprox" if mu > 0 else "fedavg")
