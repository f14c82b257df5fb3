"""metrics.jsonl: one JSON line per round, flushed as it is written (nothing is lost on a crash)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsWriter:
    """Appends rows to ``metrics.jsonl``."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        self._file = self.path.open("a" if append else "w")

    def write(self, row: dict[str, Any]) -> None:
        """Write one row (NaN and infinities become null) and flush."""
        self._file.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
