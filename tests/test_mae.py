"""The MAE task: patching, the masked-only loss by hand, the encoder's view, probe, a short run."""

import pytest
import torch

from fedguard import ArrayDataset, Experiment
from fedguard.tasks.mae import (
    MAETask,
    linear_probe,
    masked_mse,
    normalise_patches,
    patchify,
    random_masking,
    unpatchify,
)

TINY = [
    "task.name=mae",
    "run.progress=false",
    "run.workers=1",
    "data.max_train_examples=400",
    "data.num_clients=2",
    "run.rounds=3",
    "train.batch_size=32",
    "mae.patch=7",
    "mae.dim=16",
    "mae.depth=1",
    "mae.heads=2",
    "mae.decoder_dim=16",
    "mae.eval_examples=200",
    "mae.probe_iters=20",
    "mae.extra_pools=mean",
    "mae.lr=3e-3",
]


def test_patchify_layout_and_inverse():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (1, 4, 4)
    assert p[0, 0].tolist() == [0, 1, 4, 5] and p[0, 1].tolist() == [2, 3, 6, 7]  # row-major patches
    assert torch.equal(unpatchify(p, 2, (1, 4, 4)), x)
    rgb = torch.rand(2, 3, 8, 8)
    assert torch.equal(unpatchify(patchify(rgb, 4), 4, (3, 8, 8)), rgb)


def test_masked_mse_by_hand_ignores_visible_patches():
    target = torch.zeros(1, 3, 2)
    pred = torch.tensor([[[1.0, 1.0], [10.0, 10.0], [0.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 is visible: its error of 100 must not count
    # patch 0: (1 + 1) / 2 = 1; patch 2: (0 + 4) / 2 = 2; mean over the two masked patches
    assert masked_mse(pred, target, mask).item() == pytest.approx(1.5)


def test_norm_pix_targets_by_hand(tmp_path):
    patches = torch.tensor([[[0.0, 2.0, 4.0, 6.0], [1.0, 1.0, 1.0, 1.0]]])
    # mean 3, biased variance (9 + 1 + 1 + 9) / 4 = 5; a flat patch stays at zero
    expected = torch.tensor([-3.0, -1.0, 1.0, 3.0]) / (5.0 + 1e-6) ** 0.5
    out = normalise_patches(patches)
    assert torch.allclose(out[0, 0], expected) and torch.equal(out[0, 1], torch.zeros(4))
    task = MAETask((1, 4, 4), patch=2, dim=8, depth=1, heads=2, decoder_dim=8, norm_pix_loss=True)
    model = task.build_model()
    x = torch.rand(2, 1, 4, 4)
    torch.manual_seed(3)
    pred, target, mask = task.forward(model, dict(model.named_parameters()), x)
    assert torch.allclose(target, normalise_patches(patchify(x, 2)))
    torch.manual_seed(3)
    assert task.loss(model, dict(model.named_parameters()), (x, None)).item() == pytest.approx(
        masked_mse(pred, target, mask).item())
    # the report shows pixels: predictions mapped back with each patch's own mean and std
    data = ArrayDataset(x, torch.zeros(2, dtype=torch.long))
    [(caption, path)] = task.report_figures(model, dict(model.named_parameters()), data, tmp_path, "final")
    assert path.stat().st_size > 500 and "reconstruction" in caption


def test_random_masking_hides_the_configured_share():
    keep_idx, mask = random_masking(torch.rand(5, 16, generator=torch.Generator().manual_seed(0)), 4)
    assert mask.sum(1).tolist() == [12.0] * 5
    assert torch.all(mask.gather(1, keep_idx) == 0)


def test_encoder_sees_only_visible_patches_and_loss_is_masked_mse():
    torch.manual_seed(0)
    task = MAETask((1, 8, 8), patch=2, dim=8, depth=1, heads=2, decoder_dim=8, mask_ratio=0.75)
    model = task.build_model()
    params = dict(model.named_parameters())
    x = torch.rand(3, 1, 8, 8)
    noise = torch.rand(3, 16)
    pred, mask = model(x, noise, task.keep)
    assert task.keep == 4 and mask.sum().item() == 3 * 12
    changed = patchify(x, 2) + mask.unsqueeze(-1) * torch.rand(3, 16, 4)  # alter hidden patches only
    pred2, _ = model(unpatchify(changed, 2, (1, 8, 8)), noise, task.keep)
    assert torch.allclose(pred, pred2)
    torch.manual_seed(1)
    loss = task.loss(model, params, (x, torch.zeros(3)))
    torch.manual_seed(1)
    pred3, target, mask3 = task.forward(model, params, x)
    assert loss.item() == pytest.approx(masked_mse(pred3, target, mask3).item())


def test_linear_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.randn(200, 5, generator=g) + 4.0 * y.unsqueeze(1)
    assert linear_probe(x[:150], y[:150], x[150:], y[150:], iters=50)["test_acc"] == 1.0


def test_probe_penalty_is_chosen_on_held_out_training_data_only():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8)
    # a penalty so strong that the weights stay near zero must lose to a sensible one
    grid = (1e-4, 1e3)
    chosen = linear_probe(x[:200], y[:200], x[200:], y[200:], iters=100, l2_grid=grid)
    assert chosen["l2"] == 1e-4 and chosen["val_acc"] > 0.8 and chosen["test_acc"] > 0.8
    # the test labels play no part in the choice
    scrambled = linear_probe(x[:200], y[:200], x[200:], (y[200:] + 1) % 3, iters=100, l2_grid=grid)
    assert scrambled["l2"] == chosen["l2"] and scrambled["val_acc"] == chosen["val_acc"]


def test_linear_probe_refuses_fewer_than_two_examples():
    x, y = torch.rand(1, 4), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="mae.probe_examples"):
        linear_probe(x, y, x, y)


def test_short_federated_run_lowers_masked_mse_and_reports_probe(tmp_path):
    result = Experiment(overrides=TINY).run(run_dir=tmp_path / "mae")
    rows = result.rows
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_masked_mse"] < rows[0]["test_masked_mse"]
    final = result.final
    assert 0.1 < final["probe_acc"] <= 1 and 0.5 < final["pixel_probe_acc"] <= 1
    assert final["probe_examples"] == 400 and 0.1 < final["probe_acc_mean"] <= 1
    assert 0 < final["final_metrics_s"] < result.timings["total_s"]  # the probes' time, reported on its own
    path = result.run_dir / "plots" / "mae_reconstruction_final.png"
    assert path.stat().st_size > 1000 and path.name in (result.run_dir / "report.md").read_text()


def test_probe_features_pools():
    task = MAETask((1, 8, 8), patch=2, dim=8, depth=1, heads=2, decoder_dim=8)
    model = task.build_model()
    x = torch.rand(2, 1, 8, 8)
    assert model.features(x, "mean").shape == (2, 8)
    assert model.features(x, "grid").shape == (2, 32)
    assert model.features(x, "tokens").shape == (2, 128)
    data = ArrayDataset(x, torch.zeros(2, dtype=torch.long))
    feats = task.features(model, dict(model.named_parameters()), data.x, ["mean", "tokens"])
    assert torch.allclose(feats["mean"], model.features(x, "mean"), atol=1e-6)
    assert feats["tokens"].shape == (2, 128)
