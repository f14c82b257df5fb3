"""The algorithm contract and the algorithms on it, checked against the papers' update formulas.

A quadratic task (loss 0.5 ||w - a||^2, gradient w - a) makes each local step computable by
hand, so each client and server rule is compared with its formula in the paper.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedguard import Experiment
from fedguard.algorithms.ditto import Ditto
from fedguard.algorithms.feddyn import FedDyn
from fedguard.algorithms.fedper import FedPer
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.algorithms.scaffold import Scaffold
from fedguard.algorithms.server_optimizers import FedAvgServer
from fedguard.core.algorithm import LocalTraining, ModelDelta, prefixed
from fedguard.core.pipeline import ClientContext, ConfigurationError, PrivacyLedger, ServerContext, UpdatePipeline
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Task

LR, STEPS = 0.1, 4


class Quadratic(Task):
    """loss(w) = 0.5 ||w - a||^2 whatever the batch; a two-tensor 'model' (body w, head b)."""

    def __init__(self, a: float = 1.0) -> None:
        self.a = a

    def build_model(self) -> nn.Module:
        model = nn.Module()
        model.w = nn.Parameter(torch.zeros(3))
        model.b = nn.Parameter(torch.zeros(2))
        return model

    def loss(self, model, params, batch):
        return 0.5 * sum(((p - self.a) ** 2).sum() for p in params.values())

    def evaluate(self, model, params, data):
        return {"loss": float(self.loss(model, params, None))}


def local(task: Task | None = None) -> LocalTraining:
    data = ArrayDataset(torch.zeros(STEPS, 1), torch.zeros(STEPS, dtype=torch.long), "d")
    trainer = LocalSGD(lr=LR, momentum=0.0, sampler=ShuffledEpochs(1, 1))
    task = task or Quadratic()
    return LocalTraining(task, task.build_model(), data, trainer)


def context(state=None) -> ClientContext:
    return ClientContext(0, 1, STEPS, torch.Generator().manual_seed(0), {}, dict(state or {}))


def params(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value), "b": torch.full((2,), value)}


def sgd(start: torch.Tensor, grad) -> torch.Tensor:
    y = start.clone()
    for _ in range(STEPS):
        y = y - LR * grad(y)
    return y


class _DP(PrivacyLedger):
    name = "dp"


class _SendsMore(ModelDelta):
    name = "more"

    def sends_extra(self) -> bool:
        return True


def test_dp_over_extra_payload_parts_is_refused():
    from fedguard.algorithms.fedavg import FedAvg

    with pytest.raises(ConfigurationError, match="beyond the model update"):
        UpdatePipeline(FedAvg(), FedAvgServer(), ledger=_DP(), algorithm=_SendsMore()).validate()
    UpdatePipeline(FedAvg(), FedAvgServer(), ledger=_DP(), algorithm=ModelDelta()).validate()  # model update only
    UpdatePipeline(FedAvg(), FedAvgServer(), algorithm=_SendsMore()).validate()  # no DP: nothing to account
    UpdatePipeline(FedAvg(), FedAvgServer(), ledger=_DP(), algorithm=FedDyn()).validate()  # FedDyn: update only


def test_model_delta_sends_trained_minus_global():
    w = params(0.5)
    result = ModelDelta().client_update(w, context(), local())
    for k in w:
        torch.testing.assert_close(result.payload[k], sgd(w[k], lambda u: u - 1.0) - w[k])
    assert result.state == {}


def test_fedprox_name_needs_its_mu():
    with pytest.raises(ConfigurationError, match="prox_mu"):
        Experiment(overrides=["algorithm.name=fedprox", "run.progress=false"]).assemble()
    setup = Experiment(overrides=["algorithm.name=fedprox", "train.prox_mu=0.1", "run.progress=false"]).assemble()
    assert setup.pipeline.algorithm.name == "fedprox" and setup.pipeline.algorithm.mu == 0.1


def test_scaffold_client_follows_option_ii():
    x, c, ci = params(0.5), params(0.2), params(-0.1)
    received = {**x, **prefixed("scaffold/c", c)}
    result = Scaffold().client_update(received, context(prefixed("scaffold/ci", ci)), local())
    for k in x:
        y = sgd(x[k], lambda v, k=k: (v - 1.0) + c[k] - ci[k])  # g_i(y) - c_i + c
        ci_new = ci[k] - c[k] + (x[k] - y) / (STEPS * LR)
        torch.testing.assert_close(result.payload[k], y - x[k])
        torch.testing.assert_close(result.payload[f"scaffold/dc/{k}"], ci_new - ci[k])
        torch.testing.assert_close(result.state[f"scaffold/ci/{k}"], ci_new)


def test_scaffold_server_moves_c_by_the_sampled_share():
    algo = Scaffold()
    x = params(1.0)
    state = algo.server_init(x)
    aggregate = {**params(0.3), **prefixed("scaffold/dc", params(0.4))}
    ctx = ServerContext(1, [0, 1], [0, 1], 8, torch.Generator())
    new_x, new_state = algo.server_apply(x, state, aggregate, FedAvgServer(1.0), ctx)
    torch.testing.assert_close(new_x["w"], torch.full((3,), 1.3))
    torch.testing.assert_close(new_state["scaffold/c/w"], torch.full((3,), 0.4 * 2 / 8))


def test_feddyn_client_and_server_follow_algorithm_1():
    alpha, theta, g = 0.5, params(0.2), params(0.3)
    algo = FedDyn(alpha)
    result = algo.client_update(theta, context(prefixed("feddyn/g", g)), local())
    for k in theta:
        y = sgd(theta[k], lambda v, k=k: (v - 1.0) - g[k] + alpha * (v - theta[k]))
        torch.testing.assert_close(result.payload[k], y - theta[k])
        torch.testing.assert_close(result.state[f"feddyn/g/{k}"], g[k] - alpha * (y - theta[k]))
    # server: h = h - alpha/m sum_k dtheta_k ; theta = mean theta_k - h / alpha
    state = algo.server_init(theta)
    mean = params(0.1)
    ctx = ServerContext(1, [0, 1], [0, 1], 4, torch.Generator())
    new_theta, new_state = algo.server_apply(theta, state, mean, FedAvgServer(1.0), ctx)
    h = -alpha * (2 / 4) * 0.1
    torch.testing.assert_close(new_state["feddyn/h/w"], torch.full((3,), h))
    torch.testing.assert_close(new_theta["w"], torch.full((3,), 0.2 + 0.1 - h / alpha))


def test_ditto_personal_model_is_pulled_towards_the_global_one():
    lam, w, v = 0.5, params(0.0), params(2.0)
    result = Ditto(lam).client_update(w, context(prefixed("ditto/v", v)), local())
    for k in w:
        torch.testing.assert_close(result.payload[k], sgd(w[k], lambda u: u - 1.0) - w[k])  # FedAvg's update
        expected = sgd(v[k], lambda u, k=k: (u - 1.0) + lam * (u - w[k]))
        torch.testing.assert_close(result.state[f"ditto/v/{k}"], expected)


def test_fedper_keeps_the_head_on_the_client():
    algo, w, head = FedPer(head=1), params(0.0), {"b": torch.full((2,), 5.0)}
    received = dict(reversed(list(w.items())))  # a message's tensors are not in the model's order
    result = algo.client_update(received, context(prefixed("fedper/head", head)), local())
    assert set(result.payload) == {"w"}
    torch.testing.assert_close(result.state["fedper/head/b"], sgd(head["b"], lambda u: u - 1.0))
    assert set(algo.payload_like(w)) == {"w"}
    new, _ = algo.server_apply(w, {}, {"w": torch.ones(3)}, FedAvgServer(1.0), None)
    torch.testing.assert_close(new["b"], w["b"])  # the global head is never moved by clients


TINY = ["run.progress=false", "run.report=false", "run.rounds=3", "run.threads=1", "data.num_clients=4",
        "data.max_train_examples=400", "train.max_steps=3", "run.eval_every=0"]


@pytest.mark.parametrize("name", ["scaffold", "feddyn"])
def test_stateful_algorithms_run_end_to_end_with_workers(tmp_path, name):
    """Client state survives between rounds in the worker processes' shared state folder."""
    result = Experiment(overrides=[*TINY, f"algorithm.name={name}", "run.workers=2"]).run(run_dir=tmp_path / name)
    assert len(result.rows) == 3 and all(not r["aborted"] for r in result.rows)
    serial = Experiment(overrides=[*TINY, f"algorithm.name={name}", "run.workers=1"]).run(run_dir=tmp_path / "s")
    assert all(torch.equal(result.params[k], serial.params[k]) for k in result.params)


