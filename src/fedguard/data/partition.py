"""Split a dataset's examples among federated clients.

Every partitioner takes the label array, returns one sorted ``np.ndarray`` of example indices
per client, and is reproducible: it draws only from ``np.random.default_rng(seed)``, in the
order its docstring gives, so the same (labels, parameters, seed) always give the same split.
The parts are disjoint and together cover every example exactly once.

A split is a :class:`Partition`: one index array and one offset array for all clients (two
numpy arrays whatever the number of clients), read as a sequence of per-client index arrays.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import numpy as np


class Partition(Sequence[np.ndarray]):
    """Each client's example indices, stored compactly: ``indices[offsets[i]:offsets[i + 1]]``.

    Two int64 arrays hold the whole split, so 100,000 clients cost 8 bytes per example plus
    8 per client, and no Python object per client: ``parts[i]`` is a view made on demand.
    It reads like the list of per-client arrays it replaces (``len``, indexing, iteration).
    """

    __slots__ = ("indices", "offsets")

    def __init__(self, indices: np.ndarray, offsets: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets.size < 1 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if self.offsets[-1] != self.indices.size or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must be non-decreasing and end at the number of indices")

    @classmethod
    def from_assignment(cls, assignment: np.ndarray, num_clients: int) -> Partition:
        """From the client id of each example: client i gets its examples in increasing order."""
        order = np.argsort(assignment, kind="stable")
        offsets = np.zeros(num_clients + 1, dtype=np.int64)
        np.cumsum(np.bincount(assignment, minlength=num_clients), out=offsets[1:])
        return cls(order, offsets)

    @classmethod
    def from_parts(cls, parts: Sequence[np.ndarray] | Partition) -> Partition:
        """From one index array per client (kept in the given order)."""
        if isinstance(parts, Partition):
            return parts
        arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        indices = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        return cls(indices, offsets)

    def sizes(self) -> np.ndarray:
        """Examples per client (int64 array)."""
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return self.offsets.size - 1

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, i: slice) -> list[np.ndarray]: ...

    def __getitem__(self, i: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"client {i} is out of range: there are {n} clients")
        return self.indices[self.offsets[j] : self.offsets[j + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for j in range(len(self)):
            yield self.indices[self.offsets[j] : self.offsets[j + 1]]

    def __repr__(self) -> str:
        return f"Partition({len(self)} clients, {self.indices.size} examples)"

    @property
    def nbytes(self) -> int:
        """Memory held by the two arrays."""
        return int(self.indices.nbytes + self.offsets.nbytes)


Parts = Partition


def _as_labels(labels: np.ndarray | Sequence[int]) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise ValueError("labels must be non-negative integers")
    return arr.astype(np.int64, copy=False)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return int(value)


def _check_clients(num_clients: Any, n: int) -> int:
    if isinstance(num_clients, (int, np.integer)) and num_clients > n:
        raise ValueError(
            f"num_clients ({num_clients}) is larger than the number of examples ({n}); use at most {n} clients"
        )
    return _check_int("num_clients", num_clients, 1, n)


def _check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    return float(alpha)


def _groups(assignment: np.ndarray, num_clients: int) -> Parts:
    """Turn a client id per example into sorted index arrays, one per client."""
    return Partition.from_assignment(assignment, num_clients)


def _assign_in_order(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Give the first sizes[0] examples of ``order`` to client 0, the next to client 1, ..."""
    assignment = np.empty(order.size, dtype=np.int64)
    assignment[order] = np.repeat(np.arange(sizes.size), sizes)
    return assignment


