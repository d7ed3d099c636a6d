"""Row loops shared by the chain kernels: four rows per pass over the outputs, and the
recomputation of the elements or rows a lean pass left to a counting one."""


import numpy as np

from .options import jit_inline
from .quant import (
    F_INEXACT,
)

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
