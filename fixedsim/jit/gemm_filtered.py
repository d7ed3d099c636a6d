"""Kernels of the ``exact_filtered`` path: exact sums, known within a proven bound, rounded
once into a float format (the proof is in :mod:`fixedsim.matmul.filtered`).

* :func:`filter_round`: the Euclidean norms of the rows of ``A`` and the columns of ``B``,
  then for each element either the proof that the bound they give decides its rounding, with
  that rounding and its events, or a mark (vectorised, on the bits).
* :func:`filter_round_at`: the same decision for listed values, by rounding both ends of the
  interval with the general scalar quantizer (any float format, any range).
* :func:`zero_sums`: the marked sums whose products are all zero, by the operands' nonzero
  patterns.
* :func:`gather_columns`, :func:`dot2_at`: compensated dot products of listed elements.
"""

import numpy as np
from numba import prange

from .arith import two_sum
from .bits import f64_bits, f64_from_bits, small_f64
from .options import jit, jit_inline, jit_parallel
from .quant import (
    F_INEXACT,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    N_FLAGS,
    ODD,
    RDN,
    RNA,
    RNE,
    RUP,
    quantize_value,
)

#: ``pi`` fields of :func:`filter_round` (int64)
I_M, I_EMIN, I_SUBN, I_MODE, I_RELAX, I_COUNT = range(6)
N_I = 6
#: ``pd`` fields (float64): largest value, smallest normal, the magnitudes an overflow of a
#: positive and of a negative value gives (the IEEE rule of the mode, or the largest value)
D_MAX, D_MINNORM, D_OVP, D_OVN = range(4)
N_D = 4
#: columns of the per-row counts: decided (each inexact), overflow, subnormal, marked
C_DECIDED, C_OVERFLOW, C_SUBNORMAL, C_MARKED = range(4)
N_C = 4

_ABS = 0x7FFFFFFFFFFFFFFF
_FRAC = (1 << 52) - 1
_PAD = 2.0**-1000  # added to a scaled bound: covers its rounding if it underflowed


#: bits of :func:`filter_round`'s ``given``: the norms of ``A``'s rows, of ``B``'s columns
GIVEN_A, GIVEN_B = 1, 2

#: columns of ``B`` per task of :func:`filter_round`'s column norms
_NB_CHUNK = 256


@jit_inline
def _row_norm(ar):
    """``||ar||`` in float64: four partial sums of squares (their latencies overlap)."""
    K = ar.size
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    k4 = K - K % 4
    for k in range(0, k4, 4):
        s0 += ar[k] * ar[k]
        s1 += ar[k + 1] * ar[k + 1]
        s2 += ar[k + 2] * ar[k + 2]
        s3 += ar[k + 3] * ar[k + 3]
    for k in range(k4, K):
        s0 += ar[k] * ar[k]
    return np.sqrt((s0 + s1) + (s2 + s3))


@jit_inline
def _cell(x, lo_b, shift_b, d0):
    """The fields of :func:`filter_round` for the sum ``x``: ``(neg, ab, inr, d, half, v,
    scale)``: its sign, magnitude bits, whether its binade is handled, ``d`` (half the
    format's quantum is ``half = 2**d`` ulps of ``x``), its offset ``v`` above the format's
    value below it (in ulps), and ``1 / ulp`` (a binade out of range is taken as ``[1, 2)``)."""
    b = f64_bits(x)
    neg = b < 0
    ab = b & _ABS
    Eb = ab >> 52
    inr = (Eb >= lo_b) & (Eb < 2023)  # also excludes zero, infinities, NaN
    Eb = Eb if inr else 1023
    d = d0 + max(shift_b - Eb, 0)
    half = np.int64(1) << d
    v = ab & (2 * half - 1)
    scale = f64_from_bits((2098 - Eb) << 52)  # 2**(52 - E)
    return neg, ab, inr, d, half, v, scale


