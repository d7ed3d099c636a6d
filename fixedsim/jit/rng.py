"""Counter-based random bits: the draw for element ``i`` is a pure function of ``(key, i)``.

The generator is SplitMix64 evaluated at stream position ``i``: ``z = key + (i + 1) * GAMMA``
followed by the SplitMix64 finaliser. Nothing is carried from one element to the next, so a
kernel that splits its index range across threads draws exactly the same bits at any thread
count.
"""

import numpy as np

from .options import jit, jit_inline

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_ONE = np.uint64(1)


@jit_inline
def mix64(z):
    """The SplitMix64 finaliser of the stream state ``z = key + (i + 1) * GAMMA`` (uint64).

    A kernel that draws for ``i, i + d, i + 2d, ...`` can step ``z`` by ``d * GAMMA`` (wrapping)
    instead of multiplying each index again."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@jit_inline
def random_u64(key, i):
    """64 random bits for element ``i`` under ``key`` (both uint64)."""
    return mix64(key + (i + _ONE) * GAMMA)


@jit
def random_u64_array(key, start, n):
    """The draws for elements ``start .. start + n - 1`` (for tests and users' own kernels)."""
    out = np.empty(n, np.uint64)
    k = np.uint64(key)
    s = np.uint64(start)
    for j in range(n):
        out[j] = random_u64(k, s + np.uint64(j))
    return out
