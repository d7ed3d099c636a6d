"""The exact float64 sum of an array and a broadcast one, with its exactness checked: the bias
addition and the weight update of training (:meth:`fixedsim.nn.Context.add_into`), in one
pass instead of numpy's temporaries."""

import numpy as np
from numba import prange

from .options import jit_parallel


@jit_parallel
def add_checked(a, b, s):
    """``s[p, c, q] = a[p, c, q] + b[c]`` in float64 (``a`` float32 or float64, shape ``(P, C,
    Q)``; ``b`` float64, shape ``(C,)``), and the counts ``(bad, zeros)``: ``bad`` the sums
    that are not finite or not exact (TwoSum's error is nonzero: the float64 sum rounded),
    ``zeros`` the sums equal to zero. Parallel over ``p`` (independent outputs; the counts
    are summed after, in order)."""
    P, C, Q = a.shape
    bad = np.zeros(P, np.int64)
    zeros = np.zeros(P, np.int64)
    for p in prange(P):
        nb = 0
        nz = 0
        for c in range(C):
            bc = b[c]
            ar = a[p, c]
            sr = s[p, c]
            for q in range(Q):
                x = np.float64(ar[q])
                t = x + bc
                bb = t - x
                err = (x - (t - bb)) + (bc - bb)
                nb += np.int64(not (abs(t) < np.inf and err == 0.0))
                nz += np.int64(t == 0.0)
                sr[q] = t
        bad[p] = nb
        zeros[p] = nz
    return bad.sum(), zeros.sum()
