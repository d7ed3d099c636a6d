"""The aligned, truncating multi-term adder of tensor cores (:class:`fixedsim.BlockFMA`).

For each output row ``i`` and each block of ``block`` products, vectorised over the output
columns ``j``: the anchor ``E[j]`` (the largest term exponent, at least ``min_exp``), then
the integer ``S[j] = sum trunc(x * 2**(23 + extra - E[j]))`` over the block's products ``x``
and its addend (the running value), then one rounding of ``S[j] * 2**(E[j] - 23 - extra)``
on its integer bits (:func:`round_cut_sum`). The arithmetic and why it is exact are in
:mod:`fixedsim.matmul.blockfma`.
"""

import math

import numpy as np
from numba import prange

from .bits import f64_bits, f64_from_bits
from .options import jit_inline, jit_parallel
from .quant import (
    F_INEXACT,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    F_UP,
    N_FLAGS,
    ODD,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
)

#: Exponent given to zero operands and to an absent floor: below every real exponent (those
#: of float64 values and their products lie in -2148..2046, a floor in -1100..1100). A zero
#: product's exponent is at most ``NO_EXP + 2046``; an anchor below ``NO_EXP // 2`` means the
#: block has no nonzero term (its cut sum is 0). Twice it still fits an int16: the exponents
#: are int16, which halves the anchor pass (twice the SIMD lanes of int32).
NO_EXP = -16000


@jit_inline
def round_cut_sum(S, sexp, p, emin, emax, mode):
    """``S * 2**sexp`` (``S`` an integer, ``|S| < 2**53``) rounded to ``p`` fraction bits with
    gradual underflow at ``2**emin`` and overflow to an infinity; returns ``(value, flags)``.

    The value's exponent is that of ``|S|``'s leading bit plus ``sexp``; the quantum there is
    ``2**qe``, ``qe = max(that, emin) - p``; the ``sh = qe - sexp`` low bits of ``|S|`` are
    dropped and decide the rounding. ``S == 0`` gives +0.
    """
    if S == 0:
        return 0.0, 0
    aS = -S if S < 0 else S
    neg = S < 0
    L = math.frexp(float(aS))[1] - 1  # exact: |S| < 2**53
    qe = max(sexp + L, emin) - p
    sh = qe - sexp
    flags = 0
    if sh <= 0:
        R = aS
        qe = sexp
    else:
        if sh >= 60:  # |S| < 2**53 is far below half a quantum
            q = np.int64(0)
            rem_nz = True
            gt_half = False
            eq_half = False
        else:
            q = aS >> sh
            rem = aS - (q << sh)
            half = np.int64(1) << (sh - 1)
            rem_nz = rem != 0
            gt_half = rem > half
            eq_half = rem == half
        up = False
        if rem_nz:
            flags |= 1 << F_INEXACT
            if mode == RNE:
                up = gt_half or (eq_half and (q & 1) == 1)
            elif mode == RNA:
                up = gt_half or eq_half
            elif mode == RUP:
                up = not neg
            elif mode == RDN:
                up = neg
            elif mode == ODD:
                up = (q & 1) == 0
            if up != neg:
                flags |= 1 << F_UP
        R = q + 1 if up else q
    v = math.ldexp(float(R), qe)
    if v >= math.ldexp(1.0, emax + 1):
        flags |= (1 << F_OVERFLOW) | (1 << F_INEXACT)
        flags = (flags & ~(1 << F_UP)) | (0 if neg else 1 << F_UP)
        v = np.inf
    elif v == 0.0:
        flags |= 1 << F_UNDERFLOW
    elif v < math.ldexp(1.0, emin):
        flags |= 1 << F_SUBNORMAL
    return (-v if neg else v), flags


@jit_inline
def pow2(x):
    """``2.0**x`` for an integer ``x`` in -1022..1023 (built from its bits)."""
    return f64_from_bits(np.int64(x + 1023) << 52)


