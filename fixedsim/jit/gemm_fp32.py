"""FP32 accumulators: fused multiply-add chains into float32 (the FMA instruction, a float32
loop, or a float64 TwoSum loop rounding to odd)."""


import numpy as np
from numba import prange

from .bits import f32_bits, f32_from_bits, f64_bits, f64_from_bits, fma
from .gemm_rows import _I32, _finish_rows, _group_rows, _lean_row_by_row, _lean_rows
from .options import jit, jit_inline, jit_parallel
from .quant import (
    F_INEXACT,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    N_FLAGS,
    ODD,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
)

_F32_MIN_NORMAL = np.float32(2.0**-126)
_F32_INF = np.float32(np.inf)



@jit_inline
def _f32_add(a0, p):
    """``a0 + p`` in float32 and its inexact flag (int32 0/1): neither exact-difference check
    of Fast2Sum recovers the other operand (exact for finite operands in either order)."""
    s = a0 + p
    return s, _I32((s - a0 != p) | (s - p != a0))


@jit_inline
def _f32_lean(a0, x, b, MODE, L):
    """One float32 FMA-chain step ``a0 + x*b`` (the product exact in float32), nearest even:
    the sum and its inexact flag (neither exact-difference check of Fast2Sum recovers the
    other operand). An infinite or subnormal sum, or a NaN ``a0``, gives NaN: the element is
    recomputed by :func:`_f32_full` steps, which count those events."""
    s, inexact = _f32_add(a0, x * b)
    t = abs(s)
    keep = (t < _F32_INF) & ((t >= _F32_MIN_NORMAL) | (s == np.float32(0.0)))
    return (s if keep else np.float32(np.nan)), inexact


@jit_inline
def _f32_full(a0, p):
    """One float32 FMA-chain step with its counts (0/1 int32: inexact, overflow, subnormal),
    as the general kernel counts them: an infinite ``a0`` stays as it is, uncounted."""
    s, f = _f32_add(a0, p)
    fin = _I32(abs(a0) < _F32_INF)  # 0/1 integers: branch-free, vectorises
    inexact = fin * f
    over = fin * _I32(abs(s) == _F32_INF)
    subn = _I32(s != 0) * _I32(abs(s) < _F32_MIN_NORMAL)
    return s, inexact, over, subn


@jit
def _f32_row_full(ar, B, orow, crow, P):
    """One row of :func:`gemm_f32_chain` by :func:`_f32_full`, vectorised."""
    N = orow.size
    acc = np.zeros(N, np.float32)
    inexact = np.zeros(N, np.int32)
    over = np.zeros(N, np.int32)
    subn = np.zeros(N, np.int32)
    for k in range(ar.size):
        x = ar[k]
        bk = B[k]
        for j in range(N):
            s, f1, f2, f3 = _f32_full(acc[j], x * bk[j])
            acc[j] = s
            inexact[j] += f1
            over[j] += f2
            subn[j] += f3
    orow[:] = acc
    crow[F_INEXACT] += inexact.sum()
    crow[F_OVERFLOW] += over.sum()
    crow[F_SUBNORMAL] += subn.sum()


@jit
def _f32_elem(ar, B, j, crow, P):
    """One element of :func:`gemm_f32_chain` by :func:`_f32_full`."""
    acc = np.float32(0.0)
    for k in range(ar.size):
        acc, f1, f2, f3 = _f32_full(acc, ar[k] * B[k, j])
        crow[F_INEXACT] += f1
        crow[F_OVERFLOW] += f2
        crow[F_SUBNORMAL] += f3
    return acc


@jit_inline
def _f32_safe_step(a0, x, b, MODE, L):
    """:func:`_f32_add` of ``a0 + x*b``: the step of :func:`_lean_rows` where no sum can be
    infinite or subnormal."""
    return _f32_add(a0, x * b)


