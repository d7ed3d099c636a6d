"""A :class:`~fixedsim.BlockFMA` accumulator (the tensor-core adder): the path ``blockfma``.

The model (:func:`fixedsim.reference.block_fma`, block by block from the addend ``C``):
each block's anchor ``E`` is the largest term exponent (products ``ea + eb``, the addend
``max(floor(log2|c|), -126)``), at least ``min_exp``; each term ``x`` becomes the integer
``trunc(x * 2**(23 + n - E))`` (``n = extra_bits``); their sum ``S`` times ``2**(E - 23 -
n)`` is rounded once into the register (``frac_bits`` fraction bits, the format's exponent
range, overflow to an infinity).

This row (:func:`run`, kernel :func:`fixedsim.jit.gemm_blockfma.gemm_blockfma`) computes
exactly that, and here is why its bits are the model's:

1. **Exponents.** ``ea = max(floor(log2|a|), emin)`` is taken from ``numpy.frexp`` (exact)
   of the quantized operands, ``emin`` the input format's (float64's without one); zeros
   get an exponent below every other and drop out of the anchor, as zero products do in the
   model (a zero ``a`` skips the step; a zero ``b`` gives a zero product, whose truncation is
   0). The addend's exponent is ``frexp``'s too, at least -126.
2. **Terms.** The product ``a * b`` is exact in float64 (the operands' scans prove it:
   :func:`fixedsim.matmul.core._f64_products_exact`), and so is its scaling by the power of
   two ``2**(23 + n - E)``: the result is below ``2**(25 + n)`` (``|x| < 4 * 2**e``, ``e <=
   E``), and where it falls below float64's normal range it is below 1, so its truncation is
   0 either way. The conversion to int64 truncates toward zero: the model's cut. The
   elements whose scale ``2**(23 + n - E)`` is not a normal float64 (``|23 + n - E| >
   1000``) are marked and computed by the oracle.
3. **Sum.** At most ``block + 1`` terms below ``2**(25 + n)``: the int64 sum is exact, and
   below ``2**53`` (the row declines otherwise), so its float64 conversion is too.
4. **Rounding** (:func:`fixedsim.jit.gemm_blockfma.round_cut_sum`): the leading bit of
   ``|S|`` (``frexp`` of the exact float64) gives the value's exponent, the quantum
   ``2**qe`` with ``qe = max(exponent, emin) - frac_bits``; the dropped low bits of ``|S|``
   against half a quantum decide every deterministic mode, on integers; the value
   ``R * 2**qe`` is exact in float64; at or beyond ``2**(emax + 1)`` it is an infinity.
   ``S = 0`` is +0.
5. **Specials.** Operands with an infinity or a NaN go to the general row (the oracle). An
   addend or running value that is infinite or NaN, with finite products, stays as it is: the
   model's IEEE sum of the specials.

The per-step events (when asked for) are those of the rounding of ``S q``, as the oracle
counts them. It declines (:func:`declines`) accumulators that are not BlockFMA, operands with
infinities or NaN, products not provably exact in float64, and a block whose cut sum could
reach ``2**53`` (``bitlen(block + 1) + 25 + extra_bits > 53``).
"""

import numpy as np

from ..formats import FloatFormat
from ..jit import gemm_blockfma as _gb
from .core import _chain_result, _f64_products_exact, _fallback
from .spec import MatmulSpec

NAME = "blockfma"
COMPUTES = ("a BlockFMA accumulator (the aligned, truncating adder of tensor cores), any "
            "addend: per block the anchor, each term cut to an int64, their sum rounded on "
            "its bits, vectorised over the output columns")
PROOF = ("products and their power-of-two scaling are exact in float64, float-to-int "
         "conversion truncates toward zero as the model cuts, the int64 sum of the cut terms "
         "is exact below 2**53 and is rounded on its integer bits")
TAKES = ("c", "blockfma")


def declines(p):
    """None when the row applies to the :class:`~fixedsim.matmul.paths.Product` ``p``, else
    the first condition it fails."""
    acc = p.acc
    if not hasattr(acc, "extra_bits"):
        return "the accumulator is not a BlockFMA"
    if not (p.ba.finite and p.bb.finite):
        return "an operand holds an infinity or a NaN"
    if not _f64_products_exact(p.ba, p.bb):
        return "a product may be inexact in float64"
    if (acc.block + 1).bit_length() + 25 + acc.extra_bits > 53:
        return "a block's cut sum could reach 2**53 (block and extra_bits too large)"
    return None


def exponents(x, emin):
    """``max(floor(log2|x|), emin)`` of every element (int16), ``NO_EXP`` for zeros."""
    e = np.maximum(np.frexp(x)[1].astype(np.int16) - 1, emin).astype(np.int16)
    e[x == 0] = _gb.NO_EXP
    return e


def run(p):
    """The product by :func:`fixedsim.jit.gemm_blockfma.gemm_blockfma`; marked elements by
    the oracle with the same addend. Never declines at run time."""
    spec, acc = p.spec, p.acc
    emin = spec.input.emin if isinstance(spec.input, FloatFormat) else -1022
    A = np.ascontiguousarray(p.A, np.float64)
    B = np.ascontiguousarray(p.B, np.float64)
    C = np.zeros((p.R, p.N)) if p.C is None else np.ascontiguousarray(p.C, np.float64)
    out = np.empty((p.R, p.N))
    f = acc.fmt
    counts, bad = _gb.gemm_blockfma(
        A, exponents(A, emin), B, exponents(B, emin), C, out, acc.block, acc.extra_bits,
        _gb.NO_EXP if acc.min_exp is None else acc.min_exp, acc.frac_bits, f.emin, f.emax,
        int(acc.rounding), p.c._steps)
    flags = counts.sum(axis=0)
    idx = np.argwhere(bad)
    if idx.size:  # the oracle's accumulator values (the output is rounded below)
        tot = np.zeros((3, flags.size), np.int64)
        _fallback(A, B, MatmulSpec(input=spec.input, accumulator=acc), p.keys, p.rb, idx, out,
                  tot, C)
        flags = flags + tot[1]
        p.count("reference", len(idx))
    return _chain_result(out.astype(f.dtype), flags[None, :], NAME, spec, p.keys, p.rb, p.c)


__all__ = ["NAME", "COMPUTES", "PROOF", "TAKES", "declines", "run", "exponents"]