@jit_inline
def round_fast(S, sexp, p, emin, emax, mode):
    """:func:`round_cut_sum`'s value for TOWARD_ZERO (``mode == RTZ``) and NEAREST_EVEN,
    without its events and without branches the compiler cannot turn into selects: the
    leading bit from the exact float64's exponent field, the dropped bits by shifts (at most
    62: ``|S| < 2**53`` is then below half a quantum, as it is for any larger shift)."""
    aS = -S if S < 0 else S
    L = (f64_bits(np.float64(aS)) >> 52) - 1023
    qe = max(sexp + L, emin) - p
    sh = min(max(qe - sexp, 0), 62)
    q = aS >> sh
    rem = aS - (q << sh)
    half = (np.int64(1) << max(sh - 1, 0)) if sh > 0 else aS + 1
    up = (mode == RNE) & ((rem > half) | ((rem == half) & ((q & 1) == 1)))
    R = q + np.int64(up)
    v = np.float64(R) * pow2(max(qe, sexp))
    v = np.inf if v >= pow2(emax + 1) else v
    return -v if S < 0 else v


@jit_inline
def second_stage(S, E, c, top, sbits, cbits, dbits):
    """The second alignment of a BlockFMA with ``addend_bits = (sbits, cbits[, dbits])``:
    the products' cut sum ``S * 2**(E - top)`` and the addend ``c`` aligned to ``E2 = max(E,
    e_c)`` (``e_c = max(floor(log2|c|), -126)``, -126 for ``c = 0``), floored to multiples
    of ``2**(E2 - sbits)`` and ``2**(E2 - cbits)`` (``c`` read as 0 when ``dbits > 0`` and
    ``e_c < E2 - dbits``); returns ``(T, E2, cf, lost)`` with the exact sum ``T * 2**(E2 -
    sbits)``, ``lost`` 0 when ``c``'s cut was exact, 1 when it lost bits, 2 when it lost all
    of them.

    ``S`` is shifted on its integer bits (an arithmetic right shift floors; at 63 or more
    bits every ``|S| < 2**62`` floors to 0 or -1, as a larger shift does). ``c * 2**(cbits -
    E2)`` is exact where it is a normal float64, and below 1 in magnitude where it is not
    (``e_c <= E2``), so its floor is 0 or -1 by its sign: a negative addend that underflows
    to -0 floors to -1. The caller marks ``|cbits - E2| > 1000`` (``pow2``'s range).
    """
    ec = max(((f64_bits(c) >> 52) & 0x7FF) - 1023, -126)
    e2 = max(np.int64(E), ec)
    if S != 0:
        d = (e2 - sbits) - (np.int64(E) - top)
        S = S >> min(d, 63) if d > 0 else S << (-d)
    x = cbits - e2
    v = c * pow2(x if (x <= 1000) & (x >= -1000) else 0)
    cf = np.int64(math.floor(v))
    if c < 0.0 and cf == 0:
        cf = np.int64(-1)
    if dbits > 0 and ec < e2 - dbits:  # dropped
        cf = np.int64(0)
    lost = 0
    if c != 0.0 and (v != cf or cf == 0):
        lost = 2 if cf == 0 else 1
    return S + (cf << (sbits - cbits)), e2, cf, lost


#: Rows of ``A`` per tile: each load of ``B`` and of its exponents serves this many rows.
TILE = 4
#: Columns of the alignment counts :func:`gemm_blockfma` returns.
ALIGN_CUT, ALIGN_LOST = 0, 1


@jit_inline
def _cut(t, ti, cut_rj, r, j):
    """Count the term ``t`` (scaled to the window, ``ti`` its cut) if the cut lost bits, and
    if it lost all of them."""
    if ti != t:
        cut_rj[r, j, ALIGN_CUT] += 1
        if ti == 0:
            cut_rj[r, j, ALIGN_LOST] += 1


