"""What every path of a matrix product shares: the operand scan, the call's setup and
counters, the output rounding, and the general kernel with its oracle fallback."""

from __future__ import annotations

import dataclasses
import math

import numba
import numpy as np

from .. import counters as _counters
from .. import reference
from ..blockformats import BlockFormat
from ..compiling import contiguous, read_only
from ..formats import FP64, FixedFormat, FloatFormat, _to_float_toward_zero
from ..jit import gemm_exact as _gx
from ..jit import gemm_general as _gg
from ..jit import gemm_lanes as _gl
from ..jit import quant as _q
from ..jit.rng import random_u64_array
from ..quantize import (
    FLAG_COLUMNS,
    _as_float_array,
    _f64_bits,
    _kernel_params,
    _run,
    resolve_overflow,
)
from ..rounding import Overflow, Rounding
from .spec import MatmulSpec, stage_keys

_RNE = Rounding.NEAREST_EVEN
_SR = Rounding.STOCHASTIC


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
        # float32 data scanned as it is (a second compiled signature; each value widened
        # exactly in a register), anything else as float64
        dt = np.float32 if x.dtype == np.float32 else np.float64
        flat = np.ascontiguousarray(x, dtype=dt).reshape(-1).view()
        flat.setflags(write=False)  # always read-only: one compiled signature per dtype
        nonfinite, sig, lsb, top = _gx.operand_bits(flat)
        if top == -4096:  # no finite nonzero value
            return cls(nonfinite == 0, 0, 0, -1075, 0)
        return cls(nonfinite == 0, int(sig), int(lsb), int(top), int(top - lsb))

    def union(self, other: _Bits) -> _Bits:
        """A scan that bounds the values of both scanned arrays: of an array made of their
        values (an im2col matrix of an image with a column of ones appended)."""
        finite = self.finite and other.finite
        if other.top == -1075 or self.top == -1075:  # no finite nonzero value in one
            kept = self if other.top == -1075 else other
            return dataclasses.replace(kept, finite=finite)
        lsb, top = min(self.lsb, other.lsb), max(self.top, other.top)
        return _Bits(finite, max(self.sig, other.sig), lsb, top, top - lsb)


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
    are read when ``stats`` or a :func:`fixedsim.counters.record` block is active, its
    per-step events when ``stats == "steps"`` or a ``record(steps=True)`` block is."""
    if not (stats is True or stats is False or (isinstance(stats, str) and stats == "steps")):
        raise ValueError(f"{op}: stats must be False, True or 'steps' (per-step events "
                         f"counted too), got {stats!r}")
    spec = MatmulSpec() if spec is None else spec
    if not isinstance(spec, MatmulSpec):
        raise TypeError(f"{op}: spec must be a MatmulSpec, got {type(spec).__name__}")
    keys = stage_keys(spec.seed if seed is None else seed) if spec.stochastic else \
        np.zeros(5, np.uint64)
    rb = 64 if spec.random_bits is None else spec.random_bits
    c = _counters.Counters(calls=1)
    c._read = bool(stats) or _counters._recording()
    c._steps = stats == "steps" or _counters._recording_steps()
    return spec, keys, rb, c


def _is_gram(a, b) -> bool:
    """Is ``a`` the transpose of ``b`` in memory (``a = b.T``, as in ``x.T @ x`` or ``x @
    x.T``), both 2-D arrays of native float32 or float64? Their product is then a Gram
    matrix, which the path table computes from ``b`` alone (no transposed copy of ``a``, one
    scan: :class:`~fixedsim.matmul.paths.Product`'s ``gram``)."""
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.ndim == b.ndim == 2
            and a.dtype == b.dtype and a.dtype.type in (np.float32, np.float64)
            and a.dtype.isnative and a.shape == b.shape[::-1]
            and a.strides == b.strides[::-1]
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


def _check_operands(a, b, batch_b=False):
    """Both operands as float arrays of matching shapes: ``a`` (..., M, K), ``b`` (K, N), or
    with ``batch_b`` (..., K, N) with batch dimensions that broadcast against ``a``'s."""
    a = _as_float_array(a, "a")
    b = _as_float_array(b, "b")
    if a.ndim < 2:
        raise ValueError(f"matmul: a must have shape (M, K) or (..., M, K), got {a.shape}")
    if b.ndim != 2 and not (batch_b and b.ndim > 2):
        raise ValueError(f"matmul: b must have shape (K, N)"
                         f"{' or (..., K, N)' if batch_b else ''}, got {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: shapes do not match: a {a.shape} has K={a.shape[-1]}, "
                         f"b {b.shape} has K={b.shape[-2]}")
    if b.ndim > 2:
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: the batch dimensions of a {a.shape} and b {b.shape} "
                             f"do not broadcast (as numpy.matmul's: {a.shape[:-2]} against "
                             f"{b.shape[:-2]})") from None
    return a, b


