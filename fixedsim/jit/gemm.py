"""Matrix-product kernels: the general multiply-accumulate model and its fast special cases.

The general kernel follows :func:`fixedsim.reference.dot` step by step for every output element:
products in order ``k = 0..K-1``, exact (``a*b`` when a data check proved it exact in float64,
else Dekker's two-product ``hi + lo``) or rounded into the product format; sums kept exactly as
nonoverlapping floating-point expansions (Shewchuk's Grow-Expansion), and rounded once per
accumulator block with :func:`fixedsim.jit.arith.round_exact`. An element the kernel cannot
prove exact (float64 overflow or underflow of an intermediate, an expansion longer than
:data:`CAP`, a format wider than 51 bits given an inexact value, a wrapped value beyond 2**51
quanta, an undecidable stochastic draw) is flagged and computed by the caller with
:mod:`fixedsim.reference` from the same random draws.

Stages (rows of the counts arrays): 0 product, 1 accumulator, 2 output.
"""

import math

import numpy as np
from numba import prange

from .arith import round_exact, two_sum
from .bits import f32_bits, f32_from_bits, f64_bits, f64_from_bits, fma
from .options import jit, jit_inline, jit_parallel
from .quant import (
    CHUNK,
    F_INEXACT,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    N_FLAGS,
    ODD,
    P_MODE,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
    SR,
    _quantize_value,
    quantize_value,
)
from .quant_fast import f32_float_one
from .rng import GAMMA, mix64, random_u64

#: Longest expansion the kernel keeps (components of 53 bits: covers every exponent range).
CAP = 48
N_STAGES = 3
_TINY = 2.0**-969  # below this a two-product's low part may be inexact
_BIG = 2.0**995  # above this Veltkamp's split may overflow


@jit_inline
def _split(a):
    c = 134217729.0 * a
    h = c - (c - a)
    return h, a - h


@jit_inline
def two_prod(a, b):
    """``p + err == a * b`` exactly (Dekker), barring overflow and underflow."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@jit_inline
def grow(e, n, x):
    """Add ``x`` to the expansion ``e[:n]`` exactly (zero components dropped); new length.

    ``e`` holds nonzero, nonoverlapping components in increasing magnitude; returns -1 when
    the result would not fit in ``e``.
    """
    q = x
    m = 0
    for i in range(n):
        q, h = two_sum(q, e[i])
        if h != 0.0:
            e[m] = h
            m += 1
    if q != 0.0:
        if m >= e.size:
            return -1
        e[m] = q
        m += 1
    return m


@jit
def expansion_hilo(e, n, tmp):
    """``V = sum(e[:n])`` as ``(hi, lo, approx, ok)`` fit for :func:`round_exact`.

    ``hi`` is a float64 with ``|V - hi|`` below the gap to its neighbour towards ``V``; ``lo``
    is ``V - hi`` exactly, or (``approx``) rounded to nearest. ``ok`` is False when that could
    not be established (the caller falls back to exact arithmetic).
    """
    if n == 0:
        return 0.0, 0.0, False, True
    if n == 1:
        return e[0], 0.0, False, True
    if n == 2:
        hi, lo = two_sum(e[1], e[0])
        return hi, lo, False, True
    hi = 0.0
    for i in range(n):
        hi += e[i]
    for _ in range(4):
        for i in range(n):
            tmp[i] = e[i]
        m = grow(tmp, n, -hi)
        if m < 0:
            return 0.0, 0.0, False, False
        if m == 0:
            return hi, 0.0, False, True
        approx = False
        if m == 1:
            lo = tmp[0]
        elif m == 2:
            lo, err = two_sum(tmp[1], tmp[0])
            approx = err != 0.0
        else:
            lo = 0.0
            for i in range(m):
                lo += tmp[i]
        if m <= 2:
            gap = abs(np.nextafter(hi, math.copysign(np.inf, lo)) - hi)
            if abs(lo) < gap:
                return hi, lo, approx, True
        hi = hi + lo
    return 0.0, 0.0, False, False


@jit_inline
def _zero_sum(allneg, anyneg, nonzero, mode):
    """Sign of an exact zero sum (:func:`fixedsim.reference.exact_sum`)."""
    if nonzero:
        return -0.0 if mode == RDN else 0.0
    if allneg or (mode == RDN and anyneg):
        return -0.0
    return 0.0


@jit_inline
def _count(counts, stage, flags):
    for f in range(N_FLAGS):
        counts[stage, f] += (flags >> f) & 1


@jit_inline
def _check(hi, lo, prec, wrap_lim):
    """Can :func:`round_exact` round ``hi + lo`` into this stage's format exactly?"""
    if lo != 0.0 and not prec:
        return False
    return not (wrap_lim > 0.0 and abs(hi) >= wrap_lim)


