"""Float accumulators narrower than float64: FMA chains into FP16, BF16, TF32, FP8 (float32
lanes, or the float64 FMA for formats of narrow range) and block chains in float64 (any
block, every mode but DOWN, stochastic included)."""


import numpy as np
from numba import prange

from .arith import two_sum
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
    SR,
)
from .quant_fast import f32_float_one
from .rng import GAMMA, mix64


@jit_inline
def _chain_float_step(a0, p, MODE, sh0, lim, qbits, maxbits, ovp, ovn, infb, minnorm):
    """One FMA-chain step ``round(a0 + p)`` into a float format, float32 lanes.

    ``a0`` (a format value) and ``p`` (an exact product) are float32; the exact sum is
    ``s + e`` (TwoSum), rounded to odd at 24 bits in the bit pattern, then rounded into the
    format by :func:`fixedsim.jit.quant_fast.f32_float_one`. Returns the new sum and the
    flags (inexact, overflow, underflow, subnormal) as 0/1 ints.
    """
    s = a0 + p
    bp = s - a0
    e = (a0 - (s - bp)) + (p - bp)
    sb = np.int64(f32_bits(s))
    sign = sb & 0x80000000
    mag = sb ^ sign
    # an exact zero sum rounding DOWN is -0 unless both terms are +0 (IEEE 754; float32
    # addition, to nearest, gave +0 for x + (-x) and for +0 + -0)
    zneg = (np.int64(MODE == RDN) * np.int64(mag == 0)
            * np.int64((np.int64(f32_bits(a0)) | np.int64(f32_bits(p))) != 0))
    sign = sign | (zneg << 31)
    # 0/1 integers rather than booleans: the loop stays branch-free and vectorises
    a0fin = np.int64(abs(a0) < np.inf)
    sinf = np.int64(mag == 0x7F800000)
    inexact = np.int64(e != 0) * a0fin * (1 - sinf)
    down = inexact * np.int64((e < 0) != (sign != 0))  # the exact sum is nearer zero than s
    ro = ((mag - down) | inexact) | sign
    ovf32 = sinf * a0fin  # float32 overflow of a finite sum: beyond the format
    ro = ro + ovf32 * ((0x7F7FFFFF | sign) - ro)
    res, over = f32_float_one(ro, MODE, sh0, lim, qbits, maxbits, ovp, ovn, infb, 64,
                              np.uint64(0), 0)
    rmag = res & 0x7FFFFFFF
    fl_inexact = a0fin * (inexact | ovf32 | np.int64(res != ro))
    fl_over = a0fin * (np.int64(over) | ovf32)
    fl_under = a0fin * np.int64(rmag == 0) * np.int64((ro & 0x7FFFFFFF) != 0)
    fl_sub = a0fin * np.int64(rmag != 0) * np.int64(rmag < minnorm)
    return (f32_from_bits(res), np.int32(fl_inexact), np.int32(fl_over),
            np.int32(fl_under), np.int32(fl_sub))


