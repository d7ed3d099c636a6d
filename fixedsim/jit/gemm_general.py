"""The general multiply-accumulate kernel: every spec, every element, step by step.

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
from .options import jit, jit_inline, jit_parallel
from .quant import (
    N_FLAGS,
    P_MODE,
    RDN,
    SR,
    quantize_value,
)

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
    not be established (the caller falls back to exact arithmetic). ``coarse``: ``lo`` has the
    sign of ``V - hi`` and is nonzero, but is only within one ulp of it (enough for the
    deterministic roundings, not for a stochastic one: the caller falls back then).
    """
    if n == 0:
        return 0.0, 0.0, False, True, False
    if n == 1:
        return e[0], 0.0, False, True, False
    if n == 2:
        hi, lo = two_sum(e[1], e[0])
        return hi, lo, False, True, False
    hi = 0.0
    for i in range(n):
        hi += e[i]
    for _ in range(4):
        for i in range(n):
            tmp[i] = e[i]
        m = grow(tmp, n, -hi)
        if m < 0:
            return 0.0, 0.0, False, False, False
        if m == 0:
            return hi, 0.0, False, True, False
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
                return hi, lo, approx, True, False
        elif hi + lo == hi and 2.0 * abs(lo) < abs(
                np.nextafter(hi, math.copysign(np.inf, lo)) - hi):
            # three or more components left, all below half an ulp of hi (so hi would not
            # move): lo, their sum from the smallest up, has the sign of the largest (it
            # outweighs the others in a nonoverlapping expansion) and is nonzero, which is
            # all a deterministic rounding reads; it is only faithful, so ``coarse``
            return hi, lo, True, True, True
        hi = hi + lo
    return 0.0, 0.0, False, False, False


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
                has_prod, acc_mode, block, has_out, has_via, e, tmp, counts, s0):
    """One output element, as :func:`fixedsim.reference.dot` with the addend ``s0`` (the
    running sum's start, +0 without one); returns ``(value, ok)``.

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
    s = s0  # the running sum (the accumulator): the addend C, +0 without one
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
            hi, lo, approx, ok, coarse = expansion_hilo(e, n, tmp)
            if not ok or (coarse and stage_P[st][P_MODE] == SR):
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
def gemm_general(A, BT, C, out, base, prod_exact, stage_P, stage_Psr, stage_U, stage_D, prec,
                 wrap_lim, has_prod, acc_mode, block, has_out, has_via):
    """``out[r, j]`` = :func:`dot_element` of row ``A[r]`` and row ``BT[j]`` (B transposed),
    from the addend ``C[r, j]``.

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
                                has_out, has_via, e, tmp, c, C[r, j])
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
                            has_via, e, tmp, c, 0.0)
        if ok:
            out[i] = v
            counts[i] += c
        else:
            slow[i] = 1
    return counts, slow
