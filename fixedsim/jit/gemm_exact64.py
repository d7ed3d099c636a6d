"""Kernels of correctly rounded float64 dot products on float64 BLAS (Ozaki's error-free
splitting): the splitting of the operands into integer slices and the filter that rounds each
output from its double-double value and proven error bound.

The proof is in :mod:`fixedsim.matmul.exact64`; these kernels trust their inputs. Notation:
``beta`` bits per slice, ``T = 2**beta``, ``t = 2**-beta``. A row ``x`` of ``A`` (of ``B``
transposed) with ``max |x| < 2**e`` is scaled to ``u = x * 2**(beta - e)`` (``|u| < T``) and split
``u = a1 + a2 t + r t`` with ``a1 = RN(u)``, ``a2 = RN((u - a1) T)`` integers (``|a1| <= T``,
``|a2| <= T/2``, ``|r| <= 1/2``), each step exact.
"""

import math

import numpy as np

from .arith import two_sum
from .bits import f64_bits, f64_from_bits, fma
from .options import jit, jit_inline
from .quant import ODD, RDN, RNA, RNE, RTZ, RUP

#: Adding and subtracting it rounds a float64 of magnitude below 2**51 to the nearest integer
#: (ties to even): the sum lies in [2**52, 2**53), where the float64 quantum is 1.
_C52 = 1.5 * 2.0**52
_MINNORM = 2.0**-1022
#: Bounds the error of a float64 dot product from underflow (any length below 2**70).
_ETA = 2.0**-1000
_U4 = 4.0 * 2.0**-53
_ABS = np.int64(0x7FFFFFFFFFFFFFFF)
_MANT = np.int64(0xFFFFFFFFFFFFF)
_SIGN = np.int64(-0x8000000000000000)

# result of :func:`_decide` that leaves the element to the caller
_FAIL = (0.0, 0, False)

__all__ = ["split", "finish", "refine_at"]


@jit_inline
def _pow2(k):
    """``2.0**k`` for an integer ``-1022 <= k <= 1023`` (the bits of a normal power of two)."""
    return f64_from_bits(np.int64(k + 1023) << 52)


@jit_inline
def _scales(m, beta):
    """``(e, s1, s2, inv)`` for a row whose largest magnitude is ``m``: ``m < 2**e``
    (``e = 0`` for ``m = 0``), ``s1 * s2 = 2**(beta - e)`` as two factors that are floats and
    exact in turn, and ``inv = 2**(e - beta)`` when scaling down (else 0)."""
    if m >= _MINNORM:
        e = ((f64_bits(m) >> 52) & 0x7FF) - 1022  # frexp's exponent of a normal m
    else:
        e = math.frexp(m)[1]
    sh = beta - e
    sa = min(sh, 1000)
    s1 = _pow2(sa) if sa >= -1022 else math.ldexp(1.0, sa)
    inv = _pow2(-sh) if sh < 0 else 0.0
    return e, s1, _pow2(sh - sa), inv


@jit_inline
def _max_abs(x):
    """``max |x|`` (finite ``x``), four running maxima (independent chains)."""
    m0 = m1 = m2 = m3 = 0.0
    n4 = x.size - x.size % 4
    for k in range(0, n4, 4):
        v0, v1, v2, v3 = abs(x[k]), abs(x[k + 1]), abs(x[k + 2]), abs(x[k + 3])
        m0 = v0 if v0 > m0 else m0
        m1 = v1 if v1 > m1 else m1
        m2 = v2 if v2 > m2 else m2
        m3 = v3 if v3 > m3 else m3
    for k in range(n4, x.size):
        v = abs(x[k])
        m0 = v if v > m0 else m0
    return max(max(m0, m1), max(m2, m3))


@jit_inline
def _sum_abs(x):
    """``sum |x|`` in float64, four running sums (independent chains): like any order of
    summation of nonnegative terms, at least the exact sum times ``1 - gamma(n)``."""
    s0 = s1 = s2 = s3 = 0.0
    n4 = x.size - x.size % 4
    for k in range(0, n4, 4):
        s0 += abs(x[k])
        s1 += abs(x[k + 1])
        s2 += abs(x[k + 2])
        s3 += abs(x[k + 3])
    for k in range(n4, x.size):
        s0 += abs(x[k])
    return (s0 + s1) + (s2 + s3)


