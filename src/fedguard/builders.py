"""From a configuration to the objects of a run: task, client trainer and update pipeline.

Mechanism families (privacy, secure aggregation, robust rules, generative tasks) register
their own builders here through :data:`TASK_BUILDERS`, :data:`TRAINER_HOOKS` and
:data:`PIPELINE_HOOKS`, so that this module never grows special cases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fedguard.algorithms.fedavg import FedAvg
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.algorithms.registry import build_algorithm
from fedguard.algorithms.sampling import ClientSampler
from fedguard.algorithms.server_optimizers import build_server_optimizer
from fedguard.config import Config
from fedguard.core.pipeline import (
    Aggregator,
    ClientStep,
    ConfigurationError,
    PrivacyLedger,
    ServerStep,
    UpdatePipeline,
)
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Task
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import build_classifier


@dataclass
class BuildContext:
    """What builders may need to know about the run being assembled."""

    config: Config
    train: ArrayDataset
    client_sizes: list[int]
    sampler: ClientSampler
    task: Task
    log: Callable[[str], None] = print


@dataclass
class PipelineParts:
    """The pipeline under construction; hooks append or replace parts."""

    aggregator: Aggregator
    client_steps: list[ClientStep] = field(default_factory=list)
    server_steps: list[ServerStep] = field(default_factory=list)
    ledger: PrivacyLedger = field(default_factory=PrivacyLedger)


def build_classification(config: Config, train: ArrayDataset) -> Task:
    """The built-in classification task on a reference CNN/MLP sized for the data."""
    channels, size = int(train.x.shape[1]), int(train.x.shape[-1])
    classes = max(train.num_classes, 2)
    t = config.task
    return ClassificationTask(lambda: build_classifier(t.model, channels, size, classes, t.norm))


TASK_BUILDERS: dict[str, Callable[[Config, ArrayDataset], Task]] = {
    "classification": build_classification,
}
TRAINER_HOOKS: list[Callable[[LocalSGD, BuildContext], LocalSGD]] = []
PIPELINE_HOOKS: list[Callable[[PipelineParts, BuildContext], None]] = []


def build_task(config: Config, train: ArrayDataset) -> Task:
    """The configured task."""
    name = config.task.name
    if name not in TASK_BUILDERS:
        raise ConfigurationError(f"task.name: {name!r} is not available; choose one of {sorted(TASK_BUILDERS)}")
    return TASK_BUILDERS[name](config, train)


def build_trainer(ctx: BuildContext) -> LocalSGD:
    """Each client's local optimiser, with privacy hooks applied."""
    t = ctx.config.train
    trainer = LocalSGD(
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        prox_mu=t.prox_mu,
        steps_limit=t.max_steps or None,
        sampler=ShuffledEpochs(t.epochs, t.batch_size),
    )
    for hook in TRAINER_HOOKS:
        trainer = hook(trainer, ctx)
    return trainer


def build_pipeline(ctx: BuildContext) -> UpdatePipeline:
    """The update pipeline for the configuration, validated."""
    s = ctx.config.server
    parts = PipelineParts(aggregator=FedAvg(s.weighting, ctx.client_sizes))
    for hook in PIPELINE_HOOKS:
        hook(parts, ctx)
    if isinstance(parts.aggregator, FedAvg) and parts.aggregator.registered is None:
        parts.aggregator.registered = tuple(ctx.client_sizes)  # claims above a client's registration are refused
    pipeline = UpdatePipeline(
        aggregator=parts.aggregator,
        server_optimizer=build_server_optimizer(s.optimizer, s.lr, s.momentum, s.beta1, s.beta2, s.tau),
        client_steps=parts.client_steps,
        server_steps=parts.server_steps,
        ledger=parts.ledger,
        algorithm=build_algorithm(ctx.config),
    )
    pipeline.algorithm.check(ctx.task)
    pipeline.validate()
    return pipeline


def seeded_model(task: Task, seed: int) -> torch.nn.Module:
    """The task's model initialised from ``seed`` (the same on every party)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return task.build_model()


def describe_parts(parts: Any) -> dict[str, Any]:
    """Names of a pipeline's parts (for logs)."""
    return parts.describe() if hasattr(parts, "describe") else {}