@jit
def dot_element(a, b, oidx, prod_exact, stage_P, stage_Psr, stage_U, stage_D, prec, wrap_lim,
                has_prod, acc_mode, block, has_out, has_via, e, tmp, counts):
    """One output element, as :func:`fixedsim.reference.dot`; returns ``(value, ok)``.

    ``stage_*[s]`` are the kernel parameters of stage ``s`` (0 product, 1 accumulator,
    2 output, 3 the accumulator's ``via`` register, used when ``has_via``); ``prec[s]``: the
    format has at most 51 significant bits; ``wrap_lim[s]``: the magnitude beyond which a
    wrapped value is left to the caller (0: no wrap). ``acc_mode``: 0 exact accumulation,
    1 rounded per block. ``counts`` (stages x flags) is added to.
    """
    K = a.size
    nblocks = (K + block - 1) // block if acc_mode == 1 else 1
    span = block if acc_mode == 1 else K
    Pp, Pa, Po = stage_P[0], stage_P[1], stage_P[2]
    s = 0.0  # the running sum (the accumulator), +0 at the start
    mode_a = Pa[P_MODE] if acc_mode == 1 else Po[P_MODE]
    for t in range(nblocks):
        k0 = t * span
        k1 = min(K, k0 + span)
        n = 0
        has_sp = not (abs(s) < np.inf)
        sp = s if has_sp else 0.0
        neg0 = math.copysign(1.0, s) < 0.0
        allneg = s == 0.0 and neg0
        anyneg = allneg
        nonzero = s != 0.0 and not has_sp
        if nonzero:
            e[0] = s
            n = 1
        for k in range(k0, k1):
            x = a[k]
            y = b[k]
            pl = 0.0
            if prod_exact:
                ph = x * y
            else:
                ph, pl = two_prod(x, y)
            finite_in = abs(x) < np.inf and abs(y) < np.inf
            if finite_in:
                if not abs(ph) < np.inf:
                    return 0.0, False  # float64 overflow of a finite product
                if not prod_exact and x != 0.0 and y != 0.0 and (
                        abs(ph) < _TINY or abs(x) >= _BIG or abs(y) >= _BIG):
                    return 0.0, False  # the two-product may be inexact
            else:
                pl = 0.0
            if has_prod:
                pidx = np.uint64(oidx) * np.uint64(K) + np.uint64(k)
                if not finite_in:
                    ph, fl = quantize_value(ph, Pp, stage_U[0], stage_D[0], pidx)
                else:
                    if not _check(ph, pl, prec[0], wrap_lim[0]):
                        return 0.0, False
                    ph, fl, amb = round_exact(ph, pl, np.bool_(False), Pp, stage_Psr[0],
                                              stage_U[0], stage_D[0], pidx)
                _count(counts, 0, fl)
                pl = 0.0
            if not abs(ph) < np.inf:
                if has_sp:
                    sp = sp + ph
                else:
                    has_sp = True
                    sp = ph
                continue
            if ph == 0.0:
                ng = math.copysign(1.0, ph) < 0.0
                allneg = allneg and ng
                anyneg = anyneg or ng
                continue
            nonzero = True
            allneg = False
            if not has_sp:
                n = grow(e, n, ph)
                if pl != 0.0 and n >= 0:
                    n = grow(e, n, pl)
                if n < 0:
                    return 0.0, False
        # -- the rounding of this step (or, exact accumulation, of the whole sum) --------------
        if acc_mode == 1:
            st = 1
            aidx = np.uint64(oidx) * np.uint64(nblocks) + np.uint64(t)
        else:  # exact accumulation: this is the output rounding
            st = 2
            aidx = np.uint64(oidx)
        if has_sp:
            v, fl = quantize_value(sp, stage_P[st], stage_U[st], stage_D[st], aidx)
        else:
            hi, lo, approx, ok = expansion_hilo(e, n, tmp)
            if not ok:
                return 0.0, False
            if hi == 0.0 and lo == 0.0:
                hi = _zero_sum(allneg, anyneg, nonzero, mode_a)
            if has_via and st == 1:  # round to nearest-even into the wider register first
                if not _check(hi, lo, prec[3], 0.0):
                    return 0.0, False
                hi, fl, amb = round_exact(hi, lo, approx, stage_P[3], stage_Psr[3], stage_U[3],
                                          stage_D[3], aidx)
                lo = 0.0
                approx = False
            if not _check(hi, lo, prec[st], wrap_lim[st]):
                return 0.0, False
            v, fl, amb = round_exact(hi, lo, approx, stage_P[st], stage_Psr[st], stage_U[st],
                                     stage_D[st], aidx)
            if amb:
                return 0.0, False
        _count(counts, st, fl)
        s = v
    if acc_mode == 0 or not has_out:
        return s, True
    oi = np.uint64(oidx)
    if not abs(s) < np.inf:
        v, fl = quantize_value(s, Po, stage_U[2], stage_D[2], oi)
    else:
        if not _check(s, 0.0, prec[2], wrap_lim[2]):
            return 0.0, False
        v, fl, amb = round_exact(s, 0.0, np.bool_(False), Po, stage_Psr[2], stage_U[2],
                                 stage_D[2], oi)
    _count(counts, 2, fl)
    return v, True


