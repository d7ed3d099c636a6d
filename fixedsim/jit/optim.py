"""The SGD step of one parameter tensor in one pass: momentum, step and weight, each rounded
into its role, and the events of the three roundings counted.

Per element ``i``, in float64, in the order and with the operations of
:meth:`fixedsim.nn.SGD._update` (so every intermediate is the same float64 number):

1. ``g = grad / grad_scale`` (when ``grad_scale != 1``), ``g = g + weight_decay * w`` (when
   ``weight_decay != 0``);
2. with momentum: ``v = round_momentum(mu * v_old + g)`` (``v_old = 0.0`` on the first step);
   the direction is ``g + mu * v`` (Nesterov) or ``v``; without momentum it is ``g``;
3. ``step = round_update(lr * direction)``;
4. ``w = round_weights(w - step)``, the exact difference rounded once.

A role is one of three kinds (:data:`NONE`, :data:`F32`, :data:`FIXED`); each rounding is the
scalar function the quantize and add kernels apply to one element (the float32 conversion,
:func:`fixedsim.jit.quant_fast._fixed_one`, :func:`fixedsim.jit.arith._grid_add_one`, round to
odd then the conversion), with the same random draw (key of the role, flat index ``i``), so
the results are those of the separate passes, bit for bit. An element whose inputs or
intermediates are not finite, or whose weight is off the fixed-point grid, is flagged
``slow``: the caller then runs the separate passes for the whole tensor. A weight sum that the
grid-aligned kernel declines (a negative fraction far below the quantum) goes, as in
:func:`fixedsim.jit.arith.add_fixed_grid`, to :func:`fixedsim.jit.arith.arith_one`.
"""

import numpy as np
from numba import prange

from .arith import OP_ADD, _grid_add_one, arith_one, two_sum
from .bits import f64_bits, f64_from_bits
from .options import jit, jit_inline, jit_parallel
from .quant import (
    CHUNK,
    F_INEXACT,
    F_INVALID,
    F_NAN,
    F_OVERFLOW,
    F_SUBNORMAL,
    F_UNDERFLOW,
    F_UP,
    SR,
    tally,
)
from .quant_fast import _event_counts, _fixed_one

#: Role kinds: keep the float64 value; IEEE binary32 nearest even (the float32 conversion);
#: a saturating fixed-point format (any rounding mode).
NONE, F32, FIXED = 0, 1, 2
#: Rows of the role tables and of the counts: the three roundings of a step.
R_MOMENTUM, R_UPDATE, R_WEIGHTS = 0, 1, 2
#: Columns of the counts: the events :class:`fixedsim.QuantStats` reports (NaN never reaches
#: the fast path).
E_INEXACT, E_UP, E_OVERFLOW, E_UNDERFLOW, E_SUBNORMAL = range(5)
N_EVENTS = 5
#: Columns of the role tables: ``kinds`` (int64) kind, mode, random bits; ``grid`` (float64)
#: ``2**f``, ``2**-f``, largest code, smallest code of a fixed-point role.
K_KIND, K_MODE, K_RBITS = range(3)
G_UP, G_DOWN, G_CMAX, G_CMIN = range(4)
#: Columns of ``hyper`` (float64): learning rate, momentum, weight decay, gradient scale.
H_LR, H_MU, H_WD, H_SCALE = range(4)

_F32_MINNORM = 2.0**-126


@jit_inline
def _finite(x):
    return abs(x) < np.inf


@jit_inline
def _f32_events(x, v):
    """Events ``(inexact, up, overflow, underflow, subnormal)`` (0/1) of the float32
    conversion ``v`` of the finite ``x``, as the quantize kernel counts them
    (:func:`fixedsim.jit.quant_fast._float_events`)."""
    return (np.int64(v != x), np.int64(v > x), np.int64(abs(v) == np.inf),
            np.int64(v == 0.0) & np.int64(x != 0.0),
            np.int64(v != 0.0) & np.int64(abs(v) < _F32_MINNORM))


