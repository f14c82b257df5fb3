"""The clients' learning-rate schedule: the factor per round, how it travels, what it changes."""

import math

import pytest
import torch
from torch import nn

from fedguard import ArrayDataset, Experiment
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.algorithms.lr_schedule import lr_scale, read_lr_scale, schedule_fit_config
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.mae import MAETask

SMALL = [
    "run.progress=false",
    "run.report=false",
    "run.workers=1",
    "data.max_train_examples=600",
    "data.num_clients=3",
    "run.rounds=4",
    "train.batch_size=32",
]


def test_cosine_factor_follows_the_formula():
    rounds = 10
    assert lr_scale("constant", 7, rounds) == 1.0
    assert lr_scale("cosine", 1, rounds) == 1.0
    assert lr_scale("cosine", 6, rounds) == pytest.approx(0.5)
    assert lr_scale("cosine", 10, rounds) == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 10)))
    factors = [lr_scale("cosine", r, rounds) for r in range(1, rounds + 1)]
    assert all(a > b > 0 for a, b in zip(factors[:-1], factors[1:], strict=True))


def test_constant_schedule_sends_nothing_and_unknown_is_refused():
    assert schedule_fit_config("constant", 5) is None
    assert schedule_fit_config("cosine", 4)(3) == {"lr_scale": pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))}
    with pytest.raises(ValueError, match="lr_schedule"):
        schedule_fit_config("linear", 5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0, True, "0.5"])
def test_a_bad_lr_scale_in_a_fit_message_is_refused(bad):
    with pytest.raises(ValueError, match="lr_scale"):
        read_lr_scale({"lr_scale": bad})
    assert read_lr_scale({}) == 1.0


def _tiny_data(n=64):
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def test_scaled_sgd_equals_sgd_at_the_scaled_rate():
    task, data = ClassificationTask(lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10))), _tiny_data()
    model = task.build_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    base = LocalSGD(lr=0.1, momentum=0.9, sampler=ShuffledEpochs(1, 16))
    halved = LocalSGD(lr=0.05, momentum=0.9, sampler=ShuffledEpochs(1, 16))
    a, _ = base.scaled(0.5).train(task, model, params, data, torch.Generator().manual_seed(1))
    b, _ = halved.train(task, model, params, data, torch.Generator().manual_seed(1))
    assert base.scaled(0.5).lr == 0.1
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_tasks_adam_follows_the_schedule_too():
    data = _tiny_data(32)
    trainer = LocalSGD(sampler=ShuffledEpochs(1, 16))
    full, half = MAETask((1, 28, 28), lr=2e-3), MAETask((1, 28, 28), lr=1e-3)
    model = full.build_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    a, _ = full.local_train(model, params, data, trainer.scaled(0.5), torch.Generator().manual_seed(1))
    b, _ = half.local_train(model, params, data, trainer, torch.Generator().manual_seed(1))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_cosine_run_sends_the_factor_and_changes_training(tmp_path):
    cosine = Experiment(overrides=[*SMALL, "train.lr_schedule=cosine"])
    setup = cosine.assemble()
    from fedguard.engine import Server

    server = Server(setup.task, setup.model, setup.pipeline, setup.sampler, None, None,
                    fit_config=schedule_fit_config("cosine", 4))
    assert server.broadcast(3, [0])[0].meta["lr_scale"] == pytest.approx(lr_scale("cosine", 3, 4))
    a = cosine.run(run_dir=tmp_path / "cosine")
    b = Experiment(overrides=SMALL).run(run_dir=tmp_path / "constant")
    first = [r["train_loss"] for r in (a.rows[0], b.rows[0])]
    assert first[0] == first[1]  # round 1 runs at the full rate in both
    assert not all(torch.equal(a.params[k], b.params[k]) for k in a.params)
