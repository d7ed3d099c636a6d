"""The kernel of accumulators with a structure: interleaved FMA chains, the order of the
products within a block, how the chains are added, the running sum added first or last.

Each output element follows :func:`fixedsim.reference.reduce_block` block by block. Every
step adds two values (a chain and a product, two chains, the running sum and a block's value)
and rounds once into the accumulator's format: the exact sum is kept as a floating-point
expansion of at most three components (a product is exact in float64, or Dekker's two-product
``hi + lo``) and rounded with :func:`fixedsim.jit.arith.round_exact`. IEEE specials take the
float64 sum, which is the IEEE sum of the terms; an exact zero takes the sign IEEE addition
gives it. An element the kernel cannot prove (a two-product that may be inexact, a format too
wide for an inexact value) is flagged and computed by the caller with the Fraction oracle.

Stages (rows of the counts arrays): 0 product, 1 accumulator, 2 output, as in
:mod:`fixedsim.jit.gemm_general`.
"""

import math

import numpy as np
from numba import prange

from .arith import round_exact
from .gemm_general import _BIG, _TINY, N_STAGES, _check, _count, expansion_hilo, grow, two_prod
from .options import jit, jit_parallel
from .quant import N_FLAGS, P_MODE, RDN, quantize_value

#: The expansion of one step: two terms of at most two components each.
_CAP = 4


@jit
def _add_round(x, yh, yl, st, stage_P, stage_Psr, stage_U, stage_D, prec, wrap_lim, e, tmp,
               counts):
    """``x + (yh + yl)`` rounded once into stage ``st``; ``(value, ok)``.

    ``x`` and ``yh`` are float64 values (``yl`` a nonzero low part of an exact product, or 0),
    ``x`` finite or not. The flags of the rounding are counted into ``counts[st]``.
    """
    P = stage_P[st]
    if not (abs(x) < np.inf and abs(yh) < np.inf):
        v, fl = quantize_value(x + yh, P, stage_U[st], stage_D[st], np.uint64(0))
        _count(counts, st, fl)
        return v, True
    n = 0
    if x != 0.0:
        n = grow(e, n, x)
    if yh != 0.0:
        n = grow(e, n, yh)
    if yl != 0.0:
        n = grow(e, n, yl)
    if n == 0:  # an exact zero: IEEE's sign (reference.exact_sum)
        xn = math.copysign(1.0, x) < 0.0
        yn = math.copysign(1.0, yh) < 0.0
        if x == 0.0 and yh == 0.0:  # two zeros: -0 if both are, or rounding DOWN with one
            return (-0.0 if (xn and yn) or (P[P_MODE] == RDN and (xn or yn)) else 0.0), True
        return (-0.0 if P[P_MODE] == RDN else 0.0), True  # nonzero terms that cancel
    hi, lo, approx, ok, coarse = expansion_hilo(e, n, tmp)
    if not ok or not _check(hi, lo, prec[st], wrap_lim[st]):
        return 0.0, False
    v, fl, amb = round_exact(hi, lo, approx, P, stage_Psr[st], stage_U[st], stage_D[st],
                             np.uint64(0))
    if amb:
        return 0.0, False
    _count(counts, st, fl)
    return v, True


