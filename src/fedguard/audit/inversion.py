"""Gradient inversion by the honest-but-curious server, on what it receives from one client.

* DLG / iDLG: Zhu, Liu, Han 2019, "Deep Leakage from Gradients" (NeurIPS), with the label read
  from the last layer as in Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients":
  for one example under cross-entropy, the last linear layer's weight gradient is
  ``(softmax - onehot) h^T`` with ``h >= 0`` after a ReLU, so the true class is the only row with
  a negative sum. The image is fitted by L-BFGS on the squared distance of the gradients.
* Inverting Gradients: Geiping, Bauermeister, Droege, Moeller 2020 (NeurIPS): cosine distance
  between the observed and the simulated update plus a total-variation prior, Adam on the signed
  gradient with step decay at 3/8, 5/8, 7/8 of the iterations, the images kept in the data box,
  several restarts and the one with the lowest objective kept (the attacker cannot see PSNR).
  A multi-step FedAvg update is matched by unrolling the client's local SGD (the attacker knows
  steps, batch size, lr and momentum; it assumes consecutive batches in its own order).

Batch labels are inferred from the last bias's gradient, the mean of ``softmax - onehot``: a
class's count is estimated as ``B (1/C - g_c)`` (a near-uniform softmax, as at initialisation),
rounded by largest remainder to sum to ``B``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedguard.types import Params

from .knowledge import AttackKnowledge

__all__ = [
    "Reconstruction", "InvertingGradientsConfig", "infer_labels", "simulate_update", "dlg", "inverting_gradients",
]


@dataclass
class InvertingGradientsConfig:
    """Geiping et al. 2020's attack settings (their defaults: 4,800 iterations, 8 restarts, TV 1e-4 to 1e-2)."""

    iterations: int = 1200
    restarts: int = 2
    lr: float = 0.1
    tv: float = 1e-4
    seed: int = 0
    #: multi-step updates: the share of iterations spent on the one-step approximation first
    warm_start: float = 0.5


@dataclass
class Reconstruction:
    """The attacker's images and labels, and how well its objective was met."""

    images: torch.Tensor
    labels: torch.Tensor
    objective: float
    history: list[float] = field(default_factory=list)


def _last_layer(knowledge: AttackKnowledge, update: Params) -> tuple[str, str]:
    """Names of the last linear layer's weight and bias (the one with num_classes outputs)."""
    names = list(update)
    for i in range(len(names) - 1, 0, -1):
        w, b = names[i - 1], names[i]
        if update[w].dim() == 2 and update[w].shape[0] == knowledge.num_classes and update[b].dim() == 1:
            return w, b
    raise ValueError("no final linear layer with num_classes outputs: the label heuristics do not apply")


def observed_gradient(knowledge: AttackKnowledge, update: Params) -> Params:
    """The mean gradient an update amounts to: ``-update / (lr * steps)`` (exact for one SGD step)."""
    scale = -1.0 / (knowledge.lr * max(knowledge.steps, 1))
    return {k: v * scale for k, v in update.items()}


def infer_labels(knowledge: AttackKnowledge, update: Params, count: int) -> torch.Tensor:
    """``count`` labels from the last layer: iDLG's sign rule for one example, bias counts for a batch."""
    grad = observed_gradient(knowledge, update)
    w, b = _last_layer(knowledge, update)
    if count == 1:
        return grad[w].sum(1).argmin().reshape(1)
    c = knowledge.num_classes
    estimate = torch.clamp(count * (1.0 / c - grad[b].double()), min=0)
    if float(estimate.sum()) <= 0:
        estimate = torch.ones(c, dtype=torch.float64)
    estimate = estimate * count / estimate.sum()
    counts = estimate.floor().long()
    remainder = estimate - counts
    for idx in torch.argsort(remainder, descending=True)[: count - int(counts.sum())]:
        counts[idx] += 1
    return torch.repeat_interleave(torch.arange(c), counts)