@jit_inline
def _f32_add4(a0, x0, x1, x2, x3, y0, y1, y2, y3):
    """Four :func:`_f32_add` steps ``a0 + x0*y0 + ... + x3*y3`` in order, and how many were
    inexact."""
    s, f0 = _f32_add(a0, x0 * y0)
    s, f1 = _f32_add(s, x1 * y1)
    s, f2 = _f32_add(s, x2 * y2)
    s, f3 = _f32_add(s, x3 * y3)
    return s, (f0 + f1) + (f2 + f3)


@jit_inline
def _f32_fma_step(a0, x, b, MODE, L):
    """The FMA instruction ``fl32(a0 + x*b)``, IEEE 754 in every case (subnormal and
    infinite sums included), uncounted: the step of :func:`_lean_rows` that counts nothing."""
    return fma(x, b, a0), _I32(0)


@jit_inline
def _f32_fma4(a0, x0, x1, x2, x3, y0, y1, y2, y3):
    """Four :func:`_f32_fma_step` steps in order, uncounted."""
    return fma(x3, y3, fma(x2, y2, fma(x1, y1, fma(x0, y0, a0)))), _I32(0)


@jit_inline
def _f32_rows4(acc, cnt, A, rows, B, step4, step):
    """Four rows of :func:`gemm_f32_chain` without checks for infinite or subnormal sums:
    four steps of each row per pass over the outputs (the four sums stay in registers between
    them; the four rows' chains are independent, so their latencies overlap), by
    ``step4(a0, x0, x1, x2, x3, y0, y1, y2, y3)``, which returns the sum and how many steps
    were inexact (zero when uncounted). The last ``K % 4`` steps run one per pass
    (:func:`_lean_rows` with ``step``)."""
    a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
    c0, c1, c2, c3 = cnt[0], cnt[1], cnt[2], cnt[3]
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    K = A.shape[1]
    K4 = K - K % 4
    for k in range(0, K4, 4):
        x00, x01, x02, x03 = A[i0, k], A[i0, k + 1], A[i0, k + 2], A[i0, k + 3]
        x10, x11, x12, x13 = A[i1, k], A[i1, k + 1], A[i1, k + 2], A[i1, k + 3]
        x20, x21, x22, x23 = A[i2, k], A[i2, k + 1], A[i2, k + 2], A[i2, k + 3]
        x30, x31, x32, x33 = A[i3, k], A[i3, k + 1], A[i3, k + 2], A[i3, k + 3]
        b0, b1, b2, b3 = B[k], B[k + 1], B[k + 2], B[k + 3]
        for j in range(a0.size):
            y0, y1, y2, y3 = b0[j], b1[j], b2[j], b3[j]
            s, f = step4(a0[j], x00, x01, x02, x03, y0, y1, y2, y3)
            a0[j] = s
            c0[j] += f
            s, f = step4(a1[j], x10, x11, x12, x13, y0, y1, y2, y3)
            a1[j] = s
            c1[j] += f
            s, f = step4(a2[j], x20, x21, x22, x23, y0, y1, y2, y3)
            a2[j] = s
            c2[j] += f
            s, f = step4(a3[j], x30, x31, x32, x33, y0, y1, y2, y3)
            a3[j] = s
            c3[j] += f
    _lean_rows(acc, cnt, A, rows, B, step, RNE, 0, K4)


#: How :func:`gemm_f32_chain` runs: checking every sum (counting overflows and subnormals),
#: without those checks (the caller proved that no sum can be infinite or subnormal), or
#: counting nothing (nobody reads the counts).
F32_CHECKED, F32_SAFE, F32_UNCOUNTED = 0, 1, 2


