"""The lower bound: the same federated training as a bare PyTorch loop, no fedguard machinery.

Same partition, same client sampling, same model init, same local SGD; the global model
is the example-weighted average of the clients' models. Nothing is serialised, no worker
processes, no pipeline: only what any FedAvg simulation must do.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def train_round(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    client_sets: list[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int,
) -> dict[str, torch.Tensor]:
    """One FedAvg round over the given clients' (x, y); returns the new global state."""
    total = sum(len(y) for _, y in client_sets)
    new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for x, y in client_sets:
        model.load_state_dict(global_state)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        for _ in range(epochs):
            for idx in torch.randperm(len(y)).split(batch_size):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        weight = len(y) / total
        with torch.no_grad():
            for k, v in model.state_dict().items():
                new_state[k].add_(v, alpha=weight)
    return new_state


def run_bare(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    parts: list[np.ndarray],
    schedule: list[list[int]],
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int = 1,
) -> tuple[nn.Module, list[float]]:
    """All rounds; returns the final model and each round's seconds."""
    clients = [(train_x[torch.as_tensor(p)], train_y[torch.as_tensor(p)]) for p in parts]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = []
    for sampled in schedule:
        t0 = time.perf_counter()
        state = train_round(model, state, [clients[c] for c in sampled], batch_size, lr, momentum, epochs)
        seconds.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return model, seconds


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in batches of 1,000."""
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)
