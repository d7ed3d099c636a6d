"""The ``float_chain64_scaled`` row of the path table: a float accumulator on operands that
share a common factor, such as NVFP4's per-tensor FP32 scale.

Spec: a float accumulator (any block, no ``via``, subnormals on, at most 50 fraction bits,
exponents within float64's normal range) rounding in a deterministic mode other than DOWN;
exact products (``spec.product`` None), finite operands, no addend. The model
(:func:`fixedsim.reference.dot`): from ``+0``, each block of ``block`` consecutive products
is summed exactly and added to the running sum with one rounding into the accumulator.

The case it is for: values of a block format with a tensor scale, ``v = e * s * t`` (NVFP4:
an E2M1 element, an E4M3 block scale, an FP32 tensor scale ``t``). Such a value has up to 30
significant bits, so the product of two of them may not be exact in float64, and
``float_chain64`` declines; but every value of one operand is a multiple of the same odd
integer, the odd part of ``t``'s significand.

How, and why it is exact
------------------------
1. **The factors.** For each operand, ``g`` is the greatest common divisor of the odd parts
   of the significands of its nonzero values (:func:`common_odd_factor`; 1 when they share
   none). ``A' = A / g_a`` is exact (each quotient is an integer times a power of two with a
   significand of fewer bits, a normal float64 where every nonzero ``|a| >= 2**lsb`` has
   ``lsb - bitlen(g_a) >= -1022``, which the row checks). The row applies when the products
   of ``A'`` and ``B'`` are exact in float64 (the scans of ``A'`` and ``B'``) and ``T = g_a
   g_b`` is exact (below ``2**53``). Then ``a_k b_k = T a'_k b'_k`` exactly.
2. **Block sums.** Each block's sum ``s`` of ``a'_k b'_k`` is a float64 sum whose every
   addition TwoSum checks; the block's exact sum is ``T s``.
3. **The step** (:func:`fixedsim.jit.gemm_float.gemm_chain_f64_scaled`). ``T s = p + q``
   with ``p = fl(T s)`` and ``q = fma(T, s, -p)``, exact when ``|p| >= 2**-960``; the new
   running value is the one rounding of ``acc + p + q``. TwoSums turn that sum into ``v +
   d + w`` and :func:`fixedsim.jit.gemm_float._ro_sum3` rounds it to odd at 53 bits (its
   docstring has the argument); a float rounded to odd at 53 bits and then rounded once into
   a format of at most 51 significant bits is the direct rounding of the exact value in
   every deterministic mode (Boldo and Melquiond, "Emulation of FMA and correctly rounded
   sums: proved algorithms using rounding to odd", IEEE TC 2008: 53 >= 51 + 2), its
   events (inexact, overflow, underflow, subnormal) included, since the rounded-to-odd value
   lies in the same open interval between the format's values and midpoints as the exact
   one, and is a value of the format exactly when the exact one is (an inexact rounding to
   odd sets the last of 53 bits, which no value of the format has). The rounding into the
   format is the one the
   ``float_chain64`` row uses (on the float64's bits).
4. **What is left** to the general kernel, element by element: a block sum that is not
   exact in float64, ``|T s|`` beyond ``[2**-960, 2**1000]``, a sum the rounding to odd
   cannot show, an overflow to infinity without saturation (counted in
   ``paths["float_chain64_scaled_general"]``).

Stochastic rounding is declined: its draw compares more of the exact fraction than 53 bits
hold.
"""

from __future__ import annotations

import numpy as np

from ..jit import gemm_float as _gf
from ..quantize import _f64_bits
from ..rounding import Overflow, Rounding
from .core import (
    _Bits,
    _chain_result,
    _f64_products_exact,
    _first,
    _float64_chain_declines,
    _general_at,
)
from .spec import MatmulSpec

NAME = "float_chain64_scaled"
COMPUTES = ("a float accumulator (any block, deterministic rounding but DOWN) on operands "
            "whose values share a common odd factor (a block format's tensor scale, NVFP4's): "
            "the factors taken out, block sums of the rest exact in float64, each block sum "
            "times the factors split exactly, the running sum rounded to odd at 53 bits, then "
            "into the format")
