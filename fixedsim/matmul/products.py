"""Rounded products (``spec.product`` set) with any accumulator: the path ``rounded_products``.

The model (:func:`fixedsim.reference.dot`): each product ``p = a[i, k] * b[k, j]`` is exact,
then rounded once into ``spec.product`` (its rounding, stochastic draw ``o * K + k`` of key
``keys[2]``; overflow as :func:`fixedsim.quantize.resolve_overflow` gives for the format:
IEEE for formats with infinities, else saturation); the rounded products ``q`` are summed
exactly (no accumulator) or block by block into the accumulator, each block's exact sum added
to the running sum with one rounding; then one output rounding.

This row (:func:`run`, kernel :func:`fixedsim.jit.gemm_products.gemm_rounded_products`)
computes exactly that, and here is why its bits are the model's:

1. **Products.** Every ``p`` is computed as the float64 ``a * b``, which is exact: the operands'
   scans prove it (:func:`fixedsim.matmul.core._f64_products_exact`: significands of at most
   53 bits together, every product a multiple of ``2**-1022`` below ``2**1000``), so ``p`` is
   zero or a normal float64.
2. **Product rounding.** ``p`` is exact, so rounding it once is the model's rounding. The
   kernel rounds it in one of four ways, each a single rounding of the exact ``p``:
   nearest even into a float format, ``(p + M) - M`` with ``M = 1.5 * 2**(52 - m) *
   max(2**e, 2**emin)`` (``m`` fraction bits, ``e`` the binade of ``p``): ``M``'s float64
   quantum is the format's quantum at ``p``, ``|p|`` is far below ``M`` (``m <= 50``), so the
   float64 addition rounds ``p`` to that quantum, to nearest even, and the subtraction is
   exact; nearest even into fixed point, ``rint(p * 2**F) * 2**-F`` (a power-of-two scaling,
   exact in the range checked), clamped to the codes; stochastic into a float format,
   ``y = |p| / Q`` (``Q`` the quantum at ``p``, a power of two: exact), up one quantum when
   the draw is below ``floor(frac(y) * 2**r)``, the rule of
   :func:`fixedsim.jit.quant._round_shift`; every other case by the integer fields of ``p``
   (:func:`fixedsim.jit.gemm_products.round_bits`: the significand cut at the quantum, the
   dropped bits against the mode, as the quantizer does). Overflow: the largest value where
   the format's rule gives it, otherwise (an infinity) the element is marked and recomputed by
   the general kernel. The events (inexact, overflow, underflow, subnormal) are those of the
   quantizer for the same value.
3. **Accumulation.** Every sum the model takes is exact; the kernel adds in float64 and
   proves each addition exact with TwoSum (error zero), or marks the element (NaN, kept by
   every later step) for the general kernel. Exact sums have the model's zero sign: float64
   addition to nearest gives ``-0`` only for ``-0 + -0``, and under DOWN the sign of an exact
   zero sum is set as IEEE 754 rounds DOWN (``-0`` unless both terms are ``+0``); applied
   pairwise, in any grouping, both give the rule of :func:`fixedsim.reference.exact_sum`. A
   block's sum is therefore exact, then added to the running sum exactly and rounded once:
   FP32 to nearest even by the float32 conversion of the exact float64 (one IEEE rounding);
   another float format to nearest even by ``(t + M) - M`` as above; any float format and
   mode by the integer fields (the same rounding as the products, with the accumulator's
   draw ``o * nblocks + t`` of key ``keys[3]``). Without an accumulator, the exact float64
   sum of all rounded products from ``+0`` is rounded once into the output by the quantizer
   (the output draw ``o``).
4. **Fixed-point accumulators** work on integer codes in float64: every rounded product is a
   multiple of ``2**-G`` and at most ``2**top`` in magnitude (:func:`_product_top`: rounding
   to a power-of-two grid keeps a multiple of the coarser of the grid's quantum and the
   data's, and a saturated product is the format's largest value, a multiple of its own
   quantum), so a block's sum of values is exact when ``top + G +
   bitlen(block - 1) <= 51``, and ``T = S * 2**d + sum * 2**G`` (``S`` the code, ``2**d``
   the accumulator's quantum over ``2**-G``) is an integer below ``2**52`` when also
   ``word_length + d <= 51``: each step's rounding (floor and the fraction against the mode,
   or the draw), saturation or wrap is then exact float64 arithmetic, as in ``fixed_chain``.
   With ``d = 0`` nothing rounds; the step only saturates or wraps.
5. **Checks proved away.** When the per-step events are not counted, the kernel leaves out
   the product rounding's overflow check where ``|p| < 2**top <= max`` (a rounding goes no
   further than ``2**top``), and every TwoSum where :func:`_sums_exact` proves all float64
   sums exact (multiples of ``2**L`` bounded below ``2**(L + 53)``); those loops compute the
   same roundings on the same values.
6. **Fallback.** A marked element (a product or a sum that is infinite or not exact in
   float64) is recomputed by :func:`fixedsim.matmul.core._general_at` (the oracle where that
   cannot prove it), with the same draws, and its counts are the general kernel's; marked
   elements are counted in ``Counters.paths["rounded_products_general"]``. Every count of the
   other elements is the one the general kernel gives (the product and accumulator events
   only when per-step events are asked for, ``c._steps``; otherwise they are skipped).

It declines (:func:`declines`) exact products, operands with infinities or NaN, products not
provably exact in float64, fixed-point product formats wider than 53 bits, ``K >= 2**31``,
accumulators with a ``via`` register, and fixed-point accumulators whose codes, on the
products' grid, could reach ``2**51``.
"""

