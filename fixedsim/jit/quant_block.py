"""Fused block quantizer: float32 input into an MX format with a power-of-two scale.

Each parallel chunk of :data:`BLOCKS_PER_CHUNK` blocks takes two passes:

1. per block, the largest magnitude from the input bits (exact), the scale exponent ``k`` from
   the rule by integer arithmetic on its significand and exponent (:func:`block_exponent`),
   and ``k`` written for each element of the block into a chunk-local array;
2. one loop over the chunk's elements (long and branch-free, so the compiler vectorises it)
   rounding each at its own quantum in float64 arithmetic (:func:`mx_value`).

Rounding ``x`` at the quantum ``2**q`` of ``x / 2**k`` moved by ``k`` is exact in float64 for
every float32 ``x`` and every ``q`` the formats give (``-149 <= q < 128``; the caller checks the
lower bound): the float64 of a float32 is exact, ``|x| * 2**-q`` is an exact scaling by a power
of two within float64's normal range, and ``floor`` and the fraction of it are exact. Nearest
even takes one addition and one subtraction of ``1.5 * 2**(q + 52)``, which rounds ``x`` to a
multiple of ``2**q`` to nearest even in the hardware's own rounding (``|x| < 2**(q + 51)``).
The value ``element * 2**k`` comes out as a float64 (one past float32's range, ``2**128``,
included); its sign is the input's (a negative input that rounds to zero gives ``-0.0``).

Rules (``rule``): 0 "ocp" floor, 1 "ceil", 2 "even", 3 "rceil" (see
:data:`fixedsim.blockformats.SCALE_RULES`). A block holding NaN or an infinity is all NaN and its
exponent is :data:`NAN_BLOCK`.
"""

import numpy as np
from numba import prange

from .bits import f32_from_bits, f64_bits, f64_from_bits
from .options import jit_inline, jit_parallel
from .quant import ODD, RDN, RNA, RNE, RTZ, RUP, SR
from .rng import random_u64

#: The exponent returned for a block holding NaN or an infinity.
NAN_BLOCK = 1 << 20
#: Blocks per parallel chunk.
BLOCKS_PER_CHUNK = 256
RULE_OCP, RULE_CEIL, RULE_EVEN, RULE_RCEIL = range(4)
_SIGN32 = np.int64(0x80000000)
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


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
def mx_value(b, k, MODE, emin, man_bits, maxb64, minb64, fixed, sr_scale, rbits, key, i):
    """The value ``element * 2**k`` (float64) of float32 bits ``b`` (int64, finite) in a block
    of scale ``2**k``: ``x / 2**k`` rounded into the element in mode ``MODE``, saturating, times
    ``2**k``.

    A float element: ``emin``, ``man_bits``; its largest value has the float64 bits ``maxb64``
    (``minb64`` the same), ``fixed`` 0. A fixed-point element (two's complement, quantum
    ``2**-f``): ``emin = emax`` (``floor(log2(max))``, so that ``emin + k`` is at least every
    exponent of the block), ``man_bits = emax + f``, ``maxb64`` and ``minb64`` the bits of its
    largest value and of its most negative value's magnitude, ``fixed`` 1: zeros are +0.0 and
    stochastic rounding truncates the value (toward -inf), as two's complement hardware does,
    not the magnitude. ``sr_scale``: ``2.0**rbits``; the draw of element ``i`` is the top
    ``rbits`` bits of ``random_u64(key, i)``."""
    x = np.float64(f32_from_bits(np.uint32(b)))
    e = ((f64_bits(x) >> 52) & 0x7FF) - 1023  # floor(log2|x|): x is a normal float64 or 0
    lo = emin + k
    q = (e if e > lo else lo) - man_bits  # the quantum 2**q of x (moved by k)
    big = f64_from_bits(maxb64 + (k << 52))  # the element's largest value times 2**k
    bigneg = f64_from_bits(minb64 + (k << 52))  # and its most negative one's magnitude
    neg = (b & _SIGN32) != 0
    sign = 0 if fixed else (b & _SIGN32) << 32  # floats keep the sign of a zero
    if MODE == RNE:
        c = f64_from_bits(((q + 1075) << 52) | (1 << 51))  # 1.5 * 2**(q + 52)
        r = (x + c) - c
        r = r if r < big else big
        r = r if r > -bigneg else -bigneg
        return f64_from_bits(f64_bits(r) | sign)
    y = abs(x) * f64_from_bits((1023 - q) << 52)  # |x| / 2**q, exact
    fl = np.floor(y)
    frac = y - fl
    if MODE == RNA:
        up = frac >= 0.5
    elif MODE == RTZ:
        up = False
    elif MODE == RDN:
        up = neg and frac != 0.0
    elif MODE == RUP:
        up = (not neg) and frac != 0.0
    elif MODE == ODD:
        up = frac != 0.0 and (np.int64(fl) & 1) == 0
    else:  # SR: the draw against the fraction's top random_bits bits
        draw = random_u64(key, np.uint64(i)) >> np.uint64(64 - rbits)
        fs = frac * sr_scale  # exact
        if fixed and neg:  # the value truncated (toward -inf): the magnitude goes up when
            # draw >= floor((1 - frac) * 2**bits) = 2**bits - ceil(frac * 2**bits)
            up = (_ONES >> np.uint64(64 - rbits)) - draw < np.uint64(np.ceil(fs))
        else:  # the magnitude truncated: up when draw < floor(frac * 2**bits)
            up = draw < np.uint64(fs)
    r = (fl + (1.0 if up else 0.0)) * f64_from_bits((q + 1023) << 52)
    top = bigneg if neg else big
    r = r if r < top else top
    v = f64_from_bits(f64_bits(r) | sign)
    return (0.0 - v) if (neg and fixed) else v


