"""Benchmark entry point: ``python benchmarks/run.py NAME [--quick] [--data-dir DIR]``.

Each ``benchmarks/bench_*.py`` module defines ``BENCHMARKS = {name: function}``; a function
takes the parsed arguments and returns a dict of figures. The last line printed is one JSON
object with ``name``, the figures and the resolved configuration under ``config``, and the
provenance every committed figure needs: ``date`` (UTC), ``commit`` (``git describe``, with
``-dirty`` for uncommitted changes), ``machine`` (cores, Python, torch) and ``load_avg`` (the
1-minute load average before and after the run: other jobs on the cores slow wall-clock
figures, not accuracies).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> dict[str, object]:
    """Every registered benchmark by name."""
    found: dict[str, object] = {}
    for path in sorted(HERE.glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        found.update(getattr(module, "BENCHMARKS", {}))
    return found


def _git(*args: object) -> str:
    return subprocess.run(["git", *map(str, args)], cwd=HERE, capture_output=True, text=True, timeout=10,
                          check=False).stdout.strip()


def provenance() -> dict[str, object]:
    """Date, commit and machine of a result line (what makes a figure checkable later)."""
    try:
        commit = _git("describe", "--always", "--abbrev=12") or "unknown"
        # a benchmark writes its own figures under results/: only a change elsewhere makes the code differ
        if commit != "unknown" and _git("status", "--porcelain", "--untracked-files=no", "--", HERE.parent,
                                        f":(exclude){HERE / 'results'}"):
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = "absent"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch_version},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="benchmark to run")
    parser.add_argument("--list", action="store_true", help="list the benchmarks")
    parser.add_argument("--quick", action="store_true", help="a shrunken run for CI (README figures use full runs)")
    parser.add_argument(
        "--data-dir", default=str(HERE.parent.parent / "shared" / "data"), help="folder with mnist/ and fashion-mnist/"
    )
    parser.add_argument("--out", default=str(HERE.parent / "bench-out"), help="where runs write their folders")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one option of the workload"
    )
    args = parser.parse_args(argv)
    benches = discover()
    if args.list or not args.name:
        for name in sorted(benches):
            doc = (getattr(benches[name], "__doc__", "") or "").strip().splitlines()
            print(f"{name:18s} {doc[0] if doc else ''}")
        return 0
    if args.name not in benches:
        print(f"unknown benchmark {args.name!r}; known: {', '.join(sorted(benches))}", file=sys.stderr)
        return 2
    t0 = time.time()
    load_before = os.getloadavg()[0]
    figures = benches[args.name](args)
    figures.setdefault("name", args.name)
    figures.setdefault("quick", bool(args.quick))
    figures.setdefault("bench_wall_s", round(time.time() - t0, 2))
    figures.setdefault("load_avg", [round(load_before, 2), round(os.getloadavg()[0], 2)])
    for key, value in provenance().items():
        figures.setdefault(key, value)
    print(json.dumps({"name": figures.pop("name"), **figures}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
