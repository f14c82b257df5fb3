"""How the secure protocols' messages travel inside engine messages, and client-side helpers.

The transport-free protocol objects of :mod:`fedguard.secure` speak :class:`WireMessage`
(JSON meta + numpy arrays). The engine speaks :class:`fedguard.messages.Message` (JSON meta +
torch tensors, serialised with safetensors). This module converts between the two:

* :func:`to_message` / :func:`from_message`: a protocol message as the whole payload of an engine
  message (its meta under ``meta["wire"]``, its arrays as tensors named ``<prefix><field>``);
* :func:`to_json` / :func:`from_json`: a small protocol message embedded in JSON metadata
  (arrays base64-encoded), for the fit instruction whose tensors are the global model;
* :func:`save_state` / :func:`load_state`: a protocol object kept in a client's own state between
  messages (each message may be answered by a different process).

It also holds :func:`client_weight`, the FedAvg weight a client uses under either secure mode.
"""

from __future__ import annotations

import base64
from typing import Any, TypeVar

import numpy as np
import torch

from fedguard.messages import Message
from fedguard.pipeline.base import ClientContext
from fedguard.types import Params, flatten, unflatten

from .wire import WireError, WireMessage

M = TypeVar("M", bound=WireMessage)

#: dtypes a protocol array may have on the wire (anything else is refused when parsing)
ALLOWED_DTYPES = frozenset({"uint8", "int32", "int64", "uint32", "uint64", "float64", "bool"})


#: unsigned ring arrays travel as the signed type of the same width (bit for bit): not every
#: transport has unsigned dtypes (the network runtime's frames do not)
_SIGNED = {np.dtype(np.uint32): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.int64)}
_UNSIGNED = {v: k for k, v in _SIGNED.items()}


def to_message(
    kind: str, round: int, client_id: int, wire: WireMessage, prefix: str, meta: dict[str, Any] | None = None
) -> Message:
    """An engine message whose payload is ``wire`` (tensors named ``prefix + field``).

    ``uint32``/``uint64`` arrays are sent as ``int32``/``int64`` views, listed in ``meta["unsigned"]``.
    """
    wire_meta, arrays = wire.to_arrays()
    tensors, unsigned = {}, []
    for k, v in arrays.items():
        arr = np.ascontiguousarray(v)
        if arr.dtype in _SIGNED:
            arr, unsigned = arr.view(_SIGNED[arr.dtype]), [*unsigned, k]
        tensors[prefix + k] = torch.from_numpy(arr)
    extra = {"unsigned": unsigned} if unsigned else {}
    return Message(kind, round, client_id, {**(meta or {}), "wire": wire_meta, **extra}, tensors)


def from_message(cls: type[M], msg: Message, prefix: str, kind: str | None = None) -> M:
    """Rebuild the protocol message carried by ``msg``; :class:`WireError` if it is not one.

    Every tensor of ``msg`` must belong to the protocol message (name starting with ``prefix``):
    a reply that smuggles other tensors (say, a plaintext update) is refused.
    """
    if kind is not None and msg.kind != kind:
        raise WireError(f"expected a {kind!r} message, got {msg.kind!r}")
    stray = sorted(k for k in msg.tensors if not k.startswith(prefix))
    if stray:
        raise WireError(f"unexpected tensors {stray[:3]} next to the {cls.__name__} payload: refused")
    meta = msg.meta.get("wire")
    if not isinstance(meta, dict):
        raise WireError(f"{msg.kind!r} message carries no {cls.__name__}")
    arrays = {k[len(prefix) :]: _to_numpy(v, k) for k, v in msg.tensors.items()}
    unsigned = msg.meta.get("unsigned", [])
    if not isinstance(unsigned, list):
        raise WireError("'unsigned' must list field names")
    for name in unsigned:
        arr = arrays.get(name)
        if arr is None or arr.dtype not in _UNSIGNED:
            raise WireError(f"field {name!r} is listed as unsigned but is not a signed 32/64-bit array")
        arrays[name] = arr.view(_UNSIGNED[arr.dtype])
    return cls.from_arrays(meta, arrays)


def _to_numpy(t: torch.Tensor, name: str) -> np.ndarray:
    """A tensor as a numpy array, refusing dtypes no protocol message uses."""
    arr = t.detach().cpu().numpy()
    if arr.dtype.name not in ALLOWED_DTYPES:
        raise WireError(f"tensor {name!r} has dtype {arr.dtype.name}, not a protocol dtype")
    return arr


def to_json(wire: WireMessage) -> dict[str, Any]:
    """``wire`` as JSON: its meta, and each array as dtype, shape and base64 bytes."""
    meta, arrays = wire.to_arrays()
    packed = {
        k: {"dtype": v.dtype.name, "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode("ascii")}
        for k, v in arrays.items()
    }
    return {"meta": meta, "arrays": packed}


def from_json(cls: type[M], data: Any) -> M:
    """Inverse of :func:`to_json`; :class:`WireError` on anything malformed."""
    try:
        arrays = {}
        for name, item in data["arrays"].items():
            dtype = str(item["dtype"])
            if dtype not in ALLOWED_DTYPES:
                raise WireError(f"array {name!r} has dtype {dtype}, not a protocol dtype")
            raw = base64.b64decode(item["b64"], validate=True)
            arrays[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape([int(n) for n in item["shape"]]).copy()
        return cls.from_arrays(dict(data["meta"]), arrays)
    except WireError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed {cls.__name__} in the instructions ({exc})") from exc


def save_state(state: dict[str, Any], prefix: str, wire: WireMessage) -> None:
    """Keep ``wire`` in a client's state under ``prefix`` (replacing what was there)."""
    clear_state(state, prefix)
    meta, arrays = wire.to_arrays()
    state[prefix + "meta"] = meta
    for k, v in arrays.items():
        state[prefix + "a/" + k] = torch.from_numpy(np.ascontiguousarray(v))


def load_state(state: dict[str, Any], prefix: str, cls: type[M]) -> M | None:
    """The ``cls`` object saved under ``prefix``, or None if there is none."""
    meta = state.get(prefix + "meta")
    if meta is None:
        return None
    head = prefix + "a/"
    arrays = {k[len(head) :]: v.numpy() for k, v in state.items() if k.startswith(head)}
    return cls.from_arrays(meta, arrays)


def clear_state(state: dict[str, Any], prefix: str) -> None:
    """Forget everything saved under ``prefix``."""
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def bytes_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor (how binary values travel and are stored)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Inverse of :func:`bytes_tensor`."""
    if t.dtype != torch.uint8:
        raise WireError(f"expected a uint8 tensor, got {t.dtype}")
    return t.numpy().tobytes()


def client_weight(ctx: ClientContext, weighting: str, max_weight: int) -> int:
    """The client's FedAvg weight: its number of examples (or 1 for uniform), at most ``max_weight``."""
    weight = 1 if weighting == "uniform" else int(ctx.num_examples)
    if not 1 <= weight <= max_weight:
        raise ValueError(
            f"client {ctx.client_id}: FedAvg weight {weight} lies outside 1..{max_weight} "
            "(secure.max_weight, the largest weight the aggregate is scaled for); raise secure.max_weight"
        )
    return weight


def flatten_sorted(params: Params) -> torch.Tensor:
    """All tensors in one vector, in sorted name order (the same on every party, whatever the dict order)."""
    return flatten({k: params[k] for k in sorted(params)})


def unflatten_sorted(vector: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten_sorted`, returned in the order of ``like``."""
    out = unflatten(vector, {k: like[k] for k in sorted(like)})
    return {k: out[k] for k in like}
