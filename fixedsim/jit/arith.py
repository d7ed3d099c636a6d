"""Correctly rounded elementwise add, multiply, divide and fused multiply-add.

Each element's exact result ``V`` is first captured without error as ``hi + lo`` (``hi`` the
float64 nearest ``V``) with error-free transformations: TwoSum for sums, the exact float64
product of two float32-exact operands (at most 48 significant bits), the exact division
remainder ``a - q*b``. Then ``V`` is rounded once into the format:

* deterministic modes: ``V`` rounded to odd at 53 bits, then rounded into the format by the
  quantize kernel; exact for every format of at most 51 significant bits (round-to-odd at two or
  more extra bits makes the second rounding correct);
* STOCHASTIC: the neighbours of ``V`` and ``floor(frac * 2**r)`` are computed exactly from
  ``hi`` and ``lo``, the draw is compared, and the chosen neighbour goes through the quantize
  kernel for the range (overflow, flush to zero).

Where these arguments do not hold (operands of more than 24 significant bits in a product or
quotient, float64 overflow of ``hi``, wrapped values beyond 2**51 quanta, a division whose
stochastic decision lies within one rounding of a boundary), the element is flagged and the
caller computes it exactly with :mod:`fixedsim.reference` from the same random draw.
"""

import math

import numpy as np
from numba import prange

from .options import jit, jit_inline, jit_parallel
from .quant import (
    CHUNK,
    D_MINNORM,
    F_INEXACT,
    F_NAN,
    F_OVERFLOW,
    F_UNDERFLOW,
    F_UP,
    KIND_FIXED,
    N_FLAGS,
    ODD,
    OVF_WRAP,
    P_EMIN,
    P_F,
    P_KIND,
    P_M,
    P_MODE,
    P_NOZERO,
    P_OVF,
    P_RBITS,
    P_SUBN,
    P_UNSIGNED,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
    SR,
    U_KEY,
    quantize_value,
    sr_limit,
    sr_up,
)
from .rng import random_u64

OP_ADD, OP_MUL, OP_DIV, OP_FMA = range(4)
_TWO63 = 9223372036854775808.0


@jit_inline
def two_sum(a, b):
    """``s + e == a + b`` exactly, ``s = fl(a + b)`` (Knuth)."""
    s = a + b
    bp = s - a
    ap = s - bp
    return s, (a - ap) + (b - bp)


@jit_inline
def _f32_exact(v):
    return np.float64(np.float32(v)) == v


@jit_inline
def _is_odd(h):
    """Last significand bit of the finite nonzero float64 ``h``."""
    a = abs(h)
    if a < 2.2250738585072014e-308:
        k = a * 2.0**1000 * 2.0**74
    else:
        m, ex = math.frexp(a)
        k = m * 9007199254740992.0
    return k - 2.0 * np.floor(0.5 * k) != 0.0


@jit_inline
def round_to_odd(hi, lo):
    """``hi + lo`` rounded to odd at float64 precision (``hi`` the nearest float64)."""
    if lo == 0.0 or _is_odd(hi):
        return hi
    return np.nextafter(hi, np.inf if lo > 0.0 else -np.inf)


@jit_inline
def _to_u64(x):
    """Nonnegative integer-valued float64 ``x <= 2**64`` as uint64 (2**64 wraps to 0)."""
    if x >= _TWO63:
        return np.uint64(x - _TWO63) + np.uint64(1 << 63)
    return np.uint64(x)


@jit_inline
def _add_i(t, k):
    return t + np.uint64(k) if k >= 0 else t - np.uint64(-k)


@jit_inline
def floor_sum(x1, x2, approx):
    """floor(x1 + x2) as uint64, for 0 <= x1 <= 2**64 a float and |x2| small beside x1's grid.

    Exact when ``x2`` is exact. With ``approx`` (``x2`` is within half an ulp of the true value)
    also returns True when the true floor might differ (caller falls back to exact arithmetic).
    """
    amb = False
    if abs(x2) >= 1.0:  # then x1 is an integer
        f2 = np.floor(x2)
        if approx:
            u = np.nextafter(abs(x2), np.inf) - abs(x2)
            amb = (x2 - f2 <= u) or (f2 + 1.0 - x2 <= u)
        return _add_i(_to_u64(x1), np.int64(f2)), amb
    f = np.floor(x1)
    rs, re = two_sum(x1 - f, x2)
    adj = 0
    if rs > 1.0 or (rs == 1.0 and re >= 0.0):
        adj = 1
    elif rs < 0.0 or (rs == 0.0 and re < 0.0):
        adj = -1
    if approx and x2 != 0.0:
        u = np.nextafter(abs(x2), np.inf) - abs(x2)
        amb = abs(rs) <= u or abs(rs - 1.0) <= u
    return _add_i(_to_u64(f), adj), amb


