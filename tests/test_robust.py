"""Robust aggregation rules (plaintext) and their refusal next to secure aggregation."""

from __future__ import annotations

import pytest
import torch

from fedguard import ConfigurationError, Experiment
from fedguard.cli import main as cli_main
from fedguard.robust.aggregators import RobustAggregator
from fedguard.robust.defenses import Chain, Median, MultiKrum
from fedguard.robust.rules import coordinate_median, krum_scores, multi_krum, trimmed_mean

SMALL = ["run.progress=false", "run.report=false", "data.max_train_examples=1200", "data.num_clients=6"]


def test_median_and_trimmed_mean_ignore_outliers() -> None:
    stack = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, -1000.0]])
    assert torch.equal(coordinate_median(stack), torch.tensor([2.5, 15.0]))
    assert torch.equal(coordinate_median(stack[:3]), torch.tensor([2.0, 20.0]))
    assert torch.equal(trimmed_mean(stack, 1), torch.tensor([2.5, 15.0]))
    assert torch.equal(trimmed_mean(stack, 0), stack.mean(dim=0))
    with pytest.raises(ValueError, match="leaves none"):
        trimmed_mean(stack[:2], 1)


def test_krum_picks_a_central_update_and_multi_krum_averages_the_best() -> None:
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(6, 50, generator=gen) * 0.1 + 1.0
    attackers = torch.full((2, 50), -50.0)
    stack = torch.cat([honest, attackers])
    scores = krum_scores(stack, 2)
    assert int(scores.argmin()) < 6 and scores[6:].min() > scores[:6].max()
    mean, kept = multi_krum(stack, 2, 6)
    assert kept == list(range(6)) and torch.allclose(mean, honest.mean(dim=0))
    with pytest.raises(ValueError, match="n > 2f \\+ 2"):
        krum_scores(stack[:4], 1)


def test_robust_aggregator_combines_parameter_dicts() -> None:
    updates = [{"a": torch.full((2, 2), float(v)), "b": torch.full((3,), float(-v))} for v in (1, 2, 3, 100)]
    delta, _ = RobustAggregator(Chain(Median())).combine(updates)
    assert torch.equal(delta["a"], torch.full((2, 2), 2.5)) and torch.equal(delta["b"], torch.full((3,), -2.5))
    updates.append({"a": torch.full((2, 2), 2.5), "b": torch.full((3,), -2.5)})  # Krum with f=1 needs n > 4
    delta, figures = RobustAggregator(Chain(MultiKrum(1))).combine(updates)
    assert figures["robust_kept"] == 1 and float(delta["a"][0, 0]) in (1.0, 2.0, 2.5, 3.0)


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "multi-krum"])
def test_robust_rules_train_in_the_engine(tmp_path, rule: str) -> None:
    overrides = [*SMALL, "run.rounds=2", "data.partition=iid", f"robust.rule={rule}", "robust.byzantine=1"]
    result = Experiment(overrides=overrides).run(run_dir=tmp_path / rule)
    assert all(r["aborted"] is None and r["completed_clients"] == 6 for r in result.rows)
    assert result.rows[-1]["train_loss"] < result.rows[0]["train_loss"]
    assert result.final["test_accuracy"] > 0.3  # ten classes: 0.1 by chance


@pytest.mark.parametrize("mode", ["secagg", "ckks"])
@pytest.mark.parametrize("rule", ["median", "krum"])
def test_robust_rule_with_secure_mode_is_refused_at_configuration(mode: str, rule: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        Experiment(overrides=[*SMALL, f"secure.mode={mode}", f"robust.rule={rule}", "robust.byzantine=1"]).assemble()
    text = str(err.value)
    assert f"robust.rule={rule}" in text and f"secure.mode={mode}" in text
    assert "robust.rule=none" in text and "clipping" in text and "secure.mode=none" in text


def test_cli_refuses_the_combination_before_training(tmp_path, capsys) -> None:
    sets = [arg for item in [*SMALL, "secure.mode=secagg", "robust.rule=median"] for arg in ("--set", item)]
    code = cli_main(["run", "--out", str(tmp_path / "run"), *sets])
    assert code == 2
    err = capsys.readouterr().err
    assert "robust.rule=median" in err and "secure.mode=secagg" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran or was written
