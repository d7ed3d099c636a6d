"""Fast quantizers for the common cases, bit-identical to :mod:`fixedsim.jit.quant`.

* :func:`float_from_f32`: float32 input into a float format whose values are all float32
  (every preset), subnormals on. Branch-free integer arithmetic on the input bits, one loop per
  rounding mode so that the compiler vectorises it.
* :func:`fixed_from_float`: float32/float64 input into a fixed-point format, when ``x * 2**f``
  is exact in float64 (the caller checks the range). One loop per rounding mode.

Neither counts events; :func:`fixedsim.quantize.quantize` uses the general kernel when asked for
statistics. Both are checked bit for bit against the general kernel and the Fraction oracle.
"""

import numpy as np
from numba import prange

from .options import jit_inline, jit_parallel
from .quant import (
    CHUNK,
    ODD,
    OVF_SAT,
    OVF_WRAP,
    RDN,
    RNA,
    RNE,
    RTZ,
    RUP,
    SR,
    sr_limit,
    u64_to_f64_rtz,
)
from .rng import random_u64

_U1 = np.uint64(1)


@jit_inline
def _f32_float_one(b, MODE, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits, rbits,
                   key, i):
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
    if res > maxbits:
        res = ovbits_neg if neg else ovbits_pos
    if a >= 0x7F800000:
        res = a | 0x400000 if a > 0x7F800000 else infbits
    return res | s


@jit_parallel
def float_from_f32(xb, ob, mode, sh0, lim, qbits, maxbits, ovbits_pos, ovbits_neg, infbits,
                   rbits, key):
    """Quantize float32 bits ``xb`` into float32 bits ``ob`` (see module docstring).

    ``sh0 = 23 - man_bits``; ``lim = emin + 127``; ``qbits``: bits of the smallest subnormal;
    ``maxbits``: bits of max; ``ovbits_*``: result bits of an overflow by sign; ``infbits``: the
    result bits of an infinite input. All int64; ``key`` uint64.
    """
    n = xb.size
    nch = (n + CHUNK - 1) // CHUNK
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        # slices: loop indices from 0 are provably nonnegative, so the loops vectorise
        xs = xb[lo:hi]
        os = ob[lo:hi]
        if mode == RNE:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), RNE, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        elif mode == RNA:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), RNA, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        elif mode == RTZ:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), RTZ, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        elif mode == RDN:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), RDN, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        elif mode == RUP:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), RUP, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        elif mode == ODD:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), ODD, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)
        else:
            for j in range(xs.size):
                os[j] = _f32_float_one(np.int64(xs[j]), SR, sh0, lim, qbits, maxbits,
                                       ovbits_pos, ovbits_neg, infbits, rbits, key, lo + j)


@jit_inline
def _fixed_one(xv, MODE, up_scale, down_scale, cmax, cmin, ovf, mask, w, signed, rbits, key,
               i):
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
    else:  # SR, value-based (two's complement): see quant.sr_limit
        ay = abs(y)
        fa = np.floor(ay)
        z = (ay - fa) * 2.0**rbits if rbits < 64 else (ay - fa) * 18446744073709551616.0
        t = np.uint64(np.floor(z))
        cc = np.uint64(np.ceil(z))
        draw = random_u64(key, np.uint64(i)) >> np.uint64(64 - rbits)
        limit, below = sr_limit(t, cc, rbits, y < 0.0, True)
        upm = (draw < limit) if below else (draw >= limit)
        if fa == ay:
            upm = False
        r = np.copysign(fa + (1.0 if upm else 0.0), y)
    if ovf == OVF_WRAP:
        a = abs(r)
        if a == np.inf:
            a = 0.0  # |x| * 2**f beyond float64: a multiple of 2**900, so 0 modulo 2**64
        elif a >= 18446744073709551616.0:
            # a and the multiple of 2**64 share a's ulp (>= 2**12): the difference is exact
            a = a - 18446744073709551616.0 * np.floor(a / 18446744073709551616.0)
        c = np.uint64(a)  # exact: an integer below 2**64
        if r < 0.0:
            c = np.uint64(0) - c
        c = c & mask
        if signed and (c >> np.uint64(w - 1)) != np.uint64(0):
            r = -u64_to_f64_rtz((np.uint64(0) - c) & mask)  # the negative code's magnitude
        else:
            r = u64_to_f64_rtz(c)
    else:
        r = cmax if r > cmax else (cmin if r < cmin else r)
    return r * down_scale + 0.0


@jit_inline
def _fixed_chunk(x, out, lo, hi, MODE, WRAP, up_scale, down_scale, cmax, cmin, mask, w, signed,
                 rbits, key):
    xs = x[lo:hi]  # slices: indices from 0 let the loop vectorise
    os = out[lo:hi]
    for j in range(xs.size):
        os[j] = _fixed_one(np.float64(xs[j]), MODE, up_scale, down_scale, cmax, cmin, WRAP, mask,
                           w, signed, rbits, key, lo + j)


@jit_parallel
def fixed_from_float(x, out, mode, up_scale, down_scale, cmax, cmin, ovf, mask, w, signed,
                     rbits, key):
    """Quantize ``x`` into a fixed-point format with codes in ``[cmin, cmax]``.

    ``up_scale = 2**f``, ``down_scale = 2**-f``; ``mask = 2**w - 1`` (uint64). Returns the number
    of NaN inputs, and of infinite inputs under WRAP (both invalid for fixed point). One loop per
    (rounding mode, wrap or saturate), so that each is compiled without branches on them.
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    bad = np.zeros(nch, np.int64)
    wrap = ovf == OVF_WRAP
    for c in prange(nch):
        lo = c * CHUNK
        hi = min(n, lo + CHUNK)
        if wrap:
            if mode == RNE:
                _fixed_chunk(x, out, lo, hi, RNE, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RNA:
                _fixed_chunk(x, out, lo, hi, RNA, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RTZ:
                _fixed_chunk(x, out, lo, hi, RTZ, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RDN:
                _fixed_chunk(x, out, lo, hi, RDN, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RUP:
                _fixed_chunk(x, out, lo, hi, RUP, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == ODD:
                _fixed_chunk(x, out, lo, hi, ODD, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            else:
                _fixed_chunk(x, out, lo, hi, SR, OVF_WRAP, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
        else:
            if mode == RNE:
                _fixed_chunk(x, out, lo, hi, RNE, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RNA:
                _fixed_chunk(x, out, lo, hi, RNA, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RTZ:
                _fixed_chunk(x, out, lo, hi, RTZ, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RDN:
                _fixed_chunk(x, out, lo, hi, RDN, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == RUP:
                _fixed_chunk(x, out, lo, hi, RUP, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            elif mode == ODD:
                _fixed_chunk(x, out, lo, hi, ODD, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
            else:
                _fixed_chunk(x, out, lo, hi, SR, OVF_SAT, up_scale, down_scale, cmax, cmin,
                             mask, w, signed, rbits, key)
        nb = 0
        xs = x[lo:hi]
        for j in range(xs.size):
            v = np.float64(xs[j])
            nb += 1 if (v != v or (wrap and abs(v) == np.inf)) else 0
        bad[c] = nb
    return bad.sum()