@jit
def _block_exact(a, b, k0, k1, base, s, first, prod_exact, has_prod, stage_P, stage_Psr, stage_U,
                 stage_D, prec, wrap_lim, e, tmp, counts):
    """The exact sum of the products ``k0..k1-1`` (with ``s`` when ``first``) rounded once
    into the accumulator; ``(value, ok)``."""
    n = 0
    has_sp = first and not abs(s) < np.inf
    sp = s if has_sp else 0.0
    allneg = first and s == 0.0 and math.copysign(1.0, s) < 0.0
    anyneg = allneg
    nonzero = first and s != 0.0 and not has_sp
    if nonzero:
        e[0] = s
        n = 1
    if not first:  # the sum starts at +0 (exact_sum of [0.0, *products])
        allneg = False
    for k in range(k0, k1):
        ph, pl, ok = _product(a[k], b[k], base + np.uint64(k), prod_exact, has_prod, stage_P,
                              stage_Psr, stage_U, stage_D, prec, wrap_lim, counts)
        if not ok:
            return 0.0, False
        if not abs(ph) < np.inf:
            sp = sp + ph if has_sp else ph
            has_sp = True
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
    P = stage_P[1]
    if has_sp:
        v, fl = quantize_value(sp, P, stage_U[1], stage_D[1], np.uint64(0))
        _count(counts, 1, fl)
        return v, True
    if n == 0:
        if nonzero:
            return (-0.0 if P[P_MODE] == RDN else 0.0), True
        if allneg or (P[P_MODE] == RDN and anyneg):
            return -0.0, True
        return 0.0, True
    hi, lo, approx, ok, coarse = expansion_hilo(e, n, tmp)
    if not ok or not _check(hi, lo, prec[1], wrap_lim[1]):
        return 0.0, False
    v, fl, amb = round_exact(hi, lo, approx, P, stage_Psr[1], stage_U[1], stage_D[1],
                             np.uint64(0))
    if amb:
        return 0.0, False
    _count(counts, 1, fl)
    return v, True


@jit
def _product(x, y, pidx, prod_exact, has_prod, stage_P, stage_Psr, stage_U, stage_D, prec,
             wrap_lim, counts):
    """The product ``x * y`` as ``(hi, lo, ok)``: exact, or rounded into stage 0 (draw
    index ``pidx``)."""
    pl = 0.0
    if prod_exact:
        ph = x * y
    else:
        ph, pl = two_prod(x, y)
    if abs(x) < np.inf and abs(y) < np.inf:
        if not abs(ph) < np.inf:
            return 0.0, 0.0, False
        if not prod_exact and x != 0.0 and y != 0.0 and (
                abs(ph) < _TINY or abs(x) >= _BIG or abs(y) >= _BIG):
            return 0.0, 0.0, False
    else:
        pl = 0.0
    if has_prod:
        if not (abs(ph) < np.inf) or (ph == 0.0 and pl == 0.0):
            ph, fl = quantize_value(ph, stage_P[0], stage_U[0], stage_D[0], pidx)
        else:
            if not _check(ph, pl, prec[0], wrap_lim[0]):
                return 0.0, 0.0, False
            ph, fl, amb = round_exact(ph, pl, np.bool_(False), stage_P[0], stage_Psr[0],
                                      stage_U[0], stage_D[0], pidx)
        _count(counts, 0, fl)
        pl = 0.0
    return ph, pl, True


