"""From the outside (issue 20): a client that cannot take part says why and how to fix it, and
stops at once with exit code 3; the server logs each refusal, failed TLS handshakes included,
as its own line and counts it by kind.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedguard.runtime.network import auth, certs
from fedguard.runtime.network.client import EXIT_REFUSED
from fedguard.runtime.network.harness import LocalDeployment

pytestmark = pytest.mark.timeout(420)  # one server start and five short-lived clients on a loaded 2-core machine

CONFIG = {
    "run": {"name": "tls", "rounds": 1, "report": False, "progress": False},
    "data": {"num_clients": 2, "max_train_examples": 200},
    "network": {"wait_timeout_s": 600.0},
}


def test_refused_clients_name_the_cause_and_the_fix_and_stop(tmp_path: Path) -> None:
    dep = LocalDeployment(tmp_path, 3, CONFIG)
    other = tmp_path / "other-ca"
    certs.make_dev_pki(other, 1)
    certs.set_revoked(dep.certs, [2])
    auth.write_key_file(tmp_path / "stranger.key", 7, auth.new_key())
    server = dep.start_server(tmp_path / "run")
    try:
        server.wait_for("listening on", 240)
        base = dep.client_args(0)
        no_cert = [a for i, a in enumerate(base) if a not in ("--cert", "--cert-key")
                   and base[i - 1] not in ("--cert", "--cert-key")]
        wrong_ca = [str(other / "ca.pem") if base[i - 1] == "--ca" else a for i, a in enumerate(base)]
        cases = {
            "missing-cert": (no_cert, "missing certificate: add --cert"),
            "wrong-ca": (wrong_ca, "wrong CA: pass --ca"),
            "foreign-client-cert": (
                [str(other / ("client-0.pem" if base[i - 1] == "--cert" else "client-0-key.pem"))
                 if base[i - 1] in ("--cert", "--cert-key") else a for i, a in enumerate(base)],
                "refused the client certificate",
            ),
            "revoked": (dep.client_args(2), "fedguard certs --reinstate 2"),
            "unknown-id": ([*dep.client_args(0)[:2], "--key", str(tmp_path / "stranger.key"), *dep.client_args(0)[4:]],
                           "not in the server's registry"),
        }
        procs = {name: dep._spawn(name, ["client", *args, "--retry-s", "600"]) for name, (args, _) in cases.items()}
        t0 = time.monotonic()
        for name, (_, message) in cases.items():
            rc = procs[name].wait(240)
            out = "\n".join(procs[name].lines)
            assert rc == EXIT_REFUSED, f"{name}: exit {rc}\n{out[-2000:]}"
            assert message in out, f"{name}: {out[-2000:]}"
            assert "joining again" not in out, name  # no retrying a permanent refusal
        assert time.monotonic() - t0 < 200
        # one line per refusal: three TLS handshakes (two probes' and gRPC's own attempts may add more)
        server.wait_for(r"\[tls\].*no certificate", 60)
        server.wait_for(r"\[tls\].*not signed by network.client_ca", 60)
        server.wait_for(r"client 2 .*\[identity\].*revoked", 60)
        server.wait_for(r"\[message\]: unknown client id 7|\[identity\].*unknown client id 7|unknown client id 7", 60)
    finally:
        dep.stop_all()
