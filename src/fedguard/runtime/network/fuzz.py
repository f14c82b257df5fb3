"""A fuzzing client: floods a server with malformed, forged and replayed messages.

``python -m fedguard.runtime.network.fuzz --server HOST:PORT --key client-K.key ...`` joins
as client K (with its real key: the worst case, an insider), and for each request it gets
sends ``--messages / --rounds`` malformed messages of every kind the protocol can get wrong,
then one well-formed but invalid update (wrong shape, dtype, NaN, ...) for the aggregator
to reject. It prints one JSON line: how many were sent and how many the server refused;
every one must be refused, so the exit code is 1 if any was accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import torch

from fedguard.messages import Message
from fedguard.runtime.network import auth
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.server import SERVICE
from fedguard.runtime.network.wire import (
    PROTOCOL_VERSION,
    TO_CLIENT,
    TO_SERVER,
    Limits,
    Received,
    Routing,
    encode,
    header_tag,
    parse_frame,
    receive,
)

Frames = list[bytes]


class RawClient:
    """A protocol-level client without a model: joins, reads requests, sends any frames."""

    def __init__(self, channel: grpc.Channel, client_id: int, key: bytes) -> None:
        self.client_id, self.key = client_id, key
        self.join_rpc = channel.unary_unary(f"/{SERVICE}/Join")
        self.tasks_rpc = channel.unary_stream(f"/{SERVICE}/Tasks")
        self.submit_rpc = channel.stream_unary(f"/{SERVICE}/Submit")
        self.session, self.last_hello = b"", b""
        self.seq = 0
        self.poll_seq = 0
        self._stream: Iterator[bytes] | None = None

    def hello(self, client_id: int | None = None, key: bytes | None = None, version: int = PROTOCOL_VERSION,
              nonce: bytes | None = None, unix_ms: int | None = None) -> bytes:
        """A signed Hello (with any field overridden)."""
        cid = self.client_id if client_id is None else client_id
        nonce = nonce if nonce is not None else os.urandom(16)
        unix_ms = unix_ms if unix_ms is not None else int(time.time() * 1000)
        mac = auth.sign(key or self.key, "hello", version, cid, nonce, unix_ms)
        return pb.Hello(protocol_version=version, client_id=cid, client_nonce=nonce, unix_ms=unix_ms,
                        mac=mac).SerializeToString()

    def join(self, hello: bytes | None = None) -> pb.Welcome:
        """Join (raises grpc.RpcError when refused)."""
        self.last_hello = hello or self.hello()
        welcome = pb.Welcome.FromString(self.join_rpc(self.last_hello, timeout=30, wait_for_ready=True))
        self.session, self.seq, self.poll_seq = bytes(welcome.session_id), 0, 0
        return welcome

    def poll(self, seq: int | None = None, key: bytes | None = None, session: bytes | None = None) -> bytes:
        """A signed PollRequest."""
        if seq is None:
            self.poll_seq += 1
            seq = self.poll_seq
        sid = self.session if session is None else session
        mac = auth.sign(key or self.key, "poll", self.client_id, sid, seq)
        return pb.PollRequest(client_id=self.client_id, session_id=sid, seq=seq, mac=mac).SerializeToString()

    def open_tasks(self) -> None:
        """Open this session's task stream."""
        self._stream = iter(self.tasks_rpc(self.poll()))

    def next_request(self, limits: Limits | None = None) -> Received | None:
        """The next request on the task stream (None when the server ends the run)."""
        assert self._stream is not None
        for raw in self._stream:
            frame = parse_frame(raw)
            if frame.WhichOneof("body") == "control":
                if frame.control.code == pb.Control.KEEPALIVE:
                    continue
                return None
            return receive(_prepend(raw, self._stream), limits or Limits(1 << 40), lambda env: self.key, TO_CLIENT)
        return None

    def reply(self, msg: Message, task_id: bytes, **override: object) -> Frames:
        """A reply's frames; ``override`` may set session, client_id, seq, key or direction."""
        if "seq" not in override:
            self.seq += 1
        route = Routing(
            bytes(override.get("session", self.session)),  # type: ignore[arg-type]
            int(override.get("client_id", self.client_id)),  # type: ignore[call-overload]
            int(override.get("seq", self.seq)),  # type: ignore[call-overload]
            task_id,
        )
        key = bytes(override.get("key", self.key))  # type: ignore[arg-type]
        direction = bytes(override.get("direction", TO_SERVER))  # type: ignore[arg-type]
        return [f.SerializeToString() for f in encode(msg, route, key, direction, chunk_bytes=64 << 10)]

    def submit(self, frames: Frames) -> pb.SubmitReply:
        """Send frames as one Submit stream."""
        return pb.SubmitReply.FromString(self.submit_rpc(iter(frames), timeout=60))


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    yield first
    yield from rest


