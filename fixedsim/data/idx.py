"""Read and write IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number, the dimensions, then the data::

    bytes 0-1   0x00 0x00
    byte  2     type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                           0x0D float32, 0x0E float64
    byte  3     number of dimensions n
    then        n dimensions, each a big-endian 32-bit integer
    then        the elements in C order, each big-endian

A file is decompressed when it begins with the gzip magic bytes ``1f 8b``, whatever its name.

>>> import tempfile, pathlib, numpy as np
>>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
>>> write_idx(path, np.array([3, 1, 4], dtype=np.uint8))
>>> read_idx(path)
array([3, 1, 4], dtype=uint8)
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

__all__ = ["IDXError", "read_idx", "write_idx", "IDX_TYPES"]

#: Type code -> NumPy dtype of the elements as stored (big-endian).
IDX_TYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXError(ValueError):
    """A file is not a well-formed IDX file (the message names the file and what is wrong)."""


def _decompress(raw: bytes, path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IDXError(f"{os.fspath(path)}: corrupt gzip data ({exc})") from exc


def read_idx(path) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a NumPy array.

    Parameters
    ----------
    path : str or os.PathLike
        The file. It is decompressed if it begins with the gzip magic bytes ``1f 8b``;
        the name does not matter.

    Returns
    -------
    numpy.ndarray
        A new, writable array in native byte order, with the dtype of the file's type code
        (uint8, int8, int16, int32, float32 or float64) and the shape its header gives.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    IDXError
        (a ``ValueError``) The file is not well formed: corrupt gzip data, a header shorter
        than it says, a magic number not beginning with two zero bytes, an unknown type code,
        fewer data bytes than the dimensions need (truncated) or more (trailing bytes).
        The message names the file.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.idx"
    >>> write_idx(path, np.arange(6, dtype=np.float32).reshape(2, 3))
    >>> read_idx(path)
    array([[0., 1., 2.],
           [3., 4., 5.]], dtype=float32)
    """
    name = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    compressed = data[:2] == _GZIP_MAGIC
    if compressed:
        data = _decompress(data, path)
    what = "decompressed data" if compressed else "file"
    if len(data) < 4:
        raise IDXError(f"{name}: not an IDX file: the {what} has {len(data)} bytes, "
                       f"fewer than the 4-byte magic number")
    if data[0] != 0 or data[1] != 0:
        raise IDXError(f"{name}: not an IDX file: bad magic number 0x{data[:4].hex()} "
                       f"(an IDX file begins with two zero bytes, then a type code and the "
                       f"number of dimensions)")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X} {IDX_TYPES[c].name}" for c in IDX_TYPES)
        raise IDXError(f"{name}: unknown IDX type code 0x{code:02X} (known: {known})")
    dtype = IDX_TYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXError(f"{name}: truncated IDX header: {ndim} dimensions need {header} bytes, "
                       f"the {what} has {len(data)}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    if any(d < 0 for d in shape):
        raise IDXError(f"{name}: bad IDX header: negative dimension in {shape}")
    count = 1
    for d in shape:
        count *= d
    need = header + count * dtype.itemsize
    if len(data) < need:
        raise IDXError(f"{name}: truncated IDX file: shape {shape} of {dtype.name} needs "
                       f"{need} bytes, the {what} has only {len(data)}")
    if len(data) > need:
        raise IDXError(f"{name}: {len(data) - need} trailing bytes after the IDX data "
                       f"(shape {shape} of {dtype.name} needs {need} bytes, the {what} has "
                       f"{len(data)})")
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header)
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path, array, *, compress: bool | None = None) -> None:
    """Write an array as an IDX file.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write (replaced if it exists).
    array : array_like
        Values of dtype uint8, int8, int16, int32, float32 or float64 (any byte order),
        at most 255 dimensions, each below 2**31.
    compress : bool, optional
        Gzip the file. By default, compress when the name ends in ``.gz``. The gzip header
        holds no time stamp and no file name, so the same array gives the same bytes.

    Raises
    ------
    TypeError
        The dtype has no IDX type code (convert it first, e.g. ``array.astype(np.uint8)``).
    ValueError
        Too many dimensions, or a dimension too large.
    """
    a = np.asarray(array)
    native = a.dtype.newbyteorder("=")
    if native not in _CODES:
        names = ", ".join(dt.name for dt in IDX_TYPES.values())
        raise TypeError(f"IDX has no type code for dtype {a.dtype}; use one of: {names}")
    code = _CODES[native]
    if a.ndim > 255:
        raise ValueError(f"IDX allows at most 255 dimensions, the array has {a.ndim}")
    if any(d >= 2**31 for d in a.shape):
        raise ValueError(f"IDX dimensions must be below 2**31, got shape {a.shape}")
    header = bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">i4").tobytes()
    body = np.ascontiguousarray(a, dtype=IDX_TYPES[code]).tobytes()
    if compress is None:
        compress = os.fspath(path).endswith(".gz")
    with open(path, "wb") as f:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9,
                               mtime=0) as g:
                g.write(header)
                g.write(body)
        else:
            f.write(header)
            f.write(body)
