"""The ``fedguard`` command: run experiments, inspect partitions, print the config reference.

Exit codes: 0 success; 1 a run that failed (training diverged, or no round updated the model;
its run folder keeps everything up to the failure); 2 a configuration or data error, found
before anything runs (one line on stderr, no run folder).
"""

from __future__ import annotations

import argparse
import sys

from fedguard import __version__
from fedguard.config import Config, reference_markdown
from fedguard.pipeline.base import ConfigurationError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML configuration file (every option has a default)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one option, e.g. --set run.rounds=5 (repeatable)",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from fedguard.experiment import Experiment

    config = Config.load(args.config, args.overrides)
    Experiment(config, quiet=args.quiet).run(run_dir=args.out, resume=args.resume)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    import fedguard.plugins  # noqa: F401  (every family registers its config section)
    from fedguard.sweep import run_sweep

    out = Path(args.out or f"runs/sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    log = (lambda _text: None) if args.quiet else (lambda text: print(text, flush=True))
    lower = True if args.lower_is_better else None
    sweep = run_sweep(args.config, args.overrides, out, args.metric, lower, log)
    if not args.quiet:
        print(sweep.table())
        print(f"sweep folder: {out} (sweep.md, sweep.json, one run folder per setting)")
    return 0 if any(p.score is not None for p in sweep.ranked) else 1


def _cmd_partition(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedguard.data.partition import describe_partition, label_matrix
    from fedguard.experiment import Experiment
    from fedguard.report.partition_plot import plot_label_heatmap

    exp = Experiment(Config.load(args.config, args.overrides))
    train, _ = exp.load_data()
    parts = exp.make_partitions(train)
    print(describe_partition(train.labels, parts, train.num_classes))
    if args.plot:
        plot_label_heatmap(label_matrix(train.labels, parts, train.num_classes), Path(args.plot))
        print(f"heatmap written to {args.plot}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import fedguard.experiment  # noqa: F401  (registers every section)

    if args.reference:
        print(reference_markdown())
    else:
        print(Config.load(args.config, args.overrides).to_toml())
    return 0


def _add_audit(sub: argparse._SubParsersAction) -> None:
    """``fedguard audit``: the privacy red team (issue 17)."""
    from fedguard.audit.commands import add_audit_commands

    add_audit_commands(sub)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fedguard`` command."""
    parser = argparse.ArgumentParser(prog="fedguard", description="Privacy-preserving federated learning.")
    parser.add_argument("--version", action="version", version=f"fedguard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a federated experiment (defaults: embedded MNIST subset)")
    _add_config_args(run)
    run.add_argument("--out", help="run folder (default: <run.out_dir>/<name>-<time>)")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a checkpointed run")
    run.add_argument("--quiet", "-q", action="store_true",
                     help="print nothing but errors (run.progress=false turns off only the per-round display)")
    run.set_defaults(func=_cmd_run)
    sweep = sub.add_parser(
        "sweep", help="run a grid of settings (--set key=a,b,c) and rank them on validation data",
        description="Each --set with several comma-separated values is an axis of the grid; each point is a full "
                    "run with a validation split (data.validation_fraction, 0.1 if unset), ranked by a validation "
                    "figure. Writes sweep.md and sweep.json.")
    _add_config_args(sweep)
    sweep.add_argument("--metric", help="summary figure to rank by (default: val_<the task's primary metric>)")
    sweep.add_argument("--lower-is-better", action="store_true", help="rank --metric lowest first")
    sweep.add_argument("--out", help="sweep folder (default: runs/sweep-<time>)")
    sweep.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    sweep.set_defaults(func=_cmd_sweep)
    part = sub.add_parser("partition", help="print (and plot) how the data is split among clients")
    _add_config_args(part)
    part.add_argument("--plot", metavar="PNG", help="write a label heatmap")
    part.set_defaults(func=_cmd_partition)
    conf = sub.add_parser("config", help="print the resolved configuration, or the full reference")
    _add_config_args(conf)
    conf.add_argument("--reference", action="store_true", help="every option with type, default, help")
    conf.set_defaults(func=_cmd_config)
    from fedguard.runtime.network.commands import add_network_commands

    add_network_commands(sub)
    _add_audit(sub)
    from fedguard.runtime.network.attack import add_attack_command

    add_attack_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; configuration and data errors print one clear line and exit 2, a failed
    run (diverged, or no round updated the model) prints why and exits 1."""
    from fedguard.data.registry import DatasetNotFoundError
    from fedguard.health import RunFailed

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigurationError, DatasetNotFoundError) as exc:
        print(f"fedguard: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fedguard: run failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
