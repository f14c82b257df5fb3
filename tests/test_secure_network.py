"""SecAgg+ and CKKS across real server and client processes (loopback, TLS), against the simulation.

Slow (a server and three client processes per mode): run with ``pytest -m slow tests/test_secure_network.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedguard.runtime.network.harness import LocalDeployment, metric_rows, model_difference, simulate
from fedguard.secure.identity import write_identities

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.mark.parametrize(("mode", "tolerance"), [("secagg", 0.0), ("ckks", 1e-3)])
def test_secure_modes_over_the_network_equal_the_simulation(tmp_path: Path, mode: str, tolerance: float) -> None:
    """Every SecAgg+/CKKS stage crosses the network as ordinary messages; the client keeps its
    secrets in its own process. SecAgg+ is exact (masks cancel in the ring), so the model is bit
    for bit the simulation's; the CKKS key holder floods each release with fresh noise from the
    OS (about 1e-5 per value here), which two rounds of training carry into the model."""
    write_identities(tmp_path / "identities", range(3))  # the clients' Ed25519 PKI, shared by every party
    config = {
        "run": {"name": "net", "rounds": 2, "seed": 1, "report": False, "progress": False, "workers": "2"},
        "data": {"num_clients": 3, "max_train_examples": 600},
        "secure": {"mode": mode, "identities": str(tmp_path / "identities")},
    }
    dep = LocalDeployment(tmp_path / "net", clients=3, config=config)
    server = dep.start_server(tmp_path / "run")
    try:
        server.wait_for("listening on", 60)
        clients = [dep.start_client(c) for c in range(3)]
        assert server.wait(200) == 0, "\n".join(server.lines[-20:])
        assert [c.wait(30) for c in clients] == [0, 0, 0]
    finally:
        dep.stop_all()
    stages = {"secagg": ["secagg/setup", "secagg/share_keys", "fit", "secagg/consistency", "secagg/unmask"],
              "ckks": ["ckks/keygen", "ckks/context", "ckks/decrypt", "fit"]}
    for stage in stages[mode]:
        assert server.count(rf"round 2 {stage}: \d/\d replied") == 1, stage
    sim = simulate(config, tmp_path / "sim")
    net_rows, sim_rows = metric_rows(tmp_path / "run"), metric_rows(sim.run_dir)
    assert [r["completed_clients"] for r in net_rows] == [r["completed_clients"] for r in sim_rows] == [3, 3]
    assert model_difference(tmp_path / "run", sim.run_dir) <= tolerance