@jit_inline
def _rounded(neg, ab, d, half, v, near, up_neg, up_pos, odd, pd):
    """The rounding of a sum whose interval :func:`filter_round` decided, from its fields:
    ``(value, overflow, subnormal)``."""
    trunc = ab & ~(2 * half - 1)
    # is trunc an odd number of quanta? At d = 51 (the binade of the smallest subnormal) it is
    # one quantum, the implicit bit alone
    kept_odd = ((trunc >> (d + 1)) & 1) | np.int64(d == 51)
    up = (((v >> d) & 1) & near) | (up_neg if neg else up_pos) | (odd & (1 - kept_odd))
    res = trunc + (up << (d + 1))
    mag = f64_from_bits(res)
    over = mag > pd[D_MAX]
    sub = mag < pd[D_MINNORM]
    mag = (pd[D_OVN] if neg else pd[D_OVP]) if over else mag
    return (-mag if neg else mag), over, sub


@jit_parallel
def filter_round(S, A, B, c, pi, pd, out, fail, counts, na, nb, marks, given):
    """Round the exact sums ``x[r, j] = A[r] . B[:, j]``, known only to lie within ``e = c *
    na[r] * nb[j]`` of ``S[r, j]``, into a float format, wherever that bound decides the
    rounding; ``na[r] = ||A[r]||`` and ``nb[j] = ||B[:, j]||`` are computed here first (in
    float64: sums of squares in some order, one square root), and kept; the caller computed
    ``na`` so when ``given & GIVEN_A`` (``A`` is then not read), ``nb`` when ``given &
    GIVEN_B`` (``B`` is then not read).

    A zero norm (every square of a nonzero value is normal and nonzero: the caller checks the
    range) means a row or column of signed zeros: every product is zero and so is the exact
    sum, which rounds to ``+0`` exactly, with no event, in every mode but DOWN (whose sign
    depends on the products': marked).

    The format has ``m = pi[I_M]`` fraction bits (at most 50), smallest normal exponent
    ``emin``, subnormals (``pi[I_SUBN]``) or not; ``pi[I_MODE]`` is a deterministic mode. On
    the bits of ``|S|`` (binade ``E``, ulp ``2**(E - 52)``): the format's quantum there is
    ``2 * half`` ulps, ``half = 2**d``, ``d = 51 - m + max(emin - E, 0)`` (no ``max`` without
    subnormals); ``v`` is ``|S|``'s offset above the format's value below it, ``trunc``;
    ``w = e / ulp`` (plus a pad). Decided, strictly (``pi[I_RELAX] == 0``): ``vh = v mod
    half`` has ``vh > w`` and ``vh + w < half``: the interval holds no value of the format and
    no midpoint. Relaxed (``pi[I_RELAX] == 1``, nearest modes whose counts nobody reads):
    ``|v - half| > w`` (no midpoint) and ``v + half / 2 > w`` (not the midpoint below
    ``trunc``, nor the finer one below a binade's first value). The proof is in
    :mod:`fixedsim.matmul.filtered`. Handled here: ``E`` from ``max(emin - m, -900)``
    (``max(emin, -900)`` without subnormals) to 999, where every rounding is ``trunc`` or
    ``trunc`` plus a quantum, nonzero and not flushed. Results go to ``out`` (float32 or
    float64 container); undecided or out-of-range elements are marked in ``fail`` (uint8);
    ``counts[r]`` gets row ``r``'s counts (columns ``C_*``; the events only when
    ``pi[I_COUNT]``), ``marks[r]`` the first of its marked columns; returns the counts' sum.
    Parallel over rows (independent outputs).
    """
    R, N = S.shape
    K = B.shape[0]
    n_tasks = 0 if given & GIVEN_B else (N + _NB_CHUNK - 1) // _NB_CHUNK
    for t in prange(n_tasks):  # column norms, vectorised over j
        j0 = t * _NB_CHUNK
        j1 = min(N, j0 + _NB_CHUNK)
        acc = np.zeros(j1 - j0)
        for k in range(K):
            br = B[k, j0:j1]
            for j in range(j1 - j0):
                acc[j] += br[j] * br[j]
        for j in range(j1 - j0):
            nb[j0 + j] = np.sqrt(acc[j])
    m = pi[I_M]
    subn = pi[I_SUBN] != 0
    mode = pi[I_MODE]
    relax = pi[I_RELAX] != 0
    count = pi[I_COUNT] != 0
    d0 = 51 - m
    emin_b = pi[I_EMIN] + 1023  # biased
    shift_b = emin_b if subn else -4096  # binades below it have the subnormal quantum
    lo_b = max(emin_b - m if subn else emin_b, 123)
    near = np.int64(mode == RNE or mode == RNA)
    up_neg = np.int64(mode == RDN)
    up_pos = np.int64(mode == RUP)
    odd = np.int64(mode == ODD)
    zdec = mode != RDN
    for r in prange(R):
        if (given & GIVEN_A) == 0:
            na[r] = _row_norm(A[r])
        cr = c * na[r]
        zrow = zdec & (na[r] == 0.0)
        srow = S[r]
        orow = out[r]
        frow = fail[r]
        n_ok = 0
        n_zero = 0
        n_over = 0
        n_sub = 0
        # two loops rather than a select in one: each stays lean. Booleans combine with & and
        # |, not and/or, whose short circuits are branches: with them LLVM left both loops
        # scalar (16 ns an element on an AMD EPYC with AVX2, 3-5 ns vectorised)
        if relax:
            for j in range(N):
                neg, ab, inr, d, half, v, scale = _cell(srow[j], lo_b, shift_b, d0)
                w = (cr * nb[j]) * scale + _PAD
                vf = small_f64(v)
                hf = small_f64(half)
                ok = inr & (abs(vf - hf) > w) & (vf + 0.5 * hf > w)
                zero = zrow | (zdec & (nb[j] == 0.0))
                val = _rounded(neg, ab, d, half, v, near, up_neg, up_pos, odd, pd)[0]
                orow[j] = 0.0 if zero else val
                frow[j] = np.uint8(1) - np.uint8(ok | zero)
                n_ok += np.int64(ok & ~zero)
                n_zero += np.int64(zero)
        else:
            for j in range(N):
                neg, ab, inr, d, half, v, scale = _cell(srow[j], lo_b, shift_b, d0)
                w = (cr * nb[j]) * scale + _PAD
                vhf = small_f64(v & (half - 1))
                ok = inr & (vhf > w) & (vhf + w < small_f64(half))
                zero = zrow | (zdec & (nb[j] == 0.0))
                val, over, sub = _rounded(neg, ab, d, half, v, near, up_neg, up_pos, odd, pd)
                orow[j] = 0.0 if zero else val
                frow[j] = np.uint8(1) - np.uint8(ok | zero)
                ok = ok & ~zero
                n_ok += np.int64(ok)
                n_zero += np.int64(zero)
                n_over += np.int64(ok & over)
                n_sub += np.int64(ok & sub)
        counts[r, C_DECIDED] = n_ok
        counts[r, C_OVERFLOW] = n_over if count else 0
        counts[r, C_SUBNORMAL] = n_sub if count else 0
        counts[r, C_MARKED] = N - n_ok - n_zero
        if n_ok + n_zero < N:  # the row's first marked columns, from its marks (in cache)
            q = 0
            for j in range(N):
                if frow[j] != 0 and q < marks.shape[1]:
                    marks[r, q] = j
                    q += 1
    tot = np.zeros(N_C, np.int64)
    for r in range(R):  # after the parallel loop, in row order
        for k in range(N_C):
            tot[k] += counts[r, k]
    return tot


