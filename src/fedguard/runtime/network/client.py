"""The client process: joins a server, answers its requests with local data, reconnects.

A client keeps its data (``--data`` file, or its partition of a dataset it has locally)
and its state; only protocol messages leave it. The run's configuration comes from the
server, so the task, model, local training and pipeline are the simulation's own code.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import tomllib
import torch

from fedguard.messages import Message
from fedguard.runtime.client import ClientApp
from fedguard.runtime.network import auth
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.settings import is_loopback, split_address
from fedguard.runtime.network.wire import (
    PROTOCOL_VERSION,
    SERVICE,
    TO_CLIENT,
    TO_SERVER,
    Limits,
    Routing,
    WireError,
    encode,
    parse_frame,
    receive,
    welcome_mac,
)

logger = logging.getLogger("fedguard.client")

#: gRPC codes of a refused Join, after which retrying cannot help
FATAL = {
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
}
EXIT_DONE, EXIT_CONFIG, EXIT_REFUSED, EXIT_GAVE_UP = 0, 2, 3, 4
#: an HTTP/2 client preface and an empty SETTINGS frame: what a TLS probe sends to get an answer
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass
class ClientOptions:
    """How a client process connects and where its data is."""

    server: str
    key_file: str
    client_id: int | None = None
    ca: str | None = None
    cert: str | None = None
    cert_key: str | None = None
    insecure: bool = False
    server_name: str | None = None
    data: str | None = None
    data_dir: str | None = None
    config: str | None = None
    state_dir: str | None = None
    retry_s: float = 300.0
    threads: int = 1
    #: refuse a server configuration whose DP gives this client more than this epsilon against the server
    #: (0: off); see :class:`fedguard.privacy.floor.PrivacyFloor`
    privacy_floor: float = 0.0
    #: other honest clients whose noise shares the floor counts (0: only this client's own noise)
    privacy_floor_trusted: int = 0
    #: account the floor at this delta when below the configuration's (0: the configuration's)
    privacy_floor_delta: float = 0.0


class ClientSetupError(Exception):
    """The client cannot take part (its data or configuration does not fit the run)."""


def load_local_data(path: str | Path) -> Any:
    """A client's own examples from ``.npz`` (arrays ``x`` and ``y``; no pickle) or ``.safetensors``.

    ``x`` is (N, H, W), (N, C, H, W) or (N, features); uint8 pixels are scaled to [0, 1].
    """
    from fedguard.data.files import EXAMPLE_FILE_SUFFIXES, load_examples

    if Path(path).suffix not in EXAMPLE_FILE_SUFFIXES:
        raise ClientSetupError(f"--data {path}: use an .npz or .safetensors file with arrays x and y")
    return load_examples(path)


def _comparable(config: Any) -> dict[str, Any]:
    """A configuration without the keys that may differ between machines."""
    data = config.to_dict()
    for section in ("run", "network"):
        data.pop(section, None)
    for key in ("data_dir", "download"):
        data.get("data", {}).pop(key, None)
    return data


class NetworkClient:
    """One client process: authenticates, runs its :class:`ClientApp`, survives reconnects."""

    def __init__(self, opts: ClientOptions) -> None:
        self.opts = opts
        self.client_id, self.key = auth.read_key_file(opts.key_file)
        if opts.client_id is not None and opts.client_id != self.client_id:
            raise ClientSetupError(f"--id {opts.client_id} but {opts.key_file} is the key of client {self.client_id}")
        self.channel = _channel(opts)
        self._join_rpc = self.channel.unary_unary(f"/{SERVICE}/Join")
        self._tasks_rpc = self.channel.unary_stream(f"/{SERVICE}/Tasks")
        self._submit_rpc = self.channel.stream_unary(f"/{SERVICE}/Submit")
        self.app: ClientApp | None = None
        self._config_toml: str | None = None
        self.limits = Limits(max_payload_bytes=1 << 40)
        self.chunk_bytes = 1 << 20

    def log(self, text: str) -> None:
        """One line of this client's log."""
        logger.info("client %d: %s", self.client_id, text)

    # -- the main loop --------------------------------------------------------------------
    def run(self) -> int:
        """Serve until the server says the run is over; the process exit code."""
        self.log(f"connecting to {self.opts.server} ({'TLS' if not self.opts.insecure else 'plaintext, loopback'})")
        down_since: float | None = None
        backoff = 0.2
        probed = -1e9
        while True:
            try:
                if time.monotonic() - probed > 5.0:  # a TLS refusal is permanent: name it and stop
                    probed = time.monotonic()
                    problem = diagnose_tls(self.opts)
                    if problem:
                        logger.error("client %d: %s", self.client_id, problem)
                        return EXIT_REFUSED
                try:
                    welcome = self._join()
                except grpc.RpcError as exc:
                    if exc.code() in FATAL:
                        logger.error("client %d: refused by the server: %s", self.client_id,
                                     explain_refusal(exc.details() or "", self.client_id, self.opts))
                        return EXIT_REFUSED
                    raise
                self._ensure_app(welcome)
                down_since, backoff = None, 0.2
                if self._serve(welcome) == "done":
                    self.log("the server says the run is over; exiting")
                    return EXIT_DONE
            except grpc.RpcError as exc:  # lost the server or the session: join again
                code = exc.code()
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.opts.retry_s:
                    logger.error("client %d: server unreachable for %.0f s; giving up",
                                 self.client_id, self.opts.retry_s)
                    return EXIT_GAVE_UP
                self.log(f"lost the server or the session ({code.name}); joining again in {backoff:.1f} s")
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except WireError as exc:
                logger.warning("client %d: bad message from the server (%s); reconnecting", self.client_id, exc)
                time.sleep(backoff)
            except ClientSetupError as exc:
                logger.error("client %d: %s", self.client_id, exc)
                return EXIT_CONFIG

    def _join(self) -> pb.Welcome:
        nonce, now_ms = os.urandom(16), int(time.time() * 1000)
        hello = pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            client_id=self.client_id,
            client_nonce=nonce,
            unix_ms=now_ms,
            mac=auth.sign(self.key, "hello", PROTOCOL_VERSION, self.client_id, nonce, now_ms),
        )
        raw = self._join_rpc(hello.SerializeToString(), timeout=10, wait_for_ready=True)
        try:
            welcome = pb.Welcome.FromString(raw)
        except Exception as exc:
            raise WireError("garbage Welcome") from exc
        if welcome.client_nonce != nonce or not _welcome_ok(self.key, welcome):
            raise WireError("Welcome not signed with this client's key: not the server this key belongs to")
        return welcome

    def _serve(self, welcome: pb.Welcome) -> str:
        session = bytes(welcome.session_id)
        poll = pb.PollRequest(client_id=self.client_id, session_id=session, seq=1)
        poll.mac = auth.sign(self.key, "poll", self.client_id, session, 1)
        stream: Iterator[bytes] = iter(self._tasks_rpc(poll.SerializeToString()))
        self.log("joined; waiting for requests")
        last_seq, sent_seq = 0, 0
        for raw in stream:
            frame = parse_frame(raw)
            if frame.WhichOneof("body") == "control":
                if frame.control.code == pb.Control.KEEPALIVE:
                    continue
                self.log(f"stream closed by the server: {frame.control.reason}")
                return "done" if frame.control.code == pb.Control.DONE else "reconnect"
            frames = itertools.chain([raw], stream)
            rec = receive(frames, self.limits, lambda env: self._route_key(env, session), TO_CLIENT)
            if rec.envelope.seq <= last_seq:
                raise WireError(f"replayed request (sequence {rec.envelope.seq})")
            last_seq = rec.envelope.seq
            sent_seq += 1
            self._answer(rec.message, Routing(session, self.client_id, sent_seq, bytes(rec.envelope.task_id)))
        return "reconnect"

    def _route_key(self, env: pb.Envelope, session: bytes) -> bytes:
        if env.session_id != session or env.client_id != self.client_id:
            raise WireError("request for another session or client")
        return self.key

    def _answer(self, msg: Message, route: Routing) -> None:
        t0 = time.perf_counter()
        self.log(f"round {msg.round}: {msg.kind} received")
        assert self.app is not None
        try:
            reply = self.app.handle(msg)
            frames = [f.SerializeToString() for f in encode(reply, route, self.key, TO_SERVER, self.chunk_bytes)]
        except Exception as exc:  # noqa: BLE001 - report the failure to the server, keep serving
            logger.exception("client %d: failed to answer %s", self.client_id, msg.kind)
            reply = Message("error", msg.round, self.client_id, {"error": f"{type(exc).__name__}: {exc}"})
            frames = [f.SerializeToString() for f in encode(reply, route, self.key, TO_SERVER, self.chunk_bytes)]
        size = sum(len(f) for f in frames)
        ack = pb.SubmitReply.FromString(self._submit_rpc(iter(frames), timeout=300))
        if not ack.accepted:
            logger.warning("client %d: the server refused our reply: %s", self.client_id, ack.reason)
        self.log(f"round {msg.round}: {reply.kind} sent ({size} bytes) after {time.perf_counter() - t0:.2f} s")

    # -- building the client application --------------------------------------------------
    def _ensure_app(self, welcome: pb.Welcome) -> None:
        if self._config_toml is not None:
            if welcome.config_toml != self._config_toml:
                raise ClientSetupError("the server now runs a different configuration; restart this client")
            return
        self.app = build_app(self.opts, self.client_id, welcome)
        self._config_toml = welcome.config_toml


