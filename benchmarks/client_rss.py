"""Peak RSS of ONE ``fedguard client`` process through one fit round of a net-50-like run (issue 19).

    python benchmarks/client_rss.py data|dir [REPEATS] [--zygote] [--data-dir DIR]

The server serves full MNIST split among 50 clients (TLS with client certificates, as net-50)
with ``network.min_clients = 1``; one cold ``python -m fedguard.cli client`` joins as client 0,
with its partition as an ``.npz`` file (``data``: what net-50's clients do) or taking it from
the dataset folder (``dir``: ``--data-dir``). Its VmHWM is read once it has sent its
``fit_result``; then both processes are stopped. With ``--zygote`` the client is forked from
the harness's pre-imported parent (:class:`~fedguard.runtime.network.harness.ClientZygote`), as
net-50 starts its 50 clients. Prints one JSON line: each repeat's peak and
their median, in MiB. Not a ``run.py`` benchmark: a check for the 250 MiB target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.runtime.network.harness import ClientZygote, LocalDeployment


def _config(data_dir: str) -> dict[str, Any]:
    return {
        "run": {"name": "net", "rounds": 1, "seed": 0, "report": False, "progress": False, "eval_every": 5},
        "data": {"num_clients": 50, "max_train_examples": 0, "dataset": "mnist", "data_dir": data_dir},
        "network": {"round_deadline_s": 600.0, "wait_timeout_s": 900.0, "min_clients": 1},
    }


def _export_client_0(config: dict[str, Any], path: Path) -> Path:
    """Client 0's partition as an .npz file (as net-50 exports each client's)."""
    from fedguard.config import Config
    from fedguard.experiment import Experiment

    part = Experiment(Config.from_dict({k: v for k, v in config.items() if k != "network"})).assemble().client_data(0)
    np.savez(path, x=part.x.numpy(), y=part.y.numpy())
    return path


def peak_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM), in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    assert match, f"no VmHWM for pid {pid}"
    return round(int(match.group(1)) / 1024, 1)


def _forked_peak(dep: LocalDeployment, folder: Path, extra: list[str]) -> float:
    """Fork client 0 from a zygote; its peak RSS once its reply is sent (from its log)."""
    zygote, log = ClientZygote(folder), folder / "client-0.log"
    pid = zygote.start([*dep.client_args(0), *extra], log)
    try:
        end = time.monotonic() + 300
        while not (log.exists() and re.search(r"round 1: fit_result sent", log.read_text())):
            if time.monotonic() > end:
                raise TimeoutError(f"client 0 sent no fit_result within 300 s; see {log}")
            time.sleep(0.2)
        return peak_mib(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        zygote.close()


def one_client_peak(folder: Path, config: dict[str, Any], extra: list[str], zygote: bool = False) -> float:
    """Serve one round to client 0 alone; its peak RSS once its reply is sent."""
    dep = LocalDeployment(folder, 50, config)
    try:
        server = dep.start_server(folder / "run")
        server.wait_for("listening on", 300)
        if zygote:
            return _forked_peak(dep, folder, extra)
        client = dep.start_client(0, extra)
        client.wait_for(r"round 1: fit_result sent", 300)
        return peak_mib(client.pid)
    finally:
        dep.stop_all()


def main() -> None:
    """Measure and print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["data", "dir"])
    parser.add_argument("repeats", type=int, nargs="?", default=3)
    parser.add_argument("--zygote", action="store_true", help="fork the client from a pre-imported parent (net-50)")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data"))
    args = parser.parse_args()
    config = _config(str(Path(args.data_dir).resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        extra = ["--data-dir", config["data"]["data_dir"]]
        if args.mode == "data":
            extra = ["--data", str(_export_client_0(config, root / "client-0.npz"))]
        peaks = [one_client_peak(root / f"run-{i}", config, extra, args.zygote) for i in range(args.repeats)]
    print(json.dumps({"mode": args.mode, "zygote": args.zygote, "peak_rss_mib": peaks,
                      "median": statistics.median(peaks)}))


if __name__ == "__main__":
    main()