@jit
def row_norms(A, na):
    """``na[r] = ||A[r]||``, as :func:`filter_round` computes it (the same float64 bound).
    Serial: it runs right after a BLAS call, as the filter does."""
    for r in range(A.shape[0]):
        na[r] = _row_norm(A[r])


@jit
def zero_sums(S, A, B, out, fail, counts, marks, every):
    """Unmark the marked sums of :func:`filter_round` whose products are all zero: exact
    zeros, written to ``out`` as ``+0`` (no event; the caller's rounding is not DOWN).

    Such a sum has ``S[r, j] == 0`` (BLAS added zeros) and no nonzero pair ``A[r, k] != 0 !=
    B[k, j]``: the nonzero patterns of ``A``'s row and ``B``'s column, as bit masks of ``K``
    bits (``ceil(K / 64)`` words), share no bit; every product is exact in float64, so a
    product is zero exactly when one of its factors is. The masks cost a pass over ``A`` and
    ``B``; they are built only when at least ``(R + N) / every`` marked sums are zero
    (``every`` 0: never). Updates ``fail``, ``counts[:, C_MARKED]`` and the rows' ``marks``;
    returns the number of sums unmarked. Serial: it runs right after a BLAS call, as the
    filter does."""
    R, N = S.shape
    K = A.shape[1]
    n = 0
    for r in range(R):
        if counts[r, C_MARKED] != 0:
            sr = S[r]
            fr = fail[r]
            for j in range(N):
                n += np.int64(fr[j] != 0) & np.int64(sr[j] == 0.0)
    if n == 0 or n * every < R + N:
        return 0
    W = (K + 63) // 64
    ma = np.zeros((R, W), np.uint64)
    for r in range(R):
        ar = A[r]
        for k in range(K):
            ma[r, k >> 6] |= np.uint64(ar[k] != 0.0) << np.uint64(k & 63)
    mb = np.zeros((W, N), np.uint64)  # word-major: the loop over j runs along a row
    for k in range(K):
        bk = B[k]
        mw = mb[k >> 6]
        sh = np.uint64(k & 63)
        for j in range(N):
            mw[j] |= np.uint64(bk[j] != 0.0) << sh
    dropped = 0
    for r in range(R):
        if counts[r, C_MARKED] == 0:
            continue
        sr = S[r]
        fr = fail[r]
        orow = out[r]
        q = 0
        if W == 1:  # K <= 64 (a Linear layer's weight gradient): no branch, vectorised
            m0 = ma[r, 0]
            mb0 = mb[0]
            for j in range(N):
                z = np.uint8(fr[j] != 0) & np.uint8(sr[j] == 0.0) & np.uint8((m0 & mb0[j]) == 0)
                orow[j] = 0.0 if z else orow[j]
                fr[j] = fr[j] & (np.uint8(1) - z)
                q += np.int64(z)
        else:
            for j in range(N):
                if fr[j] != 0 and sr[j] == 0.0:
                    meet = np.uint64(0)
                    for w in range(W):
                        meet |= ma[r, w] & mb[w, j]
                    if meet == 0:
                        orow[j] = 0.0
                        fr[j] = 0
                        q += 1
        if q:
            counts[r, C_MARKED] -= q
            dropped += q
            q = 0
            for j in range(N):  # the row's first marked columns again
                if fr[j] != 0 and q < marks.shape[1]:
                    marks[r, q] = j
                    q += 1
    return dropped


