"""Dataset loaders: IDX, CIFAR (restricted unpickling), MedMNIST, registry, embedded mnist-5k."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from fedguard.data import ChecksumMismatchError, DatasetNotFoundError, dataset_names, load_dataset, registry
from fedguard.data.cifar import load_cifar10, load_cifar100, read_cifar_batch, restricted_loads
from fedguard.data.embedded import load_mnist_5k, stratified_split
from fedguard.data.idx import parse_idx, read_idx, read_idx_pair
from fedguard.data.medmnist import load_medmnist

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = SHARED / "mnist"
needs_shared = pytest.mark.skipif(
    not MNIST_DIR.is_dir(),
    reason=f"real MNIST files not found in {SHARED} (benchmark data outside the project)",
)
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def idx_bytes(array: np.ndarray) -> bytes:
    """An uncompressed IDX file holding a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data))
    return path


# ---------------------------------------------------------------- IDX


@needs_shared
def test_idx_reads_real_mnist():
    images, labels = read_idx_pair(MNIST_DIR / "train-images-idx3-ubyte.gz", MNIST_DIR / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]


@needs_shared
def test_load_dataset_mnist_and_fashion_from_shared_folder():
    train, test = load_dataset("mnist", SHARED)
    assert tuple(train.x.shape) == (60000, 1, 28, 28) and len(test) == 10000
    assert float(train.x.min()) == 0.0 and float(train.x.max()) == 1.0
    assert train.num_classes == 10
    f_train, f_test = load_dataset("fashion-mnist", SHARED)
    assert len(f_train) == 60000 and len(f_test) == 10000 and f_train.num_classes == 10


@needs_shared
def test_uncompressed_idx_reads_the_same(tmp_path):
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    assert np.array_equal(read_idx(raw), labels)


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda b: b"\x08\x01" + b[2:], "bad magic number"),
        (lambda b: b[:2] + b"\x07" + b[3:], "unknown dtype code"),
        (lambda b: b[:-5], "truncated"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b + b"\x00\x00", "unexpected bytes"),
        (lambda b: b[:3], "too short"),
    ],
)
def test_corrupt_idx_gives_clear_error(tmp_path, mutate, problem):
    good = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    path = write_gz(tmp_path / "bad-images-idx3-ubyte.gz", mutate(good))
    with pytest.raises(ValueError, match=problem) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_gz(tmp_path / "x-idx3-ubyte.gz", idx_bytes(np.ones((50, 8, 8), np.uint8)))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="gzip data is corrupt or truncated") as err:
        read_idx(path)
    assert "x-idx3-ubyte.gz" in str(err.value)


def test_image_and_label_counts_must_match(tmp_path):
    images = write_gz(tmp_path / "i.gz", idx_bytes(np.zeros((3, 2, 2), np.uint8)))
    labels = write_gz(tmp_path / "l.gz", idx_bytes(np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="3 images but .* 4 labels"):
        read_idx_pair(images, labels)


def test_parse_idx_big_endian_int32():
    header = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big")
    array = parse_idx(header + np.array([1, -2], dtype=">i4").tobytes())
    assert array.tolist() == [1, -2] and array.dtype == np.int32


# ---------------------------------------------------------------- CIFAR


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_tiny_cifar10(folder: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch})
    written = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = _cifar_images(per_batch, i)
        labels = [(i + j) % 10 for j in range(per_batch)]
        _dump(folder / name, {"batch_label": name, "labels": labels, "data": data, "filenames": []})
        written[name] = data
    return written


def test_tiny_cifar10_loads_in_official_layout(tmp_path):
    written = write_tiny_cifar10(tmp_path / "cifar-10-batches-py")
    train, test = load_cifar10(tmp_path / "cifar-10-batches-py")
    assert tuple(train.x.shape) == (20, 3, 32, 32) and tuple(test.x.shape) == (4, 3, 32, 32)
    assert train.x.dtype.is_floating_point and float(train.x.max()) <= 1.0
    row = written["data_batch_1"][1]  # 1024 red, then 1024 green, then 1024 blue, row-major
    assert np.isclose(float(train.x[1, 1, 2, 3]), row[1024 + 2 * 32 + 3] / 255.0)
    assert np.isclose(float(test.x[0, 2, 31, 0]), written["test_batch"][0][2048 + 31 * 32] / 255.0)
    assert train.y[:4].tolist() == [0, 1, 2, 3] and train.labels.dtype == np.int64


