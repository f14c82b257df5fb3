"""The Ray runtime (``run.runtime = "ray"``): simulated clients run in Ray actors on any cluster.

The server loop is the same as on one machine; only the :class:`~fedguard.runtime.base.Communicator`
changes. What crosses between the server and the Ray workers:

* **data, once per node**: the server puts the training inputs, labels and the compact
  partition (two index arrays) into Ray's object store once; each node keeps one copy that
  every worker on it maps read-only (no copy per worker, nothing shipped per round);
* **the configuration** as TOML text: each worker builds the task, model, trainer and update
  pipeline from it, exactly as a network client does (:func:`fedguard.runtime.network.client`),
  so nothing of ours is pickled;
* **messages as bytes** in the safetensors codec of :class:`~fedguard.messages.Message`, a batch
  of clients per call;
* **client state** as the same safetensors bytes in a key-value actor every node can reach,
  written only for clients that have state.

A worker that dies (its process killed, its node lost) or stops answering within
``run.ray_timeout_s`` turns the clients it held into dropouts of that round; Ray restarts
it and the run goes on. Flower's simulation engine runs on Ray the same way (Beutel et al.
2020); the data-once and bytes-only rules are fedguard's.
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tomllib
import torch

from fedguard.core.communicator import Exchange, FaultModel, TrafficCounter
from fedguard.core.messages import Message
from fedguard.core.pipeline import ConfigurationError
from fedguard.core.state import decode_state, encode_state
from fedguard.runtime.simulation import _answer, _collect

if TYPE_CHECKING:
    from fedguard.experiment import Setup

RAY_HELP = "run.runtime = 'ray' needs Ray: pip install 'fedguard[ray]' (or pip install 'ray>=2.40')"
#: calls a worker gets per round, at least: enough to balance unequal clients, few enough to amortise a call
CALLS_PER_WORKER = 4


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`ConfigurationError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigurationError(RAY_HELP) from exc
    return ray


@dataclass
class RaySettings:
    """The Ray runtime's options (``run.ray_*``, ``run.workers``, ``run.client_threads``, ``run.device``)."""

    address: str = ""
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    timeout_s: float = 600.0
    workers: str = "auto"
    client_threads: int = 1
    device: str = "cpu"
    imports: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> RaySettings:
        r = config.run
        return cls(r.ray_address, r.ray_num_cpus, r.ray_num_gpus, r.ray_timeout_s, r.workers, r.client_threads,
                   r.device, tuple(r.ray_imports))

    def check(self) -> None:
        """Refuse settings that cannot work, before Ray starts."""
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ConfigurationError("run.ray_num_cpus and run.ray_num_gpus are both 0: a Ray worker must reserve "
                                     "something, or Ray would start workers without limit; set ray_num_cpus = 1")
        if self.device.strip().lower().startswith("cuda") and self.num_gpus <= 0:
            raise ConfigurationError(f"run.device = {self.device!r} with run.runtime = 'ray' needs "
                                     "run.ray_num_gpus > 0 (Ray hides GPUs from workers that reserve none); "
                                     "e.g. ray_num_gpus = 0.25 lets four workers share one GPU")
        for name in self.imports:
            if not name or any(not part.isidentifier() for part in name.split(".")):
                raise ConfigurationError(f"run.ray_imports: {name!r} is not a module name")


