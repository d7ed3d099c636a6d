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
   0); with ``zero_exp`` they get that exponent and take part in the anchor as in the
   model. The addend's exponent is ``frexp``'s too, at least -126.
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
reach ``2**53`` (``bitlen(block + 1) + 25 + extra_bits > 53``), and, with
``product_inf_exp``, operands whose products may reach ``2**product_inf_exp`` (the scans'
bounds: ``|a b| < 2**(top_a + top_b)``), left to the oracle.

With ``addend_bits = (m, c)`` the addend takes no part in the anchor or the cut sum ``S``;
:func:`fixedsim.jit.gemm_blockfma.second_stage` then aligns ``S`` and the addend to ``E2``:
``S`` shifted on its integer bits (an arithmetic right shift is the floor), the addend
scaled by the power of two ``2**(c - E2)`` (exact where normal, below 1 where not) and
floored, the two integers summed exactly (below ``2**51``: ``m + bitlen(block) <= 48``) and
rounded as in 4. Elements whose scale ``2**(c - E2)`` is not a normal float64 are marked.
With ``addend_bits = (m, c, d)`` an addend of exponent below ``E2 - d`` is read as 0 (its
floor replaced).

With ``groups = G`` each group's products (``i mod G`` within the block) get their own
anchor and scale, as 1. and 2. say for a block, and their own int64 cut sum; each group sum
is shifted right on its integer bits by the block's anchor minus its own (an arithmetic
right shift is the floor the model takes; at 63 bits or more every sum below ``2**53``
floors to 0 or -1, as a larger shift would), and the shifted sums are added: the model's
``S``, exactly (at most ``block`` terms below ``2**(25 + n)`` in all, the bound of 3.).

With ``promote``, the kernel runs on each chunk of ``promote`` products from a zero addend
(a zero addend drops out of the anchor and its cut is 0: the model's chunk from +0), and
:func:`promote_add` adds each chunk's result to the running sum (why it is exact: its
docstring). A row with a marked element goes whole to the oracle.

