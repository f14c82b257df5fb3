"""The network server: a gRPC service that is also the engine's :class:`Communicator`.

The engine's :class:`~fedguard.engine.Server` runs unchanged; its algorithm code calls
:meth:`NetworkCommunicator.exchange`, which queues one request per client, lets each
connected client's task stream pick its request up, and waits until every client answered,
dropped (its connection broke after it got the request) or the deadline passed. Clients may
join late, drop and reconnect; a malformed, forged, replayed, stale or oversized message is
refused with a logged reason and the round goes on.

Under attack (issue 14): every call is checked against the registry first (under mutual TLS,
the certificate's client must be registered and not revoked, so a revoked client's calls are
refused before any of their data is read, and its open stream is closed within a second of
the revocation); a reply's header must authenticate before any data frame is read; each call
has deadlines (:mod:`~fedguard.runtime.network.guard`) and each identity a cap on open calls.
Every refusal, failed TLS handshakes included, is one warning line in the log and is counted
by kind in ``refusals.json`` in the run folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fedguard.messages import Message
from fedguard.runtime.base import Exchange, TrafficCounter
from fedguard.runtime.network import auth, tlslog
from fedguard.runtime.network.certs import client_common_name
from fedguard.runtime.network.guard import Busy, CallGuard, Ticket
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.settings import NetworkConfig, mutual, use_tls
from fedguard.runtime.network.wire import (  # SERVICE, welcome_mac: shared with the client
    PB_DTYPES,
    PROTOCOL_VERSION,
    SERVICE,
    TO_CLIENT,
    TO_SERVER,
    Limits,
    Received,
    Routing,
    WireError,
    encode,
    receive,
    welcome_mac,
)

logger = logging.getLogger("fedguard.server")

SESSION_BYTES = 16
#: largest frame the server receives: a client's 1 MiB data chunk and its framing. It is all
#: that is buffered for a call before its header authenticates.
MAX_FRAME_IN = (1 << 20) + (64 << 10)
#: the handler thread pool never grows beyond this (calls past it are refused, not queued)
MAX_THREADS = 2048


class Refused(Exception):
    """A request turned away with a gRPC status code and a reason that is logged."""

    def __init__(self, code: grpc.StatusCode, reason: str, client_id: int | None = None, kind: str = "") -> None:
        super().__init__(reason)
        self.code, self.reason, self.client_id = code, reason, client_id
        self.kind = kind or _KINDS.get(code, "message")


_KINDS = {
    grpc.StatusCode.PERMISSION_DENIED: "identity",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "busy",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
}


@dataclass
class RunInfo:
    """What the server tells each client when it joins."""

    config_toml: str
    model: list[pb.TensorSpec]
    input_shape: list[int]
    num_classes: int
    population: int
    client_sizes: list[int] = field(default_factory=list)

    @classmethod
    def from_setup(cls, setup: Any) -> RunInfo:
        """From an assembled :class:`~fedguard.experiment.Setup`."""
        specs = [
            pb.TensorSpec(name=n, dtype=PB_DTYPES[p.dtype], shape=list(p.shape), nbytes=p.numel() * p.element_size())
            for n, p in setup.model.named_parameters()
        ]
        train = setup.train
        return cls(
            setup.config.to_toml(),
            specs,
            list(train.x.shape[1:]),
            max(train.num_classes, 2),
            setup.sampler.population,
            [len(p) for p in setup.parts],
        )


@dataclass
class Session:
    """One authenticated connection of a client."""

    client_id: int
    session_id: bytes
    key: bytes
    peer: str
    poll_seq: int = 0
    submit_seq: int = 0
    send_seq: int = 0
    streaming: bool = False
    open: bool = True
    #: its task stream was open and has closed: the client dropped
    ended: bool = False
    #: why the registry no longer admits this client (revoked since it joined)
    barred: str | None = None


@dataclass
class Task:
    """One request waiting for a client's reply."""

    client_id: int
    task_id: bytes
    message: Message
    started: float
    session_id: bytes | None = None
    sent_bytes: int = 0
    #: a reply's data is being read for it (a second one is refused before its data)
    receiving: bool = False


@dataclass
class _Round:
    """What handler threads write while one exchange is open."""

    result: Exchange = field(default_factory=Exchange)
    events: list[dict[str, Any]] = field(default_factory=list)


