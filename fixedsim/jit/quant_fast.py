"""Fast quantizers for the common cases, bit-identical to :mod:`fixedsim.jit.quant`.

* :func:`float_from_f32`: float32 input into a float format whose values are all float32
  (every preset), subnormals on. Branch-free integer arithmetic on the input bits; nearest
  even, toward zero and stochastic rounding each have a loop compiled with the mode as a
  constant (no mode branch, so the compiler vectorises it), the other modes share one loop
  that reads the mode.
* :func:`float_from_f64`: float64 input into such a format of at most 22 significant bits,
  deterministic modes: round to odd at float32 precision, then the float32 kernel.
* :func:`fixed_from_float`: float32/float64 input into a fixed-point format, when ``x * 2**f``
  is exact in float64 (the caller checks the range). Loops per mode as above. Under WRAP
  it runs unclamped into a float64 buffer of codes and :func:`wrap_codes` wraps them.

Each can count the events of its roundings as the general kernel does (``stats=True``; the
float kernels in a second pass over each chunk, from the inputs, the results and the overflow
flags). All are checked bit for bit, counts included, against the general kernel, and against
the Fraction oracle.

Only three modes get loops of their own because each loop compiled with a constant mode is a
copy of the whole loop body in the kernel, and a parallel kernel's compile time grows with its
body: seven copies cost :func:`fixed_from_float` 32 s of compiling for its two signatures,
nearest even, toward zero, stochastic rounding and one shared loop 18 s (empty cache, one
core, idle machine). The shared loop branches per element and does not vectorise: 4 M float32
inputs into Q<16,8> with nearest away ran 507 Melem/s in a loop of its own and 309 in the
shared one, into FP16 1,006 and 425 (one thread); toward zero, the truncation of many hardware
and fixed-point studies, would lose 3-4x there, so it keeps its own loop; nearest away, down,
up and round to odd take the shared one. :func:`fixedsim.jit.arith.add_fixed_grid` does the same.
"""

import numpy as np
from numba import prange

from .bits import f32_bits, f32_from_bits, round_to_odd_f32
from .options import jit_inline, jit_parallel
from .quant import (
    CHUNK,
    F_INEXACT,
    F_INVALID,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    F_UP,
    N_FLAGS,
    ODD,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
    SR,
    sr_up,
    tally,
    u64_to_f64_rtz,
)
from .rng import random_u64


@jit_inline
def f32_float_one(b, MODE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits, rbits,
                  key, i):
    """float32 bits ``b`` (int64) rounded into the format: (result bits, overflowed)."""
    s = b & 0x80000000
    a = b ^ s
    neg = s != 0
    ef = a >> 23
    M = (a & 0x7FFFFF) | (0x800000 if ef != 0 else 0)
    efc = ef if ef > 1 else 1
    sh = sh0 + (lim - efc if lim > efc else 0)
    shc = sh if sh < 25 else 25
    rem = M & ((1 << shc) - 1)
    lsb = (M >> shc) & 1
    if MODE == RNE:
        up = 2 * rem + lsb > (1 << shc)
    elif MODE == RNA:
        up = 2 * rem >= (1 << shc)
    elif MODE == RTZ:
        up = False
    elif MODE == RDN:
        up = neg and rem != 0
    elif MODE == RUP:
        up = (not neg) and rem != 0
    elif MODE == ODD:
        up = rem != 0 and lsb == 0
    else:  # SR on the magnitude, as the general kernel does for floats
        draw = random_u64(key, np.uint64(i)) >> np.uint64(64 - rbits)
        urem = np.uint64(rem)
        if sh <= rbits:
            t = urem << np.uint64(rbits - sh)
        elif sh - rbits < 64:
            t = urem >> np.uint64(sh - rbits)
        else:
            t = np.uint64(0)
        up = draw < t
    upi = 1 if up else 0
    if shc <= 23:
        res = (a & ~((1 << shc) - 1)) + (upi << shc)
    else:
        res = qbits if up else 0
    over = res > maxbits
    if over:
        res = ovbits_neg if neg else ovbits_pos
    if a >= 0x7F800000:
        res = a | 0x400000 if a > 0x7F800000 else infbits
    return res | s, over


@jit_inline
def _f32_chunk(xs, os, ov, lo, MODE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits,
               rbits, key):
    """One chunk of :func:`float_from_f32`: the result bits into ``os``, the overflow flags
    (0/1) into ``ov``."""
    for j in range(xs.size):
        r, over = f32_float_one(np.int64(xs[j]), MODE, sh0, lim, qbits, maxbits, ovbits_pos,
                                ovbits_neg, infbits, rbits, key, lo + j)
        os[j] = r
        ov[j] = np.uint8(over)


