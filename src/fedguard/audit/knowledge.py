"""What the honest-but-curious server knows, and the victim client that produces what it sees.

The server of a federated run sends the global parameters and the fit instruction, so it knows
the model, the round's global parameters, and (from the configuration it chose) the client's
learning rate, momentum, local step count and batch size; FedAvg replies also carry the number
of examples. It does *not* know the client's data, labels or data order. :class:`AttackKnowledge`
holds exactly that; :func:`observe_update` runs the real client (``ClientApp`` of the configured
run, with its DP steps) on the victim's images and returns only what reaches the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedguard.data.arrays import ArrayDataset
from fedguard.messages import Message
from fedguard.runtime.client import ClientApp
from fedguard.types import Params

__all__ = ["AttackKnowledge", "knowledge_of", "observe_update", "sum_updates"]


@dataclass
class AttackKnowledge:
    """The server's knowledge when it attacks one reply (Geiping et al. 2020's threat model)."""

    #: builds the architecture (the server distributes it)
    model_fn: Callable[[], nn.Module]
    #: the round's global parameters (the server sent them)
    global_params: Params
    #: local SGD steps, batch size, learning rate and momentum the client was configured with
    steps: int
    batch_size: int
    lr: float
    momentum: float = 0.0
    #: examples behind the update (FedAvg's weight, sent with the reply)
    num_examples: int = 1
    #: input shape (C, H, W) and the box the inputs lie in (the published preprocessing)
    input_shape: tuple[int, ...] = (1, 28, 28)
    input_range: tuple[float, float] = (0.0, 1.0)
    num_classes: int = 10
    #: clients behind the update: with secure aggregation the server sees the mean of this many equal-sized
    #: clients' updates (it ran the protocol with them), each of ``num_examples // clients`` examples
    clients: int = 1
    #: what else the attacker was told (for the record)
    notes: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The stated knowledge, as recorded beside every result."""
        return {
            "model": "known (architecture and round's global parameters)",
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
            "num_examples": self.num_examples, "clients": self.clients, "input_range": list(self.input_range),
            "labels": "not known (inferred from the last layer)", "data": "not known", **self.notes,
        }


def knowledge_of(setup: Any, global_params: Params, num_examples: int) -> AttackKnowledge:
    """What the server of the configured run (an ``Experiment.assemble()`` setup) knows about one client."""
    cfg = setup.config
    steps = -(-num_examples // cfg.train.batch_size) * cfg.train.epochs
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    x0 = setup.train.x[0]
    return AttackKnowledge(
        model_fn=setup.task.build_model,
        global_params={k: v.detach().clone() for k, v in global_params.items()},
        steps=steps,
        batch_size=min(cfg.train.batch_size, num_examples),
        lr=cfg.train.lr,
        momentum=cfg.train.momentum,
        num_examples=num_examples,
        input_shape=tuple(x0.shape),
        num_classes=setup.train.num_classes,
    )


def observe_update(setup: Any, data: ArrayDataset, global_params: Params, client_id: int = 0,
                   round: int = 1) -> Params:
    """The update the server receives from a client holding ``data``: the real client code runs
    (local training and the configured client steps: clipping, DP noise); returned is the plaintext
    update the aggregator would get without secure aggregation."""
    client = ClientApp(client_id, setup.task, setup.model, data, setup.trainer, setup.pipeline,
                       setup.config.run.seed)
    reply = client.handle(Message("fit", round, client_id, {}, {k: v.clone() for k, v in global_params.items()}))
    return {k: v.detach().float() for k, v in reply.tensors.items()}


def sum_updates(updates: list[Params]) -> Params:
    """What SecAgg/SecAgg+ reveals to the server: the sum of the round's updates (its quantisation aside)."""
    return {k: torch.stack([u[k] for u in updates]).sum(0) for k in updates[0]}