def test_tiny_cifar100_with_python2_style_bytes_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _dump(
        folder / "meta",
        {b"fine_label_names": [f"c{i}" for i in range(100)], b"coarse_label_names": ["s"] * 20},
    )
    for name, n in (("train", 6), ("test", 3)):
        batch = {
            b"data": _cifar_images(n, n),
            b"fine_labels": list(range(90, 90 + n)),
            b"coarse_labels": [n] * n,
        }
        _dump(folder / name, batch)
    train, test = load_cifar100(folder)
    assert len(train) == 6 and len(test) == 3 and train.y.tolist() == list(range(90, 96))
    coarse_train, _ = load_cifar100(folder, coarse=True)
    assert coarse_train.y.tolist() == [6] * 6


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": _Exploit(marker)}, protocol=2)
    with pytest.raises(ValueError, match=r"refused global (posix|nt|os)\.system"):
        restricted_loads(payload, "evil")
    assert not marker.exists()
    batch = tmp_path / "data_batch_1"
    batch.write_bytes(payload)
    with pytest.raises(ValueError, match="data_batch_1"):
        read_cifar_batch(batch)


@pytest.mark.parametrize("target", [eval, getattr, io.BytesIO, np.load])
def test_restricted_unpickler_refuses_other_globals(target):
    with pytest.raises(ValueError, match="refused global"):
        restricted_loads(pickle.dumps(target, protocol=2))


def test_restricted_codecs_stand_in_only_does_latin1():
    evil = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x06\x00\x00\x00base64\x86R."
    with pytest.raises(ValueError, match="latin-1"):
        restricted_loads(evil)


# ---------------------------------------------------------------- MedMNIST


def write_tiny_medmnist(path: Path, rgb: bool, label_cols: int = 1) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 10), ("val", 4), ("test", 6)):
        shape = (n, 28, 28, 3) if rgb else (n, 28, 28)
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, label_cols)).astype(np.uint8)
    np.savez_compressed(path, **arrays)


@pytest.mark.parametrize("rgb", [False, True])
def test_tiny_medmnist_loads(tmp_path, rgb):
    path = tmp_path / "tinymnist.npz"
    write_tiny_medmnist(path, rgb)
    splits = load_medmnist(path)
    channels = 3 if rgb else 1
    assert tuple(splits["train"].x.shape) == (10, channels, 28, 28)
    assert len(splits["val"]) == 4 and splits["test"].labels.dtype == np.int64
    with np.load(path) as raw:
        expected = raw["train_images"][2, 5, 7] / 255.0
        assert np.allclose(splits["train"].x[2, :, 5, 7].numpy(), expected)
    train, test = load_dataset("medmnist:tinymnist", tmp_path)
    assert len(train) == 10 and len(test) == 6


def test_medmnist_multilabel_is_refused(tmp_path):
    write_tiny_medmnist(tmp_path / "chesty.npz", rgb=False, label_cols=14)
    with pytest.raises(ValueError, match="multi-label"):
        load_medmnist(tmp_path / "chesty.npz")


def test_medmnist_object_arrays_are_not_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    write_tiny_medmnist(path, rgb=False)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["test_labels"] = np.array([{"a": 1}] * 6, dtype=object)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="obj.npz: unreadable array.*allow_pickle"):
        load_medmnist(path)


# ---------------------------------------------------------------- registry


def test_dataset_names_and_unknown_name():
    names = dataset_names()
    for name in ("mnist-5k", "mnist", "fashion-mnist", "emnist-digits", "cifar10", "cifar100"):
        assert name in names
    assert "medmnist:pathmnist" in names
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist-5k.*cifar100"):
        load_dataset("imagenet", None)