def explain_refusal(details: str, client_id: int, opts: ClientOptions) -> str:
    """The server's reason for refusing this client, with what to do about it."""
    if "revoked" in details:
        return (f"{details}. The server's registry marks client {client_id} revoked; its operator can reinstate it "
                f"(fedguard certs --reinstate {client_id}) or issue a new key (fedguard certs --add ID)")
    if "unknown client id" in details:
        return (f"{details}. The key file {opts.key_file} is not in the server's registry: use the key the server's "
                f"operator made for you (fedguard certs --add {client_id} writes client-{client_id}.key)")
    if "bad signature on Hello" in details:
        return (f"{details}. The server holds another key for client {client_id}: use the client-{client_id}.key "
                "from the same `fedguard certs` folder as the server's clients.json")
    if "TLS certificate" in details or "certificate" in details:
        return (f"{details}. Use the certificate of this client (--cert client-{client_id}.pem "
                f"--cert-key client-{client_id}-key.pem) with its key file")
    if "protocol" in details:
        return f"{details}. Run the same fedguard version as the server"
    return details


def diagnose_tls(opts: ClientOptions, timeout: float = 5.0) -> str | None:
    """A permanent TLS problem with the server, in words with its fix; None when the handshake
    succeeds, TLS is off, or the server cannot be reached (that is worth retrying)."""
    if opts.insecure:
        return None
    host, port = split_address(opts.server)
    try:
        ctx = ssl.create_default_context(cafile=opts.ca) if opts.ca else ssl.create_default_context()
        if opts.cert and opts.cert_key:
            ctx.load_cert_chain(opts.cert, opts.cert_key)
    except (OSError, ssl.SSLError) as exc:
        raise ClientSetupError(f"cannot load the TLS files (--ca/--cert/--cert-key): {exc}") from exc
    ctx.set_alpn_protocols(["h2"])
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    try:
        with ctx.wrap_socket(sock, server_hostname=opts.server_name or host) as tls:
            tls.settimeout(timeout)
            tls.sendall(_H2_PREFACE)
            if not tls.recv(1):  # a gRPC server answers with its SETTINGS; it closed: our certificate
                return _tls_alert_problem(opts, ssl.SSLError(1, "closed after the handshake: HANDSHAKE_FAILURE"))
    except ssl.SSLCertVerificationError as exc:
        return _server_certificate_problem(opts, exc)
    except ssl.SSLError as exc:
        return _tls_alert_problem(opts, exc)
    except OSError:
        return None
    finally:
        sock.close()
    return None


