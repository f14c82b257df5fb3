"""The lower bounds: the same federated training as bare PyTorch loops, no fedguard machinery.

Same partition, same client sampling, same model init, same local SGD; the global model
is the example-weighted average of the clients' models. Nothing is serialised, no pipeline:
only what any FedAvg simulation must do.

- :func:`run_bare`: clients one after another in this process (torch's threads on all cores).
- :func:`run_limit`: the machine's limit, the same computation split across one forked
  1-thread process per usable core. Clients go largest first to whichever process is free;
  each process adds its clients' weighted models into its own shared-memory accumulator and
  the parent sums the accumulators. Only raw tensors in shared memory and 12-byte control
  messages cross the processes (no pickle, no serialisation of models).

Each client shuffles with its own generator seeded by (round, client), so the two loops
train every client identically and differ only in the order of the weighted sum.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time
from multiprocessing.connection import Connection, wait

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Clients = list[tuple[torch.Tensor, torch.Tensor]]
_JOB = struct.Struct("<iid")  # round, client, weight


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def client_generator(round: int, client: int) -> torch.Generator:
    """The shuffling generator of ``client`` in ``round`` (the same in every loop)."""
    return torch.Generator().manual_seed(1_000_003 * round + client)


def train_client(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One client's local SGD from ``global_state``; returns the model's state after it."""
    model.load_state_dict(global_state)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.state_dict()


def train_round(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    client_sets: Clients,
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int,
    round: int = 0,
    client_ids: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """One FedAvg round over the given clients' (x, y); returns the new global state."""
    total = sum(len(y) for _, y in client_sets)
    ids = client_ids if client_ids is not None else list(range(len(client_sets)))
    new_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
    for cid, (x, y) in zip(ids, client_sets, strict=True):
        state = train_client(model, global_state, x, y, batch_size, lr, momentum, epochs, client_generator(round, cid))
        with torch.no_grad():
            for k, v in state.items():
                new_state[k].add_(v, alpha=len(y) / total)
    return new_state


def _slices(model: nn.Module) -> dict[str, tuple[slice, torch.Size]]:
    out, start = {}, 0
    for k, v in model.state_dict().items():
        if not torch.is_floating_point(v):
            raise ValueError(f"the bare loops average float state only; {k} is {v.dtype}")
        out[k] = (slice(start, start + v.numel()), v.shape)
        start += v.numel()
    return out


def _views(flat: torch.Tensor, slices: dict[str, tuple[slice, torch.Size]]) -> dict[str, torch.Tensor]:
    return {k: flat[s].view(shape) for k, (s, shape) in slices.items()}


def warm_up() -> None:
    """Construct a ``torch.optim`` optimiser once, outside the timed rounds: the first one imports
    torch's compiler stack (seconds), which a long-running hand-written loop pays once at start-up;
    forked limit processes inherit the import."""
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.zeros(1)
    torch.optim.SGD([param], lr=0.0, momentum=0.9).step()


def client_data(train_x: torch.Tensor, train_y: torch.Tensor, parts: list[np.ndarray]) -> Clients:
    """Each client's (x, y), materialised once up front."""
    return [(train_x[torch.as_tensor(p)], train_y[torch.as_tensor(p)]) for p in parts]


def run_bare(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    parts: list[np.ndarray],
    schedule: list[list[int]],
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int = 1,
) -> tuple[nn.Module, list[float]]:
    """All rounds, clients one after another in this process; returns the final model and each round's seconds."""
    warm_up()
    clients = client_data(train_x, train_y, parts)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = []
    for r, sampled in enumerate(schedule, start=1):
        t0 = time.perf_counter()
        state = train_round(
            model, state, [clients[c] for c in sampled], batch_size, lr, momentum, epochs, r, list(sampled)
        )
        seconds.append(time.perf_counter() - t0)
    model.load_state_dict(state)
    return model, seconds


def _limit_worker(
    conn: Connection,
    model: nn.Module,
    clients: Clients,
    global_flat: torch.Tensor,
    acc_flat: torch.Tensor,
    slices: dict[str, tuple[slice, torch.Size]],
    hyper: tuple[int, float, float, int],
) -> None:
    """A forked limit process: trains the clients it is sent, adds their weighted states into ``acc_flat``."""
    torch.set_num_threads(1)
    batch_size, lr, momentum, epochs = hyper
    global_state, acc = _views(global_flat, slices), _views(acc_flat, slices)
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        if not data:
            return
        round, cid, weight = _JOB.unpack(data)
        x, y = clients[cid]
        state = train_client(model, global_state, x, y, batch_size, lr, momentum, epochs, client_generator(round, cid))
        with torch.no_grad():
            for k, v in state.items():
                acc[k].add_(v, alpha=weight)
        conn.send_bytes(b"1")


def run_limit(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    parts: list[np.ndarray],
    schedule: list[list[int]],
    batch_size: int,
    lr: float,
    momentum: float,
    epochs: int = 1,
    procs: int | None = None,
) -> tuple[nn.Module, list[float]]:
    """All rounds split across ``procs`` (default: usable cores) forked 1-thread processes.

    Call it before this process runs parallel torch work (the children are forked from it).
    Returns the final model and each round's seconds (dispatch to summed global state).
    """
    procs = procs or usable_cores()
    warm_up()
    clients = client_data(train_x, train_y, parts)
    slices = _slices(model)
    numel = sum(s.stop - s.start for s, _ in slices.values())
    global_flat = torch.zeros(numel).share_memory_()
    accs = [torch.zeros(numel).share_memory_() for _ in range(procs)]
    for k, v in _views(global_flat, slices).items():
        v.copy_(model.state_dict()[k])
    ctx = mp.get_context("fork")
    conns, children = [], []
    for acc in accs:
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_limit_worker,
            args=(child, model, clients, global_flat, acc, slices, (batch_size, lr, momentum, epochs)),
            daemon=True,
        )
        proc.start()
        child.close()
        conns.append(parent)
        children.append(proc)
    seconds = []
    try:
        for r, sampled in enumerate(schedule, start=1):
            t0 = time.perf_counter()
            for acc in accs:
                acc.zero_()
            total = sum(len(clients[c][1]) for c in sampled)
            queue = sorted(sampled, key=lambda c: (len(clients[c][1]), -c))  # pop() takes the largest first
            busy: set[Connection] = set()
            for conn in conns:
                if queue:
                    cid = queue.pop()
                    conn.send_bytes(_JOB.pack(r, cid, len(clients[cid][1]) / total))
                    busy.add(conn)
            while busy:
                for conn in wait(list(busy)):
                    if conn.recv_bytes() != b"1":
                        raise RuntimeError("a limit process failed")
                    if queue:
                        cid = queue.pop()
                        conn.send_bytes(_JOB.pack(r, cid, len(clients[cid][1]) / total))
                    else:
                        busy.discard(conn)
            torch.sum(torch.stack(accs), dim=0, out=global_flat)
            seconds.append(time.perf_counter() - t0)
    finally:
        for conn in conns:
            try:
                conn.send_bytes(b"")
                conn.close()
            except OSError:
                pass
        for proc in children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    model.load_state_dict(_views(global_flat, slices))
    return model, seconds


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy in batches of 1,000."""
    correct = sum(int((model(x[i : i + 1000]).argmax(1) == y[i : i + 1000]).sum()) for i in range(0, len(y), 1000))
    return correct / len(y)