def test_missing_files_offline_name_the_files(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("mnist", tmp_path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert str(tmp_path / "mnist") in message
    for name in registry.MNIST_SHA256:
        assert name in message
    with pytest.raises(DatasetNotFoundError, match="(?s)data_batch_5.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_default_data_dir_comes_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGUARD_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "cifar-100-python")):
        load_dataset("cifar100", None)


def test_download_without_network_raises_not_found(tmp_path, monkeypatch):
    def offline(url: str, timeout: float):
        assert timeout == 10
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(registry, "_open_url", offline)
    with pytest.raises(DatasetNotFoundError, match="(?s)Download failed.*network unreachable"):
        load_dataset("fashion-mnist", tmp_path, download=True)
    with pytest.raises(DatasetNotFoundError, match="(?s)cifar-10-python.tar.gz: .*unreachable"):
        load_dataset("cifar10", tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    write_tiny_cifar10(tmp_path / "cifar-10-batches-py")
    with pytest.raises(ChecksumMismatchError) as err:
        load_dataset("cifar10", tmp_path)
    message = str(err.value)
    assert "data_batch_1" in message and registry.CIFAR10_MD5["data_batch_1"] in message
    assert "expected md5" in message and "Delete it" in message
    write_tiny_medmnist(tmp_path / "pathmnist.npz", rgb=True)
    with pytest.raises(ChecksumMismatchError, match="pathmnist.npz"):
        load_dataset("medmnist:pathmnist", tmp_path)


@needs_shared
def test_download_verifies_and_saves(tmp_path, monkeypatch):
    def from_shared(url: str, timeout: float):
        return open(MNIST_DIR / url.rsplit("/", 1)[1], "rb")

    monkeypatch.setattr(registry, "_open_url", from_shared)
    train, test = load_dataset("mnist", tmp_path, download=True)
    assert len(train) == 60000 and len(test) == 10000
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(registry.MNIST_SHA256)

    monkeypatch.setattr(registry, "_open_url", lambda url, timeout: io.BytesIO(b"not mnist"))
    with pytest.raises(ChecksumMismatchError, match="downloaded .* expected"):
        load_dataset("fashion-mnist", tmp_path, download=True)
    assert not (tmp_path / "fashion-mnist").exists() or not any((tmp_path / "fashion-mnist").iterdir())


def test_archive_download_extracts_only_wanted_files(tmp_path, monkeypatch):
    source = tmp_path / "src" / "cifar-10-batches-py"
    write_tiny_cifar10(source)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(source, arcname="cifar-10-batches-py")
        evil = tarfile.TarInfo("../escaped")
        tar.addfile(evil, io.BytesIO(b""))
    blob = buffer.getvalue()
    spec = registry._SPECS["cifar10"]
    unverified = dataclasses.replace(
        spec,
        files=tuple(registry.FileSpec(f.name) for f in spec.files),
        archive=dataclasses.replace(spec.archive, md5=hashlib.md5(blob).hexdigest()),
    )
    monkeypatch.setitem(registry._SPECS, "cifar10", unverified)
    monkeypatch.setattr(registry, "_open_url", lambda url, timeout: io.BytesIO(blob))
    root = tmp_path / "data"
    train, test = load_dataset("cifar10", root, download=True)
    assert len(train) == 20 and len(test) == 4
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    assert not (tmp_path / "escaped").exists()


def test_emnist_orientation_and_letter_labels(tmp_path):
    folder = tmp_path / "emnist"
    stored = np.zeros((2, 28, 28), dtype=np.uint8)
    stored[:, 0, 5] = 255  # EMNIST stores images transposed: row 0, column 5 on disk ...
    names = registry.emnist_file_names("letters")
    write_gz(folder / names[0], idx_bytes(stored))
    write_gz(folder / names[1], idx_bytes(np.array([1, 26], np.uint8)))
    write_gz(folder / names[2], idx_bytes(stored[:1]))
    write_gz(folder / names[3], idx_bytes(np.array([3], np.uint8)))
    train, test = load_dataset("emnist-letters", tmp_path)
    assert float(train.x[0, 0, 5, 0]) == 1.0 and float(train.x[0, 0, 0, 5]) == 0.0  # ... row 5
    assert train.y.tolist() == [0, 25] and test.y.tolist() == [2]


# ---------------------------------------------------------------- embedded mnist-5k


def test_mnist_5k_is_real_mnist_with_all_classes():
    train, test = load_dataset("mnist-5k", None)
    assert len(train) + len(test) == 5000
    assert (len(train), len(test)) == (4000, 1000)
    assert tuple(train.x.shape[1:]) == (1, 28, 28)
    assert np.bincount(train.labels).tolist() == [400] * 10
    assert np.bincount(test.labels).tolist() == [100] * 10
    assert 0.10 < float(train.x.mean()) < 0.16  # MNIST's mean pixel is about 0.13


def test_mnist_5k_split_is_seeded_and_stratified():
    a_train, a_test = load_mnist_5k(test_fraction=0.3, seed=1)
    b_train, _ = load_mnist_5k(test_fraction=0.3, seed=1)
    c_train, _ = load_mnist_5k(test_fraction=0.3, seed=2)
    assert len(a_test) == 1500 and np.bincount(a_test.labels).tolist() == [150] * 10
    assert bool((a_train.x == b_train.x).all()) and not bool((a_train.x == c_train.x).all())
    labels = np.repeat(np.arange(10), 500)
    train_idx, test_idx = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(5000))
