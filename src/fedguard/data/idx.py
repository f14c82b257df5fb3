"""Reader for IDX files, the format of MNIST, Fashion-MNIST and EMNIST.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order, big-endian.
Files may be gzip-compressed; compression is detected from the content, not the name.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import IO

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


def _open_idx(path: Path) -> IO[bytes]:
    """``path`` opened for reading its IDX content (gzip detected from the first bytes)."""
    with path.open("rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if gzipped else path.open("rb")


def _read_exactly(stream: IO[bytes], size: int, path: Path) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"IDX file {path}: truncated ({len(data)} of {size} bytes where more were expected)")
    return data


def read_idx_rows(path: str | Path, rows: np.ndarray, chunk_rows: int = 2048) -> np.ndarray:
    """Rows ``rows`` (in that order) of a uint8 IDX images file (N, H, W), streamed from disk:
    the whole file is never held in memory, only the rows asked for and one chunk."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    with _open_idx(path) as stream:
        head = _read_exactly(stream, 4, path)
        if head[:2] != b"\x00\x00" or head[2] != 0x08 or head[3] != 3:
            raise ValueError(f"IDX file {path}: expected uint8 images with 3 dimensions, header 0x{head.hex()}")
        dims = tuple(int.from_bytes(_read_exactly(stream, 4, path), "big") for _ in range(3))
        count, row_bytes = dims[0], dims[1] * dims[2]
        if rows.size and (rows.min() < 0 or rows.max() >= count):
            raise IndexError(f"IDX file {path}: rows must be in 0..{count - 1}")
        wanted = np.unique(rows)
        out = np.empty((wanted.size, dims[1], dims[2]), dtype=np.uint8)
        done, start = 0, 0
        while done < wanted.size:
            n = min(chunk_rows, count - start)
            block = np.frombuffer(_read_exactly(stream, n * row_bytes, path), dtype=np.uint8).reshape(n, *dims[1:])
            upto = int(np.searchsorted(wanted, start + n))
            out[done:upto] = block[wanted[done:upto] - start]
            done, start = upto, start + n
    return out[np.searchsorted(wanted, rows)]