def simulate_update(knowledge: AttackKnowledge, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                    create_graph: bool = True) -> Params:
    """The client's update on ``(x, y)`` as the attacker simulates it: ``steps`` SGD steps (with momentum)
    on consecutive batches of ``batch_size``, differentiable in ``x``. With ``knowledge.clients > 1`` the
    mean of that many clients' updates, each on its consecutive share of ``x`` (one step: one step on all
    of ``x``, the same thing for equal shares)."""
    groups = knowledge.clients
    if groups <= 1 or x.shape[0] % groups:
        return _local_sgd(knowledge, model, x, y, create_graph, knowledge.batch_size)
    if knowledge.steps == 1:
        return _local_sgd(knowledge, model, x, y, create_graph, x.shape[0])
    size = x.shape[0] // groups
    parts = [_local_sgd(knowledge, model, x[i * size : (i + 1) * size], y[i * size : (i + 1) * size], create_graph,
                        knowledge.batch_size) for i in range(groups)]
    return {k: torch.stack([p[k] for p in parts]).mean(0) for k in parts[0]}


def _local_sgd(knowledge: AttackKnowledge, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               create_graph: bool, batch_size: int) -> Params:
    params = {k: v.detach().requires_grad_(True) for k, v in knowledge.global_params.items()}
    start = {k: v.detach() for k, v in params.items()}
    buf: dict[str, torch.Tensor] = {}
    n, bs = x.shape[0], max(1, min(batch_size, x.shape[0]))
    for step in range(knowledge.steps):
        first = (step * bs) % n
        idx = torch.arange(first, first + bs) % n
        loss = F.cross_entropy(functional_call(model, params, (x[idx],)), y[idx])
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        new = {}
        for (k, p), g in zip(params.items(), grads, strict=True):
            buf[k] = g if k not in buf or knowledge.momentum == 0 else knowledge.momentum * buf[k] + g
            new[k] = p - knowledge.lr * buf[k]
        params = new
    return {k: params[k] - start[k] for k in params}


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation (mean absolute difference of neighbouring pixels)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def _flat(params: Params, keys: list[str]) -> torch.Tensor:
    return torch.cat([params[k].reshape(-1) for k in keys])


def _start(knowledge: AttackKnowledge, count: int, generator: torch.Generator) -> torch.Tensor:
    low, high = knowledge.input_range
    return low + (high - low) * torch.rand((count, *knowledge.input_shape), generator=generator)