@jit_parallel
def gemm_f32_chain(A, B, out, how):
    """FP32 fused-multiply-add chain on float32 operands: ``out = A @ B`` in order.

    ``acc[j] = fl32(acc[j] + A[r, k] * B[k, j])`` for ``k = 0..K-1`` (``K < 2**31``),
    vectorised over ``j``, four rows at a time. ``how``:

    - ``F32_CHECKED`` and ``F32_SAFE`` need products exact in float32 (the caller checks);
      each step is then one correct rounding of ``acc + a*b``, which a float32 addition
      gives. They return per-row counts of the accumulator roundings (inexact, overflow,
      subnormal), as the general kernel counts them: a step from a finite sum is inexact when
      neither of the exact-difference checks of Fast2Sum recovers the other operand.
      ``F32_CHECKED`` runs :func:`_lean_rows`, and recomputes the elements with an infinite
      or subnormal sum counting every event (:func:`_finish_rows`); ``F32_SAFE``, when the
      caller proved that no sum can be infinite or subnormal, runs :func:`_f32_rows4`
      without those checks.
    - ``F32_UNCOUNTED`` runs the FMA instruction (:func:`fixedsim.jit.bits.fma`), one
      correct IEEE 754 rounding per step whatever the products, in :func:`_f32_rows4`, and
      returns one row of zero counts: for a caller whose counts nobody reads.
    """
    R, K = A.shape
    N = B.shape[1]
    counts = np.zeros((1 if how == F32_UNCOUNTED else R, N_FLAGS), np.int64)
    for g in prange((R + 3) // 4):
        rows, n = _group_rows(g, R)
        acc = np.zeros((4, N), np.float32)
        cnt = np.zeros((4, N), np.int32)
        if how == F32_UNCOUNTED:
            _f32_rows4(acc, cnt, A, rows, B, _f32_fma4, _f32_fma_step)
            for i in range(n):
                out[rows[i]] = acc[i]
            continue
        if how == F32_SAFE:
            _f32_rows4(acc, cnt, A, rows, B, _f32_add4, _f32_safe_step)
        else:
            _lean_rows(acc, cnt, A, rows, B, _f32_lean, RNE, 0)
        _finish_rows(acc, cnt, A, B, rows, n, out, counts, _f32_row_full, _f32_elem, 0)
    return counts


_TWO128 = 2.0**128


@jit_inline
def _chain32_step(a0, p, MODE, ovp, ovn):
    """One FP32 FMA-chain step ``round(a0 + p)``, float64 lanes, any deterministic mode.

    ``a0`` is the running sum (a float32 value, or an infinity, held in float64) and ``p`` an
    exact product in float64. The exact sum is ``s + e`` (TwoSum; under DOWN ``s`` is computed
    as ``-((-a0) - p)``, which gives the same nonzero sums and IEEE's sign of an exact zero
    for that mode); ``x`` is it rounded to odd at 53 bits, so rounding ``x`` to float32's 24
    bits is the correct rounding of ``s + e``. The float32 cast rounds ``x`` to nearest even
    (IEEE overflow and subnormals included); the other modes move that result one float32 ulp
    (an integer step on the magnitude bits) after comparing it with ``x``. A magnitude at or
    beyond the pattern of infinity, or ``|x| >= 2**128``, overflows: the result is then
    ``ovp``/``ovn`` (magnitude bits by sign). An infinite ``a0`` stays as it is, uncounted.
    Returns the new sum and the flags (inexact, overflow, underflow, subnormal) as 0/1 ints.
    """
    if MODE == RDN:
        s = -((-a0) - p)
    else:
        s = a0 + p
    bp = s - a0
    e = (a0 - (s - bp)) + (p - bp)
    # round to odd at 53 bits; 0/1 integers rather than booleans keep the loop branch-free
    sb = f64_bits(s)
    mag = sb & 0x7FFFFFFFFFFFFFFF
    inexact = np.int64(e != 0.0)
    down = inexact * (np.int64(e < 0.0) ^ np.int64(s < 0.0))  # the exact sum is nearer zero
    x = f64_from_bits(((mag - down) | inexact) | (sb ^ mag))
    r = np.float32(x)  # nearest even, IEEE overflow
    rb = np.int64(f32_bits(r))
    m32 = rb & 0x7FFFFFFF
    s32 = rb ^ m32
    neg = np.int64(s32 != 0)
    back = np.float64(r)
    if MODE == RNE:
        cm = m32
    elif MODE == RNA:  # away from zero at an exact tie, where the cast went to even (down)
        ax = abs(x)
        ab = abs(back)
        an = np.float64(f32_from_bits(m32 + 1))
        cm = m32 + np.int64(ab < ax) * np.int64(ax + ax == ab + an)
    elif MODE == RTZ:
        cm = m32 - np.int64(abs(back) > abs(x))
    elif MODE == RDN:
        cm = m32 + np.int64(back > x) * (2 * neg - 1)
    elif MODE == RUP:
        cm = m32 + np.int64(back < x) * (1 - 2 * neg)
    else:  # ODD: an inexact even result moves toward x
        d = np.int64(back != x) * (1 - (m32 & 1))
        cm = m32 + d * (2 * np.int64(abs(back) < abs(x)) - 1)
    ovf = np.int64(abs(x) >= _TWO128) | np.int64(cm >= 0x7F800000)
    rm = cm + ovf * ((ovp + neg * (ovn - ovp)) - cm)
    res = np.float64(f32_from_bits(rm | s32))
    fin = np.int64(abs(a0) < np.inf)
    f_inexact = fin * np.int64(res != x)
    f_over = fin * ovf
    f_under = fin * np.int64(rm == 0) * np.int64(x != 0.0)
    f_sub = fin * np.int64(rm != 0) * np.int64(rm < 0x800000)
    resb = f64_bits(res)
    v = f64_from_bits(resb ^ ((resb ^ f64_bits(a0)) & (fin - 1)))  # a0 when it is infinite
    return v, np.int32(f_inexact), np.int32(f_over), np.int32(f_under), np.int32(f_sub)


@jit
def _chain32_row_full(ar, B, orow, crow, P):
    """One row by :func:`_chain32_step`, every event counted, vectorised (``P = (mode, ovp,
    ovn, B64)``: ``B64``, ``B`` in float64, is the one used)."""
    mode, ovp, ovn, B64 = P
    N = orow.size
    acc = np.zeros(N)
    ci = np.zeros(N, np.int32)
    co = np.zeros(N, np.int32)
    cu = np.zeros(N, np.int32)
    cs = np.zeros(N, np.int32)
    for k in range(ar.size):
        x = np.float64(ar[k])
        bk = B64[k]
        for j in range(N):
            v, f1, f2, f3, f4 = _chain32_step(acc[j], x * bk[j], mode, ovp, ovn)
            acc[j] = v
            ci[j] += f1
            co[j] += f2
            cu[j] += f3
            cs[j] += f4
    for j in range(N):
        orow[j] = acc[j]
    crow[F_INEXACT] += ci.sum()
    crow[F_OVERFLOW] += co.sum()
    crow[F_UNDERFLOW] += cu.sum()
    crow[F_SUBNORMAL] += cs.sum()


@jit
def _chain32_elem(ar, B, j, crow, P):
    """One element by :func:`_chain32_step` (``P`` as for :func:`_chain32_row_full`)."""
    mode, ovp, ovn, B64 = P
    acc = 0.0
    for k in range(ar.size):
        acc, f1, f2, f3, f4 = _chain32_step(acc, np.float64(ar[k]) * B64[k, j], mode, ovp,
                                            ovn)
        crow[F_INEXACT] += f1
        crow[F_OVERFLOW] += f2
        crow[F_UNDERFLOW] += f3
        crow[F_SUBNORMAL] += f4
    return acc


_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = 2.0**-126


@jit_inline
def _chain32_lean(a0, x, b, MODE, L):
    """:func:`_chain32_step` of ``a0 + x*b`` when nothing overflows or goes below the smallest
    normal: returns the new sum and its inexact flag (0/1). The sum is NaN (and stays NaN:
    :func:`_lean_rows`) whenever the rounded value may overflow, be subnormal or underflow
    (``|x|`` beyond float32's max, or nonzero below its smallest normal), or ``a0`` is NaN;
    the recomputation counts those events."""
    p = x * b
    if MODE == RDN:
        s = -((-a0) - p)
    else:
        s = a0 + p
    bp = s - a0
    e = (a0 - (s - bp)) + (p - bp)
    sb = f64_bits(s)
    mag = sb & 0x7FFFFFFFFFFFFFFF
    inexact = np.int64(e != 0.0)
    down = inexact & (np.int64(e < 0.0) ^ np.int64(s < 0.0))
    x = f64_from_bits(((mag - down) | inexact) | (sb ^ mag))
    r = np.float32(x)
    back = np.float64(r)
    ax = abs(x)
    keep = (ax <= _F32_MAX) & ((ax >= _F32_TINY) | (ax == 0.0))
    if MODE == RNE:
        return (back if keep else np.nan), np.int64(back != x)
    rb = np.int64(f32_bits(r))
    m32 = rb & 0x7FFFFFFF
    s32 = rb ^ m32
    if MODE == RNA:
        ab = abs(back)
        an = np.float64(f32_from_bits(m32 + 1))
        cm = m32 + (np.int64(ab < ax) & np.int64(ax + ax == ab + an))
    elif MODE == RTZ:
        cm = m32 - np.int64(abs(back) > ax)
    elif MODE == RDN:  # magnitude down for a positive value, up for a negative one
        d = np.int64(back > x)
        cm = m32 + (d ^ -(1 - (s32 >> 31))) + (1 - (s32 >> 31))
    elif MODE == RUP:  # magnitude up for a positive value, down for a negative one
        d = np.int64(back < x)
        cm = m32 + (d ^ -(s32 >> 31)) + (s32 >> 31)
    else:  # ODD
        d = np.int64(back != x) & (1 - (m32 & 1))
        up = np.int64(abs(back) < ax)
        cm = m32 + (d & up) - (d & (1 - up))
    res = np.float64(f32_from_bits(cm | s32))
    return (res if keep else np.nan), np.int64(res != x)


@jit_parallel
def gemm_chain32(A, B, out, mode, ovp, ovn):
    """FP32 fused-multiply-add chain, products exact in float64: ``out = A @ B`` in order.

    ``acc[j] = round(acc[j] + A[r, k] * B[k, j])`` into FP32 for ``k = 0..K-1`` (``A``, ``B``
    float64 whose products are exact; the caller checks), vectorised over ``j``, row by row
    (:func:`_lean_row_by_row`: four copies of this step per mode took 18 s more to compile,
    for 0-12% of speed) by :func:`_chain32_lean`, one loop per deterministic rounding mode;
    an element where an overflow, subnormal or underflow may have happened is recomputed with
    :func:`_chain32_step`, which counts every event (:func:`_finish_rows`).
    ``ovp``/``ovn``: magnitude bits of an overflowed result by sign. Returns per-row counts,
    as the general kernel counts the accumulator stage.
    """
    R, K = A.shape
    N = B.shape[1]
    counts = np.zeros((R, N_FLAGS), np.int64)
    P = (mode, ovp, ovn, B)
    for g in prange((R + 3) // 4):
        rows, n = _group_rows(g, R)
        acc = np.zeros((4, N))
        cnt = np.zeros((4, N), np.int64)
        if mode == RNE:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, RNE, 0)
        elif mode == RNA:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, RNA, 0)
        elif mode == RTZ:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, RTZ, 0)
        elif mode == RDN:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, RDN, 0)
        elif mode == RUP:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, RUP, 0)
        else:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain32_lean, ODD, 0)
        _finish_rows(acc, cnt, A, B, rows, n, out, counts, _chain32_row_full, _chain32_elem, P)
    return counts


