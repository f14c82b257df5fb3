"""A :class:`~fedguard.messages.Message` as gRPC frames: typed header, raw tensor chunks, MAC.

The header (a serialised ``Envelope``) names each tensor's dtype, shape and byte length; a
``mac`` frame with the header's own tag (HMAC-SHA256 over a direction label and the header)
follows it; the tensors' raw little-endian bytes follow in data frames of at most
``chunk_bytes``; the last frame is an HMAC-SHA256 over the direction label, the header and
every data byte. A receiver checks the header against :class:`Limits` and its tag before it
reads any data, so no more than one frame is buffered for a sender that is not authenticated
(the header's session, sequence number and one-time request id bind the rest to it), and it
trusts no data until the final MAC verifies. Malformed input raises :class:`WireError`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from google.protobuf.message import DecodeError

from fedguard.messages import Message
from fedguard.runtime.network import auth
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb

#: the protocol version in every Hello, Welcome and Envelope
PROTOCOL_VERSION = 1
#: direction labels mixed into every MAC, so a message cannot be reflected back
TO_CLIENT, TO_SERVER = b"fedguard/v1/to-client", b"fedguard/v1/to-server"

DTYPES: dict[int, torch.dtype] = {
    pb.FLOAT32: torch.float32,
    pb.FLOAT64: torch.float64,
    pb.FLOAT16: torch.float16,
    pb.BFLOAT16: torch.bfloat16,
    pb.INT64: torch.int64,
    pb.INT32: torch.int32,
    pb.INT16: torch.int16,
    pb.INT8: torch.int8,
    pb.UINT8: torch.uint8,
    pb.BOOL: torch.bool,
}
PB_DTYPES: dict[torch.dtype, int] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedguard's wire format is little-endian; this platform is not")


class WireError(ValueError):
    """Frames that do not form a valid message; the text says what is wrong."""


@dataclass(frozen=True)
class Limits:
    """Bounds checked on a header before any of its data is read."""

    max_payload_bytes: int = 512 << 20
    max_header_bytes: int = 1 << 20
    max_tensors: int = 4096
    max_dims: int = 8


@dataclass
class Routing:
    """Who a message belongs to on the wire: session, sequence number and request id."""

    session_id: bytes
    client_id: int
    seq: int
    task_id: bytes


def parse_frame(data: bytes) -> pb.Frame:
    """One frame from raw bytes; garbage raises :class:`WireError`."""
    try:
        return pb.Frame.FromString(data)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError(f"garbage frame ({len(data)} bytes): not a protobuf Frame") from exc


def _mac(key: bytes, direction: bytes, header: bytes) -> hmac.HMAC:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(direction + b"\0" + len(header).to_bytes(8, "little") + header)
    return mac


def header_tag(key: bytes, direction: bytes, header: bytes) -> bytes:
    """The tag of a header alone (checked before any data frame is read); distinct from the message MAC."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(b"header\0" + direction + b"\0" + len(header).to_bytes(8, "little") + header)
    return mac.digest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, row-major."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def encode(msg: Message, route: Routing, key: bytes, direction: bytes, chunk_bytes: int = 1 << 20) -> list[pb.Frame]:
    """The frames of ``msg``: header, data chunks, MAC."""
    specs, chunks = [], []
    for name, t in msg.tensors.items():
        if t.dtype not in PB_DTYPES:
            raise WireError(f"tensor {name!r}: dtype {t.dtype} cannot travel; use one of {sorted(map(str, PB_DTYPES))}")
        raw = tensor_bytes(t)
        specs.append(pb.TensorSpec(name=name, dtype=PB_DTYPES[t.dtype], shape=list(t.shape), nbytes=len(raw)))
        chunks.append(raw)
    payload = b"".join(chunks)
    header = pb.Envelope(
        protocol_version=PROTOCOL_VERSION,
        session_id=route.session_id,
        client_id=route.client_id,
        seq=route.seq,
        task_id=route.task_id,
        kind=msg.kind,
        round=msg.round,
        meta_json=json.dumps(msg.meta, allow_nan=False),
        tensors=specs,
        payload_bytes=len(payload),
    ).SerializeToString()
    mac = _mac(key, direction, header)
    frames = [pb.Frame(header=header), pb.Frame(mac=header_tag(key, direction, header))]
    for start in range(0, len(payload), chunk_bytes):
        piece = payload[start : start + chunk_bytes]
        mac.update(piece)
        frames.append(pb.Frame(data=piece))
    frames.append(pb.Frame(mac=mac.digest()))
    return frames


