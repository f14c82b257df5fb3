"""Per-example gradients for DP-SGD: a fast "book-keeping" path and the exact vmap reference.

DP-SGD needs ``sum_i c_i * g_i`` where ``g_i`` is example ``i``'s gradient and
``c_i = min(1, C / ||g_i||)`` its clipping factor. Two ways are offered:

* :class:`FastClippedSum` (the default) never runs one backward pass per example. One forward
  pass records each layer's input ``a``; one backward pass gives the gradient ``b`` of the
  summed loss with respect to each layer's output (weight gradients are not computed). Each
  layer's per-example gradient norms then follow from ``a`` and ``b`` alone: for a linear
  layer on a vector ``||g_i||^2 = ||a_i||^2 ||b_i||^2`` (ghost norm, Goodfellow 2015; Li et al.
  2022); for a convolution either the per-example gradient ``b_i U_i^T`` of the unfolded input
  ``U_i`` (small when channels are few) or the Gram form ``sum (U_i^T U_i) * (b_i^T b_i)``
  (small when positions are few), whichever costs less. The clipped sum is then formed
  directly from ``a`` and ``c * b`` in one pass (book-keeping, Bu et al. 2023), without a
  second backward pass. Linear, Conv1d, Conv2d, GroupNorm, LayerNorm and Embedding layers
  are covered.
* :class:`VmapClippedSum` computes every per-example gradient exactly with
  ``torch.func.vmap(torch.func.grad(...))``: the reference implementation, and the fallback
  for models whose parameterised layers the fast path does not cover.

Both assume the task's loss of a batch is the *mean* of independent per-example losses (true
of cross-entropy and any ``reduction="mean"`` loss) and that no layer mixes examples (see
:mod:`fedguard.privacy.validator`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from fedguard.types import Params

Batch = tuple[torch.Tensor, torch.Tensor]
TaskLoss = Callable[[nn.Module, Params, Batch], torch.Tensor]

#: layer types whose per-example gradient norms the fast path computes from activations
FAST_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.Embedding,
)


class FastPathUnsupported(ValueError):
    """The model has a parameterised layer (or a use of one) the fast path cannot handle."""


@dataclass
class ClippedSum:
    """The result for one batch: clipped gradient sum, per-example norms and mean loss."""

    grads: list[torch.Tensor]
    norms: torch.Tensor
    loss: float


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(1, clip / norm)`` per example (an example with norm 0 keeps factor 1)."""
    return (clip / (norms + 1e-12)).clamp(max=1.0)


# -- per-layer rules ------------------------------------------------------------------------


@dataclass
class _LayerGrad:
    """One layer's contribution: squared per-example norms and a way to form the clipped sum."""

    sq_norms: torch.Tensor
    combine: Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _materialised(per_example: dict[str, torch.Tensor]) -> _LayerGrad:
    """A layer whose per-example gradients are small enough to hold: (B, *param.shape) each."""
    batch = next(iter(per_example.values())).shape[0]
    sq = torch.zeros(batch, dtype=torch.float32, device=next(iter(per_example.values())).device)
    for g in per_example.values():
        sq = sq + torch.linalg.vector_norm(g.reshape(batch, -1), dim=1).square()

    def combine(c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.tensordot(c, g, dims=1) for k, g in per_example.items()}

    return _LayerGrad(sq, combine)


def _linear(m: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> _LayerGrad:
    batch = a.shape[0]
    a3 = a.reshape(batch, -1, a.shape[-1])
    b3 = b.reshape(batch, -1, b.shape[-1])
    steps = a3.shape[1]
    bias = {"bias": b3.sum(1)} if m.bias is not None else {}
    if steps == 1:
        a2, b2 = a3[:, 0], b3[:, 0]
        sq = a2.pow(2).sum(1) * b2.pow(2).sum(1)
        if m.bias is not None:
            sq = sq + b2.pow(2).sum(1)

        def combine(c: torch.Tensor) -> dict[str, torch.Tensor]:
            cb = b2 * c[:, None]
            out = {"weight": cb.t() @ a2}
            if m.bias is not None:
                out["bias"] = cb.sum(0)
            return out

        return _LayerGrad(sq, combine)
    if steps * (a3.shape[2] + b3.shape[2]) >= a3.shape[2] * b3.shape[2]:
        return _materialised({"weight": torch.einsum("bto,bti->boi", b3, a3), **bias})
    return _gram(a3, b3, bias)


def _gram(a3: torch.Tensor, b3: torch.Tensor, bias: dict[str, torch.Tensor]) -> _LayerGrad:
    """Ghost norm of ``sum_t b_t a_t^T`` via Gram matrices; ``a3`` (B,T,I), ``b3`` (B,T,O)."""
    sq = (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))
    bias_part = _materialised(bias) if bias else None
    if bias_part is not None:
        sq = sq + bias_part.sq_norms

    def combine(c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"weight": torch.einsum("bto,bti->oi", b3 * c[:, None, None], a3)}
        if bias_part is not None:
            out.update(bias_part.combine(c))
        return out

    return _LayerGrad(sq, combine)


