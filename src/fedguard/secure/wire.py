"""Wire form of the secure-aggregation and HE message types.

Every message of :mod:`fedguard.secure` is a dataclass whose fields are small JSON values
(``int``, ``float``, ``str``, ``bool``, ``tuple`` of those) or binary payloads (``bytes``,
``numpy.ndarray``, ``list[bytes]``). :class:`WireMessage` turns such a dataclass into the pair
``(meta, tensors)`` that a transport can store as a JSON header plus raw tensors (for example a
safetensors file: ``meta`` goes in the header's metadata, ``tensors`` are the tensors):

* JSON fields go into ``meta`` under their own name; ``meta["type"]`` holds the class name.
* ``bytes`` fields become ``uint8`` tensors.
* ``numpy.ndarray`` fields are stored as they are (C-contiguous copies).
* ``list[bytes]`` fields become one concatenated ``uint8`` tensor plus an ``int64`` tensor
  ``"<name>.lengths"``.

``from_arrays`` rebuilds the message from that pair and rejects a wrong ``type`` or a missing
field with :class:`WireError`.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, ClassVar, TypeVar

import numpy as np

__all__ = ["WireError", "WireMessage", "Meta", "Tensors"]

Meta = dict[str, Any]
Tensors = dict[str, np.ndarray]
M = TypeVar("M", bound="WireMessage")


class WireError(ValueError):
    """A message could not be rebuilt from its wire form."""


def _kind(hint: Any) -> str:
    """Classify a resolved type hint as 'bytes', 'array', 'bytes_list', 'tuple' or 'json'."""
    if hint is bytes:
        return "bytes"
    if hint is np.ndarray:
        return "array"
    origin = typing.get_origin(hint)
    if origin is list and typing.get_args(hint) == (bytes,):
        return "bytes_list"
    if origin is tuple:
        return "tuple"
    return "json"


def _jsonable(value: Any) -> Any:
    """Turn tuples (recursively) into lists so the value is JSON-serializable."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


class WireMessage:
    """Mixin for dataclass messages: ``to_arrays`` / ``from_arrays`` / ``nbytes``."""

    _hints_cache: ClassVar[dict[type, dict[str, str]]] = {}

    @classmethod
    def _field_kinds(cls) -> dict[str, str]:
        """Map each dataclass field name to its wire kind (cached per class)."""
        kinds = WireMessage._hints_cache.get(cls)
        if kinds is None:
            hints = typing.get_type_hints(cls)
            kinds = {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            WireMessage._hints_cache[cls] = kinds
        return kinds

    def to_arrays(self) -> tuple[Meta, Tensors]:
        """Return ``(meta, tensors)``: JSON-able metadata and named numpy arrays."""
        meta: Meta = {"type": type(self).__name__}
        tensors: Tensors = {}
        for name, kind in self._field_kinds().items():
            value = getattr(self, name)
            if kind == "bytes":
                tensors[name] = np.frombuffer(value, dtype=np.uint8).copy()
            elif kind == "array":
                tensors[name] = np.ascontiguousarray(value).copy()
            elif kind == "bytes_list":
                tensors[name] = np.frombuffer(b"".join(value), dtype=np.uint8).copy()
                tensors[name + ".lengths"] = np.array([len(v) for v in value], dtype=np.int64)
            else:
                meta[name] = _jsonable(value)
        return meta, tensors

    @classmethod
    def from_arrays(cls: type[M], meta: Meta, tensors: Tensors) -> M:
        """Rebuild a message from the output of :meth:`to_arrays`."""
        if meta.get("type") != cls.__name__:
            raise WireError(f"expected a {cls.__name__} message, got type={meta.get('type')!r}")
        kwargs: dict[str, Any] = {}
        try:
            for name, kind in cls._field_kinds().items():
                if kind == "bytes":
                    kwargs[name] = np.asarray(tensors[name], dtype=np.uint8).tobytes()
                elif kind == "array":
                    kwargs[name] = np.array(tensors[name])
                elif kind == "bytes_list":
                    kwargs[name] = _split(tensors[name], tensors[name + ".lengths"])
                elif kind == "tuple":
                    kwargs[name] = _tuplify(meta[name])
                else:
                    kwargs[name] = meta[name]
        except KeyError as exc:
            raise WireError(f"{cls.__name__}: missing field {exc.args[0]!r}") from exc
        return cls(**kwargs)

    def nbytes(self) -> int:
        """Size on the wire: tensor bytes plus the JSON metadata length."""
        meta, tensors = self.to_arrays()
        return len(json.dumps(meta)) + sum(int(t.nbytes) for t in tensors.values())


def _tuplify(value: Any) -> Any:
    """Inverse of :func:`_jsonable` for tuple-typed fields."""
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _split(blob: np.ndarray, lengths: np.ndarray) -> list[bytes]:
    """Cut a concatenated uint8 tensor back into its parts."""
    data = np.asarray(blob, dtype=np.uint8).tobytes()
    lens = [int(n) for n in np.asarray(lengths).ravel()]
    if any(n < 0 for n in lens) or sum(lens) != len(data):
        raise WireError("byte-list lengths do not match the payload size")
    out: list[bytes] = []
    pos = 0
    for n in lens:
        out.append(data[pos : pos + n])
        pos += n
    return out