def _server_certificate_problem(opts: ClientOptions, exc: ssl.SSLCertVerificationError) -> str:
    why = exc.verify_message or str(exc)
    if "mismatch" in why.lower():
        return (f"TLS: the server's certificate is not for {opts.server_name or opts.server} ({why}); "
                "pass --server-name with a name it is issued for (fedguard certs --hosts ...)")
    ca = f"--ca {opts.ca}" if opts.ca else "the system's CAs (no --ca given)"
    return (f"TLS: the server's certificate is not signed by {ca} ({why}); wrong CA: pass --ca with the CA "
            "certificate that signed the server's (ca.pem from the server's operator)")


def _tls_alert_problem(opts: ClientOptions, exc: ssl.SSLError) -> str | None:
    text = f"{getattr(exc, 'reason', '') or ''} {exc}".upper()
    if "CERTIFICATE_REQUIRED" in text or ("HANDSHAKE_FAILURE" in text and not opts.cert):
        return ("TLS: the server requires a client certificate (mutual TLS) and none was given; missing certificate: "
                "add --cert client-K.pem --cert-key client-K-key.pem (from `fedguard certs`)")
    if any(k in text for k in ("UNKNOWN_CA", "BAD_CERTIFICATE", "DECRYPT_ERROR", "CERTIFICATE_UNKNOWN",
                               "HANDSHAKE_FAILURE")):
        return (f"TLS: the server refused the client certificate {opts.cert} (not signed by the CA it trusts for "
                "clients, network.client_ca); use the certificate its operator issued for this client")
    if "CERTIFICATE_EXPIRED" in text:
        return f"TLS: the client certificate {opts.cert} has expired; ask for a new one"
    if "WRONG_VERSION_NUMBER" in text or "RECORD_LAYER_FAILURE" in text:
        return "TLS: the server does not speak TLS (a loopback server with network.tls = 'off'): use --insecure"
    return None


