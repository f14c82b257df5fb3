"""How the server reaches clients: one call, :meth:`Communicator.exchange`, in every runtime.

Algorithm and aggregator code talks to clients only through ``exchange``: it hands over one
:class:`~fedguard.core.messages.Message` per client and gets the replies back. The in-process
simulation and the network runtime implement the same call (Flower's ``Driver`` and pfl's
backend play this part there), so no algorithm knows which one it runs on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fedguard.core.messages import Message


@dataclass
class Exchange:
    """Replies by client id, and the reason for each client that gave none."""

    replies: dict[int, Message] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)


@dataclass
class TrafficCounter:
    """Bytes that crossed between server and clients, as serialised on the wire."""

    sent: int = 0
    received: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.sent, self.received


class Communicator(Protocol):
    """Delivers messages to clients and collects their replies."""

    traffic: TrafficCounter

    def exchange(self, messages: dict[int, Message]) -> Exchange:
        """Send each message to its client; return the replies that came back."""
        ...

    def close(self) -> None:
        """Release workers or connections."""
        ...


class ClientDropped(RuntimeError):
    """Raised inside a simulated client to model a failure mid-round."""


@dataclass
class FaultModel:
    """Seeded simulated dropouts: each client fails a stage with probability ``rate``.

    ``stages`` names the message kinds where a failure may happen (``fit`` by default:
    the client dies while training and never replies).
    """

    rate: float = 0.0
    seed: int = 0
    stages: tuple[str, ...] = ("fit",)

    def drops(self, msg: Message) -> bool:
        """Whether this client fails on this message (deterministic in seed, round, client)."""
        if self.rate <= 0 or msg.kind not in self.stages:
            return False
        digest = hashlib.sha256(f"{self.seed}/{msg.round}/{msg.client_id}/{msg.kind}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2**64 < self.rate


def client_generator(seed: int, round: int, client_id: int, purpose: str = "train") -> torch.Generator:
    """A torch generator private to one client, round and purpose, reproducible from the seed."""
    digest = hashlib.sha256(f"{seed}/{round}/{client_id}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