@pytest.mark.parametrize("name", ["ditto", "fedper"])
def test_personalised_algorithms_report_both_accuracies(tmp_path, name):
    over = [*TINY, f"algorithm.name={name}", "run.workers=1", "data.client_test_fraction=0.2", "run.eval_every=1"]
    result = Experiment(overrides=over).run(run_dir=tmp_path / name)
    last = result.rows[-1]
    assert 0.0 <= last["clients_test_personalized_accuracy"] <= 1.0 and "clients_test_accuracy" in last
    assert result.final["clients_test_personalized_accuracy"] == last["clients_test_personalized_accuracy"]


def test_scaffold_with_dp_is_refused_at_configuration():
    over = ["algorithm.name=scaffold", "dp.mode=client", "server.weighting=uniform", "run.progress=false"]
    with pytest.raises(ConfigurationError, match="beyond the model update"):
        Experiment(overrides=over).assemble()


@pytest.mark.timeout(480)
def test_scaffold_over_the_network_equals_the_simulation(tmp_path):
    """Each network client keeps its control variate in its own state folder across rounds; the
    model comes out bit for bit as the simulation's."""
    from safetensors.torch import load_file

    from fedguard.runtime.network.harness import LocalDeployment, metric_rows, simulate

    config = {
        "run": {"name": "net", "rounds": 3, "seed": 1, "report": False, "progress": False, "workers": "2"},
        "data": {"num_clients": 2, "max_train_examples": 300},
        "train": {"max_steps": 3},
        "algorithm": {"name": "scaffold"},
    }
    dep = LocalDeployment(tmp_path / "net", clients=2, config=config)
    server = dep.start_server(tmp_path / "run")
    try:
        server.wait_for("listening on", 60)
        clients = [dep.start_client(c) for c in range(2)]
        assert server.wait(300) == 0, "\n".join(server.lines[-20:])
        assert [c.wait(60) for c in clients] == [0, 0]
    finally:
        dep.stop_all()
    sim = simulate(config, tmp_path / "sim")
    assert metric_rows(tmp_path / "run") == metric_rows(sim.run_dir)
    net, ref = load_file(str(tmp_path / "run" / "model.safetensors")), load_file(str(sim.run_dir / "model.safetensors"))
    assert all(torch.equal(net[k], ref[k]) for k in ref)