def _check_addend(c, shape, spec, op="matmul"):
    """The addend ``c`` as a float64 array broadcast to the output ``shape`` (read-only)."""
    arr = _as_float_array(c, "c")
    try:
        out = np.broadcast_to(arr.astype(np.float64, copy=False), shape)
    except ValueError:
        raise ValueError(f"{op}: c of shape {arr.shape} does not broadcast to the output "
                         f"shape {tuple(shape)}") from None
    acc = spec.accumulator
    fixed = [f for f in (getattr(acc, "fmt", None), spec.output) if isinstance(f, FixedFormat)]
    if fixed and not np.isfinite(out).all():
        raise ValueError(f"{op}: c contains NaN or infinity, which the fixed-point format "
                         f"{fixed[0]!r} cannot represent")
    return out


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


def block_operands(A, B, spec, rb, keys, c):
    """``A`` (..., K) and ``B`` (..., K, N) quantized into ``spec.input``, a
    :class:`~fixedsim.BlockFormat`, in blocks along K, and the spec the product of these
    values takes (``input=None``).

    K is zero-padded to a multiple of the block for the quantization (zeros change no scale)
    and the padding dropped after it. Stochastic draws: ``A``'s from the seed
    ``int(keys[0])``, ``B``'s from ``int(keys[1])``, as :func:`fixedsim.quantize` draws for
    that seed. The input stage counts a rounding per element; its events are not counted
    (None).
    """
    from ..blockquant import block_quantize

    fmt = spec.input
    pad = -A.shape[-1] % fmt.block

    def q(x, axis, key):
        x = np.asarray(x)
        if x.dtype != np.float32:  # float32 values take the quantizer's fused kernel
            x32 = x.astype(np.float32)
            with np.errstate(invalid="ignore"):
                same = np.array_equal(x32, x, equal_nan=True)
            x = x32 if same else x.astype(np.float64, copy=False)
        if pad:
            width = [(0, 0)] * x.ndim
            width[axis] = (0, pad)
            x = np.pad(x, width)
        v = block_quantize(x, fmt, spec.input_rounding, seed=int(key), axis=axis,
                           random_bits=rb if spec.input_rounding is Rounding.STOCHASTIC
                           else None)
        if pad:
            v = v[..., :-pad] if axis == -1 else v[..., :-pad, :]
        return np.ascontiguousarray(v, np.float64)

    Aq, Bq = q(A, -1, keys[0]), q(B, -2, keys[1])
    c.input += _counters.StageCounts(roundings=Aq.size + Bq.size, inexact=None, overflow=None,
                                     underflow=None, subnormal=None, nan=None)
    stochastic_later = (spec.product is not None and spec.product_rounding is _SR) or \
        ((spec.output is not None or spec.accumulator is None)
         and spec.output_rounding is _SR)
    inner = dataclasses.replace(spec, input=None, input_rounding=Rounding.NEAREST_EVEN,
                                random_bits=spec.random_bits if stochastic_later else None)
    return Aq, Bq, inner


