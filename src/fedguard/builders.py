"""From a configuration to the objects of a run: task, client trainer and update pipeline.

The pipeline is assembled here, in one place and one stated order (:func:`build_pipeline`):

1. the combinations no mechanism can serve are refused, from one table (:data:`INCOMPATIBLE`);
2. plaintext FedAvg is the aggregator to start from;
3. the families shape it in :data:`STAGE_ORDER`: the simulated attack (its client step first),
   differential privacy (clip and noise client steps, central noise, the ledger), secure
   aggregation (replaces the aggregator by a secure sum), robust rules (replace it by a robust
   chain); then any user hooks, in the order they were added;
4. the server optimiser and the algorithm (:mod:`fedguard.algorithms.registry`) complete it, and
   :meth:`~fedguard.core.pipeline.UpdatePipeline.validate` checks the whole.

Mechanism families register their hooks through :data:`TRAINER_HOOKS` and :data:`PIPELINE_HOOKS`
(and tasks through :data:`TASK_BUILDERS`) when imported (:mod:`fedguard.plugins` imports them
all); the hooks run in :data:`STAGE_ORDER` whatever the order of those imports.
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
#: wrappers of the run's task, built-in or the user's (the backdoor attack adds its success rate to evaluations)
TASK_HOOKS: list[Callable[[Task, Config], Task]] = []
TRAINER_HOOKS: list[Callable[[LocalSGD, BuildContext], LocalSGD]] = []
PIPELINE_HOOKS: list[Callable[[PipelineParts, BuildContext], None]] = []
#: the order in which the families' hooks apply (by the package that defines them); others run after, as added
STAGE_ORDER = ("fedguard.attacks", "fedguard.privacy", "fedguard.secure", "fedguard.robust")


def ordered(hooks: list[Callable[..., Any]]) -> list[Callable[..., Any]]:
    """``hooks`` in :data:`STAGE_ORDER` (a stable sort: hooks of one family, and user hooks, keep their order)."""

    def rank(hook: Callable[..., Any]) -> int:
        module = getattr(hook, "__module__", "") or ""
        return next((i for i, p in enumerate(STAGE_ORDER) if module == p or module.startswith(p + ".")),
                    len(STAGE_ORDER))

    return sorted(hooks, key=rank)


def _sum_hiding(config: Config) -> str:
    return getattr(getattr(config, "secure", None), "mode", "none")


def _robust_rule(config: Config) -> str:
    return getattr(getattr(config, "robust", None), "rule", "none")


def _omniscient_attack(config: Config) -> str | None:
    from fedguard.attacks.config import OMNISCIENT_ATTACKS

    name = getattr(getattr(config, "attack", None), "name", "none")
    return name if name in OMNISCIENT_ATTACKS else None


def _robust_vs_secure(config: Config) -> str | None:
    mode, rule = _sum_hiding(config), _robust_rule(config)
    if mode == "none" or rule == "none":
        return None
    from fedguard.secure.register import refusal

    return str(refusal(mode, rule))


def _omniscient_vs_secure(config: Config) -> str | None:
    mode, attack = _sum_hiding(config), _omniscient_attack(config)
    if mode == "none" or attack is None:
        return None
    return (f"attack.name={attack} is a simulated omniscient attack: the server hands the adversary every plaintext "
            f"update, which secure.mode={mode} hides. Use secure.mode=none, or a client-side attack (label-flip, "
            "backdoor, scaling, sign-flip, gaussian).")


def _client_dp_vs_robust(config: Config) -> str | None:
    dp_mode, rule = getattr(getattr(config, "dp", None), "mode", "none"), _robust_rule(config)
    if dp_mode != "client" or rule == "none":
        return None
    return (f"dp.mode=client adds noise to the sum of clipped updates, but robust.rule={rule} is not a sum. Clipping "
            "already bounds each client's influence: use robust.rule=none with dp.mode=client.")


#: every combination of mechanisms that cannot work, checked once before any family builds its part:
#: (what, check) where ``check(config)`` returns the refusal's text or None
INCOMPATIBLE: list[tuple[str, Callable[[Config], str | None]]] = [
    ("robust rule x secure sum", _robust_vs_secure),
    ("omniscient attack x secure sum", _omniscient_vs_secure),
    ("client-level DP x robust rule", _client_dp_vs_robust),
]


def check_compatibility(config: Config) -> None:
    """Refuse the first combination of :data:`INCOMPATIBLE` the configuration makes."""
    for _, check in INCOMPATIBLE:
        problem = check(config)
        if problem:
            raise ConfigurationError(problem)


def build_task(config: Config, train: ArrayDataset) -> Task:
    """The configured task."""
    name = config.task.name
    if name not in TASK_BUILDERS:
        raise ConfigurationError(f"task.name: {name!r} is not available; choose one of {sorted(TASK_BUILDERS)}")
    return TASK_BUILDERS[name](config, train)


def wrap_task(config: Config, task: Task) -> Task:
    """``task`` with every family's :data:`TASK_HOOKS` applied (in :data:`STAGE_ORDER`)."""
    import fedguard.plugins  # noqa: F401  (every family's hooks, whatever was imported before)

    for hook in ordered(TASK_HOOKS):
        task = hook(task, config)
    return task


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
    import fedguard.plugins  # noqa: F401  (every family's hooks, whatever was imported before)

    for hook in ordered(TRAINER_HOOKS):
        trainer = hook(trainer, ctx)
    return trainer


def build_pipeline(ctx: BuildContext) -> UpdatePipeline:
    """The update pipeline for the configuration, validated."""
    import fedguard.plugins  # noqa: F401  (every family's hooks, whatever was imported before)

    s = ctx.config.server
    check_compatibility(ctx.config)
    parts = PipelineParts(aggregator=FedAvg(s.weighting, ctx.client_sizes))
    for hook in ordered(PIPELINE_HOOKS):
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
