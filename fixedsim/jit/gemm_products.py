"""Matrix-product kernel whose products are rounded (``spec.product`` set), any accumulator.

:func:`gemm_rounded_products` computes, for each output element, the products ``p = A[r, k] *
B[k, j]`` in float64 (the caller proves them exact), rounds each into the product format, and
accumulates the rounded products as :func:`fixedsim.reference.dot` says: exactly, into a float
accumulator or into a fixed-point accumulator, block by block. Each row is a loop over ``k`` in
order whose steps are vectorised over the outputs ``j``; rows run in parallel (``prange`` over
independent rows, each with its own buffers and counters).

A step has two phases, each a loop over the row's outputs: the products of one ``k`` are
rounded into a buffer (one of four roundings, chosen per call: :func:`round_float_rne`,
:func:`round_fixed_rne`, :func:`round_float_sr`, or :func:`round_bits` for every format and
mode), then added into the block sum, and at the end of a block the block sum is added to the
running sum and rounded (:func:`acc_f32_rne`, :func:`acc_float_rne`, :func:`round_bits`,
:func:`fixed_add` or :func:`fixed_step`). Each loop is written once with its counters and
once without (nobody asked for the per-step events), and the most common ones once more
without the checks the caller proved unneeded (``I_SAFE``).

A value the kernel cannot prove (a product or sum that overflows to infinity, a float64 sum that
is not exact) turns NaN, which every later step keeps; the kernel marks the element in ``bad``
and leaves its value and counts to the caller (the general kernel recomputes it).

Parameters arrive as two tuples per stage (built by :mod:`fixedsim.matmul.products`): int64
fields ``I_*`` and float64 fields ``X_*``. Stochastic draws are computed per step into a buffer
of the row's outputs from the counter-based stream state ``key + (i + 1) * GAMMA`` of draw index
``i`` (product ``o * K + k``, accumulator block ``o * nblocks + t``), stepped by ``GAMMA``.

Event counters are packed per element, two int64 per stage: ``inexact + (overflow << 32)`` and
``underflow + (subnormal << 32)`` (each count per element is at most ``K < 2**31``).
"""

import numpy as np
from numba import prange

from .arith import two_sum
from .bits import f64_bits, f64_from_bits
from .options import jit, jit_inline, jit_parallel
from .quant import (
    F_INEXACT,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    N_FLAGS,
    ODD,
    RNA,
    RNE,
    RTZ,
    RUP,
    SR,
)
from .rng import GAMMA, mix64

# int64 fields of a stage's parameters
(I_KIND, I_MODE, I_SH0, I_LIM, I_QBITS, I_MAXPOS, I_MAXNEG, I_SATPOS, I_SATNEG, I_MINNORM,
 I_FTZ, I_FIXED, I_RBITS, I_OFF, I_DBITS, I_WRAP, I_DN, I_SAFE) = range(18)
N_I = 18
# float64 fields
X_UNIT, X_SCALE, X_INV, X_QMIN, X_QMAX, X_SPAN = range(6)
N_X = 6
# product roundings
P_FLOAT_RNE, P_FIXED_RNE, P_FLOAT_SR, P_BITS = range(4)
# accumulators
A_EXACT, A_F32_RNE, A_FLOAT_RNE, A_BITS, A_FIXED, A_FIXED_EXACT = range(6)

_SIGN64 = np.int64(-0x7FFFFFFFFFFFFFFF - 1)
_MAG64 = np.int64(0x7FFFFFFFFFFFFFFF)
_EXP64 = np.int64(0x7FF0000000000000)
_FRAC64 = np.int64(0xFFFFFFFFFFFFF)
_NAN64 = np.int64(0x7FF8000000000000)
_LO32 = np.int64(0xFFFFFFFF)
_I0 = np.int64(0)
_I1 = np.int64(1)
_U0 = np.uint64(0)
_U1 = np.uint64(1)
#: ``2.0**r`` for r = 0..64 (the random bits of a stochastic rounding)
X_TWO64 = np.ldexp(1.0, np.arange(65))


