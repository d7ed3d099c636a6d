"""Correctly rounded float64 dot products on float64 BLAS: the ``exact_ozaki`` row of the
path table.

It computes exact accumulation (no accumulator, no product rounding) rounded once into
float64 (``output`` None) or into a float output of 52 or 53 significand bits (``man_bits``
51 or 52, too wide for ``exact_filtered``'s float64 bound), in every deterministic rounding,
of any finite operands (float64 data, whose products are not exact in float64, or float32
data). Five BLAS products' worth of work (three over ``K`` terms, one over ``2K``), two
passes over the operands before and one over the outputs after, all serial (they run between
BLAS calls, whose OpenBLAS workers spin for a while after each).

Method: Ozaki, Ogita, Oishi and Rump's error-free splitting (2012; Ootomo, Ozaki and Yokota
2024 for the integer-slice form), with Karatsuba's three products for the four leading slice
pairs and a floating-point product, with a proven error bound, for everything below them.

Proof. Write ``u = 2**-53``, ``gamma(n) = n u / (1 - n u)``; ``beta`` is the largest integer
with ``9 K 4**beta <= 2**55`` (21 for K = 512, 20 for K = 1024), ``T = 2**beta``, ``t = 1/T``.

1. *Scaling.* Row ``r`` of ``A`` has ``max |A[r, k]| < 2**e_r`` and column ``j`` of ``B``
   ``max |B[k, j]| < 2**f_j``. ``U = A[r] * 2**(beta - e_r)`` and ``V = B[:, j] *
   2**(beta - f_j)`` are exact (power-of-two scalings; a value scaled down into the
   subnormal range that loses bits marks its row or column, whose elements go to the general
   kernel), ``|U|, |V| < T``, and the exact sum is ``x = 2**(e_r + f_j - 2 beta) * sum_k U_k
   V_k``.
2. *Splitting.* ``a1 = (U + C) - C``, ``C = 1.5 * 2**52``: ``U + C`` lies in ``[2**52,
   2**53)`` where the float64 quantum is 1, so ``a1`` is ``U`` rounded to an integer and
   the subtraction is exact; ``|a1| <= T``. ``U - a1`` is exact (``a1`` is 0 or within a
   factor 2 of ``U``: Sterbenz), ``u2 = (U - a1) T`` is exact, ``a2 = RN(u2)`` the same way
   (``|a2| <= T/2``), and ``Ur = (u2 - a2) t = U - a1 - a2 t`` is exact (a multiple of
   ``U``'s quantum below ``t/2``). So ``U = U12 + Ur``, ``U12 = a1 + a2 t`` (at most
   ``2 beta + 1 <= 53`` bits: exact), and likewise ``V = V12 + Vr`` with ``b1, b2``.
3. *Identity.* ``U V = U12 V12 + U12 Vr + Ur V`` (expand ``(U12 + Ur)(V12 + Vr)``), and
   ``sum U12 V12 = P11 + t (PM - P11 - P22) + t**2 P22`` with the integer products ``P11 =
   a1 . b1``, ``P22 = a2 . b2``, ``PM = (a1 + a2) . (b1 + b2)`` (Karatsuba).
4. *The integer products are exact in BLAS.* Every product and every partial sum, in any
   order, with or without fused multiply-adds or blocking, is an integer of magnitude at most
   ``K (1.5 T)**2 <= 2**53``, hence a float64, so no operation rounds (BLAS computes each
   element as a sum of the ``K`` products in some order, as every BLAS that numpy links
   does; a Strassen-like product would void this and step 5). ``P11 + P22`` (at most
   ``1.25 K T**2``) and ``PM - (P11 + P22)`` (equal to ``a1 . b2 + a2 . b1``, at most
   ``K T**2``) are integers below ``2**53``: exact. The scalings by ``t`` and ``t**2`` are
   exact (no underflow: ``t**2 >= 2**-52``).
5. *The tail.* ``Tl = [U12 | Ur] @ [Vr ; V]`` (one BLAS product over ``2K`` terms; over
   ``K`` terms, or none, when ``Ur`` or ``Vr`` is zero throughout) is within ``gamma(2K) S +
   2K 2**-1074`` of ``sum U12 Vr + Ur V`` in any summation order (Higham, Thm 3.1; gradual
   underflow adds at most half a subnormal quantum per product), ``S = sum |U12||Vr| +
   |Ur||V| <= nA_r mB_j + mA_r nB_j``: the float64 sums ``nA = sum |U12|``, ``nB = sum |V|``
   (each at least the true sum times ``1 - gamma(K)``) and the maxima ``mA = max |Ur|``,
   ``mB = max |Vr|``. The kernel uses ``crad = 2 gamma(2K)``: the factor 2 covers
   ``1 / (1 - gamma(K))`` and the roundings of the bound's own evaluation; it adds
   ``2**-1000`` when the bound is nonzero. A zero bound means every tail product has an exact
   zero factor (a nonzero row has ``nA_r >= T/2 - t``, a nonzero column ``nB_j >= T/2``, so
   a product of nonzero factors in the bound cannot underflow to 0), so ``Tl`` is exactly 0.
6. *Accumulation.* TwoSum is exact: ``s + e1 + e2 + e3 = P11 + t cross + t**2 P22 + Tl``
   exactly; ``e = fl(fl(e1 + e2) + e3)`` is within ``2u(1 + u)(|e1| + |e2| + |e3|)`` of
   ``e1 + e2 + e3``, and ``(H, L) = TwoSum(s, e)`` is exact. So ``sum U V`` lies within ``E =
   crad S + 4u (|e1| + |e2| + |e3|) (+ 2**-1000)`` of ``H + L``, ``H = fl(H + L)``.
7. *Rounding* (:func:`fixedsim.jit.gemm_exact64._decide`). Scaling by ``2**sc``, ``sc =
   e_r + f_j - 2 beta``, keeps the float64 grid and the ``p``-bit grid of the output
   (``p = man_bits + 1``) as long as values stay normal, so the decision is made on ``H + L``
   and the result scaled: it is taken only when ``H``'s binade at the output's scale lies
   strictly between ``emin`` and ``emax``; every candidate and the exact sum then lie in
   ``[2**emin, 2**emax]``: no overflow, underflow or subnormal event is possible. The element
   is decided when ``fl(L - E) > 0`` and ``fl(L + E)`` is below the gap from ``|H|`` to the
   next float64 (or the mirror image below ``|H|``); since rounding to nearest is monotone
   and the thresholds are float64 values, the strict comparisons hold for the exact
   ``L -+ E`` too, and the exact sum lies strictly between two consecutive float64 values
   ``f0 < f1`` (:func:`fixedsim.jit.gemm_exact64.finish` takes the usual case inline: ``H``
   and its neighbour on ``L``'s side, ``|L| + E`` below half their gap, so nearest is ``H``).
   For ``p = 53`` these are its neighbours in the format; to nearest,
   the side of their midpoint must also be decided. For ``p = 52`` the format's values are
   the float64 values with an even last bit and the odd ones are its midpoints, so one of
   ``f0, f1`` is a neighbour and the other the midpoint, which decides every mode. The result
   is inexact (it is not on the float64 grid), with no other event. ``E = 0`` and ``L = 0``
   is an exact result (``p = 52`` only on an even last bit); ``H = 0`` with ``E = 0`` is an
   exact zero sum, which the general kernel makes ``+0`` unless it rounds DOWN (whose sign
   depends on the products: left to it).
8. *Refinement.* The elements left undecided (a sum within about ``E`` of a float64 value
   or, to nearest, of a midpoint: mostly small sums from cancellation) are summed again from
   the scaled operands ``U = U12 + Ur`` and ``V`` with a compensated dot product kept as
   ``p + s`` (Ogita, Rump and Oishi's Dot2: TwoProduct by FMA, TwoSum; ``p + sum(errors)`` is
   the exact sum, and the float64 sum ``s`` of the ``2K - 1`` error terms is within
   ``gamma(2K)`` of the sum of their magnitudes; :func:`fixedsim.jit.gemm_exact64.refine_at`)
   and decided again with that bound, about ``2**-100`` of the sum's terms.
9. Everything else (exact values of a float64 or a midpoint, exact zeros rounded DOWN,
   results near the ends of the exponent range, rows or columns whose scaling would lose
   bits) is computed by the general kernel, element by element
   (:func:`fixedsim.matmul.core._general_at`, which hands what it cannot prove to the Fraction
   oracle); ``Counters.paths["exact_ozaki_general"]`` counts those elements.

On standard normal data the first bound decides all but about 10**-5 of the elements
(K = 1024); the refinement decides those.

Memory: ``B``'s slices take ``6 K N`` float64 values; ``A`` runs in blocks of rows whose
slices and products take at most ``2**22`` values (:data:`_BLOCK_VALUES`). A thread keeps its
work space between calls when it fits 64 MiB (:data:`_KEEP_VALUES`), because first touches of
fresh memory cost more than the products on small operands; the blocks are made smaller
(down to 128 rows) to fit it.

The operand ``mm`` (the centroid products of :mod:`fixedsim.reuse`) is not used: the row reads
``A`` itself.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import counters as _counters
from ..compiling import read_only
from ..formats import FP64, FloatFormat
from ..jit import gemm_exact64 as _gz
from ..jit import quant as _q
from ..rounding import Rounding
from .core import _dims, _general_at

NAME = "exact_ozaki"

COMPUTES = ("exact accumulation rounded once into float64 (or a float output of 52 or 53 "
            "significand bits), deterministic rounding, any finite data: integer slices on "
            "float64 BLAS (Ozaki's splitting), then a filter")

PROOF = ("the slices' products are integers below 2**53 in every order, so BLAS computes them "
         "exactly; the rest is one float64 product within gamma(2K) of its value; the "
         "double-double sum and that bound decide the rounding, or the element goes to the "
         "general kernel")

#: Rows of A split and multiplied together: the work arrays of one block (five slices of
#: ``A``'s rows, four products) stay below about this many float64 values.
_BLOCK_VALUES = 2**22

#: Work space (float64 values) a thread keeps between calls. Fresh memory costs a page fault
#: per 4 KiB on first touch (about 2 us each on the machine of docs/performance.md: 5 ms for
#: the 10 MiB of one 512x512 operand's slices, more than the BLAS product): calls whose work
#: arrays fit reuse the thread's buffer. 64 MiB at most; larger calls allocate their own.
_KEEP_VALUES = 2**23

_scratch = threading.local()


def _workspace(n):
    """``n`` float64 values of work space: this thread's kept buffer when ``n`` fits
    :data:`_KEEP_VALUES` (grown to ``n`` if smaller), else a fresh array."""
    if n > _KEEP_VALUES:
        return np.empty(n)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n)
    return buf[:n]


def _carve(buf, *shapes):
    """C-contiguous float64 arrays of the given 2-D shapes, one after the other in ``buf``."""
    out, at = [], 0
    for n, m in shapes:
        out.append(buf[at:at + n * m].reshape(n, m))
        at += n * m
    return out

def beta_for(K: int) -> int:
    """Bits per slice for ``K`` terms: the largest ``beta`` with ``9 K 4**beta <= 2**55``, so
    that ``K`` products of integers of magnitude up to ``1.5 * 2**beta`` sum below ``2**53``
    in every order (0 when none)."""
    beta = 25
    while beta > 0 and 9 * K * 4**beta > 2**55:
        beta -= 1
    return beta


def declines(p) -> str | None:
    """None when this row applies to ``p``; otherwise the first rule it fails, in words."""
    spec, ba, bb = p.spec, p.ba, p.bb
    f = spec.output
    R, K, N = _dims(p)
    checks = (
        (spec.product is not None, "products are rounded (spec.product is set)"),
        (spec.accumulator is not None, "there is an accumulator"),
        (f is not None and not isinstance(f, FloatFormat), "the output is not a float format"),
        (isinstance(f, FloatFormat) and f.man_bits <= 50,
         "the output has at most 50 fraction bits (this row rounds to 52 or 53 bits)"),
        (spec.output_rounding is Rounding.STOCHASTIC, "the output rounding is stochastic"),
        (not (ba.finite and bb.finite), "an operand holds an infinity or a NaN"),
        (R == 0 or N == 0 or K == 0, "the product is empty"),
        (ba.top == -1075 or bb.top == -1075, "an operand is all zeros"),
        (K > 2**40, "K > 2**40 (no slice width keeps the slice products exact)"),
    )
    for cond, why in checks:
        if cond:
            return why
    return None


def _split(X, beta, side, into=None):
    """The slices of the rows of ``X`` (``A``, side 0, or ``B`` transposed, side 1), into the
    three ``(n, K)`` and one ``(n, 2K)`` float64 arrays ``into`` when given (at least ``n``
    rows): see :func:`fixedsim.jit.gemm_exact64.split`."""
    n, K = X.shape
    if into is None:
        into = (np.empty((n, K)), np.empty((n, K)), np.empty((n, K)), np.empty((n, 2 * K)))
    c1, c12, c2, tail = (w[:n] for w in into)
    nrm, mx = np.empty(n), np.empty(n)
    e, bad = np.empty(n, np.int64), np.empty(n, np.uint8)
    _gz.split(X, beta, side, c1, c12, c2, tail, nrm, mx, e, bad)
    return c1, c12, c2, tail, nrm, mx, e, bad


def run(p) -> np.ndarray:
    """The ``(R, N)`` result, counts added to ``p.c`` (see the module docstring for the
    proof). Never declines at run time: elements the bounds cannot decide go to the general
    kernel. ``A`` runs in blocks of rows (:data:`_BLOCK_VALUES`), ``B`` is split once."""
    spec, c = p.spec, p.c
    A, B = read_only(p.A, np.float64), read_only(p.B, np.float64)
    R, K = A.shape
    N = B.shape[1]
    f = spec.output if spec.output is not None else FP64
    p53, mode = f.man_bits == 52, int(spec.output_rounding)
    beta = beta_for(K)
    n2 = 2.0 * K * 2.0**-53
    crad = 2.0 * n2 / (1.0 - n2) * (1.0 + 2.0**-40)  # 2 gamma(2K), rounded up
    per_row = 5 * K + 4 * N  # one row of A's block: its slices and its four products
    rows_per = max(1, min(R, _BLOCK_VALUES // per_row))
    fit = (_KEEP_VALUES - 6 * N * K) // per_row  # rows that keep the work in this thread's
    if min(R, 128) <= fit < rows_per:           # buffer: smaller blocks, no fresh memory
        rows_per = fit
    buf = _workspace(6 * N * K + rows_per * (5 * K + 4 * N))
    BT, b1, b12, b2, tb, a1, a12, a2, ta, P11, PM, P22, Tl = _carve(
        buf, (N, K), (N, K), (N, K), (N, K), (N, 2 * K), (rows_per, K), (rows_per, K),
        (rows_per, K), (rows_per, 2 * K), (rows_per, N), (rows_per, N), (rows_per, N),
        (rows_per, N))
    np.copyto(BT, B.T)
    b1, b12, b2, tb, nB, mB, eb, badB = _split(read_only(BT, np.float64), beta, 1,
                                               (b1, b12, b2, tb))
    xB = np.where(badB, np.inf, 0.0)  # columns left to the general kernel
    tail_b = bool(mB.any())  # Vr not all zero
    work = (a1, a12, a2, ta)
    out = np.empty((R, N))
    fail = np.zeros((R, N), np.uint8)
    inexact = left = 0
    for r0 in range(0, R, rows_per):
        m = min(R, r0 + rows_per) - r0
        a1, a12, a2, ta, nA, mA, ea, badA = _split(A[r0:r0 + m], beta, 0, work)
        np.matmul(a1, b1.T, out=P11[:m])
        np.matmul(a12, b12.T, out=PM[:m])
        np.matmul(a2, b2.T, out=P22[:m])
        tail_a = bool(mA.any())  # Ur not all zero
        T = Tl[:m]
        if tail_a and tail_b:
            np.matmul(ta, tb.T, out=T)  # U12 @ Vr + Ur @ V
        elif tail_b:
            np.matmul(ta[:, :K], tb[:, :K].T, out=T)  # U12 @ Vr
        elif tail_a:
            np.matmul(ta[:, K:], tb[:, K:].T, out=T)  # Ur @ V
        else:
            T[:] = 0.0
        ob, fb = out[r0:r0 + m], fail[r0:r0 + m]
        n_inexact, n_left = _gz.finish(P11[:m], PM[:m], P22[:m], T, nA, mA, ea,
                                       np.where(badA, np.inf, 0.0), nB, mB, eb, xB, beta, crad,
                                       p53, mode, f.emin, f.emax, ob, fb)
        inexact += n_inexact
        if n_left:
            rows, cols = np.nonzero(fb)
            ok = (badA[rows] == 0) & (badB[cols] == 0)  # the scaled operands are exact there
            n_inexact, n_left = _gz.refine_at(ta, tb, rows[ok], cols[ok], ea, eb, beta, crad,
                                              p53, mode, f.emin, f.emax, ob, fb)
            inexact += n_inexact
            left += n_left + int((~ok).sum())
    flags = np.zeros(_q.N_FLAGS, np.int64)
    flags[_q.F_INEXACT] = inexact
    rows, cols = np.nonzero(fail) if left else (np.zeros(0, np.int64),) * 2
    if rows.size:
        tot = _general_at(np.ascontiguousarray(p.A, np.float64),
                          np.ascontiguousarray(p.B, np.float64), spec, p.ba, p.bb, p.keys,
                          p.rb, rows, cols, out, c)
        flags += tot[2]
    c.paths[NAME] = c.paths.get(NAME, 0) + 1
    if rows.size:
        c.paths[NAME + "_general"] = c.paths.get(NAME + "_general", 0) + int(rows.size)
    c.output += _counters.StageCounts.from_flags(flags, R * N)
    return out.astype(f.dtype) if f.dtype != np.float64 else out