@jit
def split(X, beta, side, c1, c12, c2, tail, nrm, mx, e, bad):
    """Split each row of ``X`` (n, K) at its own scale: rows of ``A`` (``side`` 0) or of
    ``B`` transposed (``side`` 1). Serial: it runs between BLAS calls, whose OpenBLAS workers
    spin for a while after each (a parallel kernel then waits for a CPU).

    Writes the integer slices ``c1 = a1``, ``c2 = a2``, ``c12 = a1 + a2`` (n, K), the row's
    exponent ``e[i]``, ``bad[i] = 1`` when scaling a value lost bits, and the tail operands
    (n, 2K): for ``A``, ``tail = [U12 | Ur]``, ``nrm = sum |U12|``, ``mx = max |Ur|``; for
    ``B``, ``tail = [Vr | V]``, ``nrm = sum |V|``, ``mx = max |Vr|`` (``U12 = a1 + a2 t``,
    ``Ur = r t``; sums in float64), so that ``tail_A @ tail_B.T = sum U12 Vr + Ur V``.
    """
    n, K = X.shape
    T = math.ldexp(1.0, beta)
    t = math.ldexp(1.0, -beta)
    for i in range(n):
        x = X[i]
        ei, s1, s2, inv = _scales(_max_abs(x), beta)
        d1, d2, d12 = c1[i], c2[i], c12[i]
        lo, hi = tail[i, :K], tail[i, K:]
        rt = hi if side == 0 else lo  # r t: Ur for A, Vr for B
        w = lo if side == 0 else hi  # U12 for A, V for B
        # short loops, each writing one array (they vectorise); the scaled value
        # u = x s1 s2 is recomputed rather than stored
        lossy = False
        if inv != 0.0:  # scaled down: a value may have lost bits in the subnormal range
            for k in range(K):
                u = x[k] * s1 * s2
                lossy |= (abs(u) < _MINNORM) & (u * inv != x[k])
        for k in range(K):
            d1[k] = (x[k] * s1 * s2 + _C52) - _C52
        for k in range(K):
            d2[k] = ((x[k] * s1 * s2 - d1[k]) * T + _C52) - _C52
        for k in range(K):
            rt[k] = ((x[k] * s1 * s2 - d1[k]) * T - d2[k]) * t
        for k in range(K):
            d12[k] = d1[k] + d2[k]
        if side == 0:
            for k in range(K):
                w[k] = d1[k] + d2[k] * t
        else:
            for k in range(K):
                w[k] = x[k] * s1 * s2
        acc = _sum_abs(w)
        top = _max_abs(rt)
        nrm[i] = acc
        mx[i] = top
        e[i] = ei
        bad[i] = lossy


@jit
def _decide(H, L, E, sc, p53, mode, emin, emax):
    """Round ``x = (H + L + d) * 2**sc``, ``|d| <= E``, into the float format of ``53`` (or,
    ``p53`` false, ``52``) significand bits with exponents ``emin..emax``, when the bound
    decides it: ``(value, inexact, True)``; ``(0.0, 0, False)`` otherwise.

    ``H = fl(H + L)``. Decided: an exact zero (``H = 0``, ``E = 0``; ``+0`` unless DOWN); an
    exact ``H`` on the grid; or ``x`` strictly between two consecutive float64 values (and, to
    nearest at 53 bits, on a known side of their midpoint), found by comparing ``fl(L - E)``
    and ``fl(L + E)`` with float64 thresholds (strict comparisons: rounding is monotone),
    with ``x``'s binade strictly inside ``emin..emax`` so that no overflow, underflow or
    subnormal result can occur.
    """
    if H == 0.0:
        if E == 0.0 and mode != RDN:
            return 0.0, 0, True
        return _FAIL
    neg = H < 0.0
    h = abs(H)
    l = -L if neg else L
    if not h >= _MINNORM:
        return _FAIL
    b = f64_bits(h)
    ef = ((b >> 52) & 0x7FF) - 1023 + sc
    if ef <= emin or ef >= emax:
        return _FAIL
    shift = np.int64(sc) << 52
    if E == 0.0 and l == 0.0:  # exact
        if p53 or (b & 1) == 0:
            v = f64_from_bits(b + shift)
            return (-v if neg else v), 0, True
        return _FAIL  # a tie of the 52-bit grid
    # rounding to nearest is monotone: fl(l - E) > c implies l - E > c, and fl(l + E) < c
    # implies l + E < c, for every float64 c (each threshold below is one)
    lo = l - E
    hi = l + E
    hp = f64_from_bits(b + 1)  # h is normal and far below the largest float64
    hm = f64_from_bits(b - 1)
    up = hp - h
    dn = h - hm
    if lo > 0.0 and hi < up:
        above = True  # h < x < hp
    elif hi < 0.0 and lo > -dn:
        above = False  # hm < x < h
    else:
        return _FAIL
    # g0 < x < g1: the neighbouring values of the format; near: the nearer one (None: unknown)
    near_known = True
    if p53:
        if above:
            g0, g1 = h, hp
            half = 0.5 * up
        else:
            g0, g1 = hm, h
            half = -0.5 * dn
        near = g0
        if lo > half:
            near = g1
        elif not hi < half:
            near_known = False
    else:  # the 52-bit grid: the float64 values with an even last bit; odd ones are midpoints
        odd = (b & 1) == 1
        if above:
            if odd:
                g0, g1, near = hm, hp, hp
            else:
                g0, g1, near = h, f64_from_bits(b + 2), h
        else:
            if odd:
                g0, g1, near = hm, hp, hm
            else:
                g0, g1, near = f64_from_bits(b - 2), h, h
    if mode == RNE or mode == RNA:
        if not near_known:
            return _FAIL
        v = near
    elif mode == RTZ:
        v = g0
    elif mode == RDN:
        v = g1 if neg else g0
    elif mode == RUP:
        v = g0 if neg else g1
    elif mode == ODD:
        last = f64_bits(g0) if p53 else f64_bits(g0) >> 1
        v = g0 if (last & 1) == 1 else g1
    else:
        return _FAIL
    v = f64_from_bits(f64_bits(v) + shift)
    return (-v if neg else v), 1, True


