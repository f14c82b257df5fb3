"""The network server in this process, driven by protocol-level clients over loopback gRPC.

Deadlines, late joins, drops, replays, stale rounds, revocation and mutual TLS, each checked
against what ``exchange`` returns and what the server logs.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedguard.messages import Message
from fedguard.runtime.network import auth, certs
from fedguard.runtime.network.fuzz import RawClient
from fedguard.runtime.network.server import NetworkCommunicator, RunInfo
from fedguard.runtime.network.settings import NetworkConfig

PARAMS = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    certs.make_dev_pki(tmp_path / "certs", 3)
    return tmp_path / "certs"


@pytest.fixture
def serve(tmp_path: Path, pki: Path) -> Iterator[Callable[..., NetworkCommunicator]]:
    started: list[NetworkCommunicator] = []

    def start(**net: object) -> NetworkCommunicator:
        options: dict[str, object] = {
            "address": "127.0.0.1:0", "clients": str(pki / "clients.json"), "min_clients": 1,
            "wait_timeout_s": 0.0, "round_deadline_s": 10.0, "keepalive_s": 0.5, **net,
        }
        info = RunInfo("", [], [1, 2, 3], 10, 3)
        logs: list[str] = []
        comm = NetworkCommunicator(NetworkConfig(**options), info, logs.append, tmp_path / "network.jsonl")  # type: ignore[arg-type]
        comm.logs = logs  # type: ignore[attr-defined]
        started.append(comm)
        return comm

    yield start
    for comm in started:
        comm.close()


def _client(comm: NetworkCommunicator, pki: Path, cid: int, tls: bool = False, cert_of: int | None = None) -> RawClient:
    address = f"127.0.0.1:{comm.port}"
    if tls:
        k = cid if cert_of is None else cert_of
        key, cert = (pki / f"client-{k}-key.pem").read_bytes(), (pki / f"client-{k}.pem").read_bytes()
        creds = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key, cert)
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    client = RawClient(channel, cid, auth.read_key_file(pki / f"client-{cid}.key")[1])
    client.channel = channel  # type: ignore[attr-defined]
    return client


def _fit(cids: list[int], round: int = 1) -> dict[int, Message]:
    return {c: Message("fit", round, c, {"lr": 0.1}, PARAMS) for c in cids}


def _answer(client: RawClient, scale: float = 1.0) -> Message:
    """Join, take one request, reply with the received tensors times ``scale``."""
    client.join()
    client.open_tasks()
    req = client.next_request()
    assert req is not None
    tensors = {k: v * scale for k, v in req.message.tensors.items()}
    reply = Message("fit_result", req.message.round, client.client_id, {"num_examples": 5}, tensors)
    ack = client.submit(client.reply(reply, bytes(req.envelope.task_id)))
    assert ack.accepted, ack.reason
    return req.message


def _in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_replies_arrive_intact_and_late_joiners_are_served(serve, pki: Path) -> None:
    comm = serve()
    clients = [_client(comm, pki, c) for c in range(2)]
    seen: dict[int, Message] = {}
    threads = [_in_thread(lambda: seen.__setitem__(0, _answer(clients[0], 2.0)))]
    # client 1 connects only after the exchange started: its request waits for it
    threads.append(_in_thread(lambda: (time.sleep(0.5), seen.__setitem__(1, _answer(clients[1], 3.0)))))
    result = comm.exchange(_fit([0, 1]))
    for thread in threads:
        thread.join(10)
    assert sorted(result.replies) == [0, 1] and not result.failed
    assert torch.equal(result.replies[0].tensors["w"], PARAMS["w"] * 2)
    assert torch.equal(result.replies[1].tensors["b"], PARAMS["b"] * 3)
    assert seen[0].meta == {"lr": 0.1} and torch.equal(seen[1].tensors["w"], PARAMS["w"])
    assert comm.traffic.sent > 2 * 36 and comm.traffic.received > 2 * 36
    events = [json.loads(line) for line in Path(comm._events.name).read_text().splitlines()]  # type: ignore[union-attr]
    assert [(e["client"], e["status"]) for e in events] == [(0, "ok"), (1, "ok")]
    assert all(e["upload_bytes"] > 36 for e in events)


def test_silent_and_absent_clients_fail_at_the_deadline(serve, pki: Path) -> None:
    comm = serve(round_deadline_s=1.0)
    silent = _client(comm, pki, 0)
    silent.join()
    silent.open_tasks()
    t0 = time.monotonic()
    result = comm.exchange(_fit([0, 1]))
    assert 0.9 < time.monotonic() - t0 < 5
    assert "no reply within the 1 s deadline" in result.failed[0]
    assert "never delivered" in result.failed[1] and not result.replies


def test_a_client_that_drops_mid_round_fails_at_once_and_is_skipped_next_round(serve, pki: Path) -> None:
    comm = serve(round_deadline_s=30.0)
    dropper, stayer = _client(comm, pki, 0), _client(comm, pki, 1)

    def drop() -> None:
        dropper.join()
        dropper.open_tasks()
        assert dropper.next_request() is not None
        dropper.channel.close()  # type: ignore[attr-defined]

    _in_thread(drop)
    _in_thread(lambda: _answer(stayer))
    t0 = time.monotonic()
    result = comm.exchange(_fit([0, 1]))
    assert time.monotonic() - t0 < 10, "a dropped connection must not wait for the deadline"
    assert "connection lost" in result.failed[0] and list(result.replies) == [1]
    result = comm.exchange(_fit([0], round=2))
    assert "disconnected" in result.failed[0]
    assert any("client 0 disconnected" in line for line in comm.logs)  # type: ignore[attr-defined]


def test_replayed_stale_and_wrong_round_replies_are_refused(serve, pki: Path) -> None:
    comm = serve(round_deadline_s=5.0)
    client = _client(comm, pki, 0)
    outcome: dict[str, object] = {}

    def play() -> None:
        client.join()
        client.open_tasks()
        req = client.next_request()
        assert req is not None
        task = bytes(req.envelope.task_id)
        good = Message("fit_result", 1, 0, {"num_examples": 5}, req.message.tensors)
        outcome["wrong_round"] = client.submit(client.reply(Message("fit_result", 2, 0, {}, {}), task)).reason
        outcome["wrong_task"] = client.submit(client.reply(good, b"x" * 16)).reason
        frames = client.reply(good, task)
        outcome["first"] = client.submit(frames).accepted
        outcome["replay"] = client.submit(frames).reason
        outcome["stale"] = client.submit(client.reply(good, task)).reason

    thread = _in_thread(play)
    result = comm.exchange(_fit([0]))
    thread.join(10)
    assert list(result.replies) == [0]
    assert "round 2, the open request is for round 1" in str(outcome["wrong_round"])
    assert "no open request" in str(outcome["wrong_task"])
    assert outcome["first"] is True
    assert "replayed message" in str(outcome["replay"])
    assert "no open request" in str(outcome["stale"])
    assert comm.rejections == 4


def test_unknown_forged_replayed_and_revoked_clients_are_refused(serve, pki: Path) -> None:
    comm = serve()
    client = _client(comm, pki, 0)
    with pytest.raises(grpc.RpcError) as err:
        client.join(client.hello(client_id=9))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown client id 9" in err.value.details()
    with pytest.raises(grpc.RpcError, match="bad signature"):
        client.join(client.hello(key=bytes(32)))
    hello = client.hello()
    client.join(hello)
    with pytest.raises(grpc.RpcError, match="replayed Hello"):
        client.join(hello)
    certs.set_revoked(pki, [0])
    with pytest.raises(grpc.RpcError) as err:
        client.join()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
    assert "revoked" in comm.exchange(_fit([0])).failed[0]
    assert comm.rejections == 4


def test_mutual_tls_binds_the_certificate_to_the_client_id(serve, pki: Path) -> None:
    comm = serve(
        cert=str(pki / "server.pem"), key=str(pki / "server-key.pem"), client_ca=str(pki / "ca.pem"), tls="on"
    )
    assert _client(comm, pki, 1, tls=True).join().session_id
    impostor = _client(comm, pki, 0, tls=True, cert_of=1)  # client 0's key, client 1's certificate
    with pytest.raises(grpc.RpcError) as err:
        impostor.join()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not client 0" in err.value.details()
    plaintext = _client(comm, pki, 0)
    with pytest.raises(grpc.RpcError) as err:
        plaintext.join_rpc(plaintext.hello(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_one_task_stream_per_session_and_only_clients_of_this_run(serve, pki: Path) -> None:
    comm = serve()
    client = _client(comm, pki, 0)
    client.join()
    client.open_tasks()
    _in_thread(lambda: comm.exchange(_fit([0])))
    assert client.next_request() is not None
    with pytest.raises(grpc.RpcError) as err:  # an insider opening streams to tie up server threads
        next(iter(client.tasks_rpc(client.poll(), timeout=5)))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already has its task stream" in err.value.details()
    certs.add_clients(pki, [5])
    outsider = _client(comm, pki, 5)
    with pytest.raises(grpc.RpcError) as err:
        outsider.join()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not in this run" in err.value.details()


def test_resume_drops_rows_after_the_checkpoint_and_a_finished_run_has_nothing_to_resume(tmp_path: Path, pki: Path):
    from fedguard.config import Config
    from fedguard.runtime.network.server import serve, trim_after_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.json").write_text(json.dumps({"round": 2}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in (1, 2, 3)))
    assert trim_after_checkpoint(run) == 2
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    config = Config.load(None, ["run.rounds=2", f"network.clients={pki / 'clients.json'}"])
    logs: list[str] = []
    assert serve(config, resume=run, log=logs.append) is None
    assert any("nothing to resume" in line for line in logs)


def test_a_model_larger_than_grpc_message_limit_streams_both_ways(serve, pki: Path) -> None:
    comm = serve(chunk_kb=512)
    big = {"w": torch.randn(3_000_000, generator=torch.Generator().manual_seed(0)), "b": torch.ones(5)}  # 12 MB
    client = _client(comm, pki, 0)
    thread = _in_thread(lambda: _answer(client, -1.0))
    result = comm.exchange({0: Message("fit", 1, 0, {}, big)})
    thread.join(30)
    assert torch.equal(result.replies[0].tensors["w"], -big["w"])
    assert 12_000_000 < comm.traffic.sent < 12_000_000 * 1.01 and 12_000_000 < comm.traffic.received < 12_000_000 * 1.01
