"""CIFAR-10 and CIFAR-100 from the official "python version" batch files.

The official batches are pickles. fedguard never lets pickle cross a trust boundary, so they
are read with :class:`RestrictedUnpickler`, whose ``find_class`` refuses every global except
the ones needed to rebuild a numpy array:

* ``numpy.core.multiarray._reconstruct`` (``numpy._core.multiarray._reconstruct`` is the same
  function under its numpy 2 name), ``numpy.ndarray`` and ``numpy.dtype``;
* ``_codecs.encode``, which Python 3 writes into protocol-2 pickles to rebuild ``bytes``
  (the raw array buffer). It is replaced by a stand-in that only turns a ``str`` into
  ``bytes`` with latin-1 and accepts nothing else.

Everything else (``os.system``, ``builtins.eval``, any class) raises
:class:`pickle.UnpicklingError`. Only plain containers, strings, numbers and those arrays
can come out, and the result is then checked against the official layout.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from fedguard.data.arrays import ArrayDataset, from_uint8_images

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN_FILES, "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")


def _latin1_encode(text: Any, encoding: str = "latin1", errors: str = "strict") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            "restricted unpickler: _codecs.encode is only allowed as str -> bytes in latin-1"
        )
    return text.encode("latin1")


# numpy's own array reconstructor, taken from ndarray.__reduce__ so that no private
# module has to be imported (numpy.core in numpy 1, numpy._core in numpy 2).
_RECONSTRUCT = np.zeros(0).__reduce__()[0]

_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global except numpy array reconstruction.

    Allowed: ``numpy.core.multiarray._reconstruct`` (and its numpy 2 name
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray``, ``numpy.dtype``, and
    ``_codecs.encode`` replaced by a latin-1 ``str -> bytes`` stand-in. Nothing else.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy reconstruction global; refuse anything else."""
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(
                f"restricted unpickler refused global {module}.{name}: only numpy array "
                "reconstruction is allowed in dataset files"
            )
        return allowed


def restricted_loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (latin-1 for Python 2 strings).

    Raises ``ValueError`` naming ``source`` if the pickle is corrupt or needs a refused global.
    """
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{source}: {err}") from err
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise ValueError(
            f"{source}: corrupt or truncated pickle ({type(err).__name__}: {err})"
        ) from err


def _load_dict(path: Path) -> dict[str, Any]:
    obj = restricted_loads(path.read_bytes(), str(path))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(path: str | Path, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Read one official batch file: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    ``label_key`` is ``"labels"`` for CIFAR-10 and ``"fine_labels"`` or ``"coarse_labels"``
    for CIFAR-100.
    """
    path = Path(path)
    batch = _load_dict(path)
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(f"{path}: no {key!r} entry (found {sorted(batch)})")
    data, labels = batch["data"], np.asarray(batch[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: 'data' must be a uint8 (N, 3072) array")
    if data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' rows hold {data.shape[1]} values, expected 3072")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {label_key!r} must be {data.shape[0]} integers, got shape {labels.shape}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_label_names(path: str | Path, key: str) -> list[str]:
    """The class names stored under ``key`` in a ``batches.meta`` / ``meta`` file."""
    path = Path(path)
    meta = _load_dict(path)
    names = meta.get(key)
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise ValueError(f"{path}: no list of class names under {key!r}")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _to_dataset(
    parts: list[tuple[np.ndarray, np.ndarray]], num_classes: int, name: str
) -> ArrayDataset:
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels outside 0..{num_classes - 1}")
    return from_uint8_images(images, labels, name, layout="NCHW")


def load_cifar10(folder: str | Path) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 train (50,000) and test (10,000) from a ``cifar-10-batches-py`` folder."""
    folder = Path(folder)
    names = read_label_names(folder / "batches.meta", "label_names")
    train = [read_cifar_batch(folder / f) for f in CIFAR10_TRAIN_FILES]
    test = [read_cifar_batch(folder / "test_batch")]
    return _to_dataset(train, len(names), "cifar10-train"), _to_dataset(
        test, len(names), "cifar10-test"
    )


def load_cifar100(folder: str | Path, coarse: bool = False) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-100 train and test from a ``cifar-100-python`` folder.

    Labels are the 100 fine classes, or the 20 superclasses when ``coarse`` is true.
    """
    folder = Path(folder)
    kind = "coarse" if coarse else "fine"
    names = read_label_names(folder / "meta", f"{kind}_label_names")
    key = f"{kind}_labels"
    train = [read_cifar_batch(folder / "train", key)]
    test = [read_cifar_batch(folder / "test", key)]
    return _to_dataset(train, len(names), "cifar100-train"), _to_dataset(
        test, len(names), "cifar100-test"
    )