@jit_parallel
def gemm_general(A, BT, out, base, prod_exact, stage_P, stage_Psr, stage_U, stage_D, prec,
                 wrap_lim, has_prod, acc_mode, block, has_out, has_via):
    """``out[r, j]`` = :func:`dot_element` of row ``A[r]`` and row ``BT[j]`` (B transposed).

    Parallel over rows. ``base``: flat output index of ``out[0, 0]`` (draw indices). Returns
    per-row counts (rows x stages x flags) and the mask of elements left to the caller.
    """
    R, K = A.shape
    N = BT.shape[0]
    counts = np.zeros((R, N_STAGES, N_FLAGS), np.int64)
    slow = np.zeros((R, N), np.uint8)
    for r in prange(R):
        e = np.empty(CAP)
        tmp = np.empty(CAP)
        c = np.zeros((N_STAGES, N_FLAGS), np.int64)
        ar = A[r]
        for j in range(N):
            c[:, :] = 0
            v, ok = dot_element(ar, BT[j], base + r * N + j, prod_exact, stage_P, stage_Psr,
                                stage_U, stage_D, prec, wrap_lim, has_prod, acc_mode, block,
                                has_out, has_via, e, tmp, c)
            if ok:
                out[r, j] = v
                counts[r] += c
            else:
                slow[r, j] = 1
    return counts, slow


