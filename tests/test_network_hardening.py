"""The network server under attack (issue 14): idle-stream exhaustion, a revoked client that
still holds a valid certificate, pre-authentication memory, and every refusal counted.

Each test plays the adversary against a server in this process over loopback gRPC, with
deadlines short enough for a test and generous enough for a loaded 2-core machine.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedguard.messages import Message
from fedguard.pipeline.base import ConfigurationError
from fedguard.runtime.network import auth, certs, tlslog
from fedguard.runtime.network.fuzz import RawClient
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.server import NetworkCommunicator, RunInfo
from fedguard.runtime.network.settings import NetworkConfig, use_tls
from fedguard.runtime.network.wire import TO_SERVER, Routing, encode

pytestmark = pytest.mark.timeout(180)

PARAMS = {"w": torch.ones(4, 3), "b": torch.zeros(3)}


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.make_dev_pki(tmp_path / "certs", 3)
    return tmp_path / "certs"


@pytest.fixture
def server(tmp_path: Path, pki: Path) -> Iterator[NetworkCommunicator]:
    net = NetworkConfig(
        address="127.0.0.1:0", clients=str(pki / "clients.json"), cert=str(pki / "server.pem"),
        key=str(pki / "server-key.pem"), client_ca=str(pki / "ca.pem"), min_clients=1, wait_timeout_s=0.0,
        round_deadline_s=20.0, keepalive_s=0.5, first_frame_s=3.0, idle_s=4.0, max_calls_per_client=3,
    )  # type: ignore[call-arg]
    comm = NetworkCommunicator(net, RunInfo("", [], [1, 2, 3], 10, 3), lambda text: None, tmp_path / "network.jsonl")
    yield comm
    comm.close()


def _raw(comm: NetworkCommunicator, pki: Path, cid: int, cert_of: int | None = None) -> RawClient:
    k = cid if cert_of is None else cert_of
    ca, key, cert = (pki / "ca.pem").read_bytes(), (pki / f"client-{k}-key.pem").read_bytes(), (
        pki / f"client-{k}.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    channel = grpc.secure_channel(f"127.0.0.1:{comm.port}", creds)
    return RawClient(channel, cid, auth.read_key_file(pki / f"client-{cid}.key")[1])


def _idle(stop: threading.Event) -> Iterator[bytes]:
    """A Submit stream that never sends its first frame."""
    stop.wait(60)
    return
    yield b""  # pragma: no cover


def _refusals(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "refusals.json").read_text())


def test_idle_streams_are_capped_per_client_and_evicted_and_others_still_join(
    server: NetworkCommunicator, pki: Path, tmp_path: Path
) -> None:
    """48 idle Submit streams from one client used to hold every handler thread for 70 s."""
    hostile, stop = _raw(server, pki, 0), threading.Event()
    calls = [hostile.submit_rpc.future(_idle(stop), timeout=60) for _ in range(48)]
    t0 = time.monotonic()
    honest = _raw(server, pki, 1)
    assert honest.join().session_id  # joins while the hostile streams are open
    joined_s = time.monotonic() - t0
    codes = []
    for call in calls:
        try:
            call.result(timeout=60)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    stop.set()
    busy = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert joined_s < 30
    # at most max_calls_per_client admitted at once (a few more over time on a loaded machine,
    # as the first ones are evicted)...
    assert busy >= 30, codes
    assert all(c != grpc.StatusCode.OK for c in codes)  # ...and those evicted at the first-frame deadline
    assert time.monotonic() - t0 < 90
    server._write_refusals()
    counts = _refusals(tmp_path)
    assert counts["by_kind"]["busy"] == busy and counts["by_kind"]["deadline"] == 48 - busy
    assert counts["evicted_calls"] == 48 - busy and counts["total"] == 48


def test_unauthenticated_calls_are_capped_and_evicted_without_mutual_tls(tmp_path: Path, pki: Path) -> None:
    net = NetworkConfig(
        address="127.0.0.1:0", clients=str(pki / "clients.json"), min_clients=1, wait_timeout_s=0.0,
        first_frame_s=3.0, max_unauthenticated_calls=4, keepalive_s=0.5,
    )  # type: ignore[call-arg]
    comm = NetworkCommunicator(net, RunInfo("", [], [1, 2, 3], 10, 3), lambda text: None, tmp_path / "n.jsonl")
    try:
        client = RawClient(grpc.insecure_channel(f"127.0.0.1:{comm.port}"), 0, b"")
        stop = threading.Event()
        calls = [client.submit_rpc.future(_idle(stop), timeout=60) for _ in range(12)]
        codes = []
        for call in calls:
            try:
                call.result(timeout=60)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        stop.set()
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 4 and grpc.StatusCode.OK not in codes
        assert comm.refusals["busy"] + comm.refusals["deadline"] == 12
    finally:
        comm.close()


def test_a_revoked_client_with_a_valid_certificate_is_cut_off_and_refused_on_every_call(
    server: NetworkCommunicator, pki: Path, tmp_path: Path
) -> None:
    client = _raw(server, pki, 1)
    client.join()
    client.open_tasks()
    threading.Thread(target=lambda: server.exchange({1: Message("fit", 1, 1, {}, PARAMS)}), daemon=True).start()
    req = client.next_request()
    assert req is not None
    certs.set_revoked(pki, [1])
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:  # the open task stream is closed by the server
        client.next_request()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
    assert time.monotonic() - t0 < 15
    with pytest.raises(grpc.RpcError) as err:  # a reply on its certificate: refused before its frames are read
        client.submit(client.reply(Message("fit_result", 1, 1, {"num_examples": 1}, PARAMS), req.envelope.task_id))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "certificate of client 1 is revoked" in (
        err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        client.join()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stop = threading.Event()
    idle = [client.submit_rpc.future(_idle(stop), timeout=30) for _ in range(10)]
    for call in idle:  # idle streams of a revoked client do not even get a thread for a deadline
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stop.set()
    assert server.refusals["identity"] >= 13


def test_an_oversized_unauthenticated_message_is_refused_at_its_first_frames(
    server: NetworkCommunicator, pki: Path
) -> None:
    """A header announcing 256 MiB with a forged tag is refused before its data is read; a
    frame over the receive limit is refused by gRPC; the server's memory does not grow."""
    client = _raw(server, pki, 2)
    client.join()
    rss0 = _rss_mb()
    big = Message("fit_result", 1, 2, {}, {"w": torch.zeros(1)})
    frames = [f.SerializeToString() for f in encode(big, Routing(client.session, 2, 1, b"t" * 16), client.key,
                                                    TO_SERVER)]
    env = pb.Envelope.FromString(pb.Frame.FromString(frames[0]).header)
    del env.tensors[:]
    env.tensors.add(name="w", dtype=pb.UINT8, shape=[256 << 20], nbytes=256 << 20)
    env.payload_bytes = 256 << 20
    chunk = pb.Frame(data=bytes(1 << 20)).SerializeToString()
    forged = [pb.Frame(header=env.SerializeToString()).SerializeToString(), pb.Frame(mac=bytes(32)).SerializeToString()]

    def stream() -> Iterator[bytes]:
        yield from forged
        for _ in range(256):
            yield chunk

    ack = pb.SubmitReply.FromString(client.submit_rpc(stream(), timeout=60))
    assert not ack.accepted and "bad header tag" in ack.reason
    with pytest.raises(grpc.RpcError) as err:
        client.submit([pb.Frame(header=bytes(3 << 20)).SerializeToString()])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _rss_mb() - rss0 < 64


