"""The backdoor's attack success rate as a metric of every evaluation (``test_attack_success_rate``).

:class:`BackdoorEvaluation` wraps the run's task: training, loss and everything else are the task's own;
evaluating also scores the model on the evaluation data's triggered images of the other classes, labelled
with the target class. The server's held-out data is used as it is for accuracy, so the rate lands in
``metrics.jsonl`` each evaluated round, in the summary and in the report's metric plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Batch, Task

from .data import Trigger, triggered_test_set


class BackdoorEvaluation(Task):
    """``task`` plus the attack success rate of a BadNets ``trigger`` towards ``target``."""

    def __init__(self, task: Task, trigger: Trigger, target: int) -> None:
        self.task, self.trigger, self.target = task, trigger, target
        self.name, self.primary_metric, self.higher_is_better = task.name, task.primary_metric, task.higher_is_better
        self._triggered: tuple[ArrayDataset, ArrayDataset] | None = None

    def build_model(self) -> nn.Module:
        return self.task.build_model()

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        return self.task.loss(model, params, batch)

    def local_train(self, model: nn.Module, params: Params, data: ArrayDataset, trainer: Any,
                    generator: torch.Generator) -> tuple[Params, dict[str, float]]:
        return self.task.local_train(model, params, data, trainer, generator)

    def attack_success_rate(self, model: nn.Module, params: Params, data: ArrayDataset) -> float:
        """Share of ``data``'s triggered images of other classes that the model assigns to the target."""
        if self._triggered is None or self._triggered[0] is not data:  # built once per evaluation set
            self._triggered = (data, triggered_test_set(data, self.trigger, self.target))
        triggered = self._triggered[1]
        if len(triggered) == 0:
            return float("nan")
        return float(self.task.evaluate(model, params, triggered)["accuracy"])

    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        metrics = self.task.evaluate(model, params, data)
        metrics["attack_success_rate"] = self.attack_success_rate(model, params, data)
        return metrics

    def report_figures(self, model: nn.Module, params: Params, data: ArrayDataset, out_dir: Path,
                       tag: str) -> list[tuple[str, Path]]:
        return self.task.report_figures(model, params, data, out_dir, tag)

    def on_evaluate(self, model: nn.Module, params: Params, round: int, out_dir: Path) -> None:
        self.task.on_evaluate(model, params, round, out_dir)

    def final_metrics(self, model: nn.Module, params: Params, train: ArrayDataset,
                      test: ArrayDataset) -> dict[str, float]:
        return self.task.final_metrics(model, params, train, test)

    def describe(self) -> dict[str, Any]:
        return {**self.task.describe(), "backdoor_target": self.target, "trigger_size": self.trigger.size}