def connect(settings: RaySettings) -> bool:
    """Start or join Ray; True when this call started it (and so the runtime must stop it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if settings.address:
        kwargs["address"] = settings.address
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ray.init(**kwargs)
    return True


class _BatchStore:
    """A client's state store inside a Ray worker, for one batch of clients.

    The states of the batch's clients come from the cluster-wide store in one call before
    the batch and go back in one call after it; clients without state cost nothing.
    """

    def __init__(self, loaded: dict[int, bytes]) -> None:
        self.loaded = loaded
        self.changed: dict[int, bytes] = {}

    def load(self, client_id: int) -> dict[str, Any]:
        data = self.changed.get(client_id) or self.loaded.get(client_id)
        return decode_state(data) if data else {}

    def save(self, client_id: int, state: dict[str, Any]) -> None:
        if state or client_id in self.loaded or client_id in self.changed:
            self.changed[client_id] = encode_state(state)


class _StateActor:
    """Client state for the whole cluster: encoded bytes by client id, kept only for clients with state."""

    def __init__(self) -> None:
        self.states: dict[int, bytes] = {}

    def get_many(self, client_ids: list[int]) -> dict[int, bytes]:
        return {cid: self.states[cid] for cid in client_ids if cid in self.states}

    def put_many(self, states: dict[int, bytes]) -> int:
        self.states.update(states)
        return len(self.states)

    def count(self) -> int:
        return len(self.states)


def _readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over an object-store array without copying it (the array is read-only; nothing writes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


class _ClientWorker:
    """A Ray actor that answers clients' messages, one client after another.

    It builds the run's parts from the configuration text once, over the data arrays that
    Ray maps from this node's object store, and keeps them for the whole run.
    """

    def __init__(self, config_toml: str, data: dict[str, Any], store: Any, threads: int,
                 imports: tuple[str, ...]) -> None:
        import ray

        for name in imports:
            importlib.import_module(name)
        from fedguard.config import Config
        from fedguard.data.arrays import ArrayDataset
        from fedguard.data.partition import Partition
        from fedguard.experiment import Experiment

        torch.set_num_threads(max(1, threads))
        # the references arrive inside a dict so that Ray hands them over unresolved: a restarted
        # worker fetches them again from this node's object store
        arrays = {k: (ray.get(ref) if ref is not None else None) for k, ref in data.items()}
        config = Config.from_dict(tomllib.loads(config_toml))
        config.set("data.client_test_fraction", 0.0)  # the server's split arrives as test_indices
        config.set("data.max_train_examples", 0)
        config.set("run.runtime", "simulation")  # this worker needs run.device itself: no fallback to the CPU
        train = object.__new__(ArrayDataset)  # the server validated these arrays
        train.x, train.y, train.name = _readonly_tensor(arrays["x"]), _readonly_tensor(arrays["y"]), "train"
        parts = Partition(arrays["part_indices"], arrays["part_offsets"])
        exp = Experiment(config, train=train, test=train.subset([0], "unused"), partitions=parts,
                         log=lambda text: None)
        self.setup = exp.assemble()
        if arrays["test_indices"] is not None:
            self.setup.local_test = Partition(arrays["test_indices"], arrays["test_offsets"])
        self.store = store
        self.threads = threads

    def ready(self) -> int:
        """This worker's process id, once it is built."""
        return os.getpid()

    def answer(self, client_ids: list[int], requests: list[bytes]) -> list[bytes]:
        """Answer a batch of messages, ``requests[i]`` for client ``client_ids[i]``, in order."""
        import ray

        store = _BatchStore(ray.get(self.store.get_many.remote(client_ids)))
        replies = [_answer(lambda cid: self.setup.make_client(cid, store), data) for data in requests]
        if store.changed:
            ray.get(self.store.put_many.remote(store.changed))
        return replies


@dataclass
class _Call:
    worker: int
    client_ids: list[int]
    started: float