@jit_inline
def _round_role(x, kind, mode, rbits, up, down, cmax, cmin, key, i):
    """The finite float64 ``x`` rounded into a role (draw index ``i``): ``(value, inexact,
    up, overflow, underflow, subnormal)``."""
    if kind == F32:
        v = np.float64(np.float32(x))
        e0, e1, e2, e3, e4 = _f32_events(x, v)
        return v, e0, e1, e2, e3, e4
    if kind == FIXED:
        v, ovf = _fixed_one(x, mode, up, down, cmax, cmin, rbits, key, i)
        inexact, upf, under = _event_counts(x, v)
        return v, inexact, upf, ovf, under, np.int64(0)
    z = np.int64(0)
    return x, z, z, z, z, z


@jit_inline
def _round_to_odd(hi, lo):
    """``hi + lo`` rounded to odd at float64 precision (``hi`` finite, the float64 nearest;
    :func:`fixedsim.jit.arith.round_to_odd` on the bit pattern): when ``lo`` is nonzero and
    ``hi``'s last bit is even, the neighbour of ``hi`` toward ``lo``."""
    b = f64_bits(hi)
    # when lo is nonzero and b even (hi is then nonzero), hi's magnitude steps up when lo
    # has hi's sign, else down; no branches, so the callers' loops vectorise
    step = np.int64(lo != 0.0) & np.int64((b & 1) == 0)
    toward = np.int64((lo > 0.0) == (hi > 0.0))
    return f64_from_bits(b + step * (2 * toward - 1))


@jit_inline
def _weights_f32(ws, sbuf, wo):
    """``wo[j] = ws[j] - sbuf[j]`` rounded once into FP32 (round to odd at 53 bits from the
    exact TwoSum, then the float32 conversion, as :func:`fixedsim.add` rounds): ``(inexact,
    up, overflow, underflow, subnormal, left)``, ``left`` the sums beyond float64."""
    c0 = c1 = c2 = c3 = c4 = ns = np.int32(0)  # counts of one chunk: tally's int32 lanes
    for j in range(ws.size):
        hi, lo = two_sum(np.float64(ws[j]), -sbuf[j])  # hi: w + (-s), its zero sign IEEE's
        # a sum beyond float64 is counted, not skipped (the caller then discards the chunk):
        # no branch in the loop, which vectorises
        ns = tally(ns, np.int64(not _finite(hi)))
        wn = np.float64(np.float32(_round_to_odd(hi, lo)))
        c0 = tally(c0, np.int64(wn != hi) | np.int64(lo != 0.0))
        c1 = tally(c1, np.int64(wn > hi) | (np.int64(wn == hi) & np.int64(lo < 0.0)))
        c2 = tally(c2, np.int64(abs(wn) == np.inf))
        c3 = tally(c3, np.int64(wn == 0.0) & (np.int64(hi != 0.0) | np.int64(lo != 0.0)))
        c4 = tally(c4, np.int64(wn != 0.0) & np.int64(abs(wn) < _F32_MINNORM))
        wo[j] = wn
    return c0, c1, c2, c3, c4, ns


@jit
def _weights_fixed_rest(ws, sbuf, wo, ok, lo_i, mode, P, Psr, U, D):
    """The second loop of :func:`_weights_fixed`: the differences ``ws[j] - sbuf[j]`` that
    :func:`fixedsim.jit.arith._grid_add_one` declined (``ok[j] == 0``: a weight off the grid,
    a scaling that is not exact), by :func:`fixedsim.jit.arith.arith_one`. Returns the events
    and ``left`` as :func:`_weights_fixed` does.

    A called function, not inlined: the loop runs only for the rare declined sums, and
    inlined into :func:`sgd_step` it took about 30 of the kernel's 104 s of compiling (from an
    empty cache, one process, idle) for no gain in speed."""
    c0 = c1 = c2 = c3 = c4 = np.int64(0)
    ns = 0
    for j in range(ws.size):
        if ok[j] != 0:
            continue
        s = sbuf[j]
        wn, fl, sl = arith_one(np.int64(OP_ADD), np.float64(ws[j]), -s, -s, np.uint64(lo_i + j),
                               P, Psr, U, D, np.int64(mode), np.bool_(False), 0.0)
        if sl or (fl >> F_NAN) & 1 or (fl >> F_INVALID) & 1:
            ns += 1
            continue
        wo[j] = wn
        c0 += (fl >> F_INEXACT) & 1
        c1 += (fl >> F_UP) & 1
        c2 += (fl >> F_OVERFLOW) & 1
        c3 += (fl >> F_UNDERFLOW) & 1
        c4 += (fl >> F_SUBNORMAL) & 1
    return c0, c1, c2, c3, c4, ns