@jit_inline
def round_bits(x, draw, I, mode, fixed, ftz):
    """Float64 ``x`` (an exact value) rounded once into a float or fixed-point format, any mode.

    The magnitude's bit pattern is cut at the format's quantum at ``x``: ``sh`` low bits of
    the 53-bit significand ``M`` are dropped, ``sh = sh0 + max(lim - ef, 0)`` (``ef``: the
    biased float64 exponent of ``x``). A float format has ``sh0 = 52 - man_bits`` and ``lim``
    the biased exponent of its smallest normal (``lim = 0`` without subnormals: rounded at full
    precision, then flushed below the smallest normal, ``ftz``); a fixed-point format with
    ``frac_length`` F has ``sh0 = 0``, ``lim = 1075 - F``: the quantum ``2**-F`` everywhere.
    The dropped bits ``rem`` (against half the quantum) and the last kept bit decide whether
    the magnitude goes up, as :func:`fixedsim.jit.quant._round_shift` decides (DOWN and UP by
    the sign). STOCHASTIC takes the magnitude up when ``draw`` (the top ``rbits`` bits of the
    draw) is below ``floor(rem / 2**sh * 2**rbits)`` (sign-magnitude floats); fixed point
    (``fixed``) rounds the value: a negative value's magnitude goes up when ``draw >= 2**rbits
    - ceil(rem / 2**sh * 2**rbits)`` (:func:`fixedsim.jit.quant.sr_limit`). A significand
    entirely below the quantum (``sh > 52``) gives zero or one quantum (``qbits``). The result
    is ranged against ``maxpos``/``maxneg`` (magnitude bits of the largest value of each sign):
    beyond it, a format whose overflow rule gives that largest value for this sign and mode
    (``satpos``/``satneg``) takes it, any other (an infinity) gives NaN, the caller's
    fallback. A fixed-point zero is ``+0``; a float zero keeps the sign of ``x``. A non-finite
    ``x`` gives NaN.

    ``mode``, ``fixed`` and ``ftz`` are arguments (a caller passing constants gets the
    other cases compiled out). Returns the value and the packed counters ``inexact +
    (overflow << 32)``, ``underflow + (subnormal << 32)`` (``minnorm``: bits of the smallest
    normal, 0 for fixed point).
    """
    rbits = I[I_RBITS]
    b = f64_bits(x)
    a = b & _MAG64
    s = b ^ a
    neg = s != 0
    ef = a >> 52
    M = (a & _FRAC64) | ((_I1 << 52) if ef != 0 else _I0)
    efc = ef if ef > 1 else _I1
    lim = I[I_LIM]
    sh = I[I_SH0] + (lim - efc if lim > efc else _I0)
    shc = sh if sh < 54 else np.int64(54)
    half = _I1 << shc  # twice the weight of the highest dropped bit
    rem = M & (half - 1)
    lsb = (M >> shc) & 1
    nz = rem != 0
    if mode == SR:
        # floor and ceil of rem / 2**sh * 2**rbits (rem < 2**54; a right shift of 63 clears
        # it as any larger one would)
        left = rbits - sh if rbits > sh else _I0
        right = sh - rbits if sh > rbits else _I0
        right = right if right < 63 else np.int64(63)
        u = np.uint64(rem) << np.uint64(left)
        t = u >> np.uint64(right)
        c = t + (_U1 if (u & ((_U1 << np.uint64(right)) - _U1)) != _U0 else _U0)
        full = (_U1 << np.uint64(rbits)) if rbits < 64 else _U0  # 2**rbits, wrapping at 64
        up = (nz and draw >= full - c) if (fixed and neg) else draw < t
    elif mode == RNE:
        up = 2 * rem + lsb > half
    elif mode == RNA:
        up = 2 * rem >= half
    elif mode == RTZ:
        up = False
    elif mode == RUP:
        up = nz and not neg
    elif mode == ODD:
        up = nz and lsb == 0
    else:  # DOWN
        up = nz and neg
    res = (a & ~(half - 1)) + ((_I1 << shc) if up else _I0)
    if shc > 52:  # the whole significand lies below the quantum
        res = I[I_QBITS] if up else _I0
    minnorm = I[I_MINNORM]
    if ftz and res < minnorm:  # flush to zero (tininess after rounding)
        res = _I0
    mx = I[I_MAXNEG] if neg else I[I_MAXPOS]
    over = res > mx
    sat = (I[I_SATNEG] if neg else I[I_SATPOS]) != 0
    if over:
        res = mx
    bad = (over and not sat) or a >= _EXP64
    inexact = res != a
    under = res == 0 and a != 0
    sub = res != 0 and res < minnorm
    out = res if (fixed and res == 0) else res | s
    out = _NAN64 if bad else out
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    f2 = (_I1 if under else _I0) + ((_I1 << 32) if sub else _I0)
    return f64_from_bits(out), f1, f2