class NetworkCommunicator:
    """Serves the federation over gRPC and implements ``exchange`` for the engine."""

    def __init__(
        self,
        net: NetworkConfig,
        info: RunInfo,
        log: Callable[[str], None] | None = None,
        events_path: Path | None = None,
    ) -> None:
        if not net.clients:
            raise ValueError("network.clients must name the client key registry (clients.json from `fedguard certs`)")
        self.net, self.info = net, info
        self.log = log or logger.info
        self.registry = auth.Registry(net.clients)
        self.limits = Limits(max_payload_bytes=int(net.max_message_mb * (1 << 20)))
        self.traffic = TrafficCounter()
        self.rejections = 0
        self.refusals: Counter[str] = Counter()
        self._tls, self._nonces = use_tls(net), auth.NonceCache()
        self._mutual = self._tls and mutual(net)
        self._refusals_path = events_path.parent / "refusals.json" if events_path else None
        self._ticks = 0
        self.guard = CallGuard(
            net.first_frame_s, net.idle_s, net.round_deadline_s, net.max_calls_per_client,
            net.max_unauthenticated_calls, self._expired, on_tick=self._tick,
        )
        self._cond = threading.Condition()
        self._sessions: dict[int, Session] = {}
        self._seen: set[int] = set()
        self._pending: dict[int, Task] = {}
        self._round = _Round()
        self._waited_round: int | None = None
        self._closing = False
        self._events = events_path.open("a") if events_path else None
        self._server, self.port = self._start()

    # -- the Communicator interface -------------------------------------------------------
    def exchange(self, messages: dict[int, Message]) -> Exchange:
        """Send each message to its client; wait for replies until the deadline."""
        if not messages:
            return Exchange()
        first = messages[min(messages)]
        if first.round != self._waited_round:
            self.wait_for_clients()
            self._waited_round = first.round
        t0 = time.monotonic()
        with self._cond:
            self._round = current = _Round()
            for cid in sorted(messages):
                reason = self._undeliverable(cid)
                if reason:
                    current.result.failed[cid] = reason
                    continue
                self._pending[cid] = Task(cid, os.urandom(16), messages[cid], t0)
            self._cond.notify_all()
            self._wait_replies(t0 + self.net.round_deadline_s)
            self._round = _Round()
        self._report(first, current, time.monotonic() - t0)
        return current.result

    def close(self) -> None:
        """Tell every client the run is over, then stop serving."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            end = time.monotonic() + 5.0
            while any(s.streaming for s in self._sessions.values()) and time.monotonic() < end:
                self._cond.wait(0.1)
        self._server.stop(grace=2.0).wait(5.0)
        self.guard.close()
        tlslog.unsubscribe(self._tls_refused)
        if self._events:
            self._events.close()
        self._write_refusals()
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.refusals.items()))
        by_kind = f" ({kinds})" if kinds else ""
        self.log(f"server stopped; {self.rejections} messages were refused during the run{by_kind}")

    # -- exchange helpers -----------------------------------------------------------------
    def _connected(self) -> int:
        return sum(1 for s in self._sessions.values() if s.open and s.streaming)

    def wait_for_clients(self) -> None:
        """Block until ``network.min_clients`` clients are connected (at most ``wait_timeout_s``)."""
        need = min(self.net.min_clients or self.info.population, self.info.population)
        with self._cond:
            if self._connected() >= need:
                return
            self.log(f"waiting for {need} clients to connect ({self._connected()} connected)")
            end = time.monotonic() + self.net.wait_timeout_s
            while self._connected() < need and not self._closing and time.monotonic() < end:
                self._cond.wait(min(1.0, max(0.0, end - time.monotonic())))
            got = self._connected()
        if got < need:
            self.log(f"only {got} of {need} clients connected after {self.net.wait_timeout_s:g} s; going on")
        else:
            self.log(f"{got} clients connected")

    def _undeliverable(self, cid: int) -> str | None:
        session = self._sessions.get(cid)
        try:
            self.registry.key(cid)
        except auth.AuthError as exc:
            return str(exc)
        gone = session is None or session.ended
        if self.net.skip_disconnected and cid in self._seen and gone:
            return "disconnected (dropped earlier and not back)"
        return None

    def _wait_replies(self, deadline: float) -> None:
        while self._pending and not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(min(remaining, 1.0))
        for _, task in sorted(self._pending.items()):
            how = "" if task.session_id else "; the request was never delivered (client not connected)"
            self._fail(task, f"no reply within the {self.net.round_deadline_s:g} s deadline{how}")
        self._pending.clear()

    def _fail(self, task: Task, reason: str) -> None:
        """Record a client's failure on the open exchange (lock held)."""
        self._round.result.failed[task.client_id] = reason
        self._round.events.append(self._event(task, "failed", reason, 0))

    def _event(self, task: Task, status: str, reason: str, upload: int) -> dict[str, Any]:
        return {
            "round": task.message.round,
            "kind": task.message.kind,
            "client": task.client_id,
            "status": status,
            "reason": reason,
            "download_bytes": task.sent_bytes,
            "upload_bytes": upload,
            "seconds": round(time.monotonic() - task.started, 4),
        }

    def _report(self, first: Message, current: _Round, seconds: float) -> None:
        result = current.result
        total = len(result.replies) + len(result.failed)
        line = f"round {first.round} {first.kind}: {len(result.replies)}/{total} replied in {seconds:.2f} s"
        if result.failed:
            dropped = "; ".join(f"client {c}: {r}" for c, r in sorted(result.failed.items()))
            line += f"; dropped: {dropped}"
        self.log(line)
        if self._events:
            for event in sorted(current.events, key=lambda e: e["client"]):
                self._events.write(json.dumps(event) + "\n")
            self._events.flush()
        self._write_refusals()

    def _write_refusals(self) -> None:
        """The refusals so far, by kind, in the run folder (the network's security metrics)."""
        if self._refusals_path is None:
            return
        with self._cond:
            body = {"total": self.rejections, "by_kind": dict(sorted(self.refusals.items())),
                    "evicted_calls": self.guard.evicted}
        tmp = self._refusals_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body) + "\n")
        tmp.replace(self._refusals_path)

    # -- gRPC plumbing --------------------------------------------------------------------
    def _start(self) -> tuple[grpc.Server, int]:
        handlers = {
            "Join": grpc.unary_unary_rpc_method_handler(self._join),
            "Tasks": grpc.unary_stream_rpc_method_handler(self._tasks),
            "Submit": grpc.stream_unary_rpc_method_handler(self._submit),
        }
        workers = min(MAX_THREADS, self.info.population * self.net.max_calls_per_client
                      + self.net.max_unauthenticated_calls + 8)
        options = [
            ("grpc.max_receive_message_length", MAX_FRAME_IN),
            ("grpc.max_send_message_length", 4 << 20),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", int(self.net.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedguard-rpc"),
            handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers)],
            options=options,
            maximum_concurrent_rpcs=workers,
        )
        try:
            port = self._bind(server)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.net.address}: {exc}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {self.net.address} (address in use?)")
        server.start()
        tlslog.subscribe(self._tls_refused)
        host = self.net.address.rpartition(":")[0]
        security = "plaintext (loopback only)"
        if self._tls:
            security = "TLS" + (", client certificates required" if self._mutual else ", no client certificates")
        self.log(
            f"fedguard server (protocol v{PROTOCOL_VERSION}) listening on {host}:{port}, {security}; "
            f"{len(self.registry.ids())} registered clients; population {self.info.population}"
        )
        return server, port

    def _bind(self, server: grpc.Server) -> int:
        if not self._tls:
            return server.add_insecure_port(self.net.address)
        key, cert = Path(self.net.key).read_bytes(), Path(self.net.cert).read_bytes()
        ca = Path(self.net.client_ca).read_bytes() if self.net.client_ca else None
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
        return server.add_secure_port(self.net.address, creds)

    def _refuse(self, context: grpc.ServicerContext, exc: Refused) -> None:
        self._note_rejection(context.peer(), exc.client_id, exc.reason, exc.kind)
        context.abort(exc.code, exc.reason)

    def _note_rejection(self, peer: str, client_id: int | str | None, reason: str, kind: str = "message") -> None:
        with self._cond:
            self.rejections += 1
            self.refusals[kind] += 1
        who = f"client {client_id}" if isinstance(client_id, int) else client_id or "unidentified peer"
        logger.warning("refused message from %s (%s) [%s]: %s", who, peer, kind, reason)

    def _tls_refused(self, reason: str) -> None:
        """A TLS handshake gRPC refused (from its log): one line and one count, like every refusal."""
        self._note_rejection("TLS handshake", None, reason, "tls")

    def _expired(self, ticket: Ticket) -> None:
        self._note_rejection(_peer(ticket.context), ticket.identity, f"{ticket.what}: {ticket.expired}", "deadline")

    def _tick(self) -> None:
        """Every second: close the streams of clients the registry no longer admits."""
        self._ticks += 1
        if self._ticks % 5:
            return
        with self._cond:
            sessions = [s for s in self._sessions.values() if s.open and s.barred is None]
        barred = []
        for session in sessions:
            try:
                self.registry.key(session.client_id)
            except auth.AuthError as exc:
                barred.append((session, str(exc)))
        if barred:
            with self._cond:
                for session, reason in barred:
                    session.barred = reason
                self._cond.notify_all()

    # -- identity of a call -----------------------------------------------------------------
    def _certified(self, context: grpc.ServicerContext) -> int | None:
        """Under mutual TLS, the registered and active client the peer's certificate names
        (before any of the call's data is used); None without mutual TLS."""
        if not self._mutual:
            return None
        names = [bytes(n).decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]
        ids = [int(n[7:]) for n in names if n.startswith("client-") and n[7:].isdigit()]
        if len(ids) != 1:
            what = f"TLS certificate {names or 'without a name'} names no client"
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, what)
        try:
            self.registry.key(ids[0])
        except auth.AuthError as exc:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"certificate of {exc}", ids[0], "identity") from exc
        return ids[0]

    def _enter(self, context: grpc.ServicerContext, what: str, cid: int | None, deadline_s: float | None,
               call_s: float | None = None) -> Ticket:
        try:
            return self.guard.enter(context, what, None if cid is None else f"client {cid}", deadline_s, call_s)
        except Busy as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: {exc}", cid, "busy") from exc

    def _internal(self, context: grpc.ServicerContext, what: str) -> None:
        logger.exception("internal error while handling %s from %s", what, context.peer())
        context.abort(grpc.StatusCode.INTERNAL, "internal server error")

    # -- Join -----------------------------------------------------------------------------
    def _join(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        ticket = None
        try:
            certified = self._certified(context)
            if certified is not None:  # a Join's request is read whole before it gets here
                ticket = self._enter(context, "Join", certified, self.net.first_frame_s)
            return self._welcome(raw, context).SerializeToString()
        except Refused as exc:
            self._refuse(context, exc)
        except Exception:  # noqa: BLE001 - a handler must never take the server down
            self._internal(context, "Join")
        finally:
            if ticket is not None:
                self.guard.leave(ticket)
        return b""

    def _welcome(self, raw: bytes, context: grpc.ServicerContext) -> pb.Welcome:
        hello = _parse(pb.Hello, raw, "Join")
        cid = int(hello.client_id)
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"client speaks protocol v{hello.protocol_version}, this server v{PROTOCOL_VERSION}",
                cid,
            )
        key = self._client_key(cid)
        self._check_certificate(context, cid)
        if not auth.verify(key, hello.mac, "hello", hello.protocol_version, cid, hello.client_nonce, hello.unix_ms):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad signature on Hello (wrong key, or forged)", cid)
        skew = abs(time.time() * 1000 - hello.unix_ms) / 1000
        if skew > auth.MAX_CLOCK_SKEW_S:
            reason = f"Hello is {skew:.0f} s off the server clock (replayed?)"
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, reason, cid)
        if len(hello.client_nonce) < 16 or not self._nonces.fresh(bytes(hello.client_nonce)):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "replayed Hello (nonce seen before)", cid)
        if not 0 <= cid < self.info.population:
            reason = f"client {cid} is not in this run (clients 0..{self.info.population - 1})"
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, reason, cid)
        session = self._open_session(cid, key, context.peer())
        welcome = pb.Welcome(
            protocol_version=PROTOCOL_VERSION,
            session_id=session.session_id,
            client_nonce=hello.client_nonce,
            config_toml=self.info.config_toml,
            model=self.info.model,
            input_shape=self.info.input_shape,
            num_classes=self.info.num_classes,
            client_sizes=self.info.client_sizes,
        )
        welcome.mac = welcome_mac(key, welcome)
        return welcome

    def _client_key(self, cid: int) -> bytes:
        try:
            return self.registry.key(cid)
        except auth.AuthError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.code == "revoked" else grpc.StatusCode.UNAUTHENTICATED
            raise Refused(code, str(exc), cid) from exc

    def _check_certificate(self, context: grpc.ServicerContext, cid: int) -> None:
        if not self._mutual:
            return
        names = [bytes(n).decode(errors="replace") for n in context.auth_context().get("x509_common_name", [])]
        if client_common_name(cid) not in names:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED, f"TLS certificate is for {names or 'nobody'}, not client {cid}", cid
            )

    def _open_session(self, cid: int, key: bytes, peer: str) -> Session:
        session = Session(cid, os.urandom(SESSION_BYTES), key, peer)
        with self._cond:
            old = self._sessions.get(cid)
            if old is not None:
                old.open = False
                self._drop_delivered(old, "reconnected; the request sent on its earlier connection is lost")
            self._sessions[cid] = session
            again = cid in self._seen
            self._seen.add(cid)
            self._cond.notify_all()
        self.log(f"client {cid} joined from {peer}" + (" (reconnect)" if again else ""))
        return session

    def _drop_delivered(self, session: Session, reason: str) -> None:
        """Fail the open request delivered on ``session`` (lock held)."""
        task = self._pending.get(session.client_id)
        if task is not None and task.session_id == session.session_id:
            del self._pending[session.client_id]
            self._fail(task, reason)

    # -- Tasks ----------------------------------------------------------------------------
    def _tasks(self, raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:  # the poll request is read whole before it gets here: authenticate it, then count it
            session = self._open_stream(raw, self._certified(context))
            try:
                ticket = self._enter(context, "Tasks", session.client_id, 1e9, float("inf"))
            except Refused:
                with self._cond:
                    session.streaming = False
                raise
        except Refused as exc:
            self._refuse(context, exc)
            return
        except Exception:  # noqa: BLE001
            self._internal(context, "Tasks")
            return
        context.add_callback(lambda: self._stream_ended(session))
        try:
            yield from self._stream(session, context, ticket)
        finally:
            self.guard.leave(ticket)

    def _open_stream(self, raw: bytes, certified: int | None = None) -> Session:
        req = _parse(pb.PollRequest, raw, "Tasks")
        cid = int(req.client_id)
        if certified is not None and cid != certified:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"task poll for client {cid} on client {certified}'s "
                          "certificate", certified)
        session = self._session(cid, bytes(req.session_id))
        if not auth.verify(session.key, req.mac, "poll", cid, req.session_id, req.seq):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "bad signature on task poll", cid)
        with self._cond:
            if req.seq <= session.poll_seq:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "replayed task poll", cid)
            if session.streaming or session.ended:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "this session already has its task stream", cid)
            session.poll_seq = int(req.seq)
            session.streaming = True
            self._cond.notify_all()
        return session

    def _session(self, cid: int, session_id: bytes) -> Session:
        with self._cond:
            session = self._sessions.get(cid)
        if session is None or not session.open or session.session_id != session_id:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown or expired session", cid)
        self._client_key(cid)  # revoked since it joined?
        return session

    def _stream(self, session: Session, context: grpc.ServicerContext, ticket: Ticket) -> Iterator[bytes]:
        """The session's requests; a client that stops reading for ``idle_s`` is evicted (its
        send would otherwise hold this thread), one revoked meanwhile is cut off."""
        while True:
            self.guard.extend(ticket, 1e9)
            task, seq, control = self._next(session, context)
            if session.barred is not None:
                self._refuse(context, Refused(grpc.StatusCode.PERMISSION_DENIED, session.barred, session.client_id))
                return
            idle = f"did not read its task stream for {self.net.idle_s:g} s (stream evicted)"
            if control is not None:
                self.guard.extend(ticket, reason=idle)
                yield pb.Frame(control=control).SerializeToString()
                if control.code != pb.Control.KEEPALIVE:
                    return
                continue
            if task is None:
                return
            route = Routing(session.session_id, session.client_id, seq, task.task_id)
            chunk = self.net.chunk_kb * 1024
            for frame in encode(task.message, route, session.key, TO_CLIENT, chunk):
                data = frame.SerializeToString()
                with self._cond:
                    task.sent_bytes += len(data)
                    self.traffic.sent += len(data)
                self.guard.extend(ticket, reason=idle)
                yield data

    def _next(self, session: Session, context: grpc.ServicerContext) -> tuple[Task | None, int, pb.Control | None]:
        """The next request for this session, a keep-alive after a quiet spell, or the end."""
        end = time.monotonic() + self.net.keepalive_s
        with self._cond:
            while True:
                if self._closing:
                    return None, 0, pb.Control(code=pb.Control.DONE, reason="the run is over")
                if not session.open:
                    return None, 0, pb.Control(code=pb.Control.SUPERSEDED, reason="a newer session replaced this one")
                if not context.is_active() or session.barred is not None:
                    return None, 0, None
                task = self._pending.get(session.client_id)
                if task is not None and task.session_id is None:
                    task.session_id = session.session_id
                    session.send_seq += 1
                    return task, session.send_seq, None
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return None, 0, pb.Control(code=pb.Control.KEEPALIVE)
                self._cond.wait(remaining)

    def _stream_ended(self, session: Session) -> None:
        with self._cond:
            session.streaming, session.ended = False, True
            current = self._sessions.get(session.client_id) is session
            if current and not self._closing:
                self._drop_delivered(session, "connection lost after the request was delivered (client dropped)")
            self._cond.notify_all()
        if current and not self._closing:
            self.log(f"client {session.client_id} disconnected")

    # -- Submit ---------------------------------------------------------------------------
    def _submit(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            certified = self._certified(context)
            ticket = self._enter(context, "Submit", certified, self.net.first_frame_s)
        except Refused as exc:
            self._refuse(context, exc)
            return b""
        try:
            return self._read_reply(self.guard.frames(ticket, frames), context, ticket, certified)
        finally:
            self.guard.leave(ticket)

    def _read_reply(self, frames: Iterator[bytes], context: grpc.ServicerContext, ticket: Ticket,
                    certified: int | None) -> bytes:
        holder: dict[str, Any] = {}

        def key_for(env: pb.Envelope) -> bytes:
            if certified is not None and int(env.client_id) != certified:
                raise WireError(f"message of client {env.client_id} on client {certified}'s certificate")
            try:
                holder["session"] = self._session(int(env.client_id), bytes(env.session_id))
            except Refused as exc:
                raise WireError(f"client {env.client_id}: {exc.reason}") from exc
            return holder["session"].key

        def authorized(env: pb.Envelope) -> None:  # the header is authentic; no data read yet
            try:
                self.guard.authenticated(ticket, f"client {holder['session'].client_id}")
            except Busy as exc:
                raise WireError(str(exc)) from exc
            holder["task"] = self._claim(holder["session"], env)

        kind = "message"
        try:
            rec = receive(frames, self.limits, key_for, TO_SERVER, authorized)
            reason = self._accept(holder["session"], rec)
        except WireError as exc:
            reason = str(exc)
        except grpc.RpcError:
            reason, kind = ticket.expired or "stream broken before the message was complete", "deadline"
        except Exception:  # noqa: BLE001
            logger.exception("internal error while handling Submit from %s", context.peer())
            reason = "internal server error"
        finally:
            task = holder.get("task")
            if task is not None:
                task.receiving = False
        if reason is None:
            return pb.SubmitReply(accepted=True).SerializeToString()
        session = holder.get("session")
        if ticket.expired is None:  # the watchdog counted the ones it evicted
            self._note_rejection(context.peer(), session.client_id if session else ticket.identity, reason, kind)
        return pb.SubmitReply(accepted=False, reason=reason).SerializeToString()

    def _claim(self, session: Session, env: pb.Envelope) -> Task:
        """The open request an authenticated header answers; refused before any data is read
        when there is none, or when another reply to it is being read."""
        with self._cond:
            if env.seq <= session.submit_seq:
                raise WireError(f"replayed message (sequence {env.seq}, last seen {session.submit_seq})")
            task = self._pending.get(session.client_id)
            if task is None or task.task_id != env.task_id:
                raise WireError("reply to no open request (stale, replayed or unknown request id)")
            if task.receiving:
                raise WireError("another reply to this request is being received")
            task.receiving = True
            return task

    def _accept(self, session: Session, rec: Received) -> str | None:
        """File a verified reply under its open request; the reason when it does not fit."""
        env, cid = rec.envelope, session.client_id
        with self._cond:
            if self._sessions.get(cid) is not session or not session.open:
                return "session was replaced (the client reconnected)"
            if env.seq <= session.submit_seq:
                return f"replayed message (sequence {env.seq}, last seen {session.submit_seq})"
            session.submit_seq = int(env.seq)
            task = self._pending.get(cid)
            if task is None or task.task_id != env.task_id:
                return "reply to no open request (stale, replayed or unknown request id)"
            if task.session_id != session.session_id:
                return "reply on a connection the request was not sent on"
            if env.round != task.message.round:
                return f"message for round {env.round}, the open request is for round {task.message.round}"
            del self._pending[cid]
            self.traffic.received += rec.wire_bytes
            self._file_reply(task, rec)
            self._cond.notify_all()
        return None

    def _file_reply(self, task: Task, rec: Received) -> None:
        msg = rec.message
        msg.client_id = task.client_id
        if msg.kind in ("error", "dropped"):
            reason = f"client error: {msg.meta.get('error', msg.kind)}"
            self._round.result.failed[task.client_id] = reason
            self._round.events.append(self._event(task, "error", reason, rec.wire_bytes))
        else:
            self._round.result.replies[task.client_id] = msg
            self._round.events.append(self._event(task, "ok", "", rec.wire_bytes))


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - a finished call may no longer know its peer
        return "?"


def _parse(cls: Any, raw: bytes, what: str) -> Any:
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, TypeError) as exc:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"garbage {what} request ({len(raw)} bytes)") from exc


