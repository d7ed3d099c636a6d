"""Matrix products and convolutions computed the way a multiply-accumulate array computes them.

:class:`MatmulSpec` names every rounding of a matrix product; :func:`matmul` and
:func:`conv2d` compute it bit for bit. The semantics are those of
:func:`fixedsim.reference.dot` (see docs/matmul.md):

1. the inputs are quantized to ``spec.input`` with ``spec.input_rounding`` (None: taken as
   they are);
2. each product ``a[i, k] * b[k, j]`` is exact, or rounded into ``spec.product``;
3. accumulation: exact when ``spec.accumulator`` is None; else, for ``k = 0..K-1`` in order,
   each block of ``block`` consecutive products is summed exactly and added to the running sum
   (which starts at +0) with one rounding into the accumulator format, per its rounding and
   overflow rule (``block=1``: a chain of fused multiply-adds);
4. one rounding into ``spec.output`` with ``spec.output_rounding`` (output None: the
   accumulator's value; with no accumulator either, the exact sum rounded into float64).

Which kernel computes a call is an implementation detail that never changes a bit
(:mod:`fixedsim.counters` records it): exact fixed-point-like accumulation runs on float64 BLAS
when a bound proves every partial sum an integer below 2**53; an FP32 fused-multiply-add chain
with products exact in float32 runs as a float32 loop that keeps the order, and one with
products exact only in float64 (float32 data) as a float64 TwoSum loop rounding to odd; other
block-1 chains into small float or fixed-point formats have their own loops; everything else
runs in the general kernel of :mod:`fixedsim.jit.gemm`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numba
import numpy as np

from . import counters as _counters
from . import reference
from .formats import FP32, FP64, FixedFormat, FloatFormat, _to_float_toward_zero
from .jit import conv as _conv
from .jit import gemm as _g
from .jit import quant as _q
from .jit.rng import random_u64_array
from .quantize import (
    FLAG_COLUMNS,
    _as_float_array,
    _check_format,
    _check_random_bits,
    _f32_bits,
    _f64_bits,
    _fast_float_params,
    _kernel_params,
    _run,
    random_key,
    resolve_overflow,
)
from .rounding import Overflow, Rounding

__all__ = ["Accumulator", "MatmulSpec", "matmul", "conv2d", "conv2d_grad_input",
           "conv2d_grad_weight", "stage_keys"]

_RNE = Rounding.NEAREST_EVEN

#: Fast paths on (tests turn them off to compare with the general kernel).
_FAST_PATHS = True


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """The running sum of a multiply-accumulate array.

    Parameters
    ----------
    fmt : FixedFormat or FloatFormat
        Format of the running sum.
    rounding : Rounding or str, default NEAREST_EVEN
        Rounding of each addition into ``fmt``.
    overflow : Overflow or str, optional
        Applied at every step: SATURATE or WRAP for fixed point (default SATURATE);
        INFINITY (IEEE default) or SATURATE for floats.
    block : int, default 1
        Products summed exactly before each rounding: 1 is a chain of fused multiply-adds,
        larger values model the exact dot-product units of matrix engines.
    random_bits : int, optional
        STOCHASTIC only: random bits per rounding (1 to 64, default 64).
    via : FloatFormat, optional
        A wider register the sum passes through: each step is rounded to nearest-even into
        ``via`` first, then into ``fmt`` (the double rounding of a kernel that adds in FP32
        and stores FP16). None: one rounding per step.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.Accumulator(fs.FixedFormat(24, 16), "toward_zero", "wrap")
    Accumulator(Q<24,16>, TOWARD_ZERO, WRAP, block=1)
    """

    fmt: FixedFormat | FloatFormat
    rounding: Rounding = _RNE
    overflow: Overflow | None = None
    block: int = 1
    random_bits: int | None = None
    via: FloatFormat | None = None

    def __post_init__(self):
        fmt = _check_format(self.fmt)
        rounding = Rounding.coerce(self.rounding, what="Accumulator rounding")
        object.__setattr__(self, "fmt", fmt)
        object.__setattr__(self, "rounding", rounding)
        object.__setattr__(self, "overflow", resolve_overflow(fmt, self.overflow))
        if isinstance(self.block, bool) or not isinstance(self.block, numbers.Integral):
            raise TypeError(f"Accumulator block must be an int >= 1, got {self.block!r}")
        if self.block < 1:
            raise ValueError(f"Accumulator block must be >= 1 (products summed exactly per "
                             f"rounding), got {self.block}")
        object.__setattr__(self, "block", int(self.block))
        if self.random_bits is not None:
            _check_random_bits(rounding, self.random_bits)
        if self.via is not None and not isinstance(self.via, FloatFormat):
            raise TypeError(f"Accumulator via must be a FloatFormat or None, got {self.via!r}")

    def __repr__(self):
        rb = "" if self.random_bits is None else f", random_bits={self.random_bits}"
        via = "" if self.via is None else f", via={self.via!r}"
        return (f"Accumulator({self.fmt!r}, {self.rounding.name}, {self.overflow.name}, "
                f"block={self.block}{rb}{via})")


def _fmt_or_none(v, name):
    if v is None:
        return None
    try:
        return _check_format(v)
    except TypeError:
        raise TypeError(f"MatmulSpec {name} must be a FixedFormat, a FloatFormat or None, "
                        f"got {v!r}") from None


@dataclasses.dataclass(frozen=True)
class MatmulSpec:
    """Every rounding of a matrix product (see the module docstring and docs/matmul.md).

    Parameters
    ----------
    input : FixedFormat or FloatFormat, optional
        Both operands are quantized to it first (None: taken as they are).
    product : FixedFormat or FloatFormat, optional
        Each product is rounded into it (None: exact).
    accumulator : Accumulator, FixedFormat or FloatFormat, optional
        The running sum (a format means ``Accumulator(fmt)``); None: exact accumulation.
    output : FixedFormat or FloatFormat, optional
        The result is rounded once into it. None: the accumulator's values; with no
        accumulator either, the exact sums rounded into float64.
    output_rounding : Rounding or str, default NEAREST_EVEN
    seed : int, numpy.random.Generator or None
        Random stream of the stochastic stages, as for :func:`fixedsim.quantize` (an int: the
        same draws every call; a Generator: fresh draws per call; None: fresh entropy).
    input_rounding, product_rounding : Rounding or str, default NEAREST_EVEN
    random_bits : int, optional
        Random bits of the stochastic input, product and output roundings (default 64).

    Raises
    ------
    ValueError
        A rounding given for a stage that does not round (``input_rounding`` without
        ``input``, ``product_rounding`` without ``product``, ``output_rounding`` other than
        NEAREST_EVEN with an accumulator and no output), ``random_bits`` with no stochastic
        stage.

    Examples
    --------
    >>> import fixedsim as fs
    >>> fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32, output=fs.FP16)
    MatmulSpec(input=FP16, accumulator=Accumulator(FP32, NEAREST_EVEN, INFINITY, block=1), \
output=FP16)
    """

    input: FixedFormat | FloatFormat | None = None
    product: FixedFormat | FloatFormat | None = None
    accumulator: Accumulator | None = None
    output: FixedFormat | FloatFormat | None = None
    output_rounding: Rounding = _RNE
    seed: object = None
    input_rounding: Rounding = _RNE
    product_rounding: Rounding = _RNE
    random_bits: int | None = None

    def __post_init__(self):
        for name in ("input", "product", "output"):
            object.__setattr__(self, name, _fmt_or_none(getattr(self, name), name))
        acc = self.accumulator
        if acc is not None and not isinstance(acc, Accumulator):
            acc = Accumulator(_fmt_or_none(acc, "accumulator"))
        object.__setattr__(self, "accumulator", acc)
        for name in ("output_rounding", "input_rounding", "product_rounding"):
            object.__setattr__(self, name, Rounding.coerce(getattr(self, name), what=name))
        for stage, rnd in (("input", "input_rounding"), ("product", "product_rounding")):
            if getattr(self, stage) is None and getattr(self, rnd) is not _RNE:
                raise ValueError(f"MatmulSpec {rnd}={getattr(self, rnd).name} has no effect: "
                                 f"{stage} is None (nothing is rounded there)")
        if self.output is None and acc is not None and self.output_rounding is not _RNE:
            raise ValueError(f"MatmulSpec output_rounding={self.output_rounding.name} has no "
                             "effect: output is None, so the result is the accumulator's value")
        if self.random_bits is not None:
            if Rounding.STOCHASTIC not in self._stage_roundings():
                raise ValueError("MatmulSpec random_bits applies to stochastic input, product "
                                 "or output rounding, and none of them is STOCHASTIC")
            _check_random_bits(Rounding.STOCHASTIC, self.random_bits)
        if not (self.seed is None or isinstance(self.seed, np.random.Generator)):
            random_key(self.seed)  # type and range check

    def _stage_roundings(self):
        r = []
        if self.input is not None:
            r.append(self.input_rounding)
        if self.product is not None:
            r.append(self.product_rounding)
        if self.output is not None or self.accumulator is None:
            r.append(self.output_rounding)
        return r

    @property
    def stochastic(self) -> bool:
        """Does any stage round stochastically (so a seed matters)?"""
        acc = self.accumulator
        return (Rounding.STOCHASTIC in self._stage_roundings()
                or (acc is not None and acc.rounding is Rounding.STOCHASTIC))

    @property
    def result_format(self):
        """Format of the result: ``output``, else the accumulator's, else FP64."""
        if self.output is not None:
            return self.output
        return self.accumulator.fmt if self.accumulator is not None else FP64

    def __repr__(self):
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != f.default:
                parts.append(f"{f.name}={v.name if isinstance(v, Rounding) else repr(v)}")
        return f"MatmulSpec({', '.join(parts)})"