With ``interleave``, the operands are first put in the order the blocks take them
(:func:`dealt`: K padded with zeros to a multiple of ``promote``, each chunk dealt by
:func:`fixedsim.reference.deal`); the chunks then run as above. Marked elements go to the
oracle with the operands as given (it deals them itself).
"""

import numpy as np

from .. import counters as _counters
from .. import reference
from ..compiling import read_only as _ro
from ..formats import FloatFormat
from ..jit import gemm_blockfma as _gb
from ..jit import quant as _q
from ..quantize import FLAG_COLUMNS as _FLAG_COLUMNS
from ..quantize import quantize
from ..rounding import Overflow, Rounding
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
    lim = acc.product_inf_exp
    if lim is not None and p.ba.top != -1075 and p.bb.top != -1075 and \
            p.ba.top + p.bb.top > lim:
        return "a product may reach 2**product_inf_exp (an infinity in this model)"
    if (acc.block + 1).bit_length() + 25 + acc.extra_bits > 53:
        return "a block's cut sum could reach 2**53 (block and extra_bits too large)"
    return None


def exponents(x, emin, zero_exp=None):
    """``max(floor(log2|x|), emin)`` of every element (int16), ``NO_EXP`` for zeros (or
    ``zero_exp``: a BlockFMA's exponent of zero operands)."""
    e = np.maximum(np.frexp(x)[1].astype(np.int16) - 1, emin).astype(np.int16)
    e[x == 0] = _gb.NO_EXP if zero_exp is None else zero_exp
    return e


def promote_add(s, part, fmt):
    """``s + part`` rounded to nearest even into ``fmt`` (overflow to an infinity), element by
    element, as :func:`fixedsim.reference.promote_add`; returns the sums and per row the
    flags of those roundings (rows x flags).

    The float64 sum ``hi`` and its exact error ``lo`` (Knuth's two-sum): where ``lo`` is 0,
    ``hi`` is the exact sum and one rounding of it into ``fmt`` is the result (an exact zero
    sum is +0, or -0 for two -0 terms, as IEEE adds); the other elements (float64 could not
    hold the sum) are given by the oracle.
    """
    with np.errstate(invalid="ignore", over="ignore"):  # infinities and NaN: no two-sum
        hi = s + part
        bb = hi - s
        lo = (s - (hi - bb)) + (part - bb)
    r = np.asarray(quantize(hi, fmt, Rounding.NEAREST_EVEN, Overflow.INFINITY), np.float64)
    fin = np.isfinite(s) & np.isfinite(part)
    zero = fin & (hi == 0)
    r[zero] = np.where(np.signbit(s[zero]) & np.signbit(part[zero]), -0.0, 0.0)
    fl = np.zeros((*s.shape, _q.N_FLAGS), np.int64)
    fl[..., _q.F_NAN] = np.isnan(r)
    fl[..., _q.F_INEXACT] = fin & (r != hi)
    fl[..., _q.F_OVERFLOW] = fin & np.isinf(r)
    fl[..., _q.F_UNDERFLOW] = fin & (r == 0) & (hi != 0)
    fl[..., _q.F_SUBNORMAL] = fin & (r != 0) & (np.abs(r) < 2.0**fmt.emin)
    fl[..., _q.F_UP] = fin & (r > hi)
    cols = {name: col for name, col in _FLAG_COLUMNS}
    for i, j in np.argwhere(fin & (lo != 0)):
        r[i, j], f = reference.promote_add(s[i, j], part[i, j], fmt)
        fl[i, j] = 0
        for name, on in f.items():
            fl[i, j, cols[name]] = int(on)
    return r, fl.sum(axis=1)


def dealt(A, B, acc):
    """``A``'s columns and ``B``'s rows in the order a BlockFMA with ``interleave`` takes
    them: K padded with zeros to a multiple of ``acc.promote``, each chunk in the order of
    :func:`fixedsim.reference.deal`. Consecutive blocks of the result are the model's blocks
    (a padding zero is a zero product: it drops out of the anchor and its cut is 0), and
    every block of every chunk runs, as the model has it."""
    R, K = A.shape
    P = acc.promote
    Kp = -(-K // P) * P
    order = np.asarray(reference.deal(P, acc.block, acc.interleave), np.int64)
    idx = (np.arange(0, Kp, P, dtype=np.int64)[:, None] + order).ravel()
    Ap = np.zeros((R, Kp))
    Ap[:, :K] = A
    Bp = np.zeros((Kp, B.shape[1]))
    Bp[:K] = B
    return np.ascontiguousarray(Ap[:, idx]), np.ascontiguousarray(Bp[idx])


def _chunks(A, EA, B, EB, C, acc, f, count):
    """The kernel on each chunk of ``acc.promote`` products from +0, each result added to the
    running sum (from ``C``) by :func:`promote_add`; returns (out, per-row counts, marks,
    per-row alignment counts)."""
    R, K = A.shape
    s = C.copy()
    counts = np.zeros((R, _q.N_FLAGS), np.int64)
    cuts = np.zeros((R, 2), np.int64)
    bad = np.zeros((R, B.shape[1]), np.uint8)
    for k0 in range(0, K, acc.promote):
        k1 = min(k0 + acc.promote, K)
        part = np.empty_like(s)
        cn, bd, ct = _gb.gemm_blockfma(
            _ro(A[:, k0:k1]), _ro(EA[:, k0:k1]), _ro(B[k0:k1]), _ro(EB[k0:k1]),
            _ro(np.zeros_like(s)), part, acc.block, acc.extra_bits,
            _gb.NO_EXP if acc.min_exp is None else acc.min_exp, acc.frac_bits, f.emin, f.emax,
            int(acc.rounding), count, 0, 0, 0, 1)
        s, fl = promote_add(s, part, f)
        counts += cn + fl
        cuts += ct
        bad |= bd
    return s, counts, bad, cuts


def _second(acc):
    """The kernel's ``sbits, cbits, dbits, groups`` for ``acc`` (0 for what is not set)."""
    ab = acc.addend_bits or (0, 0)
    return ab[0], ab[1], ab[2] if len(ab) == 3 else 0, acc.groups or 1


def run(p):
    """The product by :func:`fixedsim.jit.gemm_blockfma.gemm_blockfma` (with ``promote``: per
    chunk, then :func:`promote_add`); marked elements by the oracle with the same addend.
    Never declines at run time."""
    spec, acc = p.spec, p.acc
    emin = spec.input.emin if isinstance(spec.input, FloatFormat) else -1022
    A0 = A = np.ascontiguousarray(p.A, np.float64)
    B0 = B = np.ascontiguousarray(p.B, np.float64)
    if acc.interleave is not None:
        A, B = dealt(A, B, acc)
    C = np.zeros((p.R, p.N)) if p.C is None else np.ascontiguousarray(p.C, np.float64)
    out = np.empty((p.R, p.N))
    f = acc.fmt
    if acc.promote is None:
        counts, bad, cuts = _gb.gemm_blockfma(
            _ro(A), _ro(exponents(A, emin, acc.zero_exp)), _ro(B),
            _ro(exponents(B, emin, acc.zero_exp)), _ro(C), out,
            acc.block, acc.extra_bits,
            _gb.NO_EXP if acc.min_exp is None else acc.min_exp, acc.frac_bits, f.emin, f.emax,
            int(acc.rounding), p.c._steps, *_second(acc))
    else:  # a marked element's row goes to the oracle whole (its chunks' counts dropped)
        ze = acc.zero_exp
        out, counts, bad, cuts = _chunks(A, exponents(A, emin, ze), B, exponents(B, emin, ze),
                                         C, acc, f, p.c._steps)
        rows = bad.any(axis=1)
        bad[rows] = 1
        counts[rows] = 0
        cuts[rows] = 0
    flags = counts.sum(axis=0)
    align = np.zeros(flags.size, np.int64)
    align[_q.F_INEXACT] = cuts[:, _gb.ALIGN_CUT].sum()
    align[_q.F_UNDERFLOW] = cuts[:, _gb.ALIGN_LOST].sum()
    idx = np.argwhere(bad)
    if idx.size:  # the oracle's accumulator values (the output is rounded below)
        tot = np.zeros((3, flags.size), np.int64)
        _fallback(A0, B0, MatmulSpec(input=spec.input, accumulator=acc), p.keys, p.rb, idx, out,
                  tot, C, align)
        flags = flags + tot[1]
        p.count("reference", len(idx))
    p.c.alignment += _counters.StageCounts.from_flags(align, 0)
    return _chain_result(out.astype(f.dtype), flags[None, :], NAME, spec, p.keys, p.rb, p.c)


__all__ = ["NAME", "COMPUTES", "PROOF", "TAKES", "declines", "run", "exponents", "promote_add",
           "dealt"]
