"""What a run prints while it runs: a live progress bar on a terminal, one plain line per round
otherwise, the run log, and the closing summary table with units.

``run.progress = false`` turns off the per-round display only; the summary and the run folder's
path always print unless the run is quiet (``fedguard run --quiet``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

#: what the summary's figures mean, where the name does not say it all
FIGURE_NOTES: dict[str, str] = {
    "rounds": "rounds completed",
    "final_metrics_s": "task's final metrics after the last round (e.g. MAE probes)",
    "median_round_s": "one round: training and aggregation",
    "total_bytes_sent": "server to clients, all rounds",
    "total_bytes_received": "clients to server, all rounds",
    "epsilon": "privacy spent (worst party)",
    "epsilon_model": "against whoever sees only released models",
    "epsilon_server": "against the server (inf: it sees the un-noised updates)",
}


def human_bytes(n: float) -> str:
    """``n`` bytes in B, kB, MB or GB (powers of 1000), e.g. ``'1.23 MB'``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def format_figure(key: str, value: Any) -> str:
    """A summary figure with its unit: bytes as kB/MB/GB (exact count beside), ``*_s`` in seconds."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)) and "bytes" in key:
        return f"{human_bytes(value)} ({int(value):,} B)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (int, float)) and key.endswith("_s"):
        return f"{value:.3g} s" if value < 100 else f"{value:,.0f} s"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def round_line(row: dict[str, Any], rounds: int, primary: str) -> str:
    """One round as a short line: clients, loss, the primary metric (validation or test), epsilon, time."""
    parts = [f"clients {row['completed_clients']}/{row['sampled_clients']}"]
    if row.get("train_loss") is not None and math.isfinite(row["train_loss"]):
        parts.append(f"loss {row['train_loss']:.4f}")
    for prefix in ("val", "test"):
        value = row.get(f"{prefix}_{primary}")
        if value is not None:
            parts.append(f"{prefix} {primary} {value:.4f}")
            break
    if row.get("epsilon") or row.get("epsilon_server"):
        parts.append(epsilon_text(row))
    if row.get("aborted"):
        parts.append(f"aborted: {row['aborted']}")
    return "  ".join(parts)


def epsilon_text(row: dict[str, Any]) -> str:
    """``eps model X server Y``: epsilon against model users beside epsilon against the server (issue 13);
    ``eps X`` where the ledger reports one figure."""
    model = row.get("epsilon_model", row.get("epsilon")) or 0.0
    if "epsilon_server" not in row:
        return f"eps {model:.3g}"
    server = row["epsilon_server"]
    return f"eps model {model:.3g} server {math.inf if server is None else server:.3g}"


class RunProgress:
    """Per-round display: ``bar`` (rich, on a terminal), ``lines`` (one plain line per round:
    logs and pipes), or ``off``. :meth:`log` prints a run-log line without breaking the bar."""

    def __init__(self, rounds: int, first: int, primary: str, mode: str = "bar",
                 console: Console | None = None) -> None:
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"mode must be bar, lines or off; got {mode!r}")
        self.mode, self.primary, self.rounds = mode, primary, rounds
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("round {task.completed:>3.0f}/{task.total:.0f}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            disable=mode != "bar",
        )
        self.task_id = self.progress.add_task("rounds", total=rounds, completed=first - 1, status="starting")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, row: dict[str, Any]) -> None:
        """Advance one round and show its figures."""
        status = round_line(row, self.rounds, self.primary)
        if self.mode == "bar":
            self.progress.update(self.task_id, advance=1, status=status)
        elif self.mode == "lines":
            seconds = row.get("seconds")
            took = f"  {seconds:.2f} s" if isinstance(seconds, (int, float)) else ""
            print(f"round {row['round']}/{self.rounds}  {status}{took}", flush=True)

    def log(self, text: str) -> None:
        """A run-log line, printed above the bar (or as a plain line)."""
        if self.mode == "bar":
            self.progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, flush=True)


def summary_table(final: dict[str, Any], title: str) -> Table:
    """The final figures with units, and what the less obvious ones mean."""
    table = Table(title=title)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    for key, value in final.items():
        if not _is_text(value):
            table.add_row(key, format_figure(key, value), FIGURE_NOTES.get(key, ""))
    return table


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 30


def print_summary(final: dict[str, Any], run_dir: Path, enabled: bool = True, title: str = "fedguard run summary",
                  console: Console | None = None) -> None:
    """A table of the final figures and where the run folder is (nothing when ``enabled`` is False)."""
    if not enabled:
        return
    console = console or Console()
    console.print(summary_table(final, title))
    for key, value in final.items():
        if _is_text(value):
            console.print(f"{key}: {value}", markup=False, highlight=False)
    console.print(f"run folder: {run_dir}", markup=False, highlight=False, soft_wrap=True)