@jit_inline
def round_float_rne(p, I):
    """``p`` (an exact float64) rounded to nearest even into a float format with subnormals:
    ``M = 1.5 * 2**(52 - man_bits) * max(2**e, min_normal)`` (``e``: the binade of ``p``; its
    bits are ``max(h, minnorm) + off``, integer operations) has the float64 quantum
    ``2**(e - man_bits)``, the format's quantum at ``p`` (its smallest subnormal below the
    normal range), and ``|p| < 2**(e + 1)`` is far below ``M``, so ``(p + M) - M`` is ``p``
    rounded into the format to nearest even, computed exactly (float64 addition rounds ``p +
    M`` once, to nearest even, at that quantum). The result takes ``p``'s sign (an underflow
    to zero keeps it). Beyond the largest value: the largest value when the format saturates
    (``satpos``), else NaN (an infinity: the caller's fallback); NaN in, NaN out. Returns the
    value and packed counters as :func:`round_bits`."""
    pb = f64_bits(p)
    h = pb & _EXP64
    minnorm = I[I_MINNORM]
    M = f64_from_bits((h if h > minnorm else minnorm) + I[I_OFF])
    qb = f64_bits((p + M) - M)
    qa = qb & _MAG64
    mx = I[I_MAXPOS]
    over = qa > mx and qa < _EXP64  # (not NaN)
    if over:
        qa = mx
    bad = qa >= _EXP64 or (over and I[I_SATPOS] == 0)
    q = f64_from_bits(_NAN64 if bad else qa | (pb & _SIGN64))
    inexact = q != p
    under = qa == 0 and p != 0.0
    sub = qa != 0 and qa < minnorm
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    f2 = (_I1 if under else _I0) + ((_I1 << 32) if sub else _I0)
    return q, f1, f2


@jit_inline
def round_float_rne_safe(p, I):
    """:func:`round_float_rne` where the caller proved that no product can exceed the
    format's largest value (``|p| < 2**top <= max``: a rounding reaches ``2**top`` at most)
    and that ``M`` is finite: the rounding alone, uncounted."""
    pb = f64_bits(p)
    h = pb & _EXP64
    minnorm = I[I_MINNORM]
    M = f64_from_bits((h if h > minnorm else minnorm) + I[I_OFF])
    return f64_from_bits(f64_bits((p + M) - M) | (pb & _SIGN64))


@jit_inline
def _sr_magnitude(a, draw, I):
    """The bits of the magnitude ``a`` (bits) rounded stochastically, for
    :func:`round_float_sr`."""
    h = a & _EXP64
    minnorm = I[I_MINNORM]
    qb = (h if h > minnorm else minnorm) - ((52 - I[I_SH0]) << 52)  # 52 - sh0 = man_bits
    y = f64_from_bits(a) * f64_from_bits((np.int64(2046) << 52) - qb)
    fl = np.floor(y)
    t = np.uint64((y - fl) * X_TWO64[I[I_RBITS]])
    return f64_bits((fl + (1.0 if draw < t else 0.0)) * f64_from_bits(qb))


@jit_inline
def round_float_sr_safe(p, draw, I):
    """:func:`round_float_sr` where the caller proved that no product can exceed the
    format's largest value (as for :func:`round_float_rne_safe`): the rounding alone,
    uncounted."""
    pb = f64_bits(p)
    return f64_from_bits(_sr_magnitude(pb & _MAG64, draw, I) | (pb & _SIGN64))


