"""Server optimisers of Reddi et al. 2021, "Adaptive Federated Optimization".

The aggregate update ``delta`` (mean of ``x_client - x_global``) is the negative
pseudo-gradient. With ``m_{-1} = 0`` and ``v_{-1} = tau^2``:

* FedAvg:     x += eta * delta
* FedAvgM:    m = beta1 * m + delta;                        x += eta * m
* FedAdagrad: m = beta1 * m + (1 - beta1) * delta;  v = v + delta^2
* FedAdam:    m = ...;  v = beta2 * v + (1 - beta2) * delta^2
* FedYogi:    m = ...;  v = v - (1 - beta2) * delta^2 * sign(v - delta^2)
* adaptive:   x += eta * m / (sqrt(v) + tau)
"""

from __future__ import annotations

from typing import Any

import torch

from fedguard.core.pipeline import ServerOptimizer
from fedguard.core.types import Params


class FedAvgServer(ServerOptimizer):
    """Plain FedAvg: add the aggregate update, scaled by the server learning rate."""

    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, params: Params, delta: Params) -> Params:
        return {k: params[k] + self.lr * delta[k] for k in params}


class FedAvgM(ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019)."""

    name = "fedavgm"

    def __init__(self, lr: float = 1.0, momentum: float = 0.9) -> None:
        self.lr, self.momentum = lr, momentum
        self.m: Params = {}

    def step(self, params: Params, delta: Params) -> Params:
        if not self.m:
            self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        for k in params:
            self.m[k] = self.momentum * self.m[k] + delta[k]
        return {k: params[k] + self.lr * self.m[k] for k in params}

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = dict(state.get("m", {}))


class _Adaptive(ServerOptimizer):
    """Shared first moment and update of FedAdagrad, FedAdam and FedYogi."""

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: Params = {}
        self.v: Params = {}

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, params: Params, delta: Params) -> Params:
        if not self.m:
            self.m = {k: torch.zeros_like(p) for k, p in params.items()}
            self.v = {k: torch.full_like(p, self.tau**2) for k, p in params.items()}
        out: Params = {}
        for k, p in params.items():
            d = delta[k]
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * d
            self.v[k] = self.second_moment(self.v[k], d * d)
            out[k] = p + self.lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


class FedAdagrad(_Adaptive):
    """FedAdagrad: v accumulates squared updates."""

    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2


class FedAdam(_Adaptive):
    """FedAdam: v is an exponential average of squared updates."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2


class FedYogi(_Adaptive):
    """FedYogi: additive, sign-controlled second-moment update."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


SERVER_OPTIMIZERS = {
    "fedavg": FedAvgServer,
    "fedavgm": FedAvgM,
    "fedadagrad": FedAdagrad,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def build_server_optimizer(
    name: str, lr: float, momentum: float, beta1: float, beta2: float, tau: float
) -> ServerOptimizer:
    """A server optimiser by name with the configured hyper-parameters."""
    if name == "fedavg":
        return FedAvgServer(lr)
    if name == "fedavgm":
        return FedAvgM(lr, momentum)
    if name in SERVER_OPTIMIZERS:
        return SERVER_OPTIMIZERS[name](lr, beta1, beta2, tau)
    raise ValueError(f"server optimizer must be one of {sorted(SERVER_OPTIMIZERS)}; got {name!r}")
