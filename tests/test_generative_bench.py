"""benchmarks/bench_generative.py: the MAE's and the GAN's settings are chosen on validation, never on test
(issue 19).

The choice rules, the reading of the committed tune lines, and tiny ``--quick`` tunes (a few seconds: a
shrunken model on 600 images) run against a test set that raises when anything touches it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import fedguard.experiment as experiment_module
from fedguard import Config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generative.py"
TINY = ["data.max_train_examples=600", "data.num_clients=3", "run.workers=1", "run.threads=1",
        "train.batch_size=32", "train.max_steps=3"]
TINY_GAN = [*TINY, "gan.hidden=16", "gan.latent=8", "gan.fd_epochs=1"]
TINY_MAE = [*TINY, "mae.dim=16", "mae.depth=1", "mae.heads=2", "mae.decoder_dim=8", "mae.probe_iters=10",
            "mae.eval_examples=50"]


class Untouchable:
    """A test set that fails the test as soon as anything reads it."""

    def __getattr__(self, name):
        raise AssertionError(f"the test set was read ({name})")

    def __len__(self):
        raise AssertionError("the test set was read (len)")


@pytest.fixture
def no_test_set(monkeypatch, tmp_path):
    """Every dataset load hands out the real training images and an :class:`Untouchable` test set."""
    real = experiment_module.load_dataset
    monkeypatch.setattr(experiment_module, "load_dataset", lambda *a, **k: (real(*a, **k)[0], Untouchable()))
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))


def _args(tmp_path, overrides):
    return argparse.Namespace(quick=True, data_dir="", out=str(tmp_path / "out"), set=list(overrides))


def _candidate(bench, setting, final=None, rows=None, error=None):
    return bench.Candidate(setting, Config(), final=final or {}, rows=rows or [], error=error)


def test_gan_choice_is_the_lowest_validation_fd_over_lrs_and_rounds_never_a_failed_run(bench):
    a = _candidate(bench, {"gan.lr": 2e-4}, rows=[{"round": 5, "test_fd": 90.0}, {"round": 10, "test_fd": 70.0}])
    b = _candidate(bench, {"gan.lr": 4e-4}, rows=[{"round": 5, "test_fd": 70.0}, {"round": 10, "test_fd": 80.0},
                                                  {"round": 11}])
    failed = _candidate(bench, {"gan.lr": 8e-4}, rows=[{"round": 5, "test_fd": 1.0}], error="diverged")
    chosen, rnd, fd = bench.choose_gan([a, b, failed])
    assert (chosen, rnd, fd) == (b, 5, 70.0)  # the tie at 70 goes to the earlier round
    assert bench.fd_curve(b) == {5: 70.0, 10: 80.0}
    with pytest.raises(RuntimeError, match="every candidate failed"):
        bench.choose_gan([failed])


def test_mae_choice_is_the_best_validation_probe_ties_to_the_lower_masked_mse(bench):
    a = _candidate(bench, {"mae.lr": 5e-4}, {"probe_acc": 0.95, "final_masked_mse": 0.05})
    b = _candidate(bench, {"mae.lr": 1e-3}, {"probe_acc": 0.95, "final_masked_mse": 0.04})
    failed = _candidate(bench, {"mae.lr": 1e-2}, {"probe_acc": 0.99}, error="diverged")
    assert bench.choose_mae([a, b, failed]) is b
    with pytest.raises(RuntimeError, match="every candidate failed"):
        bench.choose_mae([failed, _candidate(bench, {}, {"probe_acc": float("nan")})])


def test_main_benchmarks_read_the_committed_tune_line_and_say_when_there_is_none(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    assert bench.tuned("gan-tune", bench.GAN_OLD) == (bench.GAN_OLD, None)
    full = argparse.Namespace(quick=False)
    assert bench._selection(bench.GAN_OLD, None, full)["validation_selected"] is False
    line = {"name": "gan-tune", "chosen": {"gan.lr": 8e-4, "run.rounds": 35}, "quick": False, "commit": "abc",
            "date": "2026-12-03T12:00:00Z", "tune_rounds": 40, "validation_fd": 55.0, "candidates": []}
    (tmp_path / "gan-tune.json").write_text("{}\n" + json.dumps(line) + "\n")
    chosen, source = bench.tuned("gan-tune", bench.GAN_OLD)
    assert chosen == {"gan.lr": 8e-4, "run.rounds": 35}
    assert source == {"date": "2026-12-03T12:00:00Z", "commit": "abc", "quick": False, "tune_rounds": 40,
                      "validation_fd": 55.0}
    assert bench._selection(chosen, source, full) == {"validation_selected": True, "tuned": chosen, "tune": source}
    assert bench._selection(chosen, {**source, "quick": True}, full)["validation_selected"] is False
    assert bench._selection(chosen, source, argparse.Namespace(quick=True))["validation_selected"] is False


def test_workloads_hold_out_validation_and_the_grids_have_choices(bench):
    args = argparse.Namespace(quick=False, data_dir="", out="bench-out", set=[])
    for task, old in ((bench.MAE, bench.MAE_OLD), (bench.GAN, bench.GAN_OLD)):
        config = bench._config(args, {**task, **old}, "x")  # every key exists and validates
        assert config.data.validation_fraction == bench.VALIDATION_FRACTION
        candidate = bench._config(args, task, "x", bench.TUNE_RUN)
        assert candidate.data.validation_fraction == 0 and candidate.run.baseline == "none"
    assert bench._config(args, bench.MAE, "x").mae.probe_l2_grid == [1e-4, 1e-3, 1e-2]
    assert len(bench.GAN_TUNE_LR) >= 2 and len(bench.MAE_TUNE) >= 2
    assert all(set(s) == set(bench.MAE_OLD) for s in bench.MAE_TUNE)
    assert {"mae-tune", "mae", "gan-tune", "gan"} <= set(bench.BENCHMARKS)


def test_quick_gan_tune_scores_on_validation_and_never_reads_test(bench, tmp_path, no_test_set):
    line = bench.gan_tune(_args(tmp_path, TINY_GAN))
    assert set(line["chosen"]) == {"gan.lr", "run.rounds"} and line["chosen"]["run.rounds"] in (1, 2)
    assert line["chosen"]["gan.lr"] in bench.GAN_TUNE_LR
    assert line["validation_examples"] == 60 and line["train_examples"] == 540 and line["fd_samples"] == 60
    assert len(line["candidates"]) == 2 and line["validation_fd"] > 0
    for row in line["candidates"]:
        assert set(row["validation_fd_per_round"]) == {1, 2} and row["error"] is None
    assert "test" not in json.dumps(line["candidates"])  # validation figures only
    assert line["validation_fd"] == min(min(r["validation_fd_per_round"].values()) for r in line["candidates"])


def test_quick_mae_tune_scores_the_probe_on_validation_and_never_reads_test(bench, tmp_path, no_test_set):
    line = bench.mae_tune(_args(tmp_path, TINY_MAE))
    assert line["chosen"] in bench.MAE_TUNE[:2] and set(line["chosen"]) == set(bench.MAE_OLD)
    assert line["validation_examples"] == 60 and line["train_examples"] == 540 and line["tune_rounds"] == 2
    assert 0 <= line["validation_probe_acc"] <= 1 and 0 <= line["validation_pixel_probe_acc"] <= 1
    assert line["probe_l2"] in (1e-4, 1e-3, 1e-2)
    assert [c["setting"] for c in line["candidates"]] == bench.MAE_TUNE[:2]
    assert "test" not in json.dumps(line["candidates"])
    assert line["config"]["mae"]["extra_pools"] == [] and line["config"]["data"]["validation_fraction"] == 0


def test_quick_gan_reports_its_selection_and_keeps_its_keys(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)  # no tune line: the old settings, said
    small = ["gan.final_samples=100", "gan.eval_samples=50", "run.report=false"]
    line = bench.bench_gan(_args(tmp_path, [*TINY_GAN, *small]))
    for key in ("fed_fd", "central_fd", "real_fd", "fd_classifier_test_acc", "noise_fd", "fd_samples",
                "fed_median_round_s", "fed_val_fd", "central_val_fd"):
        assert isinstance(line[key], float), key
    assert line["validation_selected"] is False and line["tuned"] == bench.GAN_OLD and line["tune"] is None
    assert line["config"]["data"]["validation_fraction"] == bench.VALIDATION_FRACTION
    assert line["config"]["run"]["rounds"] == 3  # --quick's rounds, not the tuned count