import dataclasses
import math
from fractions import Fraction

import numpy as np

from .. import counters as _counters
from ..formats import FP32, FixedFormat, FloatFormat
from ..jit import gemm_products as _gp
from ..jit import quant as _q
from ..quantize import resolve_overflow
from ..rounding import Overflow, Rounding
from .core import _f64_products_exact, _general_at, _round_output

NAME = "rounded_products"
COMPUTES = ("products rounded into spec.product (float or fixed point, every mode, stochastic "
            "included), then exact, float or fixed-point accumulation: float64 lanes, k in order")
PROOF = ("each product is exact in float64 and rounded once; every sum is proven exact by TwoSum "
         "(or is an integer below 2**52) and rounded once per block as the quantizer does; an "
         "element where that fails is recomputed by the general kernel")
_RNE = Rounding.NEAREST_EVEN
_SR = Rounding.STOCHASTIC
_NONE = -1075  # _Bits.top of an operand with no finite nonzero value


def _bits(v):
    return int(np.float64(v).view(np.int64))


def _ints(**f):
    """A stage's int64 parameter tuple (fields ``I_*`` of the kernel; others zero)."""
    vals = [0] * _gp.N_I
    for k, v in f.items():
        vals[getattr(_gp, "I_" + k.upper())] = int(v)
    return tuple(np.int64(v) for v in vals)


def _floats(**f):
    """A stage's float64 parameter tuple (fields ``X_*``; others zero)."""
    vals = [0.0] * _gp.N_X
    for k, v in f.items():
        vals[getattr(_gp, "X_" + k.upper())] = float(v)
    return tuple(np.float64(v) for v in vals)


def _bits_params(fmt, rounding, overflow, rbits):
    """The fields of :func:`fixedsim.jit.gemm_products.round_bits` for ``fmt``."""
    mode = int(rounding)
    if isinstance(fmt, FixedFormat):
        q = math.ldexp(1.0, -fmt.frac_length)
        return dict(mode=mode, sh0=0, lim=1075 - fmt.frac_length, qbits=_bits(q),
                    maxpos=_bits(fmt.max_code * q), maxneg=_bits(-fmt.min_code * q),
                    satpos=1, satneg=1, minnorm=0, ftz=0, fixed=1, rbits=rbits)
    if overflow is Overflow.SATURATE:
        satpos = satneg = 1
    else:  # IEEE: the largest value or an infinity, per mode and sign
        satpos = int(_q.overflow_value(mode, False, fmt.max) == fmt.max)
        satneg = int(_q.overflow_value(mode, True, fmt.max) == fmt.max)
    return dict(mode=mode, sh0=52 - fmt.man_bits, lim=fmt.emin + 1023 if fmt.subnormals else 0,
                qbits=_bits(fmt.min_subnormal), maxpos=_bits(fmt.max), maxneg=_bits(fmt.max),
                satpos=satpos, satneg=satneg, minnorm=_bits(fmt.min_normal),
                ftz=int(not fmt.subnormals), fixed=0, rbits=rbits,
                off=_bits(1.5 * 2.0**(52 - fmt.man_bits)) - _bits(1.0))


