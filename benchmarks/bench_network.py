"""Network benchmarks: ``net-50`` (50 client processes against the simulation) and ``net-faults``.

Every process is real (``fedguard server`` and ``fedguard client``, TLS with client
certificates, on 127.0.0.1). ``net-50`` runs the same configuration in the simulation and
over the network, compares the metrics and final model, and reports round times, bytes each
client uploads per round (as counted by the protocol, and by the kernel's TCP counters
including TLS and HTTP/2 framing) and the clients' memory. ``net-faults`` runs each fault
drill of issue 6 and each attack scenario of issue 14 (``fedguard attack``) and reports one
boolean per drill and scenario, and how many hostile messages were tried.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.runtime.network import auth, certs
from fedguard.runtime.network.harness import (
    ClientZygote,
    LocalDeployment,
    Proc,
    metric_rows,
    model_difference,
    simulate,
)


def _base(args: Any, clients: int, rounds: int, examples: int, seed: int, **sections: dict[str, Any]) -> dict:
    """A configuration on full MNIST when it is available (mnist-5k in --quick runs)."""
    full = not args.quick and (Path(args.data_dir) / "mnist").is_dir()
    data: dict[str, Any] = {"num_clients": clients, "max_train_examples": examples}
    data.update({"dataset": "mnist", "data_dir": str(Path(args.data_dir).resolve())} if full else {})
    config: dict[str, Any] = {
        "run": {"name": "net", "rounds": rounds, "seed": seed, "report": False, "progress": False},
        "data": data,
        "network": {"round_deadline_s": 600.0, "wait_timeout_s": 900.0},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _export_partitions(config: dict[str, Any], folder: Path) -> tuple[list[Path], int]:
    """Each client's partition as its own .npz file (the data it brings); the model's byte size."""
    from fedguard.config import Config
    from fedguard.experiment import Experiment

    setup = Experiment(Config.from_dict({k: v for k, v in config.items() if k != "network"})).assemble()
    paths = []
    for cid in range(len(setup.parts)):
        part = setup.client_data(cid)
        paths.append(folder / f"client-{cid}.npz")
        np.savez(paths[-1], x=part.x.numpy(), y=part.y.numpy())
    model_bytes = sum(p.numel() * p.element_size() for p in setup.model.parameters())
    return paths, int(model_bytes)


def _finish(dep: LocalDeployment, server: Proc, timeout: float) -> int:
    """The server's exit code once it finished; clients get time to exit on their own."""
    try:
        rc = server.wait(timeout)
        for proc in dep.procs:
            if proc is not server and proc.popen.poll() is None:
                proc.wait(60)
        return rc
    except subprocess.TimeoutExpired:
        return -1
    finally:
        dep.stop_all()


# -- measurements from outside the processes -----------------------------------------------
def _socket_received(port: int) -> dict[str, int]:
    """Bytes the server received on each established connection (kernel TCP counters)."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True, check=False
    ).stdout
    received: dict[str, int] = {}
    peer = None
    for line in out.splitlines():
        addrs = re.findall(r"(\S+:\d+)", line)
        if len(addrs) >= 2 and addrs[0].endswith(f":{port}"):
            peer = addrs[1]
            continue
        match = re.search(r"bytes_received:(\d+)", line)
        if match and peer:
            received[peer] = int(match.group(1))
            peer = None
    return received


def _memory_mb(pids: list[int]) -> dict[str, float]:
    """Median RSS and total PSS of the given processes, in MiB."""
    rss, pss, uss = [], [], []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.M))
        rss.append(int(fields.get("Rss", 0)) / 1024)
        pss.append(int(fields.get("Pss", 0)) / 1024)
        uss.append((int(fields.get("Private_Clean", 0)) + int(fields.get("Private_Dirty", 0))) / 1024)
    return {
        "client_rss_mb_median": round(statistics.median(rss), 1) if rss else float("nan"),
        "clients_pss_mb_total": round(sum(pss), 1),
        "client_uss_mb_median": round(statistics.median(uss), 1) if uss else float("nan"),
    }


def tree_cpu_s(root: int) -> float:
    """User plus system CPU seconds of a process and all its living descendants (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0.0)
        stack += children.get(pid, [])
    return total


