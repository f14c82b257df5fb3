"""Compatibility shim: what both runtimes share lives in :mod:`fedguard.core.communicator`
(the communicator, faults, client generators) and :mod:`fedguard.core.state` (client state)."""

from fedguard.core.communicator import (
    ClientDropped,
    Communicator,
    Exchange,
    FaultModel,
    TrafficCounter,
    client_generator,
)
from fedguard.core.state import decode_state, encode_state

__all__ = [
    "ClientDropped",
    "Communicator",
    "Exchange",
    "FaultModel",
    "TrafficCounter",
    "client_generator",
    "decode_state",
    "encode_state",
]