@jit_inline
def _weights_fixed(ws, sbuf, wo, lo_i, mode, rbits, g, key, P, Psr, U, D):
    """``wo[j] = ws[j] - sbuf[j]`` rounded once into a saturating fixed-point format, as
    :func:`fixedsim.jit.arith.add_fixed_grid` rounds it: the grid-aligned
    :func:`fixedsim.jit.arith._grid_add_one` first, then :func:`_weights_fixed_rest` for the
    sums it declines, only when there are any (a call in the first loop would slow it down for
    every element). Returns ``(inexact, up, overflow, underflow, subnormal, left)``."""
    c0 = c1 = c2 = c3 = c4 = ns = c_ok = np.int32(0)  # counts of one chunk: tally's lanes
    ok = np.empty(ws.size, np.uint8)
    for j in range(ws.size):
        wn, k, e0, e1, e2, e3 = _grid_add_one(np.float64(ws[j]), -sbuf[j], mode, g[G_UP],
                                              g[G_DOWN], g[G_CMAX], g[G_CMIN], rbits, key,
                                              np.uint64(lo_i + j))
        wo[j] = wn
        ok[j] = k
        c_ok = tally(c_ok, k)
        c0 = tally(c0, e0 & k)
        c1 = tally(c1, e1 & k)
        c2 = tally(c2, e2 & k)
        c3 = tally(c3, e3 & k)
    if c_ok < ws.size:
        r = _weights_fixed_rest(ws, sbuf, wo, ok, lo_i, mode, P, Psr, U, D)
        c0 = tally(c0, r[0])
        c1 = tally(c1, r[1])
        c2 = tally(c2, r[2])
        c3 = tally(c3, r[3])
        c4 = tally(c4, r[4])
        ns = tally(ns, r[5])
    return c0, c1, c2, c3, c4, ns


@jit_inline
def _steps(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, PLAIN, KM, mm, rm, gm0, gm1, gm2, gm3,
           keym, KU, mu_, ru, gu0, gu1, gu2, gu3, keyu):
    """The first loop of a chunk of :func:`sgd_step`: the new momentum into ``vo_``, the
    rounded step into ``sbuf``. Returns the events of the momentum and of the step rounding
    (five each) and the count of elements left to the caller (non-finite).

    ``PLAIN`` (a literal): the caller checked that the step has momentum and a momentum
    buffer, no Nesterov and no weight decay (:func:`_plain`), so those branches drop out of
    the loop (the gradient scale divides always: ``g / 1.0`` is ``g``). With them in it,
    even on loop-invariant flags, LLVM left the loop scalar: 17 -> 5 ns an element for a
    fixed-point momentum, 22 -> 3 for FP32, on AVX2 (measured, one thread)."""
    lr = hyper[H_LR]
    mu = hyper[H_MU]
    gs = hyper[H_SCALE]
    if PLAIN:
        wd, mom, has_v, nesterov = 0.0, True, True, False
    else:
        wd = hyper[H_WD]
        mom, has_v, nesterov = flags[0] != 0, flags[1] != 0, flags[2] != 0
    # events kept in registers: inexact, up, overflow, underflow, subnormal of the momentum
    # (a*) and of the step (b*)
    a0 = a1 = a2 = a3 = a4 = np.int32(0)  # counts of one chunk: tally's int32 lanes
    b0 = b1 = b2 = b3 = b4 = ns = np.int32(0)
    # No branch on the data: a value that is not finite is counted in ns (the caller then
    # discards the chunk) and rounded as 0.0 in its place, so that the loop vectorises
    # (twice as fast on AVX2, measured)
    for j in range(gr.size):
        ui = np.uint64(lo_i + j)
        g = np.float64(gr[j])
        w = np.float64(ws[j])
        g = g / gs if (PLAIN or gs != 1.0) else g  # PLAIN: no branch (g / 1.0 is g)
        g = g + wd * w if wd != 0.0 else g
        if mom:
            vold = np.float64(vs[j]) if has_v else 0.0
            xm = mu * vold + g
            fm = _finite(xm)
            vn, e0, e1, e2, e3, e4 = _round_role(xm if fm else 0.0, KM, mm, rm, gm0, gm1, gm2,
                                                 gm3, keym, ui)
            a0 = tally(a0, e0)
            a1 = tally(a1, e1)
            a2 = tally(a2, e2)
            a3 = tally(a3, e3)
            a4 = tally(a4, e4)
            vo_[j] = vn
            d = g + mu * vn if nesterov else vn
        else:
            fm = True
            d = g
        xu = lr * d
        fu = _finite(xu)
        st, e0, e1, e2, e3, e4 = _round_role(xu if fu else 0.0, KU, mu_, ru, gu0, gu1, gu2, gu3,
                                             keyu, ui)
        b0 = tally(b0, e0)
        b1 = tally(b1, e1)
        b2 = tally(b2, e2)
        b3 = tally(b3, e3)
        b4 = tally(b4, e4)
        # finite intermediates, a finite step and weight (an FP32 step of a finite value may
        # overflow)
        ns = tally(ns, np.int64(not (fm & fu & _finite(st) & _finite(w))))
        sbuf[j] = st
    return a0, a1, a2, a3, a4, b0, b1, b2, b3, b4, ns