@jit_parallel
def gemm_general_at(A, BT, rows, cols, out, prod_exact, stage_P, stage_Psr, stage_U, stage_D,
                    prec, wrap_lim, has_prod, acc_mode, block, has_out, has_via):
    """``out[i]`` = :func:`dot_element` of row ``A[rows[i]]`` and row ``BT[cols[i]]``: the
    general kernel on a list of output elements (draw index ``rows[i] * N + cols[i]``).

    Parallel over the list. Returns per-element counts (elements x stages x flags) and the
    mask of elements left to the caller, as :func:`gemm_general`.
    """
    n = rows.size
    N = BT.shape[0]
    counts = np.zeros((n, N_STAGES, N_FLAGS), np.int64)
    slow = np.zeros(n, np.uint8)
    for i in prange(n):
        e = np.empty(CAP)
        tmp = np.empty(CAP)
        c = np.zeros((N_STAGES, N_FLAGS), np.int64)
        r = rows[i]
        j = cols[i]
        v, ok = dot_element(A[r], BT[j], r * N + j, prod_exact, stage_P, stage_Psr, stage_U,
                            stage_D, prec, wrap_lim, has_prod, acc_mode, block, has_out,
                            has_via, e, tmp, c)
        if ok:
            out[i] = v
            counts[i] += c
        else:
            slow[i] = 1
    return counts, slow


@jit
def dot2_at(A, BT, rows, cols, hi, lo, t):
    """Compensated dot products (Ogita, Rump and Oishi's Dot2 with exact products) of the
    listed elements: ``hi[i] + lo[i]`` approximates ``A[rows[i]] . BT[cols[i]]`` with
    ``|fl(hi + lo) - exact| <= u |fl(hi + lo)| + gamma(K)**2 * sum|a_k b_k|``, and ``t[i]``
    is ``sum|a_k b_k|`` in float64. Every product must be exact in float64 (and every sum
    far from underflow and overflow). Serial: it runs right after a BLAS call."""
    K = A.shape[1]
    for i in range(rows.size):
        ar = A[rows[i]]
        br = BT[cols[i]]
        s = 0.0
        c = 0.0
        a = 0.0
        for k in range(K):
            p = ar[k] * br[k]
            x = s + p
            z = x - s
            c += (s - (x - z)) + (p - z)
            s = x
            a += abs(p)
        hi[i] = s
        lo[i] = c
        t[i] = a


#: the scalar quantizer inlined into :func:`round_filtered` (one call site, hot loop)
_quantize_value_inline = jit_inline(_quantize_value)

_KEEP = (1 << F_OVERFLOW) | (1 << F_UNDERFLOW) | (1 << F_SUBNORMAL) | (1 << F_NAN)


@jit
def round_filtered(S, wa, wb, c, P, U, D, out, fail):
    """Round exact sums known only within a bound, when the bound decides the rounding.

    The exact sum of element ``(r, j)`` lies within ``c * wa[r] * wb[j]`` of ``S[r, j]``
    (``S``, ``wa``, ``wb`` finite, nonnegative weights). With ``[lo, hi]`` that interval
    widened outward by one float64 ulp, the element is decided when ``lo`` and ``hi`` round
    (deterministic mode, parameters ``P, U, D``) to the same value ``v`` with the same
    overflow, underflow, subnormal and NaN events, ``0`` is not in ``[lo, hi]`` and ``v`` is
    not in it either: every rounding is monotone and these events are monotone in the
    magnitude, so the exact sum rounds to ``v``, inexactly, with those events. Decided
    elements are written to ``out`` and counted; the others are marked in ``fail`` (uint8).
    Serial (it runs right after a BLAS call). Returns ``(counts, number of failures)``.
    """
    R, N = S.shape
    counts = np.zeros(N_FLAGS, np.int64)
    nfail = 0
    idx = np.uint64(0)
    for r in range(R):
        for j in range(N):
            s = S[r, j]
            w = wa[r] * wb[j]
            ok = False
            if w > 0.0 and w < np.inf and abs(s) < np.inf:
                err = c * w
                lo = np.nextafter(s - err, -np.inf)
                hi = np.nextafter(s + err, np.inf)
                if (lo > 0.0 or hi < 0.0) and abs(lo) < np.inf and abs(hi) < np.inf:
                    vl, fl = _quantize_value_inline(lo, P, U, D, idx)
                    vh, fh = _quantize_value_inline(hi, P, U, D, idx)
                    if (vl == vh and (fl & _KEEP) == (fh & _KEEP)
                            and not (lo <= vl and vl <= hi)):
                        out[r, j] = vl
                        ok = True
                        f = (fl & _KEEP) | (1 << F_INEXACT)
                        for k in range(N_FLAGS):
                            counts[k] += (f >> k) & 1
            if not ok:
                fail[r, j] = 1
                nfail += 1
    return counts, nfail