@jit_inline
def round_float_sr(p, draw, I):
    """``p`` (an exact float64) rounded stochastically into a float format with subnormals
    whose smallest subnormal is a normal float64: ``Q`` is the format's quantum at ``p``
    (``2**(e - man_bits)``, ``e`` the binade of ``p``, or the smallest subnormal below the
    normal range; its bits are ``max(h, minnorm) - (man_bits << 52)``, and those of ``1/Q``
    ``(2046 << 52) - bits(Q)``), ``y = |p| / Q`` (exact: a power-of-two scaling, below
    ``2**(man_bits + 1)``), its floor and fraction (exact), and the magnitude goes up one
    quantum when the draw is below ``floor(fraction * 2**rbits)`` (the float64 product by
    ``2**rbits`` is exact, and its conversion to uint64 truncates), as
    :func:`fixedsim.jit.quant._round_shift` decides for sign-magnitude formats. Overflow as
    :func:`round_float_rne`. Returns the value and packed counters as :func:`round_bits`."""
    pb = f64_bits(p)
    a = pb & _MAG64
    res = _sr_magnitude(a, draw, I)
    mx = I[I_MAXPOS]
    over = res > mx
    if over:
        res = mx
    bad = (over and I[I_SATPOS] == 0) or a >= _EXP64
    q = f64_from_bits(_NAN64 if bad else res | (pb & _SIGN64))
    inexact = res != a
    under = res == 0 and a != 0
    sub = res != 0 and res < I[I_MINNORM]
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    f2 = (_I1 if under else _I0) + ((_I1 << 32) if sub else _I0)
    return q, f1, f2


@jit_inline
def round_fixed_rne(p, X):
    """``p`` (an exact float64) rounded to nearest even into a saturating fixed-point format:
    ``x = p * 2**F`` is exact (a power-of-two scaling; the caller checks the range), ``rint``
    rounds it to the nearest integer code, ties to even, which is clamped to ``[qmin, qmax]``
    and scaled back exactly; ``+ 0.0`` makes a zero ``+0``. Returns the value and packed
    counters as :func:`round_bits`."""
    x = p * X[X_SCALE]
    c = np.rint(x)
    over = c > X[X_QMAX] or c < X[X_QMIN]
    c = min(max(c, X[X_QMIN]), X[X_QMAX])
    q = c * X[X_INV] + 0.0
    inexact = q != p
    under = q == 0.0 and p != 0.0
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    return q, f1, (_I1 if under else _I0)


@jit_inline
def add_signed(a, b, dn):
    """TwoSum ``a + b = s + e``, with the sign of an exact zero sum as IEEE 754 gives it
    rounding DOWN when ``dn`` (``-0`` unless both terms are ``+0``); else float64's sign to
    nearest (``-0`` only if both are ``-0``). Adding many terms pairwise this way, in any
    grouping, gives the model's sign of an exact zero sum (:func:`fixedsim.reference.exact_sum`):
    ``-0`` when every term is ``-0``, or, rounding DOWN, when some term is nonzero or ``-0``."""
    s, e = two_sum(a, b)
    if dn and s == 0.0 and (f64_bits(a) | f64_bits(b)) != 0:
        s = -0.0
    return s, e


@jit_inline
def acc_float_rne(a, bs, I):
    """The running sum ``a`` plus the block sum ``bs`` rounded to nearest even into a float
    format with subnormals: TwoSum proves the float64 sum exact (else NaN), then
    :func:`round_float_rne` rounds it."""
    t, e = two_sum(a, bs)
    return round_float_rne(t if e == 0.0 else np.nan, I)


@jit_inline
def fixed_step(S, v, draw, X, I):
    """One accumulator step on integer codes held in float64: ``T = S * scale + v * unit``
    (``v`` a block sum, a multiple of ``2**-G``, ``unit = 2**G``; exact: the caller bounds
    ``T`` below 2**52), ``T / scale`` rounded to an integer per ``mode`` (value
    based: two's complement), then saturated or wrapped into ``[qmin, qmax]`` (``span =
    2**word_length``). Stochastic: up when ``draw`` is below ``floor(frac * 2**rbits)``,
    ``frac`` the fraction above the floor (as :func:`fixedsim.jit.gemm_fixed.gemm_chain_fixed`
    rounds). Returns the code and packed counters ``inexact + (overflow << 32)``,
    ``underflow``."""
    scale = X[X_SCALE]
    qmin = X[X_QMIN]
    qmax = X[X_QMAX]
    mode = I[I_MODE]
    T = S * scale + v * X[X_UNIT]
    x = T * X[X_INV]
    fl = np.floor(x)
    frac = T - fl * scale  # an integer in [0, scale)
    twice = frac + frac
    odd = fl - 2.0 * np.floor(fl * 0.5) != 0.0
    nz = frac != 0.0
    if mode == SR:
        rbits = I[I_RBITS]
        dbits = I[I_DBITS]
        left = rbits - dbits if rbits > dbits else _I0
        right = dbits - rbits if dbits > rbits else _I0
        up = draw < (np.uint64(frac) << np.uint64(left)) >> np.uint64(right)
    elif mode == RNE:
        up = twice > scale or (twice == scale and odd)
    elif mode == RNA:
        up = twice > scale or (twice == scale and T > 0.0)
    elif mode == RTZ:
        up = nz and T < 0.0
    elif mode == RUP:
        up = nz
    elif mode == ODD:
        up = nz and not odd
    else:  # DOWN
        up = False
    q = fl + (1.0 if up else 0.0)
    over = q > qmax or q < qmin
    if I[I_WRAP] != 0:
        span = X[X_SPAN]
        q = q - span * np.floor((q - qmin) / span)
    else:
        q = min(max(q, qmin), qmax)
    inexact = q != x
    under = q == 0.0 and T != 0.0
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    return q, f1, (_I1 if under else _I0)