def _rss_mb() -> float:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("VmRSS"))) / 1024


def test_mutual_tls_is_on_by_default_outside_loopback(pki: Path) -> None:
    remote = {"address": "0.0.0.0:50051", "cert": str(pki / "server.pem"), "key": str(pki / "server-key.pem")}
    with pytest.raises(ConfigurationError, match="mutual TLS is required"):
        use_tls(NetworkConfig(**remote))  # type: ignore[arg-type]
    assert use_tls(NetworkConfig(**remote, client_ca=str(pki / "ca.pem")))  # type: ignore[arg-type]
    assert use_tls(NetworkConfig(**remote, mtls="off"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="mutual TLS is required"):
        use_tls(NetworkConfig(address="127.0.0.1:0", cert=remote["cert"], key=remote["key"], mtls="on"))
    assert not use_tls(NetworkConfig(address="127.0.0.1:0"))  # loopback may stay plaintext


def test_handshake_failures_become_refusal_lines() -> None:
    seen: list[str] = []
    tlslog.subscribe(seen.append)
    try:
        tlslog._publish("I1203 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL: "
                        "error:100000c0:SSL routines:OPENSSL_internal:PEER_DID_NOT_RETURN_A_CERTIFICATE")
    finally:
        tlslog.unsubscribe(seen.append)
    assert seen == [tlslog.CAUSES[0][1]] and "--cert" in seen[0]


def test_a_task_stream_its_client_stops_reading_is_evicted(server: NetworkCommunicator, pki: Path) -> None:
    """A client that opens its task stream and never reads it would hold the handler thread
    that sends to it (flow control blocks the send); the stream is evicted after idle_s."""
    client = _raw(server, pki, 0)
    client.join()
    stream = client.tasks_rpc(client.poll())  # opened, never read
    big = {"w": torch.zeros(16 << 20)}  # 64 MiB: more than HTTP/2 lets through unread
    t0 = time.monotonic()
    result = server.exchange({0: Message("fit", 1, 0, {}, big)})
    assert "connection lost" in result.failed[0] and time.monotonic() - t0 < 18  # deadline 20 s
    assert server.refusals["deadline"] == 1 and server.guard.evicted == 1
    stream.cancel()