@jit_inline
def _exponent_of_pow2(v):
    """``log2(v)`` for an integer ``v`` that is a power of two below 2**53."""
    return (f64_bits(np.float64(v)) >> 52) - 1023


@jit
def operand_bits(x):
    """One pass over float64 ``x`` (1-D, contiguous): the fields of ``fixedsim.matmul._Bits``.

    Each finite nonzero ``|x| = C * 2**lsb`` with ``C`` odd; returns ``(nonfinite, sig, lsb,
    top)``: the number of infinities and NaNs, the most significant bits of any ``C``, the
    smallest ``lsb``, and the largest ``top`` with ``|x| < 2**top`` (frexp's exponent);
    ``top == -4096`` when no element is finite and nonzero. Serial (about 0.1 ms for 512x512):
    a parallel kernel called right after a BLAS call would wait for OpenBLAS's spinning workers.
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    bad = np.zeros(nch, np.int64)
    sig = np.zeros(nch, np.int64)
    lsb = np.zeros(nch, np.int64)
    top = np.zeros(nch, np.int64)
    for c in range(nch):
        lo = c * CHUNK
        xs = x[lo:min(n, lo + CHUNK)]  # a slice: indices from 0 let the loop vectorise
        nb = 0
        smax = 0
        lmin = 4096
        tmax = -4096
        for i in range(xs.size):
            b = f64_bits(xs[i])
            ef = (b >> 52) & 0x7FF
            frac = b & 0xFFFFFFFFFFFFF
            normal = np.int64(ef != 0)
            # significand as an integer (the hidden bit for normal numbers), its exponent
            m = frac | (normal << 52)
            tz = _exponent_of_pow2(m & -m)  # m == 0 (a zero) gives garbage, masked below
            hb = (f64_bits(np.float64(m)) >> 52) - 1023  # floor(log2 m): m exact in float64
            e_min = ef - normal  # the exponent of the last place: 2**(e_min - 1074)
            l_el = e_min - 1074 + tz
            t_el = e_min - 1074 + hb + 1
            s_el = hb - tz + 1
            use = np.int64(ef != 0x7FF) & np.int64(m != 0)
            nb += np.int64(ef == 0x7FF)
            lmin = min(lmin, l_el + (1 - use) * 8192)
            tmax = max(tmax, t_el - (1 - use) * 8192)
            smax = max(smax, s_el * use)
        bad[c] = nb
        sig[c] = smax
        lsb[c] = lmin
        top[c] = tmax
    return bad.sum(), sig.max() if nch else 0, lsb.min() if nch else 4096, \
        top.max() if nch else -4096


_I32 = np.int32
#: Rare (NaN-marked) elements of a row beyond which a four-row chain kernel recomputes the
#: whole row, vectorised, rather than element by element (see :func:`_finish_rows`).
_RARE_ROW = 16


@jit_inline
def _group_rows(g, R):
    """The four rows of group ``g`` of a four-row chain kernel (the last group repeats row
    ``R - 1``) and how many of them are distinct."""
    rows = np.empty(4, np.int64)
    for i in range(4):
        rows[i] = min(4 * g + i, R - 1)
    return rows, min(4, R - 4 * g)


@jit_inline
def _lean_rows(acc, cnt, A, rows, B, step, MODE, L, k0=0):
    """Four rows' chains ``acc[i, j] = step(acc[i, j], A[rows[i], k], B[k, j])``, ``k`` in
    order from ``k0``, each pass over the outputs ``j`` carrying the four independent chains (their
    latencies overlap, and each ``B[k, j]`` is loaded once). ``step(a0, x, b, MODE, L)``
    returns the new sum, or NaN for a step it leaves to the counting recomputation, and its
    inexact flag, added to ``cnt``."""
    a0, a1, a2, a3 = acc[0], acc[1], acc[2], acc[3]
    c0, c1, c2, c3 = cnt[0], cnt[1], cnt[2], cnt[3]
    i0, i1, i2, i3 = rows[0], rows[1], rows[2], rows[3]
    for k in range(k0, A.shape[1]):
        x0, x1, x2, x3 = A[i0, k], A[i1, k], A[i2, k], A[i3, k]
        bk = B[k]
        for j in range(a0.size):
            b = bk[j]
            s0, f0 = step(a0[j], x0, b, MODE, L)
            s1, f1 = step(a1[j], x1, b, MODE, L)
            s2, f2 = step(a2[j], x2, b, MODE, L)
            s3, f3 = step(a3[j], x3, b, MODE, L)
            a0[j] = s0
            a1[j] = s1
            a2[j] = s2
            a3[j] = s3
            c0[j] += f0
            c1[j] += f1
            c2[j] += f2
            c3[j] += f3


@jit_inline
def _lean_row_by_row(acc, cnt, A, rows, B, step, MODE, L):
    """:func:`_lean_rows` one row after the other, one step per pass over the outputs: for a
    step too large for four copies of it to be worth their compile time."""
    for i in range(4):
        ai = acc[i]
        ci = cnt[i]
        r = rows[i]
        for k in range(A.shape[1]):
            x = A[r, k]
            bk = B[k]
            for j in range(ai.size):
                s, f = step(ai[j], x, bk[j], MODE, L)
                ai[j] = s
                ci[j] += f


@jit_inline
def _finish_rows(acc, cnt, A, B, rows, n, out, counts, row_full, elem_full, P):
    """Results and counts of the first ``n`` rows of a :func:`_lean_rows` pass: an element the
    lean steps marked (NaN) is recomputed by ``elem_full(ar, B, j, counts_row, P)``, counting
    every event; a row with more than ``1/_RARE_ROW`` of its elements marked is recomputed
    whole by ``row_full(ar, B, out_row, counts_row, P)`` (vectorised)."""
    N = acc.shape[1]
    for i in range(n):
        r = rows[i]
        rare = 0
        for j in range(N):
            rare += np.int64(acc[i, j] != acc[i, j])
        if rare * _RARE_ROW > N:
            row_full(A[r], B, out[r], counts[r], P)
            continue
        for j in range(N):
            if acc[i, j] != acc[i, j]:
                out[r, j] = elem_full(A[r], B, j, counts[r], P)
            else:
                out[r, j] = acc[i, j]
                counts[r, F_INEXACT] += cnt[i, j]


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
      returns zero counts: for a caller whose counts nobody reads.
    """
    R, K = A.shape
    N = B.shape[1]
    counts = np.zeros((R, N_FLAGS), np.int64)
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