@jit_inline
def fixed_add(S, v, X, I):
    """:func:`fixed_step` when the accumulator's quantum divides every block sum's (``scale
    = 1``): ``T = S + v * unit`` is already a code, nothing rounds; it is saturated or
    wrapped. Returns the code and packed counters as :func:`fixed_step`."""
    qmin = X[X_QMIN]
    qmax = X[X_QMAX]
    T = S + v * X[X_UNIT]
    over = T > qmax or T < qmin
    if I[I_WRAP] != 0:
        span = X[X_SPAN]
        q = T - span * np.floor((T - qmin) / span)
    else:
        q = min(max(T, qmin), qmax)
    inexact = q != T
    under = q == 0.0 and T != 0.0
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    return q, f1, (_I1 if under else _I0)



@jit_inline
def acc_f32_rne(a, bs):
    """The running sum ``a`` plus the block sum ``bs`` rounded into FP32 (nearest even, IEEE
    overflow): TwoSum proves the float64 sum exact (else NaN), and the float32 conversion
    rounds an exact float64 once, to nearest even, subnormals included; an overflow (an
    infinity: the caller's fallback) gives NaN. Returns the value and packed counters as
    :func:`round_bits`."""
    t, e = two_sum(a, bs)
    t = t if e == 0.0 else np.nan
    v = np.float64(np.float32(t))
    va = abs(v)
    over = va == np.inf
    inexact = v != t
    under = v == 0.0 and t != 0.0
    sub = v != 0.0 and va < 1.1754943508222875e-38
    f1 = (_I1 if inexact else _I0) + ((_I1 << 32) if over else _I0)
    f2 = (_I1 if under else _I0) + ((_I1 << 32) if sub else _I0)
    return (np.nan if over else v), f1, f2


@jit
def draws_row(d, z0, step, shift):
    """``d[j]``: the top bits (``>> shift``) of the draw whose stream state is ``z0[j] +
    step``."""
    for j in range(d.size):
        d[j] = mix64(z0[j] + step) >> shift


@jit
def states_row(z, key, o0, per):
    """Stream states of draw index ``(o0 + j) * per`` (the first draw of output ``o0 + j``)."""
    for j in range(z.size):
        z[j] = key + (np.uint64(o0 + j) * np.uint64(per) + _U1) * GAMMA


