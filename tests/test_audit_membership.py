"""Membership inference (issue 17): ROC figures against known values, LiRA's score, the attack on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedguard.audit.membership import lira_offline_scores, loss_threshold_scores
from fedguard.audit.roc import auc, bootstrap_auc, roc_curve, summarize, tpr_at_fpr
from fedguard.cli import main


def test_auc_known_values():
    assert auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auc(np.array([1.0, 3.0]), np.array([2.0, 4.0])) == pytest.approx(0.25)
    assert auc(np.array([1.0]), np.array([1.0])) == pytest.approx(0.5)  # a tie counts half


def test_auc_is_the_mann_whitney_probability():
    rng = np.random.default_rng(0)
    m, n = rng.normal(0.5, 1, 300), rng.normal(0, 1, 400)
    pairs = (m[:, None] > n[None, :]).mean()
    assert auc(m, n) == pytest.approx(pairs, abs=1e-12)


def test_tpr_at_low_fpr_and_the_curve_ends():
    members, nonmembers = np.arange(10, 20, dtype=float), np.arange(0, 1000, dtype=float) / 100
    fpr, tpr = roc_curve(members, nonmembers)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert tpr_at_fpr(members, nonmembers, 0.001) == 1.0
    assert tpr_at_fpr(np.zeros(5), np.ones(5), 0.01) == 0.0


def test_bootstrap_interval_covers_chance_for_identical_distributions():
    rng = np.random.default_rng(1)
    low, high = bootstrap_auc(rng.normal(size=500), rng.normal(size=500), resamples=200)
    assert low < 0.5 < high
    s = summarize(rng.normal(2, 1, 500), rng.normal(size=500), resamples=200)
    assert s.auc > 0.9 and s.auc_ci[0] > 0.85 and s.row()["tpr_at_0.01"] > 0.1


def test_lira_offline_flags_an_example_above_its_out_distribution():
    shadow = np.array([[0.0, 5.0], [1.0, 6.0], [-1.0, 4.0]])  # example 0 is hard, example 1 easy
    scores = lira_offline_scores(np.array([2.0, 5.0]), shadow, fixed_variance=False)
    assert scores[0] > scores[1]  # the same raw confidence gap means more on the hard example
    assert list(loss_threshold_scores(np.array([0.1, 2.0]))) == [-0.1, -2.0]


def test_cli_audit_membership_on_a_tiny_run(tmp_path):
    out = tmp_path / "m"
    args = ["audit", "membership", "--shadows", "1", "--out", str(out)]
    for item in ["run.progress=false", "run.report=false", "data.max_train_examples=400", "data.num_clients=2",
                 "data.partition=iid", "run.rounds=2", "train.batch_size=50", "task.model=mlp"]:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((out / "membership.json").read_text())
    assert set(summary["attacks"]) == {"loss_threshold", "lira_offline", "client_update"}
    assert 0.0 <= summary["attacks"]["loss_threshold"]["auc"] <= 1.0
    assert (out / "membership_roc.png").stat().st_size > 0