@jit
def _sr_choose(hi, lo, approx, P, rbits, key, idx):
    """Stochastically chosen neighbour of ``V = hi + lo`` (an exact grid value), ambiguous flag."""
    xr = round_to_odd(hi, lo)
    draw = random_u64(key, idx) >> np.uint64(64 - rbits)
    if P[P_KIND] == KIND_FIXED:  # two's complement: the value is truncated
        f = P[P_F]
        fl_ = np.floor(math.ldexp(xr, f))
        if fl_ == 0.0 and xr < 0.0:  # a tiny negative value scaled to -0 (coarse quantum)
            fl_ = -1.0
        lo_g = math.ldexp(fl_, -f)
        # V - lo_g = d + e + lo exactly: hi - lo_g is inexact when |hi| is far below the
        # quantum and negative (lo_g = -quantum), e.g. -2**-1074 - (-1)
        d, e = two_sum(hi, -lo_g)
        r, r_err = two_sum(e, lo)
        x1 = math.ldexp(d, rbits + f)
        x2 = math.ldexp(r, rbits + f)
        if r != 0.0 and x2 == 0.0:
            return 0.0, True
        t, amb = floor_sum(x1, x2, approx or r_err != 0.0)
        return (lo_g + math.ldexp(1.0, -f) if draw < t else lo_g), amb
    # sign-magnitude float: the magnitude is truncated
    sgn = -1.0 if xr < 0.0 else 1.0
    mag = abs(xr)
    m = P[P_M]
    emin = P[P_EMIN]
    _, ex = math.frexp(mag)
    E = ex - 1
    if P[P_SUBN] != 0:
        eq = (E if E > emin else emin) - m
    else:
        if E < emin - 1:  # whichever neighbour, the result is flushed to zero
            return sgn * 0.0, False
        eq = E - m
    lo_g = math.ldexp(np.floor(math.ldexp(mag, -eq)), eq)
    x1 = math.ldexp(abs(hi) - lo_g, rbits - eq)
    x2 = math.ldexp(sgn * lo, rbits - eq)
    if lo != 0.0 and x2 == 0.0:
        return 0.0, True
    t, amb = floor_sum(x1, x2, approx)
    limit, below = sr_limit(t, t, rbits, False, False)
    up = (draw < limit) if below else (draw >= limit)
    return sgn * (lo_g + math.ldexp(1.0, eq) if up else lo_g), amb


@jit
def round_exact(hi, lo, approx, P, Psr, U, D, idx):
    """Round ``V = hi + lo`` once into the format of ``P`` (a rounding of :mod:`.quant`).

    ``hi`` is a float64 and ``|lo|`` is below the gap from ``hi`` to its neighbour in the
    direction of ``lo``; ``lo`` is exact, or (``approx``) within half an ulp of ``V - hi``.
    Deterministic modes round ``V`` to odd at 53 bits and then into the format (exact for
    formats of at most 51 significant bits); STOCHASTIC compares the draw with the exact
    fraction of ``V`` (draw index ``idx``) and ranges the chosen neighbour with ``Psr``.
    Returns ``(value, flags, ambiguous)``; ``ambiguous`` (only with ``approx``): the stochastic
    decision could not be proved, the caller must compute exactly.
    """
    if P[P_UNSIGNED] != 0 and (hi < 0.0 or (hi == 0.0 and lo < 0.0)):
        return np.nan, (1 << F_NAN) | (1 << F_INEXACT), False  # negative into unsigned: NaN
    if P[P_MODE] == SR and (lo != 0.0 or hi != 0.0):  # (an exact zero keeps its sign)
        g, amb = _sr_choose(hi, lo, approx, P, P[P_RBITS], U[U_KEY], idx)
        if amb:
            return 0.0, 0, True
        if g == 0.0 and P[P_NOZERO] != 0:  # flushed, and no zero (E8M0): the smallest value
            v, fl = D[D_MINNORM], 1 << F_UNDERFLOW
        else:
            v, fl = quantize_value(g, Psr, U, D, idx)
        fl &= ~((1 << F_INEXACT) | (1 << F_UP))
        if not (lo == 0.0 and v == hi):
            fl |= 1 << F_INEXACT
        if v > hi or (v == hi and lo < 0.0):
            fl |= 1 << F_UP
        if v == 0.0 and (hi != 0.0 or lo != 0.0):
            fl |= 1 << F_UNDERFLOW
        return v, fl, False
    v, fl = quantize_value(round_to_odd(hi, lo), P, U, D, idx)
    return v, fl, False


