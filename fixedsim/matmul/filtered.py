"""The ``exact_filtered`` row of the path table: exact sums rounded once into a float output.

Spec: no accumulator, no product rounding, ``spec.output`` a float format of at most 51
significand bits (FP32, TF32, BF16, FP16, the FP8 formats, ...), a deterministic
``output_rounding``; operands finite, every product exact in float64 (float32, FP16 or BF16
data). The result of element ``(r, j)`` is the one rounding of the exact sum ``x = sum_k
a_k b_k`` (``a = A[r]``, ``b = B[:, j]``).

How, and why it is exact
------------------------
1. ``S = A @ B`` on float64 BLAS. Every product ``a_k b_k`` is exact in float64 (at most 53
   significant bits, ``lsb_a + lsb_b >= -960`` so no product is subnormal, and ``top_a + top_b
   + log2 K <= 1000`` so no sum overflows). Whatever order, blocking or fused multiply-adds
   BLAS uses, ``S`` is a sum of these ``K`` exact terms by additions that each round once to
   nearest (an FMA ``fl(s + a*b)`` is such an addition, as ``a*b`` is exact; a sum that is
   subnormal is exact), and each term passes through at most ``K`` of them, so
   ``|S - x| <= gamma(K) * T``, ``gamma(K) = K u / (1 - K u)``, ``u = 2**-53``,
   ``T = sum_k |a_k b_k|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
   section 3.1). The same holds for the ``mm`` of a convolution's or a reuse layer's product
   (another order of the same exact products, some zero terms left out). BLAS is assumed
   to use the classical algorithm (sums of the products; no Strassen-like recombination), as
   OpenBLAS, MKL and BLIS do.
   When ``K`` is long (at least :data:`_CHUNK_FROM`, the weight gradients of a convolution:
   ``K`` is the batch's pixels) and the product is ``A @ B`` itself, ``S`` is summed in
   chunks: ``S = sum_c A[:, c] @ B[c, :]`` over the ``n_c`` consecutive chunks of ``k_c``
   (:data:`_CHUNK`) columns, each chunk's product by BLAS, their results summed in float64
   (in any order), then the product of the last, shorter chunk added (:func:`_chunked`). A
   product passes through at most ``k_c`` additions in its chunk and ``n_c`` after it,
   fewer than ``d = k_c + n_c + 1`` in all, so ``|S - x| <= gamma(d) * T``: the bound below
   holds with ``d`` in place of ``K`` (``d`` is 401 instead of 36,864 for the first
   convolution's weight gradient in a LeNet at batch 64, so about 90 times fewer sums are
   left undecided). A product with few columns and many rows (:data:`_FLIP_BELOW`) is
   filtered transposed: ``S.T = B.T @ A.T``, the same exact terms summed in another order,
   so the same bound holds element by element, with the roles of rows and columns swapped.
   A Gram product (``A = B.T``, :func:`_gram_chunked`) is summed from ``B`` alone, in
   chunks of ``k_c`` consecutive rows of ``B`` whose products ``c.T @ c`` are added in
   order: ``d = k_c + n_c + 1`` again (at most ``K``: chunks are used from ``K = 2 k_c``
   on).
2. The bound, per row and column: ``T <= ||a|| ||b||`` (Cauchy-Schwarz). The norms are
   computed in float64 (in :func:`fixedsim.jit.gemm_filtered.filter_round`, squares normal and
   finite by the range conditions): ``fl(sum a_k^2) >= (1 - gamma(K + 1)) ||a||^2`` and the
   square root rounds by at most ``u``, so ``||a|| ||b|| <= na nb / ((1 - u)^2 (1 -
   gamma(K + 1)))``. The radius used is ``e = fl(fl(c na) nb)``, ``c = d u (1 + 2**-16)``
   (``d = K``, or ``k_c + n_c + 1`` when summed in chunks; ``d <= K <= 2**30``, so ``d u <=
   2**-23``: the factor ``1 + 2**-16`` exceeds every ``1/(1 - ...)`` and ``(1 - u)^-k``
   above by far), hence ``e >= gamma(d) T >= |S - x|``. Per
   element it costs one multiplication (Cauchy-Schwarz is tighter than the max-times-sum
   bounds on dense data, and far cheaper than ``|A| @ |B|``, a second GEMM). A Gram
   product's norms are the square roots of ``S``'s diagonal: each a float64 sum of the same
   exact squares, through at most ``d <= K`` additions, so ``fl(sum a_k^2) >= (1 -
   gamma(K + 1)) ||a||^2`` holds for it too.
3. The decision (:func:`fixedsim.jit.gemm_filtered.filter_round`), on the bits of ``|S|``
   (binade ``E``, ulp ``2**(E - 52)``). Let ``h = 2**d`` ulps be half the format's quantum
   there, ``d = 51 - m + max(emin - E, 0)`` (``m`` fraction bits; no ``max`` without
   subnormals). On the grid of multiples of ``h`` the format's values are the even multiples
   and the midpoints between them the odd ones; within ``|S|``'s binade (or the subnormal
   range) no other point of the grid exists, and the grid's cells ``(k h, (k + 1) h)`` lie
   inside the binade (``2**E`` and ``2**(E + 1)`` are multiples of ``h``). Every
   deterministic rounding mode is constant on each open cell, and so are its events
   (overflow, underflow, subnormal: functions of the rounded value on the unbounded-exponent
   grid, as the quantizer computes them; inexact: the cell holds no value). With ``v`` the
   offset of ``|S|`` above the format's value below it (``trunc``, ``|S|`` with the low
   ``d + 1`` bits cleared), ``vh = v mod h`` its offset in its cell, and ``w = e / ulp``
   plus ``2**-1000`` (in case the power-of-two scaling underflowed), the test is ``vh > w``
   and ``fl(vh + w) < h``: exact comparisons, or rounding that is monotone, so it implies
   ``[|S| - e, |S| + e]`` inside the cell. Then ``x`` is in that cell too (with ``S``'s
   sign: the cell excludes zero) and rounds as ``S`` does: ``trunc``, or ``trunc`` plus one
   quantum (nearest: when ``v >= h``; toward the magnitude's larger side: always; odd: when
   ``trunc`` is an even number of quanta, and at ``d = 51``, the binade of the smallest
   subnormal, ``trunc`` is one quantum, odd), then the overflow rule and the subnormal flag.
   The kernel handles ``E`` from ``max(emin - m, -900)`` (``max(emin, -900)`` without
   subnormals) to 999: there the result is never zero and never flushed; it marks the rest.
   When nothing reads the counts and the mode is to nearest, the value itself may lie in the
   interval: only the midpoints must not (``|v - h| > w``), nor the finer midpoint below a
   binade's first value or the midpoint below ``trunc`` (``v + h / 2 > w``, which keeps zero
   out too). The result is the same; only the inexact count could differ, and nobody reads
   it. So sums that are exact values of the format, common on FP16/BF16 data, are decided.
4. Undecided elements (a boundary within ``e``: sums on or near a midpoint or a value of the
   format; zeros; sums beyond the kernel's range; every element when the operands' squares
   leave float64's normal range, which skips the norms) go through:

   0. when many undecided sums are zero, the rounding is not DOWN and the product is not
      filtered transposed: those whose products are all zero, found by the operands'
      nonzero patterns (bit masks of each row of ``A`` and column of ``B`` that share no
      bit, :func:`fixedsim.jit.gemm_filtered.zero_sums`), are exact zeros, ``+0``;
   a. the interval test by the general scalar quantizer
      (:func:`fixedsim.jit.gemm_filtered.filter_round_at`: both ends of ``[S - e, S + e]``,
      widened by one float64 ulp, round to one value with the same events, zero and
      (counted) that value outside it; roundings and events are monotone), for any range;
   b. a compensated dot product (Dot2, Ogita, Rump and Oishi 2005,
      :func:`fixedsim.jit.gemm_filtered.dot2_at`, on the gathered columns of ``B``) for the
      elements neither c. settles:
      ``|fl(hi + lo) - x| <= (u |fl(hi + lo)| + gamma(K)^2 T) / (1 - u)``, ``T`` computed
      alongside with at most ``gamma(K)`` relative error; the radius ``2 (u |res| +
      gamma(K)^2 T) + 2**-1020`` covers that and its own rounding; then test a. again;
   c. an element whose products are all zero (``T == 0``) is an exact zero with the general
      kernel's sign (``-0`` only rounding DOWN with a ``-0`` product); one whose Dot2 steps
      all had a zero TwoSum error has ``hi`` = the exact sum (each step ``s + p = x`` held
      exactly), rounded once by the quantizer, a cancellation to zero taking the model's sign
      (``-0`` under DOWN, else ``+0``). This certificate is used from :data:`_CERTIFY_FROM`
      such elements; fewer go to d.;
   d. what is left (exact ties, exact values of the format when the counts are read, sums
      within Dot2's bound of a boundary) goes to the general kernel, element by element
      (``_general_at``; counted in ``paths["exact_filtered_general"]``).

Output events are counted only when ``c._read``; the number of roundings always.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np

from .. import counters as _counters
from ..formats import FloatFormat
from ..jit import gemm_filtered as _gk
from ..jit import quant as _q
from ..quantize import _kernel_params, resolve_overflow
from ..rounding import Overflow, Rounding
from .core import _dims, _general_at

NAME = "exact_filtered"
COMPUTES = ("exact accumulation rounded once into a float output of at most 50 fraction bits "
            "(deterministic rounding), products exact in float64 (float32, FP16, BF16 data): "
            "float64 BLAS, then a vectorised filter that rounds")
PROOF = ("BLAS's error is at most gamma(K) ||a|| ||b|| in any order; an element whose error "
         "interval lies in one cell between the format's values and midpoints rounds as the "
         "BLAS sum does; the others are summed again (Dot2) and filtered, then left to the "
         "general kernel")

_U = 2.0**-53
#: Outputs with fewer elements are filtered on one Numba thread, which in practice is all of
#: them: the filter runs right after a BLAS call, whose OpenBLAS workers keep spinning, and a
#: parallel kernel then waits for a CPU (see ``_round_output``). On the 2-core development
#: machine at n = 1024 the parallel filter took 8-20 ms on average (best 3 ms), one thread
#: 4 ms (best 3.7 ms).
_SERIAL = 2**40
_NEAREST = (Rounding.NEAREST_EVEN, Rounding.NEAREST_AWAY)
#: marked columns per row the filter kernel lists (rows with more are scanned again)
_MARKS = 16
#: ``A @ B`` is summed in chunks of ``_CHUNK`` columns of ``A`` from this ``K`` on (a
#: tighter bound, see the module docstring; as fast as one BLAS call or faster on the
#: tall-and-thin products of a weight gradient: 1.17 ms against 1.58 ms for 16 x 36,864 x 25,
#: 0.23 ms for both at 1 x 36,864 x 16, one thread).
_CHUNK_FROM = 1024
_CHUNK = 256
#: Dot2's exactness certificate (every step exact) is used from this many second-stage
#: elements; fewer go to the general kernel as before it (each costs it ~10 us at K = 512).
#: On BF16 data into FP32 at n = 512, 6% of the elements are exact sums: 98 ms -> 20 ms.
_CERTIFY_FROM = 64
#: A product with fewer than ``_FLIP_BELOW`` columns and at least ``_FLIP_RATIO`` times as
#: many rows is filtered transposed, ``S.T = B.T A.T`` (the same exact sums; only ``S``'s
#: summation order differs, which the bound covers): the filter's loop runs along a row, and
#: rows of 16 or 32 elements leave its vector lanes idle and its per-row work unshared. A
#: LeNet's first convolution (36,864 x 25 by 25 x 16, FP32 out, one thread): the filter 2.5
#: -> 1.9 ms and the listing of its marks 1.1 -> 0.1 ms, for a 0.7 ms copy of the result
#: back. Without ``zero_sums`` (a sum of zero products there has a zero row, whose zero norm
#: decides it).
_FLIP_BELOW = 64
_FLIP_RATIO = 2


def declines(p) -> str | None:
    """None when this row applies to ``p``, else the first condition it fails."""
    spec, f, ba, bb = p.spec, p.spec.output, p.ba, p.bb
    R, K, N = _dims(p)
    checks = (
        (spec.product is not None, "products are rounded (spec.product is set)"),
        (not (ba.finite and bb.finite), "an operand holds an infinity or a NaN"),
        (spec.accumulator is not None, "there is an accumulator"),
        (not isinstance(f, FloatFormat), "the output is not a float format"),
        (isinstance(f, FloatFormat)
         and (not f.has_negative_zero or f.inf_nan not in ("ieee", "fn")),
         "the output format's zeros and specials are not IEEE's (fnuz, unsigned, exponent-only "
         "or finite-only): the filter writes an exact zero's IEEE sign"),
    )
    for cond, why in checks:
        if cond:
            return why
    checks = (
        (f.man_bits > 50, "the output format is too wide for a float64 bound to decide it"),
        (spec.output_rounding is Rounding.STOCHASTIC, "the output rounding is stochastic"),
        (R == 0 or N == 0 or K == 0, "the product is empty"),
        (K > 2**30, "K > 2**30"),
        (ba.top == -1075 or bb.top == -1075, "an operand is all zeros"),
        (ba.sig + bb.sig > 53, "a product of the operands may be inexact in float64 (more "
                               "than 53 significant bits)"),
        (ba.lsb + bb.lsb < -960 or ba.top + bb.top + math.log2(max(K, 1)) > 1000,
         "the products' scale is near the ends of float64's range"),
    )
    for cond, why in checks:
        if cond:
            return why
    return None


@functools.lru_cache(maxsize=256)
def _params(f: FloatFormat, rounding: Rounding, relax: bool, count: bool):
    """The read-only ``pi``, ``pd`` of :func:`fixedsim.jit.gemm_filtered.filter_round`."""
    pi = np.zeros(_gk.N_I, np.int64)
    pi[_gk.I_M] = f.man_bits
    pi[_gk.I_EMIN] = f.emin
    pi[_gk.I_SUBN] = int(f.subnormals)
    pi[_gk.I_MODE] = int(rounding)
    pi[_gk.I_RELAX] = int(relax)
    pi[_gk.I_COUNT] = int(count)
    pd = np.zeros(_gk.N_D, np.float64)
    pd[_gk.D_MAX] = f.max
    pd[_gk.D_MINNORM] = f.min_normal
    if resolve_overflow(f, None) is Overflow.SATURATE:
        pd[_gk.D_OVP] = pd[_gk.D_OVN] = f.max
    else:
        pd[_gk.D_OVP] = _q.overflow_value(int(rounding), False, f.max)
        pd[_gk.D_OVN] = _q.overflow_value(int(rounding), True, f.max)
    for arr in (pi, pd):
        arr.setflags(write=False)  # one compiled signature
    return pi, pd


def run(p):
    """The ``(R, N)`` result in ``spec.output``'s container, counts added to ``p.c`` (the
    proof is in the module docstring). Never declines at run time."""
    spec, ba, bb, c = p.spec, p.ba, p.bb, p.c
    f = spec.output
    mm = getattr(p, "mm", None)
    gram = getattr(p, "gram", False) and mm is None
    # a lazily built A (a transposed convolution's, a Gram product's) stays unbuilt: the
    # product comes from mm or from B, the norms from a_norms or S, the rows a second look
    # needs from a_rows
    lazy = (mm is not None or gram) and getattr(p, "lazy", False)
    A = None if lazy else np.ascontiguousarray(p.A, np.float64)
    B = np.ascontiguousarray(p.B, np.float64)
    K, N = B.shape
    R = p.R if lazy else A.shape[0]
    flip = (not gram and N < _FLIP_BELOW and R >= _FLIP_RATIO * N
            and (mm is not None or K < _CHUNK_FROM))
    if gram:
        S, d = _gram_chunked(B)
    elif mm is not None:
        S, d = mm(0, B, 0, K), K
        S = np.ascontiguousarray(S.T if flip else S, np.float64)
    elif flip:
        S, d = B.T @ A.T, K  # S.T, C-contiguous
    elif K >= _CHUNK_FROM:
        S, d = _chunked(A, B)
    else:
        S, d = A @ B, K
    read = bool(c._read)
    cf = d * _U * (1.0 + 2.0**-16)
    if (2 * min(ba.lsb, bb.lsb) >= -960
            and 2 * max(ba.top, bb.top) + math.log2(K) <= 1000):  # squares normal, finite
        pi, pd = _params(f, spec.output_rounding,
                         not read and spec.output_rounding in _NEAREST, read)
        if gram:  # A's row norms are B's column norms: sums of squares, S's diagonal
            na = nb = np.sqrt(np.diagonal(S).copy())
            tot, out, fail, counts, marks = _filter(S, None, None, cf, pi, pd, f, na, nb,
                                                    _gk.GIVEN_A | _gk.GIVEN_B)
        else:
            na = p._a_norms() if lazy else np.empty(R)
            nb = np.empty(N)
            if flip:  # the transposed problem S.T = B.T A.T: its rows are the N columns
                if not lazy:
                    _gk.row_norms(A, na)
                tot, out, fail, counts, marks = _filter(S, np.ascontiguousarray(B.T), None, cf,
                                                        pi, pd, f, nb, na, _gk.GIVEN_B)
            else:
                tot, out, fail, counts, marks = _filter(S, None if lazy else A, B, cf, pi, pd,
                                                        f, na, nb, _gk.GIVEN_A if lazy else 0)
        marked = int(tot[_gk.C_MARKED])
        if marked and not (lazy or flip) and spec.output_rounding is not Rounding.DOWN:
            marked -= _gk.zero_sums(S, A, B, out, fail, counts, marks, _ZERO_MASKS)
        if marked:
            fr, fj = _marked(counts[:, _gk.C_MARKED], marks, fail)
            if flip:
                fr, fj = fj, fr
        if flip:
            S, out = S.T, np.ascontiguousarray(out.T)
    else:  # every element to the second stage
        if flip:
            S = S.T
        out = np.empty((R, N), f.dtype)
        na = nb = None
        tot = np.zeros(_gk.N_C, np.int64)
        marked = R * N
        fr, fj = np.divmod(np.arange(R * N), N)
    c.paths[NAME] = c.paths.get(NAME, 0) + 1
    flags = np.zeros(_q.N_FLAGS, np.int64)
    if not marked:
        fr = fj = np.zeros(0, np.int64)
    if fr.size:
        flags += _second_stage(A, B, S, p, fr, fj, out, cf, na, nb, read)
    if read:
        flags[_q.F_INEXACT] += tot[_gk.C_DECIDED]
        flags[_q.F_OVERFLOW] += tot[_gk.C_OVERFLOW]
        flags[_q.F_SUBNORMAL] += tot[_gk.C_SUBNORMAL]
        c.output += _counters.StageCounts.from_flags(flags, R * N)
    else:
        c.output.roundings += R * N
    return out


def _filter(S, A, B, cf, pi, pd, f, na, nb, given):
    """:func:`fixedsim.jit.gemm_filtered.filter_round` of ``S`` (its norms ``na``, ``nb``
    computed there unless ``given`` says so; ``A`` or ``B`` None when not read): ``(tot, out,
    fail, counts, marks)``."""
    R, N = S.shape
    out = np.empty((R, N), f.dtype)
    fail = np.empty((R, N), np.uint8)
    counts = np.empty((R, _gk.N_C), np.int64)
    marks = np.empty((R, _MARKS), np.int64)
    args = (S, np.empty((1, 1)) if A is None else A, np.empty((1, 1)) if B is None else B,
            cf, pi, pd, out, fail, counts, na, nb, marks, given)
    tot = _gk.filter_round(*args) if R * N >= _SERIAL else _on_one_thread(
        _gk.filter_round, args)
    return tot, out, fail, counts, marks


#: The undecided sums that are zero (``S == 0``) are checked for products that are all zero
#: (:func:`fixedsim.jit.gemm_filtered.zero_sums`) when at least ``(R + N) / _ZERO_MASKS`` of
#: them are marked: the operands' nonzero patterns then cost less than their second look. In
#: a network's weight gradients many sums meet no nonzero pair (ReLU's zeros in the
#: activations, in the errors, or in both): 16% of the sums of the MLP's second weight
#: gradient (1,000 x 64 by 64 x 1,000), whose second look had taken 10 of its 25 ms.
_ZERO_MASKS = 16


def _chunked(A, B):
    """``(S, d)``: ``A @ B`` summed in chunks: the ``n_c`` chunks of :data:`_CHUNK` columns
    of ``A`` (one stacked ``numpy.matmul``, a BLAS call per chunk), their products summed,
    then the shorter last chunk's product added; ``d`` bounds the additions any product
    passes through (module docstring, step 1)."""
    R, K = A.shape
    N = B.shape[1]
    k_c = _CHUNK
    n_c, m = K // k_c, K // k_c * k_c
    parts = np.matmul(A[:, :m].reshape(R, n_c, k_c).transpose(1, 0, 2),
                      B[:m].reshape(n_c, k_c, N))
    S = parts.sum(axis=0)
    if m < K:
        S += A[:, m:] @ B[m:]
    return S, k_c + n_c + 1


#: A Gram product ``B.T @ B`` (:func:`_gram_chunked`) is summed in chunks of at least this
#: many rows of ``B`` (``sqrt(K)`` when larger: it minimises ``d``). The products ``c.T @ c``
#: of contiguous row blocks ``c`` of ``B`` were faster than the stacked product of
#: :func:`_chunked` on the transposed copy it needs: K-FAC's factor of a LeNet's second
#: convolution at batch 1,024 (65,536 x 401 patches, one thread, AMD EPYC Zen 3) 0.94 s
#: against 2.4 s, and 1,024 rows faster than 256 (1.2 s). BLAS's ``dsyrk``, which computes
#: one triangle, was no faster there (1.15 s).
_GRAM_CHUNK = 1024


def _gram_chunked(B):
    """``(S, d)``: the Gram product ``B.T @ B`` (``A = B.T``, never built) and the bound
    ``d`` on the additions any product passes through. From ``K = 2 * k_c`` rows on, summed
    in chunks of ``k_c = max(_GRAM_CHUNK, isqrt(K))`` consecutive rows of ``B``: each
    chunk's product ``c.T @ c`` by BLAS (``k_c`` additions at most), their results added in
    order (``n_c`` more), ``d = k_c + n_c + 1``, as :func:`_chunked`; else one BLAS call,
    ``d = K``."""
    K = B.shape[0]
    k_c = max(_GRAM_CHUNK, math.isqrt(K))
    if K < 2 * k_c:
        return B.T @ B, K
    S = B[:k_c].T @ B[:k_c]
    for k0 in range(k_c, K, k_c):
        c = B[k0:k0 + k_c]
        S += c.T @ c
    return np.ascontiguousarray(S), k_c + -(-K // k_c) + 1


def _gathered(B, fj):
    """``(ui, BT)``: the columns of ``B`` that ``fj`` names, each once and in ascending order,
    as the rows of ``BT``, and each entry of ``fj``'s index among them."""
    cols, ui = np.unique(fj, return_inverse=True)
    BT = np.empty((cols.size, B.shape[0]))
    _gk.gather_columns(B, cols, BT)
    return ui.reshape(-1), BT