def _conv(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> _LayerGrad:
    if m.padding_mode != "zeros":
        raise FastPathUnsupported(f"{type(m).__name__} with padding_mode={m.padding_mode!r}")
    if isinstance(m, nn.Conv1d):
        a, b = a.unsqueeze(2), b.unsqueeze(2)
        kernel, stride, dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        padding = (0, *_explicit_padding(m))
    else:
        kernel, stride, dilation, padding = m.kernel_size, m.stride, m.dilation, _explicit_padding(m)
    batch, groups = a.shape[0], m.groups
    unfolded = unfold(a, kernel, dilation, padding, stride)  # (B, Cin*k, L)
    b3 = b.reshape(batch, b.shape[1], -1)  # (B, Cout, L)
    bias = {"bias": b3.sum(2)} if m.bias is not None else {}
    c_out, k_in, positions = b3.shape[1], unfolded.shape[1], b3.shape[2]
    gram_cost = positions * positions * (k_in + c_out)
    full_cost = c_out * (k_in // groups) * positions
    if groups == 1 and gram_cost < full_cost:
        layer = _gram(unfolded.transpose(1, 2), b3.transpose(1, 2), bias)
        inner = layer.combine
        layer.combine = lambda c: _reshape_weight(inner(c), m.weight.shape)
        return layer
    if groups == 1:  # (B, K, L) @ (B, L, Cout) is the fastest layout on CPU; keep it (B, K, Cout)
        return _conv_kernel_major(torch.bmm(unfolded, b3.transpose(1, 2)), bias, m.weight.shape)
    u = unfolded.reshape(batch, groups, k_in // groups, positions)
    g = torch.einsum("bgol,bgkl->bgok", b3.reshape(batch, groups, c_out // groups, positions), u)
    return _materialised({"weight": g.reshape(batch, *m.weight.shape), **bias})


def _conv_kernel_major(g: torch.Tensor, bias: dict[str, torch.Tensor], shape: torch.Size) -> _LayerGrad:
    """Per-example weight gradients held as (B, K, Cout): only the (K, Cout) sum is transposed."""
    layer = _materialised({"weight": g, **bias})
    inner = layer.combine

    def combine(c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = inner(c)
        out["weight"] = out["weight"].t().reshape(shape)
        return out

    layer.combine = combine
    return layer


def unfold(
    x: torch.Tensor,
    kernel: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: tuple[int, ...],
    stride: tuple[int, ...],
) -> torch.Tensor:
    """``F.unfold`` of a (B, C, H, W) input as one stack of strided slices (several times faster on CPU)."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    out_h = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    slices = [
        xp[:, :, i * dh : i * dh + sh * (out_h - 1) + 1 : sh, j * dw : j * dw + sw * (out_w - 1) + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]
    return torch.stack(slices, 2).reshape(x.shape[0], -1, out_h * out_w)


def _reshape_weight(grads: dict[str, torch.Tensor], shape: torch.Size) -> dict[str, torch.Tensor]:
    grads["weight"] = grads["weight"].reshape(shape)
    return grads


def _explicit_padding(m: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise FastPathUnsupported("padding='same' with an even kernel extent (asymmetric padding)")
        return tuple(t // 2 for t in total)
    return tuple(m.padding)  # type: ignore[arg-type]


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, b: torch.Tensor) -> _LayerGrad:
    normalised = F.group_norm(a, m.num_groups, eps=m.eps)
    dims = tuple(range(2, a.dim()))
    return _materialised({"weight": (b * normalised).sum(dims), "bias": b.sum(dims)})


def _layer_norm(m: nn.LayerNorm, a: torch.Tensor, b: torch.Tensor) -> _LayerGrad:
    normalised = F.layer_norm(a, m.normalized_shape, eps=m.eps)
    dims = tuple(range(1, a.dim() - len(m.normalized_shape)))
    grads = {"weight": (b * normalised).sum(dims) if dims else b * normalised}
    if m.bias is not None:
        grads["bias"] = b.sum(dims) if dims else b
    return _materialised(grads)


def _embedding(m: nn.Embedding, a: torch.Tensor, b: torch.Tensor) -> _LayerGrad:
    if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
        raise FastPathUnsupported("Embedding with max_norm, scale_grad_by_freq or sparse")
    batch = a.shape[0]
    idx = a.reshape(batch, -1)
    b3 = b.reshape(batch, idx.shape[1], -1)
    if m.padding_idx is not None:
        b3 = b3 * (idx != m.padding_idx).unsqueeze(-1)
    same = (idx[:, :, None] == idx[:, None, :]).to(b3.dtype)
    sq = (same * torch.bmm(b3, b3.transpose(1, 2))).sum((1, 2))

    def combine(c: torch.Tensor) -> dict[str, torch.Tensor]:
        out = torch.zeros(m.weight.shape, dtype=b3.dtype, device=b3.device)
        rows = (b3 * c[:, None, None]).reshape(-1, b3.shape[-1])
        return {"weight": out.index_add_(0, idx.reshape(-1), rows)}

    return _LayerGrad(sq, combine)


_RULES: dict[type[nn.Module], Callable[..., _LayerGrad]] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.GroupNorm: _group_norm,
    nn.LayerNorm: _layer_norm,
    nn.Embedding: _embedding,
}


def fast_path_problem(model: nn.Module) -> str | None:
    """Why the fast path cannot serve ``model`` (None when it can)."""
    covered: set[str] = set()
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if not own:
            continue
        if type(module) not in _RULES:
            return f"layer {name!r} ({type(module).__name__}) has parameters the fast path does not cover"
        covered.update(f"{name}.{n}" if name else n for n in own)
    missing = [n for n, _ in model.named_parameters() if n not in covered]
    return f"parameters {missing[:3]} are not owned by a covered layer" if missing else None


# -- the two implementations ------------------------------------------------------------------


class FastClippedSum:
    """Clipped per-example gradient sums from activations and output gradients (no per-example backward)."""

    def __init__(self, model: nn.Module, loss: TaskLoss) -> None:
        problem = fast_path_problem(model)
        if problem:
            raise FastPathUnsupported(problem)
        self.model, self.loss = model, loss
        self.layers = [(n, m) for n, m in model.named_modules() if type(m) in _RULES and _has_params(m)]
        #: set once an in-place operation on a layer's output is seen: outputs are then copied
        self.copy_outputs = False

    def __call__(self, params: Params, batch: Batch, clip: float) -> ClippedSum:
        """Sum of per-example gradients clipped to ``clip``, in ``params`` order."""
        loss, used = self._forward(params, batch)
        size = batch[0].shape[0]
        outs = [rec.output for _, _, rec in used]
        grads_out = torch.autograd.grad(loss * size, outs, allow_unused=True) if outs else []
        layer_grads = {}
        for (name, module, rec), g in zip(used, grads_out, strict=True):
            g = torch.zeros_like(rec.output) if g is None else g
            layer_grads[name] = _RULES[type(module)](module, rec.input, g.detach())
        sq = torch.zeros(size, device=batch[0].device)
        for lg in layer_grads.values():
            sq = sq + lg.sq_norms
        norms = sq.clamp(min=0).sqrt()
        c = clip_factors(norms, clip)
        summed: Params = {}
        for name, lg in layer_grads.items():
            summed.update({f"{name}.{k}" if name else k: v for k, v in lg.combine(c).items()})
        grads = [summed.get(k, torch.zeros_like(v)).reshape(v.shape) for k, v in params.items()]
        return ClippedSum(grads, norms.detach(), float(loss.detach()))

    def _forward(self, params: Params, batch: Batch) -> tuple[torch.Tensor, list[tuple[str, nn.Module, _Record]]]:
        """The mean loss and each used layer's record; redone with copies after an in-place op."""
        records: dict[str, list[_Record]] = {n: [] for n, _ in self.layers}
        copy = self.copy_outputs
        handles = [m.register_forward_hook(_recorder(records[n], copy)) for n, m in self.layers]
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        try:
            loss = self.loss(self.model, leaves, batch)
        finally:
            for h in handles:
                h.remove()
        if any(len(r) > 1 for r in records.values()):
            raise FastPathUnsupported("a layer is called more than once per forward pass (shared weights)")
        used = [(n, m, records[n][0]) for n, m in self.layers if records[n]]
        if not copy and any(rec.output._version != rec.version for _, _, rec in used):
            self.copy_outputs = True
            return self._forward(params, batch)
        return loss, used


@dataclass
class _Record:
    input: torch.Tensor
    output: torch.Tensor
    version: int


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _recorder(store: list[_Record], copy: bool) -> Callable[..., torch.Tensor | None]:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        # the gradient is taken w.r.t. ``output``: if a later operation changes it in place
        # (ReLU(inplace=True)), later layers must see a copy instead
        store.append(_Record(inputs[0].detach(), output, output._version))
        return output.clone() if copy else None

    return hook


class VmapClippedSum:
    """Exact per-example gradients with ``vmap(grad(loss of a batch of one))``, then clipping."""

    def __init__(self, model: nn.Module, loss: TaskLoss, chunk_size: int = 64) -> None:
        self.model, self.loss, self.chunk_size = model, loss, chunk_size

        def loss_one(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss(self.model, p, (x.unsqueeze(0), y.unsqueeze(0)))

        self._loss_one = loss_one
        self._grad = vmap(grad(loss_one), in_dims=(None, 0, 0), randomness="different")

    def per_example(self, params: Params, batch: Batch) -> Params:
        """Every example's gradient: name -> (B, *shape)."""
        x, y = batch
        detached = {k: v.detach() for k, v in params.items()}
        parts = [self._grad(detached, x[i : i + self.chunk_size], y[i : i + self.chunk_size])
                 for i in range(0, x.shape[0], self.chunk_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in params}

    def __call__(self, params: Params, batch: Batch, clip: float) -> ClippedSum:
        """Sum of per-example gradients clipped to ``clip``, in ``params`` order."""
        per = self.per_example(params, batch)
        size = batch[0].shape[0]
        norms = torch.sqrt(sum(g.reshape(size, -1).pow(2).sum(1) for g in per.values()))
        c = clip_factors(norms, clip)
        grads = [torch.tensordot(c, per[k], dims=1) for k in params]
        with torch.no_grad():
            loss = float(self.loss(self.model, {k: v.detach() for k, v in params.items()}, batch))
        return ClippedSum(grads, norms, loss)


def loop_clipped_sum(model: nn.Module, loss: TaskLoss, params: Params, batch: Batch, clip: float) -> ClippedSum:
    """The obvious reference: one backward pass per example, then clipping (slow; for checks)."""
    grads = [torch.zeros_like(v) for v in params.values()]
    norms, total = [], 0.0
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value = loss(model, p, (batch[0][i : i + 1], batch[1][i : i + 1]))
        one = torch.autograd.grad(value, list(p.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in one))
        factor = clip_factors(norm, clip)
        grads = [acc + factor * g for acc, g in zip(grads, one, strict=True)]
        norms.append(norm)
        total += float(value.detach())
    return ClippedSum(grads, torch.stack(norms), total / max(len(norms), 1))


def build_clipped_sum(
    model: nn.Module, loss: TaskLoss, method: str = "auto", log: Callable[[str], None] | None = None
) -> FastClippedSum | VmapClippedSum:
    """The per-example engine for ``model``: ``fast``, ``vmap``, or ``auto`` (fast when it can)."""
    if method == "vmap":
        return VmapClippedSum(model, loss)
    try:
        return FastClippedSum(model, loss)
    except FastPathUnsupported as exc:
        if method == "fast":
            raise
        if log is not None:
            log(f"DP-SGD: using exact vmap per-example gradients (slower): {exc}")
        return VmapClippedSum(model, loss)


def max_abs_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute difference between two gradient lists (for self-checks and tests)."""
    return max((float((x - y).abs().max()) for x, y in zip(a, b, strict=True) if x.numel()), default=0.0)


def relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """``||a - b|| / max(||b||, tiny)`` over the concatenated lists."""
    num = math.sqrt(sum(float((x - y).pow(2).sum()) for x, y in zip(a, b, strict=True)))
    den = math.sqrt(sum(float(y.pow(2).sum()) for y in b))
    return num / max(den, 1e-12)