@jit_inline
def _chain_float_lean(a0, x, b, MODE, L):
    """:func:`_chain_float_step` of ``a0 + x*b`` where the sum stays in the format's normal
    range (``L = (lsb, span, minnorm)``).

    Same TwoSum and rounding to odd, then the magnitude ``m`` is rounded at the format's
    normal quantum (``lsb``: its bit in the float32 pattern) with 32-bit integers only (each
    expression cast back to int32: Numba would widen it to int64, halving the vector width).
    A step is kept when ``m`` is zero or ``minnorm <= m <= minnorm + span`` (the format's
    smallest normal and largest value: the rounded value is then normal and finite, so the
    step is inexact or exact and nothing else); otherwise, and for a NaN ``a0``, the step
    returns NaN, which every later step keeps. Returns the new sum and the inexact flag.
    """
    lsb, span, minnorm = L
    p = x * b
    if MODE == RDN:  # IEEE's zero sign for DOWN: -0 unless both terms are +0
        s = -((-a0) - p)
    else:
        s = a0 + p
    bp = s - a0
    e = (a0 - (s - bp)) + (p - bp)
    sb = _I32(f32_bits(s))
    sign = _I32(sb & _I32(-0x80000000))
    mag = _I32(sb ^ sign)
    inexact = _I32(e != 0)
    down = _I32(inexact & _I32(_I32(e < 0) ^ _I32(sign != 0)))
    m = _I32(_I32(mag - down) | inexact)  # rounded to odd at 24 bits
    mask = _I32(lsb - _I32(1))
    cut = _I32(m & _I32(~mask))
    if MODE == RNE:
        r = _I32(_I32(_I32(m + _I32(mask >> _I32(1))) + _I32(_I32(m & lsb) != _I32(0)))
                 & _I32(~mask))
    elif MODE == RNA:
        r = _I32(_I32(m + _I32(_I32(mask >> _I32(1)) + _I32(1))) & _I32(~mask))
    elif MODE == RTZ:
        r = cut
    elif MODE == RUP:
        r = _I32(_I32(m + _I32(mask & _I32(~_I32(sign >> _I32(31))))) & _I32(~mask))
    elif MODE == RDN:
        r = _I32(_I32(m + _I32(mask & _I32(sign >> _I32(31)))) & _I32(~mask))
    else:  # ODD: an inexact cut gets its last bit set
        r = _I32(cut | lsb) if _I32(m & mask) != _I32(0) else cut
    keep = (np.uint32(_I32(m - minnorm)) <= np.uint32(span)) | (m == _I32(0))
    v = _I32(r | sign) if keep else _I32(0x7FC00000)
    return f32_from_bits(v), _I32(r != m)


@jit_inline
def _chain_float_lean_uncounted(a0, x, b, MODE, L):
    """:func:`_chain_float_lean` without its inexact flag (the compiler drops its work): for a
    caller whose counts nobody reads."""
    return _chain_float_lean(a0, x, b, MODE, L)[0], _I32(0)


@jit
def _chain_float_row_full(ar, B, orow, crow, P):
    """One row with :func:`_chain_float_step`, every event counted, vectorised (``P``: the
    kernel's runtime parameters, mode first)."""
    mode, sh0, lim, qbits, maxbits, ovp, ovn, infb, minnorm = P
    N = orow.size
    acc = np.zeros(N, np.float32)
    ci = np.zeros(N, np.int32)
    co = np.zeros(N, np.int32)
    cu = np.zeros(N, np.int32)
    cs = np.zeros(N, np.int32)
    for k in range(ar.size):
        x = ar[k]
        bk = B[k]
        for j in range(N):
            v, f1, f2, f3, f4 = _chain_float_step(acc[j], x * bk[j], mode, sh0, lim, qbits,
                                                  maxbits, ovp, ovn, infb, minnorm)
            acc[j] = v
            ci[j] += f1
            co[j] += f2
            cu[j] += f3
            cs[j] += f4
    orow[:] = acc
    crow[F_INEXACT] += ci.sum()
    crow[F_OVERFLOW] += co.sum()
    crow[F_UNDERFLOW] += cu.sum()
    crow[F_SUBNORMAL] += cs.sum()


@jit
def _chain_float_elem(ar, B, j, crow, P):
    """One output element with :func:`_chain_float_step`; adds its counts to ``crow``."""
    mode, sh0, lim, qbits, maxbits, ovp, ovn, infb, minnorm = P
    acc = np.float32(0.0)
    for k in range(ar.size):
        acc, f1, f2, f3, f4 = _chain_float_step(acc, ar[k] * B[k, j], mode, sh0, lim, qbits,
                                                maxbits, ovp, ovn, infb, minnorm)
        crow[F_INEXACT] += f1
        crow[F_OVERFLOW] += f2
        crow[F_UNDERFLOW] += f3
        crow[F_SUBNORMAL] += f4
    return acc


