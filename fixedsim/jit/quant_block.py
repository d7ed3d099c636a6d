"""Fused block quantizer: float32 input into an MX format with a power-of-two scale.

One pass per block: the largest magnitude from the input bits (exact), the scale exponent ``k``
from the rule by integer arithmetic on its significand and exponent, then every element rounded
by :func:`fixedsim.jit.quant_fast.f32_float_one` with the element's subnormal threshold and
quanta moved by ``k``. Rounding ``x`` at the quantum ``q * 2**k`` is rounding ``x / 2**k`` at
``q`` and multiplying back, exactly, so the result bits are the value ``element * 2**k``; the
caller checks that every such value and quantum is a float32 (``2**-149`` to ``2**128``; the one
value that can reach ``2**128``, a rounding up to it, is written as ``2**128``).

Rules (``rule``): 0 "ocp" floor, 1 "ceil", 2 "even", 3 "rceil" (see
:data:`fixedsim.blockformats.SCALE_RULES`). A block holding NaN or an infinity is all NaN and its
exponent is :data:`NAN_BLOCK`; one the kernel does not round gets :data:`SLOW_BLOCK`.
"""

import math

import numpy as np
from numba import prange

from .bits import f32_bits, f32_from_bits
from .options import jit_inline, jit_parallel
from .quant import RNE, SR
from .quant_fast import f32_float_one

#: The exponent returned for a block holding NaN or an infinity.
NAN_BLOCK = 1 << 20
#: The exponent returned for a block the kernel leaves to the caller: its scale puts the
#: element's smallest normal below float32's (``emin + k < -126``), where the element's quantum
#: depends on the exponent of a float32 subnormal (blocks whose maximum is below about 2**-110).
SLOW_BLOCK = 1 << 21
#: Blocks per parallel chunk.
BLOCKS_PER_CHUNK = 256
RULE_OCP, RULE_CEIL, RULE_EVEN, RULE_RCEIL = range(4)


@jit_inline
def _bitlen(v):
    n = 0
    while v != 0:
        v >>= 1
        n += 1
    return n


@jit_inline
def block_exponent(amax, rule, emax, prec, mmax_n, k_lo):
    """The scale exponent of a block whose largest magnitude has float32 bits ``amax``
    (finite). ``prec``: the element's significant bits; ``mmax_n``: the element max's
    significand normalised to 24 bits (``max = mmax_n * 2**(emax - 23)``)."""
    if amax == 0:
        return k_lo
    ef = amax >> 23
    mant = amax & 0x7FFFFF
    if ef == 0:  # a subnormal maximum: normalise its significand to 24 bits
        b = _bitlen(mant)
        fl = b - 1 - 149
        mn = mant << (24 - b)
    else:
        fl = ef - 127
        mn = mant | 0x800000
    if rule == RULE_OCP:
        k = fl - emax
    elif rule == RULE_CEIL:
        k = fl - emax + (1 if mn != 0x800000 else 0)
    elif rule == RULE_EVEN:  # round to prec bits, ties away: a carry out doubles the scale
        k = fl - emax + (1 if mn + (1 << (24 - prec - 1)) >= (1 << 24) else 0)
    else:  # rceil: amax <= max * 2**k, comparing the normalised significands
        k = fl - emax + (1 if mn > mmax_n else 0)
    return k if k > k_lo else k_lo


@jit_inline
def _mx_chunk(xb, out, kout, b0, b1, block, MODE, rule, emax, prec, mmax_n, k_lo, sh0, emin127,
              maxe, minsub_exp, rbits, key):
    for b in range(b0, b1):
        lo = b * block
        xs = xb[lo:lo + block]
        os = out[lo:lo + block]
        amax = np.int64(0)
        for j in range(block):
            a = np.int64(xs[j]) & 0x7FFFFFFF
            amax = a if a > amax else amax
        if amax >= 0x7F800000:  # NaN or an infinity: a NaN block
            kout[b] = NAN_BLOCK
            for j in range(block):
                os[j] = np.nan
            continue
        if amax == 0:  # zeros only (the zero-padded rows of a lowered product): themselves,
            kout[b] = k_lo  # at the smallest scale, as the oracle gives them
            for j in range(block):
                os[j] = -0.0 if xs[j] >> 31 else 0.0
            continue
        k = block_exponent(amax, rule, emax, prec, mmax_n, k_lo)
        if emin127 + k < 1:  # element subnormals below float32's normals: left to the caller
            kout[b] = SLOW_BLOCK
            continue
        kout[b] = k
        maxbits = f32_bits(np.float32(math.ldexp(maxe, k)))  # inf bits beyond float32
        qbits = f32_bits(np.float32(math.ldexp(1.0, minsub_exp + k)))
        lim = emin127 + k
        for j in range(block):
            r, _ = f32_float_one(np.int64(xs[j]), MODE, sh0, lim, qbits, maxbits, maxbits,
                                 maxbits, maxbits, rbits, key, lo + j)
            if (r & 0x7FFFFFFF) == 0x7F800000:  # rounded up to 2**128
                os[j] = -(2.0**128) if r & 0x80000000 else 2.0**128
            else:
                os[j] = np.float64(f32_from_bits(np.uint32(r)))


@jit_parallel
def mx_from_f32(xb, out, kout, block, mode, rule, emax, prec, mmax_n, k_lo, sh0, emin127, maxe,
                minsub_exp, rbits, key):
    """Quantize float32 bits ``xb`` (flat, blocks of ``block`` consecutive elements) into the
    float64 values ``out``; the scale exponents into ``kout`` (one per block). Returns nothing;
    the caller checks ``kout`` against the scale format's largest exponent."""
    nb = xb.size // block
    nch = (nb + BLOCKS_PER_CHUNK - 1) // BLOCKS_PER_CHUNK
    for c in prange(nch):
        b0 = c * BLOCKS_PER_CHUNK
        b1 = min(nb, b0 + BLOCKS_PER_CHUNK)
        if mode == RNE:  # the common modes compiled with the mode a constant (faster loop)
            _mx_chunk(xb, out, kout, b0, b1, block, RNE, rule, emax, prec, mmax_n, k_lo, sh0,
                      emin127, maxe, minsub_exp, rbits, key)
        elif mode == SR:
            _mx_chunk(xb, out, kout, b0, b1, block, SR, rule, emax, prec, mmax_n, k_lo, sh0,
                      emin127, maxe, minsub_exp, rbits, key)
        else:  # the others with the mode a variable: one more copy, not five
            _mx_chunk(xb, out, kout, b0, b1, block, mode, rule, emax, prec, mmax_n, k_lo, sh0,
                      emin127, maxe, minsub_exp, rbits, key)
