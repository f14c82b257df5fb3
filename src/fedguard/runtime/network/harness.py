"""Launch a server and client processes on loopback: for tests, benchmarks and fault drills.

Every process is a real ``python -m fedguard.cli server|client`` with its own log; the
harness watches the logs for lines (``wait_for``) and kills processes by their own pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tomli_w

from fedguard.runtime.network.certs import make_dev_pki


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


READER_DRAIN_S = 60.0  # the output pipe closes when the child exits; only a stuck grandchild waits this long


class Proc:
    """A child process whose combined output is kept line by line (and written to a log file)."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name, self.argv, self.log_path = name, argv, log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.log_path.open("a") as log:
            for line in self.popen.stdout:
                log.write(line)
                log.flush()
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first log line (from index ``start``) matching ``pattern``; TimeoutError otherwise."""
        regex = re.compile(pattern)
        end = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    match = regex.search(self.lines[i])
                    if match:
                        return match
                    i += 1
                remaining = end - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.lines[-15:])
                    what = f"{self.name}: no line matching {pattern!r} within {timeout} s"
                    raise TimeoutError(f"{what}; last lines:\n{tail}")
                self._cond.wait(min(remaining, 0.5))

    def count(self, pattern: str) -> int:
        """How many log lines match ``pattern``."""
        regex = re.compile(pattern)
        with self._cond:
            return sum(1 for line in self.lines if regex.search(line))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to this child (by its pid)."""
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting up to ``timeout`` seconds, then for the reader to reach the end
        of the child's output (its last lines, such as why a run failed, are written just before it
        exits, and on a loaded machine the reader thread may take seconds to be scheduled)."""
        rc = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=READER_DRAIN_S)
        return rc


class LocalDeployment:
    """A folder with certificates, a configuration and the processes of one loopback deployment."""

    def __init__(self, folder: str | Path, clients: int, config: dict[str, Any], tls: bool = True, mtls: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.clients, self.tls, self.mtls = clients, tls, mtls
        self.port = free_port()
        self.certs = self.folder / "certs"
        make_dev_pki(self.certs, clients)
        self.config = self._with_network(config)
        self.config_path = self.folder / "config.toml"
        self.config_path.write_text(tomli_w.dumps(self.config))
        self.procs: list[Proc] = []

    def _with_network(self, config: dict[str, Any]) -> dict[str, Any]:
        net: dict[str, Any] = {"address": f"127.0.0.1:{self.port}", "clients": str(self.certs / "clients.json")}
        if self.tls:
            net.update({"cert": str(self.certs / "server.pem"), "key": str(self.certs / "server-key.pem")})
            if self.mtls:
                net["client_ca"] = str(self.certs / "ca.pem")
        else:
            net["tls"] = "off"
        out = {k: dict(v) for k, v in config.items()}
        out["network"] = {**net, **out.get("network", {})}
        return out

    @property
    def address(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str], module: str = "fedguard.cli") -> Proc:
        # clients compute at one thread, as the simulation's workers do; the server keeps its threads
        env = {} if args[:1] == ["server"] else {"OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", module, *args]
        proc = Proc(name, argv, self.folder / f"{name}.log", self.folder, env)
        self.procs.append(proc)
        return proc

    def start_server(self, run_dir: str | Path, resume: bool = False, extra: list[str] | None = None) -> Proc:
        """``fedguard server`` on this deployment's configuration (or ``--resume``)."""
        args = ["server", "--resume", str(run_dir)]
        if not resume:
            args = ["server", str(self.config_path), "--out", str(run_dir)]
        return self._spawn("server", args + (extra or []))

    def client_args(self, cid: int, key_of: int | None = None) -> list[str]:
        """Connection arguments of client ``cid`` (``key_of``: use another client's credentials)."""
        k = cid if key_of is None else key_of
        args = ["--server", self.address, "--key", str(self.certs / f"client-{k}.key")]
        if not self.tls:
            return args + ["--insecure"]
        args += ["--ca", str(self.certs / "ca.pem")]
        if self.mtls:
            args += ["--cert", str(self.certs / f"client-{k}.pem")]
            args += ["--cert-key", str(self.certs / f"client-{k}-key.pem")]
        return args

    def start_client(self, cid: int, extra: list[str] | None = None, name: str | None = None) -> Proc:
        """``fedguard client`` number ``cid``."""
        return self._spawn(name or f"client-{cid}", ["client", *self.client_args(cid), *(extra or [])])

    def start_fuzzer(self, cid: int, messages: int, rounds: int, max_message_mb: float, seed: int = 0) -> Proc:
        """The fuzzing client (:mod:`fedguard.runtime.network.fuzz`) with client ``cid``'s credentials."""
        args = [*self.client_args(cid), "--messages", str(messages), "--rounds", str(rounds)]
        args += ["--seed", str(seed), "--max-message-mb", str(max_message_mb)]
        return self._spawn(f"fuzzer-{cid}", args, module="fedguard.runtime.network.fuzz")

    def stop_all(self, timeout: float = 10.0) -> None:
        """Terminate whatever is still running (by pid), then kill what does not stop."""
        for proc in self.procs:
            proc.kill(signal.SIGTERM)
        end = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill(signal.SIGKILL)
                proc.wait(5)


