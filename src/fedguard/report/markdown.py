"""The run report: report.md with the configuration, a summary and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedguard.report.plots import plot_curves
from fedguard.report.progress import format_figure


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: the report's curves: caption and file name under plots/
CURVES = [
    ("Held-out metrics per round", "metrics.png"),
    ("Loss per round", "loss.png"),
    ("Privacy spent per round", "epsilon.png"),
]


def curve_pictures(run_dir: Path) -> list[tuple[str, Path]]:
    """The curves :func:`write_report` drew for ``run_dir`` (those with data)."""
    return [(caption, run_dir / "plots" / name) for caption, name in CURVES if (run_dir / "plots" / name).exists()]


def write_report(
    run_dir: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    figures: list[tuple[str, Path]],
    config_toml: str,
    primary_metric: str,
) -> Path:
    """Write report.md (and its plots under plots/) into ``run_dir``."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    metric_keys = sorted({k for r in rows for k in r if k.startswith(("test_", "val_"))})
    loss_keys = ["train_loss"] + [k for k in metric_keys if "loss" in k or "nll" in k]
    other = [k for k in metric_keys if k not in loss_keys]
    made: list[tuple[str, Path | None]] = [
        (CURVES[0][0], plot_curves(rows, other, plots / CURVES[0][1], _held_out_title(metric_keys), "value")),
        (CURVES[1][0], plot_curves(rows, loss_keys, plots / CURVES[1][1], "Loss", "loss")),
        (CURVES[2][0], plot_curves(rows, ["epsilon", "epsilon_server"], plots / CURVES[2][1], "Privacy", "epsilon")),
    ]
    lines = ["# fedguard run report", "", "## Summary", ""]
    if any(k.startswith("val_") for k in metric_keys):
        lines += ["Settings are to be chosen on the validation figures (`val_*`, per round); the test set was "
                  "evaluated once, after the last round (`test_*`).", ""]
    lines += ["| figure | value |", "|---|---|"]
    lines += [f"| {k} | {format_figure(k, v)} |" for k, v in summary.items()]
    lines += ["", "## Curves", ""]
    for caption, path in made:
        if path is not None:
            lines += [f"### {caption}", "", f"![{caption}]({path.relative_to(run_dir)})", ""]
    if figures:
        lines += ["## Pictures", ""]
        for caption, path in figures:
            lines += [f"### {caption}", "", f"![{caption}]({Path(path).relative_to(run_dir)})", ""]
    lines += [
        "## Rounds",
        "",
        _round_table(rows, primary_metric),
        "",
        "## Configuration",
        "",
        "```toml",
        config_toml.strip(),
        "```",
        "",
    ]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _held_out_title(keys: list[str]) -> str:
    return "Validation metrics" if any(k.startswith("val_") for k in keys) else "Test metrics"


def _round_table(rows: list[dict[str, Any]], primary: str) -> str:
    keys = [
        "round",
        "sampled_clients",
        "completed_clients",
        "train_loss",
        f"val_{primary}",
        f"test_{primary}",
        "epsilon",
        "epsilon_server",
        "bytes_sent",
        "bytes_received",
        "seconds",
    ]
    keys = [k for k in keys if any(r.get(k) is not None for r in rows) or (k == "epsilon_server" and
                                                                          any(k in r for r in rows))]
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r, k) for k in keys) + " |")
    return "\n".join(out)


def _cell(row: dict[str, Any], key: str) -> str:
    """A round-table cell; an epsilon_server written as null (JSON has no infinity) reads ``inf``."""
    if row.get(key) is not None:
        return _fmt(row[key])
    return "inf" if key == "epsilon_server" and key in row else ""


def write_comparison(run_dir: Path, federated: dict[str, Any], centralized: dict[str, Any]) -> Path:
    """Append a federated-vs-centralized table to report.md and save comparison.json."""
    import json

    keys = [k for k in federated if k in centralized and isinstance(federated[k], (int, float))]
    lines = ["", "## Federated vs centralized", "", "| metric | federated | centralized |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(federated[k])} | {_fmt(centralized[k])} |" for k in keys]
    lines += ["", "Centralized: one client holding all the training data, same rounds and local epochs.", ""]
    report = run_dir / "report.md"
    with report.open("a") as fh:
        fh.write("\n".join(lines))
    from fedguard.report.metrics import json_safe

    (run_dir / "comparison.json").write_text(json.dumps(
        json_safe({"federated": federated, "centralized": centralized}), indent=1, default=str, allow_nan=False))
    return report