#: :func:`fixedsim.jit.gemm_filtered.dot2_sparse_at` runs when at most this share of the
#: listed rows' entries is nonzero (it reads ``B`` in place, one cache line per product).
_SPARSE = 0.5


def _sparse_rows(A, fr) -> bool:
    """Are the rows ``fr`` of ``A`` mostly zeros (sampled on up to 64 of them)?"""
    rows = np.unique(fr[:: max(1, fr.size // 64)])
    return np.count_nonzero(A[rows]) <= _SPARSE * A.shape[1] * rows.size


def _marked(per_row, marks, fail):
    """``(rows, cols)`` of the marked elements, row by row, from the kernel's first marks of
    each row (``fail`` scanned only for rows with more)."""
    if np.count_nonzero(per_row > _MARKS) * 2 > per_row.size:  # most rows: one scan of all
        fr, fj = np.nonzero(fail)
        return fr, fj
    n = np.minimum(per_row, _MARKS)
    fr = np.repeat(np.arange(per_row.size), n)
    fj = marks[np.arange(_MARKS) < n[:, None]]
    full = np.flatnonzero(per_row > _MARKS)
    if full.size:
        keep = ~np.isin(fr, full)
        r2, j2 = np.nonzero(fail[full])
        fr = np.concatenate([fr[keep], full[r2]])
        fj = np.concatenate([fj[keep], j2])
    return fr, fj


def _on_one_thread(fn, args):
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        numba.set_num_threads(threads)


def _second_stage(A, B, S, p, fr, fj, out, cf, na, nb, strict):
    """The elements ``(fr[i], fj[i])`` the vectorised filter left: the interval test on the
    scalar quantizer (sums beyond its range), Dot2 and the test again, signed zeros, then the
    general kernel; their results into ``out``; returns their event counts (``F_*``).
    ``A`` None: the rows needed are built (:meth:`~fixedsim.matmul.paths.Product.rows_of_A`)
    and the general kernel writes into a buffer of those rows."""
    spec, c = p.spec, p.c
    f = spec.output
    K = B.shape[0]
    P, U, D = _kernel_params(f, spec.output_rounding, resolve_overflow(f, None), 64)
    flags = np.zeros(_q.N_FLAGS, np.int64)
    n = fr.size
    ok = np.empty(n, np.uint8)
    vals = np.empty(n)
    if na is not None:  # the first bound, on the scalar quantizer
        flags += _gk.filter_round_at(S[fr, fj], cf * na[fr] * nb[fj], strict, P, U, D, vals, ok)
        done = ok == 1
        out[fr[done], fj[done]] = vals[done]
        fr, fj = fr[~done], fj[~done]
        n = fr.size
        if n == 0:
            return flags
    final = out
    if A is None:  # only the rows needed; fr becomes an index into them
        rows, fr_sub = np.unique(fr, return_inverse=True)
        A = p.rows_of_A(rows)
        out = np.empty((rows.size, out.shape[1]), out.dtype)
        fr_full, fr = fr, fr_sub.reshape(-1)
    else:
        fr_full = fr
    hi, lo, T, exact = np.empty(n), np.empty(n), np.empty(n), np.empty(n, np.uint8)
    BT = None
    if _sparse_rows(A, fr):  # most products zero: over the nonzero a_k alone, B in place
        _gk.dot2_sparse_at(A, B, fr, fj, hi, lo, T, exact)
    else:
        ui, BT = _gathered(B, fj)
        _gk.dot2_at(A, BT, fr, ui, hi, lo, T, exact)
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
    if n < _CERTIFY_FROM:
        exact[:] = 0  # few elements: the general kernel, as before the certificate
    done = zero | (exact == 1)  # Dot2 summed exactly: round the exact sum itself
    ex = done & ~zero
    if ex.any():
        x = hi[ex]
        if spec.output_rounding is Rounding.DOWN:  # an exact cancellation: -0 under DOWN
            x[x == 0.0] = -0.0
        vals = np.empty(x.size)
        flags += _gk.quantize_at(x, P, U, D, vals)
        out[fr[ex], fj[ex]] = vals
    rest = ~done
    if rest.any():
        res = hi[rest] + lo[rest]
        g = K * _U / (1.0 - K * _U)
        err = 2.0 * (_U * np.abs(res) + g * g * T[rest]) + 2.0**-1020
        ok = np.empty(res.size, np.uint8)
        vals = np.empty(res.size)
        flags += _gk.filter_round_at(res, err, strict, P, U, D, vals, ok)
        fr2, fj2 = fr[rest], fj[rest]
        dec = ok == 1
        out[fr2[dec], fj2[dec]] = vals[dec]
        done[np.flatnonzero(rest)[dec]] = True
    left = ~done
    if left.any():  # the general kernel reads the gathered columns (gathered here if not yet)
        fjl = fj[left]
        if BT is None:
            uil, BT = _gathered(B, fjl)
        else:
            uil = ui[left]
        flags += _general_at(A, B, spec, p.ba, p.bb, p.keys, p.rb, fr[left], fjl, out, c, BT,
                             bt_cols=uil)[2]
        c.paths[NAME + "_general"] = c.paths.get(NAME + "_general", 0) + int(left.sum())
    if final is not out:  # the rows' buffer into the result
        final[fr_full, fj] = out[fr, fj]
    return flags