# -- malformed messages ---------------------------------------------------------------------
def _header(frames: Frames) -> pb.Envelope:
    return pb.Envelope.FromString(parse_frame(frames[0]).header)


def _with_header(frames: Frames, env: pb.Envelope) -> Frames:
    return [pb.Frame(header=env.SerializeToString()).SerializeToString(), *frames[1:]]


def _resign(client: RawClient, env: pb.Envelope, payload: bytes) -> Frames:
    """Frames with a valid MAC for an arbitrary (possibly invalid) header and payload."""
    import hashlib
    import hmac

    header = env.SerializeToString()
    mac = hmac.new(client.key, digestmod=hashlib.sha256)
    mac.update(TO_SERVER + b"\0" + len(header).to_bytes(8, "little") + header + payload)
    tag = header_tag(client.key, TO_SERVER, header)
    frames = [pb.Frame(header=header).SerializeToString(), pb.Frame(mac=tag).SerializeToString()]
    if payload:
        frames.append(pb.Frame(data=payload).SerializeToString())
    return frames + [pb.Frame(mac=mac.digest()).SerializeToString()]


class Fuzzer:
    """Makes malformed messages for the request in hand; each case names what is wrong."""

    def __init__(self, client: RawClient, rng: random.Random, max_payload_bytes: int) -> None:
        self.client, self.rng, self.max_payload = client, rng, max_payload_bytes
        self.sent_valid_mac: list[Frames] = []

    def template(self, req: Received) -> Message:
        """A plausible reply: zero updates shaped like the request's tensors."""
        tensors = {k: torch.zeros_like(v) for k, v in req.message.tensors.items()}
        return Message("fit_result", req.message.round, self.client.client_id, {"num_examples": 10}, tensors)

    def cases(self) -> list[tuple[str, Callable[[Received], object]]]:
        """Every kind of malformed message."""
        return [(name[5:], getattr(self, name)) for name in sorted(dir(self)) if name.startswith("case_")]

    def _good(self, req: Received, **override: object) -> Frames:
        return self.client.reply(self.template(req), bytes(req.envelope.task_id), **override)

    def _valid_mac(
        self, req: Received, env_edit: Callable[[pb.Envelope], None], payload: bytes | None = None
    ) -> Frames:
        frames = self._good(req)
        env = _header(frames)
        env_edit(env)
        data = b"".join(parse_frame(f).data for f in frames[2:-1]) if payload is None else payload
        out = _resign(self.client, env, data)
        self.sent_valid_mac.append(out)
        return out

    def case_garbage_frames(self, req: Received) -> object:
        return self.client.submit([self.rng.randbytes(self.rng.randint(1, 300)) for _ in range(self.rng.randint(1, 3))])

    def case_empty_stream(self, req: Received) -> object:
        return self.client.submit([])

    def case_data_first(self, req: Received) -> object:
        frames = self._good(req)
        return self.client.submit(frames[2:])

    def case_garbage_header(self, req: Received) -> object:
        frames = self._good(req)
        return self.client.submit([pb.Frame(header=self.rng.randbytes(64)).SerializeToString(), *frames[1:]])

    def case_wrong_version(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "protocol_version", 99)))

    def case_unknown_session(self, req: Received) -> object:
        return self.client.submit(self._good(req, session=os.urandom(16)))

    def case_other_client(self, req: Received) -> object:
        return self.client.submit(self._good(req, client_id=self.client.client_id + 1))

    def case_bad_mac(self, req: Received) -> object:
        frames = self._good(req)
        mac = bytearray(parse_frame(frames[-1]).mac)
        mac[self.rng.randrange(len(mac))] ^= 0xFF
        return self.client.submit([*frames[:-1], pb.Frame(mac=bytes(mac)).SerializeToString()])

    def case_wrong_key(self, req: Received) -> object:
        return self.client.submit(self._good(req, key=os.urandom(32)))

    def case_altered_payload(self, req: Received) -> object:
        frames = self._good(req)
        data = bytearray(parse_frame(frames[2]).data)
        data[self.rng.randrange(len(data))] ^= 0x01
        return self.client.submit([*frames[:2], pb.Frame(data=bytes(data)).SerializeToString(), *frames[3:]])

    def case_reflected_direction(self, req: Received) -> object:
        return self.client.submit(self._good(req, direction=TO_CLIENT))

    def case_wrong_task(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "task_id", os.urandom(16))))

    def case_wrong_round(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "round", e.round + 1)))

    def case_replayed(self, req: Received) -> object:
        if not self.sent_valid_mac:
            return self.case_wrong_task(req)
        return self.client.submit(self.rng.choice(self.sent_valid_mac))

    def case_oversized(self, req: Received) -> object:
        n = self.max_payload // 4 + 1

        def edit(e: pb.Envelope) -> None:
            del e.tensors[:]
            e.tensors.add(name="w", dtype=pb.FLOAT32, shape=[n], nbytes=4 * n)
            e.payload_bytes = 4 * n

        return self.client.submit(self._valid_mac(req, edit, payload=b""))

    def case_more_data_than_declared(self, req: Received) -> object:
        frames = self._good(req)
        extra = pb.Frame(data=self.rng.randbytes(128)).SerializeToString()
        return self.client.submit([*frames[:-1], extra, frames[-1]])

    def case_truncated(self, req: Received) -> object:
        frames = self._good(req)
        data = b"".join(parse_frame(f).data for f in frames[2:-1])
        return self.client.submit(_resign(self.client, _header(frames), data[: len(data) // 2]))

    def case_missing_mac(self, req: Received) -> object:
        return self.client.submit(self._good(req)[:-1])

    def case_unknown_dtype(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e.tensors[0], "dtype", 99)))

    def case_shape_mismatch(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: e.tensors[0].shape.append(7)))

    def case_negative_dim(self, req: Received) -> object:
        def edit(e: pb.Envelope) -> None:
            e.tensors[0].shape[0] = -e.tensors[0].shape[0]

        return self.client.submit(self._valid_mac(req, edit))

    def case_duplicate_names(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e.tensors[1], "name", e.tensors[0].name)))

    def case_meta_not_json(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "meta_json", "{not json")))

    def case_meta_nan(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "meta_json", '{"num_examples": NaN}')))

    def case_meta_not_object(self, req: Received) -> object:
        return self.client.submit(self._valid_mac(req, lambda e: setattr(e, "meta_json", "[1, 2]")))

    def case_join_garbage(self, req: Received) -> object:
        return self.client.join_rpc(self.rng.randbytes(self.rng.randint(0, 200)), timeout=10)

    def case_join_unknown_client(self, req: Received) -> object:
        return self.client.join_rpc(self.client.hello(client_id=10_000 + self.rng.randrange(1000)), timeout=10)

    def case_join_bad_mac(self, req: Received) -> object:
        return self.client.join_rpc(self.client.hello(key=os.urandom(32)), timeout=10)

    def case_join_wrong_version(self, req: Received) -> object:
        return self.client.join_rpc(self.client.hello(version=2), timeout=10)

    def case_join_stale_clock(self, req: Received) -> object:
        return self.client.join_rpc(self.client.hello(unix_ms=int(time.time() * 1000) - 3_600_000), timeout=10)

    def case_join_replayed(self, req: Received) -> object:
        return self.client.join_rpc(self.client.last_hello, timeout=10)

    def case_poll_bad_mac(self, req: Received) -> object:
        return next(iter(self.client.tasks_rpc(self.client.poll(key=os.urandom(32)), timeout=10)))

    def case_poll_replayed(self, req: Received) -> object:
        return next(iter(self.client.tasks_rpc(self.client.poll(seq=1), timeout=10)))

    def case_poll_garbage(self, req: Received) -> object:
        return next(iter(self.client.tasks_rpc(self.rng.randbytes(self.rng.randint(1, 100)), timeout=10)))


