"""benchmarks/bench_dp.py: settings are chosen on validation, never on test (issue 19), at delta <= 1e-5 (issue 13).

No training here (the --quick runs take minutes on a busy machine): the choice rule, the reading of the committed
dp-sample-tune line, and the workloads' configurations.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedguard import Config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dp.py"


def _trial(bench, setting, score, loss=1.0, error=None):
    return bench.Trial(setting, Config(), score=score, final={"val_loss": loss}, error=error)


def test_choice_is_the_best_validation_accuracy_ties_to_the_lower_loss_never_a_failed_run(bench):
    a = _trial(bench, {"server.lr": 0.3}, 0.90, loss=0.5)
    b = _trial(bench, {"server.lr": 1.0}, 0.90, loss=0.4)
    c = _trial(bench, {"server.lr": 3.0}, None, error="diverged")
    assert bench.choose([a, b, c]) is b
    assert bench.choose([c, _trial(bench, {"server.lr": 0.1}, 0.2)]).setting == {"server.lr": 0.1}
    with pytest.raises(RuntimeError, match="every candidate failed"):
        bench.choose([c])
    assert "test" not in json.dumps(a.row())  # a candidate's row carries validation figures only


def test_dp_sample_reads_the_committed_tune_line_and_says_when_there_is_none(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.tuned_sample() == (bench.SAMPLE_DEFAULTS, None)
    line = {"name": "dp-sample-tune", "chosen": {"train.lr": 1.5, "server.momentum": 0.8}, "quick": False,
            "date": "2026-12-03T09:00:00Z", "commit": "abc", "noise_multiplier": 1.76,
            "charged_noise_multiplier": 1.86, "tune_rounds": 30}
    (tmp_path / "dp-sample-tune.json").write_text("{}\n" + json.dumps(line) + "\n")
    chosen, source = bench.tuned_sample()
    assert chosen == {"train.lr": 1.5, "server.momentum": 0.8}
    assert source["commit"] == "abc" and source["charged_noise_multiplier"] == 1.86 and source["quick"] is False


def test_every_tuned_workload_holds_out_validation_at_delta_at_most_1e_5(bench):
    args = argparse.Namespace(data_dir="", quick=False)
    for cfg in (bench.DP_SAMPLE, bench.DP_CLIENT, bench.DP_CLIENT_SECAGG, bench.DP_FTRL):
        for extra in ({}, bench.QUICK_CLIENT if cfg is not bench.DP_SAMPLE else {"run.rounds": 3}):
            config = Config.load(None, bench._overrides(cfg, args, extra))  # every key exists and validates
            assert config.data.validation_fraction == bench.VALIDATION_FRACTION
            assert 0 < config.dp.delta <= 1e-5
    assert bench.DP_SAMPLE_LOCAL["data.validation_fraction"] == 0.0  # not chosen on validation: its line says so
    assert len(bench.SAMPLE_LR) >= 2 and len(bench.SAMPLE_MOMENTUM) >= 2 and len(bench.CLIENT_SERVER_LR) >= 2
    assert {"dp-sample-tune", "dp-sample", "dp-client", "dp-client-secagg", "dp-ftrl"} <= set(bench.BENCHMARKS)
    secagg = Config.load(None, bench._overrides(bench.DP_CLIENT_SECAGG, args))
    assert (secagg.dp.noise_placement, secagg.secure.mode, secagg.dp.adaptive_clip) == ("distributed", "secagg", False)