@jit_inline
def _f32_value(b):
    """The value of float32 bits ``b``, as float64 (an input of :func:`float_from_f32`)."""
    return np.float64(f32_from_bits(b))


@jit_inline
def _f64_value(x):
    """An input of :func:`float_from_f64`, as it is."""
    return x


_TWO128 = 2.0**128


@jit_inline
def _float_events(xs, os, ov, minnorm, counts, c, value):
    """The events of a chunk of :func:`float_from_f32` or :func:`float_from_f64` (inputs
    ``xs``, whose values ``value(xs[j])`` gives as float64; result bits ``os``; overflow flags
    ``ov``), as the general kernel counts them, into ``counts[c]``: inexact (a value changed;
    not a NaN), rounded up (the value grew), overflow (a finite input rounded beyond the
    largest value, or an infinite one saturated), underflow (a nonzero input rounded to zero),
    subnormal (a nonzero result below the smallest normal ``minnorm``, as bits) and NaN
    inputs. Branch-free 0/1 integers."""
    n_inexact = n_up = n_over = n_under = n_sub = n_nan = np.int32(0)
    for j in range(xs.size):
        x = value(xs[j])
        r = np.int64(os[j])
        v = np.float64(f32_from_bits(r))
        ra = r & 0x7FFFFFFF
        nan_in = np.int64(x != x)
        fin = np.int64(abs(x) < np.inf)
        inexact = np.int64(v != x) & (1 - nan_in)
        n_inexact = tally(n_inexact, inexact)
        n_up = tally(n_up, np.int64(v > x))  # implies inexact (and no NaN)
        # beyond float32's range (float64 inputs) the value rounded to odd is float32's max,
        # whose rounding may stay in range (to zero): every rounding of |x| >= 2**128 overflows
        n_over = tally(n_over, (fin & (np.int64(ov[j]) | np.int64(abs(x) >= _TWO128))) | (
            (1 - fin - nan_in) & inexact))
        n_under = tally(n_under, fin & np.int64(x != 0.0) & np.int64(ra == 0))
        n_sub = tally(n_sub, np.int64(ra != 0) & np.int64(ra < minnorm))
        n_nan = tally(n_nan, nan_in)
    counts[c, F_INEXACT] = n_inexact
    counts[c, F_UP] = n_up
    counts[c, F_OVERFLOW] = n_over
    counts[c, F_UNDERFLOW] = n_under
    counts[c, F_SUBNORMAL] = n_sub
    counts[c, F_NAN] = n_nan


@jit_parallel
def float_from_f32(xb, ob, mode, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits,
                   rbits, key, count, minnorm):
    """Quantize float32 bits ``xb`` into float32 bits ``ob`` (see module docstring).

    ``sh0 = 23 - man_bits``; ``lim = emin + 127``; ``qbits``: bits of the smallest subnormal;
    ``maxbits``: bits of max; ``ovbits_*``: result bits of an overflow by sign; ``infbits``: the
    result bits of an infinite input. All int64; ``key`` uint64. ``count``: also count the
    events (:func:`_float_events`; ``minnorm``: bits of the smallest normal). Returns the event
    counts (columns ``F_*``; zeros when not counting).
    """
    n = xb.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        # slices: loop indices from 0 are provably nonnegative, so the loops vectorise
        xs = xb[lo:hi]
        os = ob[lo:hi]
        ov = np.empty(hi - lo, np.uint8)
        if mode == RNE:
            _f32_chunk(xs, os, ov, lo, RNE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits, rbits, key)
        elif mode == RTZ:
            _f32_chunk(xs, os, ov, lo, RTZ, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits, rbits, key)
        elif mode == SR:
            _f32_chunk(xs, os, ov, lo, SR, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits, rbits, key)
        else:  # the other modes: one loop that reads the mode
            _f32_chunk(xs, os, ov, lo, mode, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits, rbits, key)
        if count:
            _float_events(xs, os, ov, minnorm, counts, c, _f32_value)
    return counts.sum(axis=0)


@jit_inline
def _f64_chunk(xs, os, ov, lo, MODE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
               infbits):
    """One chunk of :func:`float_from_f64`, as :func:`_f32_chunk`."""
    key = np.uint64(0)
    for j in range(xs.size):
        r, over = f32_float_one(round_to_odd_f32(xs[j]), MODE, sh0, lim, qbits, maxbits,
                                ovbits_pos, ovbits_neg, infbits, 64, key, lo + j)
        os[j] = r
        ov[j] = np.uint8(over)


#: ``mode`` of :func:`float_from_f64` for IEEE binary32 itself, nearest even, IEEE overflow:
#: the float64 -> float32 conversion instruction.
CAST = -1


