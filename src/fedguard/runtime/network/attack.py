"""``fedguard attack``: a hostile client and a curious server against a live loopback deployment.

Every scenario is one attack of issue 14, named, played by the adversary it names, and ends
``refused`` (detected and stopped), ``contained`` (it ran, with the effect the docs bound it
to) or ``succeeded``. The network ones run against real ``fedguard server`` and ``fedguard
client`` processes with TLS and client certificates on 127.0.0.1:

==========================  ===============================  ==========================================
scenario                    adversary                        what it tries
==========================  ===============================  ==========================================
``idle-streams``            insider client (valid cert)      48 Submit streams that never send a frame
``revoked-client``          revoked client (valid cert)      Join, Tasks, Submit and 10 idle streams
``oversized-pre-auth``      insider client                   a forged header announcing 256 MiB, 64 MiB
                                                             of data after it, and a 3 MiB frame
``num-examples-takeover``   insider client (plaintext FedAvg) its reply claims num_examples = 1e300
``secagg-weight-slot``      client process (SecAgg+)         its weight slot 600 times its weight
``secagg-garbage-shares``   client process (SecAgg+)         share ciphertexts that do not open
``ckks-wrong-scale``        client process (CKKS)            its ciphertexts at scale 2^50
==========================  ===============================  ==========================================

The curious and malicious server's attacks (CKKS key recovery from releases, a forged
aggregate, SecAgg key swapping) need the server's side of the protocol; they run in-process on
the protocol code from :mod:`fedguard.secure.attacks` (``live: false`` in the report).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: scenarios against the live deployment, in the order they run
LIVE = ("idle-streams", "revoked-client", "oversized-pre-auth", "num-examples-takeover",
        "secagg-weight-slot", "secagg-garbage-shares", "ckks-wrong-scale")
#: the server-side adversaries, in-process (fedguard.secure.attacks)
IN_PROCESS = ("ckks-key-recovery", "ckks-forged-aggregate", "secagg-key-swap")


@dataclass
class Attack:
    """How one scenario ended."""

    name: str
    adversary: str
    outcome: str
    detail: str
    hostile_messages: int
    live: bool = True
    figures: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The scenario as one JSON object."""
        return {"scenario": self.name, "adversary": self.adversary, "outcome": self.outcome, "detail": self.detail,
                "hostile_messages": self.hostile_messages, "live": self.live, **self.figures}


