"""Array quantizers: round every element of a float32/float64 array into a format, bit-exactly.

The kernels work on the integer fields of the input (sign, exponent, significand ``M``), so that a
value is ``M * 2**e`` exactly, ``M`` is normalised to ``IN_M + 1`` bits, and rounding to a quantum
``2**eq`` is an integer shift with the shifted-out bits ``rem`` deciding the direction. Nothing is
rounded twice and no float arithmetic touches a value before its one rounding.

Format and mode arrive packed in three small arrays (see :func:`fixedsim.quantize._kernel_params`):

* ``P`` (int64): kind, rounding, overflow, random bits, mantissa bits, emin, subnormals, has_inf,
  word length, signed, frac length; for floats also: NaN refused (no NaN in the format),
  negative zero kept, unsigned (negative inputs are NaN), no zero (the smallest value replaces
  a flush to zero);
* ``U`` (uint64): largest positive code, largest negative magnitude, code mask, random key;
* ``D`` (float64): largest value, most negative value, smallest normal, fixed-point quantum.

Each kernel returns per-chunk event counts (columns ``F_*``), so counting is race-free and
independent of the number of threads; the caller sums them.
"""

import math

import numpy as np
from numba import prange

from .bits import f64_from_bits, small_int
from .options import jit, jit_inline, jit_parallel
from .rng import random_u64

# P fields
(P_KIND, P_MODE, P_OVF, P_RBITS, P_M, P_EMIN, P_SUBN, P_HASINF, P_W, P_SIGNED, P_F,
 P_NONAN, P_NEGZERO, P_UNSIGNED, P_NOZERO) = range(15)
N_P = 15
# U fields
U_PMAX, U_NMAG, U_MASK, U_KEY = range(4)
N_U = 4
# D fields
D_MAX, D_MIN, D_MINNORM, D_SCALE = range(4)
N_D = 4
# kinds, rounding modes and overflow rules (the integer values of the public enums)
KIND_FIXED, KIND_FLOAT = 0, 1
RNE, RNA, RTZ, RDN, RUP, ODD, SR = range(7)
OVF_SAT, OVF_WRAP, OVF_INF = range(3)
# event columns
F_INEXACT, F_UP, F_OVERFLOW, F_UNDERFLOW, F_SUBNORMAL, F_NAN, F_INVALID = range(7)
N_FLAGS = 7

CHUNK = 1 << 14


@jit_inline
def tally(n, flag):
    """``n + flag`` as int32: a count of at most :data:`CHUNK` events (0/1 flags) of one
    chunk. Numba types integer sums as int64; the conversion back to int32 lets LLVM sum in
    32-bit lanes, eight to an AVX2 register instead of four (an event pass of the float
    quantizer ran 1.6 -> 0.9 ns an element on AVX2, measured). Start from ``np.int32(0)``."""
    return np.int32(n + flag)


_POW2 = np.ldexp(1.0, np.arange(-1074, 1024))  # _POW2[k + 1074] == 2.0**k
_U0 = np.uint64(0)
_U1 = np.uint64(1)
_U63 = np.uint64(63)
_U64 = np.uint64(64)
_TWO53 = np.uint64(1 << 53)


@jit_inline
def _pow2(k):
    return _POW2[k + 1074]


@jit_inline
def sr_limit(t, c, rbits, neg, value_based):
    """Stochastic rounding: does a draw of ``rbits`` bits move the magnitude up?

    ``t`` and ``c`` are floor and ceil of ``frac * 2**rbits``, ``frac`` the distance from the
    smaller-magnitude neighbour in quanta. Returns ``(limit, below)``: the magnitude rounds up
    iff ``draw < limit`` when ``below`` else iff ``draw >= limit``. Floats (sign-magnitude)
    round the magnitude: up iff ``draw < t``. Fixed point (two's complement, ``value_based``)
    rounds the value: for a negative value the magnitude goes up iff the value goes down, i.e.
    iff ``draw >= 2**rbits - c``.
    """
    if neg and value_based:
        full = _U0 if rbits == 64 else (_U1 << np.uint64(rbits))
        return full - c, False
    return t, True


_M32 = np.uint64(0xFFFFFFFF)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_TWO32 = 4294967296.0