class RayCommunicator:
    """Delivers messages to clients running in Ray actors (see the module docstring).

    Clients are sorted largest first and cut into batches, and each free worker gets the
    next batch, as the fork pool does with single clients. ``timeout_s`` bounds one batch.
    """

    def __init__(self, setup: Setup, settings: RaySettings, faults: FaultModel | None = None) -> None:
        settings.check()
        self.ray = import_ray()
        self.settings = settings
        self.faults = faults or FaultModel()
        self.traffic = TrafficCounter()
        self.sizes = setup.parts.sizes()
        t0 = time.perf_counter()
        self._owns_ray = connect(settings)
        ray = self.ray
        self._refs = self._put_data(setup)
        self._store = ray.remote(_StateActor).options(num_cpus=0, scheduling_strategy=self._here()).remote()
        per_round = setup.sampler.per_round(setup.sampler.population)
        count = self._worker_count(per_round)
        self.threads = settings.client_threads or max(1, math.floor(settings.num_cpus) or 1)
        self._actor_cls = ray.remote(_ClientWorker).options(
            num_cpus=settings.num_cpus,
            num_gpus=settings.num_gpus,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy="SPREAD",
        )
        self._config_toml = setup.config.to_toml()
        self.workers = [self._new_worker() for _ in range(count)]
        self.pids = ray.get([w.ready.remote() for w in self.workers])
        self._arming: dict[Any, int] = {}
        self.startup_s = time.perf_counter() - t0

    # -- set-up ---------------------------------------------------------------------------
    def _here(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(self.ray.get_runtime_context().get_node_id(), soft=False)

    def _put_data(self, setup: Setup) -> dict[str, Any]:
        """The training data and partition in the object store, once for the whole run."""
        ray = self.ray
        refs = {
            "x": ray.put(setup.train.x.numpy()),
            "y": ray.put(setup.train.y.numpy()),
            "part_indices": ray.put(setup.parts.indices),
            "part_offsets": ray.put(setup.parts.offsets),
            "test_indices": None,
            "test_offsets": None,
        }
        if len(setup.local_test):
            from fedguard.data.partition import Partition

            local = Partition.from_parts(setup.local_test)
            refs["test_indices"], refs["test_offsets"] = ray.put(local.indices), ray.put(local.offsets)
        return refs

    def _worker_count(self, per_round: int) -> int:
        s = self.settings
        if s.workers != "auto":
            try:
                count = int(s.workers)
            except ValueError as exc:
                raise ConfigurationError(f"run.workers: {s.workers!r} must be 'auto' or a whole number") from exc
            if count < 1:
                raise ConfigurationError("run.workers: must be at least 1")
            return count
        total = self.ray.cluster_resources()
        needs = (("CPU", s.num_cpus), ("GPU", s.num_gpus))
        fits = [math.floor(total.get(key, 0.0) / need + 1e-9) for key, need in needs if need > 0]
        if min(fits) < 1:
            raise ConfigurationError(f"the Ray cluster has {total.get('CPU', 0)} CPUs and {total.get('GPU', 0)} GPUs; "
                                     f"one worker needs {s.num_cpus} CPUs and {s.num_gpus} GPUs "
                                     "(lower run.ray_num_cpus / ray_num_gpus, or add nodes)")
        return max(1, min(min(fits), per_round))

    def _new_worker(self) -> Any:
        return self._actor_cls.remote(self._config_toml, self._refs, self._store, self.threads, self.settings.imports)

    # -- rounds ---------------------------------------------------------------------------
    def _batches(self, messages: dict[int, Message]) -> list[list[int]]:
        """Client ids, largest client first, cut into batches (the last batch is first in the list)."""
        order = sorted(messages, key=lambda c: (-int(self.sizes[c]) if 0 <= c < self.sizes.size else 0, c))
        size = max(1, math.ceil(len(order) / (len(self.workers) * CALLS_PER_WORKER)))
        return [order[i : i + size] for i in range(0, len(order), size)][::-1]

    def _encode(
        self, messages: dict[int, Message], batch: list[int], result: Exchange
    ) -> tuple[list[int], list[bytes]]:
        """The batch's messages as bytes (encoded only now, to hold one batch at a time), less simulated dropouts."""
        ids, payload = [], []
        for cid in batch:
            data = messages[cid].to_bytes()
            self.traffic.sent += len(data)
            if self.faults.drops(messages[cid]):
                result.failed[cid] = "simulated dropout"
            else:
                ids.append(cid)
                payload.append(data)
        return ids, payload

    def exchange(self, messages: dict[int, Message]) -> Exchange:
        ray = self.ray
        result = Exchange()
        queue = self._batches(messages)
        busy = set(self._arming.values())
        free = [i for i in range(len(self.workers)) if i not in busy]
        inflight: dict[Any, _Call] = {}
        while queue or inflight:
            while queue and free:
                ids, payload = self._encode(messages, queue.pop(), result)
                if ids:
                    worker = free.pop()
                    inflight[self.workers[worker].answer.remote(ids, payload)] = _Call(worker, ids, time.monotonic())
            if not inflight:
                if not queue:
                    break
                if not self._wait_for_worker(free):  # every worker is restarting, beyond the timeout
                    for batch in queue:
                        result.failed.update({c: "no Ray worker available (all restarting)" for c in batch})
                    break
                continue
            done, _ = ray.wait(list(inflight) + list(self._arming), num_returns=1, timeout=1.0)
            for ref in done:
                if ref in self._arming:
                    self._armed(ref, free)
                else:
                    self._finish(ref, inflight.pop(ref), result, free)
            self._expire(inflight, result)
        return result

    def _finish(self, ref: Any, call: _Call, result: Exchange, free: list[int]) -> None:
        try:
            replies = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            reason = f"Ray worker lost: {type(exc).__name__}"
            result.failed.update({cid: reason for cid in call.client_ids})
            self._rearm(call.worker)
            return
        for data in replies:
            _collect(result, data, self.traffic)
        free.append(call.worker)

    def _expire(self, inflight: dict[Any, _Call], result: Exchange) -> None:
        limit = self.settings.timeout_s
        if not limit:
            return
        now = time.monotonic()
        for ref, call in list(inflight.items()):
            if now - call.started > limit:
                del inflight[ref]
                reason = f"no answer within run.ray_timeout_s = {limit:g} s"
                result.failed.update({cid: reason for cid in call.client_ids})
                self.ray.kill(self.workers[call.worker], no_restart=False)
                self._rearm(call.worker)

    def _rearm(self, worker: int) -> None:
        """Wait (asynchronously) for Ray to restart a worker before giving it clients again."""
        self._arming[self.workers[worker].ready.remote()] = worker

    def _armed(self, ref: Any, free: list[int]) -> None:
        worker = self._arming.pop(ref)
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError:  # it died again while starting: replace it
            self.workers[worker] = self._new_worker()
            self._rearm(worker)
            return
        free.append(worker)

    def _wait_for_worker(self, free: list[int]) -> bool:
        deadline = time.monotonic() + (self.settings.timeout_s or math.inf)
        while self._arming and not free and time.monotonic() < deadline:
            done, _ = self.ray.wait(list(self._arming), num_returns=1, timeout=1.0)
            for ref in done:
                self._armed(ref, free)
        return bool(free)

    def stored_states(self) -> int:
        """How many clients have state in the cluster-wide store."""
        return int(self.ray.get(self._store.count.remote()))

    def close(self) -> None:
        """Stop the workers and the state store; stop Ray if this runtime started it."""
        ray = self.ray
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        ray.kill(self._store, no_restart=True)
        self.workers, self._arming, self._refs = [], {}, {}
        if self._owns_ray:
            ray.shutdown()