@jit_inline
def _fma32_lean(a0, x, b, MODE, L):
    """One FP32 FMA-chain step on float32 operands, nearest even: the hardware FMA gives the
    sum; float64 tells whether it was exact (the product is exact there, and the float64
    sum ``s`` is exact iff both differences of Fast2Sum recover the other operand; then the
    step is exact iff the float32 result equals ``s``). Returns the sum and the inexact flag;
    the sum is NaN for an infinite, subnormal or underflowed result or a NaN ``a0`` (the
    element is recomputed counting those events)."""
    r = fma(x, b, a0)
    p = np.float64(x) * np.float64(b)
    a = np.float64(a0)
    s = a + p
    inexact = _I32(s - a != p) | _I32(s - p != a) | _I32(np.float64(r) != s)
    t = abs(r)
    keep = (t < _F32_INF) & ((t >= _F32_MIN_NORMAL) | (s == 0.0))
    return (r if keep else np.float32(np.nan)), inexact


@jit_parallel
def gemm_fma32(A, B, B64, out, ovp, ovn):
    """FP32 fused-multiply-add chain on float32 operands, nearest even, IEEE overflow:
    ``out = A @ B`` in order, with the FMA instruction (:func:`fixedsim.jit.bits.fma`),
    vectorised over the outputs, four rows at a time (:func:`_lean_rows`). ``B64`` is ``B``
    in float64. Returns per-row counts as :func:`gemm_chain32` does; an element with an
    infinite, subnormal or underflowed sum is recomputed by its counting step
    (:func:`_chain32_step`)."""
    R, K = A.shape
    N = B.shape[1]
    counts = np.zeros((R, N_FLAGS), np.int64)
    P = (RNE, ovp, ovn, B64)
    for g in prange((R + 3) // 4):
        rows, n = _group_rows(g, R)
        acc = np.zeros((4, N), np.float32)
        cnt = np.zeros((4, N), np.int32)
        _lean_rows(acc, cnt, A, rows, B, _fma32_lean, RNE, 0)
        _finish_rows(acc, cnt, A, B, rows, n, out, counts, _chain32_row_full, _chain32_elem, P)
    return counts


@jit_inline
def _kernel_rows(h, kh, r0, sh, Ho, skip, ii, hh):
    """The kernel rows ``i`` that output row ``h`` of a transposed convolution steps through,
    in order, into ``ii``, with the gradient row each meets (``h + i - r0 = ho * sh``) into
    ``hh``; with ``skip`` only those that meet one, else all, ``-1`` marking the grid's
    ``+0.0``. Returns how many. The kernel columns of an output column likewise (``w, kw,
    q0, sw, Wo``)."""
    ni = 0
    for i in range(kh):
        t = h + i - r0
        ho = t // sh
        on = t >= 0 and t - ho * sh == 0 and ho < Ho
        if on or not skip:
            ii[ni] = i
            hh[ni] = ho if on else -1
            ni += 1
    return ni


#: :func:`conv_t_f32_flat` runs when its tiled copies (``B``'s rows ``W`` times, an image's
#: gradient values ``C`` times) have at most this many float32 elements each (8 MB).
CONV_T_FLAT = 2**21


@jit_parallel
def conv_t_f32_flat(G, B, kh, kw, sh, r0, q0, H, W, out):
    """:func:`conv_t_f32_chain` with ``skip`` and a column stride ``sw`` of 1, the same steps
    in the same order, so the same bits, laid out for the vector unit: the ``W`` outputs of
    an image row take step ``(o, i, j)`` side by side (independent chains, so the FMA's
    latency overlaps), and with ``sw = 1`` the outputs ``w`` whose ``w + j - q0`` falls on
    the grid are a range of the row, ``w`` from ``max(d, 0)`` to ``min(W, Wo + d)`` with ``d
    = q0 - j``: one loop over that range's ``(w, c)``, against the gradient row with each
    value repeated ``C`` times and ``B``'s row repeated ``W`` times (a loop over the ``C``
    channels alone is too short for the vector unit when ``C`` is 16: 2x slower on the
    LeNet's second convolution). The caller keeps both copies within :data:`CONV_T_FLAT`."""
    N, O, Ho, Wo = G.shape
    K, C = B.shape
    L = W * C
    Bt = np.empty((K, L), np.float32)
    for k in range(K):
        for w in range(W):
            for c in range(C):
                Bt[k, w * C + c] = B[k, c]
    for n in prange(N):
        acc = np.empty(L, np.float32)
        xe = np.empty((O, Ho, Wo * C), np.float32)
        for o in range(O):
            for ho in range(Ho):
                for wo in range(Wo):
                    g = G[n, o, ho, wo]
                    for c in range(C):
                        xe[o, ho, wo * C + c] = g
        ii = np.empty(kh, np.int64)  # the kernel rows that meet a gradient row, and its row
        hh = np.empty(kh, np.int64)
        for h in range(H):
            ni = _kernel_rows(h, kh, r0, sh, Ho, True, ii, hh)
            acc[:] = np.float32(0.0)
            for o in range(O):
                for p in range(ni):
                    for j in range(kw):
                        d = q0 - j
                        w0 = max(d, 0)
                        ln = (min(W, Wo + d) - w0) * C
                        if ln <= 0:
                            continue
                        av = acc[w0 * C:w0 * C + ln]
                        xv = xe[o, hh[p], (w0 - d) * C:(w0 - d) * C + ln]
                        bv = Bt[(o * kh + ii[p]) * kw + j]
                        for m in range(ln):  # vectorised over (w, c)
                            av[m] = fma(xv[m], bv[m], av[m])
            out[(n * H + h) * W:(n * H + h + 1) * W] = acc.reshape(W, C)


@jit_parallel
def conv_t_f32_chain(G, B, kh, kw, sh, sw, r0, q0, H, W, skip, out):
    """:func:`gemm_f32_chain`'s uncounted FMA chain (``F32_UNCOUNTED``) for a transposed
    convolution's matrix, read from the gradient instead of built: row ``(n, h, w)`` of ``A``
    holds ``Zp[n, o, h + i, w + j]`` in column ``(o, i, j)``, ``Zp`` the gradient ``G``
    (float32, ``(N, O, Ho, Wo)``) spread with strides ``sh, sw`` from offsets ``r0, q0``
    onto a grid of ``+0.0`` (``Zp[n, o, ho*sh + r0, wo*sw + q0] = G[n, o, ho, wo]``).

    ``out[(n*H + h)*W + w, c]`` is ``acc = fl32(acc + a*b)`` over ``k = (o*kh + i)*kw + j``
    in order from ``acc = +0``, by the FMA instruction, ``a`` the grid's value and ``b =
    B[k, c]``: the steps of :func:`gemm_f32_chain` on the built matrix, in the same order on
    the same values, so the same bits, without the ``N H W x O kh kw`` matrix (59 MB for a
    LeNet's second convolution at batch 64). With ``skip`` the steps whose ``a`` is the
    grid's ``+0.0`` are left out: the caller proved that no partial sum is ``-0.0`` (a
    nonzero exact sum that rounds to zero: every product a multiple of ``2**-149`` or a
    coarser power of two rules it out), and a step adding ``+-0`` to a sum that is not
    ``-0.0`` leaves it as it is (``+0 + -0 = +0`` to nearest even). Vectorised over the
    channels; parallel over images."""
    N, O, Ho, Wo = G.shape
    C = B.shape[1]
    zero = np.float32(0.0)
    for n in prange(N):
        acc = np.empty(C, np.float32)
        ii = np.empty(kh, np.int64)  # the kernel rows that run, and their gradient rows
        hh = np.empty(kh, np.int64)  # (-1: the grid's +0.0)
        jj = np.empty(kw, np.int64)
        ww = np.empty(kw, np.int64)
        for h in range(H):
            ni = _kernel_rows(h, kh, r0, sh, Ho, skip, ii, hh)
            for w in range(W):
                nj = _kernel_rows(w, kw, q0, sw, Wo, skip, jj, ww)  # and columns alike
                acc[:] = zero
                for o in range(O):
                    for p in range(ni):
                        for q in range(nj):
                            x = zero
                            if hh[p] >= 0 and ww[q] >= 0:
                                x = G[n, o, hh[p], ww[q]]
                            br = B[(o * kh + ii[p]) * kw + jj[q]]
                            for c in range(C):  # vectorised over the channels
                                acc[c] = fma(x, br[c], acc[c])
                out[(n * H + h) * W + w] = acc
