"""Real server and client processes on loopback (TLS with client certificates), against the simulation.

Each test starts ``fedguard server`` and ``fedguard client`` processes, lets them run a small
federated job on the embedded MNIST subset, and compares the final model bit for bit with an
in-process simulation of the same configuration (with the same clients missing where the
test made them fail).
"""

from __future__ import annotations

import json
import signal
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedguard.config import Config
from fedguard.experiment import Experiment
from fedguard.runtime.network import auth
from fedguard.runtime.network.harness import LocalDeployment, metric_rows, simulate
from fedguard.secure.identity import write_identities

pytestmark = pytest.mark.timeout(480)  # a loaded 2-core machine needs it; a hang still fails

def _config(rounds: int, clients: int, examples: int, seed: int, **extra: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "run": {"name": "net", "rounds": rounds, "seed": seed, "report": False, "progress": False, "workers": "2",
                "threads": 1},  # the server evaluates at the same threads in both runs, whatever earlier tests left
        "data": {"num_clients": clients, "max_train_examples": examples},
    }
    for section, values in extra.items():
        config.setdefault(section, {}).update(values)
    return config


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return metric_rows(run_dir)


def _assert_same_model(a: Path, b: Path) -> None:
    pa, pb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), f"{name} differs by {float((pa[name] - pb[name]).abs().max())}"


def _finish(dep: LocalDeployment, server: Any, timeout: float = 300) -> None:
    """Wait for the server to finish and the clients to exit on their own; stop any leftovers."""
    try:
        rc = server.wait(timeout)
        for proc in dep.procs:
            if proc is not server and proc.popen.poll() is None:
                proc.wait(30)
        assert rc == 0, "\n".join(server.lines[-20:])
    finally:
        dep.stop_all()


def test_network_run_equals_simulation_while_fuzzed_and_strangers_are_refused(tmp_path: Path) -> None:
    """Clients 0 (its partition of the dataset) and 1 (its own .npz file) train; client 2 is a
    fuzzing client sending 1,000 malformed, forged and replayed messages and one invalid update
    per round; a client with an unregistered key tries to join. The model must come out exactly as
    the simulation's without client 2, the server must refuse every bad message and finish."""
    config = _config(3, 3, 600, seed=2, network={"max_message_mb": 1.0, "round_deadline_s": 60.0})
    dep = LocalDeployment(tmp_path / "net", clients=3, config=config)
    auth.write_key_file(tmp_path / "stranger.key", 7, auth.new_key())
    own = Experiment(Config.from_dict({k: v for k, v in config.items() if k != "network"})).assemble().client_data(1)
    np.savez(tmp_path / "client1.npz", x=own.x.numpy(), y=own.y.numpy())

    server = dep.start_server(tmp_path / "run")
    server.wait_for("listening on", 60)
    honest = [dep.start_client(0), dep.start_client(1, ["--data", str(tmp_path / "client1.npz")])]
    fuzzer = dep.start_fuzzer(2, messages=1000, rounds=3, max_message_mb=1.0)
    stranger = dep._spawn("stranger", ["client", *dep.client_args(0), "--key", str(tmp_path / "stranger.key")])
    assert stranger.wait(180) == 3 and stranger.count(r"refused by the server: unknown client id 7") == 1
    _finish(dep, server)

    assert [c.wait(30) for c in honest] == [0, 0]
    summary = json.loads(fuzzer.lines[-1])
    assert summary["sent"] == 1000 and summary["refused"] == 1000 and summary["accepted"] == {}
    assert server.count("refused message") >= 1001 and server.count(r"unknown client id 7") == 1
    assert server.count(r"update from client 2 rejected") == 3
    assert server.count(r"round \d fit: 3/3 replied") == 3

    sim = simulate(config, tmp_path / "sim", {"faults.leave": ["2-2@1"]})
    assert _rows(tmp_path / "run") == _rows(sim.run_dir)
    _assert_same_model(tmp_path / "run", sim.run_dir)


@pytest.mark.timeout(480)  # five exchanges per SecAgg round with the consistency check; slow on a loaded machine
def test_secure_aggregation_survives_client_and_server_kills_like_the_simulation(tmp_path: Path) -> None:
    """SecAgg+ (four request stages per round, secrets held by the clients) with DP-SGD on the
    clients, over the network.
    SIGKILL client 3 of 4 while it trains round 2: the round completes with the other three,
    whose shares remove the dead client's masks; the restarted client (same state folder)
    rejoins. Then SIGKILL the server while clients train round 3: `fedguard server --resume`
    continues from the last checkpoint, the clients reconnect, and the metrics (each round
    once), the final model and the privacy ledger equal the simulation in which client 3
    failed at round 2's fit request."""
    dp = {"mode": "sample", "noise_multiplier": 1.0}
    write_identities(tmp_path / "identities", range(4))  # the clients' Ed25519 PKI, shared by every party
    secure = {"mode": "secagg", "identities": str(tmp_path / "identities")}
    config = _config(3, 4, 800, seed=3, train={"epochs": 2, "max_steps": 12}, secure=secure, dp=dp)
    dep = LocalDeployment(tmp_path / "net", clients=4, config=config)
    run_dir = tmp_path / "run"
    server = dep.start_server(run_dir)
    server.wait_for("listening on", 60)
    clients = [dep.start_client(c, ["--state-dir", str(tmp_path / f"state-{c}")]) for c in range(4)]
    clients[3].wait_for(r"round 2: fit received", 120)
    clients[3].kill(signal.SIGKILL)
    assert clients[3].wait(10) == -signal.SIGKILL
    again = dep.start_client(3, ["--state-dir", str(tmp_path / "state-3")], name="client-3-restarted")

    clients[0].wait_for(r"round 3: fit received", 120)
    server.kill(signal.SIGKILL)
    assert server.wait(10) == -signal.SIGKILL
    checkpoint_round = json.loads((run_dir / "checkpoint.json").read_text())["round"]
    assert checkpoint_round == 2
    resumed = dep.start_server(run_dir, resume=True)
    resumed.wait_for(rf"resuming .* after round {checkpoint_round}", 60)
    _finish(dep, resumed)

    assert [*(c.wait(30) for c in clients[:3]), again.wait(30)] == [0, 0, 0, 0]
    assert server.count(r"round 2 fit: 3/4 replied.*client 3: connection lost") == 1
    assert server.count(r"round 2 secagg/unmask: 3/3 replied") == 1
    assert server.count(r"client 3 joined .*\(reconnect\)") == 1
    assert resumed.count(r"round 3 secagg/unmask: 4/4 replied") == 1
    rows = _rows(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3] and [r["completed_clients"] for r in rows] == [4, 3, 4]

    sim = simulate(config, tmp_path / "sim", drop=({3}, 2, 2), drop_kinds={"fit"})
    # DP noise comes from each client's own secret source (dp.noise_source=secure; seeded noise is
    # refused over the network), so the model and its metrics cannot equal the simulation's bit for
    # bit; the rounds, who completed them and the privacy ledger must
    same = ("round", "completed_clients")
    assert [{k: r[k] for k in same} for r in rows] == [{k: r[k] for k in same} for r in _rows(sim.run_dir)]
    state_files = list((tmp_path / "state-0").iterdir())  # SecAgg key pairs and mask seeds live here
    assert state_files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in state_files)
    assert stat.S_IMODE((tmp_path / "state-0").stat().st_mode) == 0o700
    ledger = ("epsilon", "delta", "dp_steps")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epsilon"] > 0 and {k: summary[k] for k in ledger} == {k: sim.final[k] for k in ledger}
