"""The GAN task: losses by hand, alternating local steps, a short federated run with pictures."""

import math

import pytest
import torch

from fedguard import Experiment
from fedguard.algorithms.local_sgd import LocalSGD, ShuffledEpochs
from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.frechet import FeatureCNN, FrechetScorer
from fedguard.tasks.gan import GANTask, discriminator_loss, generator_loss

TINY = [
    "task.name=gan",
    "run.progress=false",
    "run.workers=1",
    "data.max_train_examples=400",
    "data.num_clients=2",
    "run.rounds=3",
    "train.batch_size=32",
    "gan.hidden=32",
    "gan.latent=8",
    "gan.lr=1e-3",
    "gan.eval_samples=200",
    "gan.final_samples=300",
    "gan.fd_epochs=1",
]


def test_gan_losses_by_hand():
    zero = torch.zeros(1)
    assert discriminator_loss(zero, zero, "nonsaturating").item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero, "nonsaturating").item() == pytest.approx(math.log(2))
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    # hinge D: mean(relu(1 - real)) = (0 + 1) / 2, mean(relu(1 + fake)) = (0 + 1.5) / 2; G: -mean(fake)
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(0.5 + 0.75)
    assert generator_loss(fake, "hinge").item() == pytest.approx(0.75)
    real, fake = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # least squares D: ((0 + 1) / 2 + (0 + 1) / 2) / 2; G: ((1 + 0) / 2) / 2
    assert discriminator_loss(real, fake, "lsgan").item() == pytest.approx(0.5)
    assert generator_loss(fake, "lsgan").item() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        generator_loss(fake, "wasserstein")


def test_local_train_updates_both_networks_reproducibly():
    torch.manual_seed(0)
    task = GANTask((1, 4, 4), FrechetScorer(FeatureCNN(1, 4, 2)), latent=3, hidden=8, lr=1e-2)
    model = task.build_model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    data = ArrayDataset(torch.rand(40, 1, 4, 4), torch.zeros(40, dtype=torch.long))
    trainer = LocalSGD(sampler=ShuffledEpochs(1, 10))
    new, metrics = task.local_train(model, params, data, trainer, torch.Generator().manual_seed(1))
    again, _ = task.local_train(model, params, data, trainer, torch.Generator().manual_seed(1))
    assert metrics["steps"] == 4 and metrics["d_loss"] > 0
    for prefix in ("generator.", "discriminator."):
        assert any(not torch.equal(new[k], params[k]) for k in params if k.startswith(prefix)), prefix
    assert all(torch.equal(new[k], again[k]) for k in new)
    # sampling uses the generator only: no data, fixed noise, fixed images
    assert torch.equal(task.samples(model, new, 5, seed=7), task.samples(model, new, 5, seed=7))


def test_short_federated_run_lowers_fd_and_shows_progress(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_CACHE", str(tmp_path / "cache"))
    result = Experiment(overrides=TINY).run(run_dir=tmp_path / "gan")
    rows = result.rows
    assert rows[-1]["test_fd"] < rows[0]["test_fd"]
    assert rows[-1]["client_d_loss"] < 2 * math.log(2)  # the discriminator learned something
    assert result.final["final_fd_samples"] == 300 and result.final["final_fd"] > 0
    assert list((tmp_path / "cache").glob("fd-classifier-*.safetensors"))
    plots = result.run_dir / "plots"
    assert sorted(p.name for p in (plots / "gan_rounds").iterdir()) == [f"round_000{r}.png" for r in (1, 2, 3)]
    report = (result.run_dir / "report.md").read_text()
    for name in ["gan_samples_final.png", "gan_progress_final.png"]:
        assert (plots / name).stat().st_size > 1000 and name in report
    assert "FD in mnist-5k-classifier features" in report


def test_fd_reference_statistics_are_kept_per_image_set_never_shared_between_validation_and_test():
    """A run with a validation split scores validation images each round and the test images at the end, at the
    same size: the test FD must be measured against the test images' statistics, not the cached validation ones."""
    torch.manual_seed(0)
    task = GANTask((1, 4, 4), FrechetScorer(FeatureCNN(1, 4, 2)), latent=3, hidden=8)
    validation = ArrayDataset(torch.rand(50, 1, 4, 4), torch.zeros(50, dtype=torch.long))
    test = ArrayDataset(torch.rand(50, 1, 4, 4) * 0.1, torch.zeros(50, dtype=torch.long))
    first = task.reference(validation, 40)
    assert not torch.equal(task.reference(test, 40)[0], first[0])
    assert torch.equal(task.reference(test, 40)[0], task.scorer.stats(test.x[:40])[0])
    assert task.reference(validation, 40) is first  # still computed once per set and size