def _lbfgs_fit(knowledge: AttackKnowledge, model: torch.nn.Module, labels: torch.Tensor, keys: list[str],
               target: torch.Tensor, start: torch.Tensor, iterations: int) -> tuple[torch.Tensor, list[float]]:
    """One DLG restart: L-BFGS (strong Wolfe line search) on ``||g(x) - g||^2``, x kept in the data box."""
    x = start.requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=20, history_size=100, line_search_fn="strong_wolfe")
    low, high = knowledge.input_range

    def closure() -> torch.Tensor:
        opt.zero_grad()
        sim = observed_gradient(knowledge, simulate_update(knowledge, model, x, labels))
        loss = ((_flat(sim, keys) - target) ** 2).sum()
        loss.backward()
        return loss

    history: list[float] = []
    for _ in range(max(1, iterations // 20)):
        history.append(float(opt.step(closure).detach()))
        with torch.no_grad():
            x.clamp_(low, high)
        if not math.isfinite(history[-1]):
            return x.detach(), history
    history.append(float(closure().detach()))
    return x.detach(), history


def dlg(knowledge: AttackKnowledge, update: Params, iterations: int = 300, restarts: int = 2,
        seed: int = 0) -> Reconstruction:
    """iDLG on a single-example update: label from the last layer, image by L-BFGS on ||g' - g||^2."""
    model = knowledge.model_fn()
    labels = infer_labels(knowledge, update, 1)
    keys = list(update)
    target = _flat(observed_gradient(knowledge, update), keys).detach()
    generator = torch.Generator().manual_seed(seed)
    best: Reconstruction | None = None
    for _ in range(restarts):
        x, history = _lbfgs_fit(knowledge, model, labels, keys, target, _start(knowledge, 1, generator), iterations)
        final = history[-1] if history else math.inf
        if math.isfinite(final) and (best is None or final < best.objective):
            best = Reconstruction(x, labels, final, history)
    if best is None:
        best = Reconstruction(_start(knowledge, 1, generator), labels, math.inf)
    return best


def inverting_gradients(knowledge: AttackKnowledge, update: Params, count: int,
                        config: InvertingGradientsConfig | None = None,
                        labels: torch.Tensor | None = None) -> Reconstruction:
    """Geiping et al. 2020 on an update from ``count`` images (one step or a multi-step FedAvg update)."""
    cfg = config or InvertingGradientsConfig()
    model = knowledge.model_fn()
    labels = infer_labels(knowledge, update, count) if labels is None else labels
    keys = list(update)
    target = _flat(update, keys).detach()
    generator = torch.Generator().manual_seed(cfg.seed)
    # multi-step updates: first fit the one-step approximation (lr * steps on the whole batch; cheap), then
    # refine on the exact unrolled local training
    warm = int(cfg.iterations * cfg.warm_start) if knowledge.steps > 1 else 0
    approx = AttackKnowledge(**{**knowledge.__dict__, "steps": 1, "lr": knowledge.lr * knowledge.steps,
                                "batch_size": count, "momentum": 0.0, "clients": 1})
    best: Reconstruction | None = None
    for _ in range(cfg.restarts):
        x = _start(knowledge, count, generator)
        history: list[float] = []
        if warm:
            x, history = _adam_phase(approx, model, labels, keys, target, x, warm, cfg)
        x, rest = _adam_phase(knowledge, model, labels, keys, target, x, cfg.iterations - warm, cfg)
        with torch.enable_grad():
            sim = _flat(simulate_update(knowledge, model, x, labels, create_graph=False), keys)
        final = float(_cosine_objective(sim, target, x, cfg.tv).detach())
        if math.isfinite(final) and (best is None or final < best.objective):
            best = Reconstruction(x.detach().clone(), labels, final, history + rest)
    if best is None:
        best = Reconstruction(_start(knowledge, count, generator), labels, math.inf)
    return best


def _cosine_objective(sim: torch.Tensor, target: torch.Tensor, x: torch.Tensor, tv: float) -> torch.Tensor:
    """Geiping et al.'s objective: ``1 - cos(sim, target) + tv * TV(x)``."""
    return 1 - (sim @ target) / (sim.norm() * target.norm() + 1e-12) + tv * total_variation(x)


def _adam_phase(knowledge: AttackKnowledge, model: torch.nn.Module, labels: torch.Tensor, keys: list[str],
                target: torch.Tensor, start: torch.Tensor, iterations: int,
                cfg: InvertingGradientsConfig) -> tuple[torch.Tensor, list[float]]:
    """Adam on the signed gradient, step decay at 3/8, 5/8, 7/8, images clamped to the data box."""
    x = start.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)], 0.1)
    low, high = knowledge.input_range
    history: list[float] = []
    for _ in range(iterations):
        opt.zero_grad()
        loss = _cosine_objective(_flat(simulate_update(knowledge, model, x, labels), keys), target, x, cfg.tv)
        loss.backward()
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(low, high)
        history.append(float(loss.detach()))
    return x.detach(), history


def describe(config: InvertingGradientsConfig) -> dict[str, Any]:
    """The attack's settings, for the record."""
    return {"iterations": config.iterations, "restarts": config.restarts, "lr": config.lr, "tv": config.tv,
            "warm_start": config.warm_start}
