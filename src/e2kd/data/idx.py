"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx"]

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path, *, fix: str = "") -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array.

    Layout: two zero bytes, a type code, the number of dimensions d, then d big-endian
    uint32 sizes and the data.

    Raises
    ------
    ValueError
        When the file is truncated, corrupt or not IDX; the message names the file and
        ``fix`` (how to get a good copy).
    """
    path = Path(path)
    hint = f" {fix}" if fix else ""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot decompress ({err}); the file is truncated or corrupt.{hint}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()}).{hint}")
    dtype = np.dtype(_DTYPES[raw[2]])
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated IDX header.{hint}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = head + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != need:
        raise ValueError(
            f"{path}: IDX header promises {need} bytes for shape {shape} but the file has {len(raw)}; "
            f"the file is truncated or corrupt.{hint}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="), copy=True)
