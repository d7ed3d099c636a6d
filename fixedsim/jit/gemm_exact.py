"""Kernels of exact accumulation: the operand scan that chooses a path, compensated dot
products and the filter that rounds sums known within a proven bound."""


import numpy as np

from .bits import f64_bits
from .options import jit, jit_inline
from .quant import (
    CHUNK,
    F_INEXACT,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    N_FLAGS,
    _quantize_value,
)


@jit
def dot2_at(A, BT, rows, cols, hi, lo, t):
    """Compensated dot products (Ogita, Rump and Oishi's Dot2 with exact products) of the
    listed elements: ``hi[i] + lo[i]`` approximates ``A[rows[i]] . BT[cols[i]]`` with
    ``|fl(hi + lo) - exact| <= u |fl(hi + lo)| + gamma(K)**2 * sum|a_k b_k|``, and ``t[i]``
    is ``sum|a_k b_k|`` in float64. Every product must be exact in float64 (and every sum
    far from underflow and overflow). Serial: it runs right after a BLAS call."""
    K = A.shape[1]
    for i in range(rows.size):
        ar = A[rows[i]]
        br = BT[cols[i]]
        s = 0.0
        c = 0.0
        a = 0.0
        for k in range(K):
            p = ar[k] * br[k]
            x = s + p
            z = x - s
            c += (s - (x - z)) + (p - z)
            s = x
            a += abs(p)
        hi[i] = s
        lo[i] = c
        t[i] = a


#: the scalar quantizer inlined into :func:`round_filtered` (one call site, hot loop)
_quantize_value_inline = jit_inline(_quantize_value)

_KEEP = (1 << F_OVERFLOW) | (1 << F_UNDERFLOW) | (1 << F_SUBNORMAL) | (1 << F_NAN)


@jit
def round_filtered(S, wa, wb, c, P, U, D, out, fail):
    """Round exact sums known only within a bound, when the bound decides the rounding.

    The exact sum of element ``(r, j)`` lies within ``c * wa[r] * wb[j]`` of ``S[r, j]``
    (``S``, ``wa``, ``wb`` finite, nonnegative weights). With ``[lo, hi]`` that interval
    widened outward by one float64 ulp, the element is decided when ``lo`` and ``hi`` round
    (deterministic mode, parameters ``P, U, D``) to the same value ``v`` with the same
    overflow, underflow, subnormal and NaN events, ``0`` is not in ``[lo, hi]`` and ``v`` is
    not in it either: every rounding is monotone and these events are monotone in the
    magnitude, so the exact sum rounds to ``v``, inexactly, with those events. Decided
    elements are written to ``out`` and counted; the others are marked in ``fail`` (uint8).
    Serial (it runs right after a BLAS call). Returns ``(counts, number of failures)``.
    """
    R, N = S.shape
    counts = np.zeros(N_FLAGS, np.int64)
    nfail = 0
    idx = np.uint64(0)
    for r in range(R):
        for j in range(N):
            s = S[r, j]
            w = wa[r] * wb[j]
            ok = False
            if w > 0.0 and w < np.inf and abs(s) < np.inf:
                err = c * w
                lo = np.nextafter(s - err, -np.inf)
                hi = np.nextafter(s + err, np.inf)
                if (lo > 0.0 or hi < 0.0) and abs(lo) < np.inf and abs(hi) < np.inf:
                    vl, fl = _quantize_value_inline(lo, P, U, D, idx)
                    vh, fh = _quantize_value_inline(hi, P, U, D, idx)
                    if (vl == vh and (fl & _KEEP) == (fh & _KEEP)
                            and not (lo <= vl and vl <= hi)):
                        out[r, j] = vl
                        ok = True
                        f = (fl & _KEEP) | (1 << F_INEXACT)
                        for k in range(N_FLAGS):
                            counts[k] += (f >> k) & 1
            if not ok:
                fail[r, j] = 1
                nfail += 1
    return counts, nfail


@jit_inline
def _exponent_of_pow2(v):
    """``log2(v)`` for an integer ``v`` that is a power of two below 2**53."""
    return (f64_bits(np.float64(v)) >> 52) - 1023


@jit
def operand_bits(x):
    """One pass over float64 ``x`` (1-D, contiguous): the fields of ``fixedsim.matmul._Bits``.

    Each finite nonzero ``|x| = C * 2**lsb`` with ``C`` odd; returns ``(nonfinite, sig, lsb,
    top)``: the number of infinities and NaNs, the most significant bits of any ``C``, the
    smallest ``lsb``, and the largest ``top`` with ``|x| < 2**top`` (frexp's exponent);
    ``top == -4096`` when no element is finite and nonzero. Serial (about 0.1 ms for 512x512):
    a parallel kernel called right after a BLAS call would wait for OpenBLAS's spinning workers.
    """
    n = x.size
    nch = (n + CHUNK - 1) // CHUNK
    bad = np.zeros(nch, np.int64)
    sig = np.zeros(nch, np.int64)
    lsb = np.zeros(nch, np.int64)
    top = np.zeros(nch, np.int64)
    for c in range(nch):
        lo = c * CHUNK
        xs = x[lo:min(n, lo + CHUNK)]  # a slice: indices from 0 let the loop vectorise
        nb = 0
        smax = 0
        lmin = 4096
        tmax = -4096
        for i in range(xs.size):
            b = f64_bits(xs[i])
            ef = (b >> 52) & 0x7FF
            frac = b & 0xFFFFFFFFFFFFF
            normal = np.int64(ef != 0)
            # significand as an integer (the hidden bit for normal numbers), its exponent
            m = frac | (normal << 52)
            tz = _exponent_of_pow2(m & -m)  # m == 0 (a zero) gives garbage, masked below
            hb = (f64_bits(np.float64(m)) >> 52) - 1023  # floor(log2 m): m exact in float64
            e_min = ef - normal  # the exponent of the last place: 2**(e_min - 1074)
            l_el = e_min - 1074 + tz
            t_el = e_min - 1074 + hb + 1
            s_el = hb - tz + 1
            use = np.int64(ef != 0x7FF) & np.int64(m != 0)
            nb += np.int64(ef == 0x7FF)
            lmin = min(lmin, l_el + (1 - use) * 8192)
            tmax = max(tmax, t_el - (1 - use) * 8192)
            smax = max(smax, s_el * use)
        bad[c] = nb
        sig[c] = smax
        lsb[c] = lmin
        top[c] = tmax
    return bad.sum(), sig.max() if nch else 0, lsb.min() if nch else 4096, \
        top.max() if nch else -4096