# -- data checks that choose a kernel ------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Bits:
    """Finite nonzero values of an array as integers ``C * 2**lsb``: sizes that bound them."""

    finite: bool
    sig: int  # most significant bits of any value
    lsb: int  # smallest exponent of a last set bit
    top: int  # every |value| < 2**top
    span: int  # every |value| < 2**(lsb + span): the integer codes have at most span bits

    @classmethod
    def of(cls, x: np.ndarray) -> _Bits:
        flat = np.ascontiguousarray(x, dtype=np.float64).reshape(-1).view()
        flat.setflags(write=False)  # always read-only: one compiled signature
        nonfinite, sig, lsb, top = _g.operand_bits(flat)
        if top == -4096:  # no finite nonzero value
            return cls(nonfinite == 0, 0, 0, -1075, 0)
        return cls(nonfinite == 0, int(sig), int(lsb), int(top), int(top - lsb))


def _stage_params(fmt, rounding, overflow, rbits, key):
    P, U, D = _kernel_params(fmt, rounding, overflow, rbits)
    Psr = _kernel_params(fmt, _RNE, overflow, rbits)[0]
    U = U.copy()
    U[_q.U_KEY] = key
    U.setflags(write=False)  # parameters are read-only everywhere: one compiled signature
    prec = (fmt.word_length <= 51) if isinstance(fmt, FixedFormat) else (fmt.man_bits <= 50)
    wrap = (math.ldexp(1.0, 51 - fmt.frac_length)
            if isinstance(fmt, FixedFormat) and overflow is Overflow.WRAP else 0.0)
    return P, Psr, U, D, prec, wrap


def _setup(op, spec, seed, stats):
    """Checked spec, stage keys, random bits and a fresh Counters for one call; its events
    are read when ``stats`` or a :func:`fixedsim.counters.record` block is active."""
    spec = MatmulSpec() if spec is None else spec
    if not isinstance(spec, MatmulSpec):
        raise TypeError(f"{op}: spec must be a MatmulSpec, got {type(spec).__name__}")
    keys = stage_keys(spec.seed if seed is None else seed) if spec.stochastic else \
        np.zeros(5, np.uint64)
    rb = 64 if spec.random_bits is None else spec.random_bits
    c = _counters.Counters(calls=1)
    c._read = bool(stats) or _counters._recording()
    return spec, keys, rb, c


def _check_operands(a, b):
    a = _as_float_array(a, "a")
    b = _as_float_array(b, "b")
    if a.ndim < 2:
        raise ValueError(f"matmul: a must have shape (M, K) or (..., M, K), got {a.shape}")
    if b.ndim != 2:
        raise ValueError(f"matmul: b must have shape (K, N), got {b.shape}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"matmul: shapes do not match: a {a.shape} has K={a.shape[-1]}, "
                         f"b {b.shape} has K={b.shape[0]}")
    return a, b


def _check_finite_for_fixed(spec, a, b, op="matmul", names=("a", "b")):
    fixed = [(name, f) for name, f in (
        ("input", spec.input), ("product", spec.product),
        ("accumulator", spec.accumulator.fmt if spec.accumulator else None),
        ("output", spec.output)) if isinstance(f, FixedFormat)]
    if not fixed:
        return
    for arr, name in zip((a, b), names, strict=True):
        if not np.isfinite(arr).all():
            stage, f = fixed[0]
            raise ValueError(f"{op}: {name} contains NaN or infinity, which the fixed-point "
                             f"format {f!r} (spec.{stage}) cannot represent")


def _quantize_input(x, fmt, rounding, rbits, key, counts):
    if fmt is None:
        return np.ascontiguousarray(x, dtype=np.float64)
    arr = np.ascontiguousarray(x)
    out, c = _run(arr, fmt, rounding, resolve_overflow(fmt, None), rbits, key, True)
    counts += _counters.StageCounts.from_flags(c, arr.size)
    return out.astype(np.float64, copy=False)


def stage_keys(seed) -> np.ndarray:
    """The random keys of the five stochastic stages of a matrix product, from one seed.

    Stage ``s`` (:data:`fixedsim.reference.STAGE_INPUT_A` ... ``STAGE_OUTPUT``) draws
    ``random_u64(keys[s], i) >> (64 - random_bits)`` for its ``i``-th rounding, where
    ``keys = random_u64(random_key(seed), 0..4)`` (:mod:`fixedsim.jit.rng`).
    """
    return random_u64_array(random_key(seed), 0, 5)