@jit
def lanes_element(a, b, s, oidx, prod_exact, stage_P, stage_Psr, stage_U, stage_D, prec, wrap_lim,
                  has_prod, has_out, block, lanes, descending, tree, last, e, tmp, ch,
                  counts):
    """One output element; ``(value, ok)``.

    ``s`` is the running sum's start (+0, or the addend C), ``oidx`` the element's flat index
    (draws of stochastic product and output roundings, as the general kernel); ``lanes`` 0
    for an exact block sum, else the number of interleaved chains (``ch`` holds them);
    ``descending``, ``tree``, ``last``: the accumulator's ``order``, ``combine`` and
    ``addend``; ``stage_*``, ``prec``, ``wrap_lim`` as for
    :func:`fixedsim.jit.gemm_general.dot_element`.
    """
    K = a.size
    first = not last
    base = np.uint64(oidx) * np.uint64(K)
    for k0 in range(0, K, block):
        k1 = min(K, k0 + block)
        if lanes == 0:
            if first:
                v, ok = _block_exact(a, b, k0, k1, base, s, True, prod_exact, has_prod, stage_P,
                                     stage_Psr, stage_U, stage_D, prec, wrap_lim, e, tmp,
                                     counts)
            else:
                v, ok = _block_exact(a, b, k0, k1, base, 0.0, False, prod_exact, has_prod, stage_P,
                                     stage_Psr, stage_U, stage_D, prec, wrap_lim, e, tmp,
                                     counts)
            if not ok:
                return 0.0, False
        else:
            for j in range(lanes):
                ch[j] = 0.0
            if first:
                ch[0] = s
            for i in range(k1 - k0):
                k = k1 - 1 - i if descending else k0 + i
                ph, pl, ok = _product(a[k], b[k], base + np.uint64(k), prod_exact, has_prod,
                                      stage_P, stage_Psr, stage_U, stage_D, prec, wrap_lim,
                                      counts)
                if not ok:
                    return 0.0, False
                j = i % lanes
                ch[j], ok = _add_round(ch[j], ph, pl, 1, stage_P, stage_Psr, stage_U, stage_D,
                                       prec, wrap_lim, e, tmp, counts)
                if not ok:
                    return 0.0, False
            if tree:
                m = lanes
                while m > 1:
                    for i in range(m // 2):
                        ch[i], ok = _add_round(ch[2 * i], ch[2 * i + 1], 0.0, 1, stage_P,
                                               stage_Psr, stage_U, stage_D, prec, wrap_lim, e,
                                               tmp, counts)
                        if not ok:
                            return 0.0, False
                    if m % 2:
                        ch[m // 2] = ch[m - 1]
                    m = (m + 1) // 2
            else:
                for j in range(1, lanes):
                    ch[0], ok = _add_round(ch[0], ch[j], 0.0, 1, stage_P, stage_Psr, stage_U,
                                           stage_D, prec, wrap_lim, e, tmp, counts)
                    if not ok:
                        return 0.0, False
            v = ch[0]
        if last:
            v, ok = _add_round(s, v, 0.0, 1, stage_P, stage_Psr, stage_U, stage_D, prec,
                               wrap_lim, e, tmp, counts)
            if not ok:
                return 0.0, False
        s = v
    if not has_out:
        return s, True
    if not abs(s) < np.inf:
        v, fl = quantize_value(s, stage_P[2], stage_U[2], stage_D[2], np.uint64(oidx))
    else:
        if not _check(s, 0.0, prec[2], wrap_lim[2]):
            return 0.0, False
        v, fl, amb = round_exact(s, 0.0, np.bool_(False), stage_P[2], stage_Psr[2],
                                 stage_U[2], stage_D[2], np.uint64(oidx))
    _count(counts, 2, fl)
    return v, True


@jit_parallel
def gemm_lanes(A, BT, C, out, base, prod_exact, stage_P, stage_Psr, stage_U, stage_D, prec,
               wrap_lim, has_prod, has_out, block, lanes, descending, tree, last):
    """``out[r, j]`` = :func:`lanes_element` of row ``A[r]`` and row ``BT[j]`` (B transposed),
    the running sum starting at ``C[r, j]``; ``base`` the flat index of ``out[0, 0]`` (draw
    indices). Parallel over rows. Returns per-row counts
    (rows x stages x flags) and the mask of elements left to the caller."""
    R, K = A.shape
    N = BT.shape[0]
    counts = np.zeros((R, N_STAGES, N_FLAGS), np.int64)
    slow = np.zeros((R, N), np.uint8)
    for r in prange(R):
        e = np.empty(_CAP + 48)
        tmp = np.empty(_CAP + 48)
        ch = np.empty(max(lanes, 1))
        c = np.zeros((N_STAGES, N_FLAGS), np.int64)
        ar = A[r]
        for j in range(N):
            c[:, :] = 0
            v, ok = lanes_element(ar, BT[j], C[r, j], base + r * N + j, prod_exact, stage_P,
                                  stage_Psr, stage_U, stage_D, prec, wrap_lim, has_prod,
                                  has_out, block, lanes, descending, tree, last, e, tmp, ch, c)
            if ok:
                out[r, j] = v
                counts[r] += c
            else:
                slow[r, j] = 1
    return counts, slow