def _welcome_ok(key: bytes, welcome: pb.Welcome) -> bool:
    return hmac.compare_digest(welcome_mac(key, welcome), bytes(welcome.mac))


def _channel(opts: ClientOptions) -> grpc.Channel:
    host, _ = split_address(opts.server)
    options = [
        ("grpc.max_receive_message_length", 4 << 20),
        ("grpc.max_send_message_length", 4 << 20),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # retry a lost server quickly: gRPC's default backoff grows to two minutes
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
    if opts.insecure:
        if not is_loopback(host):
            raise ClientSetupError(f"--insecure (no TLS) is only allowed to a loopback server, not {opts.server}")
        return grpc.insecure_channel(opts.server, options=options)
    if bool(opts.cert) != bool(opts.cert_key):
        raise ClientSetupError("give both --cert and --cert-key for mutual TLS, or neither")
    creds = grpc.ssl_channel_credentials(
        root_certificates=Path(opts.ca).read_bytes() if opts.ca else None,
        private_key=Path(opts.cert_key).read_bytes() if opts.cert_key else None,
        certificate_chain=Path(opts.cert).read_bytes() if opts.cert else None,
    )
    if opts.server_name:
        options.append(("grpc.ssl_target_name_override", opts.server_name))
    return grpc.secure_channel(opts.server, creds, options=options)


def build_app(opts: ClientOptions, client_id: int, welcome: pb.Welcome) -> ClientApp:
    """The client application for the server's configuration and this client's data."""
    import fedguard.plugins  # noqa: F401  (every family registers its config section)
    from fedguard.config import Config
    from fedguard.privacy.noise import seeded_noise_problem
    from fedguard.runtime.state_store import DirectoryStateStore, MemoryStateStore

    config = Config.from_dict(tomllib.loads(welcome.config_toml))
    if problem := seeded_noise_problem(config):  # dp: a server cannot make this client's noise predictable
        raise ClientSetupError(problem)
    if opts.config:
        mine = Config.load(opts.config)
        if _comparable(mine) != _comparable(config):
            raise ClientSetupError(f"{opts.config} differs from the server's configuration (beyond run and network)")
    if opts.data_dir:
        config.set("data.data_dir", opts.data_dir)
    store = DirectoryStateStore(opts.state_dir, durable=True) if opts.state_dir else MemoryStateStore()
    if opts.data:
        app = _app_from_file(config, client_id, opts.data, welcome, store)
    else:
        app = _app_from_partition(config, client_id, store)
    _check_model(app, welcome)
    if opts.privacy_floor:
        _enforce_privacy_floor(opts, config, app, welcome)
    logger.info(
        "client %d: %d local examples (%s); model of %d tensors matches the server's",
        client_id, len(app.data), opts.data or f"partition {client_id} of {config.data.dataset}", len(welcome.model),
    )
    return app


def _enforce_privacy_floor(opts: ClientOptions, config: Any, app: ClientApp, welcome: pb.Welcome) -> None:
    """dp: refuse, before training, a configuration whose noise gives this client more than its floor
    against the server, and answer no more training requests than the floor counted (issue 13)."""
    from fedguard.core.pipeline import ConfigurationError
    from fedguard.privacy.floor import PrivacyFloor

    try:
        floor = PrivacyFloor(opts.privacy_floor, opts.privacy_floor_trusted, opts.privacy_floor_delta)
        value = floor.check(config, app, list(welcome.client_sizes))
    except ConfigurationError as exc:
        raise ClientSetupError(str(exc)) from exc
    app.handlers["fit"] = floor.guard(config.run.rounds, app.handlers["fit"])
    logger.info("client %d: privacy floor %g met: epsilon %.4g against the server over %d rounds",
                app.client_id, opts.privacy_floor, value, config.run.rounds)


def _app_from_partition(config: Any, client_id: int, store: Any) -> ClientApp:
    """Partition ``client_id`` of the configured dataset, exactly as the simulation splits it
    (only this client's examples are converted to float; the test set is never read)."""
    from fedguard.runtime.network.client_setup import UnknownClient, partition_app

    try:
        return partition_app(config, client_id, store)
    except UnknownClient as exc:
        raise ClientSetupError(str(exc)) from exc


def _app_from_file(config: Any, client_id: int, path: str, welcome: pb.Welcome, store: Any) -> ClientApp:
    """A client bringing its own data file; the model is shaped as the server says."""
    from fedguard.data.arrays import ArrayDataset
    from fedguard.runtime.network.client_setup import build_parts, client_sampler

    data = load_local_data(path)
    shape = list(welcome.input_shape)
    if list(data.x.shape[1:]) != shape:
        raise ClientSetupError(f"local inputs have shape {list(data.x.shape[1:])}, the run's model expects {shape}")
    if len(data) and int(data.y.max()) >= welcome.num_classes:
        raise ClientSetupError(f"local labels go up to {int(data.y.max())}, the run has {welcome.num_classes} classes")
    spec = ArrayDataset(torch.zeros(1, *shape), torch.tensor([welcome.num_classes - 1]), "spec")
    sizes = list(welcome.client_sizes) or [len(data)] * client_sampler(config).population
    task, model, _, trainer, pipeline = build_parts(config, spec, sizes, lambda text: None)
    return ClientApp(client_id, task, model, data, trainer, pipeline, config.run.seed, store)


def _check_model(app: ClientApp, welcome: pb.Welcome) -> None:
    mine = [(n, list(p.shape)) for n, p in app.model.named_parameters()]
    theirs = [(s.name, list(s.shape)) for s in welcome.model]
    if mine != theirs:
        raise ClientSetupError(f"this client's model {mine[:3]}... does not match the server's {theirs[:3]}...")