def _config(clients: int, seed: int, **sections: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run": {"name": "attack", "rounds": 1, "seed": seed, "report": False, "progress": False},
        "data": {"num_clients": clients, "max_train_examples": 100 * clients},
        "train": {"max_steps": 4},
        "network": {"round_deadline_s": 600.0, "wait_timeout_s": 900.0, "first_frame_s": 5.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _raw(dep: Any, cid: int) -> Any:
    import grpc

    from fedguard.runtime.network import auth
    from fedguard.runtime.network.fuzz import RawClient

    certs = dep.certs
    creds = grpc.ssl_channel_credentials(
        (certs / "ca.pem").read_bytes(), (certs / f"client-{cid}-key.pem").read_bytes(),
        (certs / f"client-{cid}.pem").read_bytes(),
    )
    return RawClient(grpc.secure_channel(dep.address, creds), cid, auth.read_key_file(certs / f"client-{cid}.key")[1])


def _idle(stop: threading.Event) -> Iterator[bytes]:
    stop.wait(120)
    return
    yield b""  # pragma: no cover


def _code(call: Any) -> str:
    import grpc

    try:
        call.result(timeout=120)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the plaintext deployment: four scenarios against one server ------------------------------
def idle_streams(dep: Any, insider: int, honest: int) -> Attack:
    """An insider opens 48 idle Submit streams (this used to block every Join for 70 s); an
    honest client's identity joins meanwhile (the honest process then reconnects)."""
    hostile, stop = _raw(dep, insider), threading.Event()
    calls = [hostile.submit_rpc.future(_idle(stop), timeout=120) for _ in range(48)]
    time.sleep(0.5)
    t0 = time.monotonic()
    _raw(dep, honest).join()
    join_s = time.monotonic() - t0
    codes = [_code(c) for c in calls]
    stop.set()
    refused = "OK" not in codes and join_s < 10
    busy = codes.count("RESOURCE_EXHAUSTED")
    return Attack("idle-streams", "insider client", "refused" if refused else "succeeded",
                  f"{busy} refused at once (per-client cap), {len(codes) - busy} evicted at the first-frame deadline; "
                  f"a Join meanwhile took {join_s:.2f} s", 48, figures={"join_s_under_attack": round(join_s, 3)})


def revoked_client(dep: Any, revoked: int) -> Attack:
    """A revoked client whose certificate is still valid tries every call."""
    import grpc

    client = _raw(dep, revoked)
    codes: list[str] = []
    attempts: list[Callable[[], object]] = [
        lambda: client.join(),
        lambda: next(iter(client.tasks_rpc(client.poll(session=b"s" * 16), timeout=30))),
        lambda: client.submit([b"\x0a\x00"]),
    ]
    for attempt in attempts:
        try:
            attempt()
            codes.append("OK")
        except grpc.RpcError as exc:
            codes.append(exc.code().name)
    stop = threading.Event()
    codes += [_code(c) for c in [client.submit_rpc.future(_idle(stop), timeout=60) for _ in range(10)]]
    stop.set()
    refused = all(c == "PERMISSION_DENIED" for c in codes)
    return Attack("revoked-client", "revoked client", "refused" if refused else "succeeded",
                  f"{codes.count('PERMISSION_DENIED')} of {len(codes)} calls refused (PERMISSION_DENIED) on its "
                  "still-valid certificate", len(codes))


def oversized_pre_auth(dep: Any, insider: int, server_pid: int) -> Attack:
    """A header announcing 256 MiB with a forged tag, 64 MiB of data after it, and one 3 MiB frame."""
    import grpc
    import torch

    from fedguard.messages import Message
    from fedguard.runtime.network.proto import fedguard_net_v1_pb2 as pb
    from fedguard.runtime.network.wire import TO_SERVER, Routing, encode

    client = _raw(dep, insider)
    client.join()
    rss0 = _rss_mb(server_pid)
    frames = encode(Message("fit_result", 1, insider, {}, {"w": torch.zeros(1)}),
                    Routing(client.session, insider, 1, b"t" * 16), client.key, TO_SERVER)
    env = pb.Envelope.FromString(frames[0].header)
    del env.tensors[:]
    env.tensors.add(name="w", dtype=pb.UINT8, shape=[256 << 20], nbytes=256 << 20)
    env.payload_bytes = 256 << 20
    chunk = pb.Frame(data=bytes(1 << 20)).SerializeToString()

    def stream() -> Iterator[bytes]:
        yield pb.Frame(header=env.SerializeToString()).SerializeToString()
        yield pb.Frame(mac=bytes(32)).SerializeToString()
        for _ in range(64):
            yield chunk

    ack = pb.SubmitReply.FromString(client.submit_rpc(stream(), timeout=120))
    try:
        client.submit_rpc(iter([pb.Frame(header=bytes(3 << 20)).SerializeToString()]), timeout=120)
        big = "OK"
    except grpc.RpcError as exc:
        big = exc.code().name
    grew = _rss_mb(server_pid) - rss0
    refused = not ack.accepted and "header tag" in ack.reason and big == "RESOURCE_EXHAUSTED" and grew < 64
    return Attack("oversized-pre-auth", "insider client", "refused" if refused else "succeeded",
                  f"forged 256 MiB header: {ack.reason or 'accepted'}; 3 MiB frame: {big}; server RSS grew "
                  f"{grew:.1f} MiB", 2, figures={"server_rss_growth_mb": round(grew, 1)})


def num_examples_takeover(dep: Any, insider: int, run_dir: Path, server: Any) -> Attack:
    """The insider answers its fit request with a valid-MAC update claiming num_examples = 1e300."""
    import torch

    from fedguard.messages import Message

    client = _raw(dep, insider)
    client.join()
    client.open_tasks()
    req = client.next_request()
    if req is None:
        return Attack("num-examples-takeover", "insider client", "succeeded", "no request reached the insider", 0)
    tensors = {k: torch.zeros_like(v) for k, v in req.message.tensors.items()}
    lie = Message("fit_result", req.message.round, insider, {"num_examples": 1e300}, tensors)
    ack = client.submit(client.reply(lie, bytes(req.envelope.task_id)))
    server.wait_for(r"run finished", 900)
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    reason = rows[0].get("failed_clients", {}).get(str(insider), "") if rows else ""
    refused = ack.accepted and "registered" in reason and rows[0].get("aborted") is None
    return Attack("num-examples-takeover", "insider client", "refused" if refused else "succeeded",
                  reason or "its update was aggregated", 1)


def plaintext_scenarios(folder: Path, log: Callable[[str], None]) -> list[Attack]:
    """One plaintext FedAvg deployment: clients 0 and 1 honest, 2 the insider, 3 revoked."""
    from fedguard.runtime.network import certs
    from fedguard.runtime.network.harness import LocalDeployment

    config = _config(4, 21, network={"min_clients": 3})
    dep = LocalDeployment(folder, 4, config)
    certs.set_revoked(dep.certs, [3])
    server = dep.start_server(folder / "run")
    out: list[Attack] = []
    try:
        server.wait_for("listening on", 300)
        honest = [dep.start_client(c) for c in (0, 1)]
        plays = {"revoked-client": lambda: revoked_client(dep, 3), "idle-streams": lambda: idle_streams(dep, 2, 1),
                 "oversized-pre-auth": lambda: oversized_pre_auth(dep, 2, server.pid),
                 "num-examples-takeover": lambda: num_examples_takeover(dep, 2, folder / "run", server)}
        for name, play in plays.items():
            out.append(_guarded(name, "insider client", play))
            log(_line(out[-1]))
        rc = server.wait(300)
        codes = [p.wait(120) for p in honest]
        if rc != 0 or codes != [0, 0]:
            out[-1].outcome, out[-1].detail = "succeeded", f"server exit {rc}, honest clients {codes}"
    finally:
        dep.stop_all()
    return out


# -- secure deployments: one hostile client process each --------------------------------------
SECURE = {
    "secagg-weight-slot": ("secagg", "client process (SecAgg+)"),
    "secagg-garbage-shares": ("secagg", "client process (SecAgg+)"),
    "ckks-wrong-scale": ("ckks", "client process (CKKS)"),
}


def secure_scenario(name: str, folder: Path, log: Callable[[str], None], clients: int = 5) -> Attack:
    """A SecAgg+ or CKKS deployment of ``clients`` processes, the last one hostile."""
    from fedguard.runtime.network.harness import LocalDeployment
    from fedguard.secure.identity import write_identities

    mode, adversary = SECURE[name]
    write_identities(folder / "identities", range(clients))
    config = _config(clients, 22, secure={"mode": mode, "identities": str(folder / "identities")})
    dep = LocalDeployment(folder, clients, config)
    hostile = clients - 1
    server = dep.start_server(folder / "run")
    try:
        server.wait_for("listening on", 300)
        honest = [dep.start_client(c) for c in range(hostile)]
        bad = dep._spawn(f"hostile-{hostile}", ["--hostile", name, *dep.client_args(hostile)],
                         module="fedguard.runtime.network.attack")
        rc = server.wait(900)
        codes = [p.wait(120) for p in [*honest, bad]]
    finally:
        dep.stop_all()
    metrics = folder / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    row = rows[0] if rows else {}
    reason = row.get("failed_clients", {}).get(str(hostile), "")
    if name == "secagg-weight-slot":
        ok = row.get("aborted") is None and row.get("client_secagg_weight_mismatch") == 1.0
        detail = "mean divided by the registered weights; the lying slot only flagged (secagg_weight_mismatch)"
    else:
        ok = row.get("aborted") is None and row.get("completed_clients") == hostile and bool(reason)
        detail = f"client {hostile} dropped: {reason}" if reason else f"round: {row.get('aborted')}"
    ok = ok and rc == 0 and all(c == 0 for c in codes[:-1])
    return Attack(name, adversary, "contained" if ok else "succeeded", detail if ok else f"{detail}; server exit "
                  f"{rc}, clients {codes}", 1 if name != "secagg-garbage-shares" else hostile)


def _hostile_main(name: str, argv: list[str]) -> int:
    """Run ``fedguard client`` with the protocol code changed the way scenario ``name`` needs."""
    import numpy as np

    from fedguard.cli import main
    from fedguard.secure.ckks import CKKSEncryptor
    from fedguard.secure.secagg import SecAggClient

    if name == "secagg-weight-slot":
        def extra(client: Any, weight: int) -> np.ndarray:
            out = np.zeros(client.config.ring_length, dtype=np.int64)
            out[-1] = 599 * weight
            return out

        original = SecAggClient.mask_input

        def mask(self, msg, vector, weight=None, rng=None, noise=None):  # type: ignore[no-untyped-def]
            return original(self, msg, vector, weight, rng, extra(self, int(weight or 0)))

        SecAggClient.mask_input = mask  # type: ignore[method-assign]
    elif name == "secagg-garbage-shares":
        share = SecAggClient.share_keys

        def garbage(self, msg):  # type: ignore[no-untyped-def]
            out = share(self, msg)
            out.ciphertexts[:, 12:] ^= 0x5A
            return out

        SecAggClient.share_keys = garbage  # type: ignore[method-assign]
    elif name == "ckks-wrong-scale":
        encrypt = CKKSEncryptor.encrypt

        def rescaled(self, vec):  # type: ignore[no-untyped-def]
            self.context.global_scale = 2.0**50
            return encrypt(self, vec)

        CKKSEncryptor.encrypt = rescaled  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown hostile client {name!r}")
    return main(["client", *argv])


# -- running and reporting ------------------------------------------------------------------------
def _guarded(name: str, adversary: str, play: Callable[[], Attack]) -> Attack:
    """A scenario whose harness failed counts as not stopped (``succeeded``), with the error."""
    try:
        return play()
    except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others
        return Attack(name, adversary, "succeeded", f"harness error, protection not shown: {type(exc).__name__}: "
                      f"{str(exc)[:300]}", 0)


def _line(a: Attack) -> str:
    where = "" if a.live else " [in-process]"
    return f"attack {a.name} ({a.adversary}){where}: {a.outcome.upper()} - {a.detail}"


def in_process(name: str) -> Attack:
    """A server-side adversary from :mod:`fedguard.secure.attacks`."""
    from fedguard.secure.attacks import run_scenario

    r = run_scenario(name)
    return Attack(r.name, r.adversary, r.outcome, r.detail, r.hostile_messages, False, dict(r.figures))


def run_attacks(out: Path, only: list[str] | None = None, log: Callable[[str], None] = print) -> list[Attack]:
    """Every scenario (or ``only`` those), one line each as it ends."""
    wanted = list(only or [*LIVE, *IN_PROCESS])
    unknown = sorted(set(wanted) - set(LIVE) - set(IN_PROCESS))
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {[*LIVE, *IN_PROCESS]}")
    results: list[Attack] = []
    plain = ("idle-streams", "revoked-client", "oversized-pre-auth", "num-examples-takeover")
    if any(n in wanted for n in plain):
        try:
            results += [a for a in plaintext_scenarios(out / "plaintext", log) if a.name in wanted]
        except Exception as exc:  # noqa: BLE001 - the deployment itself failed
            results += [Attack(n, "insider client", "succeeded", f"harness error: {exc}"[:300], 0)
                        for n in plain if n in wanted]
    for name in SECURE:
        if name in wanted:
            results.append(_guarded(name, SECURE[name][1], lambda n=name: secure_scenario(n, out / n, log)))
            log(_line(results[-1]))
    for name in IN_PROCESS:
        if name in wanted:
            results.append(_guarded(name, "server", lambda n=name: in_process(n)))
            log(_line(results[-1]))
    return results


def summary(results: list[Attack]) -> dict[str, Any]:
    """Counts by outcome, the hostile messages tried, and whether every attack was stopped."""
    outcomes = {o: sum(1 for a in results if a.outcome == o) for o in ("refused", "contained", "succeeded")}
    return {"scenarios": len(results), **outcomes, "hostile_messages": sum(a.hostile_messages for a in results),
            "all_stopped": outcomes["succeeded"] == 0, "results": [a.row() for a in results]}


def cmd_attack(args: argparse.Namespace) -> int:
    """``fedguard attack``: exit 0 when no attack succeeded, 1 otherwise."""
    if args.list:
        for name in [*LIVE, *IN_PROCESS]:
            print(name)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    results = run_attacks(Path(args.out), only, lambda text: print(text, flush=True))
    report = summary(results)
    print(f"{report['scenarios']} attacks: {report['refused']} refused, {report['contained']} contained, "
          f"{report['succeeded']} succeeded; {report['hostile_messages']} hostile messages tried")
    print(json.dumps(report))
    return 0 if report["all_stopped"] else 1


def add_attack_command(sub: argparse._SubParsersAction) -> None:
    """Add ``attack`` to the ``fedguard`` command."""
    p = sub.add_parser("attack", help="play issue 14's attacks against a live loopback deployment and report each")
    p.add_argument("--out", default="runs/attack", help="folder for the deployments' logs and run folders")
    p.add_argument("--only", metavar="NAMES", help="comma-separated scenarios (default: all; --list names them)")
    p.add_argument("--list", action="store_true", help="print the scenario names")
    p.set_defaults(func=cmd_attack)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--hostile":
        sys.exit(_hostile_main(sys.argv[2], sys.argv[3:]))
    sys.exit("usage: python -m fedguard.runtime.network.attack --hostile SCENARIO <fedguard client arguments>")