_KEEP = (1 << F_OVERFLOW) | (1 << F_UNDERFLOW) | (1 << F_SUBNORMAL) | (1 << F_NAN)


@jit
def filter_round_at(s, e, strict, P, U, D, out, ok):
    """Round the exact sums ``x[i]``, known to lie within ``e[i]`` of ``s[i]``, where that
    decides the rounding (any float format and range; deterministic mode; parameters ``P, U,
    D`` of the general quantizer). With ``[lo, hi]`` that interval widened outward by one
    float64 ulp: decided when ``0`` is not in it and ``lo`` and ``hi`` round to the same ``v``
    with the same overflow, underflow, subnormal and NaN events (roundings and these events
    are monotone in the magnitude, so all of ``[lo, hi]`` does), and, when ``strict``, ``v``
    is not in it (so the rounding is inexact). Writes ``out[i]`` and ``ok[i]`` (uint8);
    returns the event counts of the decided elements (columns ``F_*``). Serial: few elements.
    """
    counts = np.zeros(N_FLAGS, np.int64)
    idx = np.uint64(0)
    for i in range(s.size):
        x = s[i]
        err = e[i]
        ok[i] = 0
        if not (err >= 0.0 and err < np.inf and abs(x) < np.inf):
            continue
        lo = np.nextafter(x - err, -np.inf)
        hi = np.nextafter(x + err, np.inf)
        if not ((lo > 0.0 or hi < 0.0) and abs(lo) < np.inf and abs(hi) < np.inf):
            continue
        vl, fl = quantize_value(lo, P, U, D, idx)
        vh, fh = quantize_value(hi, P, U, D, idx)
        if vl == vh and (fl & _KEEP) == (fh & _KEEP) and not (strict and lo <= vl <= hi):
            out[i] = vl
            ok[i] = 1
            f = (fl & _KEEP) | (1 << F_INEXACT)
            for k in range(N_FLAGS):
                counts[k] += (f >> k) & 1
    return counts


#: rows of ``B`` per pass of :func:`gather_columns` (they stay in cache across the columns)
_GATHER_ROWS = 16