def run_case(fn: Callable[[Received], object], req: Received) -> bool:
    """Send one malformed message; True if the server refused it."""
    try:
        out = fn(req)
    except grpc.RpcError as exc:
        return exc.code() not in (grpc.StatusCode.OK,)
    if isinstance(out, pb.SubmitReply):
        return not out.accepted
    return False


def bad_update(req: Received, client_id: int, kind: int) -> Message:
    """A well-formed reply whose update the aggregator must reject (wrong shape, dtype, NaN...)."""
    tensors = {k: torch.zeros_like(v) for k, v in req.message.tensors.items()}
    first = next(iter(tensors))
    variants: list[Callable[[], None]] = [
        lambda: tensors.__setitem__(first, torch.zeros(tensors[first].numel() + 1)),
        lambda: tensors.__setitem__(first, tensors[first].double()),
        lambda: tensors[first].fill_(float("nan")),
        lambda: tensors[first].fill_(1e30),
        lambda: tensors.pop(first),
    ]
    variants[kind % len(variants)]()
    return Message("fit_result", req.message.round, client_id, {"num_examples": 10}, tensors)


def campaign(client: RawClient, messages: int, rounds: int, seed: int, max_payload: int) -> dict[str, object]:
    """Join, then for each of ``rounds`` requests send malformed messages and one bad update."""
    rng = random.Random(seed)
    client.join()
    client.open_tasks()
    fuzzer = Fuzzer(client, rng, max_payload)
    cases = fuzzer.cases()
    sent, refused, accepted = 0, 0, Counter[str]()
    per_round = [messages // rounds + (1 if r < messages % rounds else 0) for r in range(rounds)]
    for r in range(rounds):
        req = client.next_request()
        if req is None:
            break
        for i in range(per_round[r]):
            name, fn = cases[(i + r) % len(cases)] if i < len(cases) else rng.choice(cases)
            ok = run_case(fn, req)
            sent, refused = sent + 1, refused + int(ok)
            if not ok:
                accepted[name] += 1
        bad = client.reply(bad_update(req, client.client_id, r), bytes(req.envelope.task_id))
        client.submit(bad)
    return {"sent": sent, "refused": refused, "accepted": dict(accepted), "bad_updates": rounds}


def main(argv: list[str] | None = None) -> int:
    """Command line of the fuzzing client."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--cert-key")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-message-mb", type=float, default=512.0)
    args = p.parse_args(argv)
    cid, key = auth.read_key_file(args.key)
    if args.insecure:
        channel = grpc.insecure_channel(args.server)
    else:
        creds = grpc.ssl_channel_credentials(
            Path(args.ca).read_bytes() if args.ca else None,
            Path(args.cert_key).read_bytes() if args.cert_key else None,
            Path(args.cert).read_bytes() if args.cert else None,
        )
        channel = grpc.secure_channel(args.server, creds)
    result = campaign(RawClient(channel, cid, key), args.messages, args.rounds, args.seed,
                      int(args.max_message_mb * (1 << 20)))
    print(json.dumps(result), flush=True)
    return 0 if result["sent"] == result["refused"] else 1


if __name__ == "__main__":
    sys.exit(main())