class RoundCpu(threading.Thread):
    """Samples this process tree's CPU seconds each time a run's metrics.jsonl gains a row."""

    def __init__(self, metrics: Path) -> None:
        super().__init__(daemon=True)
        self.metrics, self.samples, self.stop = metrics, [tree_cpu_s(os.getpid())], threading.Event()

    def run(self) -> None:
        rows = 0
        while not self.stop.is_set():
            n = len(self.metrics.read_text().splitlines()) if self.metrics.exists() else 0
            if n > rows:
                rows = n
                self.samples.append(tree_cpu_s(os.getpid()))
            time.sleep(0.05)

    def per_round(self) -> list[float]:
        """CPU seconds between consecutive rows (the first from the start of the run)."""
        return [round(b - a, 2) for a, b in zip(self.samples, self.samples[1:], strict=False)]


def _uploads(run_dir: Path) -> list[int]:
    """Bytes each client sent with its fit reply, per round (the protocol's count)."""
    events = [json.loads(line) for line in (run_dir / "network.jsonl").read_text().splitlines() if line.strip()]
    return [e["upload_bytes"] for e in events if e["kind"] == "fit" and e["status"] == "ok"]


def _watch_rounds(server: Proc, port: int, rounds: int, timeout: float,
                  roots: list[int] | None = None) -> tuple[list[int], list[float]]:
    """Per client and round, the TCP bytes the server received; per round, the CPU seconds of
    the server and every client (snapshots at each round's end; ``roots``: more process trees
    to count, e.g. forked clients)."""
    def cpu_now() -> float:
        return tree_cpu_s(os.getpid()) + sum(tree_cpu_s(r) for r in roots or [])

    server.wait_for(r"clients connected", timeout)
    before, per_client = _socket_received(port), []
    cpu = [cpu_now()]
    for r in range(1, rounds + 1):
        server.wait_for(rf"round {r} fit: ", timeout)
        after = _socket_received(port)
        cpu.append(cpu_now())
        per_client += [after[p] - before[p] for p in after if p in before and after[p] > before[p]]
        before = after
    return per_client, [round(b - a, 2) for a, b in zip(cpu, cpu[1:], strict=False)]


def _peak_rss_mb(pids: list[int]) -> list[float]:
    """Each living process's peak resident set (VmHWM), in MiB."""
    out = []
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
        if match:
            out.append(round(int(match.group(1)) / 1024, 1))
    return out


