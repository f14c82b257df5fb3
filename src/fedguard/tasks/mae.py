"""Masked autoencoder (He et al. 2022) as a federated task, and the linear probe.

Images are cut into non-overlapping ``patch x patch`` patches. Per image a random subset
(``mask_ratio`` of the patches) is hidden; a pre-norm transformer encoder sees only the
visible patches (plus their position embeddings); a lighter transformer decoder receives the
encoded visible tokens and a shared learned mask token at every hidden position and predicts
the pixels of all patches. The loss is the mean squared error over the *masked* patches only.

Representation quality is measured with a linear probe: the frozen encoder (no masking) maps
each image to features, a multinomial logistic regression is fitted on the labelled training
set and its accuracy is measured on the test set. The same probe on raw pixels is the
reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedguard.data.arrays import ArrayDataset
from fedguard.tasks.base import Batch, Task
from fedguard.tasks.generative_common import bound_model, local_update, save_image_rows
from fedguard.types import Params

POOLS = ["mean", "grid", "tokens"]


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, C * patch * patch), patches in row-major order."""
    b, c, h, w = x.shape
    p = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, H/p, W/p, p, p
    return p.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(p: torch.Tensor, patch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`patchify` for images of ``shape`` = (C, H, W)."""
    c, h, w = shape
    b, gh, gw = p.shape[0], h // patch, w // patch
    x = p.reshape(b, gh, gw, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked patches (``mask`` = 1) of each patch's mean squared pixel error."""
    per_patch = (pred - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def patch_stats(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's pixel mean and standard deviation (biased variance plus ``eps``), shaped to
    broadcast over its pixels."""
    var = patches.var(-1, keepdim=True, unbiased=False)
    return patches.mean(-1, keepdim=True), (var + eps).sqrt()


def normalise_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch's pixels minus their mean, over their standard deviation: the ``norm_pix``
    targets of He et al. 2022 (flat patches stay at zero)."""
    mean, std = patch_stats(patches)
    return (patches - mean) / std


def random_masking(noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the ``keep`` visible patches per row (lowest ``noise``) and the 0/1 mask
    (1 = hidden), from uniform ``noise`` of shape (B, N)."""
    keep_idx = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones_like(noise)
    mask.scatter_(1, keep_idx, 0.0)
    return keep_idx, mask


class Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention then a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # unbind, not qkv[0], qkv[1], qkv[2]: indexing's backward zero-fills a full-size buffer per index
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class MAE(nn.Module):
    """ViT-style masked autoencoder for small images (fixed-size learned position embeddings)."""

    def __init__(self, shape: tuple[int, ...], patch: int = 7, dim: int = 128, depth: int = 4, heads: int = 4,
                 decoder_dim: int = 64, decoder_depth: int = 1, decoder_heads: int = 4) -> None:
        super().__init__()
        c, h, w = shape
        if h % patch or w % patch:
            raise ValueError(f"patch size {patch} does not divide the image size {h}x{w}")
        self.shape, self.patch = tuple(shape), patch
        self.num_patches, patch_dim = (h // patch) * (w // patch), c * patch * patch
        self.embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.randn(1, self.num_patches, decoder_dim) * 0.02)
        self.decoder_blocks = nn.ModuleList([Block(decoder_dim, decoder_heads) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.head = nn.Linear(decoder_dim, patch_dim)

    def encode(self, patches: torch.Tensor, keep_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Encoded tokens of the patches at ``keep_idx`` (all patches if None)."""
        tokens = self.embed(patches) + self.pos
        if keep_idx is not None:
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def decode(self, encoded: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """Pixel predictions for every patch from the visible tokens."""
        visible = self.decoder_embed(encoded)
        b, d = visible.shape[0], visible.shape[-1]
        full = self.mask_token.expand(b, self.num_patches, d)
        full = full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, d), visible) + self.decoder_pos
        for block in self.decoder_blocks:
            full = block(full)
        return self.head(self.decoder_norm(full))

    def forward(self, x: torch.Tensor, noise: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted patches (B, N, patch_dim), mask (B, N) with 1 = hidden) for a masking
        chosen by ``noise`` (B, N) keeping ``keep`` patches per image."""
        keep_idx, mask = random_masking(noise, keep)
        return self.decode(self.encode(patchify(x, self.patch), keep_idx), keep_idx), mask

    def features(self, x: torch.Tensor, pool: str = "mean") -> torch.Tensor:
        """Frozen-encoder features of unmasked images (see :func:`pool_tokens`)."""
        return pool_tokens(self.encode(patchify(x, self.patch)), pool)


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """Image features from encoder tokens (B, N, dim) on a square patch grid: the tokens'
    mean ('mean', dim), their means over each quarter of the image ('grid', 4 x dim), or all
    tokens concatenated in patch order ('tokens', N x dim)."""
    if pool == "mean":
        return tokens.mean(1)
    if pool == "tokens":
        return tokens.flatten(1)
    if pool == "grid":
        side = math.isqrt(tokens.shape[1])
        grid = tokens.reshape(len(tokens), side, side, -1).permute(0, 3, 1, 2)
        return F.adaptive_avg_pool2d(grid, 2).flatten(1)
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2: float = 1e-4, iters: int = 300, l2_grid: tuple[float, ...] = (),
                 val_fraction: float = 0.1) -> dict[str, float]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS).

    With ``l2_grid``, the L2 penalty is chosen the usual way for linear probes: a fixed seeded
    ``val_fraction`` of the training examples is held out, the probe is fitted on the rest for
    each penalty (largest first, each fit starting from the previous one's solution), the best
    held-out accuracy wins, and the probe is refitted on all training examples with it.
    The test set is never looked at before the final fit. Returns train and test accuracy and
    the penalty used (and the validation accuracy when one was chosen). Deterministic.
    """
    if len(train_x) < 2:
        raise ValueError(f"the linear probe needs at least 2 labelled training examples, got {len(train_x)}; "
                         "raise mae.probe_examples (0 uses the whole training set)")
    classes = int(max(train_y.max(), test_y.max())) + 1
    out: dict[str, float] = {}
    init = None
    if l2_grid:
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))
        n_val = max(1, int(len(train_x) * val_fraction))
        fit_idx, val_idx = order[n_val:], order[:n_val]
        a, v = _standardise(train_x[fit_idx], train_x[val_idx])
        scores = []
        for penalty in sorted(l2_grid, reverse=True):
            init = _fit_logistic(a, train_y[fit_idx], classes, penalty, iters, init)
            scores.append((_accuracy(init, v, train_y[val_idx]), penalty, init))
        best = max(scores, key=lambda t: (t[0], t[1]))  # ties: the stronger penalty
        out["val_acc"], l2, init = best
    a, b = _standardise(train_x, test_x)
    lin = _fit_logistic(a, train_y, classes, l2, iters, init)
    out.update({"train_acc": _accuracy(lin, a, train_y), "test_acc": _accuracy(lin, b, test_y), "l2": l2})
    return out


def _standardise(fit_x: torch.Tensor, other_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets standardised with the mean and std of ``fit_x``."""
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    return (fit_x - mean) / std, (other_x - mean) / std


def _fit_logistic(a: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int,
                  init: nn.Linear | None = None) -> nn.Linear:
    """Cross-entropy + ``l2 * ||W||^2`` minimised by L-BFGS from zero (or from ``init``)."""
    lin = nn.Linear(a.shape[1], classes)
    with torch.no_grad():
        if init is None:
            lin.weight.zero_()
            lin.bias.zero_()
        else:
            lin.weight.copy_(init.weight)
            lin.bias.copy_(init.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


@torch.no_grad()
def _accuracy(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((lin(x).argmax(1) == y).float().mean())


class MAETask(Task):
    """Federated masked autoencoder; the loss is the masked-patch MSE."""

    name = "mae"
    primary_metric = "masked_mse"
    higher_is_better = False

    def __init__(self, shape: tuple[int, ...], patch: int = 7, dim: int = 128, depth: int = 4, heads: int = 4,
                 decoder_dim: int = 64, decoder_depth: int = 1, mask_ratio: float = 0.75, pool: str = "tokens",
                 extra_pools: tuple[str, ...] = (), probe_examples: int = 0, probe_iters: int = 300,
                 probe_l2: float = 1e-4, eval_examples: int = 2000, optimizer: str = "adam", lr: float = 1e-3,
                 probe_l2_grid: tuple[float, ...] = (), norm_pix_loss: bool = False) -> None:
        for p in (pool, *extra_pools):
            if p not in POOLS:
                raise ValueError(f"pool must be one of {POOLS}, got {p!r}")
        self.extra_pools = tuple(extra_pools)
        self.shape, self.patch, self.dim, self.depth, self.heads = tuple(shape), patch, dim, depth, heads
        self.decoder_dim, self.decoder_depth, self.mask_ratio, self.pool = decoder_dim, decoder_depth, mask_ratio, pool
        self.probe_examples, self.probe_iters, self.probe_l2 = probe_examples, probe_iters, probe_l2
        self.probe_l2_grid, self.norm_pix_loss = tuple(probe_l2_grid), norm_pix_loss
        self.eval_examples, self.optimizer, self.lr = eval_examples, optimizer, lr
        self.num_patches = (shape[1] // patch) * (shape[2] // patch)
        self.keep = max(1, int(round(self.num_patches * (1 - mask_ratio))))

    def build_model(self) -> nn.Module:
        return MAE(self.shape, self.patch, self.dim, self.depth, self.heads, self.decoder_dim, self.decoder_depth)

    def forward(self, model: nn.Module, params: Params, x: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prediction, target patches, mask) for a fresh random masking of ``x``; the targets
        are the patches' pixels, or their normalised pixels with ``norm_pix_loss``."""
        noise = torch.rand(len(x), self.num_patches, generator=generator)
        pred, mask = functional_call(model, params, (x, noise, self.keep))
        target = patchify(x, self.patch)
        return pred, normalise_patches(target) if self.norm_pix_loss else target, mask

    def loss(self, model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
        pred, target, mask = self.forward(model, params, batch[0])
        return masked_mse(pred, target, mask)

    def local_train(self, model: nn.Module, params: Params, data: ArrayDataset, trainer: Any,
                    generator: torch.Generator) -> tuple[Params, dict[str, float]]:
        return local_update(self, model, params, data, trainer, generator, self.optimizer, self.lr)

    @torch.no_grad()
    def masked_mse_on(self, model: nn.Module, params: Params, data: ArrayDataset, batch_size: int = 500) -> float:
        """Mean masked-patch MSE over ``data`` with masks from a fixed seed."""
        gen = torch.Generator().manual_seed(0)
        total, count = 0.0, 0.0
        for start in range(0, len(data), batch_size):
            pred, target, mask = self.forward(model, params, data.x[start : start + batch_size], gen)
            total += float(((pred - target).pow(2).mean(-1) * mask).sum())
            count += float(mask.sum())
        return total / max(count, 1.0)

    def evaluate(self, model: nn.Module, params: Params, data: ArrayDataset) -> dict[str, float]:
        n = self.eval_examples
        subset = data if not n or n >= len(data) else data.subset(torch.arange(n))
        return {"masked_mse": self.masked_mse_on(model, params, subset)}

    @torch.no_grad()
    def features(self, model: nn.Module, params: Params, x: torch.Tensor, pools: list[str] | None = None,
                 batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """Frozen-encoder features of ``x`` for each pool (default: the configured one), from
        one encoder pass over unmasked images."""
        pools = pools or [self.pool]
        bound = bound_model(model, params)
        parts: dict[str, list[torch.Tensor]] = {p: [] for p in pools}
        for i in range(0, len(x), batch_size):
            tokens = bound.encode(patchify(x[i : i + batch_size], self.patch))
            for p in pools:
                parts[p].append(pool_tokens(tokens, p))
        return {p: torch.cat(chunks) for p, chunks in parts.items()}

    def probe_split(self, train: ArrayDataset) -> ArrayDataset:
        """The labelled training examples the probe is fitted on."""
        n = self.probe_examples
        return train if not n or n >= len(train) else train.subset(torch.arange(n))

    def probes(self, model: nn.Module, params: Params, train: ArrayDataset,
               test: ArrayDataset) -> dict[str, dict[str, float]]:
        """Linear-probe train/test accuracy for the configured pool and each extra pool."""
        pools = list(dict.fromkeys([self.pool, *self.extra_pools]))
        train_f, test_f = self.features(model, params, train.x, pools), self.features(model, params, test.x, pools)
        results = {}
        for p in pools:
            results[p] = linear_probe(train_f.pop(p), train.y, test_f.pop(p), test.y, self.probe_l2, self.probe_iters,
                                      self.probe_l2_grid)
        return results

    def final_metrics(self, model: nn.Module, params: Params, train: ArrayDataset,
                      test: ArrayDataset) -> dict[str, float]:
        probe_train = self.probe_split(train)
        results = self.probes(model, params, probe_train, test)
        pix = pixel_probe(probe_train, test, self.probe_l2, self.probe_iters, self.probe_l2_grid)
        out = {
            "final_masked_mse": self.masked_mse_on(model, params, test),
            "probe_acc": results[self.pool]["test_acc"],
            "probe_train_acc": results[self.pool]["train_acc"],
            "pixel_probe_acc": pix["test_acc"],
            "probe_l2": results[self.pool]["l2"],
            "pixel_probe_l2": pix["l2"],
            "probe_examples": float(len(probe_train)),
        }
        out.update({f"probe_acc_{p}": r["test_acc"] for p, r in results.items() if p != self.pool})
        return out

    @torch.no_grad()
    def report_figures(self, model: nn.Module, params: Params, data: ArrayDataset, out_dir: Path,
                       tag: str) -> list[tuple[str, Path]]:
        x = data.x[:12]
        pred, _, mask = self.forward(model, params, x, torch.Generator().manual_seed(0))
        target = patchify(x, self.patch)
        if self.norm_pix_loss:  # shown in pixels with each hidden patch's own mean and std (as He et al. do)
            mean, std = patch_stats(target)
            pred = pred * std + mean
        hidden = mask.unsqueeze(-1)
        masked = unpatchify(target * (1 - hidden) + 0.5 * hidden, self.patch, self.shape)
        pasted = unpatchify(pred * hidden + target * (1 - hidden), self.patch, self.shape)
        rows = [("masked input", masked), ("reconstruction", pasted), ("original", x)]
        path = save_image_rows(rows, out_dir / f"mae_reconstruction_{tag}.png", len(x))
        caption = (f"MAE: masked input ({self.mask_ratio:.0%} of patches hidden, shown grey), reconstruction "
                   "(predicted masked patches with the visible ones pasted in), original")
        return [(caption, path)]

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "patch": self.patch, "dim": self.dim, "depth": self.depth,
                "decoder_dim": self.decoder_dim, "decoder_depth": self.decoder_depth,
                "mask_ratio": self.mask_ratio, "norm_pix_loss": self.norm_pix_loss, "pool": self.pool}


def pixel_probe(train: ArrayDataset, test: ArrayDataset, l2: float = 1e-4, iters: int = 300,
                l2_grid: tuple[float, ...] = ()) -> dict[str, float]:
    """The linear probe on raw pixels (the same protocol, its own penalty when chosen from a
    grid): the reference an encoder's features must beat."""
    return linear_probe(train.x.flatten(1), train.y, test.x.flatten(1), test.y, l2, iters, l2_grid)
