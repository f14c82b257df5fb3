"""Update rules of the one local-training loop (:class:`~fedguard.algorithms.local_sgd.LocalSGD`).

A rule turns each step's (regularised) gradients into a change of the parameters. It is
started afresh every round (:meth:`UpdateRule.begin`): a client's optimiser state does not
outlive its round, as in FedAvg. SGD with heavy-ball momentum is the engine's default; Adam
(Kingma and Ba 2015) serves the generative tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

#: one step: apply these gradients (one per tensor) to the tensors the rule was begun with
Step = Callable[[list[torch.Tensor]], None]


class UpdateRule(Protocol):
    """Makes the step function of one round over ``tensors`` at learning rate ``lr``."""

    def begin(self, tensors: list[torch.Tensor], lr: float) -> Step: ...


@dataclass
class SGDRule:
    """SGD with heavy-ball momentum: ``v = momentum * v + g`` (v starts at the first g); ``w -= lr * v``."""

    momentum: float = 0.0

    def begin(self, tensors: list[torch.Tensor], lr: float) -> Step:
        velocity: list[torch.Tensor] | None = None

        @torch.no_grad()
        def step(grads: list[torch.Tensor]) -> None:
            nonlocal velocity
            if self.momentum:
                if velocity is None:
                    velocity = [g.clone() for g in grads]
                else:
                    torch._foreach_mul_(velocity, self.momentum)
                    torch._foreach_add_(velocity, grads)
                grads = velocity
            torch._foreach_add_(tensors, grads, alpha=-lr)

        return step


@dataclass
class AdamRule:
    """Adam with fresh moments each round."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def begin(self, tensors: list[torch.Tensor], lr: float) -> Step:
        return Adam(tensors, lr, self.betas, self.eps).step


class Adam:
    """Adam (Kingma & Ba 2015) over a list of tensors, stepped with given gradients.

    Same update as ``torch.optim.Adam`` without weight decay; written out because
    constructing a ``torch.optim`` optimiser imports torch's compiler stack, which costs
    seconds in every fresh worker process.
    """

    def __init__(self, tensors: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.tensors, self.lr, self.betas, self.eps = tensors, lr, betas, eps
        self.m = [torch.zeros_like(t) for t in tensors]
        self.v = [torch.zeros_like(t) for t in tensors]
        self.t = 0

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """Apply one update with ``grads`` (one per tensor)."""
        self.t += 1
        b1, b2 = self.betas
        torch._foreach_lerp_(self.m, grads, 1 - b1)
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, grads, grads, value=1 - b2)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1 - b2**self.t))
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.tensors, self.m, denom, value=-self.lr / (1 - b1**self.t))

    def minimise(self, loss: torch.Tensor) -> float:
        """One step down the gradient of ``loss`` with respect to this optimiser's tensors."""
        self.step(list(torch.autograd.grad(loss, self.tensors)))
        return float(loss.detach())


