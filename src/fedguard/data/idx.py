"""Reader for IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order, big-endian.
Files may be gzip-compressed; compression is detected from the content, not the name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from fedguard.data.arrays import ArrayDataset, from_uint8_images

IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"IDX file {path}: gzip data is corrupt or truncated ({err}); "
            "delete the file and fetch it again"
        ) from None


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into a native-endian array.

    ``source`` names the data in error messages. Raises ``ValueError`` on a bad magic
    number, an unknown dtype code, zero dimensions, or a size that does not match the header.
    """
    if len(data) < 4:
        raise ValueError(f"IDX file {source}: only {len(data)} bytes, too short for a header")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0:
        raise ValueError(
            f"IDX file {source}: bad magic number 0x{data[:4].hex()} "
            "(the first two bytes must be zero); not an IDX file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"IDX file {source}: unknown dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"IDX file {source}: header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(f"IDX file {source}: truncated header ({len(data)} of {header_len} bytes)")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise ValueError(
            f"IDX file {source}: truncated: header says shape {dims} ({expected} bytes of data) "
            f"but only {actual} bytes follow"
        )
    if actual > expected:
        raise ValueError(
            f"IDX file {source}: {actual - expected} unexpected bytes after the {expected} bytes "
            f"of data for shape {dims}"
        )
    array = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip or raw); if ``ndim`` is given, require that many dimensions."""
    path = Path(path)
    array = parse_idx(_read_bytes(path), str(path))
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"IDX file {path}: expected {ndim} dimensions, got shape {array.shape}")
    return array


def read_idx_pair(
    images_path: str | Path, labels_path: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    """Read an images file (N, H, W) uint8 and its labels file (N,) and check they match."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise ValueError(
            f"IDX files {images_path} and {labels_path}: expected uint8 images and labels, "
            f"got {images.dtype} and {labels.dtype}"
        )
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"IDX files do not match: {images_path} holds {images.shape[0]} images but "
            f"{labels_path} holds {labels.shape[0]} labels"
        )
    return images, labels


def load_idx_dataset(
    images_path: str | Path, labels_path: str | Path, name: str, transpose: bool = False
) -> ArrayDataset:
    """An :class:`ArrayDataset` (N, 1, H, W) from an IDX image file and its label file.

    ``transpose`` swaps each image's rows and columns (EMNIST stores images transposed).
    """
    images, labels = read_idx_pair(images_path, labels_path)
    if transpose:
        images = images.transpose(0, 2, 1)
    return from_uint8_images(images, labels, name, layout="NHW")