@jit_inline
def _zero_sign(za, zb, mode):
    """Sign of an exact zero sum of two zero-or-cancelling terms with signs za, zb (IEEE)."""
    if za == zb:
        return -0.0 if za else 0.0
    return -0.0 if mode == RDN else 0.0


@jit
def arith_one(op, x, y, z, idx, P, Psr, U, D, mode, wrap, wrap_lim):
    """One element of :func:`arith`: ``(value, flags, slow)``; ``slow``: left to the caller's
    exact fallback (``value`` and ``flags`` are then meaningless)."""
    if op == OP_ADD:
        r = x + y
    elif op == OP_MUL:
        r = x * y
    elif op == OP_DIV:
        r = x / y if y != 0.0 else (np.nan if x == 0.0 or x != x else
                                    math.copysign(np.inf, x) * math.copysign(1.0, y))
    elif abs(x) < np.inf and abs(y) < np.inf and not abs(z) < np.inf:
        r = z  # the exact product is finite (even where x * y overflows): z decides
    else:
        r = x * y + z
    finite_in = abs(x) < np.inf and abs(y) < np.inf and abs(z) < np.inf
    if not finite_in or (op == OP_DIV and y == 0.0):
        v, fl = quantize_value(r, P, U, D, idx)  # IEEE specials are exact
        return v, fl, False
    ok = True
    approx = False
    hi = r
    lo = 0.0
    if op == OP_ADD:
        hi, lo = two_sum(x, y)
        if hi == 0.0 and lo == 0.0:
            hi = _zero_sign(math.copysign(1.0, x) < 0, math.copysign(1.0, y) < 0, mode)
    elif op == OP_MUL:
        ok = _f32_exact(x) and _f32_exact(y)
    elif op == OP_DIV:
        ok = _f32_exact(x) and _f32_exact(y)
        if ok and x != 0.0:
            cc = 134217729.0 * r  # Veltkamp split of the quotient, 26 + 26 bits
            qh = cc - (cc - r)
            ql = r - qh
            rem = (x - qh * y) - ql * y  # exact: the remainder is representable
            lo = rem / y
            approx = True
    else:
        ok = _f32_exact(x) and _f32_exact(y)
        if ok:
            p = x * y
            hi, lo = two_sum(p, z)
            if hi == 0.0 and lo == 0.0:
                hi = _zero_sign(math.copysign(1.0, p) < 0, math.copysign(1.0, z) < 0, mode)
    if not ok or abs(hi) == np.inf or (wrap and abs(hi) >= wrap_lim):
        return 0.0, 0, True
    v, fl, amb = round_exact(hi, lo, approx, P, Psr, U, D, idx)
    return v, fl, amb