def _quantize_input(x, fmt, rounding, rbits, key, counts, keep32=False):
    """``x`` rounded into ``fmt`` (None: as it is), float64; with ``keep32`` values that
    come as float32 or that ``fmt``'s float32 container holds stay float32 (the same values:
    for :class:`~fixedsim.matmul.paths.Product`, which widens them when a row asks)."""
    if fmt is None or isinstance(fmt, BlockFormat):  # block formats: by block_operands
        dt = np.float32 if keep32 and np.asarray(x).dtype == np.float32 else np.float64
        return contiguous(x, dt)
    arr = np.ascontiguousarray(x)
    out, c = _run(arr, fmt, rounding, resolve_overflow(fmt, None), rbits, key, True)
    counts += _counters.StageCounts.from_flags(c, arr.size)
    return out if keep32 and out.dtype == np.float32 else out.astype(np.float64, copy=False)



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


def _dims(p):
    """``(R, K, N)`` of a product without building a lazily made ``A`` or widening a float32
    ``B``: a :class:`~fixedsim.matmul.paths.Product`'s own, else (the tests' stand-ins, which
    carry the operands and perhaps ``R``) read from the operands' shapes."""
    if hasattr(p, "K"):  # a Product
        return p.R, p.K, p.N
    K, N = p.B.shape
    return (p.R if hasattr(p, "R") else p.A.shape[0]), K, N


def _plain(p) -> str | None:
    """The condition every row but ``general`` shares: exact, finite products."""
    if p.spec.product is not None:
        return "products are rounded (spec.product is set)"
    if not (p.ba.finite and p.bb.finite):
        return "an operand holds an infinity or a NaN"
    if getattr(p.acc, "structured", False):
        return "the accumulator has lanes, an order or an addend (the general kernel's case)"
    return None


def _first(*checks) -> str | None:
    """The first reason of ``(condition, reason)`` pairs whose condition holds."""
    for cond, reason in checks:
        if cond:
            return reason
    return None


def _chain_declines(p, fmt_ok, what):
    """The conditions every chain row of the path table shares (an accumulator, no ``via``),
    then ``fmt_ok(acc)``'s reason."""
    acc = p.acc
    return _plain(p) or _first(
        (acc is None, "there is no accumulator (exact accumulation)"),
        (acc is not None and acc.via is not None,
         "the accumulator passes through a `via` register")) or (
        None if fmt_ok(acc) else f"the accumulator is not {what}")


def _float64_chain_declines(p, max_man_bits, modes, modes_why) -> str | None:
    """The conditions of the rows that keep a float accumulator's running sum in float64
    (``float_chain64``, ``float_chain64_scaled``): the chain rows' conditions, a float format
    with subnormals within float64's exponent range and of at most ``max_man_bits`` fraction
    bits, a rounding not in ``modes`` (``modes_why`` says why)."""
    why = _chain_declines(p, lambda a: isinstance(a.fmt, FloatFormat), "a float format")
    if why:
        return why
    f = p.acc.fmt
    return _first(
        (p.acc.rounding in modes, modes_why),
        (not f.subnormals, "the accumulator flushes subnormals"),
        (f.man_bits > max_man_bits, f"the accumulator has more than {max_man_bits} fraction "
                                    "bits"),
        (f.emin < -1021 or f.emax > 1023, "the accumulator's exponent range exceeds float64's"))


def _f64_products_exact(ba, bb) -> bool:
    """Every product exact in float64 and far from its range (the sums of a chain too)."""
    if ba.top == -1075 or bb.top == -1075:
        return True  # products all zero
    return (ba.sig + bb.sig <= 53 and ba.lsb + bb.lsb >= -1022
            and ba.top + bb.top <= 1000)



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