def iid(labels: np.ndarray | Sequence[int], num_clients: int, seed: int = 0) -> Parts:
    """Uniformly random split into ``num_clients`` parts whose sizes differ by at most one.

    Draws: one permutation of all examples; client k takes the k-th consecutive block.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients, y.size)
    sizes = np.full(k, y.size // k)
    sizes[: y.size % k] += 1
    order = np.random.default_rng(seed).permutation(y.size)
    return _groups(_assign_in_order(order, sizes), k)


def _dirichlet_assignment(y: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    assignment = np.empty(y.size, dtype=np.int64)
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        proportions = rng.dirichlet(np.full(k, alpha))
        cuts = (np.cumsum(proportions) * idx.size).astype(np.int64)
        cuts[-1] = idx.size
        counts = np.diff(cuts, prepend=0)
        assignment[idx] = np.repeat(np.arange(k), counts)
    return assignment


def _top_up(assignment: np.ndarray, k: int, min_size: int, rng: np.random.Generator) -> int:
    """Move random examples from the largest clients to those below ``min_size``."""
    sizes = np.bincount(assignment, minlength=k)
    moved = 0
    for client in np.flatnonzero(sizes < min_size):
        while sizes[client] < min_size:
            donor = int(np.argmax(sizes))
            take = int(min(min_size - sizes[client], sizes[donor] - min_size))
            chosen = rng.choice(np.flatnonzero(assignment == donor), size=take, replace=False)
            assignment[chosen] = client
            sizes[donor] -= take
            sizes[client] += take
            moved += take
    return moved


def dirichlet(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 10,
) -> Parts:
    """Label-Dirichlet skew (Hsu et al. 2019; Flower's ``DirichletPartitioner``).

    Smaller ``alpha`` gives each client fewer classes; large ``alpha`` approaches IID.
    Algorithm, with ``rng = np.random.default_rng(seed)``: for each class c in increasing
    order, shuffle that class's indices with ``rng.permutation``, draw
    ``p = rng.dirichlet([alpha] * num_clients)``, and give client j the slice
    ``[floor(P[j-1] * n_c), floor(P[j] * n_c))`` where ``P = cumsum(p)``. If some client
    ends up with fewer than ``min_size`` examples, redraw all classes with the same
    generator (continuing its stream), up to ``max_tries`` draws in all. If every draw
    falls short (e.g. 1,000 clients with alpha 0.1), the last draw is topped up: random
    examples move from the largest clients to the short ones, with a ``UserWarning``
    saying how many moved.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients, y.size)
    a = _check_alpha(alpha)
    min_size = _check_int("min_size", min_size, 0, y.size // k)
    max_tries = _check_int("max_tries", max_tries, 1)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        assignment = _dirichlet_assignment(y, k, a, rng)
        if np.bincount(assignment, minlength=k).min() >= min_size:
            return _groups(assignment, k)
    moved = _top_up(assignment, k, min_size, rng)
    warnings.warn(
        f"dirichlet: none of {max_tries} draws gave all {k} clients min_size={min_size} "
        f"examples (alpha={a}); moved {moved} random examples from the largest clients",
        stacklevel=2,
    )
    return _groups(assignment, k)


def shards(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    shards_per_client: int = 2,
    seed: int = 0,
) -> Parts:
    """Pathological non-IID split of McMahan et al. 2017.

    Sort the examples by label, cut them into ``num_clients * shards_per_client`` equal
    shards, and give each client ``shards_per_client`` shards at random. The number of
    examples must be divisible by the number of shards. A shard that straddles a class
    boundary holds two labels, so a client has at most ``shards_per_client`` labels when
    every class size is a multiple of the shard size, and at most twice that otherwise.
    Draws: a permutation of all examples (order within a class), then a permutation of
    the shards (shard ``s`` goes to client ``position_of_s // shards_per_client``).
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients, y.size)
    per_client = _check_int("shards_per_client", shards_per_client, 1)
    num_shards = k * per_client
    if y.size % num_shards:
        raise ValueError(
            f"shards: {y.size} examples do not split into num_clients * shards_per_client = "
            f"{k} * {per_client} = {num_shards} equal shards ({y.size} % {num_shards} = "
            f"{y.size % num_shards}); choose num_clients and shards_per_client whose product "
            f"divides {y.size}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(y.size)
    order = order[np.argsort(y[order], kind="stable")]
    client_of_shard = np.empty(num_shards, dtype=np.int64)
    client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // per_client
    assignment = np.empty(y.size, dtype=np.int64)
    assignment[order] = client_of_shard[np.arange(y.size) // (y.size // num_shards)]
    return _groups(assignment, k)


def quantity_skew(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    alpha: float = 1.0,
    seed: int = 0,
    min_size: int = 1,
) -> Parts:
    """IID labels but unequal client sizes: sizes follow Dir(alpha) (smaller = more unequal).

    Draws: ``p = rng.dirichlet([alpha] * num_clients)``; sizes are ``min_size`` plus
    ``rng.multinomial(n - num_clients * min_size, p)``; then a permutation of all examples
    is cut into consecutive blocks of those sizes. Every client gets at least ``min_size``.
    """
    y = _as_labels(labels)
    k = _check_clients(num_clients, y.size)
    a = _check_alpha(alpha)
    min_size = _check_int("min_size", min_size, 1, y.size // k)
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(k, a))
    sizes = min_size + rng.multinomial(y.size - k * min_size, p)
    return _groups(_assign_in_order(rng.permutation(y.size), sizes), k)


def train_test_split_per_client(
    indices_list: Sequence[np.ndarray], test_fraction: float = 0.2, seed: int = 0
) -> tuple[Partition, Partition]:
    """Split each client's indices into (train, test), both sorted.

    Client i holding n examples gets ``round(test_fraction * n)`` test examples, capped so
    at least one stays for training. Draws: one permutation per client, in client order.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for part in indices_list:
        idx = rng.permutation(np.asarray(part, dtype=np.int64))
        n_test = min(int(round(test_fraction * idx.size)), max(idx.size - 1, 0))
        test.append(np.sort(idx[:n_test]))
        train.append(np.sort(idx[n_test:]))
    return Partition.from_parts(train), Partition.from_parts(test)


SCHEMES: dict[str, Callable[..., Parts]] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity": quantity_skew,
}