@jit_inline
def sr_up(frac, neg, draw, rbits):
    """Stochastic rounding's decision as :func:`sr_limit` makes it, with no conversion
    between float64 and 64-bit integers (AVX2 has none, and one left the callers' loops
    scalar): does the magnitude move up? Returns 0/1 (int64).

    ``frac`` is the exact distance, in ``[0, 1)``, from the smaller-magnitude neighbour in
    quanta; ``draw`` the ``rbits`` random bits (uint64 below ``2**rbits``); ``neg`` 1 for a
    negative value of a two's-complement (value-based) format, else 0. With ``z = frac *
    2**rbits`` (exact: a power-of-two scaling below ``2**64``), :func:`sr_limit`'s rules are
    ``draw < floor(z)``, i.e. ``floor(z) > draw``, and, for ``neg``, ``draw >= 2**rbits -
    ceil(z)``, i.e. ``z > c`` with ``c = 2**rbits - 1 - draw`` (``draw``'s low ``rbits`` bits
    complemented): ``floor(z) > c``, or ``floor(z) == c`` and ``z`` not an integer. The
    integer ``floor(z) < 2**64`` is compared in two 32-bit halves, each exact in float64 and
    read off its bits (:func:`fixedsim.jit.bits.small_int`). ``frac == 0`` gives 0 (no
    move) in both rules."""
    z = frac * f64_from_bits(np.int64(1023 + rbits) << 52)  # 2**rbits, from its bits
    zi = np.floor(z)
    zh = np.floor(zi * (1.0 / _TWO32))
    zl = zi - zh * _TWO32  # exact: an integer below 2**32
    h = small_int(zh)
    lo = small_int(zl)
    c = draw ^ ((_ALL >> np.uint64(64 - rbits)) * np.uint64(neg))  # neg: the complement
    ch = np.int64(c >> np.uint64(32))
    cl = np.int64(c & _M32)
    same = np.int64(h == ch) & np.int64(lo == cl)
    return (np.int64(h > ch) | (np.int64(h == ch) & np.int64(lo > cl))
            | (same & np.int64(neg) & np.int64(z != zi)))


@jit_inline
def _round_shift(M, sh, mode, neg, rbits, key, idx, value_based):
    """Round ``M * 2**-sh`` (``M`` < 2**53, ``sh`` >= 1) to an integer magnitude, per ``mode``.

    ``neg`` tells the sign of the value whose magnitude is rounded (DOWN/UP depend on it).
    Returns the rounded magnitude as uint64.
    """
    s = sh if sh < 63 else 63
    us = np.uint64(s)
    kept = M >> us
    rem = M & ((_U1 << us) - _U1)
    half = _U1 << np.uint64(s - 1)
    up = False
    if rem != _U0:
        if mode == RNE:
            up = rem > half or (rem == half and (kept & _U1) == _U1)
        elif mode == RNA:
            up = rem >= half
        elif mode == RTZ:
            up = False
        elif mode == RDN:
            up = neg
        elif mode == RUP:
            up = not neg
        elif mode == ODD:
            up = (kept & _U1) == _U0
        else:  # SR, resolved to rbits random bits
            draw = random_u64(key, idx) >> np.uint64(64 - rbits)
            if sh <= rbits:
                t = rem << np.uint64(rbits - sh)
                c = t
            elif sh - rbits < 64:
                t = rem >> np.uint64(sh - rbits)
                c = t + (_U1 if (rem & ((_U1 << np.uint64(sh - rbits)) - _U1)) != _U0 else _U0)
            else:
                t = _U0
                c = _U1
            limit, below = sr_limit(t, c, rbits, neg, value_based)
            up = (draw < limit) if below else (draw >= limit)
    return kept + _U1 if up else kept


@jit_inline
def u64_to_f64_rtz(mag):
    """uint64 ``mag`` as float64, rounded toward zero (exact up to 2**53).

    Only wide fixed-point codes (above 53 bits) reach the rounding: the float64 container then
    holds the largest value not beyond the code (docs/numerics.md, "containers").
    """
    if mag > _TWO53:
        k = np.uint64(0)
        while (mag >> k) >= _TWO53:
            k += _U1
        mag = (mag >> k) << k
    return np.float64(mag)