@jit_inline
def _chain_fixed_step(S, P, MODE, scale, inv, dbits, qmin, qmax, wrap, span, rbits, key, idx):
    """One step of a fixed-point FMA chain on integer codes held in float64.

    ``T = S * scale + P`` is the exact sum in units of the product quantum (``scale =
    2**dbits``); the new code is ``T / scale`` rounded per ``MODE`` (``inv = 1/scale``), then
    saturated, or wrapped into ``[qmin, qmax]`` (``span = 2**w``). Returns the code and the
    flags (inexact, overflow, underflow) as 0/1 ints.
    """
    T = S * scale + P
    x = T * inv
    if MODE == RNE:
        q = np.rint(x)
    elif MODE == RNA:
        q = np.copysign(np.floor(np.abs(x) + 0.5), x)  # exact: |x| + 0.5 < 2**52
    elif MODE == RTZ:
        q = np.trunc(x)
    elif MODE == RDN:
        q = np.floor(x)
    elif MODE == RUP:
        q = np.ceil(x)
    elif MODE == ODD:
        t = np.trunc(x)
        q = t + (np.float64(t != x) * np.float64(np.fmod(t, 2.0) == 0.0)) * np.copysign(1.0, x)
    else:  # SR, value-based (two's complement): up iff draw < floor(frac * 2**rbits)
        fl = np.floor(x)
        frac = np.uint64(T - fl * scale)  # in [0, 2**d), exact
        if rbits >= dbits:
            t = frac << np.uint64(rbits - dbits)
        else:
            t = frac >> np.uint64(dbits - rbits)
        draw = random_u64(key, idx) >> np.uint64(64 - rbits)
        q = fl + np.float64(draw < t)
    over = np.int64(q > qmax) | np.int64(q < qmin)
    if wrap:
        q = q - span * np.floor((q - qmin) / span)
    else:
        q = np.minimum(np.maximum(q, qmin), qmax)
    inexact = np.int64(q != x)
    under = np.int64(q == 0.0) * np.int64(T != 0.0)
    return q, inexact, over, under


