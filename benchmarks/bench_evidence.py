"""The README's first row: ``fedguard run`` with every default, as a user runs it.

``default-run`` starts the ``fedguard run`` command in a fresh process (``--quiet``, its own run
folder) under ``/usr/bin/time`` three times and reports the test accuracy (the same in every
repeat: the run is seeded), the median wall-clock seconds with min and max, the CPU seconds and
the peak resident memory of the largest process (the server; each worker is smaller).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPEATS = 3


def _one_run(out: Path, extra: list[str]) -> dict[str, float]:
    """One ``fedguard run`` process: its accuracy, wall and CPU seconds, peak RSS."""
    stats = out / "time.txt"
    cmd = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(stats),
           sys.executable, "-m", "fedguard.cli", "run", "--quiet", "--out", str(out / "run"), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fedguard run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall, user, system, max_kb = stats.read_text().split()[-4:]
    summary = json.loads((out / "run" / "summary.json").read_text())
    return {"accuracy": summary["test_accuracy"], "wall_s": float(wall), "cpu_s": float(user) + float(system),
            "peak_rss_mb": int(max_kb) / 1024, "rounds": summary["rounds"]}


def default_run(args: argparse.Namespace) -> dict[str, object]:
    """``fedguard run`` with its defaults: accuracy, wall s (median of 3, min, max), CPU s, peak RSS."""
    extra = [f"--set={item}" for item in args.set]
    if args.quick:
        extra += ["--set=run.rounds=2"]
    repeats = 1 if args.quick else REPEATS
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-default-run-") as tmp:
        for i in range(repeats):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            runs.append(_one_run(folder, extra))
    walls = [r["wall_s"] for r in runs]
    return {
        "name": "default-run",
        "accuracy": runs[0]["accuracy"],
        "accuracies": [r["accuracy"] for r in runs],
        "rounds": runs[0]["rounds"],
        "wall_s": statistics.median(walls),
        "min_wall_s": min(walls),
        "max_wall_s": max(walls),
        "cpu_s": statistics.median(r["cpu_s"] for r in runs),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "repeats": repeats,
        "command": "fedguard run --quiet" + "".join(f" {e}" for e in extra),
        "validation_selected": False,
    }


BENCHMARKS = {"default-run": default_run}
