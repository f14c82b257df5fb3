"""Byzantine-robust aggregation rules over stacked update vectors (one row per client).

Every rule here is a plain function of a ``(n, d)`` tensor, in the style of ByzFL: it knows nothing of
messages, rounds or models, so it is tested against the papers' formulas directly and reused by the
pipeline aggregator (:mod:`fedguard.robust.aggregators`), the attacks that adapt to a rule and the
robustness benchmark. ``f`` is always the number of Byzantine clients the rule is asked to tolerate; it is
stated by the caller, never guessed. Each function raises :class:`ValueError` when ``n`` is too small for
the ``f`` it was given, with the condition the paper states.

Rules that need state across rounds (centered clipping's centre, FLTrust's server update) take it as an
argument and leave keeping it to the caller.
"""

from __future__ import annotations

import math

import torch

#: smallest norm treated as non-zero when normalising (FLTrust, clipping)
EPS = 1e-12


def _check(stack: torch.Tensor) -> int:
    if stack.dim() != 2 or stack.shape[0] < 1:
        raise ValueError(f"expected a (clients, dimensions) stack with rows, got shape {tuple(stack.shape)}")
    return int(stack.shape[0])


def mean(stack: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (weighted) mean of the rows: FedAvg's rule (McMahan et al. 2017), robust to nothing."""
    _check(stack)
    if weights is None:
        return stack.mean(dim=0)
    w = weights.to(stack.dtype)
    return (w[:, None] * stack).sum(dim=0) / w.sum()


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values for even ``n``."""
    n = _check(stack)
    ordered = stack.sort(dim=0).values
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, f: int) -> torch.Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the ``f`` largest and ``f``
    smallest values and average the ``n - 2f`` others. Needs ``n > 2f``."""
    n = _check(stack)
    if f < 0 or n <= 2 * f:
        raise ValueError(f"trimmed mean needs n > 2f (n={n}, f={f}): trimming {f} from each end leaves none")
    return stack.sort(dim=0).values[f : n - f].mean(dim=0)


def squared_distances(stack: torch.Tensor) -> torch.Tensor:
    """The ``(n, n)`` matrix of squared Euclidean distances between rows, by one matrix product (in the
    stack's dtype, after centring the rows, which keeps the Gram identity's cancellation small)."""
    s = stack - stack.mean(dim=0)
    sq = (s * s).sum(dim=1)
    d = sq[:, None] + sq[None, :] - 2.0 * (s @ s.T)
    d.clamp_(min=0.0)
    d.fill_diagonal_(0.0)
    return d


def _neighbour_scores(distances: torch.Tensor, f: int) -> torch.Tensor:
    """Sum of each row's squared distances to its ``max(1, n - f - 2)`` nearest other rows."""
    n = distances.shape[0]
    d = distances.clone()
    d.fill_diagonal_(float("inf"))
    return d.topk(max(1, min(n - 1, n - f - 2)), dim=1, largest=False).values.sum(dim=1)


def krum_scores(stack: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row (Blanchard et al. 2017): the sum of its squared distances to its
    ``n - f - 2`` nearest other rows. Krum's guarantee needs ``n > 2f + 2``; that is enforced."""
    n = _check(stack)
    if f < 0 or n <= 2 * f + 2:
        raise ValueError(f"Krum needs n > 2f + 2 (Blanchard et al. 2017); got n={n}, f={f}")
    return _neighbour_scores(squared_distances(stack), f)


def multi_krum(stack: torch.Tensor, f: int, m: int) -> tuple[torch.Tensor, list[int]]:
    """Multi-Krum (Blanchard et al. 2017): the mean of the ``m`` rows with the lowest Krum scores
    (``m = 1`` is Krum), and the indices of those rows in ascending order."""
    n = _check(stack)
    if not 1 <= m <= n:
        raise ValueError(f"multi-Krum keeps m rows with 1 <= m <= n; got m={m}, n={n}")
    scores = krum_scores(stack, f)
    chosen = sorted(scores.argsort(stable=True)[:m].tolist())
    return stack[chosen].mean(dim=0), chosen


def krum(stack: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """Krum (Blanchard et al. 2017): the single row with the lowest score, and its index."""
    return multi_krum(stack, f, 1)


def bulyan(stack: torch.Tensor, f: int) -> tuple[torch.Tensor, list[int]]:
    """Bulyan (El Mhamdi et al. 2018) over Krum. Needs ``n >= 4f + 3``.

    Selection: ``theta = n - 2f`` times, take the Krum winner among the rows not yet selected (scores
    recomputed on the remaining set) and move it to the selection. Aggregation: per coordinate, the
    mean of the ``beta = theta - 2f`` selected values closest to the selection's coordinate-wise median.
    Returns the aggregate and the indices of the selected rows.
    """
    n = _check(stack)
    if f < 0 or n < 4 * f + 3:
        raise ValueError(f"Bulyan needs n >= 4f + 3 (El Mhamdi et al. 2018); got n={n}, f={f}")
    theta, beta = n - 2 * f, n - 4 * f
    full = squared_distances(stack)
    remaining, selected = list(range(n)), []
    for _ in range(theta):
        # Krum on the rows left; late in the loop the set is smaller than 2f + 3 and Krum's neighbourhood
        # n' - f - 2 is clamped to at least one row, as in the paper's recursion
        pick = int(_neighbour_scores(full[remaining][:, remaining], f).argmin())
        selected.append(remaining.pop(pick))
    chosen = stack[selected]
    med = coordinate_median(chosen)
    closest = (chosen - med).abs().topk(beta, dim=0, largest=False).indices
    return chosen.gather(0, closest).mean(dim=0), sorted(selected)


def geometric_median(
    stack: torch.Tensor,
    weights: torch.Tensor | None = None,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, int]:
    """Geometric median by the smoothed Weiszfeld algorithm (RFA, Pillutla et al. 2022, Algorithm 2).

    Minimises ``sum_i a_i max(nu, ||z - x_i||)`` from the weighted mean: each step sets
    ``z = sum_i b_i x_i / sum_i b_i`` with ``b_i = a_i / max(nu, ||z - x_i||)``, until the objective
    improves by less than ``tol`` (relative; RFA's code uses 1e-10) or after ``max_iter`` steps.
    Returns ``z`` and the steps taken.
    """
    n = _check(stack)
    s = stack.double()
    a = torch.full((n,), 1.0 / n, dtype=torch.float64) if weights is None else weights.double() / weights.sum()
    z = (a[:, None] * s).sum(dim=0)

    def objective(point: torch.Tensor) -> float:
        return float((a * (s - point).norm(dim=1).clamp(min=nu)).sum())

    value = objective(z)
    steps = 0
    while steps < max_iter:
        steps += 1
        b = a / (s - z).norm(dim=1).clamp(min=nu)
        z = (b[:, None] * s).sum(dim=0) / b.sum()
        new_value = objective(z)
        if abs(value - new_value) <= tol * max(new_value, EPS):
            break
        value = new_value
    return z.to(stack.dtype), steps


def centered_clipping(stack: torch.Tensor, center: torch.Tensor, tau: float, iters: int = 1) -> torch.Tensor:
    """Centered clipping (Karimireddy et al. 2021): ``iters`` times,
    ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``, starting from ``center`` (the previous
    round's aggregate in the paper). Each row moves the result by at most ``tau / n``."""
    _check(stack)
    if tau <= 0 or iters < 1:
        raise ValueError(f"centered clipping needs tau > 0 and at least one iteration; got tau={tau}, iters={iters}")
    v = center.to(stack.dtype).clone()
    for _ in range(iters):
        diff = stack - v
        factor = (tau / diff.norm(dim=1).clamp(min=EPS)).clamp(max=1.0)
        v = v + (diff * factor[:, None]).mean(dim=0)
    return v


def fltrust(stack: torch.Tensor, server_update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLTrust (Cao et al. 2021): trust score ``TS_i = ReLU(cos(x_i, g0))`` against the server's own update
    ``g0`` (trained on its small root dataset); each ``x_i`` is rescaled to ``||g0||`` and the result is
    ``sum_i TS_i ||g0|| x_i / ||x_i|| / sum_i TS_i`` (zero when every score is zero). Returns it and the scores."""
    _check(stack)
    g0_norm = server_update.norm()
    norms = stack.norm(dim=1).clamp(min=EPS)
    scores = torch.relu((stack @ server_update) / (norms * g0_norm.clamp(min=EPS)))
    total = scores.sum()
    if float(total) <= 0.0:
        return torch.zeros_like(server_update), scores
    rescaled = stack * (g0_norm / norms)[:, None]
    return (scores[:, None] * rescaled).sum(dim=0) / total, scores


def clip_rows(stack: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row scaled to norm at most ``bound``: ``x / max(1, ||x|| / bound)``."""
    _check(stack)
    if bound <= 0:
        raise ValueError(f"the norm bound must be positive, got {bound}")
    return stack / (stack.norm(dim=1) / bound).clamp(min=1.0)[:, None]


def norm_bound(
    stack: torch.Tensor, bound: float, noise_std: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Norm bounding with optional weak differential privacy (Sun et al. 2019): the mean of the rows
    clipped to norm ``bound``, plus ``N(0, noise_std^2 I)`` when ``noise_std > 0``. The noise must come from
    a generator the clients cannot predict (see :func:`fedguard.robust.randomness.secure_generator`)."""
    out = clip_rows(stack, bound).mean(dim=0)
    if noise_std > 0:
        if generator is None:
            raise ValueError("weak-DP noise needs a generator; pass secure_generator()")
        out = out + noise_std * torch.randn(out.shape, generator=generator, dtype=out.dtype)
    return out


# -- pre-aggregators: (n, d) -> (n', d), composable in front of any rule ---------------------------


def nearest_neighbor_mixing(stack: torch.Tensor, f: int) -> torch.Tensor:
    """Nearest-neighbour mixing, NNM (Allouah et al. 2023): each row replaced by the mean of its
    ``n - f`` nearest rows (itself included). Needs ``n > f``. One ``(n, n)`` mixing matrix times the stack."""
    n = _check(stack)
    if f < 0 or n <= f:
        raise ValueError(f"NNM needs n > f (n={n}, f={f})")
    nearest = squared_distances(stack).topk(n - f, dim=1, largest=False).indices
    mixing = torch.zeros(n, n, dtype=stack.dtype)
    mixing.scatter_(1, nearest, 1.0 / (n - f))
    return mixing @ stack


def bucketing(stack: torch.Tensor, bucket_size: int, generator: torch.Generator) -> torch.Tensor:
    """Bucketing (Karimireddy et al. 2022): shuffle the rows at random, average consecutive groups of
    ``bucket_size`` (the last group may be smaller), one row per group. The shuffle must be unpredictable to
    the clients: pass :func:`fedguard.robust.randomness.secure_generator`."""
    n = _check(stack)
    if bucket_size < 1:
        raise ValueError(f"bucket size must be at least 1, got {bucket_size}")
    order = torch.randperm(n, generator=generator)
    groups = order.split(bucket_size)
    return torch.stack([stack[g].mean(dim=0) for g in groups])


def buckets_after(n: int, bucket_size: int) -> int:
    """How many rows bucketing leaves from ``n``."""
    return math.ceil(n / bucket_size)
