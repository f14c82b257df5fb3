"""Client steps for the Ray tests, imported by each Ray worker through ``run.ray_imports``.

A run named ``ray-count`` adds :class:`CountParticipations` (client state across rounds);
a run named ``ray-kill`` adds :class:`KillWorker` (the worker process dies mid-round).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import ray

from fedguard.builders import PIPELINE_HOOKS, BuildContext, PipelineParts
from fedguard.pipeline.base import ClientContext, ClientStep, ServerContext
from fedguard.types import Params

#: the client whose worker process kills itself in round 2 of a ``ray-kill`` run
VICTIM = 3


class CountParticipations(ClientStep):
    """Each client counts its rounds in its persistent state and reports the count."""

    name = "count-participations"

    def __init__(self) -> None:
        self.seen: dict[int, list[tuple[int, str]]] = {}

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        ctx.state["count"] = int(ctx.state.get("count", 0)) + 1
        ctx.reply_meta["count"] = ctx.state["count"]
        ctx.reply_meta["node"] = ray.get_runtime_context().get_node_id()
        return update

    def observe_replies(self, replies: list[Any], ctx: ServerContext) -> None:
        for msg in replies:
            self.seen.setdefault(msg.client_id, []).append((msg.meta["count"], msg.meta["node"]))


class KillWorker(ClientStep):
    """The worker process training client :data:`VICTIM` in round 2 dies (SIGKILL) before replying."""

    name = "kill-worker"

    def apply(self, update: Params, ctx: ClientContext) -> Params:
        if ctx.round == 2 and ctx.client_id == VICTIM:
            os.kill(os.getpid(), signal.SIGKILL)
        return update


def _hook(parts: PipelineParts, ctx: BuildContext) -> None:
    if ctx.config.run.name == "ray-count":
        parts.client_steps.append(CountParticipations())
    if ctx.config.run.name == "ray-kill":
        parts.client_steps.append(KillWorker())


if _hook not in PIPELINE_HOOKS:
    PIPELINE_HOOKS.append(_hook)
