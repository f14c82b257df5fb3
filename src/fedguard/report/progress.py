"""The live progress bar and the closing summary table (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RunProgress:
    """Round, clients, loss, the primary metric, epsilon and time left, updated each round."""

    def __init__(self, rounds: int, first: int, primary: str, enabled: bool = True) -> None:
        self.enabled, self.primary = enabled, primary
        self.progress = Progress(
            TextColumn("round {task.completed:>3.0f}/{task.total:.0f}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            disable=not enabled,
        )
        self.task_id = self.progress.add_task("rounds", total=rounds, completed=first - 1, status="starting")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def update(self, row: dict[str, Any]) -> None:
        """Advance one round and show its figures."""
        parts = [f"clients {row['completed_clients']}/{row['sampled_clients']}"]
        if row.get("train_loss") is not None:
            parts.append(f"loss {row['train_loss']:.4f}")
        key = f"test_{self.primary}"
        if row.get(key) is not None:
            parts.append(f"{self.primary} {row[key]:.4f}")
        if row.get("epsilon") is not None:
            parts.append(f"eps {row['epsilon']:.3g}")
        self.progress.update(self.task_id, advance=1, status="  ".join(parts))


def print_summary(final: dict[str, Any], run_dir: Path, enabled: bool = True) -> None:
    """A table of the final figures and where the run folder is."""
    if not enabled:
        return
    table = Table(title="fedguard run summary")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in final.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"run folder: {run_dir}")