def _checkpoint_round(run_dir: Path) -> int:
    path = run_dir / "checkpoint.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} has no checkpoint.json to resume from")
    return int(json.loads(path.read_text())["round"])


def trim_after_checkpoint(run_dir: Path) -> int:
    """Drop metric rows of rounds after the last checkpoint (they are run again); its round."""
    last = _checkpoint_round(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if int(json.loads(line).get("round", 0)) <= last]
        metrics.write_text("".join(line + "\n" for line in kept))
    return last


def serve(config: Any, run_dir: str | Path | None = None, resume: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> Any:
    """Run the configured experiment with clients connecting over the network.

    The same :class:`~fedguard.experiment.Experiment` as the simulation runs it; only the
    communicator differs. The server state is checkpointed every round (unless
    ``run.checkpoint_every`` says otherwise) and ``resume`` continues from the last one.
    """
    from fedguard.experiment import Experiment

    log = log or logger.info
    net: NetworkConfig = config.network
    if not net.clients:
        raise ValueError("network.clients must name the client key registry (clients.json from `fedguard certs`)")
    use_tls(net)
    config.set("run.progress", False)
    if config.run.baseline != "none":
        log("run.baseline is run by `fedguard run` only; the network server skips it")
        config.set("run.baseline", "none")
    if not config.run.checkpoint_every:
        config.set("run.checkpoint_every", 1)
    exp = Experiment(config, log=log)
    path = Path(resume) if resume else Path(run_dir) if run_dir else exp._new_run_dir()
    if resume:
        done = trim_after_checkpoint(path)
        if done >= config.run.rounds:
            log(f"{path} is complete ({done} of {config.run.rounds} rounds); nothing to resume")
            return None
        log(f"resuming {path} after round {done}")
    path.mkdir(parents=True, exist_ok=True)
    log(f"run folder: {path}")

    def factory(setup: Any) -> NetworkCommunicator:
        comm = NetworkCommunicator(net, RunInfo.from_setup(setup), log, path / "network.jsonl")
        comm.wait_for_clients()  # before the first round, so that its time is the round's own
        return comm

    result = exp.run(None if resume else path, path if resume else None, communicator=factory)
    summary = {k: v for k, v in result.final.items() if isinstance(v, (int, float))}
    log(f"run finished: {json.dumps(summary)}")
    return result