def _rne_float(fmt, rounding, top):
    """Does :func:`fixedsim.jit.gemm_products.round_float_rne` round values below
    ``2**top`` into ``fmt``? Nearest even, subnormals, ``p + M`` within ``M``'s binade
    (``man_bits <= 50``) and ``M`` finite."""
    return (isinstance(fmt, FloatFormat) and rounding is _RNE and fmt.subnormals
            and fmt.man_bits <= 50 and top + 52 - fmt.man_bits <= 1023)


def _product_stage(spec, ba, bb, rb):
    """``(PI, PX)``: the product rounding's parameters and kind."""
    f = spec.product
    overflow = resolve_overflow(f, None)
    fields = _bits_params(f, spec.product_rounding, overflow, rb)
    if ba.top == _NONE or bb.top == _NONE:  # every product a zero
        top, low = -1074, 0
    else:
        top, low = ba.top + bb.top, ba.lsb + bb.lsb
    if _rne_float(f, spec.product_rounding, top):
        # |p| < 2**top, so a rounded product is at most 2**top: beyond no value when that is
        # at most the format's largest
        safe = Fraction(2) ** top <= Fraction(f.max)
        return _ints(kind=_gp.P_FLOAT_RNE, safe=safe, **fields), _floats()
    if (isinstance(f, FixedFormat) and spec.product_rounding is _RNE
            and top + f.frac_length <= 1000 and low + f.frac_length >= -1000):
        return (_ints(kind=_gp.P_FIXED_RNE, **fields),
                _floats(scale=2.0**f.frac_length, inv=2.0**-f.frac_length,
                        qmin=f.min_code, qmax=f.max_code))
    if (isinstance(f, FloatFormat) and spec.product_rounding is _SR and f.subnormals
            and f.emin - f.man_bits >= -1022):
        safe = Fraction(2) ** top <= Fraction(f.max)  # as for nearest even
        return _ints(kind=_gp.P_FLOAT_SR, safe=safe, **fields), _floats()
    return _ints(kind=_gp.P_BITS, **fields), _floats()


def _product_top(spec, ba, bb):
    """``(top, g)``: every rounded product is at most ``2**top`` in magnitude and a multiple of
    ``2**-g`` (``top == _NONE``: every product is zero).

    ``|p| < 2**(ba.top + bb.top)`` and ``p`` is a multiple of ``2**L``, ``L = ba.lsb +
    bb.lsb``. Rounding to the format's grid, whose quanta are powers of two of at least
    ``2**Lf`` (the smallest subnormal, or ``2**-F``), gives a multiple of ``2**max(L, Lf)``
    (a multiple of the coarser quantum, or ``p`` itself where the grid is finer than
    ``2**L``) of magnitude at most ``2**top`` (a power of two, a multiple of it). Where a
    product can go beyond the format's largest value, the overflow rule may give that value
    (or the most negative one) instead: a multiple of ``2**-F``, or of the top binade's
    quantum ``2**(emax - man_bits)``, and below ``2**(word_length - F)`` or ``2**(emax +
    1)``."""
    f = spec.product
    if ba.top == _NONE or bb.top == _NONE:
        return _NONE, 0
    top = ba.top + bb.top
    if isinstance(f, FixedFormat):
        low, sat_low, sat_top = -f.frac_length, -f.frac_length, f.word_length - f.frac_length
    else:
        low, sat_low, sat_top = f.emin - f.man_bits, f.emax - f.man_bits, f.emax + 1
    low = max(ba.lsb + bb.lsb, low)
    if Fraction(2) ** top > Fraction(f.max):  # products may saturate
        low = min(low, sat_low)
        top = min(top, sat_top)
    return top, -low