@jit_parallel
def gemm_blockfma(A, EA, B, EB, C, out, block, extra, min_exp, p, emin, emax, mode, count,
                  sbits, cbits, dbits, groups):
    """``out[i, j]``: the BlockFMA chain of row ``A[i]`` and column ``B[:, j]`` from ``C[i, j]``.

    ``EA``, ``EB`` (int16): the operands' exponents (``max(floor(log2|x|), input emin)``,
    ``NO_EXP`` for zeros, so that a zero product never sets the anchor); every product
    ``A[i, k] * B[k, j]`` must be exact in float64 and the operands finite. ``min_exp``: the
    anchor's floor (``NO_EXP``: none); ``p``, ``emin``, ``emax``: the register's fraction
    bits and exponent range; ``mode``: the rounding. Parallel over tiles of :data:`TILE`
    rows, vectorised over the columns ``j``.

    Returns per-row event counts (rows x flags, when ``count``; marked elements not counted),
    the mask of elements left to the caller: those whose anchor puts the window scale
    ``2**(23 + extra - E)`` outside float64's normal range, and per row the events of the
    alignment (rows x 2, when ``count``; marked elements not counted): ``[:, ALIGN_CUT]``
    the nonzero terms (products, and the running sum each block starts from) that lost bits
    when cut to the window, ``[:, ALIGN_LOST]`` those of them cut to zero. A block whose
    running sum is an infinity or a NaN aligns nothing.

    ``sbits > 0`` (a BlockFMA's ``addend_bits = (sbits, cbits)``): the running value is no
    term of the block; after the products' cut sum ``S`` (anchor ``E``), the second stage
    (:func:`second_stage`) aligns ``S`` and the running value again and floors them. Elements
    whose second-stage scale ``2**(cbits - E2)`` leaves float64's normal range are marked;
    ``dbits > 0``: the running value is read as 0 when its exponent is below ``E2 - dbits``.

    ``groups > 1`` (with ``sbits > 0``): product ``k0 + i`` of a block is in group ``i mod
    groups``; each group has its own anchor (``EG[g]``) and cut sum (in ``Sg``), and the
    group sums, shifted right on their integer bits to the largest anchor's window (an
    arithmetic shift is the floor), make ``S``. ``groups == 1`` sums into ``S`` directly.
    """
    R, K = A.shape
    N = B.shape[1]
    nblocks = (K + block - 1) // block
    counts = np.zeros((R, N_FLAGS), np.int64)
    cuts = np.zeros((R, 2), np.int64)
    bad = np.zeros((R, N), np.uint8)
    top = 23 + extra
    fast = not count and (mode == RTZ or mode == RNE)
    ntiles = (R + TILE - 1) // TILE
    for it in prange(ntiles):
        i0 = it * TILE
        nr = min(TILE, R - i0)
        s = np.zeros((TILE, N))
        EG = np.empty((groups, TILE, N), np.int16)  # each group's anchor
        Emax = np.empty((TILE, N), np.int16)
        E = EG[0] if groups == 1 else Emax  # the block's anchor
        S = np.empty((TILE, N), np.int64)
        St = np.empty((TILE, N) if groups > 1 else (1, 1), np.int64)
        Sg = S if groups == 1 else St  # a group's cut sum
        sc = np.empty((TILE, N))
        ea = np.empty(TILE, np.int16)
        av = np.empty(TILE)
        fl_rj = np.zeros((TILE, N if count else 1, N_FLAGS), np.int64)
        cut_rj = np.zeros((TILE, N if count else 1, 2), np.int64)
        for r in range(nr):
            for j in range(N):
                s[r, j] = C[i0 + r, j]
        for t in range(nblocks):
            k0 = t * block
            k1 = min(K, k0 + block)
            for g in range(groups):
                Eg = EG[g]
                for r in range(TILE):  # the addend's exponent (an FP32 value), the floor
                    for j in range(N):
                        cj = s[r, j]
                        ec = max(((f64_bits(cj) >> 52) & 0x7FF) - 1023, -126)
                        on = cj != 0.0 and abs(cj) < np.inf and sbits == 0
                        Eg[r, j] = max(min_exp, ec) if on else min_exp
                for k in range(k0 + g, k1, groups):  # the anchor: the largest exponent
                    for r in range(TILE):
                        ea[r] = EA[i0 + r, k] if r < nr else NO_EXP
                    for j in range(N):
                        eb = EB[k, j]
                        for r in range(TILE):
                            Eg[r, j] = max(Eg[r, j], np.int16(ea[r] + eb))
            if groups > 1:  # the block's anchor: the largest group's
                for r in range(TILE):
                    for j in range(N):
                        E[r, j] = EG[0, r, j]
                        S[r, j] = 0
                for g in range(1, groups):
                    for r in range(TILE):
                        for j in range(N):
                            E[r, j] = max(E[r, j], EG[g, r, j])
            for g in range(groups):
                Eg = EG[g]
                for r in range(TILE):  # the window's scale, the addend cut to it
                    for j in range(N):
                        x = top - Eg[r, j]
                        if Eg[r, j] > NO_EXP // 2 and (x > 1000 or x < -1000) and r < nr:
                            bad[i0 + r, j] = 1
                        sc[r, j] = pow2(x if (x <= 1000) & (x >= -1000) else 0)
                        fin = abs(s[r, j]) < np.inf and sbits == 0
                        Sg[r, j] = np.int64(s[r, j] * sc[r, j]) if fin else 0
                if count:  # the same sums, and the terms that lost bits in the cut
                    for r in range(nr):
                        for j in range(N):
                            if abs(s[r, j]) < np.inf and s[r, j] != 0.0 and sbits == 0:
                                _cut(s[r, j] * sc[r, j], Sg[r, j], cut_rj, r, j)
                    for k in range(k0 + g, k1, groups):
                        for r in range(nr):
                            a = A[i0 + r, k]
                            for j in range(N):
                                t = a * B[k, j] * sc[r, j]
                                ti = np.int64(t)
                                Sg[r, j] += ti
                                if abs(s[r, j]) < np.inf:
                                    _cut(t, ti, cut_rj, r, j)
                else:
                    for k in range(k0 + g, k1, groups):  # the products cut (toward zero)
                        for r in range(TILE):
                            av[r] = A[i0 + r, k] if r < nr else 0.0
                        for j in range(N):
                            b = B[k, j]
                            for r in range(TILE):
                                Sg[r, j] += np.int64(av[r] * b * sc[r, j])
                if groups > 1:  # floored to the block's window, summed
                    for r in range(TILE):
                        for j in range(N):
                            d = np.int64(E[r, j]) - np.int64(Eg[r, j])
                            S[r, j] += Sg[r, j] >> min(d, 63)
            if sbits > 0:
                for r in range(nr):
                    for j in range(N):
                        if abs(s[r, j]) < np.inf:
                            S[r, j], e2, cf, lost = second_stage(S[r, j], E[r, j], s[r, j],
                                                                 top, sbits, cbits, dbits)
                            E[r, j] = e2 - sbits + top
                            if cbits - e2 > 1000 or cbits - e2 < -1000:
                                bad[i0 + r, j] = 1
                            if count and lost > 0:
                                cut_rj[r, j, ALIGN_CUT] += 1
                                cut_rj[r, j, ALIGN_LOST] += lost - 1
            if fast:
                for r in range(TILE):
                    for j in range(N):
                        v = round_fast(S[r, j], E[r, j] - top, p, emin, emax, mode)
                        s[r, j] = v if abs(s[r, j]) < np.inf else s[r, j]
                continue
            for r in range(nr):
                for j in range(N):
                    if not abs(s[r, j]) < np.inf:  # an infinite or NaN addend with finite
                        if count and s[r, j] != s[r, j]:  # products stays as it is
                            fl_rj[r, j, F_NAN] += 1
                        continue
                    v, fl = round_cut_sum(S[r, j], E[r, j] - top, p, emin, emax, mode)
                    s[r, j] = v
                    if count:
                        for f in range(N_FLAGS):
                            fl_rj[r, j, f] += (fl >> f) & 1
        for r in range(nr):
            for j in range(N):
                out[i0 + r, j] = s[r, j]
                if count and bad[i0 + r, j] == 0:
                    for f in range(N_FLAGS):
                        counts[i0 + r, f] += fl_rj[r, j, f]
                    cuts[i0 + r, ALIGN_CUT] += cut_rj[r, j, ALIGN_CUT]
                    cuts[i0 + r, ALIGN_LOST] += cut_rj[r, j, ALIGN_LOST]
    return counts, bad, cuts