@jit_inline
def _chain_fixed_row(acc, ci, co, cu, ar, B, MODE, scale, inv, dbits, qmin, qmax, wrap, span,
                     rbits, key, row0):
    """One row of :func:`gemm_chain_fixed` for a literal ``MODE``: ``k`` in order, each step
    vectorised over the outputs ``j``; the stochastic draw of ``(j, k)`` is indexed
    ``(row0 + j) * K + k`` (``row0``: flat index of the row's first output)."""
    K = ar.size
    for k in range(K):
        x = ar[k]
        bk = B[k]
        for j in range(acc.size):
            idx = np.uint64(0)
            if MODE == SR:
                idx = np.uint64(row0 + j) * np.uint64(K) + np.uint64(k)
            q, f1, f2, f3 = _chain_fixed_step(acc[j], x * bk[j], MODE, scale, inv, dbits, qmin,
                                              qmax, wrap, span, rbits, key, idx)
            acc[j] = q
            ci[j] += f1
            co[j] += f2
            cu[j] += f3


@jit_inline
def _chain_fixed_row_exact(acc, clip, ar, B, qmin, qmax):
    """A row of :func:`gemm_chain_fixed` when the accumulator's quantum is the products'
    (``dbits == 0``): no step rounds, so a step is ``min(max(S + P, qmin), qmax)``, four per
    pass over the outputs (the sum stays in a register). ``clip[j]`` becomes nonzero when a
    sum left the range: the caller then recomputes the row with the counting step."""
    K = ar.size
    K4 = K - K % 4
    for k in range(0, K4, 4):
        x0, x1, x2, x3 = ar[k], ar[k + 1], ar[k + 2], ar[k + 3]
        b0, b1, b2, b3 = B[k], B[k + 1], B[k + 2], B[k + 3]
        for j in range(acc.size):
            t0 = acc[j] + x0 * b0[j]
            s0 = min(max(t0, qmin), qmax)
            t1 = s0 + x1 * b1[j]
            s1 = min(max(t1, qmin), qmax)
            t2 = s1 + x2 * b2[j]
            s2 = min(max(t2, qmin), qmax)
            t3 = s2 + x3 * b3[j]
            s3 = min(max(t3, qmin), qmax)
            acc[j] = s3
            clip[j] |= ((np.int64(s0 != t0) | np.int64(s1 != t1))
                        | (np.int64(s2 != t2) | np.int64(s3 != t3)))
    for k in range(K4, K):
        x = ar[k]
        bk = B[k]
        for j in range(acc.size):
            t = acc[j] + x * bk[j]
            v = min(max(t, qmin), qmax)
            acc[j] = v
            clip[j] |= np.int64(v != t)


