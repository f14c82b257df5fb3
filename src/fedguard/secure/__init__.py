"""fedguard.secure: secure aggregation (SecAgg/SecAgg+) and CKKS homomorphic encryption.

Transport-free protocol code: parties are objects holding only their own secrets and talk
through message dataclasses with ``to_arrays()`` / ``from_arrays()`` (JSON meta + numpy arrays).

The CKKS names (``CKKSKeyHolder``, ``CKKSEncryptor``, ...) are imported lazily so that SecAgg
works where TenSEAL is not installed.
"""

from typing import Any

from .quantize import Quantizer, dequantize_sum, quantize
from .secagg import (
    AdvertiseKeys,
    AggregateResult,
    EncryptedShares,
    KeysBroadcast,
    MaskedInput,
    RoundTrace,
    SecAggAbort,
    SecAggClient,
    SecAggClientState,
    SecAggConfig,
    SecAggServer,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    default_neighbours,
    encode_input,
    make_parties,
    neighbour_graph,
    prg_ring,
    run_secagg_round,
    simulate_round,
)
from .shamir import ShamirError, Share, reconstruct_secret, split_secret
from .wire import WireError, WireMessage

_CKKS_NAMES = (
    "CKKSContextConfig",
    "CKKSEncryptor",
    "CKKSError",
    "CKKSKeyHolder",
    "EncryptedVector",
    "add_encrypted",
    "decrypt_vector",
    "encrypt_vector",
)

__all__ = [
    *_CKKS_NAMES,
    "AdvertiseKeys",
    "AggregateResult",
    "EncryptedShares",
    "KeysBroadcast",
    "MaskedInput",
    "Quantizer",
    "RoundTrace",
    "SecAggAbort",
    "SecAggClient",
    "SecAggClientState",
    "SecAggConfig",
    "SecAggServer",
    "ShamirError",
    "Share",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "WireError",
    "WireMessage",
    "default_neighbours",
    "dequantize_sum",
    "encode_input",
    "make_parties",
    "neighbour_graph",
    "prg_ring",
    "quantize",
    "reconstruct_secret",
    "run_secagg_round",
    "simulate_round",
    "split_secret",
]


def __getattr__(name: str) -> Any:
    """Import the CKKS API (and TenSEAL) on first use."""
    if name in _CKKS_NAMES:
        from . import ckks

        return getattr(ckks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