@jit_inline
def _round_run(xs, os, ke, lo, MODE, emin, man_bits, maxb64, minb64, fixed, sr_scale, rbits,
               key):
    """Pass 2 over one chunk: ``os[j]`` the value of ``xs[j]`` in the block of exponent
    ``ke[j]``."""
    for j in range(xs.size):
        os[j] = mx_value(np.int64(xs[j]), ke[j], MODE, emin, man_bits, maxb64, minb64, fixed,
                         sr_scale, rbits, key, lo + j)


@jit_parallel
def mx_from_f32(xb, out, kout, block, mode, rule, emax, prec, mmax_n, k_lo, emin, man_bits,
                maxb64, minb64, fixed, sr_scale, rbits, key):
    """Quantize float32 bits ``xb`` (flat, blocks of ``block`` consecutive elements) into the
    float64 values ``out``; the scale exponents into ``kout`` (one per block). The element:
    ``emax``, ``prec`` and ``mmax_n`` for the rule (:func:`block_exponent`), the others as
    :func:`mx_value` takes them.

    Returns ``(NaN blocks, largest exponent of the others)`` (``k_lo`` when there is none),
    for the caller's checks against the scale format."""
    nb = xb.size // block
    nch = (nb + BLOCKS_PER_CHUNK - 1) // BLOCKS_PER_CHUNK
    stats = np.empty((max(nch, 1), 2), np.int64)
    stats[0, 0] = 0
    stats[0, 1] = k_lo
    for c in prange(nch):
        b0 = c * BLOCKS_PER_CHUNK
        b1 = min(nb, b0 + BLOCKS_PER_CHUNK)
        lo = b0 * block
        ke = np.empty((b1 - b0) * block, np.int64)
        nnan = 0
        kmax = k_lo
        for b in range(b0, b1):  # pass 1: each block's exponent, for each of its elements
            xs = xb[b * block:(b + 1) * block]
            amax = np.uint32(0)
            for j in range(xs.size):
                a = xs[j] & np.uint32(0x7FFFFFFF)
                amax = a if a > amax else amax
            if amax >= 0x7F800000:  # NaN or an infinity: a NaN block (values written below)
                kout[b] = NAN_BLOCK
                k = k_lo
                nnan += 1
            else:
                k = block_exponent(np.int64(amax), rule, emax, prec, mmax_n, k_lo)
                kout[b] = k
                kmax = k if k > kmax else kmax
            kb = ke[(b - b0) * block:(b - b0 + 1) * block]
            for j in range(kb.size):
                kb[j] = k
        xs = xb[lo:b1 * block]
        os = out[lo:b1 * block]
        # the common modes compiled with the mode a constant, float elements without the
        # fixed-point branches (22% faster stochastic rounding); the other modes, and
        # fixed-point elements (MXINT8) but for nearest even, with both variables: one more
        # copy, not fourteen
        if mode == RNE and not fixed:
            _round_run(xs, os, ke, lo, RNE, emin, man_bits, maxb64, minb64, 0, sr_scale, rbits,
                       key)
        elif mode == RNE:
            _round_run(xs, os, ke, lo, RNE, emin, man_bits, maxb64, minb64, 1, sr_scale, rbits,
                       key)
        elif mode == SR and not fixed:
            _round_run(xs, os, ke, lo, SR, emin, man_bits, maxb64, minb64, 0, sr_scale, rbits,
                       key)
        else:
            _round_run(xs, os, ke, lo, mode, emin, man_bits, maxb64, minb64, fixed, sr_scale,
                       rbits, key)
        if nnan:
            for b in range(b0, b1):
                if kout[b] == NAN_BLOCK:
                    ob = out[b * block:(b + 1) * block]
                    for j in range(ob.size):
                        ob[j] = np.nan
        stats[c, 0] = nnan
        stats[c, 1] = kmax
    return stats[:, 0].sum(), stats[:, 1].max()