def matmul(a, b, spec: MatmulSpec | None = None, *, seed=None, stats=False):
    """Matrix product ``a @ b`` computed as ``spec`` says, bit for bit.

    Parameters
    ----------
    a : array_like, shape (M, K) or (..., M, K)
    b : array_like, shape (K, N)
    spec : MatmulSpec, optional
        Default ``MatmulSpec()``: exact products and sums, one rounding into float64.
    seed : int, numpy.random.Generator, optional
        Overrides ``spec.seed`` for this call (e.g. a fresh seed per training step).
    stats : bool, default False
        Also return the call's :class:`fixedsim.counters.Counters`.

    Returns
    -------
    numpy.ndarray, shape (..., M, N)
        dtype of the container of ``spec.result_format`` (float32 when exact in it).

    Raises
    ------
    ValueError
        Shapes that do not match; NaN or infinity where a fixed-point format is in the spec.

    Notes
    -----
    Random draws (STOCHASTIC stages): each stage has its own key derived from the seed; the
    draw of a rounding is indexed by the operand element (inputs), ``o * K + k`` (products),
    ``o * nblocks + t`` (accumulator block ``t``) or ``o`` (output), ``o`` the flat index of
    the output element, so results do not depend on threads or on the kernel chosen.

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> a = np.array([[1.0, 2.0**-11, 2.0**-11]])
    >>> b = np.ones((3, 1))
    >>> fs.matmul(a, b, fs.MatmulSpec(output=fs.FP16))           # exact sum, one rounding
    array([[1.0009766]], dtype=float32)
    >>> fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP16))      # FP16 FMA chain: both lost
    array([[1.]], dtype=float32)
    >>> fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, block=4)))
    array([[1.0009766]], dtype=float32)
    """
    spec, keys, rb, c = _setup("matmul", spec, seed, stats)
    a, b = _check_operands(a, b)
    _check_finite_for_fixed(spec, a, b)
    aq = _quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], c.input)
    bq = _quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], c.input)
    batch = a.shape[:-2]
    M, K = a.shape[-2:]
    N = b.shape[1]
    A = aq.reshape(int(np.prod(batch, dtype=np.int64)) * M, K)
    R = A.shape[0]
    c.macs = R * N * K
    res = _product(A, bq, spec, keys, rb, c)
    _counters._publish(c)
    out = res.reshape(*batch, M, N)
    return (out, c) if stats else out