@jit_inline
def overflow_value(mode, neg, dmax):
    """IEEE 754 result of an overflow under rounding ``mode`` (magnitude; caller applies sign)."""
    if mode == RTZ or mode == ODD:
        return dmax
    if mode == RDN:
        return np.inf if neg else dmax
    if mode == RUP:
        return dmax if neg else np.inf
    return np.inf


@jit_inline
def _quantize_fields(x, neg, ef, frac, in_m, in_bias, in_top, P, U, D, idx):
    """Quantize one value given as float ``x`` and its fields. Returns (result, flags bitmask)."""
    kind = P[P_KIND]
    mode = P[P_MODE]
    ovf = P[P_OVF]
    flags = 0
    # -- specials --------------------------------------------------------------------------
    if ef == in_top:
        if frac != 0:  # NaN
            if kind == KIND_FIXED or P[P_NONAN] != 0:
                return 0.0, 1 << F_INVALID
            return x, 1 << F_NAN
        if kind == KIND_FLOAT and neg and P[P_UNSIGNED] != 0:
            return np.nan, (1 << F_NAN) | (1 << F_INEXACT)
        # infinity
        if kind == KIND_FIXED:
            if ovf == OVF_WRAP:
                return 0.0, 1 << F_INVALID
            return (D[D_MIN] if neg else D[D_MAX]), (1 << F_OVERFLOW) | (1 << F_INEXACT) | (
                (1 << F_UP) if neg else 0
            )
        if ovf == OVF_SAT:
            return (-D[D_MAX] if neg else D[D_MAX]), (1 << F_OVERFLOW) | (1 << F_INEXACT) | (
                (1 << F_UP) if neg else 0
            )
        return x, 0
    if ef == 0 and frac == 0:  # signed zero
        if kind == KIND_FLOAT and P[P_NOZERO] != 0:
            return np.nan, (1 << F_NAN) | (1 << F_INEXACT)
        return (x if kind == KIND_FLOAT and P[P_NEGZERO] != 0 else 0.0), 0
    if kind == KIND_FLOAT and neg and P[P_UNSIGNED] != 0:
        return np.nan, (1 << F_NAN) | (1 << F_INEXACT)
    # -- finite nonzero: |x| = M * 2**e with M normalised to in_m + 1 bits ------------------
    hidden = np.uint64(1) << np.uint64(in_m)
    if ef == 0:
        M = np.uint64(frac)
        e = 1 - in_bias - in_m
        while M < hidden:
            M = M << _U1
            e -= 1
    else:
        M = np.uint64(frac) | hidden
        e = ef - in_bias - in_m
    E = e + in_m  # floor(log2 |x|)
    rbits = P[P_RBITS]
    key = U[U_KEY]
    if kind == KIND_FIXED:
        sh = -P[P_F] - e
        big = False
        if sh > 0:
            C = _round_shift(M, sh, mode, neg, rbits, key, idx, True)
        elif in_m + 1 - sh > 64:
            big = True  # magnitude >= 2**64: beyond every code
            C = (M << np.uint64(-sh)) if -sh < 64 else _U0
        else:
            C = M << np.uint64(-sh)
        if ovf == OVF_WRAP:
            code = (_U0 - C) if neg else C
            code = code & U[U_MASK]
            w = P[P_W]
            if P[P_SIGNED] != 0:
                sc = np.int64(code << np.uint64(64 - w)) >> np.int64(64 - w)
                if sc < 0:
                    val = -u64_to_f64_rtz(_U0 - np.uint64(sc)) * D[D_SCALE]
                else:
                    val = u64_to_f64_rtz(np.uint64(sc)) * D[D_SCALE]
                if big or (neg and C > U[U_NMAG]) or ((not neg) and C > U[U_PMAX]):
                    flags |= 1 << F_OVERFLOW
            else:
                val = u64_to_f64_rtz(code) * D[D_SCALE]
                if big or (neg and C != _U0) or C > U[U_PMAX]:
                    flags |= 1 << F_OVERFLOW
        else:  # saturate
            if neg:
                if big or C > U[U_NMAG]:
                    val = D[D_MIN]
                    flags |= 1 << F_OVERFLOW
                else:
                    val = -(np.float64(C) * D[D_SCALE]) + 0.0
            else:
                if big or C > U[U_PMAX]:
                    val = D[D_MAX]
                    flags |= 1 << F_OVERFLOW
                else:
                    val = np.float64(C) * D[D_SCALE]
        if val == 0.0:
            flags |= 1 << F_UNDERFLOW
    else:
        m = P[P_M]
        emin = P[P_EMIN]
        subn = P[P_SUBN] != 0
        if subn and E < emin:
            eq = emin - m
        else:
            eq = E - m
        sh = eq - e
        if sh > 0:
            C = _round_shift(M, sh, mode, neg, rbits, key, idx, False)
        else:
            C = M
            eq = e
        mag = 0.0
        if C == _U0:
            flags |= 1 << F_UNDERFLOW
        elif (not subn) and E < emin and not (E == emin - 1 and C == (_U1 << np.uint64(m + 1))):
            flags |= 1 << F_UNDERFLOW  # flush to zero, tininess after rounding
            if P[P_NOZERO] != 0:
                mag = D[D_MINNORM]  # no zero: the smallest value
        else:
            if P[P_NOZERO] != 0 and E < emin:
                flags |= 1 << F_UNDERFLOW  # below the range of a format without zero
            mag = np.float64(C) * _pow2(eq)
            if mag > D[D_MAX]:
                flags |= 1 << F_OVERFLOW
                if ovf == OVF_SAT:
                    mag = D[D_MAX]
                else:
                    mag = overflow_value(mode, neg, D[D_MAX])
            elif mag < D[D_MINNORM]:
                flags |= 1 << F_SUBNORMAL
        val = -mag if neg and (mag != 0.0 or P[P_NEGZERO] != 0) else mag
    if val != x:
        flags |= 1 << F_INEXACT
        if val > x:
            flags |= 1 << F_UP
    return val, flags


