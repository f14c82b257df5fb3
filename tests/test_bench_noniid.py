"""benchmarks/bench_noniid.py: its figures, and the tune lines it agrees to read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_noniid.py"


def _write(path: Path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_noniid_benchmark_figures(bench):
    rows = [{"round": r, "test_accuracy": a, "clients_test_personalized_accuracy": p, "clients_test_accuracy": g}
            for r, a, p, g in [(1, 0.5, 0.6, 0.4), (2, 0.96, 0.8, 0.6), (3, 0.97, 1.0, 0.8)]]
    assert bench.summarise("fedavg", rows) == {"rounds_to_95": 2, "accuracy": 0.97}
    ditto = bench.summarise("ditto", rows)
    assert ditto["personalized_accuracy"] == pytest.approx(0.8)
    assert ditto["clients_global_accuracy"] == pytest.approx(0.6)
    assert bench.summarise("scaffold", rows[:1])["rounds_to_95"] is None
    assert sorted(bench.ALGORITHMS) == sorted(["fedavg", "fedprox", "scaffold", "feddyn", "ditto", "fedper"])
    assert {"noniid", "noniid-tune", "noniid-tune-server"} <= set(bench.BENCHMARKS)


def test_noniid_refuses_a_tune_line_of_another_workload(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    old = [w.replace("train.epochs=5", "train.epochs=2") for w in bench.WORKLOAD]
    lines = [{"chosen_lr": {"fedavg": 0.1}, "config": {"workload": old}, "date": "then"},
             {"chosen_lr": {"fedavg": 0.05, "scaffold": 0.03}, "config": {"workload": bench.WORKLOAD}}]
    _write(tmp_path / "noniid-tune.json", lines[:1])
    with pytest.raises(SystemExit, match="another workload"):
        bench._tuned_lr("fedavg")
    _write(tmp_path / "noniid-tune.json", lines)
    assert bench._tuned_lr("scaffold") == 0.03 and bench._tuned_lr("feddyn") == 0.05


def test_a_seed_that_never_reaches_the_target_counts_one_round_past_the_end(bench):
    by_seed = {"0": {"rounds_to_95": 20, "accuracy": 0.96}, "1": {"rounds_to_95": None, "accuracy": 0.90}}
    summary = bench.seed_summary(by_seed, rounds=35)
    assert summary == {"mean_rounds_to_95": 28.0, "never": 1, "mean_accuracy": pytest.approx(0.93)}


def test_the_server_rate_with_the_fewest_mean_rounds_wins_then_the_higher_accuracy(bench):
    runs = {"1.0": {"mean_rounds_to_95": 22.0, "mean_accuracy": 0.96},
            "1.5": {"mean_rounds_to_95": 19.5, "mean_accuracy": 0.94}}
    assert bench.choose_server_lr(runs) == 1.5
    runs["1.0"]["mean_rounds_to_95"] = 19.5
    assert bench.choose_server_lr(runs) == 1.0


def test_noniid_refuses_server_rates_chosen_at_other_local_rates(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    _write(tmp_path / "noniid-tune.json",
           [{"chosen_lr": {"fedavg": 0.1, "scaffold": 0.05}, "config": {"workload": bench.WORKLOAD}}])
    assert bench._tuned_server_lr("scaffold") is None, "no second stage yet: the workload's server.lr stays"
    server = {"chosen_server_lr": {"fedavg": 1.0, "scaffold": 1.5}, "config": {"workload": bench.WORKLOAD}}
    _write(tmp_path / "noniid-tune-server.json", [{**server, "local_lr": {"fedavg": 0.1, "scaffold": 0.03}}])
    with pytest.raises(SystemExit, match="chosen at local rates"):
        bench._tuned_server_lr("scaffold")
    _write(tmp_path / "noniid-tune-server.json", [{**server, "local_lr": {"fedavg": 0.1, "scaffold": 0.05}}])
    assert bench._tuned_server_lr("scaffold") == 1.5 and bench._tuned_server_lr("ditto") == 1.0


def test_the_server_tune_runs_and_chooses_from_its_grid(bench, tmp_path):
    import argparse

    args = argparse.Namespace(quick=True, data_dir="", out=str(tmp_path), set=[])
    line = bench.noniid_tune_server(args)
    assert set(line["chosen_server_lr"]) == set(bench.TUNE_ALGORITHMS)
    assert all(v in bench.TUNE_SERVER_LRS for v in line["chosen_server_lr"].values())
    for name in bench.TUNE_ALGORITHMS:
        assert set(line["runs"][name]) == {str(s) for s in bench.TUNE_SERVER_LRS}
        assert all(len(r["seeds"]) == 2 for r in line["runs"][name].values())
    seeds = sorted(p.name for p in (tmp_path / "noniid-tune-server" / "server-lr-1.5").iterdir())
    assert seeds == ["seed-0", "seed-1"], "each seed's run keeps its own folder"
    import tomllib

    config = tomllib.loads((tmp_path / "noniid-tune-server" / "server-lr-1.5" / "seed-1" / "shards" / "scaffold"
                            / "config.toml").read_text())
    assert config["run"]["seed"] == 1 and config["server"]["lr"] == 1.5, "the seed and the server rate reach the run"