@jit
def refine_at(ta, tb, rows, cols, ea, eb, beta, crad, p53, mode, emin, emax, out, fail):
    """The listed elements again, from the scaled operands, by a compensated dot product
    (Ogita, Rump and Oishi's Dot2, kept as the unevaluated pair ``p + s``): serial, for the
    few elements :func:`finish` left.

    ``U = ta[r, :K] + ta[r, K:]``, ``V = tb[j, K:]`` (:func:`split`'s tails; the sum is
    exact: the scaled row). TwoProduct (an FMA) and TwoSum give ``sum U V = p + sum(q_k +
    r_k)`` exactly; the float64 sum ``s``
    of the ``2K - 1`` error terms is within ``gamma(2K) sum(|q_k| + |r_k|)`` of theirs, plus
    the FMA's own rounding, at most ``u |r_k|`` and half a subnormal quantum each. The bound
    used is ``crad * sum(|q_k| + |r_k|)`` (``crad >= 2 gamma(2K)``) plus ``2**-1000`` when
    some product is nonzero (an underflowing one may have rounded to zero). Decided elements
    are written to ``out`` and their ``fail`` mark cleared. Returns the numbers of inexact
    results and of elements left.
    """
    K = ta.shape[1] // 2
    cnt = 0
    left = rows.size
    for i in range(rows.size):
        r = rows[i]
        j = cols[i]
        p = 0.0
        s = 0.0
        w = 0.0
        nz = False
        for k in range(K):
            x = ta[r, k] + ta[r, K + k]
            y = tb[j, K + k]
            nz = nz or (x != 0.0 and y != 0.0)
            h = x * y
            e = fma(x, y, -h)
            p, q = two_sum(p, h)
            s += q + e
            w += abs(q) + abs(e)
        H, L = two_sum(p, s)
        E = crad * w
        if nz:
            E += _ETA
        v, inx, ok = _decide(H, L, E, ea[r] + eb[j] - 2 * beta, p53, mode, emin, emax)
        if ok:
            out[r, j] = v
            fail[r, j] = 0
            cnt += inx
            left -= 1
    return cnt, left