@jit_inline
def _count(counts, c, flags):
    for k in range(N_FLAGS):
        counts[c, k] += (flags >> k) & 1


@jit_parallel
def quantize_bits(x, xb, out, P, U, D, in_m, in_e):
    """Quantize float ``x`` (``xb`` its unsigned bit view) into ``out``; return per-chunk counts.

    ``in_m``, ``in_e``: mantissa and exponent bits of the input (23, 8 for float32; 52, 11 for
    float64). The fields are read in uint64 whatever the input width. :mod:`fixedsim.quantize`
    calls it with float64 arrays only (one compiled signature).
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    top = (1 << in_e) - 1
    bias = (1 << (in_e - 1)) - 1
    man_mask = (_U1 << np.uint64(in_m)) - _U1
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        xs, bs, os = x[lo:hi], xb[lo:hi], out[lo:hi]  # slices: nonnegative loop indices
        for j in range(xs.size):
            b = np.uint64(bs[j])
            neg = (b >> np.uint64(in_m + in_e)) != _U0
            ef = np.int64((b >> np.uint64(in_m)) & np.uint64(top))
            frac = np.int64(b & man_mask)
            v, fl = _quantize_fields(np.float64(xs[j]), neg, ef, frac, in_m, bias, top, P, U, D,
                                     np.uint64(lo + j))
            os[j] = v
            if fl != 0:
                _count(counts, c, fl)
    return counts


def _quantize_value(x, P, U, D, idx):
    """Quantize one float64 ``x`` (no bit view needed): ``_quantize_fields`` on its IEEE fields."""
    neg = math.copysign(1.0, x) < 0.0
    if x != x:
        return _quantize_fields(x, neg, 2047, 1, 52, 1023, 2047, P, U, D, idx)
    a = abs(x)
    if a == np.inf:
        return _quantize_fields(x, neg, 2047, 0, 52, 1023, 2047, P, U, D, idx)
    if a == 0.0:
        return _quantize_fields(x, neg, 0, 0, 52, 1023, 2047, P, U, D, idx)
    if a >= 2.2250738585072014e-308:
        m, ex = math.frexp(a)
        ef = ex + 1022
        frac = np.int64(m * 9007199254740992.0) - (np.int64(1) << 52)
    else:
        ef = 0
        frac = np.int64(a * 2.0**1000 * 2.0**74)
    return _quantize_fields(x, neg, ef, frac, 52, 1023, 2047, P, U, D, idx)


#: :func:`_quantize_value` as a called function: callers that use it in several places (the
#: elementwise arithmetic kernel) would take minutes to compile with it inlined in each.
quantize_value = jit(_quantize_value)