# -- references: the same configuration run in the simulation ------------------------------
METRIC_KEYS = ("round", "completed_clients", "train_loss", "test_accuracy", "test_loss")


def simulate(
    config: dict[str, Any],
    folder: str | Path,
    sets: dict[str, Any] | None = None,
    drop: tuple[set[int], int, int] | None = None,
    drop_kinds: set[str] | None = None,
) -> Any:
    """Run ``config`` (minus [network]) in the simulation.

    ``drop=(clients, first, last)`` makes those clients fail in rounds first..last, as
    killing their processes did: at every request, or only at those of ``drop_kinds``.
    """
    from fedguard.config import Config
    from fedguard.experiment import Experiment

    conf = Config.from_dict({k: v for k, v in config.items() if k != "network"})
    for key, value in (sets or {}).items():
        conf.set(key, value)
    exp = Experiment(conf, log=lambda text: None)
    if drop is None:
        return exp.run(folder)
    leftovers: list[str] = []

    def factory(setup: Any) -> DropOnce:
        comm, state_dir = exp._simulation(setup)
        leftovers.append(state_dir)
        return DropOnce(comm, *drop, kinds=drop_kinds)

    try:
        return exp.run(folder, communicator=factory)
    finally:
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)


class DropOnce:
    """A communicator whose ``clients`` fail in rounds ``first``..``last`` (what killing them does),
    at every request or only at requests of the given ``kinds``."""

    def __init__(self, inner: Any, clients: set[int], first: int, last: int, kinds: set[str] | None = None) -> None:
        self.inner, self.clients, self.first, self.last = inner, set(clients), first, last
        self.kinds = kinds
        self.traffic = inner.traffic

    def _drops(self, cid: int, msg: Any) -> bool:
        in_kind = self.kinds is None or msg.kind in self.kinds
        return cid in self.clients and self.first <= msg.round <= self.last and in_kind

    def exchange(self, messages: dict[int, Any]) -> Any:
        """The inner exchange without the dropped clients, which are reported as failed."""
        keep = {c: m for c, m in messages.items() if not self._drops(c, m)}
        result = self.inner.exchange(keep)
        result.failed.update({c: "killed" for c in messages if c not in keep})
        return result

    def close(self) -> None:
        """Close the inner communicator."""
        self.inner.close()


def metric_rows(run_dir: str | Path, keys: tuple[str, ...] = METRIC_KEYS) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl, restricted to ``keys``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: row.get(k) for k in keys} for row in map(json.loads, filter(str.strip, lines))]


def model_difference(a: str | Path, b: str | Path) -> float:
    """Largest absolute difference between the final models of two runs (0.0: bit-identical)."""
    from safetensors.torch import load_file

    pa, pb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    if pa.keys() != pb.keys():
        return float("inf")
    return max((float((pa[k].double() - pb[k].double()).abs().max()) for k in pa), default=0.0)


# -- many clients on one machine: a pre-imported parent that forks them ----------------------
class ClientZygote:
    """Starts ``fedguard client`` processes by forking one parent that has already imported
    what a client needs (torch, gRPC, fedguard), as a machine running one client has done
    before it connects. On one machine with 2 cores, 50 cold starts spend minutes importing
    torch one after another; across 50 machines they would run side by side. Each child is
    its own process (own pid, sockets, state, log file) running the CLI's client code.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        code = (
            "import json, os, sys\n"
            "import fedguard.runtime.network.client, fedguard.runtime.network.client_setup, fedguard.plugins\n"
            "import fedguard.cli\n"
            "print('ready', flush=True)\n"
            "for line in sys.stdin:\n"
            "    job = json.loads(line)\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        fd = os.open(job['log'], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)\n"
            "        os.dup2(fd, 1); os.dup2(fd, 2)\n"
            "        rc = 1\n"
            "        try:\n"
            "            rc = fedguard.cli.main(['client', *job['argv']])\n"
            "        finally:\n"
            "            sys.stdout.flush(); sys.stderr.flush(); os._exit(rc)\n"
            "    print(pid, flush=True)\n"
        )
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.popen = subprocess.Popen([sys.executable, "-c", code], cwd=folder, env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.popen.stdout is not None
        ready = self.popen.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"client zygote failed to start: {ready!r}")

    def start(self, args: list[str], log: Path) -> int:
        """Fork one client with ``fedguard client`` arguments ``args``; its pid."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps({"argv": args, "log": str(log)}) + "\n")
        self.popen.stdin.flush()
        return int(self.popen.stdout.readline())

    def close(self) -> None:
        """Stop the parent (its children run on until their server ends the run)."""
        if self.popen.stdin:
            self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