def parse_header(header: bytes, limits: Limits) -> pb.Envelope:
    """The envelope in ``header``, checked against ``limits`` (dtypes, shapes, sizes)."""
    if len(header) > limits.max_header_bytes:
        raise WireError(f"header of {len(header)} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        env = pb.Envelope.FromString(header)
    except (DecodeError, ValueError, TypeError) as exc:
        raise WireError("garbage header: not a protobuf Envelope") from exc
    if env.protocol_version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {env.protocol_version}, this server speaks {PROTOCOL_VERSION}")
    if env.payload_bytes > limits.max_payload_bytes:
        raise WireError(f"oversized message: {env.payload_bytes} bytes, the limit is {limits.max_payload_bytes}")
    _check_specs(env, limits)
    return env


def _check_specs(env: pb.Envelope, limits: Limits) -> None:
    if len(env.tensors) > limits.max_tensors:
        raise WireError(f"{len(env.tensors)} tensors, the limit is {limits.max_tensors}")
    names: set[str] = set()
    total = 0
    for spec in env.tensors:
        if spec.name in names:
            raise WireError(f"tensor {spec.name!r} appears twice")
        names.add(spec.name)
        if spec.dtype not in DTYPES:
            raise WireError(f"tensor {spec.name!r}: unknown dtype code {spec.dtype}")
        if len(spec.shape) > limits.max_dims or any(d < 0 for d in spec.shape):
            raise WireError(f"tensor {spec.name!r}: invalid shape {list(spec.shape)}")
        itemsize = torch.empty((), dtype=DTYPES[spec.dtype]).element_size()
        expected = math.prod(spec.shape) * itemsize
        if expected != spec.nbytes:
            shape = list(spec.shape)
            raise WireError(f"tensor {spec.name!r}: shape {shape} needs {expected} bytes, header says {spec.nbytes}")
        total += expected
    if total != env.payload_bytes:
        raise WireError(f"tensors need {total} bytes but the header announces {env.payload_bytes}")


def parse_meta(text: str) -> dict:
    """The JSON metadata object; NaN, infinities and non-objects are refused."""

    def no_constants(name: str) -> float:
        raise ValueError(f"{name} is not allowed in metadata")

    try:
        meta = json.loads(text or "{}", parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:
        raise WireError(f"metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise WireError("metadata must be a JSON object")
    return meta


def build_tensors(env: pb.Envelope, payload: bytearray) -> dict[str, torch.Tensor]:
    """Tensors from a checked header and its payload."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in env.tensors:
        dtype, shape, n = DTYPES[spec.dtype], tuple(spec.shape), spec.nbytes
        piece = bytearray(payload[offset : offset + n])
        offset += n
        if dtype == torch.bool and any(b > 1 for b in piece):
            raise WireError(f"tensor {spec.name!r}: bool bytes must be 0 or 1")
        if n == 0:
            tensors[spec.name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[spec.name] = torch.frombuffer(piece, dtype=dtype).reshape(shape).clone()
    return tensors


@dataclass
class Received:
    """A verified message and what it cost on the wire."""

    envelope: pb.Envelope
    message: Message
    wire_bytes: int


def receive(
    frames: Iterable[bytes],
    limits: Limits,
    key_for: Callable[[pb.Envelope], bytes],
    direction: bytes,
    authorized: Callable[[pb.Envelope], None] | None = None,
) -> Received:
    """Read one message from raw frames: header, header tag, data, MAC; verify it.

    ``key_for`` sees the parsed header first; it raises :class:`WireError` to refuse the
    sender (unknown session, ...) or returns the key the MAC must verify with. The header's
    tag is checked next; ``authorized`` then sees the authenticated header (and may refuse it)
    before any data frame is read.
    """
    it: Iterator[bytes] = iter(frames)
    first = next(it, None)
    if first is None:
        raise WireError("empty stream: no header")
    wire = len(first)
    frame = parse_frame(first)
    if frame.WhichOneof("body") != "header":
        raise WireError(f"first frame must be a header, got {frame.WhichOneof('body')}")
    env = parse_header(frame.header, limits)
    key = key_for(env)
    tag_raw = next(it, None)
    if tag_raw is None:
        raise WireError("stream ended before the header's tag")
    wire += len(tag_raw)
    tag = parse_frame(tag_raw)
    if tag.WhichOneof("body") != "mac":
        raise WireError(f"the header must be followed by its tag, got a {tag.WhichOneof('body')} frame")
    if not hmac.compare_digest(header_tag(key, direction, frame.header), tag.mac):
        raise WireError("bad header tag: header forged or altered (refused before reading any data)")
    if authorized is not None:
        authorized(env)
    mac = _mac(key, direction, frame.header)
    payload = bytearray()
    for raw in it:
        wire += len(raw)
        frame = parse_frame(raw)
        body = frame.WhichOneof("body")
        if body == "data":
            if len(payload) + len(frame.data) > env.payload_bytes:
                raise WireError(f"more data than the {env.payload_bytes} bytes the header announced")
            payload += frame.data
            mac.update(frame.data)
        elif body == "mac":
            return _finish(env, payload, mac, frame.mac, wire)
        else:
            raise WireError(f"unexpected {body} frame inside a message")
    raise WireError("stream ended before the MAC frame")


def _finish(env: pb.Envelope, payload: bytearray, mac: hmac.HMAC, tag: bytes, wire: int) -> Received:
    if not hmac.compare_digest(mac.digest(), tag):
        raise WireError("bad MAC: message forged or altered")
    if len(payload) != env.payload_bytes:
        raise WireError(f"truncated: {len(payload)} of {env.payload_bytes} payload bytes")
    meta = parse_meta(env.meta_json)
    msg = Message(env.kind, int(env.round), int(env.client_id), meta, build_tensors(env, payload))
    return Received(env, msg, wire)


#: the gRPC service of the server (its methods: Join, Tasks, Submit)
SERVICE = "fedguard.net.v1.Federation"


def welcome_mac(key: bytes, w: pb.Welcome) -> bytes:
    """The MAC of a Welcome: proves to the client that the server holds its key."""
    model = ";".join(f"{s.name}:{s.dtype}:{list(s.shape)}" for s in w.model)
    shape, sizes = ",".join(map(str, w.input_shape)), ",".join(map(str, w.client_sizes))
    fields = (w.protocol_version, w.session_id, w.client_nonce, w.config_toml, model, shape, w.num_classes, sizes)
    return auth.sign(key, "welcome", *fields)