# -- NVFP4 and other "nearest" scales: any value of the scale format, times a tensor scale ------


@jit_parallel
def block_amax_f32(xb, block, amax, fmax):
    """Per block of float32 bits ``xb``: ``amax[b]`` the largest magnitude's bits (at least
    ``0x7F800000`` where the block holds NaN or an infinity), ``fmax[b]`` the largest finite
    magnitude's bits (for a per-tensor scale, which NaN blocks take part in)."""
    for b in prange(xb.size // block):
        m = np.uint32(0)
        f = np.uint32(0)
        for j in range(b * block, (b + 1) * block):
            a = xb[j] & np.uint32(0x7FFFFFFF)
            m = a if a > m else m
            if a < np.uint32(0x7F800000) and a > f:
                f = a
        amax[b] = m
        fmax[b] = f


@jit_inline
def _fraction_bits(A, d, Sg):
    """The 64 bits below the binary point of ``A * 2**d / Sg`` (``A`` < 2**24, ``Sg`` odd and
    < 2**31, all exact integers), truncated: a long division that shifts in 32 bits at a time
    (``r < Sg``: ``r << 32`` fits)."""
    s2 = d + 64  # the bits wanted: floor(A * 2**s2 / Sg) modulo 2**64
    if s2 < 0:  # floor(A * 2**s2 / Sg) = floor(floor(A / 2**-s2) / Sg), below 2**24
        return (A >> np.uint64(-s2)) // Sg if s2 > -64 else np.uint64(0)
    t = A // Sg
    r = A % Sg
    while s2 > 0:
        c = s2 if s2 < 32 else 32
        r = r << np.uint64(c)
        t = (t << np.uint64(c)) | (r // Sg)  # modulo 2**64: the fraction's bits stay
        r = r % Sg
        s2 -= c
    return t


@jit_inline
def scaled_value(b, S, iS, Sg, eS, MODE, emin, man_bits, big_el, neg_zero, rbits, key, i):
    """The value ``element * S`` (float64) of float32 bits ``b`` (int64, finite) in a block
    whose scale is ``S`` (float64, > 0, ``S = Sg * 2**eS`` with ``Sg`` odd, < 2**31; ``iS``
    about ``1 / S``): ``x / S`` rounded into a float element (``emin``, ``man_bits``, largest
    value ``big_el``; ``neg_zero``: it has -0) in mode ``MODE``, saturating, times ``S``.

    Exact without dividing exactly: the element exponent ``E`` of ``x / S`` and the count
    ``n`` of quanta ``Q = 2**(max(E, emin) - man_bits) * S`` below ``|x|`` are guessed in
    float64 (multiplying by ``iS``: off by at most one) and then fixed by exact comparisons
    (``2**E * S``, ``n * Q`` and ``(n + 1/2) * Q`` have at most ``man_bits + 2 + 31``
    significant bits: exact in float64 for the elements the caller admits); the remainder
    ``|x| - n Q`` is then exact too, and decides every deterministic mode. Stochastic
    rounding draws against the fraction's top ``rbits`` bits from :func:`_fraction_bits`
    (exact integers): the same draw and rule as :func:`fixedsim.reference.round_to_format`'s."""
    x = np.float64(f32_from_bits(np.uint32(b)))
    neg = (b & _SIGN32) != 0
    a = abs(x)
    if a == 0.0:
        return -0.0 if (neg and neg_zero) else 0.0
    y = a * iS
    E = ((f64_bits(y) >> 52) & 0x7FF) - 1023  # y is a normal float64 (caller's range)
    if f64_from_bits((E + 1023) << 52) * S > a:
        E -= 1
    elif f64_from_bits((E + 1024) << 52) * S <= a:
        E += 1
    qe = (E if E > emin else emin) - man_bits
    Q = f64_from_bits((qe + 1023) << 52) * S
    n = np.floor(a * (f64_from_bits((1023 - qe) << 52) * iS))
    if n * Q > a:
        n -= 1.0
    elif (n + 1.0) * Q <= a:
        n += 1.0
    R = a - n * Q  # exact, 0 <= R < Q
    if MODE == RNE:
        up = R + R > Q or (R + R == Q and (np.int64(n) & 1) == 1)
    elif MODE == RNA:
        up = R + R >= Q
    elif MODE == RTZ:
        up = False
    elif MODE == RDN:
        up = neg and R != 0.0
    elif MODE == RUP:
        up = (not neg) and R != 0.0
    elif MODE == ODD:
        up = R != 0.0 and (np.int64(n) & 1) == 0
    else:  # SR: |x| / Q = A * 2**d / Sg, A the significand of x, d = ea - eS - qe
        ef = (b >> 23) & 0xFF
        A = np.uint64((b & 0x7FFFFF) | (0x800000 if ef else 0))
        ea = (ef if ef else 1) - 150
        F = _fraction_bits(A, ea - eS - qe, Sg)
        draw = random_u64(key, np.uint64(i)) >> np.uint64(64 - rbits)
        up = draw < (F >> np.uint64(64 - rbits))
    mag = (n + (1.0 if up else 0.0)) * Q
    top = big_el * S
    mag = mag if mag < top else top
    if mag == 0.0:
        return -0.0 if (neg and neg_zero) else 0.0
    return -mag if neg else mag


@jit_inline
def _odd_significand(S):
    """``(Sg, eS)`` with ``S = Sg * 2**eS`` and ``Sg`` odd (``S`` a positive normal float64)."""
    bits = f64_bits(S)
    m = (bits & 0xFFFFFFFFFFFFF) | (1 << 52)
    e = ((bits >> 52) & 0x7FF) - 1075
    while (m & 1) == 0:
        m >>= 1
        e += 1
    return np.uint64(m), e


@jit_inline
def _scaled_run(xb, out, S, block, b0, b1, MODE, emin, man_bits, big_el, neg_zero, rbits,
                key):
    """The elements of blocks ``b0 .. b1 - 1`` at their blocks' scales ``S`` (NaN: a NaN
    block, its values NaN)."""
    for bl in range(b0, b1):
        sc = S[bl]
        if sc != sc:
            for j in range(bl * block, (bl + 1) * block):
                out[j] = np.nan
            continue
        g, e = _odd_significand(sc)
        iS = 1.0 / sc
        for j in range(bl * block, (bl + 1) * block):
            out[j] = scaled_value(np.int64(xb[j]), sc, iS, g, e, MODE, emin, man_bits, big_el,
                                  neg_zero, rbits, key, j)


@jit_parallel
def scaled_from_f32(xb, out, amax, sout, D, t, block, mode, emin, man_bits, big_el, neg_zero,
                    rbits, key, s_emin, s_man, s_small):
    """Quantize float32 bits ``xb`` (flat, blocks of ``block`` consecutive elements) under
    the "nearest" rule into the float64 values ``out``. Per block, from its largest magnitude's
    bits ``amax`` (:func:`block_amax_f32`; NaN or an infinity: a NaN block, all its values
    NaN, its scale NaN): the scale ``s = amax / D`` rounded to nearest even into the scale
    format (``s_emin``, ``s_man``; no largest value: the caller checks ``sout`` against it),
    at least ``s_small``, into ``sout``; ``D = element max * t`` and the tensor scale ``t``
    float64s, exact. Then each element by :func:`scaled_value` at ``S = s * t`` (exact: the
    caller's bound on the significant bits)."""
    nb = xb.size // block
    S = np.empty(nb, np.float64)
    iD = 1.0 / D
    for bl in prange(nb):
        if amax[bl] >= 0x7F800000:  # a NaN block
            sout[bl] = np.nan
            S[bl] = np.nan
            continue
        sc = scaled_value(np.int64(amax[bl]), D, iD, np.uint64(1), 0, RNE, s_emin, s_man,
                          np.inf, False, 64, np.uint64(0), 0) / D  # exact: a multiple of D
        sc = sc if sc > s_small else s_small
        sout[bl] = sc
        S[bl] = sc * t
    nch = (nb + BLOCKS_PER_CHUNK - 1) // BLOCKS_PER_CHUNK
    for c in prange(nch):
        b0 = c * BLOCKS_PER_CHUNK
        b1 = min(nb, b0 + BLOCKS_PER_CHUNK)
        if mode == RNE:  # the common mode compiled with the mode a constant
            _scaled_run(xb, out, S, block, b0, b1, RNE, emin, man_bits, big_el, neg_zero,
                        rbits, key)
        else:  # one more copy, not seven
            _scaled_run(xb, out, S, block, b0, b1, mode, emin, man_bits, big_el, neg_zero,
                        rbits, key)