def _fixed_acc_params(spec, ba, bb):
    """``(G, dbits)`` of the fixed-point accumulator kernel, or None when its bound fails."""
    acc = spec.accumulator
    f = acc.fmt
    top, g = _product_top(spec, ba, bb)
    G = max(g, f.frac_length)
    dbits = G - f.frac_length
    if f.word_length + dbits > 51:
        return None
    if top != _NONE and top + G + max(acc.block - 1, 0).bit_length() > 51:
        return None
    return G, dbits


def declines(p):
    """None when :func:`run` applies to the product ``p``, else the first rule it fails."""
    spec = p.spec
    f = spec.product
    if f is None:
        return "products are exact (spec.product is None)"
    if not (p.ba.finite and p.bb.finite):
        return "an operand holds an infinity or NaN"
    if not _f64_products_exact(p.ba, p.bb):
        return ("the products are not provably exact in float64 (operands' significands or "
                "exponents too wide)")
    if isinstance(f, FixedFormat) and (f.word_length > 53 or f.frac_length > 1022
                                       or f.word_length - f.frac_length > 1023):
        return "a fixed-point product format wider than 53 bits or beyond float64's range"
    if p.A.shape[1] >= 2**31:
        return "K is 2**31 or more"
    acc = spec.accumulator
    if acc is None:
        return None
    if acc.via is not None:
        return "the accumulator rounds through a via register"
    if getattr(acc, "structured", False):
        return "the accumulator has lanes, an order or an addend (the general kernel's case)"
    if isinstance(acc.fmt, FixedFormat) and _fixed_acc_params(spec, p.ba, p.bb) is None:
        return ("a fixed-point accumulator whose steps could exceed 2**51 units of the "
                "products' and accumulator's finest quantum")
    return None


def _invalid(tot):
    """The general kernel's counts of the elements it recomputed, after the check it makes:
    a NaN or an infinity that reached a fixed-point format is an error."""
    if tot[:, _q.F_INVALID].any():
        raise ValueError("matmul: a NaN or infinity reached a fixed-point format of the spec "
                         "(an infinite product or sum, or an infinity with WRAP)")
    return tot


def _count(c, stage, flags):
    getattr(c, stage).__iadd__(_counters.StageCounts.from_flags(flags, 0))