def _product(A, B, spec, keys, rb, c, mm=None, ba=None):
    """``(R, N)`` result of the 2-D product in the result format's container; counts into c.

    ``mm(scale, Bs, k0, k1)``, when given, must return ``ldexp(A, scale)[:, k0:k1] @
    Bs[k0:k1]`` computed some other way (the centroid products of :mod:`fixedsim.reuse`); the
    exact-accumulation paths use it instead of the product of ``A`` (which is any summation
    order of the same exact products, so their proofs hold). The other paths use ``A``,
    which may then be given as a ``(shape, make)`` pair, ``make()`` building it only when a
    path needs it, with ``ba`` its :class:`_Bits`.
    """
    if isinstance(A, tuple):
        (R, K), make = A
        A = np.broadcast_to(np.float64(0), (R, K))  # its shape only, until a path needs it
    else:
        R, K = A.shape
        make = None
    N = B.shape[1]
    acc = spec.accumulator
    ba, bb = _Bits.of(A) if ba is None else ba, _Bits.of(B)
    nblocks = -(-K // acc.block) if acc is not None else 0
    if acc is not None:
        c.accumulator.roundings += R * N * nblocks
    if spec.product is not None:
        c.product.roundings += R * N * K
    out = None
    if _FAST_PATHS and spec.product is None and ba.finite and bb.finite:
        out = _exact_blas(A, B, spec, ba, bb, keys, rb, c, mm)
        if out is None and mm is not None and hasattr(mm, "reset"):
            mm.reset()  # a declined exact_blas pass: only the path that answers counts
        if out is None and make is not None:
            A, make = make(), None
        if out is None:
            out = _zero_products(A, B, spec, ba, bb, keys, rb, c)
        if out is None:
            out = _exact_filtered(A, B, spec, ba, bb, keys, rb, c, mm)
        for path in (_fp32_chain, _fp32_chain64, _float_chain, _fixed_chain,
                     _float_chain64):
            if out is None:
                out = path(A, B, spec, ba, bb, keys, rb, c)
    if out is None:
        if make is not None:
            A = make()
        out = _general(A, B, spec, ba, bb, keys, rb, c)
    return out


#: Outputs with fewer elements are rounded by the quantizer on one Numba thread.
_SERIAL_OUTPUT = 2**20


def _round_output(vals, spec, keys, rb, c):
    """Round exact values (flat output order; float64, or float32 where they all are float32
    values, which the quantizer's float32 kernels take about 5x faster) into the output
    format, counting when anything reads the counts (otherwise the quantizer may take a
    kernel that does not count).

    Small outputs are rounded on one Numba thread: the values often come straight from a
    BLAS call, whose OpenBLAS workers spin for a while after it, and a parallel kernel
    started then waits for a CPU (a 128x128 exact product took 3.9 ms instead of 0.17 on
    two cores). The bits do not depend on the thread count.
    """
    fmt = spec.output if spec.output is not None else FP64
    args = (np.ascontiguousarray(vals), fmt, spec.output_rounding, resolve_overflow(fmt, None),
            rb, keys[4], c._read)
    if vals.size < _SERIAL_OUTPUT:
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            out, f = _run(*args)
        finally:
            numba.set_num_threads(threads)
    else:
        out, f = _run(*args)
    if f is not None:
        c.output += _counters.StageCounts.from_flags(f, vals.size)
    return out


def _dense_mm(A):
    """The ``mm`` of :func:`_product` for a plain operand ``A`` (float64 products)."""
    def mm(scale, Bs, k0, k1):
        X = A[:, k0:k1]
        X = np.ldexp(X, scale) if scale else X.astype(np.float64, copy=False)
        return X @ Bs[k0:k1]
    return mm


def _exact_blas(A, B, spec, ba, bb, keys, rb, c, mm=None):
    """Exact accumulation of scaled-integer data on float64 BLAS, or None when not provable.

    The operands are integers times ``2**lsb``; a chunk of ``Kc`` products of integer codes
    below ``2**span`` sums to less than ``2**53`` in every order, so BLAS is exact; chunks are
    summed in int64. An accumulator qualifies when no block can round or overflow in it.
    """
    acc = spec.accumulator
    R, K = A.shape
    N = B.shape[1]
    if ba.top == -1075 or bb.top == -1075 or K == 0:
        return None  # all zeros: signs of zero follow the general rule
    bound_bits = ba.span + bb.span
    if bound_bits > 52 or bound_bits + math.log2(K) >= 62:
        return None
    lsb = ba.lsb + bb.lsb
    if lsb < -1022 or ba.top + bb.top + math.log2(K) > 1000:
        return None
    if acc is not None:
        f = acc.fmt
        if not isinstance(f, FixedFormat) or f.frac_length < -lsb or acc.via is not None:
            return None
        bound = math.ldexp(K, ba.top + bb.top)
        if bound > f.max or -bound < f.min:
            return None
    out_fmt = spec.result_format
    if acc is None and isinstance(out_fmt, FloatFormat) and spec.output_rounding is Rounding.DOWN:
        return None  # the sign of an exact zero would depend on cancellation
    mm = mm or _dense_mm(A)
    kc = max(1, int(2.0**53 // 2.0**bound_bits))
    if kc >= K:
        # K products of codes below 2**bound_bits sum below 2**53 in every order, so the
        # unscaled float64 product is exact too (every partial sum a multiple of 2**lsb,
        # lsb >= -1022, with at most 53 significant bits): one BLAS call, nothing to check
        vals = mm(0, np.asarray(B, np.float64), 0, K)
    else:
        Cb = np.ldexp(np.asarray(B, np.float64), -bb.lsb)
        Ti = np.zeros((R, N), np.int64)
        for k0 in range(0, K, kc):
            Ti += mm(-ba.lsb, Cb, k0, min(K, k0 + kc)).astype(np.int64)
        if (np.abs(Ti) >= 2**53).any():
            return None
        vals = np.ldexp(Ti.astype(np.float64), lsb)  # exact
    vals += 0.0  # turns -0 into +0 (IEEE sum of zeros)
    c.paths["exact_blas"] = c.paths.get("exact_blas", 0) + 1
    if acc is None and spec.output is None:  # into float64, where the exact sum already is
        sub = int(np.count_nonzero(np.abs(vals) < FP64.min_normal) - np.count_nonzero(vals == 0))
        c.output += _counters.StageCounts(roundings=vals.size, subnormal=sub)
        return vals
    if acc is not None:
        vals = vals.astype(acc.fmt.dtype)
        if spec.output is None:
            return vals
        vals = vals.astype(np.float64)
    return _round_output(vals.reshape(-1), spec, keys, rb, c).reshape(R, N)


def _zero_products(A, B, spec, ba, bb, keys, rb, c):
    """Exact accumulation when one operand is all zeros (a dead layer: every activation or
    error zero), or None. Every sum is an exact zero: the running sum starts at ``+0``, so,
    as in the general kernel, it is ``-0`` only rounding DOWN with some product ``-0`` (the
    signs of the products, ``signbit(a) xor signbit(b)``, counted with one 0/1 matrix
    product)."""
    R, K = A.shape
    if (spec.accumulator is not None or spec.product is not None or K == 0
            or (ba.top != -1075 and bb.top != -1075)):
        return None
    if spec.output_rounding is Rounding.DOWN:
        sa = np.signbit(A).astype(np.float64)
        sb = np.signbit(B).astype(np.float64)
        neg = sa @ (1.0 - sb) + (1.0 - sa) @ sb  # negative products per output, exact
        vals = np.where(neg > 0, -0.0, 0.0)
    else:
        vals = np.zeros((R, B.shape[1]))
    c.paths["zero_products"] = c.paths.get("zero_products", 0) + 1
    if spec.output is None:
        c.output += _counters.StageCounts(roundings=vals.size)
        return vals
    return _round_output(vals.reshape(-1), spec, keys, rb, c).reshape(vals.shape)


def _exact_filtered(A, B, spec, ba, bb, keys, rb, c, mm=None):
    """Exact accumulation rounded once into a float output (deterministic rounding), products
    exact in float64 (float32 data): float64 BLAS and a filter that proves the rounding, or
    None when it does not apply.

    ``S = A @ B`` in float64 BLAS: the products are exact, so whatever order, blocking or
    fused multiply-adds BLAS uses, ``|S - exact| <= gamma(K) * sum|a_k b_k|``, ``gamma(K) =
    K u / (1 - K u)``, ``u = 2**-53`` (no partial sum underflows: every one is a multiple of
    ``2**(lsb_a + lsb_b) >= 2**-960``, and none overflows). ``sum|a_k b_k|`` is bounded by
    ``||a|| ||b||`` (Cauchy-Schwarz, norms in float64) and the radius used is ``2 (K + 2) u``
    times that bound, about twice what is needed. Each element whose interval decides the
    rounding (:func:`fixedsim.jit.gemm.round_filtered`) takes that value and those events.
    The others are summed again with a compensated dot product
    (:func:`fixedsim.jit.gemm.dot2_at`, error ``u |sum| + gamma(K)**2 sum|a_k b_k|``) and
    filtered again; an element whose products are all zero is a signed zero (as in the
    general kernel: -0 only for DOWN with a negative zero product); what is left (sums on or
    within about ``2**-52`` of a rounding boundary: exact values of the output format, ties)
    is recomputed by the general kernel, element by element
    (:func:`fixedsim.jit.gemm.gemm_general_at`).
    """
    f = spec.output
    R, K = A.shape
    N = B.shape[1]
    if (spec.accumulator is not None or spec.product is not None
            or not isinstance(f, FloatFormat) or f.man_bits > 50
            or spec.output_rounding is Rounding.STOCHASTIC or R == 0 or N == 0 or K == 0
            or K > 2**30 or ba.top == -1075 or bb.top == -1075):
        return None
    if (ba.sig + bb.sig > 53 or ba.lsb + bb.lsb < -960
            or ba.top + bb.top + math.log2(K) > 1000):
        return None
    P, _, U, D, _, _ = _stage_params(f, spec.output_rounding, resolve_overflow(f, None), rb,
                                     keys[4])
    A = np.ascontiguousarray(A, np.float64)
    B = np.ascontiguousarray(B, np.float64)
    S = A @ B if mm is None else mm(0, B, 0, K)
    radius = 2.0 * (K + 2) * 2.0**-53
    out = np.empty((R, N), np.float64)
    fail = np.zeros((R, N), np.uint8)
    if (2 * min(ba.lsb, bb.lsb) >= -960
            and 2 * max(ba.top, bb.top) + math.log2(K) <= 1000):  # squares stay normal
        na = np.sqrt(np.einsum("ik,ik->i", A, A))
        nb = np.sqrt(np.einsum("kj,kj->j", B, B))
        flags, nfail = _g.round_filtered(S, na, nb, radius, P, U, D, out, fail)
    else:
        fail[:] = 1
        flags, nfail = np.zeros(_q.N_FLAGS, np.int64), R * N
    n_general = 0
    if nfail:
        fr, fj = np.nonzero(fail)
        BT = np.ascontiguousarray(B.T)
        hi, lo, T = np.empty(fr.size), np.empty(fr.size), np.empty(fr.size)
        _g.dot2_at(A, BT, fr, fj, hi, lo, T)
        res = hi + lo
        g = K * 2.0**-53 / (1.0 - K * 2.0**-53)
        err = 2.0 * (2.0**-53 * np.abs(res) + g * g * T) + 2.0**-1020
        o2 = np.empty((fr.size, 1))
        fail2 = np.zeros((fr.size, 1), np.uint8)
        fl2, nfail = _g.round_filtered(res.reshape(-1, 1), err, np.ones(1), 1.0, P, U, D, o2,
                                       fail2)
        flags = flags + fl2
        ok = fail2[:, 0] == 0
        out[fr[ok], fj[ok]] = o2[ok, 0]
        zero = T == 0.0  # every product a signed zero: the sum is an exact zero
        if zero.any():
            zr, zj = fr[zero], fj[zero]
            val = np.zeros(zr.size)
            if spec.output_rounding is Rounding.DOWN:  # -0 if any product is -0
                zrows, zi = np.unique(zr, return_inverse=True)
                sa = np.signbit(A[zrows]).astype(np.float64)
                sb = np.signbit(B).astype(np.float64)
                nneg = (sa @ (1.0 - sb) + (1.0 - sa) @ sb)[zi, zj]
                val[nneg > 0] = -0.0
            out[zr, zj] = val
            nfail -= zr.size
        left = ~ok & ~zero
        if nfail:
            tot = _general_at(A, B, spec, ba, bb, keys, rb, fr[left], fj[left], out, c, BT)
            flags = flags + tot[2]
            n_general = int(left.sum())
    c.paths["exact_filtered"] = c.paths.get("exact_filtered", 0) + 1
    if n_general:
        c.paths["exact_filtered_general"] = c.paths.get("exact_filtered_general", 0) + n_general
    c.output += _counters.StageCounts.from_flags(flags, R * N)
    return out.astype(f.dtype) if f.dtype != np.float64 else out


#: Run FP32 nearest-even chains on float32 data with the FMA instruction (tests switch it
#: off to compare with the float64 kernel).
_FMA32 = True


def _f32_exact(b) -> bool:
    """Every value of the operand is a float32 (finite, in float32's range and precision)."""
    return b.finite and (b.top == -1075 or (b.sig <= 24 and b.lsb >= -149 and b.top <= 128))


def _f32_products_exact(ba, bb) -> bool:
    """Every operand is float32-exact and every product exact in float32 (no rounding, no
    underflow, no overflow)."""
    if not (_f32_exact(ba) and _f32_exact(bb)):
        return False
    return not (ba.sig + bb.sig > 24 or (ba.top != -1075 and bb.top != -1075 and (
        ba.lsb + bb.lsb < -149 or ba.top + bb.top > 127)))


def _chain_result(out, flags, path, spec, keys, rb, c):
    """Counts of a chain kernel's accumulator, then the output rounding (if any)."""
    c.accumulator += _counters.StageCounts.from_flags(flags.sum(axis=0), 0)
    c.paths[path] = c.paths.get(path, 0) + 1
    if spec.output is None:
        return out
    return _round_output(out.reshape(-1), spec, keys, rb, c).reshape(out.shape)


def _fp32_chain(A, B, spec, ba, bb, keys, rb, c):
    """An FP32 FMA chain (RNE, IEEE overflow, block 1) whose products are exact in float32.

    ``fl32(acc + fl32(a*b))`` is then exactly the one rounding of ``acc + a*b``, so a float32
    loop vectorised over the outputs, keeping ``k`` in order, is bit-identical to the model.
    Its steps count their events unless nobody reads them (:func:`_f32_chain_how`).
    """
    acc = spec.accumulator
    if (acc is None or acc.fmt != FP32 or acc.rounding is not _RNE or acc.block != 1
            or acc.via is not None or acc.overflow is not Overflow.INFINITY
            or not _f32_products_exact(ba, bb) or A.shape[1] >= 2**30):
        return None
    out = np.empty((A.shape[0], B.shape[1]), np.float32)
    how = _f32_chain_how(c, _f32_chain_safe(ba, bb, A.shape[1]))
    flags = _g.gemm_f32_chain(A.astype(np.float32), np.ascontiguousarray(B, np.float32), out,
                              how)
    return _chain_result(out, flags, "fp32_chain", spec, keys, rb, c)


def _f32_chain_how(c, safe) -> int:
    """How :func:`fixedsim.jit.gemm.gemm_f32_chain` runs for a call counting into ``c``:
    uncounted (the FMA instruction alone) when nothing reads ``c``'s events, else counting,
    with no checks for infinite or subnormal sums when ``safe``."""
    if not c._read:
        return _g.F32_UNCOUNTED
    return _g.F32_SAFE if safe else _g.F32_CHECKED


def _f32_chain_safe(ba, bb, K) -> bool:
    """No partial sum of a float32 chain of these exact products can be subnormal or overflow.

    Every product is a multiple of ``2**L``, ``L = ba.lsb + bb.lsb``, and so is every partial
    sum (an exact sum of multiples, or a float32 rounding of one, which is coarser): a nonzero
    one is at least ``2**L``, normal when ``L >= -126``. Every partial sum is at most the sum
    of the products' magnitudes rounded up along the way, below ``K * 2**(ba.top + bb.top)``
    times a factor close to 1, so below ``2**127`` when ``ba.top + bb.top + bitlen(K) <= 126``.
    """
    if ba.top == -1075 or bb.top == -1075:
        return True
    return ba.lsb + bb.lsb >= -126 and ba.top + bb.top + int(K).bit_length() <= 126


def _f64_products_exact(ba, bb) -> bool:
    """Every product exact in float64 and far from its range (the sums of a chain too)."""
    if ba.top == -1075 or bb.top == -1075:
        return True  # products all zero
    return (ba.sig + bb.sig <= 53 and ba.lsb + bb.lsb >= -1022
            and ba.top + bb.top <= 1000)


def _fp32_chain64(A, B, spec, ba, bb, keys, rb, c):
    """An FP32 FMA chain (block 1, deterministic rounding, IEEE or saturating overflow) whose
    products are exact in float64 but not necessarily in float32 (float32 data, wide fixed
    point): TwoSum in float64, round to odd at 53 bits, then the float32 cast corrected by one
    ulp for the directed modes; vectorised over the outputs, ``k`` in order."""
    acc = spec.accumulator
    if (acc is None or acc.fmt != FP32 or acc.block != 1 or acc.via is not None
            or acc.rounding is Rounding.STOCHASTIC or not _f64_products_exact(ba, bb)
            or A.shape[1] >= 2**30):
        return None
    _, _, _, _, ovp, ovn, _ = _fast_float_params(FP32, acc.rounding, acc.overflow)
    out = np.empty((A.shape[0], B.shape[1]), np.float32)
    fma = (_FMA32 and acc.rounding is _RNE and acc.overflow is Overflow.INFINITY
           and _f32_exact(ba) and _f32_exact(bb))  # the FMA instruction is the model
    if fma and not c._read:  # nothing reads the counts: the instruction alone
        flags = _g.gemm_f32_chain(np.ascontiguousarray(A, np.float32),
                                  np.ascontiguousarray(B, np.float32), out, _g.F32_UNCOUNTED)
        return _chain_result(out, flags, "fp32_chain64", spec, keys, rb, c)
    B64 = np.ascontiguousarray(B, np.float64)
    if fma:
        flags = _g.gemm_fma32(np.ascontiguousarray(A, np.float32),
                              np.ascontiguousarray(B, np.float32), B64, out, ovp, ovn)
    else:
        flags = _g.gemm_chain32(np.ascontiguousarray(A, np.float64), B64, out,
                                int(acc.rounding), ovp, ovn)
    return _chain_result(out, flags, "fp32_chain64", spec, keys, rb, c)


def _float_chain(A, B, spec, ba, bb, keys, rb, c):
    """An FMA chain (block 1, deterministic rounding) into a float format of at most 21
    significand bits inside float32's range, products exact in float32: TwoSum, round to odd
    at 24 bits, then the branch-free float32 quantizer, vectorised over the outputs. Nearest
    even counts its inexact steps only when the counts are read; unread, into a format of
    narrow range (:func:`_narrow_params`), it runs the FMA instruction in float64 and one
    rounding per step (:func:`fixedsim.jit.gemm.gemm_chain_narrow`), and the counting kernel
    recomputes only the rows where a sum reaches the format's top binade."""
    acc = spec.accumulator
    f = acc.fmt if acc is not None else None
    if (not isinstance(f, FloatFormat) or acc.block != 1 or acc.via is not None
            or acc.rounding is Rounding.STOCHASTIC or f.man_bits > 21 or f.emin < -126
            or f.emax > 127 or not f.subnormals or not _f32_products_exact(ba, bb)):
        return None
    out = np.empty((A.shape[0], B.shape[1]), np.float32)
    rows = None
    narrow = _narrow_params(f) if acc.rounding is _RNE and not c._read else None
    if narrow is not None:  # nobody reads the counts: the FMA instruction, then one rounding
        over = _g.gemm_chain_narrow(np.ascontiguousarray(A, np.float64),
                                    np.ascontiguousarray(B, np.float64), out, *narrow)
        if not over.any():
            return _chain_result(out, np.zeros((1, _q.N_FLAGS), np.int64), "float_chain",
                                 spec, keys, rb, c)
        rows = np.flatnonzero(over)  # a sum reached 2**emax: the counting kernel's rows
    sub = out if rows is None else np.empty((rows.size, out.shape[1]), np.float32)
    flags = _g.gemm_chain_float((A if rows is None else A[rows]).astype(np.float32),
                                np.ascontiguousarray(B, np.float32), sub, int(acc.rounding),
                                *_fast_float_params(f, acc.rounding, acc.overflow),
                                _f32_bits(f.min_normal), c._read)
    if rows is not None:
        out[rows] = sub
    return _chain_result(out, flags, "float_chain", spec, keys, rb, c)


def _narrow_params(f):
    """``(minnorm, off, top)`` of :func:`fixedsim.jit.gemm.gemm_chain_narrow` for the float
    format ``f`` (at most 21 significand bits, subnormals on), or None when ``f``'s range is
    too wide for the kernel's proof: ``2**(emax + 1)`` must be at most ``2**53 * u``, ``u``
    its smallest subnormal.

    The proof, for a step whose FMA result ``s = fl64(x)``, ``x = a + p``, has ``|s| <
    2**emax`` (``a`` the running sum, a format value and so a multiple of ``u``; ``p`` the
    exact product, of at most 24 significant bits, exponent ``e_p``; the kernel marks the
    other rows, which the counting kernel recomputes, overflows among them):

    - The kernel rounds ``s`` correctly into the format (:func:`fixedsim.jit.gemm._narrow_step`:
      adding and subtracting a constant whose float64 quantum is the format's quantum at
      ``s``).
    - Rounding ``s`` rather than ``x`` changes nothing. It could only if ``s`` were a
      midpoint ``mu`` between two format values (exponent ``e``) with ``0 < |x - mu| <=
      2**(e - 53)``, half float64's quantum there. But ``x - mu`` is a multiple of the
      smallest of ``u`` (from ``a``), ``2**(e_p - 23)`` (from ``p``) and ``mu``'s quantum
      (``2**(e - P)``, ``P`` the format's significand bits, or ``u/2`` below the smallest
      normal), and each of these exceeds ``2**(e - 53)``: ``u`` because ``|mu| < 2**emax <=
      2**52 * u``, ``mu``'s quantum by far (``P <= 22``). Unless ``e_p <= e - 30``: then
      ``|p| < 2**(e - 29)``, and ``a`` would lie within ``2**(e - 28)`` of ``mu``, nearer
      than any format value is to a midpoint.

    FP16 (``2**16 <= 2**29``) and the FP8 formats qualify; BF16 and TF32 do not.
    """
    if 2.0**(f.emax + 1) > 2.0**53 * f.min_subnormal:
        return None
    return (_f64_bits(f.min_normal), _f64_bits(1.5 * 2.0**(52 - f.man_bits)) - _f64_bits(1.0),
            _f64_bits(2.0**f.emax))


def _fixed_chain(A, B, spec, ba, bb, keys, rb, c):
    """An FMA chain (block 1) into a fixed-point accumulator, operands integers times powers of
    two: codes in float64, every intermediate an integer below 2**52, so each step's rounding,
    saturation or wrap is exact float64 arithmetic, vectorised over the outputs."""
    acc = spec.accumulator
    f = acc.fmt if acc is not None else None
    if (not isinstance(f, FixedFormat) or acc.block != 1 or acc.via is not None
            or ba.top == -1075
            or bb.top == -1075):
        return None
    d = -(ba.lsb + bb.lsb) - f.frac_length  # acc quantum / product quantum = 2**d
    up = max(0, -d)  # acc grid finer than the products: scale the products' codes up
    if (ba.span + bb.span + up > 51 or f.word_length + max(d, 0) > 51
            or ba.lsb + bb.lsb < -1022):
        return None
    Ca = np.ldexp(A, -ba.lsb + up)
    Cb = np.ascontiguousarray(np.ldexp(B, -bb.lsb))
    R, N = A.shape[0], B.shape[1]
    codes = np.empty((R, N))
    flags = _g.gemm_chain_fixed(Ca, Cb, codes, 0, int(acc.rounding), max(d, 0),
                                float(f.min_code), float(f.max_code),
                                acc.overflow is Overflow.WRAP, 2.0**f.word_length,
                                acc.random_bits or 64, keys[3])
    vals = np.ldexp(codes, -f.frac_length).astype(f.dtype)
    return _chain_result(vals, flags, "fixed_chain", spec, keys, rb, c)


def _float_chain64(A, B, spec, ba, bb, keys, rb, c):
    """A float accumulator (any block, no ``via``, subnormals on) in every mode but DOWN,
    products exact in float64: block sums and the running sum in float64, each sum's
    exactness checked with TwoSum, the exact sum rounded on its bits (stochastically against
    the general kernel's draws); vectorised over the outputs, ``k`` in order. Elements whose
    sums are not exact in float64, or that overflow without saturating, are recomputed by
    the general kernel. (DOWN is left out: the sign of a zero sum would need more state.)
    Stochastic rounding counts its events only when they are read."""
    acc = spec.accumulator
    f = acc.fmt if acc is not None else None
    if (not isinstance(f, FloatFormat) or acc.rounding is Rounding.DOWN
            or acc.via is not None or not f.subnormals or f.man_bits > 51 or f.emin < -1021
            or f.emax > 1023 or not _f64_products_exact(ba, bb) or A.shape[1] >= 2**31):
        return None

    R, N = A.shape[0], B.shape[1]
    vals = np.empty((R, N))
    A = np.ascontiguousarray(A, np.float64)
    B = np.ascontiguousarray(B, np.float64)
    counts, bad = _g.gemm_chain_f64(A, B, vals, 0, acc.block, int(acc.rounding),
                                    52 - f.man_bits, f.emin + 1023, _f64_bits(f.min_subnormal),
                                    _f64_bits(f.max), _f64_bits(f.min_normal),
                                    acc.overflow is Overflow.SATURATE, acc.random_bits or 64,
                                    keys[3], c._read)
    flags = counts.sum(axis=0)
    if bad.any():
        rows, cols = np.nonzero(bad)
        flags = flags + _general_at(A, B, MatmulSpec(accumulator=acc), ba, bb, keys, rb, rows,
                                    cols, vals, c)[1]
        c.paths["float_chain64_general"] = c.paths.get("float_chain64_general", 0) + rows.size
    return _chain_result(vals.astype(f.dtype), flags[None, :], "float_chain64", spec, keys, rb,
                         c)


def _general_at(A, B, spec, ba, bb, keys, rb, rows, cols, out, c, BT=None):
    """The general kernel on the output elements ``(rows[i], cols[i])`` alone (the oracle
    where it cannot prove one): their values into ``out``, their counts returned (stages x
    flags). ``A`` float64, C-contiguous; ``BT`` the transposed ``B`` if already made."""
    rows = np.ascontiguousarray(rows, np.int64)
    cols = np.ascontiguousarray(cols, np.int64)
    BT = np.ascontiguousarray(B.T) if BT is None else BT
    vals = np.empty(rows.size)
    counts, slow = _g.gemm_general_at(A, BT, rows, cols, vals,
                                      *_general_args(spec, ba, bb, keys, rb))
    tot = counts.sum(axis=0)
    out[rows, cols] = vals
    idx = np.flatnonzero(slow)
    if idx.size:
        c.paths["reference"] = c.paths.get("reference", 0) + idx.size
        _fallback(A, B, spec, keys, rb, np.stack([rows[idx], cols[idx]], axis=1), out, tot)
    return tot


def _general_args(spec, ba, bb, keys, rb):
    """The spec-dependent arguments of :func:`fixedsim.jit.gemm.gemm_general` (after ``out``
    and ``base``)."""
    acc = spec.accumulator
    prod_exact = (ba.sig + bb.sig <= 53 and ba.lsb + bb.lsb >= -1074
                  and ba.top + bb.top <= 1023)
    stages = []
    pf = spec.product if spec.product is not None else FP64
    stages.append(_stage_params(pf, spec.product_rounding, resolve_overflow(pf, None), rb,
                                keys[2]))
    if acc is not None:
        stages.append(_stage_params(acc.fmt, acc.rounding, acc.overflow,
                                    64 if acc.random_bits is None else acc.random_bits,
                                    keys[3]))
    else:
        stages.append(stages[0])
    of = spec.output if spec.output is not None else FP64
    stages.append(_stage_params(of, spec.output_rounding, resolve_overflow(of, None), rb,
                                keys[4]))
    via = acc.via if acc is not None and acc.via is not None else FP64
    stages.append(_stage_params(via, _RNE, resolve_overflow(via, None), 64, np.uint64(0)))
    sP, sPsr, sU, sD = (np.ascontiguousarray(np.stack([s[i] for s in stages]))
                        for i in range(4))
    for arr in (sP, sPsr, sU, sD):  # read-only as every parameter array: the helpers they
        arr.setflags(write=False)   # reach (round_exact, ...) compile once for all callers
    prec = np.array([s[4] for s in stages])
    wrap = np.array([s[5] for s in stages])
    return (prod_exact, sP, sPsr, sU, sD, prec, wrap, spec.product is not None,
            0 if acc is None else 1, 1 if acc is None else acc.block, spec.output is not None,
            acc is not None and acc.via is not None)


def _general(A, B, spec, ba, bb, keys, rb, c):
    acc = spec.accumulator
    R, K = A.shape
    N = B.shape[1]
    out = np.empty((R, N), np.float64)
    counts, slow = _g.gemm_general(np.ascontiguousarray(A), np.ascontiguousarray(B.T), out, 0,
                                   *_general_args(spec, ba, bb, keys, rb))
    tot = counts.sum(axis=0)
    if tot[:, _q.F_INVALID].any():
        raise ValueError("matmul: a NaN or infinity reached a fixed-point format of the spec "
                         "(an infinite product or sum, or an infinity with WRAP)")
    c.paths["general"] = c.paths.get("general", 0) + 1
    idx = np.argwhere(slow)
    if idx.size:
        c.paths["reference"] = c.paths.get("reference", 0) + len(idx)
        _fallback(A, B, spec, keys, rb, idx, out, tot)
    c.product += _counters.StageCounts.from_flags(tot[0], 0)
    if acc is not None:
        c.accumulator += _counters.StageCounts.from_flags(tot[1], 0)
    if acc is None or spec.output is not None:
        c.output += _counters.StageCounts.from_flags(tot[2], R * N)
    fmt = spec.result_format
    return out.astype(fmt.dtype) if fmt.dtype != np.float64 else out


def _fallback(A, B, spec, keys, rb, idx, out, tot):
    """Elements no kernel could prove: :func:`fixedsim.reference.dot` with the same draws."""
    R, K = A.shape
    N = B.shape[1]
    acc = spec.accumulator
    shift = {reference.STAGE_PRODUCT: 64 - rb, reference.STAGE_OUTPUT: 64 - rb,
             reference.STAGE_ACCUMULATOR: 64 - (acc.random_bits or 64) if acc else 0}

    def draw(stage, i):
        return int(random_u64_array(keys[stage], i, 1)[0] >> np.uint64(shift[stage]))

    row = {reference.STAGE_PRODUCT: 0, reference.STAGE_ACCUMULATOR: 1,
           reference.STAGE_OUTPUT: 2}
    for r, j in idx:
        events = {}
        v = reference.dot(A[r], B[:, j], spec, draw=draw, index=int(r * N + j), events=events)
        out[r, j] = v if isinstance(v, float) else _to_float_toward_zero(v)
        for stage, fl in events.items():
            for name, col in FLAG_COLUMNS:
                tot[row[stage], col] += fl.get(name, 0)


# -- convolution ----------------------------------------------------------------------------------
def _pair(v, name, low):
    vals = (v, v) if isinstance(v, numbers.Integral) else (
        tuple(v) if isinstance(v, (tuple, list)) else (v,))
    if len(vals) != 2 or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                 for t in vals):
        raise TypeError(f"conv2d: {name} must be an int or a pair of ints, got {v!r}")
    if min(vals) < low:
        raise ValueError(f"conv2d: {name} must be >= {low}, got {v!r}")
    return int(vals[0]), int(vals[1])


def _conv_geometry(x_shape, w_shape, stride, padding, op="conv2d"):
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x must have shape (N, C, H, W), got {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"{op}: w must have shape (O, C, kh, kw), got {tuple(w_shape)}")
    if x_shape[1] != w_shape[1]:
        raise ValueError(f"{op}: x has C={x_shape[1]} channels, w expects C={w_shape[1]}")
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    kh, kw = w_shape[2:]
    Ho = (x_shape[2] + 2 * ph - kh) // sh + 1
    Wo = (x_shape[3] + 2 * pw - kw) // sw + 1
    if kh < 1 or kw < 1 or Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: a {kh}x{kw} kernel does not fit the {x_shape[2]}x{x_shape[3]} "
                         f"image with padding {(ph, pw)}")
    return (sh, sw), (ph, pw), Ho, Wo


def _im2col(x, kh, kw, stride, padding, Ho, Wo):
    N, C = x.shape[:2]
    cols = np.empty((N * Ho * Wo, C * kh * kw), np.float64)
    _conv.im2col(np.ascontiguousarray(x, np.float64), kh, kw, *stride, *padding, cols)
    return cols


def _conv_core(xq, wq, spec, keys, rb, c, stride, padding, Ho, Wo):
    """``conv2d`` of quantized operands: im2col, then the modelled matrix product."""
    N, O = xq.shape[0], wq.shape[0]
    kh, kw = wq.shape[2:]
    cols = _im2col(xq, kh, kw, stride, padding, Ho, Wo)
    c.macs = cols.shape[0] * O * cols.shape[1]
    res = _product(cols, np.ascontiguousarray(wq.reshape(O, -1).T), spec, keys, rb, c)
    return np.ascontiguousarray(res.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2))