def _client_import_s() -> float:
    """Wall seconds a cold Python takes to import what `fedguard client` needs (once per machine)."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import fedguard.runtime.network.client, fedguard.plugins"], check=True)
    return round(time.monotonic() - t0, 2)


def _rounds_override(args: Any, default: int) -> int:
    for item in getattr(args, "set", []) or []:
        if item.startswith("run.rounds="):
            return int(item.split("=", 1)[1])
    return default


# -- net-50 -------------------------------------------------------------------------------------
def net_50(args: Any) -> dict[str, Any]:
    """50 client processes, CNN-S on full MNIST partitions, 10 rounds: network vs simulation."""
    clients, rounds = (10, 3) if args.quick else (50, 10)
    rounds = _rounds_override(args, rounds)
    folder = _fresh(Path(args.out) / "net-50")
    config = _base(args, clients, rounds, 6000 if args.quick else 0, seed=0, run={"eval_every": 5})
    data_paths, model_bytes = _export_partitions(config, _fresh(folder / "data"))
    load_before = os.getloadavg()[0]

    watcher = RoundCpu(folder / "sim" / "metrics.jsonl")
    watcher.start()
    sim = simulate(config, folder / "sim")
    watcher.stop.set()
    sim_round_s, sim_cpu = [r["round_s"] for r in sim.rows], watcher.per_round()

    import_s = _client_import_s()
    dep = LocalDeployment(folder / "net", clients, config)
    server = dep.start_server(folder / "run")
    server.wait_for("listening on", 120)
    zygote = ClientZygote(folder / "net")
    t0 = time.monotonic()
    pids = [zygote.start([*dep.client_args(c), "--data", str(data_paths[c])], folder / "net" / f"client-{c}.log")
            for c in range(clients)]
    server.wait_for(r"clients connected", 900)
    startup_s = time.monotonic() - t0
    memory = _memory_mb(pids)
    socket_bytes, net_cpu = _watch_rounds(server, dep.port, rounds - 1, 1800, [zygote.popen.pid])
    peak = _peak_rss_mb(pids)  # before the last round ends and the clients exit
    server.wait_for(rf"round {rounds} fit: ", 1800)
    memory_end = _memory_mb(pids)  # at the last round
    rc = _finish(dep, server, 600)
    zygote.close()

    net_round_s = [r["round_s"] for r in metric_rows(folder / "run", ("round_s",))]
    uploads = _uploads(folder / "run")
    median_net, median_sim = statistics.median(net_round_s), statistics.median(sim_round_s)
    return {
        "clients": clients,
        "rounds": rounds,
        "median_round_s": round(median_net, 3),
        "sim_median_round_s": round(median_sim, 3),
        "ratio": round(median_net / median_sim, 3),
        "bytes_per_client_round": int(statistics.median(uploads)),
        "model_bytes": model_bytes,
        "upload_ratio": round(statistics.median(uploads) / model_bytes, 4),
        "tcp_bytes_per_client_round": int(statistics.median(socket_bytes)) if socket_bytes else None,
        "tcp_upload_ratio": round(statistics.median(socket_bytes) / model_bytes, 4) if socket_bytes else None,
        "metrics_equal_simulation": metric_rows(folder / "run") == metric_rows(sim.run_dir),
        "model_max_abs_diff_vs_simulation": model_difference(folder / "run", sim.run_dir),
        "test_accuracy": sim.final.get("test_accuracy"),
        "net_round_s": net_round_s,
        "sim_round_s": sim_round_s,
        "cpu_s_per_round_median": statistics.median(net_cpu),
        "sim_cpu_s_per_round_median": statistics.median(sim_cpu),
        "cpu_ratio": round(statistics.median(net_cpu) / statistics.median(sim_cpu), 3),
        "net_cpu_s_per_round": net_cpu,
        "sim_cpu_s_per_round": sim_cpu,
        "wall_median_round_s": round(median_net, 3),
        "connect_s": round(startup_s, 1),
        "connect_s_basis": "fork of 50 pre-imported client processes until the server logs all connected "
                           "(one machine per client in a deployment; each pays client_import_s once, side by side)",
        "client_import_s": import_s,
        "client_peak_rss_mb": round(statistics.median(peak), 1) if peak else None,
        "client_peak_rss_mb_max": max(peak) if peak else None,
        "client_pss_mb_mean_end": round(memory_end["clients_pss_mb_total"] / max(1, len(pids)), 1),
        "client_uss_mb_median_end": memory_end["client_uss_mb_median"],
        "client_rss_mb_median_end": memory_end["client_rss_mb_median"],
        "client_startup_s": round(startup_s, 1),
        **memory,
        "server_exit_code": rc,
        "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "tls": "TLS 1.3 with client certificates, per-client HMAC keys",
        "dataset": config["data"].get("dataset", "mnist-5k"),
    }


# -- net-faults ---------------------------------------------------------------------------------
def _kill_when(proc: Proc, pattern: str, timeout: float) -> bool:
    """SIGKILL ``proc`` as soon as its log shows ``pattern``; True if it died by that kill."""
    proc.wait_for(pattern, timeout)
    proc.kill(signal.SIGKILL)
    return proc.wait(30) == -signal.SIGKILL


#: accuracy change from losing 20% of the clients that counts as noise (quick runs train far less)
NOISE = {True: 0.05, False: 0.02}


def drill_kill_20_percent(args: Any, folder: Path) -> dict[str, Any]:
    """Kill 20% of the clients while they train a round: the round completes with the others,
    the model equals FedAvg over the survivors exactly, and the final accuracy is within
    noise of the run where nobody was killed."""
    clients, rounds, kill_round = (5, 3, 2) if args.quick else (10, 5, 3)
    victims = list(range(1, clients, 5))
    config = _base(args, clients, rounds, 0 if not args.quick else 2000, seed=11,
                   network={"min_clients": clients - len(victims)})
    dep = LocalDeployment(folder, clients, config)
    server = dep.start_server(folder / "run")
    server.wait_for("listening on", 120)
    procs = [dep.start_client(c) for c in range(clients)]
    killed = all(_kill_when(procs[v], rf"round {kill_round}: fit received", 1800) for v in victims)
    rc = _finish(dep, server, 1800)
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    reasons = rows[kill_round - 1]["failed_clients"]
    survivors = simulate(config, folder / "sim-survivors", drop=(set(victims), kill_round, rounds))
    uninterrupted = simulate(config, folder / "sim")
    acc_net, acc_full = rows[-1]["test_accuracy"], uninterrupted.rows[-1]["test_accuracy"]
    diff = model_difference(folder / "run", survivors.run_dir)
    ok = (
        rc == 0
        and killed
        and rows[kill_round - 1]["completed_clients"] == clients - len(victims)
        and all("connection lost" in reasons.get(str(v), "") for v in victims)
        and all(r["aborted"] is None for r in rows)
        and diff == 0
        and abs(acc_net - acc_full) <= NOISE[bool(args.quick)]
    )
    return {"passed": ok, "killed": victims, "round": kill_round, "failed_reasons": reasons,
            "model_max_abs_diff_vs_survivors_fedavg": diff, "test_accuracy": acc_net,
            "uninterrupted_test_accuracy": acc_full, "noise_tolerance": NOISE[bool(args.quick)]}


def drill_restart_client(args: Any, folder: Path) -> dict[str, Any]:
    """Kill a client mid-round and start it again: it rejoins and answers the next rounds."""
    config = _base(args, 5, 3, 750, seed=12, train={"epochs": 4})
    dep = LocalDeployment(folder, 5, config)
    server = dep.start_server(folder / "run")
    server.wait_for("listening on", 120)
    procs = [dep.start_client(c, ["--state-dir", str(folder / f"state-{c}")]) for c in range(5)]
    killed = _kill_when(procs[3], r"round 2: fit received", 900)
    again = dep.start_client(3, ["--state-dir", str(folder / "state-3")], name="client-3-restarted")
    rc = _finish(dep, server, 900)
    completed = [r["completed_clients"] for r in metric_rows(folder / "run")]
    sim = simulate(config, folder / "sim", drop=({3}, 2, 2))
    diff = model_difference(folder / "run", sim.run_dir)
    ok = rc == 0 and killed and completed == [5, 4, 5] and again.count(r"round 3: fit_result sent") == 1 and diff == 0
    return {"passed": ok, "completed_per_round": completed, "model_max_abs_diff_vs_reference": diff}


def drill_server_resume(args: Any, folder: Path) -> dict[str, Any]:
    """SIGKILL the server in round 5, resume it from its run folder: same final model as uninterrupted."""
    rounds, kill_round = (4, 3) if args.quick else (8, 5)
    config = _base(args, 5, rounds, 2000 if args.quick else 10000, seed=13)
    dep = LocalDeployment(folder, 5, config)
    run_dir = folder / "run"
    server = dep.start_server(run_dir)
    server.wait_for("listening on", 120)
    procs = [dep.start_client(c) for c in range(5)]
    procs[0].wait_for(rf"round {kill_round}: fit received", 1800)
    server.kill(signal.SIGKILL)
    killed = server.wait(30) == -signal.SIGKILL
    checkpoint = json.loads((run_dir / "checkpoint.json").read_text())["round"]
    resumed = dep.start_server(run_dir, resume=True)
    rc = _finish(dep, resumed, 1800)
    sim = simulate(config, folder / "sim")
    rows = metric_rows(run_dir)
    diff = model_difference(run_dir, sim.run_dir)
    ok = rc == 0 and killed and rows == metric_rows(sim.run_dir) and diff == 0 and [r["round"] for r in rows] == list(
        range(1, rounds + 1)
    )
    return {"passed": ok, "killed_in_round": kill_round, "resumed_after_round": checkpoint,
            "model_max_abs_diff_vs_uninterrupted": diff, "client_exit_codes": [p.popen.poll() for p in procs]}


def drill_auth_and_fuzz(args: Any, folder: Path) -> dict[str, Any]:
    """A revoked and an unknown client are refused; a fuzzing client's 1,000 malformed messages
    are each refused, the server keeps serving and the model equals the run without it."""
    config = _base(args, 3, 3, 600 if args.quick else 3000, seed=14, network={"max_message_mb": 1.0})
    dep = LocalDeployment(folder, 4, config)
    certs.set_revoked(dep.certs, [3])
    auth.write_key_file(folder / "stranger.key", 7, auth.new_key())
    server = dep.start_server(folder / "run")
    server.wait_for("listening on", 120)
    honest = [dep.start_client(c) for c in range(2)]
    fuzzer = dep.start_fuzzer(2, messages=1000, rounds=3, max_message_mb=1.0)
    revoked = dep.start_client(3)
    stranger = dep._spawn("stranger", ["client", *dep.client_args(0), "--key", str(folder / "stranger.key")])
    refused_rc = [revoked.wait(300), stranger.wait(300)]
    rc = _finish(dep, server, 900)
    summary = json.loads(fuzzer.lines[-1]) if fuzzer.lines else {}
    sim = simulate(config, folder / "sim", {"faults.leave": ["2-2@1"]})
    diff = model_difference(folder / "run", sim.run_dir)
    logged = server.count("client 3 is revoked") >= 1 and server.count("unknown client id 7") >= 1
    unauth_ok = refused_rc == [3, 3] and logged
    fuzz_ok = (
        rc == 0
        and summary.get("sent") == 1000
        and summary.get("refused") == 1000
        and server.count("refused message") >= 1000
        and diff == 0
        and [h.popen.poll() for h in honest] == [0, 0]
    )
    return {"unauthenticated": unauth_ok, "fuzz": fuzz_ok, "fuzzer": summary,
            "server_refusals_logged": server.count("refused message"), "model_max_abs_diff_vs_reference": diff}


def drill_attacks(folder: Path) -> dict[str, Any]:
    """Issue 14's attacks (``fedguard attack``): a hostile client and a curious or malicious
    server against live loopback deployments (server-side ones in-process); each must end
    refused or contained."""
    from fedguard.runtime.network.attack import run_attacks, summary

    return summary(run_attacks(folder, log=lambda text: print(text, flush=True)))


def net_faults(args: Any) -> dict[str, Any]:
    """Fault drills and attack scenarios over real processes: one boolean per drill and per
    scenario, all_passed, and the count of hostile messages tried."""
    folder = _fresh(Path(args.out) / "net-faults")
    attacks = drill_attacks(folder / "attacks")
    kill = drill_kill_20_percent(args, folder / "kill-20")
    restart = drill_restart_client(args, folder / "restart")
    resume = drill_server_resume(args, folder / "resume")
    guard = drill_auth_and_fuzz(args, folder / "auth-fuzz")
    flags = {
        "kill_20pct_mid_round": bool(kill["passed"]),
        "server_kill_resume": bool(resume["passed"]),
        "client_restart_rejoins": bool(restart["passed"]),
        "unauthenticated_refused": bool(guard["unauthenticated"]),
        "fuzz_1000_model_unchanged": bool(guard["fuzz"]),
    }
    for row in attacks["results"]:
        flags["attack_" + row["scenario"].replace("-", "_")] = row["outcome"] in ("refused", "contained")
    for name, passed in flags.items():
        print(f"net-faults {name}: {'PASS' if passed else 'FAIL'}", flush=True)
    hostile = attacks["hostile_messages"] + int(guard["fuzzer"].get("sent", 0)) + guard["fuzzer"].get("bad_updates", 0)
    print(f"net-faults hostile messages tried: {hostile}", flush=True)
    return {**flags, "all_passed": all(flags.values()), "hostile_messages": hostile,
            "attack_outcomes": {r["scenario"]: r["outcome"] for r in attacks["results"]},
            "details": {"kill": kill, "restart": restart, "resume": resume, "auth_fuzz": guard,
                        "attacks": attacks["results"]}}


BENCHMARKS = {"net-50": net_50, "net-faults": net_faults}