def _general_at(A, B, spec, ba, bb, keys, rb, rows, cols, out, c, BT=None, bt_cols=None):
    """The general kernel on the output elements ``(rows[i], cols[i])`` alone (the oracle
    where it cannot prove one): their values into ``out``, their counts returned (stages x
    flags). ``A`` float64, C-contiguous; ``BT`` the transposed ``B`` if already made, or,
    with ``bt_cols``, the gathered columns of ``B`` (``BT[bt_cols[i]]`` is ``B[:,
    cols[i]]``; the kernel's draw index then is not the element's: specs without random
    draws only)."""
    assert bt_cols is None or not spec.stochastic, "gathered columns: no draws"
    rows = np.ascontiguousarray(rows, np.int64)
    cols = np.ascontiguousarray(cols, np.int64)
    BT = B.T if BT is None else BT
    vals = np.empty(rows.size)
    kc = cols if bt_cols is None else np.ascontiguousarray(bt_cols, np.int64)
    counts, slow = _gg.gemm_general_at(read_only(A), read_only(BT), rows, kc, vals,
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


def _general(A, B, spec, ba, bb, keys, rb, c, C=None):
    """The general kernel on every element (``C``: the addend, (R, N) float64, or None)."""
    acc = spec.accumulator
    R, K = A.shape
    N = B.shape[1]
    out = np.empty((R, N), np.float64)
    C0 = np.zeros((R, N)) if C is None else np.ascontiguousarray(C, np.float64)
    if hasattr(acc, "extra_bits"):  # a BlockFMA: the oracle on every element
        c.paths["general"] = c.paths.get("general", 0) + 1
        c.paths["reference"] = c.paths.get("reference", 0) + R * N
        tot = np.zeros((3, _q.N_FLAGS), np.int64)
        align = np.zeros(_q.N_FLAGS, np.int64)
        _fallback(A, B, spec, keys, rb, np.argwhere(np.ones((R, N), bool)), out, tot, C0,
                  align)
        c.alignment += _counters.StageCounts.from_flags(align, 0)
        c.accumulator += _counters.StageCounts.from_flags(tot[1], 0)
        if spec.output is not None:
            c.output += _counters.StageCounts.from_flags(tot[2], R * N)
        return out.astype(spec.result_format.dtype)
    args = _general_args(spec, ba, bb, keys, rb)
    # the operands in float64 (exact): one compiled signature of each kernel, not one per
    # operand dtype (about 20 s of compiling each)
    A, Bt = read_only(A, np.float64), read_only(B.T, np.float64)
    if getattr(acc, "structured", False):  # lanes, order, addend: fixedsim.jit.gemm_lanes
        counts, slow = _gl.gemm_lanes(
            A, Bt, read_only(C0), out, 0,
            *args[:7], args[7], args[10], acc.block, acc.lanes or 0,
            acc.order == "descending", acc.combine == "tree", acc.addend == "last")
    else:
        counts, slow = _gg.gemm_general(A, Bt, read_only(C0), out, 0, *args)
    tot = counts.sum(axis=0)
    if tot[:, _q.F_INVALID].any():
        raise ValueError("matmul: a NaN or infinity reached a fixed-point format of the spec "
                         "(an infinite product or sum, or an infinity with WRAP)")
    c.paths["general"] = c.paths.get("general", 0) + 1
    idx = np.argwhere(slow)
    if idx.size:
        c.paths["reference"] = c.paths.get("reference", 0) + len(idx)
        _fallback(A, B, spec, keys, rb, idx, out, tot, C0)
    c.product += _counters.StageCounts.from_flags(tot[0], 0)
    if acc is not None:
        c.accumulator += _counters.StageCounts.from_flags(tot[1], 0)
    if acc is None or spec.output is not None:
        c.output += _counters.StageCounts.from_flags(tot[2], R * N)
    fmt = spec.result_format
    return out.astype(fmt.dtype) if fmt.dtype != np.float64 else out


def _fallback(A, B, spec, keys, rb, idx, out, tot, C=None, align=None):
    """Elements no kernel could prove: :func:`fixedsim.reference.dot` with the same draws
    (``C``: the addend, (R, N), or None). Their events are added to ``tot`` (stages x
    flags), those of a BlockFMA's alignment to ``align`` (flags) when given."""
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
        v = reference.dot(A[r], B[:, j], spec, draw=draw, index=int(r * N + j), events=events,
                          c=0.0 if C is None else float(C[r, j]))
        out[r, j] = v if isinstance(v, float) else _to_float_toward_zero(v)
        for stage, fl in events.items():
            if stage == reference.STAGE_ALIGNMENT:
                if align is not None:
                    for name, col in FLAG_COLUMNS:
                        align[col] += fl.get(name, 0)
                continue
            for name, col in FLAG_COLUMNS:
                tot[row[stage], col] += fl.get(name, 0)

