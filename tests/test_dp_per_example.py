"""Per-example gradients: fast path equals the exact vmap path, which equals a batch-of-one loop."""

import pytest
import torch
from torch import nn

from fedguard.privacy.per_example import (
    FastClippedSum,
    FastPathUnsupported,
    VmapClippedSum,
    build_clipped_sum,
    fast_path_problem,
    relative_difference,
    unfold,
)
from fedguard.tasks.classification import ClassificationTask
from fedguard.tasks.models import MLP, cnn_s

TASK = ClassificationTask(lambda: None)


class Mixed(nn.Module):
    """Every layer type the fast path covers, used in awkward ways (strides, groups, sequences)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.grouped = nn.Conv2d(4, 8, 3, groups=2, padding="same", dilation=1)
        self.norm = nn.GroupNorm(2, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.conv1d = nn.Conv1d(8, 6, 2, dilation=2)
        self.embed = nn.Embedding(20, 6, padding_idx=0)
        self.head = nn.Linear(6, 10)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv(x))
        h = self.relu(self.norm(self.grouped(h)))
        seq = self.layer_norm(h.mean(2).transpose(1, 2))  # (B, W, 8)
        seq = self.conv1d(seq.transpose(1, 2)).transpose(1, 2)  # (B, L, 6)
        tokens = (x.flatten(1)[:, :5] * 19).long()  # data-dependent token ids, some 0 (padding)
        seq = seq + self.embed(tokens).mean(1, keepdim=True)
        return self.head(seq).mean(1)


def _batch(size: int = 6, image: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(size, 1, image, image, generator=g), torch.randint(0, 10, (size,), generator=g)


def _params(model: nn.Module):
    return {k: v.detach() for k, v in model.named_parameters()}


def _loop_grads(model, params, batch):
    """Per-example gradients the slow, obvious way: one backward pass per example."""
    out = []
    for i in range(batch[0].shape[0]):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        loss = TASK.loss(model, p, (batch[0][i : i + 1], batch[1][i : i + 1]))
        out.append(torch.autograd.grad(loss, list(p.values())))
    return out


MODELS = {
    "cnn-s": lambda: cnn_s(1, 12, 10, "none"),
    "cnn-s-group": lambda: cnn_s(1, 12, 10, "group"),
    "mlp": lambda: MLP(144, 16, 10),
    "mixed": Mixed,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vmap_per_example_equals_batch_of_one_loop(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    params, batch = _params(model), _batch()
    per = VmapClippedSum(model, TASK.loss).per_example(params, batch)
    for i, grads in enumerate(_loop_grads(model, params, batch)):
        for k, g in zip(params, grads, strict=True):
            torch.testing.assert_close(per[k][i], g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("clip", [0.05, 1e6])
def test_fast_clipped_sum_equals_exact(name, clip):
    torch.manual_seed(1)
    model = MODELS[name]()
    params, batch = _params(model), _batch(seed=2)
    fast = FastClippedSum(model, TASK.loss)(params, batch, clip)
    exact = VmapClippedSum(model, TASK.loss)(params, batch, clip)
    assert relative_difference(fast.grads, exact.grads) < 1e-5
    torch.testing.assert_close(fast.norms, exact.norms, rtol=1e-4, atol=1e-6)
    assert fast.loss == pytest.approx(exact.loss, rel=1e-6)


@pytest.mark.parametrize("engine", [FastClippedSum, VmapClippedSum])
def test_clipping_bound_holds_for_every_example(engine):
    torch.manual_seed(3)
    model = cnn_s(1, 12, 10, "group")
    params, (x, y) = _params(model), _batch(size=4, seed=4)
    run = engine(model, TASK.loss)
    clip = 0.01  # far below every gradient norm: every example is clipped
    for i in range(x.shape[0]):
        one = run(params, (x[i : i + 1], y[i : i + 1]), clip)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in one.grads))
        assert one.norms[0] > clip
        assert float(norm) <= clip * (1 + 1e-5)
        assert float(norm) == pytest.approx(clip, rel=1e-4)


def test_unclipped_sum_is_the_ordinary_gradient():
    model = cnn_s(1, 12, 10, "none")
    params, batch = _params(model), _batch(size=5)
    fast = FastClippedSum(model, TASK.loss)(params, batch, 1e9)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    plain = torch.autograd.grad(TASK.loss(model, p, batch) * 5, list(p.values()))
    assert relative_difference(fast.grads, list(plain)) < 1e-5


def test_stacked_unfold_equals_torch_unfold():
    x = torch.rand(3, 4, 11, 9)
    for kernel, dilation, padding, stride in [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 2), (2, 3))]:
        expected = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        torch.testing.assert_close(unfold(x, kernel, dilation, padding, stride), expected)


def test_uncovered_layer_falls_back_to_vmap_or_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(144, 8), nn.PReLU(), nn.Linear(8, 10))
    assert "PReLU" in fast_path_problem(model)
    with pytest.raises(FastPathUnsupported):
        FastClippedSum(model, TASK.loss)
    with pytest.raises(FastPathUnsupported):
        build_clipped_sum(model, TASK.loss, "fast")
    messages: list[str] = []
    engine = build_clipped_sum(model, TASK.loss, "auto", messages.append)
    assert isinstance(engine, VmapClippedSum) and "PReLU" in messages[0]
    params, batch = _params(model), _batch()
    result = engine(params, batch, 0.5)
    assert result.norms.shape == (6,)


def test_shared_layer_is_refused_by_fast_path():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(144, 144)
            self.head = nn.Linear(144, 10)

        def forward(self, x):
            return self.head(self.layer(self.layer(x.flatten(1))))

    model = Twice()
    with pytest.raises(FastPathUnsupported, match="more than once"):
        FastClippedSum(model, TASK.loss)(_params(model), _batch(), 1.0)