def partition(
    labels: np.ndarray | Sequence[int],
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    **kwargs: Any,
) -> Parts:
    """Dispatch to a partitioner by name: ``"iid"``, ``"dirichlet"``, ``"shards"``, ``"quantity"``.

    ``kwargs`` are that partitioner's own parameters (``alpha``, ``min_size``,
    ``shards_per_client``, ...); an unknown scheme or parameter raises ``ValueError``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    func = SCHEMES[scheme]
    allowed = [p for p in inspect.signature(func).parameters if p not in ("labels", "num_clients")]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"scheme {scheme!r} has no parameter {key!r}; allowed: {', '.join(allowed)}")
    return func(labels, num_clients, seed=seed, **kwargs)


def label_matrix(
    labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Counts of each class per client: an int64 array of shape (clients, classes)."""
    y = _as_labels(labels)
    c = int(y.max()) + 1 if num_classes is None else _check_int("num_classes", num_classes, 1)
    if y.max() >= c:
        raise ValueError(f"num_classes={c} but labels go up to {int(y.max())}")
    if not len(parts):
        return np.zeros((0, c), dtype=np.int64)
    compact = Partition.from_parts(parts)
    client = np.repeat(np.arange(len(compact)), compact.sizes())
    flat = y[compact.indices]
    return np.bincount(client * c + flat, minlength=len(compact) * c).reshape(len(compact), c)


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Entropy (bits) of each row's label distribution; rows must be non-empty."""
    p = counts / counts.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=-1)


