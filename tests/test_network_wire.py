"""The network protocol's pieces in isolation: frames, MACs, limits, keys, certificates, proto."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cryptography import x509

from fedguard.messages import Message
from fedguard.runtime.network import auth, certs, wire
from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
from fedguard.runtime.network.settings import NetworkConfig, use_tls

KEY = bytes(range(32))
ROUTE = wire.Routing(b"s" * 16, 3, 1, b"t" * 16)


def _roundtrip(msg: Message, chunk: int = 1 << 20, limits: wire.Limits | None = None) -> wire.Received:
    frames = [f.SerializeToString() for f in wire.encode(msg, ROUTE, KEY, wire.TO_SERVER, chunk)]
    return wire.receive(frames, limits or wire.Limits(), lambda env: KEY, wire.TO_SERVER)


def test_every_dtype_and_shape_survives_the_wire_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.randint(-(2**62), 2**62, (4,), generator=g),
        "i32": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "i16": torch.tensor([1, -2], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).t(),
    }
    rec = _roundtrip(Message("fit_result", 7, 3, {"num_examples": 12, "m": [1, "a"]}, tensors), chunk=16)
    assert rec.message.kind == "fit_result" and rec.message.round == 7 and rec.message.meta["m"] == [1, "a"]
    for name, t in tensors.items():
        got = rec.message.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name


def test_large_tensor_is_chunked_and_upload_is_close_to_raw_size() -> None:
    t = torch.arange(300_000, dtype=torch.float32)
    frames = wire.encode(Message("fit_result", 1, 3, {}, {"w": t}), ROUTE, KEY, wire.TO_SERVER, 64 << 10)
    assert len(frames) == 3 + -(-t.numel() * 4 // (64 << 10))
    size = sum(len(f.SerializeToString()) for f in frames)
    assert t.numel() * 4 < size < t.numel() * 4 * 1.01
    assert torch.equal(_roundtrip(Message("x", 1, 3, {}, {"w": t}), 64 << 10).message.tensors["w"], t)


def _frames(msg: Message) -> list[bytes]:
    return [f.SerializeToString() for f in wire.encode(msg, ROUTE, KEY, wire.TO_SERVER, 1 << 20)]


def _resigned(env: pb.Envelope, payload: bytes) -> list[bytes]:
    import hashlib
    import hmac

    header = env.SerializeToString()
    mac = hmac.new(KEY, wire.TO_SERVER + b"\0" + len(header).to_bytes(8, "little") + header + payload, hashlib.sha256)
    tag = wire.header_tag(KEY, wire.TO_SERVER, header)
    return [pb.Frame(header=header).SerializeToString(), pb.Frame(mac=tag).SerializeToString(),
            pb.Frame(data=payload).SerializeToString(), pb.Frame(mac=mac.digest()).SerializeToString()]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda e: setattr(e, "protocol_version", 2), "protocol version"),
        (lambda e: setattr(e.tensors[0], "dtype", 42), "unknown dtype"),
        (lambda e: e.tensors[0].shape.append(2), "needs"),
        (lambda e: setattr(e, "payload_bytes", e.payload_bytes + 4), "announces"),
        (lambda e: setattr(e, "meta_json", "{bad"), "not valid JSON"),
        (lambda e: setattr(e, "meta_json", '{"x": Infinity}'), "not allowed"),
        (lambda e: setattr(e, "meta_json", "[]"), "JSON object"),
        (lambda e: setattr(e.tensors[1], "name", "a"), "twice"),
    ],
)
def test_malformed_headers_are_refused_with_a_reason(edit, reason: str) -> None:
    msg = Message("fit_result", 1, 3, {}, {"a": torch.ones(2), "b": torch.ones(3)})
    env = pb.Envelope.FromString(pb.Frame.FromString(_frames(msg)[0]).header)
    edit(env)
    payload = wire.tensor_bytes(msg.tensors["a"]) + wire.tensor_bytes(msg.tensors["b"])
    with pytest.raises(wire.WireError, match=reason):
        wire.receive(_resigned(env, payload), wire.Limits(), lambda e: KEY, wire.TO_SERVER)


def test_forged_altered_truncated_oversized_and_garbage_streams_are_refused() -> None:
    msg = Message("fit_result", 1, 3, {}, {"w": torch.ones(100)})
    frames = _frames(msg)
    limits = wire.Limits()
    key = lambda env: KEY  # noqa: E731
    altered = bytearray(pb.Frame.FromString(frames[2]).data)
    altered[0] ^= 1
    cases = {
        "bad MAC": [*frames[:2], pb.Frame(data=bytes(altered)).SerializeToString(), frames[3]],
        "MAC frame": frames[:3],
        "first frame must be a header": frames[2:],
        "garbage frame": [b"\xff\x00garbage"],
        "no header": [],
        "more data": [*frames[:3], frames[2], frames[3]],
        "followed by its tag": [frames[0], frames[2], frames[3]],
        "before the header's tag": frames[:1],
    }
    for reason, stream in cases.items():
        with pytest.raises(wire.WireError, match=reason):
            wire.receive(stream, limits, key, wire.TO_SERVER)
    with pytest.raises(wire.WireError, match="bad header tag"):  # a server's message reflected back
        wire.receive(frames, limits, key, wire.TO_CLIENT)
    with pytest.raises(wire.WireError, match="oversized"):
        wire.receive(frames, wire.Limits(max_payload_bytes=399), key, wire.TO_SERVER)


def test_key_callback_can_refuse_before_any_data_is_read() -> None:
    def refuse(env: pb.Envelope) -> bytes:
        raise wire.WireError(f"unknown session for client {env.client_id}")

    with pytest.raises(wire.WireError, match="unknown session for client 3"):
        wire.receive(_frames(Message("x", 1, 3, {}, {"w": torch.ones(2)})), wire.Limits(), refuse, wire.TO_SERVER)


def test_a_forged_header_is_refused_before_any_data_frame_is_read() -> None:
    """Memory before authentication: a header with a bad tag ends the read at the second frame,
    however much data it announces and follows it (the data frames are never pulled)."""
    msg = Message("fit_result", 1, 3, {}, {"w": torch.ones(100)})
    frames = _frames(msg)
    pulled: list[int] = []

    def stream(first: list[bytes]) -> Iterator[bytes]:
        for i, frame in enumerate(first + [pb.Frame(data=b"x" * 1024).SerializeToString()] * 1000):
            pulled.append(i)
            yield frame

    forged = [frames[0], pb.Frame(mac=b"\0" * 32).SerializeToString()]
    with pytest.raises(wire.WireError, match="bad header tag"):
        wire.receive(stream(forged), wire.Limits(), lambda e: KEY, wire.TO_SERVER)
    assert len(pulled) == 2
    seen: list[int] = []
    pulled.clear()

    def refuse(env: pb.Envelope) -> None:
        seen.append(len(pulled))
        raise wire.WireError("no open request")

    with pytest.raises(wire.WireError, match="no open request"):
        wire.receive(stream(frames[:2]), wire.Limits(), lambda e: KEY, wire.TO_SERVER, refuse)
    assert seen == [2] and len(pulled) == 2


def test_signatures_bind_every_field_and_nonces_catch_replays(tmp_path: Path) -> None:
    tag = auth.sign(KEY, "hello", 1, 3, b"n" * 16, 1000)
    assert auth.verify(KEY, tag, "hello", 1, 3, b"n" * 16, 1000)
    assert not auth.verify(KEY, tag, "hello", 1, 4, b"n" * 16, 1000)
    assert not auth.verify(bytes(32), tag, "hello", 1, 3, b"n" * 16, 1000)
    assert auth.canonical("ab", "c") != auth.canonical("a", "bc")
    cache = auth.NonceCache()
    assert cache.fresh(b"x" * 16) and not cache.fresh(b"x" * 16) and cache.fresh(b"y" * 16)


def test_registry_refuses_unknown_and_revoked_and_reloads_on_change(tmp_path: Path) -> None:
    certs.make_dev_pki(tmp_path, 2)
    registry = auth.Registry(tmp_path / "clients.json")
    cid, key = auth.read_key_file(tmp_path / "client-1.key")
    assert cid == 1 and registry.key(1) == key
    with pytest.raises(auth.AuthError, match="unknown client id 5") as err:
        registry.key(5)
    assert err.value.code == "unknown"
    certs.set_revoked(tmp_path, [1])
    with pytest.raises(auth.AuthError, match="revoked"):
        registry.key(1)
    certs.set_revoked(tmp_path, [1], revoked=False)
    assert registry.key(1) == key
    certs.add_clients(tmp_path, [5])
    assert auth.read_key_file(tmp_path / "client-5.key")[1] == registry.key(5)
    assert (tmp_path / "client-5.key").stat().st_mode & 0o077 == 0


def test_dev_pki_chains_to_the_ca_with_the_right_names(tmp_path: Path) -> None:
    certs.make_dev_pki(tmp_path, 2, ["localhost", "127.0.0.1"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    client = x509.load_pem_x509_certificate((tmp_path / "client-1.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    client.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    cn = client.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == certs.client_common_name(1)
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o077 == 0


def test_tls_is_required_outside_loopback() -> None:
    assert not use_tls(NetworkConfig(address="127.0.0.1:1"))
    assert use_tls(NetworkConfig(address="127.0.0.1:1", cert="c", key="k"))
    with pytest.raises(ValueError, match="TLS is required"):
        use_tls(NetworkConfig(address="0.0.0.0:1"))
    with pytest.raises(ValueError, match="only allowed on loopback"):
        use_tls(NetworkConfig(address="10.0.0.1:1", tls="off"))


def test_service_in_the_proto_matches_the_server_handlers() -> None:
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "fedguard.net.v1.Federation"
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert shapes == {"Join": (False, False), "Tasks": (False, True), "Submit": (True, False)}
    assert set(wire.DTYPES) == {v.number for v in pb.DType.DESCRIPTOR.values} - {0}


def test_checked_in_gencode_matches_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    src = Path(wire.__file__).resolve().parents[3]
    rel = "fedguard/runtime/network/proto/fedguard_net_v1.proto"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", str(src), f"--python_out={tmp_path}", str(src / rel)],
        check=True,
    )
    descriptor = lambda text: [ln for ln in text.splitlines() if "AddSerializedFile" in ln]  # noqa: E731
    fresh = descriptor((tmp_path / rel.replace(".proto", "_pb2.py")).read_text())
    assert fresh and fresh == descriptor((src / rel.replace(".proto", "_pb2.py")).read_text()), (
        "the checked-in gencode is stale: regenerate it (see fedguard/runtime/network/proto/__init__.py)"
    )


def test_a_client_refuses_a_server_running_another_configuration(tmp_path: Path) -> None:
    import fedguard.plugins  # noqa: F401  (registers every section)
    from fedguard.config import Config
    from fedguard.runtime.network.client import ClientOptions, ClientSetupError, build_app

    server = Config.load(None, ["train.lr=0.1", "network.address=10.0.0.1:1"])
    mine = tmp_path / "mine.toml"
    mine.write_text(Config.load(None, ["train.lr=0.2"]).to_toml())
    welcome = pb.Welcome(config_toml=server.to_toml())
    opts = ClientOptions(server="127.0.0.1:1", key_file="unused", config=str(mine))
    with pytest.raises(ClientSetupError, match="differs from the server's configuration"):
        build_app(opts, 0, welcome)