@jit_parallel
def gemm_chain_float(A, B, out, mode, sh0, lim, qbits, maxbits, ovp, ovn, infb, minnorm,
                     count):
    """FMA chain into a float format of at most 21 significand bits inside float32's range.

    Products ``A[r, k] * B[k, j]`` must be exact in float32 (the caller checks). ``acc[j] =
    round(acc[j] + A[r, k] * B[k, j])`` for ``k`` in order, vectorised over ``j``, with the
    lean step :func:`_chain_float_lean`, one loop per deterministic rounding mode: four rows
    per pass (:func:`_lean_rows`) to nearest even, row by row (:func:`_lean_row_by_row`) in
    the other modes (four copies of the step in all six loops took 25 s to compile). The
    elements it leaves (a sum below the format's normal range, beyond its largest value, or
    not finite) are recomputed with :func:`_chain_float_step`, which counts every event
    (:func:`_finish_rows`). Parameters of the format as for
    :func:`fixedsim.jit.quant_fast.float_from_f32`; ``minnorm``: bits of the smallest normal.
    Returns per-row counts, as the general kernel counts the accumulator stage. ``count``
    false, for a caller whose counts nobody reads: nearest even then skips counting the
    inexact steps of the lean pass (its counts are incomplete; about 8% faster).
    """
    R, K = A.shape
    N = B.shape[1]
    counts = np.zeros((R, N_FLAGS), np.int64)
    L = (_I32(1 << sh0), _I32(maxbits - minnorm), _I32(minnorm))
    P = (mode, sh0, lim, qbits, maxbits, ovp, ovn, infb, minnorm)
    for g in prange((R + 3) // 4):
        rows, n = _group_rows(g, R)
        acc = np.zeros((4, N), np.float32)
        cnt = np.zeros((4, N), np.int32)
        if mode == RNE and count:  # the hardware default: four chains per pass
            _lean_rows(acc, cnt, A, rows, B, _chain_float_lean, RNE, L)
        elif mode == RNE:
            _lean_rows(acc, cnt, A, rows, B, _chain_float_lean_uncounted, RNE, L)
        elif mode == RNA:  # the others row by row: a sixth of the compile time each
            _lean_row_by_row(acc, cnt, A, rows, B, _chain_float_lean, RNA, L)
        elif mode == RTZ:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain_float_lean, RTZ, L)
        elif mode == RDN:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain_float_lean, RDN, L)
        elif mode == RUP:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain_float_lean, RUP, L)
        else:
            _lean_row_by_row(acc, cnt, A, rows, B, _chain_float_lean, ODD, L)
        _finish_rows(acc, cnt, A, B, rows, n, out, counts, _chain_float_row_full,
                     _chain_float_elem, P)
    return counts


_SIGN64 = np.int64(-0x8000000000000000)
_EXP64 = np.int64(0x7FF0000000000000)


@jit_inline
def _narrow_step(a0, x, b, P):
    """One nearest-even FMA-chain step ``round(a0 + x*b)`` into a float format of narrow
    range, float64 lanes (``P = (minnorm, off)``, see :func:`gemm_chain_narrow`).

    The FMA instruction gives the sum ``s``; ``h`` is the bit pattern of ``2**e``, ``s``'s
    binade (its exponent field). ``M = 1.5 * 2**(53 - P) * max(2**e, minnorm)`` (its bits are
    ``max(h, minnorm) + off``, integer operations) has float64 quantum ``2**(e + 1 - P)``,
    the format's quantum at ``s`` (its smallest subnormal below ``minnorm``), so ``(s + M) -
    M`` is ``s`` rounded to the format, nearest even, computed exactly. The result gets ``s``'s
    sign bit: a sum that underflows to zero keeps its sign, as does an exact zero (IEEE 754's
    sign, the model's). Returns the new sum and ``h``.
    """
    minnorm, off = P
    s = fma(x, b, a0)
    sb = f64_bits(s)
    h = sb & _EXP64
    M = f64_from_bits(max(h, minnorm) + off)
    return f64_from_bits(f64_bits((s + M) - M) | (sb & _SIGN64)), h


