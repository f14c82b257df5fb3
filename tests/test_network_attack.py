"""``fedguard attack`` from the outside: each adversary of issue 14 against a live loopback
deployment (real server and client processes, TLS with client certificates), each scenario
refused or contained, and the command's exit code and report saying so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedguard.runtime.network.attack import IN_PROCESS, LIVE, summary

PLAINTEXT = "idle-streams,revoked-client,oversized-pre-auth,num-examples-takeover"


def _attack(tmp_path: Path, only: str, timeout: float) -> tuple[int, list[str], dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedguard.cli", "attack", "--out", str(tmp_path / "attack"), "--only", only],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("attack ")]
    return proc.returncode, lines, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)  # one deployment of three client processes; slow on a loaded 2-core machine
def test_network_adversaries_are_refused_by_a_live_deployment(tmp_path: Path) -> None:
    rc, lines, report = _attack(tmp_path, PLAINTEXT, 540)
    outcomes = {r["scenario"]: r["outcome"] for r in report["results"]}
    assert rc == 0 and report["all_stopped"], lines
    assert outcomes == dict.fromkeys(PLAINTEXT.split(","), "refused")
    assert len(lines) == 4 and all(": REFUSED - " in line for line in lines)
    rows = {r["scenario"]: r for r in report["results"]}
    assert rows["idle-streams"]["join_s_under_attack"] < 10
    assert rows["oversized-pre-auth"]["server_rss_growth_mb"] < 64
    assert report["hostile_messages"] == 64
    refusals = json.loads((tmp_path / "attack" / "plaintext" / "run" / "refusals.json").read_text())
    assert refusals["by_kind"]["identity"] >= 13 and refusals["by_kind"]["busy"] >= 40


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three SecAgg+/CKKS deployments of five client processes
def test_hostile_secure_clients_are_contained_by_a_live_deployment(tmp_path: Path) -> None:
    rc, lines, report = _attack(tmp_path, "secagg-weight-slot,secagg-garbage-shares,ckks-wrong-scale", 1440)
    assert rc == 0 and report["contained"] == 3, lines


def test_every_issue_14_attack_is_a_named_scenario() -> None:
    assert len(set(LIVE) | set(IN_PROCESS)) == 10
    assert summary([])["all_stopped"]
    out = subprocess.run([sys.executable, "-m", "fedguard.cli", "attack", "--list"], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [*LIVE, *IN_PROCESS]