def partition_summary(
    labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray], num_classes: int | None = None
) -> dict[str, float | int]:
    """Size and label-skew statistics of a partition.

    Sizes: min/median/mean/max and the number of empty clients. Skew, over non-empty
    clients: mean number of classes present, mean label entropy in bits (lower = more
    skewed; compare with the global entropy), and mean total-variation distance between a
    client's label distribution and the global one (0 = IID, near 1 = disjoint labels).
    """
    matrix = label_matrix(labels, parts, num_classes)
    sizes = matrix.sum(axis=1)
    nonempty = matrix[sizes > 0]
    total = matrix.sum(axis=0)
    global_p = total / total.sum()
    client_p = nonempty / nonempty.sum(axis=1, keepdims=True) if nonempty.size else nonempty
    tv = 0.5 * np.abs(client_p - global_p).sum(axis=1) if nonempty.size else np.zeros(0)
    return {
        "num_clients": int(matrix.shape[0]),
        "num_examples": int(sizes.sum()),
        "num_classes": int(matrix.shape[1]),
        "size_min": int(sizes.min()) if sizes.size else 0,
        "size_median": float(np.median(sizes)) if sizes.size else 0.0,
        "size_mean": float(sizes.mean()) if sizes.size else 0.0,
        "size_max": int(sizes.max()) if sizes.size else 0,
        "empty_clients": int((sizes == 0).sum()),
        "mean_classes_per_client": float((nonempty > 0).sum(axis=1).mean()) if tv.size else 0.0,
        "mean_label_entropy_bits": float(_entropy_bits(nonempty).mean()) if tv.size else 0.0,
        "global_label_entropy_bits": float(_entropy_bits(total[None, :])[0]),
        "mean_tv_from_global": float(tv.mean()) if tv.size else 0.0,
    }


def _client_rows(matrix: np.ndarray, max_rows: int) -> list[str]:
    k, c = matrix.shape
    show = np.arange(k) if k <= max_rows else np.unique(np.linspace(0, k - 1, max_rows).round())
    per_class = c <= 20
    head = " ".join(f"{j:>5}" for j in range(c)) if per_class else "classes  top-class share"
    rows = [f"{'client':>7} {'size':>7}  {head}"]
    for i in show.astype(int):
        counts, size = matrix[i], int(matrix[i].sum())
        if per_class:
            body = " ".join(f"{int(v):>5}" for v in counts)
        else:
            top = int(counts.argmax())
            share = counts[top] / size if size else 0.0
            body = f"{int((counts > 0).sum()):>7}  {top:>9} {share:>5.0%}"
        rows.append(f"{i:>7} {size:>7}  {body}")
    if k > max_rows:
        rows.append(f"({len(show)} of {k} clients shown, evenly spaced)")
    return rows


def describe_partition(
    labels: np.ndarray | Sequence[int],
    parts: Sequence[np.ndarray],
    num_classes: int | None = None,
    max_rows: int = 20,
) -> str:
    """A printable report: summary statistics, then label counts for up to ``max_rows`` clients.

    With more than 20 classes the per-client row shows the number of classes present and
    the most common class with its share instead of every count.
    """
    s = partition_summary(labels, parts, num_classes)
    lines = [
        f"{s['num_clients']} clients, {s['num_examples']} examples, {s['num_classes']} classes",
        f"client size: min {s['size_min']}, median {s['size_median']:g}, "
        f"mean {s['size_mean']:.1f}, max {s['size_max']} ({s['empty_clients']} empty)",
        f"classes per client: mean {s['mean_classes_per_client']:.2f}",
        f"label entropy per client: mean {s['mean_label_entropy_bits']:.3f} bits "
        f"(global {s['global_label_entropy_bits']:.3f} bits)",
        f"distance from global label distribution (TV): mean {s['mean_tv_from_global']:.3f}",
        "",
    ]
    matrix = label_matrix(labels, parts, num_classes)
    return "\n".join(lines + _client_rows(matrix, max(1, max_rows)))


def configured_partition(data: Any, seed: int, labels: np.ndarray) -> Partition:
    """Split ``labels`` as a ``[data]`` config section says (``partition``, ``num_clients``, ``alpha``,
    ``shards_per_client``) with ``run.seed``: the one split the simulation and every network client share."""
    from fedguard.core.pipeline import ConfigurationError

    kwargs: dict[str, Any] = {}
    if data.partition in ("dirichlet", "quantity"):
        kwargs["alpha"] = data.alpha
    if data.partition == "shards":
        kwargs["shards_per_client"] = data.shards_per_client
    try:
        return partition(labels, data.num_clients, data.partition, seed, **kwargs)
    except ValueError as exc:
        raise ConfigurationError(f"data: cannot split {len(labels)} examples this way: {exc}") from exc