def _quantize_pair(op, spec, a, b, names, keys, rb, c):
    _check_finite_for_fixed(spec, a, b, op, names)
    return (_quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], c.input),
            _quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], c.input))


def _done(out, c, stats):
    _counters._publish(c)
    return (out, c) if stats else out


def conv2d(x, w, spec: MatmulSpec | None = None, stride=1, padding=0, *, seed=None,
           stats=False):
    """2-D convolution (cross-correlation, as in CNNs) computed as ``spec`` says, bit for bit.

    ``y[n, o, ho, wo] = sum over (c, i, j) of x[n, c, ho*s - p + i, wo*s - p + j] * w[o, c, i, j]``
    with zero padding, computed as ``matmul(im2col(x), w.reshape(O, K).T, spec)``: the dot
    product of each output runs over ``K = C*kh*kw`` in the order (channel, kernel row, kernel
    column), which is part of the contract (it decides what every accumulator sees).

    Parameters
    ----------
    x : array_like, shape (N, C, H, W)
    w : array_like, shape (O, C, kh, kw)
    spec : MatmulSpec, optional
        ``spec.input`` quantizes ``x`` and ``w`` (before im2col: each pixel is rounded once;
        draw indices are the flat indices of ``x`` and ``w``).
    stride, padding : int or (int, int)
    seed, stats
        As for :func:`matmul`. Output draw index ``o``: the flat index in (n, ho, wo, o) order.

    Returns
    -------
    numpy.ndarray, shape (N, O, Ho, Wo)

    Examples
    --------
    >>> import numpy as np, fixedsim as fs
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> w = np.ones((1, 1, 2, 2))
    >>> fs.conv2d(x, w, fs.MatmulSpec(output=fs.FP16), stride=2)
    array([[[[10., 18.],
             [42., 50.]]]], dtype=float32)
    """
    spec, keys, rb, c = _setup("conv2d", spec, seed, stats)
    x = _as_float_array(x, "x")
    w = _as_float_array(w, "w")
    stride, padding, Ho, Wo = _conv_geometry(x.shape, w.shape, stride, padding)
    xq, wq = _quantize_pair("conv2d", spec, x, w, ("x", "w"), keys, rb, c)
    return _done(_conv_core(xq, wq, spec, keys, rb, c, stride, padding, Ho, Wo), c, stats)


