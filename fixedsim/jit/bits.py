"""Scalar bit casts between float32 and uint32.

These reinterpret one scalar (an LLVM bitcast); they take no array view. Array views are taken
by the callers of the parallel kernels and passed in (the Numba 0.68 hazard: an ``arr.view``
inside a ``parallel=True`` function gave wrong results).
"""

import numpy as np

from .options import jit_inline


@jit_inline
def f32_bits(v):
    """The uint32 bit pattern of float32 ``v``."""
    return np.float32(v).view(np.uint32)


@jit_inline
def f32_from_bits(b):
    """The float32 whose bit pattern is ``b``."""
    return np.uint32(b).view(np.float32)


@jit_inline
def round_to_odd_f32(x):
    """float64 ``x`` rounded to odd at float32 precision, as float32 bits (int64).

    Round to nearest, then, if that was inexact and landed on an even pattern, step one ulp
    toward ``x``. Beyond float32's range this gives +-max (odd), below it the smallest
    subnormal: rounding the result again to at least two fewer bits (and an exponent range
    within float32's) is then the correct rounding of ``x``.
    """
    r = np.float32(x)
    b = np.int64(f32_bits(r))
    back = np.float64(r)
    if back != x and x == x and abs(x) != np.inf and (b & 1) == 0:
        b = b + 1 if abs(x) > abs(back) else b - 1
    return b


@jit_inline
def f64_bits(v):
    """The bit pattern of float64 ``v`` as int64 (negative values have the sign bit set)."""
    return np.float64(v).view(np.int64)


@jit_inline
def f64_from_bits(b):
    """The float64 whose bit pattern is the int64 ``b``."""
    return np.int64(b).view(np.float64)