@jit_parallel
def gemm_chain_narrow(A, B, out, minnorm, off, top):
    """Nearest-even FMA chain into a float format of narrow range, counting nothing: ``out =
    A @ B`` in order, ``acc[j] = round(acc[j] + A[r, k] * B[k, j])``, for a caller whose
    counts nobody reads.

    ``A`` and ``B`` are float64 whose products are exact in float32; the format has at most 21
    significand bits and subnormals, and its range is narrow (``matmul._narrow_params``,
    which gives the proof that each :func:`_narrow_step` is the model's rounding while no sum
    reaches the format's top binade). ``minnorm`` and ``top`` are the bit patterns of its
    smallest normal and of ``2**emax``; ``off`` that of ``1.5 * 2**(53 - P)`` less that of 1
    (``P`` significand bits). Four rows at a time share each ``B[k:k+4]``; each row's pass over
    the outputs takes four steps, its sums staying in registers between them. Returns, per
    row, whether a sum reached ``2**emax``: the caller recomputes those rows (overflows among
    them); their ``out`` is meaningless.
    """
    R, K = A.shape
    N = B.shape[1]
    K4 = K - K % 4
    P = (minnorm, off)
    over = np.zeros(R, np.bool_)
    for g in prange((R + 3) // 4):
        n = min(4, R - 4 * g)
        acc = np.zeros((n, N))
        big = np.zeros((n, N), np.int64)  # the largest binade of each chain's sums
        for k in range(0, K4, 4):
            b0, b1, b2, b3 = B[k], B[k + 1], B[k + 2], B[k + 3]
            for i in range(n):
                r = 4 * g + i
                x0, x1, x2, x3 = A[r, k], A[r, k + 1], A[r, k + 2], A[r, k + 3]
                ai, hi = acc[i], big[i]
                for j in range(N):
                    a, h0 = _narrow_step(ai[j], x0, b0[j], P)
                    a, h1 = _narrow_step(a, x1, b1[j], P)
                    a, h2 = _narrow_step(a, x2, b2[j], P)
                    a, h3 = _narrow_step(a, x3, b3[j], P)
                    ai[j] = a
                    hi[j] = max(max(max(h0, h1), max(h2, h3)), hi[j])
        for i in range(n):
            r = 4 * g + i
            ai, hi = acc[i], big[i]
            for k in range(K4, K):
                x, bk = A[r, k], B[k]
                for j in range(N):
                    a, h = _narrow_step(ai[j], x, bk[j], P)
                    ai[j] = a
                    hi[j] = max(h, hi[j])
            m = 0
            for j in range(N):
                out[r, j] = ai[j]
                m = max(m, hi[j])
            over[r] = m >= top
    return over




_SIGN64 = np.int64(-0x7FFFFFFFFFFFFFFF - 1)
_MAG64 = np.int64(0x7FFFFFFFFFFFFFFF)
_NAN64 = np.int64(0x7FF8000000000000)


@jit_inline
def _chain64_step(a0, p, STOCH, mode, sh0, lim, qbits, maxbits, minnorm, saturate, rbits, z):
    """``a0 + p`` rounded into a float format on float64 bits, every mode but DOWN.

    ``a0`` (a format value) and ``p`` (a product or block sum) are float64. The sum ``t`` is
    exact when TwoSum's error is zero; its magnitude is cut at the format's quantum at
    ``t``'s exponent (``sh`` bits dropped: ``sh0 = 52 - man_bits`` in the normal range, more
    below ``lim``, the float64 biased exponent of the format's smallest normal) and rounded
    up as ``mode`` says, from the dropped bits ``rem`` and the last kept bit, as the float32
    quantizer does. ``STOCH`` (a literal, ``mode`` is then SR): up when the draw
    (``mix64(z)``, its top ``rbits``) is below ``floor(dropped fraction * 2**rbits)``,
    exactly as the general kernel rounds an exact value stochastically. ``qbits``,
    ``maxbits``, ``minnorm``: float64 bits of the format's smallest subnormal, largest value
    and smallest normal.

    Returns the new value and two packed counters: ``inexact + (overflow << 32)`` and
    ``underflow + (subnormal << 32)``. A sum that is not exact, not finite, or overflows
    without ``saturate`` returns NaN, which every later step keeps (NaN in, NaN out): the
    caller leaves that element to the general kernel.
    """
    t, e = two_sum(a0, p)
    b = f64_bits(t)
    s = b & _SIGN64
    a = b & _MAG64
    ef = a >> 52
    M = (a & 0xFFFFFFFFFFFFF) | (np.int64(ef != 0) << 52)
    efc = ef if ef > 1 else np.int64(1)
    sh = sh0 + (lim - efc if lim > efc else 0)
    shc = sh if sh < 54 else 54
    half = np.int64(1) << shc  # twice the weight of the highest dropped bit
    rem = M & (half - 1)
    if STOCH:
        # floor(fraction * 2**rbits) = rem shifted by rbits - sh (branch-free: rem < 2**54,
        # so a right shift of 63 clears it as any larger one would)
        left = rbits - sh if rbits > sh else np.int64(0)
        right = sh - rbits if sh > rbits else np.int64(0)
        right = right if right < 63 else np.int64(63)
        tt = (np.uint64(rem) << np.uint64(left)) >> np.uint64(right)
        draw = mix64(z) >> np.uint64(64 - rbits)
        up = np.int64(draw < tt)
    else:
        lsb = (M >> shc) & 1
        nz = np.int64(rem != 0)
        up = np.int64(2 * rem + lsb > half) if mode == RNE else (
            np.int64(2 * rem >= half) if mode == RNA else (
                nz * (1 - np.int64(s != 0)) if mode == RUP else (
                    nz * (1 - lsb) if mode == ODD else np.int64(0))))
    big = np.int64(shc > 52)  # the whole significand lies below the quantum
    res = (a & ~(half - 1)) + (up << shc)
    res = res + big * (qbits * up - res)
    over = np.int64(res > maxbits)
    res = res + over * (maxbits - res)
    bad = (np.int64(e != 0.0) | np.int64(a >= 0x7FF0000000000000)
           | (over * np.int64(not saturate)))
    inexact = np.int64(res != a)
    under = np.int64(res == 0) * np.int64(a != 0)
    sub = np.int64(res != 0) * np.int64(res < minnorm)
    res = (res | s) + bad * (_NAN64 - (res | s))
    return f64_from_bits(res), inexact + (over << 32), under + (sub << 32)


@jit_inline
def _block_sums(A, B, r, bs, k0, k1):
    """``bs[j]``: the float64 sum of ``A[r, k] * B[k, j]`` over ``k0 <= k < k1`` (products
    exact in float64), NaN where an addition is not exact (TwoSum's error nonzero)."""
    x = A[r, k0]
    bk = B[k0]
    for j in range(bs.size):
        bs[j] = x * bk[j]
    for k in range(k0 + 1, k1):
        x = A[r, k]
        bk = B[k]
        for j in range(bs.size):  # a block sum that is not exact poisons the sum: NaN
            sj, e = two_sum(bs[j], x * bk[j])
            bs[j] = sj if e == 0.0 else np.nan


@jit_inline
def _finish_row(r, acc, c1, c2, counts, bad, out):
    """Row ``r`` of a float64 chain kernel's results: ``out[r] = acc``, NaN elements marked in
    ``bad`` (left to the caller), the others' packed step counters added to ``counts[r]``."""
    lo32 = np.int64(0xFFFFFFFF)
    for j in range(acc.size):
        if acc[j] != acc[j]:
            bad[r, j] = 1
        else:
            counts[r, F_INEXACT] += c1[j] & lo32
            counts[r, F_OVERFLOW] += c1[j] >> 32
            counts[r, F_UNDERFLOW] += c2[j] & lo32
            counts[r, F_SUBNORMAL] += c2[j] >> 32
        out[r, j] = acc[j]


@jit_inline
def _chain64_blocks(A, B, r, acc, bs, c1, c2, zr, block, STOCH, COUNT, mode, sh0, lim, qbits,
                    maxbits, minnorm, saturate, rbits):
    """One row of :func:`gemm_chain_f64` (``STOCH`` and ``COUNT`` literals; uncounted, the
    steps' event flags are dead code)."""
    K = A.shape[1]
    N = acc.size
    nb = (K + block - 1) // block
    for t in range(nb):
        k0 = t * block
        k1 = min(K, k0 + block)
        x = A[r, k0]
        bk = B[k0]
        tg = np.uint64(t) * GAMMA
        if block == 1:
            for j in range(N):
                v, f1, f2 = _chain64_step(acc[j], x * bk[j], STOCH, mode, sh0, lim, qbits,
                                          maxbits, minnorm, saturate, rbits, zr[j] + tg)
                acc[j] = v
                if COUNT:
                    c1[j] += f1
                    c2[j] += f2
            continue
        _block_sums(A, B, r, bs, k0, k1)
        for j in range(N):
            v, f1, f2 = _chain64_step(acc[j], bs[j], STOCH, mode, sh0, lim, qbits, maxbits,
                                      minnorm, saturate, rbits, zr[j] + tg)
            acc[j] = v
            if COUNT:
                c1[j] += f1
                c2[j] += f2


@jit_parallel
def gemm_chain_f64(A, B, out, base, block, mode, sh0, lim, qbits, maxbits, minnorm, saturate,
                   rbits, key, count):
    """Accumulation into a float format in any mode but DOWN, products exact in float64.

    ``acc[j] = round(acc[j] + sum of the block's products)`` for each block of ``block``
    consecutive ``k`` in order (``block = 1``: an FMA chain), vectorised over ``j``, by
    :func:`_chain64_step`. Stochastic draws: block ``t`` of output ``o = base + r*N + j`` is
    indexed ``o * nblocks + t``, as in the general kernel (the stream state is stepped by
    ``GAMMA`` per block). Block sums are float64 sums whose exactness TwoSum checks (the
    zero sign of a float64 sum to nearest is the model's in these modes). Returns per-row
    counts (of the elements computed here) and the mask of elements left to the caller (a sum
    not exact in float64, an overflow to infinity): their values in ``out`` are meaningless.
    ``count`` false, for a caller whose counts nobody reads: stochastic rounding then skips
    counting (its counts are zero; about 25% faster), the other modes count all the same.
    """
    R, K = A.shape
    N = B.shape[1]
    nb = (K + block - 1) // block
    counts = np.zeros((R, N_FLAGS), np.int64)
    bad = np.zeros((R, N), np.uint8)
    for r in prange(R):
        acc = np.zeros(N)
        bs = np.zeros(N)
        c1 = np.zeros(N, np.int64)
        c2 = np.zeros(N, np.int64)
        zr = np.empty(N, np.uint64)
        for j in range(N):  # stream state of draw index (base + r*N + j) * nb
            zr[j] = key + (np.uint64(base + r * N + j) * np.uint64(nb) + np.uint64(1)) * GAMMA
        if mode == SR and count:
            _chain64_blocks(A, B, r, acc, bs, c1, c2, zr, block, True, True, mode, sh0, lim,
                            qbits, maxbits, minnorm, saturate, rbits)
        elif mode == SR:  # nothing reads the counts (the deterministic modes always count)
            _chain64_blocks(A, B, r, acc, bs, c1, c2, zr, block, True, False, mode, sh0, lim,
                            qbits, maxbits, minnorm, saturate, rbits)
        else:
            _chain64_blocks(A, B, r, acc, bs, c1, c2, zr, block, False, True, mode, sh0, lim,
                            qbits, maxbits, minnorm, saturate, rbits)
        _finish_row(r, acc, c1, c2, counts, bad, out)
    return counts, bad


#: Block sums ``T * s`` outside these magnitudes are left to the caller (TwoProd's error term
#: must not underflow, the running sum must stay finite).
_TINY_P = 2.0**-960
_HUGE_P = 2.0**1000


@jit_inline
def _ro_sum3(acc, p, q):
    """The float64 rounded to odd of the exact ``acc + p + q`` (``p + q`` a product split by
    TwoProd: ``|q| <= ulp(p) / 2``), or NaN where this function cannot show it.

    ``acc + p = s + e`` and ``e + q = u + w`` and ``s + u = v + d`` by TwoSum, all exact, so
    ``x = v + d + w``. ``r = fl(d + w)`` is zero exactly when ``d + w`` is, with its sign. If
    ``r`` is zero, ``x = v``, a float64 (its zero sign is IEEE's for ``acc + p``, or ``+0``
    for a cancellation, the model's in every mode but DOWN). Otherwise, when ``|r|`` is at
    most half the gap from ``v`` to its neighbour ``n`` on ``r``'s side (a gap of at least
    ``2**-1000``), ``x`` lies strictly between ``v`` and ``n`` (``|d + w| <= |r| / (1 -
    2**-53)``, below the gap; half the gap is a tie at 53 bits, common), and the one of the
    two whose last significand bit is set is the rounding to odd. Else NaN: the caller
    recomputes the element (a zero ``v`` with ``x`` nonzero, non-finite values, or a tail
    wider than that, which the TwoSum bounds make impossible for finite sums of this shape).
    """
    s, e = two_sum(acc, p)
    if q == 0.0:
        v, r = s, e
    else:
        u, w = two_sum(e, q)
        v, d = two_sum(s, u)
        r = d + w
    if r == 0.0:
        return v
    b = f64_bits(v)
    mag = b & _MAG64
    if mag == 0 or mag >= 0x7FF0000000000000:
        return np.nan
    nb = b + 1 if (r > 0.0) == (v > 0.0) else b - 1  # the neighbour on x's side
    gap = abs(f64_from_bits(nb) - v)  # exact: two neighbours
    if not (2.0 * abs(r) <= gap and gap >= 2.0**-1000):
        return np.nan
    return v if (b & 1) == 1 else f64_from_bits(nb)


@jit_parallel
def gemm_chain_f64_scaled(A, B, T, out, block, mode, sh0, lim, qbits, maxbits, minnorm,
                          saturate):
    """Accumulation into a float format in a deterministic mode but DOWN of the product of
    ``T A`` and ``B``: ``acc[j] = round(acc[j] + T * (sum of the block's products of A and
    B))`` for each block of ``block`` consecutive ``k`` in order, vectorised over ``j``.

    ``A`` and ``B`` have products exact in float64; ``T`` is a positive float64 (the common
    factors taken out of the operands). Each block sum ``s`` is a float64 sum whose exactness
    TwoSum checks (as :func:`gemm_chain_f64`); ``T s = p + q`` exactly (``p = fl(T s)``, ``q``
    by the FMA); ``acc + p + q`` is rounded to odd at 53 bits (:func:`_ro_sum3`) and then
    into the format on its bits (:func:`_chain64_step` with a zero addend): the one rounding
    of the exact sum, since a rounding to odd at 53 bits followed by one into at most 51
    significand bits is the direct rounding (the caller keeps the format within that).
    Returns per-row counts and the mask of elements left to the caller (a block sum not
    exact in float64, ``T s`` beyond ``[_TINY_P, _HUGE_P]`` in magnitude, a sum
    :func:`_ro_sum3` cannot round, an overflow to infinity): their values in ``out`` are
    meaningless."""
    R, K = A.shape
    N = B.shape[1]
    nb = (K + block - 1) // block
    counts = np.zeros((R, N_FLAGS), np.int64)
    bad = np.zeros((R, N), np.uint8)
    for r in prange(R):
        acc = np.zeros(N)
        bs = np.empty(N)
        c1 = np.zeros(N, np.int64)
        c2 = np.zeros(N, np.int64)
        for t in range(nb):
            _block_sums(A, B, r, bs, t * block, min(K, t * block + block))
            for j in range(N):
                s = bs[j]
                p = T * s  # a zero block sum keeps its sign (T > 0)
                q = fma(T, s, -p) if s != 0.0 else 0.0
                ap = abs(p)
                if not ((ap >= _TINY_P or s == 0.0) and ap <= _HUGE_P):
                    z = np.nan  # NaN s too
                else:
                    z = _ro_sum3(acc[j], p, q)
                v, f1, f2 = _chain64_step(z, -0.0, False, mode, sh0, lim, qbits, maxbits,
                                          minnorm, saturate, 64, np.uint64(0))
                acc[j] = v
                c1[j] += f1
                c2[j] += f2
        _finish_row(r, acc, c1, c2, counts, bad, out)
    return counts, bad
