"""``fedguard sweep``: run a grid of settings and rank them on validation data.

    fedguard sweep my.toml --set train.lr=0.01,0.05,0.1 --set server.optimizer=fedavg,fedavgm

Every ``--set`` whose value lists several comma-separated values is an axis of the grid (a
list-valued option takes its commas as its own items: one point); every other ``--set`` holds
for all runs. Each point is a full run (its own run folder under the sweep's folder) with a
validation split (``data.validation_fraction``; 0.1 when the configuration has none), ranked
by a validation figure of its summary (``--metric``, default ``val_<the task's primary
metric>``). The test figures stay in each run's summary.json; the table shows the test figure
of the chosen setting only, as a paper would report it. Writes ``sweep.json`` and ``sweep.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin, get_type_hints

from fedguard.config import Config
from fedguard.pipeline.base import ConfigurationError

#: the validation share a sweep uses when the configuration holds out none
DEFAULT_VALIDATION_FRACTION = 0.1
#: metrics ranked lowest first when given with --metric (losses, distances, bounds in nats)
LOWER_IS_BETTER_SUFFIXES = ("loss", "_fd", "nll", "mse", "elbo")


@dataclass
class SweepPoint:
    """One setting of the grid and what its run gave."""

    overrides: dict[str, str]
    run_dir: str = ""
    score: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Sweep:
    """A finished sweep: the figure it ranked by, its direction, the points best first."""

    metric: str
    higher_is_better: bool
    ranked: list[SweepPoint]

    def table(self) -> str:
        """The ranked grid as a Markdown table (see :func:`table`)."""
        return table(self.ranked, self.metric, self.higher_is_better)


def _is_list_option(config: Config, key: str) -> bool:
    section, _, name = key.partition(".")
    obj = config.sections.get(section)
    if obj is None or name not in {f.name for f in dataclasses.fields(obj)}:
        return False
    return get_origin(get_type_hints(type(obj))[name]) is list


def grid(config: Config, overrides: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(fixed overrides, one dict of axis values per grid point) from ``--set`` items."""
    fixed: list[str] = []
    axes: dict[str, list[str]] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigurationError(f"override {item!r} must look like section.key=value")
        values = [v.strip() for v in value.split(",") if v.strip()]
        if len(values) > 1 and not _is_list_option(config, key):
            if key in axes:
                raise ConfigurationError(f"{key} is given twice; list its values once: {key}=a,b,c")
            axes[key] = values
        else:
            fixed.append(f"{key}={value}")
    points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
    return fixed, points


def _label(i: int, point: dict[str, str]) -> str:
    text = "-".join(f"{k.split('.')[-1]}={v}" for k, v in point.items())
    safe = "".join(c if c.isalnum() or c in "=.-_" else "_" for c in text)
    return f"{i:03d}-{safe}"[:120]


def run_sweep(
    config_path: str | None,
    overrides: list[str],
    out_dir: Path,
    metric: str | None = None,
    lower_is_better: bool | None = None,
    log: Callable[[str], None] = print,
) -> Sweep:
    """Run every point of the grid (after checking all of them) and return them ranked, best first.

    ``metric`` defaults to ``val_<the task's primary metric>`` (with the task's direction); a
    given metric is ranked lowest first if ``lower_is_better`` or, when that is None, if its name
    ends like a loss or distance (see :data:`LOWER_IS_BETTER_SUFFIXES`)."""
    from fedguard.experiment import Experiment
    from fedguard.health import RunFailed

    base = Config.load(config_path, [])
    fixed, points = grid(base, overrides)
    base = Config.load(config_path, fixed)
    extra: list[str] = []
    if not base.data.validation_fraction:
        extra = [f"data.validation_fraction={DEFAULT_VALIDATION_FRACTION}"]
        log(f"the configuration holds out no validation data: the sweep uses data.validation_fraction="
            f"{DEFAULT_VALIDATION_FRACTION}")
    configs = [Config.load(config_path, [*fixed, *extra, *(f"{k}={v}" for k, v in p.items())]) for p in points]
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[SweepPoint] = []
    higher = True
    for i, (point, config) in enumerate(zip(points, configs, strict=True)):
        run_dir = out_dir / _label(i, point)
        log(f"sweep {i + 1}/{len(points)}: {' '.join(f'{k}={v}' for k, v in point.items()) or '(one point)'}")
        result = SweepPoint(point, str(run_dir))
        experiment = Experiment(config, quiet=True)
        try:
            run = experiment.run(run_dir=run_dir)
            final = run.final
        except RunFailed as exc:
            final, result.error = exc.result.final if exc.result else {}, str(exc).split(". ")[0]
        if metric is None:
            primary, higher = experiment.primary_metric
            metric = f"val_{primary}"
        elif lower_is_better is not None:
            higher = not lower_is_better
        else:
            higher = not metric.endswith(LOWER_IS_BETTER_SUFFIXES)
        result.figures = {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        value = final.get(metric) if metric else None
        usable = result.error is None and isinstance(value, (int, float)) and math.isfinite(value)
        result.score = float(value) if usable else None  # a failed run is ranked last, whatever it scored
        if result.score is None and result.error is None:
            known = ", ".join(sorted(k for k in final if k.startswith("val_")))
            result.error = f"no {metric} in the summary (known: {known})"
        results.append(result)
    ranked = sorted(results, key=lambda r: (r.score is None, -(r.score or 0.0) if higher else (r.score or 0.0)))
    write_sweep(out_dir, ranked, metric or "", higher)
    return Sweep(metric or "", higher, ranked)


def write_sweep(out_dir: Path, ranked: list[SweepPoint], metric: str, higher: bool) -> None:
    """sweep.json (every point, ranked) and sweep.md (the table)."""
    payload = {"metric": metric, "higher_is_better": higher, "points": [dataclasses.asdict(p) for p in ranked]}
    (out_dir / "sweep.json").write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / "sweep.md").write_text(table(ranked, metric, higher) + "\n")


def table(ranked: list[SweepPoint], metric: str, higher: bool) -> str:
    """The ranked grid as a Markdown table; the test figure only for the chosen setting."""
    keys = sorted({k for p in ranked for k in p.overrides})
    test_key = "test_" + metric.removeprefix("val_")
    head = ["rank", *keys, f"{metric} ({'higher' if higher else 'lower'} is better)", "run folder"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, p in enumerate(ranked, 1):
        score = f"{p.score:.4f}" if p.score is not None else f"failed: {p.error}"
        lines.append("| " + " | ".join([str(i), *(p.overrides.get(k, "") for k in keys), score, p.run_dir]) + " |")
    best = ranked[0] if ranked and ranked[0].score is not None else None
    if best is not None and test_key in best.figures:
        lines += ["", f"Chosen on validation: rank 1; its {test_key} (test set read once, after its last round): "
                      f"{best.figures[test_key]:.4f}."]
    return "\n".join(lines)