def test_registry_serves_every_configured_name():
    from fedguard.algorithms.registry import ALGORITHM_BUILDERS
    from fedguard.config import ALGORITHMS

    assert sorted(ALGORITHM_BUILDERS) == sorted(ALGORITHMS)


def test_pipeline_hooks_apply_in_the_stated_order_whatever_the_import_order():
    from fedguard import builders

    def user_hook(parts, ctx):
        return None

    hooks = [user_hook, *builders.PIPELINE_HOOKS]
    ranked = [builders.ordered(hooks).index(h) for h in hooks]
    modules = [h.__module__.split(".")[1] if h.__module__.startswith("fedguard.") else "user"
               for h in builders.ordered(list(reversed(hooks)))]
    families = [m for m in modules if m != "user"]
    assert families == sorted(families, key=["attacks", "privacy", "secure", "robust"].index)
    assert modules[-1] == "user" and sorted(ranked) == list(range(len(hooks)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["secure.mode=secagg", "robust.rule=median"], "robust.rule=median needs each client's update in the clear"),
        (["secure.mode=secagg", "attack.name=ipm", "attack.count=1"], "omniscient attack"),
        (["dp.mode=client", "server.weighting=uniform", "robust.rule=median"], "is not a sum"),
    ],
)
def test_one_compatibility_table_refuses_before_any_family_builds(overrides, match):
    from fedguard.builders import check_compatibility
    from fedguard.config import Config

    config = Config.load(None, overrides)
    with pytest.raises(ConfigurationError, match=match):
        check_compatibility(config)


@pytest.mark.parametrize("secure", [["secure.mode=secagg", "server.weighting=uniform"], ["secure.mode=ckks"]])
def test_scaffold_payload_goes_through_secure_aggregation(tmp_path, secure):
    """The control-variate part of the payload is masked (or encrypted) and summed like the model update."""
    over = [*TINY, "algorithm.name=scaffold", "run.workers=1", "run.rounds=2", "secure.clip=5", *secure]
    result = Experiment(overrides=over).run(run_dir=tmp_path / "run")
    assert all(r["completed_clients"] == 4 and r["aborted"] is None for r in result.rows)