def conv2d_grad_weight(x, grad_y, w_shape, spec: MatmulSpec | None = None, stride=1, padding=0,
                       *, seed=None, stats=False):
    """Gradient of :func:`conv2d` with respect to ``w``, as one modelled matrix product.

    ``dw[o, (c, i, j)] = sum over (n, ho, wo) of grad_y[n, o, ho, wo] * x[n, c, ...]``:
    ``matmul(grad_y as (O, N*Ho*Wo), im2col(x), spec)``, ``K`` in the order (n, ho, wo).
    ``spec.input`` quantizes ``grad_y`` (stage A) and ``x`` (stage B).

    Returns
    -------
    numpy.ndarray, shape ``w_shape``
    """
    spec, keys, rb, c = _setup("conv2d_grad_weight", spec, seed, stats)
    x = _as_float_array(x, "x")
    gy = _as_float_array(grad_y, "grad_y")
    w_shape = tuple(int(v) for v in w_shape)
    stride, padding, Ho, Wo = _conv_geometry(x.shape, w_shape, stride, padding,
                                             "conv2d_grad_weight")
    O = w_shape[0]
    if gy.shape != (x.shape[0], O, Ho, Wo):
        raise ValueError(f"conv2d_grad_weight: grad_y must have shape "
                         f"{(x.shape[0], O, Ho, Wo)}, got {gy.shape}")
    gq, xq = _quantize_pair("conv2d_grad_weight", spec, gy, x, ("grad_y", "x"), keys, rb, c)
    cols = _im2col(xq, w_shape[2], w_shape[3], stride, padding, Ho, Wo)
    A = np.ascontiguousarray(gq.transpose(1, 0, 2, 3).reshape(O, -1))
    c.macs = O * cols.shape[0] * cols.shape[1]
    return _done(_product(A, cols, spec, keys, rb, c).reshape(w_shape), c, stats)