@jit
def products_row(x, bk, q, dp, c1, c2, PI, PX, count):
    """``q[j]``: the product ``x * bk[j]`` rounded by the product stage (``PI[I_KIND]``),
    its events added to ``c1[j]``, ``c2[j]`` when ``count``. Stochastic: ``dp[j]`` is the
    draw (its top ``rbits`` bits)."""
    kind = PI[I_KIND]
    n = q.size
    if kind == P_FLOAT_RNE:
        if count:
            for j in range(n):
                v, f1, f2 = round_float_rne(x * bk[j], PI)
                q[j] = v
                c1[j] += f1
                c2[j] += f2
        elif PI[I_SAFE] != 0:
            for j in range(n):
                q[j] = round_float_rne_safe(x * bk[j], PI)
        else:
            for j in range(n):
                q[j] = round_float_rne(x * bk[j], PI)[0]
    elif kind == P_FIXED_RNE:
        if count:
            for j in range(n):
                v, f1, f2 = round_fixed_rne(x * bk[j], PX)
                q[j] = v
                c1[j] += f1
                c2[j] += f2
        else:
            for j in range(n):
                q[j] = round_fixed_rne(x * bk[j], PX)[0]
    elif kind == P_FLOAT_SR:
        if count:
            for j in range(n):
                v, f1, f2 = round_float_sr(x * bk[j], dp[j], PI)
                q[j] = v
                c1[j] += f1
                c2[j] += f2
        elif PI[I_SAFE] != 0:
            for j in range(n):
                q[j] = round_float_sr_safe(x * bk[j], dp[j], PI)
        else:
            for j in range(n):
                q[j] = round_float_sr(x * bk[j], dp[j], PI)[0]
    else:
        mode = PI[I_MODE]
        fixed = PI[I_FIXED] != 0
        ftz = PI[I_FTZ] != 0
        for j in range(n):
            v, f1, f2 = round_bits(x * bk[j], dp[j], PI, mode, fixed, ftz)
            q[j] = v
            c1[j] += f1
            c2[j] += f2


@jit
def sum_row(bs, q, dn, plain):
    """``bs[j] += q[j]``: exactly in float64 (TwoSum; NaN when inexact), with the model's
    sign of a zero sum (:func:`add_signed`); ``plain``: a plain addition, when the caller
    proved every sum exact (every rounded product a multiple of ``2**L`` and every partial
    sum below ``2**(L + 53)``; not rounding DOWN), which then has the model's zero sign."""
    if plain:
        for j in range(bs.size):
            bs[j] += q[j]
    elif dn:
        for j in range(bs.size):
            v, e = add_signed(bs[j], q[j], True)
            bs[j] = v if e == 0.0 else np.nan
    else:
        for j in range(bs.size):
            v, e = two_sum(bs[j], q[j])
            bs[j] = v if e == 0.0 else np.nan


@jit
def acc_row(acc, bs, da, c1, c2, AI, AX, count):
    """``acc[j]``: the running sum plus the block sum ``bs[j]``, rounded by the accumulator
    (``AI[I_KIND]``), its events added to ``c1[j]``, ``c2[j]`` when ``count``. A NaN stays
    NaN."""
    kind = AI[I_KIND]
    n = acc.size
    safe = AI[I_SAFE] != 0
    if kind == A_F32_RNE:
        if count:
            for j in range(n):
                v, f1, f2 = acc_f32_rne(acc[j], bs[j])
                acc[j] = v
                c1[j] += f1
                c2[j] += f2
        elif safe:  # the sum is exact (proved by the caller): its float32 rounding
            for j in range(n):
                v = np.float64(np.float32(acc[j] + bs[j]))
                acc[j] = v if abs(v) != np.inf else np.nan
        else:
            for j in range(n):
                acc[j] = acc_f32_rne(acc[j], bs[j])[0]
    elif kind == A_FLOAT_RNE:
        if count:
            for j in range(n):
                v, f1, f2 = acc_float_rne(acc[j], bs[j], AI)
                acc[j] = v
                c1[j] += f1
                c2[j] += f2
        elif safe:  # the sum is exact (proved by the caller): its rounding
            for j in range(n):
                acc[j] = round_float_rne(acc[j] + bs[j], AI)[0]
        else:
            for j in range(n):
                acc[j] = acc_float_rne(acc[j], bs[j], AI)[0]
    elif kind == A_BITS:
        mode = AI[I_MODE]
        dn = AI[I_DN] != 0
        ftz = AI[I_FTZ] != 0
        for j in range(n):
            t, e = add_signed(acc[j], bs[j], dn)
            v, f1, f2 = round_bits(t if e == 0.0 else np.nan, da[j], AI, mode, False, ftz)
            acc[j] = v
            c1[j] += f1
            c2[j] += f2
    elif kind == A_FIXED_EXACT:  # a NaN (a product beyond the range) marks the element
        if count:
            for j in range(n):
                v, f1, f2 = fixed_add(acc[j], bs[j], AX, AI)
                acc[j] = v if bs[j] == bs[j] and acc[j] == acc[j] else np.nan
                c1[j] += f1
                c2[j] += f2
        else:
            for j in range(n):
                v = fixed_add(acc[j], bs[j], AX, AI)[0]
                acc[j] = v if bs[j] == bs[j] and acc[j] == acc[j] else np.nan
    else:
        for j in range(n):
            v, f1, f2 = fixed_step(acc[j], bs[j], da[j], AX, AI)
            acc[j] = v if bs[j] == bs[j] and acc[j] == acc[j] else np.nan
            c1[j] += f1
            c2[j] += f2


