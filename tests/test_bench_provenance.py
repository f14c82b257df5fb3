"""A result line's provenance (benchmarks/run.py): the commit is marked -dirty when code differs from it, not
when the benchmark has rewritten its own figures under benchmarks/results/."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner(here: Path):
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HERE = here
    return module


def test_commit_is_dirty_for_code_changes_only(tmp_path) -> None:
    bench = tmp_path / "benchmarks"
    (bench / "results").mkdir(parents=True)
    (bench / "bench_x.py").write_text("X = 1\n")
    (bench / "results" / "x.png").write_bytes(b"old")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    runner = _runner(bench)
    clean = runner.provenance()["commit"]
    assert clean and not clean.endswith("-dirty") and clean != "unknown"
    (bench / "results" / "x.png").write_bytes(b"new figure")
    assert runner.provenance()["commit"] == clean
    (bench / "bench_x.py").write_text("X = 2\n")
    assert runner.provenance()["commit"] == clean + "-dirty"