@jit
def finish(P11, PM, P22, T, nA, mA, ea, xA, nB, mB, eb, xB, beta, crad, p53, mode, emin, emax,
           out, fail):
    """Each output from its slice products, rounded when its error bound decides it.

    ``P11 = a1 @ b1``, ``PM = (a1 + a2) @ (b1 + b2)``, ``P22 = a2 @ b2`` (exact),
    ``T`` the float64 product of the tails; ``nA, mA`` and ``nB, mB`` the sums and maxima of
    :func:`split` for ``A`` and ``B``; ``crad`` the float64 dot product's relative error
    bound, doubled; ``xA``, ``xB``: infinity for a row or column whose scaling lost bits (its
    elements are left undecided), else 0. The element ``(r, j)`` is ``(P11 + (PM - P11 - P22)
    t + P22 t**2 + T) * 2**(ea[r] + eb[j] - 2 beta)`` up to ``crad * (nA[r] mB[j] + mA[r]
    nB[j])`` (times the same power of two). Decided elements are written to ``out``; the
    others are marked in ``fail``. Returns the numbers of inexact results and of elements left.

    The usual element (53 bits, ``E < |L|``, ``|L| + E`` below half the gap from ``H`` to its
    float64 neighbour on ``L``'s side, a binade well inside the range) is rounded inline: the
    exact sum lies strictly between ``H`` and that neighbour, nearer ``H``; the others go
    through :func:`_decide`. Serial (it runs right after BLAS calls).
    """
    R, N = P11.shape
    t = math.ldexp(1.0, -beta)
    t2 = t * t
    near = mode == RNE or mode == RNA
    rup, rdn, odd = mode == RUP, mode == RDN, mode == ODD
    cnt = 0
    slow = 0
    for r in range(R):
        for j in range(N):  # branch-free: the rounding is a choice of bits
            p11 = P11[r, j]
            p22 = P22[r, j]
            cross = PM[r, j] - (p11 + p22)
            s, e1 = two_sum(p11, cross * t)
            s, e2 = two_sum(s, p22 * t2)
            s, e3 = two_sum(s, T[r, j])
            H, L = two_sum(s, (e1 + e2) + e3)
            S = nA[r] * mB[j] + mA[r] * nB[j]
            E = (crad * S + _U4 * (abs(e1) + abs(e2) + abs(e3)) + _ETA * (S > 0.0)
                 + (xA[r] + xB[j]))
            sc = ea[r] + eb[j] - 2 * beta
            hb = f64_bits(H)
            b = hb & _ABS
            ex = b >> 52
            ef = ex - 1023 + sc
            aL = abs(L)
            above = (f64_bits(L) ^ hb) >= 0  # |x| > |H| (L has H's sign; L != 0 below)
            # half the gap from |H| to its float64 neighbour on x's side (a quarter of H's
            # ulp below a power of two)
            half = ex - 53 - np.int64((not above) & ((b & _MANT) == 0))
            ok = (p53 & (ex > 60) & (ef > emin) & (ef < emax) & (E < aL)
                  & (aL + E < f64_from_bits(half << 52)))
            # magnitudes g0 < |x| < g1: H and its neighbour on x's side
            g0 = b - np.int64(not above)
            neg = hb < 0
            up = (rup & (not neg)) | (rdn & neg) | (odd & ((g0 & 1) == 0))
            v = b if near else g0 + np.int64(up)
            out[r, j] = f64_from_bits((v + (np.int64(sc) << 52)) | (hb & _SIGN))
            fail[r, j] = not ok
            cnt += ok
            slow += not ok
    if slow:  # the others: the full decision
        for r in range(R):
            for j in range(N):
                if fail[r, j]:
                    inx = _finish_one(P11[r, j], PM[r, j], P22[r, j], T[r, j],
                                      nA[r] * mB[j] + mA[r] * nB[j], xA[r] + xB[j],
                                      ea[r] + eb[j] - 2 * beta, t, crad, p53, mode, emin,
                                      emax, out, fail, r, j)
                    cnt += max(inx, 0)
                    slow -= inx >= 0
    return cnt, slow


@jit
def _finish_one(p11, pm, p22, tl, S, x, sc, t, crad, p53, mode, emin, emax, out, fail, r, j):
    """:func:`finish` for one element through :func:`_decide`: 1 if decided inexact, 0 if
    decided exact, -1 if left undecided."""
    cross = pm - (p11 + p22)
    s, e1 = two_sum(p11, cross * t)
    s, e2 = two_sum(s, p22 * (t * t))
    s, e3 = two_sum(s, tl)
    H, L = two_sum(s, (e1 + e2) + e3)
    E = crad * S + _U4 * (abs(e1) + abs(e2) + abs(e3)) + _ETA * (S > 0.0) + x
    v, inx, ok = _decide(H, L, E, sc, p53, mode, emin, emax)
    if ok:
        out[r, j] = v
        fail[r, j] = 0
        return inx
    return -1