PROOF = ("A = g_a A' and B = g_b B' exactly; the block sums of A' B' are exact (TwoSum); "
         "g_a g_b s = p + q exactly (FMA); acc + p + q is rounded to odd at 53 bits by "
         "TwoSums, and one rounding of that into at most 51 significant bits is the one "
         "rounding of the exact sum")


def common_odd_factor(x: np.ndarray) -> int:
    """The greatest common divisor of the odd parts of the significands of the nonzero values
    of ``x`` (finite float64): the largest odd integer ``g`` such that every value is ``g``
    times a float64 with fewer significant bits. 1 when ``x`` has no nonzero value.

    Examples
    --------
    >>> import numpy as np
    >>> common_odd_factor(np.array([3.0, 0.75, -9.0, 0.0]))
    3
    """
    a = np.abs(x[x != 0])
    if a.size == 0:
        return 1
    m = np.frexp(a)[0]
    ints = (m * 2.0**53).astype(np.int64)  # the significands as 53-bit integers, exactly
    odd = ints // (ints & -ints)
    return int(np.gcd.reduce(odd))


def _factored(p):
    """``(A', B', T)`` for :func:`run` (cached on ``p``), or None where the operands share no
    factor that makes their products exact in float64."""
    if not hasattr(p, "_scaled_factors"):
        p._scaled_factors = _factor(p)
    return p._scaled_factors


def _factor(p):
    A = np.ascontiguousarray(p.A, np.float64)
    B = np.ascontiguousarray(p.B, np.float64)
    ga, gb = common_odd_factor(A), common_odd_factor(B)
    if ga * gb >= 2**53 or ga * gb == 1:
        return None
    # every odd part is a multiple of g, so each quotient is exact where it is a normal
    # float64: every nonzero |value| >= 2**lsb, its quotient >= 2**(lsb - bitlen(g))
    if (p.ba.lsb - ga.bit_length() < -1022 or p.bb.lsb - gb.bit_length() < -1022):
        return None
    A2, B2 = A / ga, B / gb
    if not _f64_products_exact(_Bits.of(A2), _Bits.of(B2)):
        return None
    return A2, B2, float(ga * gb)


def declines(p) -> str | None:
    """None when this row applies to ``p``, else the first condition it fails."""
    return _float64_chain_declines(p, 50, (Rounding.DOWN, Rounding.STOCHASTIC),
                                   "the accumulator rounds DOWN or stochastically") or _first(
        (p.K >= 2**31, "K >= 2**31"),
        (_f64_products_exact(p.ba, p.bb), "the products are exact in float64 (float_chain64 "
                                          "takes them)"),
        (_factored(p) is None, "the operands share no common factor that makes their "
                               "products exact in float64"))


def run(p):
    """The ``(R, N)`` result in the accumulator's container (the proof is in the module
    docstring); elements the kernel leaves go to the general kernel."""
    acc = p.acc
    f = acc.fmt
    A2, B2, T = _factored(p)
    vals = np.empty((p.R, p.N))
    counts, bad = _gf.gemm_chain_f64_scaled(
        A2, B2, T, vals, acc.block, int(acc.rounding), 52 - f.man_bits, f.emin + 1023,
        _f64_bits(f.min_subnormal), _f64_bits(f.max), _f64_bits(f.min_normal),
        acc.overflow is Overflow.SATURATE)
    flags = counts.sum(axis=0)
    if bad.any():
        rows, cols = np.nonzero(bad)
        A = np.ascontiguousarray(p.A, np.float64)
        B = np.ascontiguousarray(p.B, np.float64)
        flags = flags + _general_at(A, B, MatmulSpec(accumulator=acc), p.ba, p.bb, p.keys,
                                    p.rb, rows, cols, vals, p.c)[1]
        p.count(NAME + "_general", rows.size)
    return _chain_result(vals.astype(f.dtype), flags[None, :], NAME, p.spec, p.keys, p.rb,
                         p.c)
