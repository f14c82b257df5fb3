"""The ``[attack]`` section and how the adversaries enter a run.

* client side: :class:`AttackStep`, the first client step, turns a Byzantine client's update into the
  attack's (sign flip, scaling, Gaussian noise; a zero placeholder for omniscient attacks). Data
  poisoning (label flip, BadNets) happens before local training, in :class:`HostileClient`;
* server side, simulation only: :func:`omniscient_adversary` builds the colluding adversary the robust
  family's aggregator consults before aggregating.
"""

from __future__ import annotations

from typing import Any

from fedguard.builders import PIPELINE_HOOKS, TASK_HOOKS, BuildContext, PipelineParts
from fedguard.config import register_section
from fedguard.core.pipeline import ClientContext, ClientStep, ConfigurationError
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Task

from . import vectors
from .adversary import HostileClient, OmniscientAdversary, trigger_of
from .config import BACKDOOR_ATTACKS, OMNISCIENT_ATTACKS, AttackConfig, byzantine_clients
from .evaluation import BackdoorEvaluation

register_section("attack", AttackConfig)


def _byzantine(ctx: BuildContext) -> frozenset[int]:
    a = ctx.config.attack
    try:
        ids = byzantine_clients(a, ctx.sampler.population, ctx.config.run.seed)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from exc
    if not ids:
        raise ConfigurationError(
            f"attack.name={a.name} needs Byzantine clients: set attack.clients (e.g. ['0-9']) or attack.count"
        )
    return frozenset(ids)


def hostile_client(ctx: BuildContext) -> HostileClient | None:
    """The client-side behaviour of the configured attack (None without one)."""
    a = ctx.config.attack
    if a.name == "none":
        return None
    byz = _byzantine(ctx)
    classes = max(int(ctx.train.num_classes), 2)
    if a.name in ("backdoor", "scaling") and not 0 <= a.target_class < classes:
        raise ConfigurationError(f"attack.target_class={a.target_class} is not a class of this task (0..{classes - 1})")
    boost = a.boost or vectors.model_replacement_boost(ctx.sampler.per_round(ctx.sampler.population), len(byz),
                                                      ctx.config.server.lr or 1.0)
    return HostileClient(a, byz, classes, boost, ctx.config.run.seed)


def omniscient_adversary(ctx: BuildContext) -> OmniscientAdversary | None:
    """The simulated colluding adversary for alie, ipm, min-max, min-sum and mimic (None otherwise)."""
    a = getattr(ctx.config, "attack", None)
    if a is None or a.name not in OMNISCIENT_ATTACKS:
        return None
    return OmniscientAdversary(a, _byzantine(ctx), ctx.sampler.population, ctx.config.run.seed)


class AttackStep(ClientStep):
    """First client step: a Byzantine client replaces its update with the attack's."""

    name = "attack"

    def __init__(self, hostile: HostileClient) -> None:
        self.hostile = hostile
        self.name = f"attack:{hostile.name}"

    def local_data(self, data: ArrayDataset, ctx: ClientContext) -> ArrayDataset:
        """A Byzantine client's poisoned examples (label flip, BadNets) from ``attack.start_round`` on."""
        if not self.hostile.active(ctx.client_id, ctx.round):
            return data
        return self.hostile.local_data(ctx.client_id, data)

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        if not self.hostile.active(ctx.client_id, ctx.round):
            return update
        return self.hostile.update(update, ctx.generator)

    def describe(self) -> dict[str, Any]:
        return {"attack": self.hostile.name, "byzantine": sorted(self.hostile.byzantine)}


def attack_client_steps(ctx: BuildContext) -> list[ClientStep]:
    """The client steps of the configured attack: to run first, before clipping, noise and masking."""
    hostile = hostile_client(ctx)
    return [AttackStep(hostile)] if hostile is not None else []


def backdoor_evaluation(task: Task, config: Any) -> Task:
    """Under a BadNets or scaling attack, the task whose evaluations add ``attack_success_rate`` (the share
    of the evaluation set's triggered images of other classes assigned to ``attack.target_class``)."""
    a = getattr(config, "attack", None)
    if a is None or a.name not in BACKDOOR_ATTACKS or isinstance(task, BackdoorEvaluation):
        return task
    return BackdoorEvaluation(task, trigger_of(a), a.target_class)


TASK_HOOKS.append(backdoor_evaluation)


def _attack_hook(parts: PipelineParts, ctx: BuildContext) -> None:
    """Put the attack's steps first among the client steps."""
    parts.client_steps[:0] = attack_client_steps(ctx)


PIPELINE_HOOKS.append(_attack_hook)


def refuse_outside_simulation(config: Any) -> None:
    """Refuse an omniscient attack in a run whose clients are real processes (the network runtime): no
    real adversary sees the other clients' updates, and the server must not play one."""
    a = getattr(config, "attack", None)
    if a is not None and a.name in OMNISCIENT_ATTACKS:
        raise ConfigurationError(
            f"attack.name={a.name} is a simulated omniscient attack (the simulated server hands the adversary "
            "every honest update); it cannot run with real clients. Run it in the simulation, or give a hostile "
            "client a client-side attack (label-flip, backdoor, scaling, sign-flip, gaussian) in its own [attack]"
        )
