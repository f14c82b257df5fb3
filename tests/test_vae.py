"""The VAE task: ELBO terms against hand-computed values, IWAE >= ELBO, a short federated run."""

import math

import pytest
import torch

from fedguard import ArrayDataset, Experiment
from fedguard.tasks.vae import VAETask, gaussian_kl, log_likelihood, negative_elbo

TINY = [
    "task.name=vae",
    "run.progress=false",
    "data.max_train_examples=400",
    "data.num_clients=2",
    "run.workers=1",
    "run.rounds=3",
    "train.batch_size=32",
    "vae.hidden=64",
    "vae.latent=4",
    "vae.iwae_k=8",
    "vae.eval_examples=200",
    "vae.lr=3e-3",
]


def test_negative_elbo_terms_by_hand():
    x = torch.tensor([[1.0, 0.0]])
    logits = torch.zeros(1, 2)
    mu, logvar = torch.tensor([[1.0]]), torch.tensor([[0.0]])
    neg, nll, kl = negative_elbo(x, logits, mu, logvar, "bernoulli", beta=2.0)
    # -log p(x|z) = 2 log 2 (two pixels at probability 1/2); KL = (1 + 1 - 1 - 0) / 2
    assert nll.item() == pytest.approx(2 * math.log(2))
    assert kl.item() == pytest.approx(0.5)
    assert neg.item() == pytest.approx(2 * math.log(2) + 2 * 0.5)
    # Gaussian: mean sigmoid(0) = 0.5 equals x, std 1: -log p = log(2 pi) / 2 per pixel
    gauss = -log_likelihood(torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2), "gaussian", 1.0)
    assert gauss.item() == pytest.approx(math.log(2 * math.pi))
    # KL of a non-standard posterior: mu = 0, var = e: (0 + e - 1 - 1) / 2
    assert gaussian_kl(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx((math.e - 2) / 2)


def test_task_loss_by_hand_with_zeroed_networks():
    # every weight and bias zero: q(z|x) = N(0, I) so KL = 0; logits 0 so each pixel costs log 2
    task = VAETask((1, 2, 2), hidden=3, latent=2)
    model = task.build_model()
    params = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    x = torch.tensor([[[[0.9, 0.1], [0.2, 0.7]]]])
    assert task.loss(model, params, (x, torch.zeros(1))).item() == pytest.approx(4 * math.log(2))
    # binarisation: the same loss whatever the grey levels, targets are 0/1
    assert task.prepare(x).tolist() == [[1.0, 0.0, 0.0, 1.0]]


def test_iwae_bound_is_at_least_the_elbo():
    torch.manual_seed(0)
    task = VAETask((1, 4, 4), hidden=16, latent=3, iwae_k=50)
    model = task.build_model()
    params = dict(model.named_parameters())
    data = ArrayDataset(torch.rand(200, 1, 4, 4), torch.zeros(200, dtype=torch.long))
    m = task.metrics(model, params, data, k=50)
    assert m["iwae_nll"] < m["neg_elbo"]
    assert m["neg_elbo"] == pytest.approx(m["recon_nll"] + m["kl"])
    one = task.metrics(model, params, data, k=1)
    assert one["iwae_nll"] == pytest.approx(one["neg_elbo"], rel=0.05)  # k = 1 is the ELBO


def test_gaussian_likelihood_learns_its_std():
    task = VAETask((1, 2, 2), hidden=4, latent=2, likelihood="gaussian")
    assert "log_std" in dict(task.build_model().named_parameters())
    fixed = VAETask((1, 2, 2), hidden=4, latent=2, likelihood="gaussian", gaussian_std=0.2)
    assert "log_std" not in dict(fixed.build_model().named_parameters())


def test_short_federated_run_lowers_loss_and_writes_pictures(tmp_path):
    result = Experiment(overrides=TINY).run(run_dir=tmp_path / "vae")
    rows = result.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_iwae_nll"] < rows[0]["test_iwae_nll"]
    assert all(r["test_iwae_nll"] <= r["test_neg_elbo"] for r in rows)
    assert result.final["final_examples"] == 1000 and result.final["final_iwae_k"] == 8
    report = (result.run_dir / "report.md").read_text()
    for name in ["vae_samples_final.png", "vae_recon_final.png", "vae_interp_final.png"]:
        assert (result.run_dir / "plots" / name).stat().st_size > 1000
        assert name in report
    again = Experiment(overrides=[*TINY, "run.report=false"]).run(run_dir=tmp_path / "again")
    assert all(torch.equal(result.params[k], again.params[k]) for k in result.params)


def test_local_adam_matches_torch_adam():
    from fedguard.tasks.generative_common import Adam

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, generator=g)
    grads = [torch.randn(5, generator=g) for _ in range(4)]
    mine, ref = w0.clone(), w0.clone().requires_grad_(True)
    adam, opt = Adam([mine], 0.1, (0.5, 0.9)), torch.optim.Adam([ref], lr=0.1, betas=(0.5, 0.9))
    for grad in grads:
        adam.step([grad])
        ref.grad = grad.clone()
        opt.step()
    assert torch.allclose(mine, ref.detach(), atol=1e-6)