@jit
def _unpack(crow, c1, c2, keep):
    """Add the packed counters of the kept elements to ``crow`` (flags)."""
    for j in range(c1.size):
        if keep[j]:
            crow[F_INEXACT] += c1[j] & _LO32
            crow[F_OVERFLOW] += c1[j] >> 32
            crow[F_UNDERFLOW] += c2[j] & _LO32
            crow[F_SUBNORMAL] += c2[j] >> 32


@jit_parallel
def gemm_rounded_products(A, B, out, bad, base, block, PI, PX, AI, AX, pkey, akey, count):
    """Rounded products, accumulated: ``out[r, j]`` and per-row counts (rows x 2 stages
    (product, accumulator) x flags) of the elements not marked in ``bad``.

    Each product ``A[r, k] * B[k, j]`` (exact in float64) is rounded by the product stage
    (:func:`products_row`; stochastic draw index ``o * K + k``, ``o = base + r*N + j``). Each
    block of ``block`` consecutive rounded products is summed (:func:`sum_row`), then added to
    the running sum and rounded (:func:`acc_row`; stochastic draw index ``o * nblocks + t``).
    ``A_EXACT``: one block of all ``K`` products summed from ``+0``, the exact sum itself
    (the caller rounds it into the output); ``A_FIXED``/``A_FIXED_EXACT``: codes in ``out``.
    ``count`` false (nobody asked for the per-step events): nothing is counted, and the
    stages whose ``I_SAFE`` is set (the caller proved no product overflow, or every sum
    exact) leave those checks out.
    """
    R, K = A.shape
    N = B.shape[1]
    akind = AI[I_KIND]
    exact = akind == A_EXACT
    fixed = akind == A_FIXED or akind == A_FIXED_EXACT
    if exact:
        block = max(K, 1)
    nb = (K + block - 1) // block
    counts = np.zeros((R, 2, N_FLAGS), np.int64)
    psr = PI[I_MODE] == SR
    asr = not exact and AI[I_MODE] == SR
    pshift = np.uint64(64 - PI[I_RBITS])
    ashift = np.uint64(64 - AI[I_RBITS])
    dn = AI[I_DN] != 0
    plain = fixed or (AI[I_SAFE] != 0 and not dn)  # block sums proved exact
    for r in prange(R):
        acc = np.zeros(N)
        bs = np.zeros(N)
        q = np.empty(N)
        cp1 = np.zeros(N, np.int64)
        cp2 = np.zeros(N, np.int64)
        ca1 = np.zeros(N, np.int64)
        ca2 = np.zeros(N, np.int64)
        zp = np.empty(N, np.uint64)
        za = np.empty(N, np.uint64)
        da = np.zeros(N, np.uint64)
        dp = np.zeros(N, np.uint64)
        if psr:
            states_row(zp, pkey, base + r * N, K)
        if asr:
            states_row(za, akey, base + r * N, nb)
        ar = A[r]
        for t in range(nb):
            k0 = t * block
            k1 = min(K, k0 + block)
            for k in range(k0, k1):
                if psr:
                    draws_row(dp, zp, np.uint64(k) * GAMMA, pshift)
                if k == k0 and not exact:  # the block's first product starts its sum
                    products_row(ar[k], B[k], bs, dp, cp1, cp2, PI, PX, count)
                    continue
                products_row(ar[k], B[k], q, dp, cp1, cp2, PI, PX, count)
                sum_row(bs, q, dn, plain)
            if exact:
                continue
            if asr:
                draws_row(da, za, np.uint64(t) * GAMMA, ashift)
            acc_row(acc, bs, da, ca1, ca2, AI, AX, count)
        res = bs if exact else acc
        keep = np.empty(N, np.bool_)
        for j in range(N):
            keep[j] = res[j] == res[j]
            bad[r, j] = not keep[j]
            out[r, j] = res[j]
        _unpack(counts[r, 0], cp1, cp2, keep)
        _unpack(counts[r, 1], ca1, ca2, keep)
    return counts
