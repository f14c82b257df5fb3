"""docs/deployment.md's commands run as written: a server and two clients over loopback TLS."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"


def _block() -> str:
    text = DOC.read_text()
    match = re.search(r"<!-- deployment-commands:.*?-->\s*```bash\n(.*?)```", text, re.S)
    assert match, "docs/deployment.md lost its marked command block"
    return match.group(1)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.timeout(300)
def test_deployment_commands_run_as_written(tmp_path: Path) -> None:
    script = _block()
    port = int(re.search(r"127\.0\.0\.1:(\d+)", script).group(1))  # type: ignore[union-attr]
    if not _port_free(port):
        pytest.skip(f"port {port} of the documented commands is in use on this machine")
    (tmp_path / "deploy.sh").write_text("set -e\n" + script)
    proc = subprocess.Popen(
        ["bash", "deploy.sh"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the documented deployment did not finish:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "runs/deploy/metrics.jsonl").read_text().splitlines()]
    assert [r["completed_clients"] for r in rows] == [2, 2, 2]
    assert "listening on 127.0.0.1:" in out and "TLS, client certificates required" in out
    assert out.count("the server says the run is over") == 2
    events = (tmp_path / "runs/deploy/network.jsonl").read_text().splitlines()
    assert len(events) == 6 and all(json.loads(e)["status"] == "ok" for e in events)
