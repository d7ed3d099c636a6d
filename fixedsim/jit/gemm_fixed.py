"""Fixed-point accumulators: FMA chains on integer codes held in float64 (round, saturate or
wrap per step)."""


import numpy as np
from numba import prange

from .options import jit_inline, jit_parallel
from .quant import (
    F_INEXACT,
    F_OVERFLOW,
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
from .rng import random_u64


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