@jit
def _steps_any(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, KM, mm, rm, gm0, gm1, gm2, gm3, keym,
               KU, mu_, ru, gu0, gu1, gu2, gu3, keyu):
    """:func:`_steps` for every other step (any kinds, modes and flags): a called function,
    not inlined into :func:`sgd_step` (the rarer steps; inlined, each such copy added about
    half a minute to the kernel's compiling)."""
    return _steps(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, False, KM, mm, rm, gm0, gm1, gm2,
                  gm3, keym, KU, mu_, ru, gu0, gu1, gu2, gu3, keyu)


@jit
def _weights_fixed_any(ws, sbuf, wo, lo_i, mode, rbits, g, key, P, Psr, U, D):
    """:func:`_weights_fixed` for the modes other than stochastic rounding, called (as
    :func:`_steps_any`)."""
    return _weights_fixed(ws, sbuf, wo, lo_i, mode, rbits, g, key, P, Psr, U, D)


@jit_inline
def _plain(hyper, flags):
    """A step with momentum and a momentum buffer, without Nesterov or weight decay (any
    gradient scale): SGD with momentum after its first step, the common case."""
    return flags[0] != 0 and flags[1] != 0 and flags[2] == 0 and hyper[H_WD] == 0.0


@jit_parallel
def sgd_step(grad, w, v, w_out, v_out, hyper, flags, kinds, grid, keys, P, Psr, U, D):
    """One SGD step of a flat parameter tensor (see the module docstring).

    ``grad``, ``w``, ``v`` (read) and ``w_out``, ``v_out`` (written) are float32 arrays of one
    size (``v`` and ``v_out`` unused without momentum; ``v`` unused on the first step).
    ``hyper``: float64 ``[lr, mu, weight_decay, grad_scale]``; ``flags``: int64 ``[momentum,
    has_v, nesterov]`` (0/1); ``kinds`` (3, 3) int64 and ``grid`` (3, 4) float64: the roles
    momentum, update, weights (rows ``R_*``, columns ``K_*``, ``G_*``; the weights role is
    F32 or FIXED); ``keys`` uint64 (3,): their random keys; ``P``, ``Psr``, ``U``, ``D``: the
    weights role's parameters for :func:`fixedsim.jit.arith.arith_one` (as
    :func:`fixedsim.arith.add` builds them, key included). Returns ``(counts, slow)``: the
    events of each rounding, shape ``(3, N_EVENTS)``, and the number of elements left to the
    caller (when nonzero, the outputs are incomplete). Parallel over chunks of elements
    (independent outputs; counts summed after, in order). Per chunk, one loop computes the
    momentum and the step (kept in a chunk buffer), a second rounds the weights.
    """
    n = w.size
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, 3 * N_EVENTS), np.int64)
    slow = np.zeros(nch, np.int64)
    mom = flags[0] != 0
    has_v = flags[1] != 0
    plain = _plain(hyper, flags)
    km, mm, rm = kinds[R_MOMENTUM, K_KIND], kinds[R_MOMENTUM, K_MODE], kinds[R_MOMENTUM, K_RBITS]
    ku, mu_, ru = kinds[R_UPDATE, K_KIND], kinds[R_UPDATE, K_MODE], kinds[R_UPDATE, K_RBITS]
    kw, mw, rw = kinds[R_WEIGHTS, K_KIND], kinds[R_WEIGHTS, K_MODE], kinds[R_WEIGHTS, K_RBITS]
    # scalars, not array reads in the loop (a store could alias them)
    gm0, gm1, gm2, gm3 = (grid[R_MOMENTUM, G_UP], grid[R_MOMENTUM, G_DOWN],
                          grid[R_MOMENTUM, G_CMAX], grid[R_MOMENTUM, G_CMIN])
    gu0, gu1, gu2, gu3 = (grid[R_UPDATE, G_UP], grid[R_UPDATE, G_DOWN], grid[R_UPDATE, G_CMAX],
                          grid[R_UPDATE, G_CMIN])
    gw = grid[R_WEIGHTS]
    keym, keyu, keyw = keys[R_MOMENTUM], keys[R_UPDATE], keys[R_WEIGHTS]
    for c in prange(nch):
        lo_i = c * CHUNK
        hi_i = min(n, lo_i + CHUNK)
        # slices: loop indices from 0 are provably nonnegative (no wraparound code)
        gr, ws, wo = grad[lo_i:hi_i], w[lo_i:hi_i], w_out[lo_i:hi_i]
        vs = v[lo_i:hi_i] if has_v else v[0:0]
        vo_ = v_out[lo_i:hi_i] if mom else v_out[0:0]
        sbuf = np.empty(hi_i - lo_i, np.float64)  # the rounded steps
        # the kinds and modes of the presets as literals, for plain steps: the other kinds'
        # and modes' code drops out of the loop, which then vectorises
        if plain and km == F32 and ku == F32:
            r1 = _steps(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, True, F32, mm, rm, gm0, gm1,
                        gm2, gm3, keym, F32, mu_, ru, gu0, gu1, gu2, gu3, keyu)
        elif plain and km == F32 and ku == NONE:
            r1 = _steps(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, True, F32, mm, rm, gm0, gm1,
                        gm2, gm3, keym, NONE, mu_, ru, gu0, gu1, gu2, gu3, keyu)
        elif plain and km == FIXED and mm == SR and ku == NONE:
            r1 = _steps(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, True, FIXED, SR, rm, gm0,
                        gm1, gm2, gm3, keym, NONE, mu_, ru, gu0, gu1, gu2, gu3, keyu)
        else:
            r1 = _steps_any(gr, ws, vs, vo_, sbuf, lo_i, hyper, flags, km, mm, rm, gm0, gm1,
                            gm2, gm3, keym, ku, mu_, ru, gu0, gu1, gu2, gu3, keyu)
        ns = r1[10]
        cc = counts[c]
        for k in range(10):
            cc[k] = r1[k]
        if ns == 0:  # w - step rounded once, exactly, into the weights role
            if kw == F32:
                r = _weights_f32(ws, sbuf, wo)
            elif mw == SR:  # the mode a literal, as above
                r = _weights_fixed(ws, sbuf, wo, lo_i, SR, rw, gw, keyw, P, Psr, U, D)
            else:
                r = _weights_fixed_any(ws, sbuf, wo, lo_i, mw, rw, gw, keyw, P, Psr, U, D)
            cc[10], cc[11], cc[12], cc[13], cc[14] = r[0], r[1], r[2], r[3], r[4]
            ns = r[5]
        slow[c] = ns
    return counts.sum(axis=0).reshape(3, N_EVENTS), slow.sum()