def conv2d_grad_input(grad_y, w, x_shape, spec: MatmulSpec | None = None, stride=1, padding=0,
                      *, seed=None, stats=False):
    """Gradient of :func:`conv2d` with respect to ``x``, as one modelled convolution.

    The transposed convolution: ``grad_y`` is spread onto a zero grid with the stride, padded
    by ``kh - 1 - padding``, and convolved (stride 1) with the kernels flipped and with input
    and output channels swapped, so each ``dx`` element is one dot product over
    ``(o, kh-1-i, kw-1-j)`` run through ``spec``'s accumulator. With stride > 1 the
    inserted zeros are multiplied too (and counted as MACs), as in a transposed-convolution
    engine. ``spec.input`` quantizes ``grad_y`` (stage A) and ``w`` (stage B).

    Returns
    -------
    numpy.ndarray, shape ``x_shape``
    """
    op = "conv2d_grad_input"
    gy = _as_float_array(grad_y, "grad_y")
    w = _as_float_array(w, "w")
    x_shape = tuple(int(v) for v in x_shape)
    (sh, sw), (ph, pw), Ho, Wo = _conv_geometry(x_shape, w.shape, stride, padding, op)
    N, C, H, W = x_shape
    O, _, kh, kw = w.shape
    if gy.shape != (N, O, Ho, Wo):
        raise ValueError(f"{op}: grad_y must have shape {(N, O, Ho, Wo)}, got {gy.shape}")
    spec, keys, rb, c = _setup(op, spec, seed, stats)
    gq, wq = _quantize_pair(op, spec, gy, w, ("grad_y", "w"), keys, rb, c)
    # Zp[n, o, ho*s + kh-1-p, wo*s + kw-1-p] = grad_y: the zero-spread, padded gradient
    Zp = np.zeros((N, O, H + kh - 1, W + kw - 1))
    r0, q0 = kh - 1 - ph, kw - 1 - pw
    hos = [ho for ho in range(Ho) if 0 <= ho * sh + r0 < H + kh - 1]
    wos = [wo for wo in range(Wo) if 0 <= wo * sw + q0 < W + kw - 1]
    if hos and wos:
        Zp[:, :, hos[0] * sh + r0:hos[-1] * sh + r0 + 1:sh,
           wos[0] * sw + q0:wos[-1] * sw + q0 + 1:sw] = \
            gq[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1]
    wf = np.ascontiguousarray(wq.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
    R, K = N * H * W, O * kh * kw
    c.macs = R * C * K
    G = np.zeros_like(gq)  # the entries of grad_y that reach the image (all, but for padding
    if hos and wos:        # wider than the kernel)
        G[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1] = \
            gq[:, :, hos[0]:hos[-1] + 1, wos[0]:wos[-1] + 1]

    def mm(scale, Bs, k0, k1):
        """The exact paths' product without the zero grid: ``grad_y @ w`` over the output
        channels, then col2im adds each pixel's contributions (another summation order of
        the same exact products; columns outside ``[k0, k1)`` are zeroed)."""
        Wb = Bs.reshape(O, kh, kw, C)
        if (k0, k1) != (0, K):
            keep = np.zeros(K)
            keep[k0:k1] = 1.0
            Wb = Wb * keep.reshape(O, kh, kw, 1)
        W2 = np.ascontiguousarray(Wb[:, ::-1, ::-1, :].transpose(0, 3, 1, 2)).reshape(O, -1)
        P = np.ldexp(G, scale).transpose(0, 2, 3, 1).reshape(N * Ho * Wo, O) @ W2
        dx = np.zeros((N, C, H, W))
        _conv.col2im(P, kh, kw, sh, sw, ph, pw, dx)
        return dx.transpose(0, 2, 3, 1).reshape(R, C)

    res = _product(((R, K), lambda: _im2col(Zp, kh, kw, (1, 1), (0, 0), H, W)),
                   np.ascontiguousarray(wf.reshape(C, -1).T), spec, keys, rb, c, mm=mm,
                   ba=_Bits.of(Zp))
    return _done(np.ascontiguousarray(res.reshape(N, H, W, C).transpose(0, 3, 1, 2)), c, stats)
