"""Supervised classification: any ``nn.Module`` mapping inputs to class logits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Batch, Task

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ClassificationTask(Task):
    """Classification with a user's (or a built-in) model and loss.

    ``model_fn`` builds a fresh model; ``loss_fn(logits, labels)`` returns the mean loss
    (default cross-entropy). Evaluation reports ``loss`` and ``accuracy``, in batches of
    ``eval_batch_size``: 128 keeps each activation under glibc's mmap threshold (32 MiB at most),
    so evaluation reuses heap memory instead of page-faulting fresh memory in every batch; for
    CNN-M on the MNIST test set at one thread, batches of 1,000 cost 1.1-1.25 million page faults
    and 25-30% more CPU than batches of 128 (interleaved A/B, 3 repeats).
    """

    name = "classification"
    primary_metric = "accuracy"

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        loss_fn: LossFn = F.cross_entropy,
        eval_batch_size: int = 128,
    ) -> None:
        self.model_fn = model_fn
        self.loss_fn = loss_fn
        self.eval_batch_size = eval_batch_size

    def build_model(self) -> nn.Module:
        return self.model_fn()

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(functional_call(model, params, (x,)), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        total_loss, correct = 0.0, 0
        for start in range(0, len(data), self.eval_batch_size):
            x = data.x[start : start + self.eval_batch_size]
            y = data.y[start : start + self.eval_batch_size]
            logits = functional_call(model, params, (x,))
            total_loss += float(self.loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(1) == y).sum())
        n = max(len(data), 1)
        return {"loss": total_loss / n, "accuracy": correct / n}