@jit
def gather_columns(B, cols, BT):
    """``BT[u, :] = B[:, cols[u]]`` (``cols`` ascending, so that neighbouring columns share the
    cache lines of each block of rows). Serial: few columns, right after a BLAS call."""
    K = B.shape[0]
    for k0 in range(0, K, _GATHER_ROWS):
        k1 = min(K, k0 + _GATHER_ROWS)
        for u in range(cols.size):
            j = cols[u]
            bt = BT[u]
            for k in range(k0, k1):
                bt[k] = B[k, j]


@jit
def dot2_at(A, BT, rows, cols, hi, lo, t, exact):
    """Compensated dot products (Ogita, Rump and Oishi's Dot2 on exact products) of the
    listed elements: ``hi[i] + lo[i]`` approximates ``A[rows[i]] . BT[cols[i]]`` with
    ``|fl(hi + lo) - exact| <= u |exact| + gamma(K)**2 * sum|a_k b_k|``, and ``t[i]`` is
    ``sum|a_k b_k|`` in float64 (relative error at most ``gamma(K)``), ``k = 0..K-1`` in
    order. ``exact[i] = 1`` when every step's TwoSum error was zero: then ``hi[i]`` is the
    exact sum. Every product must be exact in float64 (and every sum far from overflow).
    Serial: few elements, right after a BLAS call (memory-bound: four interleaved chains
    were measured 5% faster, not worth their code)."""
    K = A.shape[1]
    for i in range(rows.size):
        ar = A[rows[i]]
        br = BT[cols[i]]
        nz = 0
        for k in range(K):  # vectorised: is any product nonzero?
            nz += np.int64(ar[k] * br[k] != 0.0)
        if nz == 0:  # every product a signed zero: the loop below would give +0, exact
            hi[i] = 0.0
            lo[i] = 0.0
            t[i] = 0.0
            exact[i] = 1
            continue
        s = 0.0
        e = 0.0
        a = 0.0
        inexact = False
        for k in range(K):
            p = ar[k] * br[k]
            s, q = two_sum(s, p)
            e += q
            inexact = inexact or q != 0.0
            a += abs(p)
        hi[i] = s
        lo[i] = e
        t[i] = a
        exact[i] = 0 if inexact else 1


@jit
def dot2_sparse_at(A, B, rows, cols, hi, lo, t, exact):
    """:func:`dot2_at` of the listed elements over the nonzero entries of ``A``'s rows only,
    reading ``B``'s columns in place (no gathered copy): the same results, bit for bit.

    A zero product (the exact product of finite operands with a zero factor) changes nothing
    in Dot2: ``s + 0 = s`` exactly, so TwoSum's error is ``+0`` and ``e + 0 = e``; ``|p| = 0``
    leaves ``t``; and no sum is ever ``-0`` (``s`` and ``e`` start at ``+0``, and a sum to
    nearest is ``-0`` only when both terms are). So the products of the nonzero ``a_k``, in
    ``k`` order, give the same ``hi``, ``lo``, ``t`` and exactness. The nonzero positions
    of a row are listed once for consecutive elements of the same row (``rows`` sorted keeps
    it to once per row). On the sparse errors and activations of ReLU networks this skips
    most of ``K``. Serial, as :func:`dot2_at`."""
    K = A.shape[1]
    idx = np.empty(K, np.int64)
    m = 0
    cur = -1
    for i in range(rows.size):
        r = rows[i]
        if r != cur:
            ar = A[r]
            m = 0
            for k in range(K):
                if ar[k] != 0.0:
                    idx[m] = k
                    m += 1
            cur = r
        ar = A[r]
        j = cols[i]
        s = 0.0
        e = 0.0
        a = 0.0
        inexact = False
        for q in range(m):
            k = idx[q]
            p = ar[k] * B[k, j]
            s, d = two_sum(s, p)
            e += d
            inexact = inexact or d != 0.0
            a += abs(p)
        hi[i] = s
        lo[i] = e
        t[i] = a
        exact[i] = 0 if inexact else 1


@jit
def quantize_at(x, P, U, D, out):
    """``out[i]`` = the exact value ``x[i]`` rounded by the general scalar quantizer
    (deterministic mode, parameters ``P, U, D``); returns the events (columns ``F_*``)."""
    counts = np.zeros(N_FLAGS, np.int64)
    idx = np.uint64(0)
    for i in range(x.size):
        v, f = quantize_value(x[i], P, U, D, idx)
        out[i] = v
        for k in range(N_FLAGS):
            counts[k] += (f >> k) & 1
    return counts
