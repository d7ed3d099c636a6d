"""Kernels of Adaptive Deep Reuse: locality-sensitive hash codes of sub-vectors, per-cluster
sums of rows, and the gather of per-cluster results back to their members.

Every kernel sums in a fixed order (row by row, column by column), so its results are the same
bit for bit whatever the thread count.
"""

import numpy as np
from numba import prange

from .options import jit, jit_parallel


@jit_parallel
def lsh_codes(X, k0, P, codes):
    """``codes[r] = sum over h of (X[r, k0:k0+L] . P[:, h] > 0) << h`` (``P`` of shape (L, H)).

    Each dot product is summed in float64 in column order; a zero, a negative or a NaN
    projection gives bit 0. Parallel over blocks of rows.
    """
    R = X.shape[0]
    L, H = P.shape
    nchunks = (R + 255) // 256
    for ch in prange(nchunks):
        acc = np.empty(H)
        for r in range(ch * 256, min(R, ch * 256 + 256)):
            acc[:] = 0.0
            for k in range(L):
                x = X[r, k0 + k]
                for h in range(H):
                    acc[h] += x * P[k, h]
            code = 0
            for h in range(H):
                if acc[h] > 0.0:
                    code |= 1 << h
            codes[r] = code


@jit
def cluster_sums(X, k0, ids, sums):
    """``sums[c] += X[r, k0:k0+L]`` for every row ``r`` with ``ids[r] == c``, in row order
    (``L = sums.shape[1]``; ``sums`` zero on entry gives the members' sums)."""
    L = sums.shape[1]
    for r in range(X.shape[0]):
        dst = sums[ids[r]]
        for k in range(L):
            dst[k] += X[r, k0 + k]


@jit_parallel
def gather_add(P, ids, out):
    """``out[r] += P[ids[r]]`` for every row (parallel over rows)."""
    for r in prange(out.shape[0]):
        src = P[ids[r]]
        dst = out[r]
        for j in range(dst.shape[0]):
            dst[j] += src[j]


@jit
def first_ids(keys, ids):
    """Number the distinct ``keys`` by first occurrence: ``ids[r]`` is the number of distinct
    keys seen before the first row holding ``keys[r]``. Returns the number of distinct keys.

    An open-addressing hash table of at least twice the rows; O(rows).
    """
    R = keys.shape[0]
    size = 16
    while size < 2 * R:
        size *= 2
    mask = size - 1
    slot_key = np.empty(size, np.int64)
    slot_id = np.full(size, -1, np.int64)
    n = 0
    for r in range(R):
        k = keys[r]
        h = (k * 0x9E3779B97F4A7C15) & mask  # Fibonacci hashing (wraps in int64)
        while slot_id[h] >= 0 and slot_key[h] != k:
            h = (h + 1) & mask
        if slot_id[h] < 0:
            slot_key[h] = k
            slot_id[h] = n
            n += 1
        ids[r] = slot_id[h]
    return n
