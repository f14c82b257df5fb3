"""Functional local training: SGD over a parameter dict with ``torch.func.functional_call``.

The loop is written once. Two parts are pluggable so that privacy mechanisms reuse it:
the *batch sampler* (shuffled epochs, or Poisson sampling for DP-SGD) and the *gradient
estimator* (the mean-loss gradient, or clipped and noised per-example gradients).
FedProx is the proximal term ``mu/2 ||w - w_global||^2``, applied through its gradient;
``correction`` is a constant vector added to every local gradient (SCAFFOLD's ``c - c_i``,
FedDyn's linear term), set by the algorithm for one round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from fedguard.algorithms.update_rules import SGDRule, UpdateRule
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset

LossOf = Callable[[Params, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


class BatchSampler(Protocol):
    """Yields the example indices of each local step."""

    def __call__(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]: ...


class GradientEstimator(Protocol):
    """Turns a batch into (gradients, mean loss) for the current parameters."""

    def __call__(
        self,
        loss_of: LossOf,
        params: Params,
        batch: tuple[torch.Tensor, torch.Tensor],
        generator: torch.Generator,
    ) -> tuple[list[torch.Tensor], float]: ...


@dataclass
class ShuffledEpochs:
    """``epochs`` passes over the data in a fresh random order, batches of ``batch_size``."""

    epochs: int = 1
    batch_size: int = 32

    def __call__(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator)
            yield from order.split(self.batch_size)


def mean_loss_gradient(
    loss_of: LossOf,
    params: Params,
    batch: tuple[torch.Tensor, torch.Tensor],
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], float]:
    """The ordinary gradient of the batch's mean loss."""
    loss = loss_of(params, batch)
    grads = torch.autograd.grad(loss, list(params.values()))
    return list(grads), float(loss.detach())


@dataclass
class LocalSGD:
    """A client's local training: the one loop, with slots for the batch sampler, the gradient
    estimator and the update rule (SGD with momentum by default), plus weight decay, the FedProx
    term and an algorithm's gradient correction.

    ``steps_limit`` caps local steps (None: as many as the sampler yields).
    """

    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0
    steps_limit: int | None = None
    sampler: BatchSampler = field(default_factory=ShuffledEpochs)
    gradient: GradientEstimator = mean_loss_gradient
    #: this round's factor on the learning rate (the server's schedule); ``lr`` stays the base
    lr_scale: float = 1.0
    #: a constant added to every gradient (by parameter name), set by the algorithm; None: nothing
    correction: Params | None = None
    #: how gradients change the parameters (None: SGD with ``momentum``; the generative tasks use Adam)
    rule: UpdateRule | None = None

    def scaled(self, lr_scale: float) -> LocalSGD:
        """This optimiser with the round's learning-rate factor (the base ``lr`` unchanged)."""
        return replace(self, lr_scale=lr_scale)

    def train(
        self,
        task,
        model: nn.Module,
        params: Params,
        data: ArrayDataset,
        generator: torch.Generator,
    ) -> tuple[Params, dict[str, float]]:
        """Train from ``params`` on ``data``; returns new parameters and loss statistics."""
        start = {k: v.detach() for k, v in params.items()}
        current = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        tensors = list(current.values())
        step = (self.rule or SGDRule(self.momentum)).begin(tensors, self.lr * self.lr_scale)

        def loss_of(p: Params, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return task.loss(model, p, batch)

        losses: list[float] = []
        for idx in self.sampler(len(data), generator):
            if self.steps_limit is not None and len(losses) >= self.steps_limit:
                break
            batch = (data.x[idx], data.y[idx])
            grads, loss = self.gradient(loss_of, current, batch, generator)
            losses.append(loss)
            with torch.no_grad():
                step(self._regularise(grads, tensors, start))
        trained = {k: v.detach() for k, v in current.items()}
        mean = sum(losses) / len(losses) if losses else float("nan")
        return trained, {"train_loss": mean, "steps": float(len(losses))}

    def _regularise(self, grads: list[torch.Tensor], tensors: list[torch.Tensor], start: Params) -> list[torch.Tensor]:
        if self.weight_decay:
            grads = torch._foreach_add(grads, tensors, alpha=self.weight_decay)
        if self.prox_mu:
            diff = torch._foreach_sub(tensors, list(start.values()))
            grads = torch._foreach_add(grads, diff, alpha=self.prox_mu)
        if self.correction is not None:
            grads = torch._foreach_add(grads, [self.correction[k] for k in start])
        return list(grads)


def corrected(trainer: object, correction: Params, what: str, **changes: float) -> LocalSGD:
    """``trainer`` with a gradient ``correction`` (and other field ``changes``) for one round.

    ``what`` names the algorithm in the error raised for a trainer without the slot (a task's own loop).
    """
    if not isinstance(trainer, LocalSGD):
        raise TypeError(f"{what} adds a correction to every local gradient, which needs the engine's LocalSGD "
                        f"trainer; got {type(trainer).__name__}")
    return replace(trainer, correction=correction, **changes)