@jit_parallel
def arith(op, a, b, c, out, P, Psr, U, D, mode, rbits, wrap_lim):
    """``out[i] = round(a[i] op b[i] (+ c[i]))``; returns (per-chunk counts, slow-path mask).

    ``Psr`` is ``P`` with NEAREST_EVEN as the mode (used to range a stochastically chosen
    grid value). ``wrap_lim``: magnitude above which a wrapped fixed-point result is left to the
    exact fallback.
    """
    n = out.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    slow = np.zeros(n, np.uint8)
    wrap = P[P_KIND] == KIND_FIXED and P[P_OVF] == OVF_WRAP
    for ch in prange(nch):
        lo_i = ch * CHUNK
        hi_i = min(n, lo_i + CHUNK)
        # slices: loop indices from 0 are provably nonnegative (no wraparound code)
        aa, bb, cc_, oo, ss = a[lo_i:hi_i], b[lo_i:hi_i], c[lo_i:hi_i], out[lo_i:hi_i], \
            slow[lo_i:hi_i]
        for i in range(aa.size):
            v, fl, s = arith_one(op, aa[i], bb[i], cc_[i], np.uint64(lo_i + i), P, Psr, U, D,
                                 mode, wrap, wrap_lim)
            if s:
                ss[i] = 1
                continue
            oo[i] = v
            for k in range(N_FLAGS):
                counts[ch, k] += (fl >> k) & 1
    return counts, slow


_TWO52 = 4503599627370496.0


@jit_inline
def _grid_add_one(x, y, MODE, up, down, cmax, cmin, rbits, key, idx):
    """``x + y`` into a saturating fixed-point format of quantum ``down = 2**-f`` (``up =
    2**f``; codes in ``[cmin, cmax]``) when ``x`` lies on the grid: ``(value, ok, inexact,
    rounded_up, overflow, underflow)``, the last five 0/1 integers.

    With ``x = X q`` (``X`` an integer) and ``y/q = t``, ``T = floor(t)``, the exact sum is
    ``(N + phi) q`` with the integer ``N = X + T`` and ``phi = t - T`` in ``[0, 1)``: every
    rounding mode decides from ``N``'s parity and sign and ``phi`` alone (STOCHASTIC: up iff
    the draw is below ``floor(phi * 2**rbits)``, the rule of :func:`round_exact`). ``phi`` is
    ``hi + e`` exactly (TwoSum); ``e`` is nonzero only for ``-1 < t < 0`` (for ``|t| >= 1``,
    ``t - T`` is exact by Sterbenz's lemma), where ``phi = 1 - a``, ``a = -t`` exact, and the
    decisions are made from ``hi`` and ``e`` exactly (``phi > 1/2`` iff ``hi > 1/2`` or ``hi
    = 1/2`` and ``e > 0``; a tie needs ``e = 0``) or, for STOCHASTIC, from ``a``: up iff
    ``draw < 2**r - ceil(a 2**r)``, :func:`fixedsim.jit.quant.sr_up`'s rule for a negative
    value, negated (``a 2**r`` exact, a power-of-two scaling). Such sums are an optimizer's
    steps below one quantum, about half of a fixed-point network's weights. ``ok`` is 0 when
    ``x`` is off the grid, ``|t| >= 2**52`` or a scaling is inexact; the caller then takes
    the general path. Branch-free, so that a loop of it vectorises.
    """
    X = x * up
    t = y * up
    T = np.floor(t)
    phi, e = two_sum(t, -T)
    ok = (np.int64(abs(X) <= _TWO52) & np.int64(X == np.floor(X)) & np.int64(X * down == x)
          & np.int64(abs(t) < _TWO52) & np.int64(t * down == y))
    N = X + T if ok != 0 else 0.0  # no NaN reaches the integer conversions below
    phi = phi if ok != 0 else 0.0
    e = e if ok != 0 else 0.0
    # phi > 1/2 and phi == 1/2 exactly, from hi and e
    above = np.int64(phi > 0.5) | (np.int64(phi == 0.5) & np.int64(e > 0.0))
    tie = np.int64(phi == 0.5) & np.int64(e == 0.0)
    if MODE == RNE:
        up_ = above | (tie & (np.int64(N) & 1))
    elif MODE == RNA:
        up_ = above | (tie & np.int64(N >= 0.0))
    elif MODE == RTZ:
        up_ = np.int64(phi > 0.0) & np.int64(N < 0.0)
    elif MODE == RDN:
        up_ = np.int64(0)
    elif MODE == RUP:
        up_ = np.int64(phi > 0.0)
    elif MODE == ODD:
        up_ = np.int64(phi > 0.0) & (1 - (np.int64(N) & 1))
    else:  # SR: up iff the draw is below floor(phi * 2**rbits) (quant.sr_up); from a = -t
        # when phi is not exact (the rule for a negative value, negated)
        draw = random_u64(key, idx) >> np.uint64(64 - rbits)
        small = np.int64(e != 0.0)
        up_ = sr_up(-t if small else phi, small, draw, rbits) ^ small
    n0 = N + np.float64(up_)
    n = min(max(n0, cmin), cmax)
    # an exact zero sum is +0 in a fixed format, with no event
    nonzero = np.int64(N != 0.0) | np.int64(phi != 0.0)
    inexact = np.int64(phi != 0.0) | np.int64(n != N)
    return (n * down + 0.0, ok, inexact, inexact & np.int64(n > N), np.int64(n != n0),
            np.int64(n == 0.0) & nonzero)


