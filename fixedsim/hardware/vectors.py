"""Measured tensor-core vectors: reading them, and counting a preset's mismatches on them.

The layout is that of the ``model_validation`` folder of Khattak and Mikaitis's
MATLAB-tensor-core repository (BSD 2-Clause; the data ships with its LICENCE):
``<GPU>/<input>/{a,b}_<GPU>_<input>.txt``, ``c_<GPU>_fp32.txt`` and ``d_<GPU>_<out>.txt``.
A row of ``a`` and the same row of ``b`` are the K inputs of one dot product, ``c`` its
addend, ``d`` the result the GPU returned; every value is an FP32 bit pattern, written as 8
hex digits or as a 32-character binary string (both are read). ``<input>`` is ``fp16``,
``bf16``, ``tf32``, ``E4M3`` or ``E5M2``; ``<out>`` is ``fp32`` or ``fp16`` (an FP16 result is
stored as the FP32 pattern of its value).

How the vectors were measured decides the addend the model must be given
(:func:`addend`): an FP16 result came from an instruction with an FP16 accumulator, whose C
was ``c`` rounded to nearest FP16 (``__float2half``); the FP8 results of H100 and H200 into
FP32 were measured with a zero accumulator, as the repository's validation script takes them
(``c`` is then not the C used).

:func:`load` reads a folder or the ``.tar.gz`` that holds one (in memory, nothing unpacked);
:func:`check` runs a preset's spec through :func:`fixedsim.matmul` on every row and counts
the rows whose result differs in any bit (NaN matches NaN).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tarfile

import numpy as np

__all__ = ["Vectors", "load", "addend", "check", "verify", "Result", "FORMAT_NAMES"]

#: Input folder names of the layout -> fixedsim.hardware input names.
FORMAT_NAMES = {"fp16": "fp16", "bf16": "bf16", "tf32": "tf32", "E4M3": "e4m3", "E5M2": "e5m2"}

_D_FILE = re.compile(r"(?:^|/)([A-Za-z0-9]+)/([A-Za-z0-9]+)/d_\1_(fp32|fp16)\.txt$")


@dataclasses.dataclass(frozen=True)
class Vectors:
    """The measured rows of one (GPU, input, output) combination.

    Attributes
    ----------
    device, input, out : str
        fixedsim.hardware names (``"H100"``, ``"e4m3"``, ``"fp32"``).
    a, b : numpy.ndarray, shape (rows, K), float64
    c, d : numpy.ndarray, shape (rows,), float64
        The addend as stored, and the measured result.
    """

    device: str
    input: str
    out: str
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    d: np.ndarray

    @property
    def rows(self) -> int:
        return self.d.size


def _parse(text: str, where: str) -> np.ndarray:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        toks = line.split()
        if not toks:
            continue
        try:
            rows.append([int(t, 2) if len(t) == 32 else int(t, 16) for t in toks])
        except ValueError:
            raise ValueError(f"{where}, line {n}: expected FP32 bit patterns (8 hex digits or "
                             f"32 binary digits), got {line.strip()[:60]!r}") from None
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"{where}, line {n}: {len(rows[-1])} values, the first line has "
                             f"{len(rows[0])}")
    if not rows or any(not 0 <= v < 2**32 for r in rows for v in r):
        raise ValueError(f"{where}: no rows, or a value beyond 32 bits")
    return np.array(rows, np.uint32).view(np.float32).astype(np.float64)


class _Folder:
    def __init__(self, root):
        self.root = root

    def names(self):
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                yield os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")

    def read(self, name):
        with open(os.path.join(self.root, name), encoding="ascii") as fh:
            return fh.read()


class _Tar:
    def __init__(self, path):
        self.tar = tarfile.open(path, "r:*")
        self.members = {m.name: m for m in self.tar.getmembers() if m.isfile()}

    def names(self):
        return iter(self.members)

    def read(self, name):
        return self.tar.extractfile(self.members[name]).read().decode("ascii")


def load(path) -> list[Vectors]:
    """Every combination found under ``path``: a ``model_validation`` folder (or a folder
    above it), or a ``.tar.gz`` holding one (read in memory).

    Returns
    -------
    list of Vectors
        In the order of the file names.

    Raises
    ------
    ValueError
        No combination found, a file missing or not in the layout (named in the message).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        src = _Folder(path)
    elif os.path.isfile(path) and tarfile.is_tarfile(path):
        src = _Tar(path)
    else:
        raise ValueError(f"hardware vectors: {path!r} is neither a folder nor a tar archive")
    names = set(src.names())
    out = []
    for name in sorted(names):
        m = _D_FILE.search(name)
        if not m:
            continue
        gpu, fmt, o = m.groups()
        if fmt not in FORMAT_NAMES:
            continue
        base = name[:m.start(3) - len(f"d_{gpu}_")]
        files = {k: f"{base}{k}_{gpu}_{fmt}.txt" for k in "ab"}
        files["c"] = f"{base}c_{gpu}_fp32.txt"
        missing = [f for f in files.values() if f not in names]
        if missing:
            raise ValueError(f"hardware vectors: {name} has no {', '.join(missing)}")
        a, b = (_parse(src.read(files[k]), files[k]) for k in "ab")
        c = _parse(src.read(files["c"]), files["c"])
        d = _parse(src.read(name), name)
        if a.shape != b.shape or c.shape != (a.shape[0], 1) or d.shape != c.shape:
            raise ValueError(f"hardware vectors: {base}: shapes a {a.shape}, b {b.shape}, "
                             f"c {c.shape}, d {d.shape} do not make one dot product per row")
        out.append(Vectors(gpu, FORMAT_NAMES[fmt], o, a, b, c[:, 0], d[:, 0]))
    if not out:
        raise ValueError(f"hardware vectors: no d_<GPU>_<out>.txt found under {path!r}")
    return out


