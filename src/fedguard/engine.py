"""The federated server loop, the same for every runtime.

Each round: sample clients, broadcast what the algorithm sends (plus what the pipeline's
steps need), let the aggregator collect and combine the clients' payloads through the
communicator, apply server steps, let the algorithm turn the aggregate into the new model
(with the server optimiser), account for privacy, and evaluate every k rounds. What is
computed and sent is the algorithm's (:mod:`fedguard.core.algorithm`); this module only
orchestrates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedguard.algorithms.lr_schedule import FitConfig
from fedguard.algorithms.sampling import ClientSampler
from fedguard.core.communicator import Communicator, client_generator
from fedguard.core.messages import Message
from fedguard.core.pipeline import AggregateResult, ServerContext, UpdatePipeline
from fedguard.core.types import Params
from fedguard.data.arrays import ArrayDataset
from fedguard.device import model_on, params_to
from fedguard.tasks.base import Task


@dataclass
class RoundRecord:
    """What happened in one round: the row written to metrics.jsonl."""

    round: int
    sampled: int
    completed: int
    failed: dict[int, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    round_s: float = 0.0
    eval_s: float = 0.0
    aborted: str | None = None

    def row(self) -> dict[str, Any]:
        """Flat JSON-ready row."""
        return {
            "round": self.round,
            "sampled_clients": self.sampled,
            "completed_clients": self.completed,
            "failed_clients": {str(k): v for k, v in sorted(self.failed.items())},
            **self.metrics,
            **self.privacy,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "round_s": round(self.round_s, 4),
            "eval_s": round(self.eval_s, 4),
            "seconds": round(self.round_s + self.eval_s, 4),
            "aborted": self.aborted,
        }


class Server:
    """Holds the global model and runs rounds through a communicator."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        pipeline: UpdatePipeline,
        sampler: ClientSampler,
        comm: Communicator,
        test_data: ArrayDataset | None,
        seed: int = 0,
        min_clients: int = 1,
        log: Callable[[str], None] = print,
        federated_eval: bool = False,
        fit_config: FitConfig | None = None,
        device: torch.device | str = "cpu",
        eval_prefix: str = "test",
    ) -> None:
        pipeline.validate()
        self.task, self.model, self.pipeline = task, model, pipeline
        self.sampler, self.comm, self.test_data = sampler, comm, test_data
        self.seed, self.min_clients, self.log = seed, min_clients, log
        self.federated_eval = federated_eval
        self.fit_config = fit_config
        #: where the server evaluates; the global model, aggregation and messages stay on the CPU
        self.device = torch.device(device)
        #: what the held-out data of the per-round evaluation is called in the metrics (test or val)
        self.eval_prefix = eval_prefix
        self.params: Params = {k: v.detach().clone() for k, v in model.named_parameters()}
        #: the federated algorithm and its server state besides the model
        self.algorithm = pipeline.algorithm
        self.algorithm_state: Params = self.algorithm.server_init(self.params)
        self.round = 0
        #: the last evaluation: (params, their tensors' versions, held-out data, metrics); a round clears it
        self._evaluation: tuple[Params, tuple[int, ...], ArrayDataset, dict[str, float]] | None = None

    def _released(self, result: AggregateResult) -> bool:
        """Whether anything computed from client data reached the server this round."""
        if result.delta is not None:
            return True
        hidden = any(step.hides_individual_updates for step in self.pipeline.client_steps)
        return bool(result.replies) and not hidden

    def broadcast(self, round: int, clients: list[int]) -> dict[int, Message]:
        """The fit instruction for each sampled client."""
        tensors, algorithm_meta = self.algorithm.broadcast(self.params, self.algorithm_state, round)
        meta: dict[str, Any] = dict(self.fit_config(round)) if self.fit_config else {}
        meta.update(algorithm_meta)
        for step in self.pipeline.client_steps:
            step.configure(round, meta)
        return {cid: Message("fit", round, cid, dict(meta), tensors) for cid in clients}

    def run_round(self, round: int, evaluate: bool) -> RoundRecord:
        """Run one round; the model changes only if enough clients completed it."""
        start = time.perf_counter()
        self._evaluation = None
        sent0, recv0 = self.comm.traffic.snapshot()
        sampled = self.sampler.sample(round)
        ctx = ServerContext(
            round,
            sampled,
            [],
            self.sampler.population,
            client_generator(self.seed, round, -1, "server"),
            self.log,
        )
        like = self.algorithm.payload_like(self.params)
        result = self.pipeline.aggregator.aggregate(self.comm, round, self.broadcast(round, sampled), like, ctx)
        ctx.completed = result.completed
        aborted = result.aborted
        if aborted is None and len(result.completed) < self.min_clients:
            aborted = f"only {len(result.completed)} clients completed, min_clients is {self.min_clients}"
        if aborted is None and result.delta is not None:
            for step in self.pipeline.client_steps:
                step.observe_replies(result.replies, ctx)
            delta = result.delta
            for server_step in self.pipeline.server_steps:
                delta = server_step.apply(delta, ctx)
            self.params, self.algorithm_state = self.algorithm.server_apply(
                self.params, self.algorithm_state, delta, self.pipeline.server_optimizer, ctx
            )
            self.pipeline.ledger.record_round(ctx, result.replies)
        else:
            self.log(f"round {round} aborted, global model unchanged: {aborted}")
            if self._released(result):
                # the updates (or their sum) reached the server even though it discards them
                self.pipeline.ledger.record_round(ctx, result.replies)
        self.round = round
        sent1, recv1 = self.comm.traffic.snapshot()
        record = RoundRecord(
            round,
            len(sampled),
            len(result.completed),
            result.failed,
            {
                "train_loss": result.metrics.get("train_loss", float("nan")),
                **{f"client_{k}": v for k, v in result.metrics.items() if k != "train_loss"},
            },
            self.pipeline.ledger.report(),
            sent1 - sent0,
            recv1 - recv0,
            time.perf_counter() - start,
            0.0,
            aborted,
        )
        if evaluate and self.test_data is not None:
            t0 = time.perf_counter()
            record.metrics.update({f"{self.eval_prefix}_{k}": v for k, v in self.evaluate().items()})
            record.eval_s = time.perf_counter() - t0
        if evaluate and self.federated_eval:
            t0 = time.perf_counter()
            sent0, recv0 = self.comm.traffic.snapshot()
            record.metrics.update({f"clients_test_{k}": v for k, v in self.evaluate_on_clients(round, sampled).items()})
            sent1, recv1 = self.comm.traffic.snapshot()
            record.metrics.update({"eval_bytes_sent": sent1 - sent0, "eval_bytes_received": recv1 - recv0})
            record.eval_s += time.perf_counter() - t0
        return record

    def evaluate(self) -> dict[str, float]:
        """The task's metrics for the current global model on the held-out data.

        Evaluating the same model on the same data again (the last round's evaluation, then the run's final
        figures) returns the first result instead of running the whole held-out set a second time.
        """
        assert self.test_data is not None
        if self.test_data.x.device != self.device:
            self.test_data = self.test_data.to(self.device)  # moved once
        versions = tuple(t._version for t in self.params.values())  # in-place updates change a version
        cached = self._evaluation
        if cached and cached[0] is self.params and cached[1] == versions and cached[2] is self.test_data:
            return dict(cached[3])
        model = model_on(self.model, self.device)
        metrics = self.task.evaluate(model, params_to(self.params, self.device), self.test_data)
        self._evaluation = (self.params, versions, self.test_data, dict(metrics))
        return metrics

    def evaluate_on_clients(self, round: int, clients: list[int]) -> dict[str, float]:
        """Federated evaluation: each client scores the global model on its local test split.

        Returns the example-weighted mean of the clients' metrics (clients that fail are skipped).
        """
        messages = {cid: Message("evaluate", round, cid, {}, self.params) for cid in clients}
        replies = self.comm.exchange(messages).replies
        total = sum(int(m.meta.get("num_examples", 0)) for m in replies.values())
        if total == 0:
            return {}
        sums: dict[str, float] = {}
        for msg in replies.values():
            n = int(msg.meta.get("num_examples", 0))
            for k, v in msg.meta.get("metrics", {}).items():
                if isinstance(v, (int, float)):
                    sums[k] = sums.get(k, 0.0) + n * float(v)
        return {k: v / total for k, v in sums.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: model, optimiser, step and ledger state, round."""
        return {
            "round": self.round,
            "params": self.params,
            "algorithm": self.algorithm_state,
            "server_optimizer": self.pipeline.server_optimizer.state_dict(),
            "client_steps": [s.state_dict() for s in self.pipeline.client_steps],
            "server_steps": [s.state_dict() for s in self.pipeline.server_steps],
            "ledger": self.pipeline.ledger.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.round = int(state["round"])
        self.params = {k: v.clone() for k, v in state["params"].items()}
        if "algorithm" in state:  # checkpoints from before the algorithm contract have none
            self.algorithm_state = {k: v.clone() for k, v in state["algorithm"].items()}
        self.pipeline.server_optimizer.load_state_dict(state["server_optimizer"])
        for step, s in zip(self.pipeline.client_steps, state["client_steps"], strict=True):
            step.load_state_dict(s)
        for step, s in zip(self.pipeline.server_steps, state["server_steps"], strict=True):
            step.load_state_dict(s)
        self.pipeline.ledger.load_state_dict(state["ledger"])


def load_params_into(model: nn.Module, params: Params) -> None:
    """Copy ``params`` into the model's parameters in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