@jit_inline
def _grid_add_chunk(a, b, out, counts, slow, ch, lo_i, hi_i, MODE, P, Psr, U, D, up, down,
                    cmax, cmin, rbits, wrap_lim):
    aa, bb, oo, ss = a[lo_i:hi_i], b[lo_i:hi_i], out[lo_i:hi_i], slow[lo_i:hi_i]
    key = U[U_KEY]
    ok = np.empty(aa.size, np.uint8)
    n_inexact = 0
    n_up = 0
    n_over = 0
    n_under = 0
    for i in range(aa.size):  # every element as if ``a`` were on the grid (vectorises)
        v, k, i0, u0, o0, z0 = _grid_add_one(aa[i], bb[i], MODE, up, down, cmax, cmin, rbits,
                                             key, np.uint64(lo_i + i))
        oo[i] = v
        ok[i] = k
        n_inexact += i0 & k
        n_up += u0 & k
        n_over += o0 & k
        n_under += z0 & k
    counts[ch, F_INEXACT] += n_inexact
    counts[ch, F_UP] += n_up
    counts[ch, F_OVERFLOW] += n_over
    counts[ch, F_UNDERFLOW] += n_under
    for i in range(aa.size):  # the rest (``a`` off the grid): the general path
        if ok[i] != 0:
            continue
        idx = np.uint64(lo_i + i)
        # op, mode and wrap as plain (not literal) values: the call then shares the one
        # compiled arith_one instead of compiling one per literal mode
        v, fl, s = arith_one(np.int64(OP_ADD), aa[i], bb[i], bb[i], idx, P, Psr, U, D,
                             np.int64(MODE), np.bool_(False), wrap_lim)
        if s:
            ss[i] = 1
            continue
        oo[i] = v
        for k in range(N_FLAGS):
            counts[ch, k] += (fl >> k) & 1


@jit_parallel
def add_fixed_grid(a, b, out, P, Psr, U, D, mode, rbits, up, down, cmax, cmin, wrap_lim):
    """:func:`arith` for ``OP_ADD`` into a saturating fixed-point format, with the fast
    :func:`_grid_add_one` for elements whose ``a`` lies on the format's grid (a weight plus
    a step; the caller puts the operand more often on the grid first), :func:`arith_one` for
    the others. Same results, flags, draws and slow-path mask as :func:`arith`."""
    n = out.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    slow = np.zeros(n, np.uint8)
    for ch in prange(nch):
        lo_i = ch * CHUNK
        hi_i = min(n, lo_i + CHUNK)
        if mode == RNE:
            _grid_add_chunk(a, b, out, counts, slow, ch, lo_i, hi_i, RNE, P, Psr, U, D, up,
                            down, cmax, cmin, rbits, wrap_lim)
        elif mode == RTZ:
            _grid_add_chunk(a, b, out, counts, slow, ch, lo_i, hi_i, RTZ, P, Psr, U, D, up,
                            down, cmax, cmin, rbits, wrap_lim)
        elif mode == SR:
            _grid_add_chunk(a, b, out, counts, slow, ch, lo_i, hi_i, SR, P, Psr, U, D, up,
                            down, cmax, cmin, rbits, wrap_lim)
        else:  # the other modes: one loop that reads the mode
            _grid_add_chunk(a, b, out, counts, slow, ch, lo_i, hi_i, mode, P, Psr, U, D, up,
                            down, cmax, cmin, rbits, wrap_lim)
    return counts, slow
