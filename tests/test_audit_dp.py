"""One-run DP audit (issue 17): Steinke et al. 2023's bound against closed forms, and the audit catching
deliberately broken mechanisms (clipping off, noise from the known seed) while passing the correct one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from fedguard import Config
from fedguard.audit.canary import audit, epsilon_lower_bound, p_value
from fedguard.audit.dp_audit import audit_dp
from fedguard.cli import main


def test_p_value_without_delta_is_the_binomial_tail():
    q = 1 / (1 + math.exp(-1.0))
    assert p_value(100, 60, 45, 1.0, 0.0) == pytest.approx(float(stats.binom.sf(44, 60, q)))
    assert p_value(100, 60, 45, 1.0, 1e-3) > p_value(100, 60, 45, 1.0, 0.0)


def test_p_value_matches_the_papers_loop():
    # Steinke et al. 2023, Appendix D, written as their loop; the module computes it vectorised
    def reference(m, r, v, eps, delta):
        q = 1 / (1 + math.exp(-eps))
        alpha, total = 0.0, 0.0
        for i in range(1, v + 1):
            total += stats.binom.pmf(v - i, r, q)
            if total > i * alpha:
                alpha = total / i
        return min(stats.binom.sf(v - 1, r, q) + alpha * delta * 2 * m, 1.0)

    for args in [(1000, 200, 190, 2.0, 1e-5), (1000, 1000, 600, 0.5, 1e-3), (50, 20, 20, 3.0, 1e-2)]:
        assert p_value(*args) == pytest.approx(reference(*args), rel=1e-9)


def test_all_guesses_right_matches_the_closed_form():
    # v = r: the p-value is q^r, so the bound is log(q / (1 - q)) with q = 0.05^(1/r)
    for r in (10, 100, 1000):
        q = 0.05 ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_chance_guessing_gives_no_bound():
    assert epsilon_lower_bound(1000, 1000, 500, 1e-6) == 0.0
    assert epsilon_lower_bound(1000, 0, 0, 1e-6) == 0.0


def test_perfect_scores_refute_small_epsilon_and_random_scores_do_not():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    assert audit(included.astype(float), included, 1e-6).epsilon_lower_bound > 4.0
    assert audit(rng.normal(size=1000), included, 1e-6).epsilon_lower_bound < 0.5


SAMPLE = ["run.progress=false", "run.report=false", "data.max_train_examples=400", "data.num_clients=4",
          "data.partition=iid", "train.batch_size=20", "train.epochs=3", "train.momentum=0", "train.lr=0.1",
          "dp.mode=sample", "dp.clip=1", "dp.target_epsilon=2", "dp.delta=1e-6", "run.rounds=1"]
CLIENT = ["run.progress=false", "run.report=false", "data.max_train_examples=400", "data.num_clients=20",
          "server.clients_per_round=4", "server.weighting=uniform", "run.rounds=20", "dp.mode=client", "dp.clip=1",
          "dp.target_epsilon=2", "dp.delta=1e-6", "dp.noise_placement=central"]


@pytest.mark.parametrize("overrides", [SAMPLE, CLIENT], ids=["dp-sgd", "dp-fedavg"])
def test_the_audit_catches_broken_mechanisms_and_passes_the_correct_one(overrides):
    config = Config.load(None, overrides)
    correct = audit_dp(config, "correct", canaries=1000)
    assert 1.5 < correct.epsilon_claimed <= 2.0 + 1e-6
    assert correct.guess.epsilon_lower_bound < correct.epsilon_claimed
    for variant in ("no-clip", "seeded-noise"):
        broken = audit_dp(config, variant, canaries=1000)
        assert broken.epsilon_claimed == pytest.approx(correct.epsilon_claimed)
        assert broken.guess.epsilon_lower_bound > broken.epsilon_claimed, variant


def test_cli_audit_dp(tmp_path, capsys):
    out = tmp_path / "dp"
    args = ["audit", "dp", "--canaries", "200", "--out", str(out)]
    for item in SAMPLE:
        args += ["--set", item]
    assert main(args) == 0
    rows = json.loads((out / "dp_audit.json").read_text())["audits"]
    assert rows[0]["variant"] == "correct" and rows[0]["epsilon_lower_bound"] < rows[0]["epsilon_claimed"]
    assert "ledger epsilon" in capsys.readouterr().out
