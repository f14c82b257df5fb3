"""The client application: answers the server's messages using its own data only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedguard.algorithms.lr_schedule import scaled_trainer
from fedguard.core.algorithm import LocalTraining
from fedguard.core.communicator import client_generator
from fedguard.core.messages import Message
from fedguard.core.pipeline import ClientContext, UpdatePipeline
from fedguard.core.state import StateStore
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.device import model_on, params_to
from fedguard.runtime.state_store import MemoryStateStore
from fedguard.tasks.base import Task

Handler = Callable[[Message, ClientContext], Message]


class UnknownMessage(ValueError):
    """A message kind this client does not answer."""


class ClientApp:
    """One party: runs the algorithm's client side on its local data, then the pipeline's client steps.

    The same object serves the simulation (inside a worker process) and a real client
    process; it only ever sees messages addressed to it. It trains and evaluates on
    ``device``; what it sends back is on the CPU.
    """

    def __init__(
        self,
        client_id: int,
        task: Task,
        model: nn.Module,
        data: ArrayDataset,
        trainer: Any,
        pipeline: UpdatePipeline,
        seed: int,
        store: StateStore | None = None,
        test_data: ArrayDataset | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.client_id = client_id
        self.device = torch.device(device)
        self.task, self.model, self.data = task, model, data
        self.trainer, self.pipeline, self.seed = trainer, pipeline, seed
        self.store = store or MemoryStateStore()
        self.test_data = test_data
        #: the federated algorithm: what this client computes from the server's broadcast
        self.algorithm = pipeline.algorithm
        self.handlers: dict[str, Handler] = {
            "fit": self._fit,
            "evaluate": self._evaluate,
            **pipeline.client_handlers(),
        }

    def handle(self, msg: Message) -> Message:
        """Answer one message from the server."""
        if msg.client_id != self.client_id:
            raise ValueError(f"message for client {msg.client_id} delivered to client {self.client_id}")
        handler = self.handlers.get(msg.kind)
        if handler is None:
            raise UnknownMessage(f"client does not answer {msg.kind!r}; known: {sorted(self.handlers)}")
        ctx = self._context(msg)
        reply = handler(msg, ctx)
        self.store.save(self.client_id, ctx.state)
        return reply

    def _context(self, msg: Message) -> ClientContext:
        return ClientContext(
            client_id=self.client_id,
            round=msg.round,
            num_examples=len(self.data),
            generator=client_generator(self.seed, msg.round, self.client_id, msg.kind),
            instructions=msg.meta,
            state=self.store.load(self.client_id),
        )

    def _local(self, instructions: dict[str, Any], data: ArrayDataset | None = None) -> LocalTraining:
        """This client's task, model, data (``data``, default its own) and trainer (at the round's learning
        rate), on its device."""
        model, data = model_on(self.model, self.device), (self.data if data is None else data).to(self.device)
        return LocalTraining(self.task, model, data, scaled_trainer(self.trainer, instructions), self.device)

    def _received(self, msg: Message) -> Params:
        """The message's tensors as float on this client's device."""
        return params_to({k: v.float() for k, v in msg.tensors.items()}, self.device)

    def _fit(self, msg: Message, ctx: ClientContext) -> Message:
        """The algorithm's local round, then the pipeline's client steps and the aggregator's encoding."""
        data = self.data
        for step in self.pipeline.client_steps:  # a simulated data-poisoning attacker alters its examples
            data = step.local_data(data, ctx)
        result = self.algorithm.client_update(self._received(msg), ctx, self._local(ctx.instructions, data))
        ctx.state.update(result.state)
        update = result.payload
        for step in self.pipeline.client_steps:
            update = step.apply(update, ctx)
        payload, meta = self.pipeline.aggregator.client_finalize(update, ctx)
        reply_meta = {"num_examples": len(self.data), "metrics": result.metrics, **ctx.reply_meta, **meta}
        return Message("fit_result", msg.round, self.client_id, reply_meta, payload)

    def _evaluate(self, msg: Message, ctx: ClientContext) -> Message:
        """Metrics of the received global model (and, for personalised algorithms, this client's own
        model) on this client's local test split."""
        if self.test_data is None or len(self.test_data) == 0:
            return Message("evaluate_result", msg.round, self.client_id, {"num_examples": 0, "metrics": {}})
        local = LocalTraining(self.task, model_on(self.model, self.device), self.data, self.trainer, self.device)
        metrics = self.algorithm.client_evaluate(self._received(msg), ctx, local, self.test_data)
        meta = {"num_examples": len(self.test_data), "metrics": metrics}
        return Message("evaluate_result", msg.round, self.client_id, meta)