def addend(v: Vectors) -> np.ndarray:
    """The C each row was measured with (see the module docstring): ``c`` rounded to FP16
    for an FP16 result, zeros for the FP8 rows of H100 and H200 into FP32, else ``c``."""
    from .. import FP16, quantize

    if v.out == "fp16":
        return np.asarray(quantize(v.c, FP16), np.float64)
    if v.device in ("H100", "H200") and v.input in ("e4m3", "e5m2"):
        return np.zeros_like(v.c)
    return v.c


def _same(x, y) -> np.ndarray:
    """Bitwise equality as FP32 values, any NaN equal to any NaN."""
    xb = np.asarray(x, np.float32).view(np.uint32)
    yb = np.asarray(y, np.float32).view(np.uint32)
    return (xb == yb) | (np.isnan(x) & np.isnan(y))


def check(v: Vectors, spec=None) -> np.ndarray:
    """Indices of the rows where ``spec`` (default: the preset of ``v``'s combination)
    differs from the measured result in any bit.

    Each row is one dot product, ``fixedsim.matmul(a[r], b[r], spec, c=addend(v)[r])``. They
    are computed :data:`CHUNK` rows at a time as the diagonal of one matrix product: ``a[r0:r1]
    @ b[r0:r1].T`` with the addend ``c[r]`` on row ``r`` (the off-diagonal elements are
    computed and dropped: far fewer calls than one per row).
    """
    from .. import matmul
    from . import spec as preset

    if spec is None:
        spec = preset(v.device, v.input, v.out)
    c = addend(v)
    d = np.empty(v.rows)
    for r0 in range(0, v.rows, CHUNK):
        r1 = min(v.rows, r0 + CHUNK)
        d[r0:r1] = np.diagonal(matmul(v.a[r0:r1], v.b[r0:r1].T, spec, c[r0:r1, None]))
    return np.flatnonzero(~_same(d, v.d))


#: Rows per matrix product in :func:`check`.
CHUNK = 128


@dataclasses.dataclass(frozen=True)
class Result:
    """One combination checked by :func:`verify`.

    Attributes
    ----------
    device, input, out : str
    rows : int
        Rows checked.
    mismatches : int
        Rows whose result differs in any bit.
    recorded : tuple of (int, int) or None
        ``(rows, mismatches)`` the preset's provenance states for the full data (None: no
        record).
    first : int or None
        Index of the first mismatching row.
    """

    device: str
    input: str
    out: str
    rows: int
    mismatches: int
    recorded: tuple | None
    first: int | None

    @property
    def claims_exact(self) -> bool:
        """Does the preset claim no mismatch on these rows?"""
        return self.recorded is not None and self.recorded[1] == 0

    @property
    def ok(self) -> bool:
        """No mismatch where the preset claims none, and, on the full data, the recorded
        count."""
        if self.claims_exact:
            return self.mismatches == 0
        if self.recorded is not None and self.rows == self.recorded[0]:
            return self.mismatches == self.recorded[1]
        return True


def verify(path, devices=None) -> list[Result]:
    """Every combination under ``path`` (:func:`load`) checked against its preset
    (:func:`check`), with the counts its provenance records (``nvidia.VALIDATION``)."""
    from .nvidia import VALIDATION

    out = []
    for v in load(path):
        if devices is not None and v.device not in devices:
            continue
        bad = check(v)
        out.append(Result(v.device, v.input, v.out, v.rows, int(bad.size),
                          VALIDATION.get((v.device, v.input, v.out)),
                          int(bad[0]) if bad.size else None))
    return out