def _sums_exact(spec, ba, bb, K):
    """Is every float64 sum of the accumulation exact, so that no TwoSum need check it?

    Every rounded product is a multiple of ``2**L`` and at most ``2**top`` in magnitude
    (:func:`_product_top`, ``L = -g``), so a block's partial sums are at most ``B = block *
    2**top``. A float accumulator's values are multiples of ``2**L`` too (by induction: a
    multiple of ``2**L`` rounded to a power-of-two grid is one, whether the grid's quantum is
    coarser, or finer and the value on it). Rounding to nearest, each step gives at most
    ``(|acc| + B)(1 + u) + eta`` (``u = 2**-(man_bits + 1)``, ``eta`` half the smallest
    subnormal), so after ``nb`` blocks ``|acc| <= nb (B + eta) (1 + u)**nb <= 2 nb (B + eta)``
    while ``nb u <= 1/2``; and a value the kernel keeps is at most the format's largest. A sum
    ``acc + bs``, a multiple of ``2**L`` below ``2**(L + 53)``, is a float64: exact. Without
    an accumulator the partial sums are at most ``K * 2**top``."""
    top, g = _product_top(spec, ba, bb)
    if top == _NONE:
        return True
    limit = Fraction(2) ** (53 - g)
    acc = spec.accumulator
    if acc is None:
        return K * Fraction(2) ** top < limit
    f = acc.fmt
    nb = -(-K // acc.block)
    B = acc.block * Fraction(2) ** top
    if nb * Fraction(1, 2 ** (f.man_bits + 1)) > Fraction(1, 2):
        return False
    bound = min(Fraction(f.max), 2 * nb * (B + Fraction(f.min_subnormal) / 2))
    return bound + B < limit


def _acc_stage(spec, ba, bb, K):
    """``(AI, AX)``: the accumulator's parameters and kind."""
    acc = spec.accumulator
    if acc is None:
        dn = spec.output_rounding is Rounding.DOWN
        return _ints(kind=_gp.A_EXACT, dn=dn, safe=_sums_exact(spec, ba, bb, K)), _floats()
    f = acc.fmt
    rbits = acc.random_bits or 64
    if isinstance(f, FixedFormat):
        G, dbits = _fixed_acc_params(spec, ba, bb)
        kind = _gp.A_FIXED if dbits else _gp.A_FIXED_EXACT
        return (_ints(kind=kind, mode=int(acc.rounding), rbits=rbits, dbits=dbits,
                      wrap=acc.overflow is Overflow.WRAP),
                _floats(unit=2.0**G, scale=2.0**dbits, inv=2.0**-dbits, qmin=f.min_code,
                        qmax=f.max_code, span=2.0**f.word_length))
    fields = _bits_params(f, acc.rounding, acc.overflow, rbits)
    if f == FP32 and acc.rounding is _RNE and acc.overflow is Overflow.INFINITY:
        return _ints(kind=_gp.A_F32_RNE, safe=_sums_exact(spec, ba, bb, K), **fields), _floats()
    if _rne_float(f, acc.rounding, 0):
        return (_ints(kind=_gp.A_FLOAT_RNE, safe=_sums_exact(spec, ba, bb, K), **fields),
                _floats())
    return _ints(kind=_gp.A_BITS, dn=acc.rounding is Rounding.DOWN, **fields), _floats()


def run(p):
    """The ``(R, N)`` result of ``p`` in the result format's container, counts added to
    ``p.c`` (see the module docstring for the proof). Never declines at run time."""
    spec, c = p.spec, p.c
    A = np.ascontiguousarray(p.A, np.float64)
    B = np.ascontiguousarray(p.B, np.float64)
    R, K = A.shape
    N = B.shape[1]
    acc = spec.accumulator
    PI, PX = _product_stage(spec, p.ba, p.bb, p.rb)
    AI, AX = _acc_stage(spec, p.ba, p.bb, K)
    vals = np.empty((R, N))
    bad = np.zeros((R, N), np.uint8)
    counts = _gp.gemm_rounded_products(A, B, vals, bad, 0, acc.block if acc else 1, PI, PX,
                                       AI, AX, p.keys[2], p.keys[3], bool(c._steps))
    if acc is not None and isinstance(acc.fmt, FixedFormat):
        vals = np.ldexp(vals, -acc.fmt.frac_length) + 0.0
    flags = counts.sum(axis=0)
    nbad = int(bad.sum())
    c.paths[NAME] = c.paths.get(NAME, 0) + 1
    if nbad:
        c.paths[NAME + "_general"] = c.paths.get(NAME + "_general", 0) + nbad
    rows, cols = np.nonzero(bad)
    if acc is None:
        _count(c, "product", flags[0])
        fixed = np.empty((R, N)) if nbad else None
        if nbad:
            vals[rows, cols] = 0.0  # rounded exactly, counting nothing, then overwritten
            tot = _invalid(_general_at(A, B, spec, p.ba, p.bb, p.keys, p.rb, rows, cols,
                                       fixed, c))
            _count(c, "product", tot[0])
            _count(c, "output", tot[2])
        out = _round_output(vals.reshape(-1), spec, p.keys, p.rb, c).reshape(R, N)
        if nbad:
            out[rows, cols] = fixed[rows, cols]
        return out
    _count(c, "product", flags[0])
    _count(c, "accumulator", flags[1])
    if nbad:
        sub = dataclasses.replace(
            spec, input=None, input_rounding=_RNE, output=None, output_rounding=_RNE,
            random_bits=spec.random_bits if spec.product_rounding is _SR else None)
        tot = _invalid(_general_at(A, B, sub, p.ba, p.bb, p.keys, p.rb, rows, cols, vals, c))
        _count(c, "product", tot[0])
        _count(c, "accumulator", tot[1])
    out = vals.astype(acc.fmt.dtype)
    if spec.output is None:
        return out
    return _round_output(out.reshape(-1), spec, p.keys, p.rb, c).reshape(R, N)
