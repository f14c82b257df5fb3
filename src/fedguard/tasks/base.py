"""The task interface: what is learned (model, loss, metrics), independent of federation.

Built-in tasks (classification, VAE, MAE, GAN) are implementations of this same interface;
a user's own model, loss and dataset plug in the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedguard.core.algorithm import Trainer
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset

Batch = tuple[torch.Tensor, torch.Tensor]


class Task(ABC):
    """A learning problem over an :class:`ArrayDataset`.

    Subclasses give the model and a loss over a *parameter dict* (so the same code serves
    plain training, per-example gradients for DP and vectorised clients). Tasks whose local
    update is not plain gradient descent on one loss (e.g. a GAN's alternating steps)
    override :meth:`local_train`.
    """

    #: short name used in configs and reports
    name: str = "task"
    #: metric the report and the progress bar lead with, and whether higher is better
    primary_metric: str = "accuracy"
    higher_is_better: bool = True

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (call under a seeded generator for reproducibility)."""

    @abstractmethod
    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        """Mean loss of ``batch`` under ``params`` (a scalar with a graph to ``params``)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        """Metrics of the global model on held-out data (no gradients)."""

    def local_train(
        self,
        model: nn.Module,
        params: Params,
        data: ArrayDataset,
        trainer: Trainer,
        generator: torch.Generator,
    ) -> tuple[Params, dict[str, float]]:
        """One client's local update from ``params``; by default the trainer's loop (SGD unless its rule says)."""
        return trainer.train(self, model, params, data, generator)

    def report_figures(
        self, model: nn.Module, params: Params, data: ArrayDataset, out_dir: Path, tag: str
    ) -> list[tuple[str, Path]]:
        """Task-specific pictures for the run report: (caption, PNG path) pairs."""
        return []

    def on_evaluate(self, model: nn.Module, params: Params, round: int, out_dir: Path) -> None:
        """Called on the server after each evaluation round (e.g. to save progress pictures)."""

    def final_metrics(
        self, model: nn.Module, params: Params, train: ArrayDataset, test: ArrayDataset
    ) -> dict[str, float]:
        """Costlier metrics computed once at the end of a run (e.g. a linear probe)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """Settings of the task worth recording in the run configuration."""
        return {"task": self.name}
