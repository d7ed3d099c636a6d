"""The operand scan that chooses a path of the table (:class:`fixedsim.matmul.core._Bits`)."""

import numpy as np

from .bits import f64_bits, small_log2
from .options import jit
from .quant import CHUNK


@jit
def operand_bits(x):
    """One pass over float64 or float32 ``x`` (1-D, contiguous; a float32 value is widened
    to float64, exactly, and read there): the fields of ``fixedsim.matmul._Bits``.

    Each finite nonzero ``|x| = C * 2**lsb`` with ``C`` odd; returns ``(nonfinite, sig, lsb,
    top)``: the number of infinities and NaNs, the most significant bits of any ``C``, the
    smallest ``lsb``, and the largest ``top`` with ``|x| < 2**top`` (frexp's exponent);
    ``top == -4096`` when no element is finite and nonzero. Serial (about 0.1 ms for 512x512):
    a parallel kernel called right after a BLAS call would wait for OpenBLAS's spinning workers.
    No 64-bit integer becomes a float64 by conversion (:func:`~fixedsim.jit.bits.small_log2`
    reads exponents by bits), so the loop vectorises on AVX2 too.
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
            tz = small_log2(m & -m)  # m == 0 (a zero) gives garbage, masked below
            hb = 52 if normal else small_log2(frac)  # floor(log2 m)
            e_min = ef - normal  # the exponent of the last place: 2**(e_min - 1074)
            use = (ef != 0x7FF) & (m != 0)
            nb += np.int64(ef == 0x7FF)
            lmin = min(lmin, e_min - 1074 + tz if use else 4096)
            tmax = max(tmax, e_min - 1074 + hb + 1 if use else -4096)
            smax = max(smax, hb - tz + 1 if use else 0)
        bad[c] = nb
        sig[c] = smax
        lsb[c] = lmin
        top[c] = tmax
    return bad.sum(), sig.max() if nch else 0, lsb.min() if nch else 4096, \
        top.max() if nch else -4096
