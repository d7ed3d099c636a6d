"""Scalar bit casts between floats and integers, and the fused multiply-add.

These reinterpret one scalar (an LLVM bitcast); they take no array view. Array views are taken
by the callers of the parallel kernels and passed in (the Numba 0.68 hazard: an ``arr.view``
inside a ``parallel=True`` function gave wrong results).
"""

import numpy as np
from numba import types
from numba.core.extending import intrinsic

from .options import jit_inline


@intrinsic
def fma(typingctx, a, b, c):
    """``a * b + c`` with one rounding (to nearest even), in float32 or float64 (all three
    arguments of one type): LLVM's ``llvm.fma``, the FMA instruction where the CPU has one,
    else a correctly rounded library ``fmaf``/``fma`` (never a separate multiply and add).
    An intrinsic builds IR at compile time: it is not a kernel, and the shared options apply
    to the kernels that call it."""
    if a not in (types.float32, types.float64) or (b, c) != (a, a):
        return None

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


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


_MAGIC = 0x4330000000000000  # the bits of 2.0**52
_TWO52 = 2.0**52


@jit_inline
def small_f64(n):
    """``float64(n)``, exactly, for an int64 ``0 <= n <= 2**52``: the float64 whose bits are
    those of ``2**52`` plus ``n`` (``2**52 + n``) less ``2**52``. Written so because AVX2 has
    no instruction that converts 64-bit integers: ``np.float64(n)`` leaves a loop scalar there."""
    return f64_from_bits(n + _MAGIC) - _TWO52


@jit_inline
def small_int(x):
    """``int64(x)``, exactly, for an integer-valued float64 ``0 <= x < 2**52``: the bits of
    ``x + 2**52`` less those of ``2**52`` (the inverse of :func:`small_f64`; AVX2 has no
    instruction that converts a float64 to a 64-bit integer either)."""
    return f64_bits(x + _TWO52) - _MAGIC


@jit_inline
def small_log2(n):
    """``floor(log2(n))`` for an int64 ``1 <= n <= 2**52``, exactly (the exponent field of
    :func:`small_f64`): ``-1023`` for ``n == 0``."""
    return (f64_bits(small_f64(n)) >> 52) - 1023