@jit_inline
def _f64_cast_chunk(xs, os, ov):
    """One chunk of :func:`float_from_f64` in mode :data:`CAST`: the conversion rounds once,
    to nearest even, on float32's grid with its subnormals, overflowing to an infinity (IEEE
    754, section 5.4.2), which is the model's rounding into FP32; a NaN keeps its sign and
    the top of its payload, made quiet, as the general kernel keeps it. ``ov`` flags a finite
    input that became an infinity."""
    for j in range(xs.size):
        x = xs[j]
        r = np.float32(x)
        os[j] = f32_bits(r)
        ov[j] = np.uint8(abs(r) == np.inf and abs(x) < np.inf)


@jit_parallel
def float_from_f64(x, ob, mode, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits,
                   count, minnorm):
    """Quantize float64 ``x`` into float32 bits ``ob``, deterministic modes only.

    Each input is first rounded to odd at float32 precision, which keeps the correct rounding
    for formats of at most 22 significant bits whose quantum is at least ``2**-147`` (the
    caller checks); the bits then go through the float32 kernel. Arguments and counts as for
    :func:`float_from_f32`. ``mode`` :data:`CAST` (FP32 itself, nearest even, IEEE overflow)
    converts each input with the float32 conversion instead (:func:`_f64_cast_chunk`).
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        xs = x[lo:hi]  # slices: loop indices from 0 are nonnegative, so the loops vectorise
        os = ob[lo:hi]
        ov = np.empty(hi - lo, np.uint8)
        if mode == CAST:
            _f64_cast_chunk(xs, os, ov)
        elif mode == RNE:
            _f64_chunk(xs, os, ov, lo, RNE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits)
        elif mode == RTZ:
            _f64_chunk(xs, os, ov, lo, RTZ, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits)
        else:  # the other modes (never SR here): one loop that reads the mode
            _f64_chunk(xs, os, ov, lo, mode, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg,
                       infbits)
        if count:
            _float_events(xs, os, ov, minnorm, counts, c, _f64_value)
    return counts.sum(axis=0)


@jit_inline
def _fixed_one(xv, MODE, up_scale, down_scale, cmax, cmin, rbits, key, i):
    y = xv * up_scale  # exact: the caller checked the range
    if MODE == RNE:
        r = np.rint(y)
    elif MODE == RNA:
        t = np.trunc(y)
        r = t + (np.copysign(1.0, y) if abs(y - t) >= 0.5 else 0.0)
    elif MODE == RTZ:
        r = np.trunc(y)
    elif MODE == RDN:
        r = np.floor(y)
    elif MODE == RUP:
        r = np.ceil(y)
    elif MODE == ODD:
        fl = np.floor(y)
        r = y if fl == y else (fl if fl - 2.0 * np.floor(0.5 * fl) != 0.0 else fl + 1.0)
    else:  # SR, value-based (two's complement): quant.sr_limit's rule, by quant.sr_up
        ay = abs(y)
        fa = np.floor(ay)
        draw = random_u64(key, np.uint64(i)) >> np.uint64(64 - rbits)
        upm = sr_up(ay - fa, np.int64(y < 0.0), draw, rbits)  # 0 when ay is an integer
        r = np.copysign(fa + np.float64(upm), y)
    rc = min(max(r, cmin), cmax)
    return rc * down_scale + 0.0, np.int64(rc != r)


@jit_inline
def _event_counts(xv, v):
    """The rounding events of a fixed-point result ``v`` of the input ``xv``, as the general
    kernel counts them (0/1 integers): inexact, rounded up, underflow (a finite nonzero input
    that became zero; an infinity saturated to a format's zero bound is an overflow only)."""
    inexact = np.int64(v != xv)
    return inexact, inexact & np.int64(v > xv), (
        np.int64(v == 0.0) & np.int64(xv != 0.0) & np.int64(abs(xv) < np.inf))


@jit_inline
def _fixed_chunk(x, out, lo, hi, MODE, up_scale, down_scale, cmax, cmin, rbits, key, counts,
                 c):
    xs = x[lo:hi]  # slices: indices from 0 let the loop vectorise
    os = out[lo:hi]
    n_inexact = n_up = n_over = n_under = np.int32(0)
    for j in range(xs.size):
        xv = np.float64(xs[j])
        v, ovf = _fixed_one(xv, MODE, up_scale, down_scale, cmax, cmin, rbits, key, lo + j)
        os[j] = v
        i0, u0, z0 = _event_counts(xv, v)
        n_inexact = tally(n_inexact, i0)
        n_up = tally(n_up, u0)
        n_under = tally(n_under, z0)
        n_over = tally(n_over, ovf)
    counts[c, F_INEXACT] = n_inexact
    counts[c, F_UP] = n_up
    counts[c, F_OVERFLOW] = n_over
    counts[c, F_UNDERFLOW] = n_under


@jit_parallel
def fixed_from_float(x, out, mode, up_scale, down_scale, cmax, cmin, rbits, key):
    """Quantize ``x`` into a fixed-point format with codes in ``[cmin, cmax]``.

    Saturating overflow; for WRAP the caller passes infinite bounds, ``down_scale = 1`` and a
    float64 ``out``, then calls :func:`wrap_codes`. ``up_scale = 2**f``. Returns the event
    counts (columns ``F_*`` of :mod:`.quant`, as the general kernel counts them; with WRAP
    only the NaN inputs, invalid for fixed point, are meaningful). Nearest even, toward zero
    and stochastic rounding have loops compiled with the mode as a constant, the other modes
    one loop that reads it.
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        if mode == RNE:
            _fixed_chunk(x, out, lo, hi, RNE, up_scale, down_scale, cmax, cmin, rbits, key,
                         counts, c)
        elif mode == RTZ:
            _fixed_chunk(x, out, lo, hi, RTZ, up_scale, down_scale, cmax, cmin, rbits, key,
                         counts, c)
        elif mode == SR:
            _fixed_chunk(x, out, lo, hi, SR, up_scale, down_scale, cmax, cmin, rbits, key,
                         counts, c)
        else:  # the other modes: one loop that reads the mode
            _fixed_chunk(x, out, lo, hi, mode, up_scale, down_scale, cmax, cmin, rbits, key,
                         counts, c)
        nb = 0
        xs = x[lo:hi]
        for j in range(xs.size):
            v = np.float64(xs[j])
            nb += 1 if v != v else 0
        counts[c, F_INVALID] = nb
    return counts.sum(axis=0)


@jit_parallel
def wrap_codes(x, r, out, mask, w, signed, down_scale, cmax, cmin):
    """WRAP pass after :func:`fixed_from_float` ran unclamped: ``r`` holds the rounded codes.

    Keeps the low ``w`` bits of each code (two's complement when ``signed``) and scales it to
    the value. Returns the event counts (columns ``F_*``): a code beyond ``[cmin, cmax]``
    overflowed; an infinite input is invalid (an infinity cannot be wrapped).
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, N_FLAGS), np.int64)
    two64 = 18446744073709551616.0
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        xs, rs, os = x[lo:hi], r[lo:hi], out[lo:hi]  # slices: nonnegative loop indices
        nb = 0
        if w <= 53:  # codes and their differences are exact in float64: branch-free
            m = 2.0**w
            for j in range(xs.size):
                inf_in = abs(np.float64(xs[j])) == np.inf
                nb += 1 if inf_in else 0
                rr = 0.0 if (inf_in or abs(rs[j]) == np.inf) else rs[j]
                k = rr - m * np.floor(rr / m)  # in [0, 2**w): exact, it is representable
                if signed and k >= 0.5 * m:
                    k = k - m
                os[j] = k * down_scale + 0.0
        else:
            for j in range(xs.size):
                a = abs(rs[j])
                if abs(np.float64(xs[j])) == np.inf:
                    nb += 1
                    a = 0.0
                elif a == np.inf:
                    a = 0.0  # |x| * 2**f beyond float64: a multiple of 2**900, so 0 mod 2**64
                elif a >= two64:
                    # a and the multiple of 2**64 share a's ulp (>= 2**12): the difference is
                    # exact
                    a = a - two64 * np.floor(a / two64)
                code = np.uint64(a)  # exact: an integer below 2**64
                if rs[j] < 0.0:
                    code = np.uint64(0) - code
                code = code & mask
                if signed and (code >> np.uint64(w - 1)) != np.uint64(0):
                    v = -u64_to_f64_rtz((np.uint64(0) - code) & mask)  # magnitude of the negative
                else:
                    v = u64_to_f64_rtz(code)
                os[j] = v * down_scale + 0.0
        n_inexact = n_up = n_over = n_under = np.int32(0)
        for j in range(xs.size):
            i0, u0, z0 = _event_counts(np.float64(xs[j]), np.float64(os[j]))
            n_inexact = tally(n_inexact, i0)
            n_up = tally(n_up, u0)
            n_under = tally(n_under, z0)
            n_over = tally(n_over, np.int64(rs[j] > cmax) | np.int64(rs[j] < cmin))
        counts[c, F_INEXACT] = n_inexact
        counts[c, F_UP] = n_up
        counts[c, F_OVERFLOW] = n_over
        counts[c, F_UNDERFLOW] = n_under
        counts[c, F_INVALID] = nb
    return counts.sum(axis=0)
