"""DP-FTRL with tree aggregation (Kairouz et al. 2021): the tree, the epoch order, the ledger, a run."""

from __future__ import annotations

import math

import pytest
import torch

from fedguard import ConfigurationError, Experiment
from fedguard.core.pipeline import ServerContext
from fedguard.privacy.ftrl import EpochSampler, TreeLedger, TreeNoise, dyadic_nodes

TINY = ["run.progress=false", "run.report=false", "run.workers=1", "data.max_train_examples=160",
        "train.batch_size=20", "run.eval_every=0", "server.weighting=uniform"]


def test_dyadic_nodes_partition_the_prefix():
    for t in range(1, 70):
        nodes = dyadic_nodes(t)
        covered = [i for level, index in nodes for i in range(index << level, (index + 1) << level)]
        assert covered == list(range(t)) and len(nodes) == bin(t).count("1")
    assert dyadic_nodes(6) == [(2, 0), (1, 2)]


def test_every_client_once_per_epoch():
    epochs = EpochSampler(10, 3, seed=1)
    assert epochs.rounds_per_epoch == 4
    for e in range(3):
        seen = [c for r in range(4 * e + 1, 4 * e + 5) for c in epochs(r)]
        assert sorted(seen) == list(range(10))


class _Clip:
    def clip_of_round(self, round: int) -> float:
        return 1.0


def test_released_prefix_sums_carry_the_tree_noise():
    """Zero updates: the model after step t moved by the tree noise of [1, t] / m, whose variance is
    (number of nodes) (z S)^2 / m^2; steps telescope to the prefix."""
    m, z, d = 4, 2.0, 20_000
    step = TreeNoise(_Clip(), z, m, EpochSampler(16, m, 0))
    total = torch.zeros(d)
    for t in range(1, 5):
        ctx = ServerContext(t, [], [0, 1, 2, 3], 16, torch.Generator())
        total += step.apply({"w": torch.zeros(d)}, ctx)["w"]
        nodes = len(dyadic_nodes(t))
        assert float(total.var()) == pytest.approx(nodes * (z / m) ** 2, rel=0.05)
    assert len(step.nodes) == 4  # [1,1] [1,2] [3,3] [1,4], each drawn once; t=3 reuses [1,2]
    ctx = ServerContext(5, [], [0, 1, 2, 3], 16, torch.Generator())
    step.apply({"w": torch.zeros(d)}, ctx)
    assert step.epoch == 1 and len(step.nodes) == 1  # a new tree each epoch


def test_ledger_is_dp_accountings_tree_event():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ledger = TreeLedger(1e-5, 1.5, EpochSampler(100, 10, 0))
    for r in range(1, 26):
        ledger.record_round(ServerContext(r, [], [], 100, torch.Generator()), [])
    acc = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_SPECIAL)
    acc.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(dp_accounting.SingleEpochTreeAggregationDpEvent(1.5, 10), 2),
        dp_accounting.SingleEpochTreeAggregationDpEvent(1.5, 5)]))
    assert ledger.report()["epsilon"] == pytest.approx(acc.get_epsilon(1e-5))
    assert ledger.report()["epsilon_server"] == math.inf


def test_ftrl_run(tmp_path):
    result = Experiment(overrides=[*TINY, "data.num_clients=8", "server.clients_per_round=4", "run.rounds=3",
                                   "dp.mode=ftrl", "dp.noise_multiplier=1.0"]).run(run_dir=tmp_path / "ftrl")
    eps = [r["epsilon"] for r in result.rows]
    assert 0 < eps[0] < eps[2] and result.rows[-1]["dp_rounds_per_tree"] == 2
    assert [r["sampled_clients"] for r in result.rows] == [4, 4, 4]
    with pytest.raises(ConfigurationError, match="dp.mode=ftrl"):
        Experiment(overrides=[*TINY, "dp.mode=ftrl", "dp.target_epsilon=3"]).assemble()