@jit_parallel
def gemm_chain_fixed(A, B, out, base, mode, dbits, qmin, qmax, wrap, span, rbits, key):
    """FMA chain into a fixed-point accumulator, on integer codes held in float64.

    ``A`` (R, K) and ``B`` (K, N) hold integer codes whose products, and every ``S * scale +
    P``, are below 2**53 (the caller checks); the accumulator code ``S`` starts at 0 and takes
    ``round((S * scale + A[r, k] * B[k, j]) / scale)`` for ``k`` in order, saturated or wrapped,
    vectorised over ``j`` (one loop per deterministic mode). Returns the codes in ``out`` and
    per-row counts (inexact, overflow, underflow). ``base``: flat index of ``out[0, 0]`` for the
    stochastic draws (``(base + r*N + j) * K + k``).
    """
    R, K = A.shape
    N = B.shape[1]
    scale = 2.0**dbits
    inv = 1.0 / scale
    counts = np.zeros((R, N_FLAGS), np.int64)
    for r in prange(R):
        acc = np.zeros(N)
        ci = np.zeros(N, np.int64)
        co = np.zeros(N, np.int64)
        cu = np.zeros(N, np.int64)
        ar = A[r]
        row0 = base + r * N
        if dbits == 0:  # nothing rounds (SR draws cannot matter): the lean row first
            clip = np.zeros(N, np.int64)
            _chain_fixed_row_exact(acc, clip, ar, B, qmin, qmax)
            if clip.sum() == 0:
                out[r] = acc
                continue
            acc[:] = 0.0
        if mode == RNE:
            _chain_fixed_row(acc, ci, co, cu, ar, B, RNE, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        elif mode == RNA:
            _chain_fixed_row(acc, ci, co, cu, ar, B, RNA, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        elif mode == RTZ:
            _chain_fixed_row(acc, ci, co, cu, ar, B, RTZ, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        elif mode == RDN:
            _chain_fixed_row(acc, ci, co, cu, ar, B, RDN, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        elif mode == RUP:
            _chain_fixed_row(acc, ci, co, cu, ar, B, RUP, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        elif mode == ODD:
            _chain_fixed_row(acc, ci, co, cu, ar, B, ODD, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        else:
            _chain_fixed_row(acc, ci, co, cu, ar, B, SR, scale, inv, dbits, qmin, qmax,
                             wrap, span, rbits, key, row0)
        out[r] = acc
        counts[r, F_INEXACT] = ci.sum()
        counts[r, F_OVERFLOW] = co.sum()
        counts[r, F_UNDERFLOW] = cu.sum()
    return counts


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
        for j in range(N):
            bs[j] = x * bk[j]
        for k in range(k0 + 1, k1):
            x = A[r, k]
            bk = B[k]
            for j in range(N):  # a block sum that is not exact poisons the sum: NaN
                sj, e = two_sum(bs[j], x * bk[j])
                bs[j] = sj if e == 0.0 else np.nan
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
    lo32 = np.int64(0xFFFFFFFF)
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
        for j in range(N):
            if acc[j] != acc[j]:
                bad[r, j] = 1
            else:
                counts[r, F_INEXACT] += c1[j] & lo32
                counts[r, F_OVERFLOW] += c1[j] >> 32
                counts[r, F_UNDERFLOW] += c2[j] & lo32
                counts[r, F_SUBNORMAL] += c2[j] >> 32
            out[r, j] = acc[j]
    return counts, bad
