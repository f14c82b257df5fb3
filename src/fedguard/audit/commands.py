"""The ``fedguard audit`` subcommand: ``inversion``, ``membership`` and ``dp`` on a configured run.

Each writes a JSON summary and its pictures to an audit folder (``--out``, default
``runs/audit-<what>-<time>``) and prints the headline figures.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["add_audit_commands"]


def _config(args: argparse.Namespace):
    import fedguard.plugins  # noqa: F401  (every family registers its config section)
    from fedguard.config import Config

    return Config.load(args.config, args.overrides)


def _out(args: argparse.Namespace, what: str) -> Path:
    out = Path(args.out or f"runs/audit-{what}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write(out: Path, name: str, summary: dict[str, Any]) -> None:
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")


def _cmd_inversion(args: argparse.Namespace) -> int:
    from .inversion import InvertingGradientsConfig
    from .inversion_audit import attack_run, noise_floor, write_outputs

    config = _config(args)
    ig = InvertingGradientsConfig(args.iterations, args.restarts, seed=config.run.seed)
    result = attack_run(config, images=args.images, ig=ig, dlg_iterations=args.dlg_iterations)
    floor = noise_floor(result.truth, config.run.seed)
    out = _out(args, "inversion")
    grid = write_outputs([result], out, floor)
    summary = {"run": result.label, **result.summary(),
               "noise_floor_psnr_median": round(sorted(floor[0])[len(floor[0]) // 2], 3)}
    _write(out, "inversion", summary)
    print(f"{result.label}: {result.attack} on {summary['images']} images, {summary['per_update']} per update")
    print(f"  PSNR median {summary['psnr_median']:.2f} dB, SSIM median {summary['ssim_median']:.3f} "
          f"(random image: {summary['noise_floor_psnr_median']:.2f} dB); labels right {summary['label_accuracy']:.0%}")
    print(f"  grid {grid}, figures {out / 'inversion.json'}")
    return 0


def _cmd_membership(args: argparse.Namespace) -> int:
    from .membership_audit import membership_run
    from .pictures import save_roc

    config = _config(args)
    out = _out(args, "membership")
    result = membership_run(config, out / "runs", shadows=args.shadows)
    summary = result.summary()
    _write(out, "membership", summary)
    roc = save_roc(result.curves, out / "membership_roc.png", f"epsilon {result.epsilon}")
    print(f"released model: train accuracy {result.train_accuracy:.3f}, test {result.target_accuracy}, "
          f"epsilon {result.epsilon}; {summary['members']} members vs {summary['nonmembers']} non-members")
    for name, row in summary["attacks"].items():
        low, high = row["auc_ci"]
        print(f"  {name:15s} AUC {row['auc']:.3f} [{low:.3f}, {high:.3f}]  TPR@0.1%FPR {row['tpr_at_0.001']:.4f}"
              f"  TPR@1%FPR {row['tpr_at_0.01']:.4f}")
    print(f"  ROC {roc}, figures {out / 'membership.json'} ({result.wall_s:.0f} s)")
    return 0


def _cmd_dp(args: argparse.Namespace) -> int:
    from .dp_audit import VARIANTS, audit_dp

    config = _config(args)
    variants = list(VARIANTS) if args.variant == "all" else [args.variant]
    rows = [audit_dp(config, v, args.canaries, args.magnitude).row() for v in variants]
    out = _out(args, "dp")
    _write(out, "dp_audit", {"audits": rows})
    for row in rows:
        verdict = "BROKEN: the claim is refuted" if row["epsilon_lower_bound"] > row["epsilon_claimed"] else \
            "consistent with the claim"
        print(f"{row['mode']:6s} {row['variant']:12s} ledger epsilon {row['epsilon_claimed']:.3f}  audited lower bound "
              f"{row['epsilon_lower_bound']:.3f} (95%, {row['correct']}/{row['guesses']} guesses right, "
              f"{row['canaries']} canaries): {verdict}")
    print(f"  figures {out / 'dp_audit.json'}")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML configuration of the run to attack (every option has a default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one option (repeatable)")
    p.add_argument("--out", help="audit folder (default: runs/audit-<what>-<time>)")


def add_audit_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``audit`` with its attacks to the ``fedguard`` command."""
    audit = sub.add_parser("audit", help="privacy red team: invert updates, infer membership, audit DP claims")
    attacks = audit.add_subparsers(dest="audit", required=True)
    inv = attacks.add_parser(
        "inversion", help="the curious server reconstructs client 0's images from its updates",
        description="iDLG for single-example updates, Inverting Gradients (Geiping et al. 2020) otherwise; the "
                    "update comes from the real client with the configured DP; with secure.mode != none the "
                    "attack sees only the sum of the round's updates.")
    _common(inv)
    inv.add_argument("--images", type=int, default=16, help="victim images attacked (default 16)")
    inv.add_argument("--iterations", type=int, default=1200, help="Inverting Gradients iterations per restart")
    inv.add_argument("--dlg-iterations", type=int, default=300, help="iDLG L-BFGS iterations per restart")
    inv.add_argument("--restarts", type=int, default=2, help="restarts (the lowest objective is kept)")
    inv.set_defaults(func=_cmd_inversion)
    mem = attacks.add_parser(
        "membership", help="loss threshold and offline LiRA against the released model and one client's update",
        description="The run trains on a random half of its training set (members; the other half are non-members); "
                    "shadow runs of the same configuration train on subsets of the test set (the attacker's data).")
    _common(mem)
    mem.add_argument("--shadows", type=int, default=4, help="shadow runs for offline LiRA (0: loss threshold only)")
    mem.set_defaults(func=_cmd_membership)
    dp = attacks.add_parser(
        "dp", help="one-run canary audit of the configured DP mechanism: empirical epsilon lower bound vs the ledger",
        description="Steinke, Nasr, Jagielski 2023: gradient canaries each included with probability 1/2, one run of "
                    "the configured dp.mode (sample or client), the lower bound at 95%% confidence beside the ledger's "
                    "epsilon. --variant no-clip / seeded-noise audits deliberately broken mechanisms.")
    _common(dp)
    dp.add_argument("--canaries", type=int, default=1000, help="number of canaries m (default 1000)")
    dp.add_argument("--magnitude", type=float, default=0.0, help="canary gradient norm (default 100 x dp.clip)")
    dp.add_argument("--variant", default="correct", choices=["correct", "no-clip", "seeded-noise", "all"],
                    help="the mechanism as configured, or a broken variant (all: the three)")
    dp.set_defaults(func=_cmd_dp)
