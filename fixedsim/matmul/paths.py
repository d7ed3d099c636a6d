"""The path table: which kernel computes a matrix product, and why.

Every call of :func:`fixedsim.matmul` (and of the convolutions, which are matrix products)
goes through :data:`PATHS`, a table with one row per kernel. A row says, in words, what it
computes and the proof that it computes the model's bits (:attr:`Path.proof`), and it has two
functions: ``declines(p)``, the first condition under which the row does not apply (a
sentence) or None, and ``run(p)``, the kernel. The rows are tried in the table's order; the
first that does not decline runs. Its name is counted in ``Counters.paths``. The last row,
``general``, applies to every spec and every operand; it is the reference the other rows are
tested against, and it hands elements it cannot prove to the Fraction oracle
(:mod:`fixedsim.reference`).

:func:`explain` says which row runs for given operands and why each row before it declined;
``matmul(..., path=NAME)`` runs one row by name (a ValueError says why when it declines).

A row's ``declines`` looks at the spec, the shapes and the operand scans (:class:`Bits`)
only; ``run`` may still decline on a fact it finds while computing (it then returns None
and the next row is tried; the table's docs say which rows can).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from .. import counters as _counters
from ..compiling import contiguous
from ..formats import FP32, FP64, FixedFormat, FloatFormat
from ..jit import gemm_fixed as _gi
from ..jit import gemm_float as _gf
from ..jit import gemm_fp32 as _g32
from ..jit import quant as _q
from ..quantize import _f32_bits, _f64_bits, _fast_float_params
from ..rounding import Overflow, Rounding
from . import blockfma as _blockfma
from . import exact64 as _exact64
from . import filtered as _filtered
from . import products as _products
from . import scaled as _scaled
from .core import (
    _Bits,
    _chain_declines,
    _chain_result,
    _f32_chain_safe,
    _f32_exact,
    _f32_products_exact,
    _f64_products_exact,
    _first,
    _float64_chain_declines,
    _general,
    _general_at,
    _narrow_params,
    _plain,
    _round_output,
)
from .spec import MatmulSpec

_RNE = Rounding.NEAREST_EVEN


class Product:
    """One 2-D product ``A @ B`` under a spec: what a row of :data:`PATHS` sees.

    Attributes
    ----------
    spec : MatmulSpec
    B : numpy.ndarray, shape (K, N)
        The second operand, quantized to ``spec.input``, float64 (:attr:`A` and :attr:`B` are
        widened on first use when they came as float32; :attr:`A32` and :attr:`B32` read
        them as they came).
    ba, bb : _Bits
        Scans of ``A`` and ``B`` (sizes that bound every value).
    keys : numpy.ndarray
        The five stage keys of the call (:func:`fixedsim.matmul.stage_keys`).
    rb : int
        Random bits of the stochastic input, product and output roundings.
    c : fixedsim.counters.Counters
        The call's counts; a row adds its own. ``c._read`` says whether anything reads
        them (a row must then count the output's events), ``c._steps`` whether the per-step
        events of the product and accumulator stages are asked for (a row must then count
        them; otherwise it may skip them, and the call reports them as None).
    C : numpy.ndarray or None
        The addend, shape (R, N), float64 (``D = C + A B``), or None. Only rows whose
        :attr:`Path.takes` has ``"c"`` see it; the others decline.
    mm : callable or None
        ``mm(scale, Bs, k0, k1)`` returns ``ldexp(A, scale)[:, k0:k1] @ Bs[k0:k1]`` computed
        some other way (the centroid products of :mod:`fixedsim.reuse`, the zero-free product
        of a transposed convolution): any summation order of the same exact products, which the
        exact-accumulation rows may use instead of ``A``.
    a_rows, a_norms : callable or None
        For an ``A`` built only on use: ``a_rows(rows)`` returns ``A[rows]`` (float64,
        C-contiguous) without building the rest, ``a_norms()`` the Euclidean norms of the rows
        of ``A`` as a float64 sum of the squares in some order, then one square root (what
        the ``exact_filtered`` row's bound needs). :meth:`rows_of_A` and the
        ``exact_filtered`` row use them while ``A`` is not built.
    a_fma32 : callable or None
        For an ``A`` built only on use, of float32 values: ``a_fma32(B32, out)`` writes
        into ``out`` (float32, ``(R, N)``) the uncounted FP32 FMA chain of ``A @ B32``
        (float32 ``B``), the same steps in the same order as
        :func:`fixedsim.jit.gemm_fp32.gemm_f32_chain` on the built ``A``, without building it
        (the ``fp32_chain`` and ``fp32_fma`` rows, when nothing reads their steps' events).
    gram : bool
        ``A`` is ``B`` transposed (the Gram product ``B.T @ B`` of ``x.T @ x``, given as
        ``A=None``): ``A`` and ``A32`` are built from ``B`` only where a row reads them,
        :meth:`rows_of_A` reads ``B``'s columns, and ``ba`` is ``bb`` (one scan). The
        ``exact_filtered`` and ``exact_blas`` rows sum ``B.T @ B`` from ``B`` alone
        (:func:`fixedsim.matmul.filtered._gram_chunked`, ``_gram_mm``); the former takes
        its norms from the sum's diagonal.
    """

    def __init__(self, A, B, spec, keys, rb, c, mm=None, ba=None, C=None, bb=None,
                 a_rows=None, a_norms=None, a_fma32=None, gram=False):
        self._A32 = self._B32 = None
        self.gram = bool(gram)
        if self.gram:  # A = B.T, built (C-contiguous, float64) only if a row reads it
            bb = _Bits.of(B) if bb is None else bb
            ba = bb if ba is None else ba
            # built by :attr:`A` and :meth:`rows_of_A` from ``self.B``: a closure over
            # ``self`` stored on ``self`` would be a reference cycle, which keeps the
            # operands alive until the cyclic collector runs (gigabytes at a large batch)
            A = ((B.shape[1], B.shape[0]), None)
        if isinstance(A, tuple):  # ((R, K), make): A is built only if a row reads it
            (self.R, self.K), self._make = A
            self._A = None
        elif A.dtype == np.float32:  # float64 on first use; float32 rows read it as it is
            self.R, self.K = A.shape
            self._A32, self._A = A, None
            self._make = lambda: contiguous(A, np.float64)
        else:
            self.R, self.K = A.shape
            self._make, self._A = None, A
        if B.dtype == np.float32:
            self._B32, self._B = B, None
        else:
            self._B = B
        self.spec, self.keys, self.rb, self.c, self.mm = spec, keys, rb, c, mm
        self.C = C
        self.N = B.shape[1]
        self.ba = _Bits.of(A if self._A32 is not None else self.A) if ba is None else ba
        self.bb = _Bits.of(B) if bb is None else bb
        self._a_rows, self._a_norms, self._a_fma32 = a_rows, a_norms, a_fma32

    @property
    def A(self) -> np.ndarray:
        """The first operand, shape (R, K), quantized to ``spec.input``, float64 (built or
        widened on first use)."""
        if self._A is None:
            self._A = contiguous(self.B.T, np.float64) if self.gram else self._make()
        return self._A

    @property
    def B(self) -> np.ndarray:
        """The second operand, shape (K, N), quantized to ``spec.input``, float64 (widened on
        first use when it came as float32)."""
        if self._B is None:
            self._B = contiguous(self._B32, np.float64)
        return self._B

    @property
    def A32(self) -> np.ndarray:
        """``A`` in float32, C-contiguous and writable (one compiled signature), for rows
        whose operands are float32 values (they check it): the operand as it came when it
        came as float32, without a float64 copy (a Gram product's: ``B32`` transposed)."""
        if self._A32 is None and self._A is None and self.gram:
            self._A32 = _f32_operand(self.B32.T)
        return _f32_operand(self._A32 if self._A32 is not None else self.A)

    @property
    def B32(self) -> np.ndarray:
        """``B`` in float32, as :attr:`A32`."""
        return _f32_operand(self._B32 if self._B32 is not None else self.B)

    @property
    def lazy(self) -> bool:
        """Is ``A`` still unbuilt, with :meth:`rows_of_A` and ``a_norms`` (a Gram product:
        the ``exact_filtered`` row's diagonal) able to work without building it?"""
        return self._A is None and (self.gram or (self._a_rows is not None
                                                  and self._a_norms is not None))

    def rows_of_A(self, rows) -> np.ndarray:
        """``A[rows]`` as float64, C-contiguous (without building ``A`` when :attr:`lazy`)."""
        if self.lazy:
            rows = np.asarray(rows, np.int64)
            if self.gram and self._a_rows is None:  # A = B.T: B's columns
                return np.ascontiguousarray(self.B[:, rows].T)
            return self._a_rows(rows)
        return np.ascontiguousarray(self.A[rows], np.float64)

    @property
    def acc(self):
        return self.spec.accumulator

    def count(self, name, n=1):
        """Add ``n`` to ``c.paths[name]``."""
        self.c.paths[name] = self.c.paths.get(name, 0) + n


def _f32_operand(x) -> np.ndarray:
    """``x`` as a C-contiguous, writable float32 array (copied only where it is not one)."""
    x = np.ascontiguousarray(x, np.float32)
    return x if x.flags.writeable else x.copy()


@dataclasses.dataclass(frozen=True)
class Path:
    """One row of :data:`PATHS`.

    Attributes
    ----------
    name : str
        Its name in ``Counters.paths``, :func:`explain` and ``matmul(..., path=name)``.
    computes : str
        What it computes, and on what, in words.
    proof : str
        Why its bits are the model's (the full argument is in the docstring of ``run``).
    declines : callable
        ``declines(p)``: None when the row applies to the :class:`Product` ``p``, else the
        first condition it fails, as a sentence.
    run : callable
        ``run(p)``: the ``(R, N)`` result in the result format's container, counts added to
        ``p.c``; None when a fact found while computing declines it (then the next row runs).
    takes : frozenset of str
        What the row computes beyond the plain product: ``"c"`` an addend, ``"blockfma"`` a
        :class:`~fixedsim.BlockFMA` accumulator. A row declines what it does not take
        (:func:`declines`), so that nothing is silently left out.
    """

    name: str
    computes: str
    proof: str
    declines: Callable[[Product], str | None]
    run: Callable[[Product], np.ndarray | None]
    takes: frozenset = frozenset()

    def __repr__(self):
        return f"Path({self.name!r})"


def declines(row: Path, p: Product) -> str | None:
    """Why ``row`` does not apply to ``p`` (None: it applies): first what the row does not
    take (an addend, a BlockFMA accumulator), then the row's own conditions."""
    if p.C is not None and "c" not in row.takes:
        return "an addend c is given, which this row does not take"
    if hasattr(p.acc, "extra_bits") and "blockfma" not in row.takes:
        return "the accumulator is a BlockFMA (aligned, truncating adder)"
    return row.declines(p)


# -- exact_blas ----------------------------------------------------------------------------------
def _exact_blas_declines(p):
    acc, ba, bb, K = p.acc, p.ba, p.bb, p.K
    why = _plain(p) or _first(
        (ba.top == -1075 or bb.top == -1075, "an operand is all zeros"),
        (K == 0, "there are no products (K = 0)"))
    if why:
        return why
    bound_bits = ba.span + bb.span
    lsb = ba.lsb + bb.lsb
    why = _first(
        (bound_bits > 52, f"the operands' integer codes need {bound_bits} bits per product "
                          "(more than 52): the data is not fixed-point-like"),
        (bound_bits + math.log2(K) >= 62, "a sum of the integer codes could overflow int64"),
        (lsb < -1022 or ba.top + bb.top + math.log2(K) > 1000,
         "the products' scale is outside float64's normal range"))
    if why:
        return why
    if acc is None:
        if (isinstance(p.spec.result_format, FloatFormat)
                and p.spec.output_rounding is Rounding.DOWN):
            return ("the output rounds DOWN into a float format: the sign of an exact zero "
                    "sum would depend on cancellation")
        return None
    f = acc.fmt
    if not isinstance(f, FixedFormat):
        return "the accumulator is not fixed point"
    bound = math.ldexp(K, ba.top + bb.top)
    return _first(
        (acc.via is not None, "the accumulator passes through a `via` register"),
        (f.frac_length < -lsb, "the accumulator's quantum is coarser than the products' "
                               "(its additions could round)"),
        (bound > f.max or -bound < f.min, "a partial sum could leave the accumulator's range"))


def _exact_blas(p):
    """Exact accumulation of scaled-integer data on float64 BLAS.

    The operands are integers times ``2**lsb``; a chunk of ``Kc`` products of integer codes
    below ``2**span`` sums to less than ``2**53`` in every order, so BLAS is exact; chunks are
    summed in int64. An accumulator qualifies when no block can round or overflow in it. Run
    time decline: the int64 total reaches 2**53 (not exact in float64).
    """
    spec, acc, ba, bb, R, K, N = p.spec, p.acc, p.ba, p.bb, p.R, p.K, p.N
    mm = p.mm or (_gram_mm(p.B) if getattr(p, "gram", False) else _dense_mm(p.A))
    bound_bits = ba.span + bb.span
    kc = max(1, int(2.0**53 // 2.0**bound_bits))
    if kc >= K:
        # K products of codes below 2**bound_bits sum below 2**53 in every order, so the
        # unscaled float64 product is exact too (every partial sum a multiple of 2**lsb,
        # lsb >= -1022, with at most 53 significant bits): one BLAS call, nothing to check
        vals = mm(0, np.asarray(p.B, np.float64), 0, K)
    else:
        Cb = np.ldexp(np.asarray(p.B, np.float64), -bb.lsb)
        Ti = np.zeros((R, N), np.int64)
        for k0 in range(0, K, kc):
            Ti += mm(-ba.lsb, Cb, k0, min(K, k0 + kc)).astype(np.int64)
        if (np.abs(Ti) >= 2**53).any():
            return None
        vals = np.ldexp(Ti.astype(np.float64), ba.lsb + bb.lsb)  # exact
    vals += 0.0  # turns -0 into +0 (IEEE sum of zeros)
    p.count("exact_blas")
    c = p.c
    if acc is None and spec.output is None:  # into float64, where the exact sum already is
        sub = int(np.count_nonzero(np.abs(vals) < FP64.min_normal) - np.count_nonzero(vals == 0))
        c.output += _counters.StageCounts(roundings=vals.size, subnormal=sub)
        return vals
    if acc is not None:
        vals = vals.astype(acc.fmt.dtype)
        if spec.output is None:
            return vals
        vals = vals.astype(np.float64)
    return _round_output(vals.reshape(-1), spec, p.keys, p.rb, c).reshape(R, N)


def _dense_mm(A):
    """The ``mm`` of a plain operand ``A`` (float64 products)."""
    def mm(scale, Bs, k0, k1):
        X = A[:, k0:k1]
        X = np.ldexp(X, scale) if scale else X.astype(np.float64, copy=False)
        return X @ Bs[k0:k1]
    return mm


def _gram_mm(B):
    """The ``mm`` of a Gram product (``A = B.T``), from ``B`` alone (no transposed copy)."""
    def mm(scale, Bs, k0, k1):
        X = B[k0:k1]
        X = np.ldexp(X, scale) if scale else X.astype(np.float64, copy=False)
        return X.T @ Bs[k0:k1]
    return mm


# -- zero_products -------------------------------------------------------------------------------
def _zero_products_declines(p):
    return _plain(p) or _first(
        (p.acc is not None, "there is an accumulator"),
        (p.K == 0, "there are no products (K = 0)"),
        (p.ba.top != -1075 and p.bb.top != -1075, "neither operand is all zeros"))


def _zero_products(p):
    """Exact accumulation when one operand is all zeros (a dead layer: every activation or
    error zero). Every sum is an exact zero: the running sum starts at ``+0``, so, as in the
    general kernel, it is ``-0`` only rounding DOWN with some product ``-0`` (the signs of the
    products, ``signbit(a) xor signbit(b)``, counted with one 0/1 matrix product)."""
    spec = p.spec
    if spec.output_rounding is Rounding.DOWN:
        sa = np.signbit(p.A).astype(np.float64)
        sb = np.signbit(p.B).astype(np.float64)
        neg = sa @ (1.0 - sb) + (1.0 - sa) @ sb  # negative products per output, exact
        vals = np.where(neg > 0, -0.0, 0.0)
    else:
        vals = np.zeros((p.R, p.N))
    p.count("zero_products")
    if spec.output is None:
        p.c.output += _counters.StageCounts(roundings=vals.size)
        return vals
    return _round_output(vals.reshape(-1), spec, p.keys, p.rb, p.c).reshape(vals.shape)


# -- the FMA chains (block 1) --------------------------------------------------------------------
def _fp32_chain_declines(p):
    acc = p.acc
    return _chain_declines(p, lambda a: a.fmt == FP32, "FP32") or _first(
        (acc.block != 1, "the accumulator sums blocks (block > 1), not an FMA chain"),
        (acc.rounding is not _RNE, "the accumulator does not round to nearest even"),
        (acc.overflow is not Overflow.INFINITY, "the accumulator saturates"),
        (not _f32_products_exact(p.ba, p.bb), "a product may be inexact in float32"),
        (p.K >= 2**30, "K >= 2**30"))


def _fp32_chain(p):
    """An FP32 FMA chain (RNE, IEEE overflow, block 1) whose products are exact in float32.

    ``fl32(acc + fl32(a*b))`` is then exactly the one rounding of ``acc + a*b``, so a float32
    loop vectorised over the outputs, keeping ``k`` in order, is bit-identical to the model.
    Its steps count their events unless nobody reads them (:func:`_f32_chain_how`).
    """
    out = np.empty((p.R, p.N), np.float32)
    how = _f32_chain_how(p.c, _f32_chain_safe(p.ba, p.bb, p.K))
    B32 = p.B32
    if how == _g32.F32_UNCOUNTED:
        flags = _f32_uncounted(p, B32, out)
    else:
        flags = _g32.gemm_f32_chain(p.A32, B32, out, how)
    return _chain_result(out, flags, "fp32_chain", p.spec, p.keys, p.rb, p.c)


#: Outputs a row below which an uncounted FP32 chain runs transposed (vectorised over rows).
_NARROW = 16


def _f32_uncounted(p, B32, out):
    """The FMA instruction's chain, uncounted, into ``out``: from ``A`` where it is (a lazily
    built ``A`` whose product offers ``a_fma32``), else from the built ``A``; zero counts.

    A product with fewer than :data:`_NARROW` outputs a row and more rows (a classifier's
    ten) runs as ``(B^T A^T)^T``: every output is the same chain over ``k`` in order, now
    vectorised over the rows instead of over a few columns (64 x 1,000 x 10: 2.3x faster on
    AVX2)."""
    if p._A is None and p._a_fma32 is not None:
        p._a_fma32(B32, out)
    elif p.N < _NARROW < p.R:
        outT = np.empty((p.N, p.R), np.float32)
        _g32.gemm_f32_chain(np.ascontiguousarray(B32.T), np.ascontiguousarray(p.A32.T), outT,
                            _g32.F32_UNCOUNTED)
        out[:] = outT.T
    else:
        return _g32.gemm_f32_chain(p.A32, B32, out, _g32.F32_UNCOUNTED)
    return np.zeros((1, _q.N_FLAGS), np.int64)


def _f32_chain_how(c, safe) -> int:
    """How :func:`fixedsim.jit.gemm_fp32.gemm_f32_chain` runs for a call counting into ``c``:
    uncounted (the FMA instruction alone) when nothing reads ``c``'s events, else counting,
    with no checks for infinite or subnormal sums when ``safe``."""
    if not c._steps:
        return _g32.F32_UNCOUNTED
    return _g32.F32_SAFE if safe else _g32.F32_CHECKED


def _fp32_chain64_declines(p):
    acc = p.acc
    return _chain_declines(p, lambda a: a.fmt == FP32, "FP32") or _first(
        (acc.block != 1, "the accumulator sums blocks (block > 1), not an FMA chain"),
        (acc.rounding is Rounding.STOCHASTIC, "the accumulator rounds stochastically"),
        (not _f64_products_exact(p.ba, p.bb), "a product may be inexact in float64"),
        (p.K >= 2**30, "K >= 2**30"))


def _fp32_fma_declines(p):
    acc = p.acc
    return _fp32_chain64_declines(p) or _first(
        (acc.rounding is not _RNE, "the accumulator does not round to nearest even"),
        (acc.overflow is not Overflow.INFINITY, "the accumulator saturates"),
        (not (_f32_exact(p.ba) and _f32_exact(p.bb)), "an operand is not float32 data"))


def _fp32_fma(p):
    """An FP32 FMA chain (RNE, IEEE overflow, block 1) on float32 data: each step is the FMA
    instruction ``fmaf(a, b, acc)``, whose one rounding of the exact ``acc + a*b`` is the
    model's step. Unread, the instruction alone; counted, with each step's events found
    from a float64 TwoSum of the exact product (:func:`fixedsim.jit.gemm_fp32.gemm_fma32`)."""
    out = np.empty((p.R, p.N), np.float32)
    B32 = p.B32
    if not p.c._steps:  # nothing reads the steps' events: the instruction alone
        flags = _f32_uncounted(p, B32, out)
    else:
        _, _, _, _, ovp, ovn, _ = _fast_float_params(FP32, p.acc.rounding, p.acc.overflow)
        flags = _g32.gemm_fma32(p.A32, B32,
                                np.ascontiguousarray(p.B, np.float64), out, ovp, ovn)
    return _chain_result(out, flags, "fp32_fma", p.spec, p.keys, p.rb, p.c)


def _fp32_chain64(p):
    """An FP32 FMA chain (block 1, deterministic rounding, IEEE or saturating overflow) whose
    products are exact in float64 but not necessarily in float32 (float32 data, wide fixed
    point): TwoSum in float64, round to odd at 53 bits, then the float32 cast corrected by one
    ulp for the directed modes; vectorised over the outputs, ``k`` in order."""
    acc = p.acc
    _, _, _, _, ovp, ovn, _ = _fast_float_params(FP32, acc.rounding, acc.overflow)
    out = np.empty((p.R, p.N), np.float32)
    flags = _g32.gemm_chain32(np.ascontiguousarray(p.A, np.float64),
                              np.ascontiguousarray(p.B, np.float64), out, int(acc.rounding),
                              ovp, ovn)
    return _chain_result(out, flags, "fp32_chain64", p.spec, p.keys, p.rb, p.c)


def _float_chain_declines(p):
    acc = p.acc
    why = _chain_declines(p, lambda a: isinstance(a.fmt, FloatFormat), "a float format")
    if why:
        return why
    f = acc.fmt
    return _first(
        (acc.block != 1, "the accumulator sums blocks (block > 1), not an FMA chain"),
        (acc.rounding is Rounding.STOCHASTIC, "the accumulator rounds stochastically"),
        (f.man_bits > 21, "the accumulator has more than 21 fraction bits"),
        (f.emin < -126 or f.emax > 127, "the accumulator's exponent range exceeds float32's"),
        (not f.subnormals, "the accumulator flushes subnormals"),
        (not _f32_products_exact(p.ba, p.bb), "a product may be inexact in float32"))


def _float_chain(p):
    """An FMA chain (block 1, deterministic rounding) into a float format of at most 21
    significand bits inside float32's range, products exact in float32: TwoSum, round to odd
    at 24 bits, then the branch-free float32 quantizer, vectorised over the outputs. Nearest
    even counts its inexact steps only when the counts are read; unread, into a format of
    narrow range (:func:`_narrow_params`), it runs the FMA instruction in float64 and one
    rounding per step (:func:`fixedsim.jit.gemm_float.gemm_chain_narrow`), and the counting
    kernel recomputes only the rows where a sum reaches the format's top binade."""
    acc, A, B = p.acc, p.A, p.B
    f = acc.fmt
    out = np.empty((p.R, p.N), np.float32)
    rows = None
    narrow = _narrow_params(f) if acc.rounding is _RNE and not p.c._steps else None
    if narrow is not None:  # nobody reads the counts: the FMA instruction, then one rounding
        over = _gf.gemm_chain_narrow(np.ascontiguousarray(A, np.float64),
                                     np.ascontiguousarray(B, np.float64), out, *narrow)
        if not over.any():
            return _chain_result(out, np.zeros((1, _q.N_FLAGS), np.int64), "float_chain",
                                 p.spec, p.keys, p.rb, p.c)
        rows = np.flatnonzero(over)  # a sum reached 2**emax: the counting kernel's rows
    sub = out if rows is None else np.empty((rows.size, out.shape[1]), np.float32)
    flags = _gf.gemm_chain_float((A if rows is None else A[rows]).astype(np.float32),
                                 np.ascontiguousarray(B, np.float32), sub, int(acc.rounding),
                                 *_fast_float_params(f, acc.rounding, acc.overflow),
                                 _f32_bits(f.min_normal), p.c._steps)
    if rows is not None:
        out[rows] = sub
    return _chain_result(out, flags, "float_chain", p.spec, p.keys, p.rb, p.c)


def _fixed_chain_shift(p):
    """``(d, up)``: the accumulator's quantum over the products' is ``2**d``; ``up`` the bits
    the products' codes are scaled up by when the accumulator's grid is finer."""
    d = -(p.ba.lsb + p.bb.lsb) - p.acc.fmt.frac_length
    return d, max(0, -d)


def _fixed_chain_declines(p):
    ba, bb = p.ba, p.bb
    why = _chain_declines(p, lambda a: isinstance(a.fmt, FixedFormat), "fixed point")
    if why:
        return why
    why = _first(
        (p.acc.block != 1, "the accumulator sums blocks (block > 1), not an FMA chain"),
        (ba.top == -1075 or bb.top == -1075, "an operand is all zeros"))
    if why:
        return why
    d, up = _fixed_chain_shift(p)
    return _first(
        (ba.span + bb.span + up > 51, "the products' integer codes need more than 51 bits"),
        (p.acc.fmt.word_length + max(d, 0) > 51,
         "the accumulator's codes, on the products' grid, need more than 51 bits"),
        (ba.lsb + bb.lsb < -1022, "the products' scale is below float64's normal range"))


def _fixed_chain(p):
    """An FMA chain (block 1) into a fixed-point accumulator, operands integers times powers of
    two: codes in float64, every intermediate an integer below 2**52, so each step's rounding,
    saturation or wrap is exact float64 arithmetic, vectorised over the outputs."""
    acc, ba, bb = p.acc, p.ba, p.bb
    f = acc.fmt
    d, up = _fixed_chain_shift(p)
    Ca = np.ldexp(p.A, -ba.lsb + up)
    Cb = np.ascontiguousarray(np.ldexp(p.B, -bb.lsb))
    codes = np.empty((p.R, p.N))
    flags = _gi.gemm_chain_fixed(Ca, Cb, codes, 0, int(acc.rounding), max(d, 0),
                                 float(f.min_code), float(f.max_code),
                                 acc.overflow is Overflow.WRAP, 2.0**f.word_length,
                                 acc.random_bits or 64, p.keys[3])
    vals = np.ldexp(codes, -f.frac_length).astype(f.dtype)
    return _chain_result(vals, flags, "fixed_chain", p.spec, p.keys, p.rb, p.c)


# -- float_chain64: float accumulators, any block -------------------------------------------------
def _float_chain64_declines(p):
    return _float64_chain_declines(p, 51, (Rounding.DOWN,), (
        "the accumulator rounds DOWN (the sign of a zero sum would need more state)")) or _first(
        (not _f64_products_exact(p.ba, p.bb), "a product may be inexact in float64"),
        (p.K >= 2**31, "K >= 2**31"))


def _float_chain64(p):
    """A float accumulator (any block, no ``via``, subnormals on) in every mode but DOWN,
    products exact in float64: block sums and the running sum in float64, each sum's
    exactness checked with TwoSum, the exact sum rounded on its bits (stochastically against
    the general kernel's draws); vectorised over the outputs, ``k`` in order. Elements whose
    sums are not exact in float64, or that overflow without saturating, are recomputed by
    the general kernel. Stochastic rounding counts its events only when they are read."""
    acc = p.acc
    f = acc.fmt
    vals = np.empty((p.R, p.N))
    A = np.ascontiguousarray(p.A, np.float64)
    B = np.ascontiguousarray(p.B, np.float64)
    counts, bad = _gf.gemm_chain_f64(A, B, vals, 0, acc.block, int(acc.rounding),
                                     52 - f.man_bits, f.emin + 1023, _f64_bits(f.min_subnormal),
                                     _f64_bits(f.max), _f64_bits(f.min_normal),
                                     acc.overflow is Overflow.SATURATE, acc.random_bits or 64,
                                     p.keys[3], p.c._steps)
    flags = counts.sum(axis=0)
    if bad.any():
        rows, cols = np.nonzero(bad)
        flags = flags + _general_at(A, B, MatmulSpec(accumulator=acc), p.ba, p.bb, p.keys,
                                    p.rb, rows, cols, vals, p.c)[1]
        p.count("float_chain64_general", rows.size)
    return _chain_result(vals.astype(f.dtype), flags[None, :], "float_chain64", p.spec, p.keys,
                         p.rb, p.c)


# -- general ------------------------------------------------------------------------------------
def _general_row(p):
    return _general(np.ascontiguousarray(p.A, np.float64), p.B, p.spec, p.ba, p.bb, p.keys,
                    p.rb, p.c, p.C)


# -- the table ----------------------------------------------------------------------------------
_EXACT = "exact accumulation"

def _row(module) -> Path:
    """The row a module of its own defines (``NAME``, ``COMPUTES``, ``PROOF``, ``declines``,
    ``run``, optionally ``TAKES``: :mod:`.exact64`, :mod:`.filtered`, :mod:`.scaled`,
    :mod:`.products`, :mod:`.blockfma`)."""
    return Path(module.NAME, module.COMPUTES, module.PROOF, module.declines, module.run,
                frozenset(getattr(module, "TAKES", ())))


#: The rows, in the order they are tried. ``general`` applies to everything.
PATHS: tuple[Path, ...] = (
    Path("exact_blas",
         f"{_EXACT} (or an accumulator that cannot round or overflow) of scaled-integer "
         "(fixed-point-like) data on float64 BLAS, chunks of K summed in int64",
         "every partial sum of a chunk is an integer multiple of 2**lsb below 2**53, so BLAS "
         "sums it exactly in any order",
         _exact_blas_declines, _exact_blas),
    Path("zero_products",
         f"{_EXACT} when one operand is all zeros: signed zeros",
         "every sum is an exact zero; its sign follows the general rule (-0 only rounding "
         "DOWN with a -0 product), counted with one 0/1 matrix product",
         _zero_products_declines, _zero_products),
    _row(_filtered),
    _row(_exact64),
    Path("fp32_chain",
         "an FP32 FMA chain (nearest even, IEEE overflow) whose products are exact in "
         "float32: a float32 loop over the outputs, k in order",
         "fl32(acc + fl32(a*b)) is the one rounding of acc + a*b when a*b is exact in float32",
         _fp32_chain_declines, _fp32_chain),
    Path("fp32_fma",
         "an FP32 FMA chain (nearest even, IEEE overflow) on float32 data: the FMA instruction",
         "fmaf rounds the exact acc + a*b once to nearest even with IEEE overflow, as the "
         "model's step",
         _fp32_fma_declines, _fp32_fma),
    Path("fp32_chain64",
         "an FP32 FMA chain (deterministic rounding, IEEE or saturating) whose products are "
         "exact in float64: TwoSum in float64, round to odd, then into float32",
         "round-to-odd at 53 bits followed by one rounding to 24 bits is the one rounding of "
         "the exact sum (53 >= 24 + 2)",
         _fp32_chain64_declines, _fp32_chain64),
    Path("float_chain",
         "an FMA chain (deterministic rounding) into a float format of at most 21 fraction "
         "bits inside float32's range, products exact in float32: float32 lanes",
         "TwoSum gives the exact sum; round to odd at 24 bits, then one rounding into the "
         "format (24 >= 21 + 2 + 1); unread FP16/FP8 chains run the float64 FMA (proof in "
         "_narrow_params)",
         _float_chain_declines, _float_chain),
    Path("fixed_chain",
         "an FMA chain into a fixed-point accumulator, operands integers times powers of two: "
         "integer codes in float64",
         "every intermediate is an integer below 2**52, so each step's rounding, saturation "
         "or wrap is exact float64 arithmetic",
         _fixed_chain_declines, _fixed_chain),
    Path("float_chain64",
         "a float accumulator (any block, every mode but DOWN) whose products are exact in "
         "float64: block sums and the running sum in float64, rounded on their bits",
         "TwoSum proves each sum exact (elements where it is not are recomputed by the general "
         "kernel), and the exact sum is rounded on its bits as the quantizer does",
         _float_chain64_declines, _float_chain64),
    _row(_scaled),
    _row(_products),
    _row(_blockfma),
    Path("general",
         "every spec: each element step by step, sums as exact floating-point expansions "
         "(Shewchuk), the Fraction oracle for elements it cannot prove",
         "it follows fixedsim.reference.dot step by step; expansions are exact; an element "
         "that would overflow or underflow them, or a draw it cannot decide, goes to the oracle "
         "(a BlockFMA accumulator: the oracle on every element)",
         lambda p: None, _general_row, frozenset({"c", "blockfma"})),
)

_BY_NAME = {row.name: row for row in PATHS}


def row(name) -> Path:
    """The row of :data:`PATHS` named ``name`` (ValueError listing the names otherwise)."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"matmul: unknown path {name!r}; the paths are "
                         f"{', '.join(_BY_NAME)}") from None


def compute(p: Product, path=None) -> np.ndarray:
    """The result of ``p`` by the first row of :data:`PATHS` that applies, or by the row named
    ``path`` (a ValueError saying why when it declines)."""
    if path is not None:
        r = row(path)
        why = declines(r, p)
        out = None if why else r.run(p)
        if out is None:
            raise ValueError(f"matmul: path {path!r} does not apply: "
                             f"{why or 'its run-time check declined'}")
        return out
    for r in PATHS:
        if declines(r, p) is None:
            out = r.run(p)
            if out is not None:
                return out
            if p.mm is not None and hasattr(p.mm, "reset"):
                p.mm.reset()  # a pass that declined: only the path that answers counts
    raise AssertionError("the general path always answers")  # pragma: no cover


@dataclasses.dataclass(frozen=True)
class Explanation:
    """Which row of :data:`PATHS` computes a product, and why each row before it declined.

    Attributes
    ----------
    path : str
        The row that runs.
    declined : tuple of (str, str)
        ``(name, reason)`` of every row tried before it, in the table's order.
    row : Path
        The row that runs (what it computes, its proof).
    """

    path: str
    declined: tuple
    row: Path

    def __str__(self):
        lines = [f"{name}: declined: {why}" for name, why in self.declined]
        lines.append(f"{self.path}: runs: {self.row.computes}")
        lines.append(f"  proof: {self.row.proof}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle):  # IPython shows the text
        printer.text(str(self))


def explain_product(p: Product) -> Explanation:
    """:class:`Explanation` of the :class:`Product` ``p`` (no kernel runs)."""
    declined = []
    for r in PATHS:
        why = declines(r, p)
        if why is None:
            return Explanation(r.name, tuple(declined), r)
        declined.append((r.name, why))
    raise AssertionError("the general path always applies")  # pragma: no cover
