"""Quantization into block formats (:class:`fixedsim.blockformats.BlockFormat`): the fast path.

:func:`fixedsim.quantize`, :func:`fixedsim.to_bits` and :func:`fixedsim.from_bits` come here for
a block format. The work is done by the element kernels of :mod:`fixedsim.jit.quant` on the
scaled elements ``x / S``, which are exact:

* a power-of-two scale (the MX rules): ``x * 2**-k`` is exact in float64 unless it falls below
  float64's normal range; an element that does so is replaced by a float64 of the same sign
  below ``2**-1022`` (the product itself, or the smallest subnormal where the product rounds
  to zero), which every element format whose smallest value is at least ``2**-950`` rounds as
  it rounds the exact quotient, in every mode (all such values lie below half the smallest
  quantum, and a 64-bit stochastic draw cannot tell them apart: ``frac * 2**64 < 1``);
* any other scale (NVFP4: ``s * t``, E4M3 times FP32, exact in float64): the quotient is
  rounded to odd at float64 precision (Dekker's exact product gives the sign of the
  remainder), which the element rounding then rounds correctly in every deterministic mode
  (two spare bits suffice) and under STOCHASTIC with ``random_bits <= 50 - element.man_bits``
  (the draw compares only bits above the sticky bit); with more random bits the fraction's 64
  bits come from a long division of the integer significands (:func:`_sr_exact`); inputs below
  ``2**-900`` in magnitude and scales of more than 31 significant bits are rounded by the
  Fraction oracle.

Float32 input into a power-of-two rule with a float element (MXFP8, MXFP6, MXFP4) or a two's
complement fixed-point one (MXINT8) takes one fused kernel instead,
:func:`fixedsim.jit.quant_block.mx_from_f32`, which rounds every block of every magnitude.

Nothing here rounds twice; ``tests/test_blockformats.py`` checks it bit for bit against
:func:`fixedsim.reference.block_quantize`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from . import reference
from .blockformats import POW2_RULES, BlockFormat, _element_emax, _element_precision, _pow2_range
from .formats import FixedFormat, FloatFormat
from .jit import quant_block as _qb
from .jit.rng import random_u64_array
from .rounding import Overflow, Rounding

__all__ = ["BlockCodes", "block_quantize", "block_to_bits", "block_from_bits"]


class BlockCodes(tuple):
    """The codes of a tensor in a block format (:func:`fixedsim.to_bits`): the pair
    ``(elements, scales)``, with the per-tensor scale as an attribute.

    Attributes
    ----------
    elements : numpy.ndarray of uint8
        Element codes, the block axis in place. Packed (``packed=True``): 4-bit elements two
        per byte, the first in the low nibble; 6-bit elements four per three bytes, element
        ``j`` of a group in bits ``6j .. 6j+5`` of the little-endian 24-bit word; the block
        axis is then ``n/2`` or ``3n/4`` long. Unpacked: one code per byte (uint16 or wider
        for wider elements).
    scales : numpy.ndarray
        Scale codes (``fmt.scale.code_dtype``), the block axis divided by ``block``.
    tensor_scale : int or None
        The per-tensor scale code (``fmt.tensor_scale``), None for single-level formats.

    Examples
    --------
    >>> import fixedsim as fs
    >>> elements, scales = fs.to_bits([0.5, 1.0, -6.0, 0.0] + [0.0] * 28, fs.MXFP4)
    >>> elements[:2], scales
    (array([33, 15], dtype=uint8), array([127], dtype=uint8))
    """

    def __new__(cls, elements, scales, tensor_scale=None):
        self = super().__new__(cls, (elements, scales))
        self.tensor_scale = tensor_scale
        return self

    @property
    def elements(self) -> np.ndarray:
        return self[0]

    @property
    def scales(self) -> np.ndarray:
        return self[1]

    def __reduce__(self):
        return (BlockCodes, (self[0], self[1], self.tensor_scale))

    def __repr__(self) -> str:
        return (f"BlockCodes(elements={self[0]!r}, scales={self[1]!r}, "
                f"tensor_scale={self.tensor_scale!r})")


def _check_block_call(fmt: BlockFormat, overflow, axis, shape):
    if overflow is not None:
        ovf = Overflow.coerce(overflow, what="overflow")
        if ovf is not Overflow.SATURATE:
            raise ValueError(
                f"overflow={ovf!r} does not apply to the block format {fmt!r}: elements beyond "
                "the element's largest value clamp to it (OCP MX v1.0, section 6.3); pass "
                "overflow=None or Overflow.SATURATE")
    ax = fmt.axis if axis is None else axis
    if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {ax!r}")
    ndim = len(shape)
    if ndim == 0:
        raise ValueError(f"x must have at least one axis to hold blocks of {fmt.block}, got a "
                         "scalar")
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis {ax} is out of range for x with {ndim} axes")
    ax = int(ax) % ndim
    if shape[ax] % fmt.block:
        raise ValueError(
            f"the block length {fmt.block} of {fmt!r} must divide the length of axis {ax} of "
            f"x, got {shape[ax]} (pad the axis to a multiple of {fmt.block} first, for "
            "example with zeros, which change no scale)")
    return ax


def _blocked(arr: np.ndarray, ax: int, block: int) -> np.ndarray:
    """``arr`` with ``ax`` moved last, as a C-contiguous float64 array of shape (nb, block)."""
    return np.ascontiguousarray(np.moveaxis(arr, ax, -1), dtype=np.float64).reshape(-1, block)


def _unblocked(flat: np.ndarray, shape, ax: int) -> np.ndarray:
    moved = list(shape)
    moved.append(moved.pop(ax))
    return np.moveaxis(flat.reshape(moved), -1, ax)


def _pow2_exponents(amax: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """The scale exponent k of each block (amax finite, >= 0), exactly as the oracle's."""
    el, rule = fmt.element, fmt.scale_rule
    lo, hi = _pow2_range(fmt.scale)
    m, e = np.frexp(amax)  # amax = m * 2**e, m in [0.5, 1)
    e = e.astype(np.int64)
    floor_log2 = e - 1
    emax = _element_emax(el)
    if rule == "ocp":
        k = floor_log2 - emax
    elif rule == "ceil":
        k = floor_log2 + (m != 0.5) - emax
    elif rule == "even":
        p = _element_precision(el)
        r = np.floor(np.ldexp(m, p) + 0.5)  # amax's top p bits, ties away (exact)
        k = floor_log2 + (r == 2.0**p) - emax
    else:  # rceil: the smallest k with amax <= max * 2**k
        mm, em = math.frexp(el.max)
        k = e - em + (m > mm)
    k = np.where(amax == 0, lo, np.maximum(k, lo))
    if k.size and int(k.max()) > hi:
        b = int(np.argmax(k))
        raise ValueError(
            f"block {b} (its largest magnitude {float(amax[b])!r}) needs the scale "
            f"2**{int(k[b])}, beyond {fmt.scale!r}'s largest power of two 2**{hi}: the scale "
            "format cannot hold the scale; scale the tensor down first")
    return k


def _div_odd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a / b`` rounded to odd at float64 precision (``b > 0``; ``a`` zero or with
    ``2**-900 <= |a|`` and ``2**-900 <= |a / b|``, so that no step underflows)."""
    with np.errstate(invalid="ignore", over="ignore"):
        q = a / b
        p = q * b
        split = 134217729.0  # 2**27 + 1: Veltkamp's split into two 26-bit halves
        c = split * q
        qh = c - (c - q)
        ql = q - qh
        c = split * b
        bh = c - (c - b)
        bl = b - bh
        err = ((qh * bh - p) + qh * bl + ql * bh) + ql * bl  # q * b == p + err exactly
        r = (a - p) - err  # the sign of a - q * b (a - p is exact: Sterbenz)
    even = (q.view(np.uint64) & np.uint64(1)) == 0
    fix = (r != 0) & even
    if fix.any():
        q[fix] = np.nextafter(q[fix], np.where(r[fix] > 0, np.inf, -np.inf))
    return q


def _element_run(scaled: np.ndarray, el, rounding: Rounding, rbits: int, key):
    """Round the scaled elements (float64, flat, finite) into the element format, saturating.

    Finite-only elements (FP6, FP4: ``inf_nan="none"``) take the fast float64 kernel too, which
    :func:`fixedsim.quantize` keeps from them because of NaN inputs (refused there): no NaN
    reaches this function (NaN blocks are zeroed first), and for finite inputs the kernel needs
    only the format's largest value, its quanta and its subnormal threshold."""
    from .jit import quant_fast as _qf
    from .quantize import _f32_bits, _fast_float_params, _run

    if (isinstance(el, FloatFormat) and el.inf_nan == "none" and el.signed and el.subnormals
            and el.dtype == np.float32 and rounding is not Rounding.STOCHASTIC
            and el.man_bits <= 21 and el.emin - el.man_bits >= -147):
        flat = scaled.reshape(-1).view()
        flat.setflags(write=False)
        out = np.empty(flat.size, np.float32)
        _qf.float_from_f64(flat, out.view(np.uint32), int(rounding),
                           *_fast_float_params(el, rounding, Overflow.SATURATE), False,
                           _f32_bits(el.min_normal))
        return out.astype(np.float64)
    out, _ = _run(scaled, el, rounding, Overflow.SATURATE, rbits, key, False)
    return out.astype(np.float64)


def _nearest_scales(amax: np.ndarray, fmt: BlockFormat, t: Fraction) -> np.ndarray:
    """The "nearest" rule's scale of each block (amax finite, >= 0), as float64."""
    denom = float(Fraction(fmt.element.max) * t)
    if Fraction(denom) != Fraction(fmt.element.max) * t or not (denom >= 2.0**-900):
        return np.array([float(reference.block_scale(float(a), fmt, t)) for a in amax])
    target = np.zeros_like(amax)
    pos = amax > 0
    tiny = pos & (amax < 2.0**-900)
    ok = pos & ~tiny
    target[ok] = _div_odd(amax[ok], np.full(int(ok.sum()), denom))
    s = _element_run(target, fmt.scale, Rounding.NEAREST_EVEN, 64, np.uint64(0))
    s = np.maximum(s, fmt.scale.smallest)
    redo = np.flatnonzero(tiny | (target > fmt.scale.max))  # the oracle raises on overflow
    for b in redo:
        s[b] = float(reference.block_scale(float(amax[b]), fmt, t))
    return s


def _sr_exact(a, S, q, el: FloatFormat, draws, rbits):
    """Stochastic rounding of the exact quotients ``a / S`` into the float element ``el``
    (STOCHASTIC's rule: up iff ``draw < floor(frac * 2**rbits)``, ``frac`` the distance from
    the smaller magnitude in quanta), from ``q`` = the quotients rounded to odd (nonzero,
    normal) for the integer part and the quantum, and a long division of the integer
    significands for the 64 fraction bits. Returns (elements, ok): ``ok`` False where the
    scale's significand has more than 31 bits (left to the caller)."""
    u64 = np.uint64
    mq = np.abs(q)
    qe = np.maximum(np.frexp(mq)[1] - 1, el.emin) - el.man_bits  # the quantum's exponent
    lo = np.floor(np.ldexp(mq, -qe))  # whole quanta: exact from the odd quotient
    ma, ea = np.frexp(np.abs(a))
    A = np.ldexp(ma, 53).astype(u64)  # |a| = A * 2**(ea - 53)
    ms, es = np.frexp(S)
    Sg = np.ldexp(ms, 53).astype(u64)
    low = Sg & (~Sg + u64(1))  # the lowest set bit: strip trailing zeros
    tz = np.frexp(low.astype(np.float64))[1] - 1
    Sg = Sg >> tz.astype(u64)
    es = es - 53 + tz
    ok = Sg < u64(1 << 31)
    s2 = (ea - 53) - es - qe + 64  # u * 2**64 = A * 2**s2 / Sg, u = |a / S| in quanta
    Sg = np.where(ok, Sg, u64(1))
    pos = s2 >= 0
    t = np.where(pos, A // Sg, u64(0))
    r = np.where(pos, A % Sg, u64(0))
    rem = np.where(pos, s2, 0)
    for _ in range(5):  # shift in s2 zero bits, 32 at a time (r < Sg < 2**31: no overflow)
        c = np.minimum(rem, 32).astype(u64)
        r = r << c
        t = (t << c) | (r // Sg)  # modulo 2**64: the low 64 bits are the fraction's
        r = r % Sg
        rem = rem - c.astype(rem.dtype)
    ok &= rem == 0
    k = np.where(pos, 0, -s2)
    t = np.where(pos, t, np.where(k < 64, (A >> np.minimum(k, 63).astype(u64)) // Sg, u64(0)))
    up = draws < (t >> u64(64 - rbits))
    mag = np.minimum(np.ldexp(lo + up, qe), el.max)
    zero_sign = np.copysign(0.0, a) if el.has_negative_zero else 0.0
    return np.where(mag == 0, zero_sign, np.copysign(mag, a)), ok


def _stochastic_key(rounding, seed):
    from .quantize import random_key

    return random_key(seed) if rounding is Rounding.STOCHASTIC else np.uint64(0)


def _oracle(arr, fmt, rounding, rbits, key, ax, exact=None):
    """:func:`reference.block_quantize` with the kernels' draws (flat index of the blocked
    layout), for inputs the fast path does not take."""
    shift = np.uint64(64 - rbits)

    def draw(i):
        return int(random_u64_array(key, i, 1)[0] >> shift)

    x = arr
    if exact is not None:
        x = arr.astype(object)
        flat = x.reshape(-1)
        for i, v in zip(exact.index.tolist(), exact.value, strict=True):
            flat[i] = v
    return reference.block_quantize(x, fmt, rounding, draws=draw, axis=ax,
                                    random_bits=None if rbits == 64 else rbits)


_RULE_CODES = {"ocp": _qb.RULE_OCP, "ceil": _qb.RULE_CEIL, "even": _qb.RULE_EVEN,
               "rceil": _qb.RULE_RCEIL}


def _fused_applies(arr: np.ndarray, fmt: BlockFormat) -> bool:
    """Whether :func:`fixedsim.jit.quant_block.mx_from_f32` serves this call: float32 input, a
    power-of-two rule, and either a float element with float32 values, IEEE-style zeros and
    subnormals, or a two's complement fixed-point element of at most 53 bits (MXINT8's); every
    scaled quantum at least 2**-149."""
    el = fmt.element
    lo = _pow2_range(fmt.scale)[0]
    if arr.dtype != np.float32 or fmt.scale_rule not in POW2_RULES:
        return False
    if isinstance(el, FixedFormat):
        return el.signed and el.word_length <= 53 and lo - el.frac_length >= -149
    return (isinstance(el, FloatFormat) and el.subnormals and el.signed
            and el.inf_nan in ("ieee", "fn", "none") and el.dtype == np.float32
            and el.emin - el.man_bits + lo >= -149)


def _refuse_nan_blocks(bad: np.ndarray, fmt: BlockFormat) -> None:
    """ValueError where a block holds NaN or an infinity (``bad``) and the scale format has no
    NaN to give it."""
    if not fmt.scale.has_nan and bad.any():
        raise ValueError(f"x holds NaN or an infinity (block {int(np.argmax(bad))}), which "
                         f"needs a NaN scale, and {fmt.scale!r} has no NaN")


def _fused(arr, fmt: BlockFormat, rounding, rbits, key, ax, out=None):
    """(values, exponents k per block, NaN-block mask) by the fused kernel, shaped as blocks;
    ``out``: a float64 C-contiguous array of ``arr.size`` to write the values into (the blocks
    along the last axis), or None."""
    el = fmt.element
    lo, hi = _pow2_range(fmt.scale)
    moved = np.ascontiguousarray(np.moveaxis(arr, ax, -1)).reshape(-1)
    xb = moved.view(np.uint32)
    xb.setflags(write=False)
    out = np.empty(moved.size, np.float64) if out is None else out.reshape(-1)
    k = np.empty(moved.size // fmt.block, np.int64)
    mm, em = math.frexp(el.max)
    emax = _element_emax(el)
    maxb = int(np.float64(el.max).view(np.int64))
    if isinstance(el, FixedFormat):  # the quantum 2**-f whatever the exponent (see mx_value)
        emin, man_bits, minb, fixed = emax, emax + el.frac_length, int(
            np.float64(-el.min).view(np.int64)), 1
    else:
        emin, man_bits, minb, fixed = el.emin, el.man_bits, maxb, 0
    nnan, kmax = _qb.mx_from_f32(
        xb, out, k, fmt.block, int(rounding), _RULE_CODES[fmt.scale_rule], emax,
        _element_precision(el), int(math.ldexp(mm, 24)), lo, emin, man_bits, maxb, minb, fixed,
        2.0**rbits, rbits, key)
    vals = out.reshape(-1, fmt.block)
    bad = k == _qb.NAN_BLOCK if nnan else np.zeros(k.size, bool)
    _refuse_nan_blocks(bad, fmt)
    if nnan:
        k[bad] = lo
    if kmax > hi:
        b = int(np.argmax(k))
        amax = float(np.abs(moved[b * fmt.block:(b + 1) * fmt.block]).max())
        raise ValueError(
            f"block {b} (its largest magnitude {amax!r}) needs the scale 2**{int(k[b])}, "
            f"beyond {fmt.scale!r}'s largest power of two 2**{hi}: the scale format cannot "
            "hold the scale; scale the tensor down first")
    return vals, k, bad


def _scaled_applies(arr: np.ndarray, fmt: BlockFormat) -> bool:
    """Whether :func:`fixedsim.jit.quant_block.scaled_from_f32` serves this call: float32
    input, the "nearest" rule (NVFP4's), a float element with subnormals and at most 20
    fraction bits, a scale format with subnormals, the scale times the tensor scale of at
    most 31 significant bits (so that every threshold ``(n + 1/2) * 2**q * S`` is exact in
    float64), and every quantum of every scale a normal float64."""
    el, sc, ts = fmt.element, fmt.scale, fmt.tensor_scale
    if arr.dtype != np.float32 or fmt.scale_rule in POW2_RULES:
        return False
    if not (isinstance(el, FloatFormat) and isinstance(sc, FloatFormat) and el.subnormals
            and el.signed and el.man_bits <= 20 and sc.subnormals):
        return False
    if ts is not None and not isinstance(ts, FloatFormat):
        return False
    bits = sc.precision + (ts.precision if ts is not None else 1)
    lo = math.log2(sc.smallest) + (math.log2(ts.smallest) if ts is not None else 0.0)
    hi = math.log2(sc.max) + (math.log2(ts.max) if ts is not None else 0.0)
    return bits <= 31 and el.emin - el.man_bits + lo >= -1000 and hi + math.log2(el.max) < 1000


def _scaled(arr, fmt: BlockFormat, rounding, rbits, key, ax, out=None):
    """The "nearest" rule by the fused kernel: (values as blocks, scales, total scales, tensor
    scale, NaN-block mask), or None where ``element.max * tensor scale`` is not exact in
    float64 (left to the general path). ``out`` as for :func:`_fused`."""
    el, sc = fmt.element, fmt.scale
    moved = np.ascontiguousarray(np.moveaxis(arr, ax, -1)).reshape(-1)
    xb = moved.view(np.uint32)
    xb.setflags(write=False)
    nb = moved.size // fmt.block
    am, fm = np.empty(nb, np.uint32), np.empty(nb, np.uint32)
    _qb.block_amax_f32(xb, fmt.block, am, fm)
    bad = am >= np.uint32(0x7F800000)
    _refuse_nan_blocks(bad, fmt)
    t = None
    if fmt.tensor_scale is not None:  # the largest finite magnitude, NaN blocks included
        amax_t = float(np.array([fm.max(initial=0)], np.uint32).view(np.float32)[0])
        t = reference.tensor_scale(amax_t, fmt)
    tf = Fraction(1) if t is None else t
    D = float(Fraction(el.max) * tf)
    if Fraction(D) != Fraction(el.max) * tf:
        return None
    am.setflags(write=False)
    out = np.empty(moved.size, np.float64) if out is None else out.reshape(-1)
    s = np.empty(nb, np.float64)
    _qb.scaled_from_f32(xb, out, am, s, D, float(tf), fmt.block, int(rounding), el.emin,
                        el.man_bits, float(el.max), el.has_negative_zero, rbits, key, sc.emin,
                        sc.man_bits, float(sc.smallest))
    over = np.flatnonzero(s > sc.max)
    if over.size:  # the oracle's error, with its message
        reference.block_scale(float(am[over[0]:over[0] + 1].view(np.float32)[0]), fmt, tf)
    return out.reshape(-1, fmt.block), s, s * float(tf), t, bad


def _fused_parts(arr, fmt: BlockFormat, rounding, rbits, key, ax, out, parts):
    """:func:`_quantize_parts`' result from a fused kernel (:func:`_fused` for the power-of-two
    rules, :func:`_scaled` for "nearest"), or None where neither serves the call."""
    direct = out is not None and ax == arr.ndim - 1 and not np.shares_memory(out, arr)
    into = out if direct else None
    if _fused_applies(arr, fmt):
        vals, k, bad = _fused(arr, fmt, rounding, rbits, key, ax, into)
        t = None
        def scales():  # built only when asked for (a 10 M tensor's cost 1.4 ms)
            return np.ldexp(1.0, k)
        def elements():
            return np.ldexp(vals, -k[:, None])  # exact: the values are element * 2**k
    elif _scaled_applies(arr, fmt):
        done = _scaled(arr, fmt, rounding, rbits, key, ax, into)
        if done is None:
            return None
        vals, s, total, t, bad = done
        def scales():
            return s
        def elements():
            with np.errstate(invalid="ignore"):
                return vals / total[:, None]  # exact: the values are element * total
    else:
        return None
    if out is not None and not direct:
        out[...] = _unblocked(vals.reshape(-1), arr.shape, ax)
    if out is not None and not parts:
        return out, None, None, None, ax
    values = _unblocked(vals.reshape(-1), arr.shape, ax)
    if not parts:
        return values, None, None, None, ax
    elems = elements()
    elems[bad] = 0.0
    sshape = list(arr.shape)
    sshape[ax] //= fmt.block
    return (values, _unblocked(elems.reshape(-1), arr.shape, ax),
            _unblocked(np.where(bad, np.nan, scales()), sshape, ax), t, ax)


def _quantize_parts(x, fmt: BlockFormat, rounding, overflow, seed, random_bits, axis,
                    parts=True, out=None):
    """(values, elements, scales as float64 (NaN for NaN blocks), tensor scale, axis): the
    values and elements in the shape of ``x``, the scales with the block axis divided.
    ``parts=False``: the values only (elements and scales None)."""
    from .quantize import _as_exact_array, _check_random_bits

    rounding = Rounding.coerce(rounding, what="rounding")
    rbits = _check_random_bits(rounding, random_bits)
    arr, exact = _as_exact_array(x)
    ax = _check_block_call(fmt, overflow, axis, arr.shape)
    key = _stochastic_key(rounding, seed)
    el = fmt.element
    if out is not None:
        if not isinstance(out, np.ndarray) or out.shape != arr.shape \
                or out.dtype != np.float64 or not out.flags.c_contiguous \
                or not out.flags.writeable:
            raise ValueError(f"out must be a writeable C-contiguous float64 array of shape "
                             f"{arr.shape} for the block format {fmt!r}, got "
                             f"{getattr(out, 'shape', type(out).__name__)}, "
                             f"{getattr(out, 'dtype', '')}")
    if exact is None:
        done = _fused_parts(arr, fmt, rounding, rbits, key, ax, out, parts)
        if done is not None:
            return done
    el_small = el.smallest if isinstance(el, FloatFormat) else el.eps
    pow2 = fmt.scale_rule in POW2_RULES
    use_oracle = exact is not None or el_small < 2.0**-950 or (
        not pow2 and not isinstance(el, FloatFormat))
    if use_oracle:
        v, e, s, t = _oracle(arr, fmt, rounding, rbits, key, ax, exact)
        return (v, e, np.array([float(q) for q in s.reshape(-1)]).reshape(s.shape), t, ax)
    blocks = _blocked(arr, ax, fmt.block)
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(blocks), axis=1) if blocks.size else np.zeros(0)
    bad = ~np.isfinite(amax)
    _refuse_nan_blocks(bad, fmt)
    t = None
    if fmt.tensor_scale is not None:  # the largest finite magnitude, NaN blocks included
        fin = np.abs(blocks[bad])
        amax_t = max(float(amax[~bad].max(initial=0.0)),
                     float(fin[np.isfinite(fin)].max(initial=0.0)))
        t = reference.tensor_scale(amax_t, fmt)
    amax = np.where(bad, 0.0, amax)
    blocks = np.where(bad[:, None], 0.0, blocks)
    if pow2:
        k = _pow2_exponents(amax, fmt)
        with np.errstate(under="ignore"):  # x * 2**-k: exact unless below 2**-1022
            if -1000 <= _pow2_range(fmt.scale)[0] and _pow2_range(fmt.scale)[1] <= 1000:
                scaled = blocks * np.ldexp(1.0, -k)[:, None]  # 2**-k a normal float64
            else:
                scaled = np.ldexp(blocks, -k[:, None])
        lost = (scaled == 0) & (blocks != 0)
        if lost.any():  # below float64's range: a stand-in of the same sign (module notes)
            scaled[lost] = np.copysign(5e-324, blocks[lost])
        elems = _element_run(scaled.reshape(-1), el, rounding, rbits, key).reshape(blocks.shape)
        scales = np.ldexp(1.0, k)
        values = np.ldexp(elems, k[:, None]) if scales.size and (
            scales.min() == 0 or np.isinf(scales.max())) else elems * scales[:, None]
    else:
        s = _nearest_scales(amax, fmt, Fraction(1) if t is None else t)
        total = s * float(1 if t is None else t)  # exact: checked below
        a = blocks
        mag = np.abs(a)
        b = np.broadcast_to(total[:, None], a.shape)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
            slow = (mag != 0) & ((mag < 2.0**-900) | (mag / b < 2.0**-900))
        slow |= np.broadcast_to(~_exact_products(s, t)[:, None], a.shape) & (mag != 0)
        q = np.zeros_like(a)
        fast = (mag != 0) & ~slow
        q[fast] = _div_odd(a[fast], b[fast])
        q[mag == 0] = a[mag == 0]
        elems = _element_run(q.reshape(-1), el, rounding, rbits, key).reshape(a.shape)
        if rounding is Rounding.STOCHASTIC and rbits > 50 - el.man_bits and fast.any():
            # the draw compares bits below the odd quotient's sticky bit: exact integers
            idx = np.flatnonzero(fast.reshape(-1))
            draws = random_u64_array(key, 0, a.size)[idx] >> np.uint64(64 - rbits)
            e, ok = _sr_exact(a[fast], b[fast], q[fast], el, draws, rbits)
            sub = elems[fast]
            sub[ok] = e[ok]
            elems[fast] = sub
            slow.reshape(-1)[idx[~ok]] = True  # scales of more than 31 bits: the oracle
        for i in np.flatnonzero(slow.reshape(-1)):  # rare: exact rounding of the quotient
            bi = i // fmt.block
            sc = Fraction(s[bi]) * (1 if t is None else t)
            shift = np.uint64(64 - rbits)
            d = (int(random_u64_array(key, i, 1)[0] >> shift)
                 if rounding is Rounding.STOCHASTIC else None)
            elems.reshape(-1)[i] = reference.round_to_format(
                Fraction(float(a.reshape(-1)[i])) / sc, el, rounding, Overflow.SATURATE,
                draw=d, random_bits=None if rbits == 64 else rbits)
        values = elems * total[:, None]  # exact (element * s * t, few bits)
        scales = s
    values[bad] = np.nan
    elems[bad] = 0.0
    scales = np.where(bad, np.nan, scales)
    shape = arr.shape
    sshape = list(shape)
    sshape[ax] //= fmt.block
    return (_unblocked(values.reshape(-1), shape, ax), _unblocked(elems.reshape(-1), shape, ax),
            _unblocked(scales, sshape, ax), t, ax)


def _significant_bits(v: np.ndarray) -> np.ndarray:
    """Bits from the leading to the last set bit of each positive float64."""
    m = np.ldexp(np.frexp(v)[0], 53).astype(np.uint64)
    low = m & (~m + np.uint64(1))
    return 54 - np.frexp(low.astype(np.float64))[1]


def _exact_products(s: np.ndarray, t) -> np.ndarray:
    """Whether ``s * t`` is exact in float64 for each block scale ``s`` (positive): the two
    significands together hold at most 53 bits and the product is a normal float64."""
    if t is None:
        return np.ones(s.shape, bool)
    tf = float(t)
    if Fraction(tf) != t:
        return np.zeros(s.shape, bool)
    p = s * tf
    return ((_significant_bits(s) + _significant_bits(np.array([tf]))[0] <= 53)
            & (p >= 2.0**-1022) & (p < np.inf))


def block_quantize(x, fmt: BlockFormat, rounding=Rounding.NEAREST_EVEN, overflow=None, *,
                   seed=None, random_bits=None, axis=None, out=None) -> np.ndarray:
    """:func:`fixedsim.quantize` into a block format: the values ``element * scale``."""
    v = _quantize_parts(x, fmt, rounding, overflow, seed, random_bits, axis, parts=False,
                        out=out)[0]
    if out is not None and v is not out:
        out[...] = v
        return out
    return v


# -- codes ---------------------------------------------------------------------------------------
def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes (uint8, last axis) of 4 or 6 bits."""
    c = codes.astype(np.uint8)
    if bits == 4:
        return (c[..., 0::2] | (c[..., 1::2] << np.uint8(4))).astype(np.uint8)
    w = (c[..., 0::4].astype(np.uint32) | (c[..., 1::4].astype(np.uint32) << 6)
         | (c[..., 2::4].astype(np.uint32) << 12) | (c[..., 3::4].astype(np.uint32) << 18))
    out = np.stack([(w >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(np.uint8)
    return out.reshape(*c.shape[:-1], -1)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    p = packed.astype(np.uint8)
    if bits == 4:
        out = np.empty((*p.shape[:-1], 2 * p.shape[-1]), np.uint8)
        out[..., 0::2] = p & np.uint8(0xF)
        out[..., 1::2] = p >> np.uint8(4)
        return out
    if p.shape[-1] % 3:
        raise ValueError(f"packed 6-bit codes come in groups of 3 bytes along the block axis, "
                         f"got {p.shape[-1]} bytes")
    g = p.reshape(*p.shape[:-1], -1, 3).astype(np.uint32)
    w = g[..., 0] | (g[..., 1] << 8) | (g[..., 2] << 16)
    out = np.stack([(w >> s) & 0x3F for s in (0, 6, 12, 18)], axis=-1).astype(np.uint8)
    return out.reshape(*p.shape[:-1], -1)


def _packable(fmt: BlockFormat) -> bool:
    return fmt.element.width in (4, 6)


def block_to_bits(x, fmt: BlockFormat, rounding=Rounding.NEAREST_EVEN, *, seed=None,
                  random_bits=None, axis=None, packed=True) -> BlockCodes:
    """:func:`fixedsim.to_bits` into a block format (see there)."""
    from .quantize import _to_bits

    _, elems, scales, t, ax = _quantize_parts(x, fmt, rounding, None, seed, random_bits, axis)
    ecodes = _to_bits(np.asarray(elems, np.float64), fmt.element)
    nan = np.isnan(scales)
    sv = np.where(nan, fmt.scale.max, scales)
    scodes = _to_bits(sv, fmt.scale)
    if nan.any():
        scodes[nan] = reference.encode(math.nan, fmt.scale)
    tcode = None if t is None else reference.encode(float(t), fmt.tensor_scale)
    if packed and _packable(fmt):
        group = 2 if fmt.element.width == 4 else 4
        if ecodes.shape[ax] % group:
            raise ValueError(f"packed {fmt.element.width}-bit codes need the length of axis "
                             f"{ax} to be a multiple of {group}, got {ecodes.shape[ax]}; pass "
                             "packed=False for one code per byte")
        ecodes = np.moveaxis(_pack(np.moveaxis(ecodes, ax, -1), fmt.element.width), -1, ax)
    return BlockCodes(ecodes, scodes, tcode)


def block_from_bits(codes, fmt: BlockFormat, *, axis=None, packed=True) -> np.ndarray:
    """:func:`fixedsim.from_bits` of a block format (see there)."""
    from .quantize import from_bits

    if isinstance(codes, BlockCodes):
        (ecodes, scodes), tcode = codes, codes.tensor_scale
    elif isinstance(codes, tuple) and len(codes) in (2, 3):
        ecodes, scodes, tcode = (*codes, None) if len(codes) == 2 else codes
    else:
        raise TypeError(f"codes of a block format must be a BlockCodes (or an (elements, "
                        f"scales[, tensor_scale]) tuple), got {type(codes).__name__}")
    if (tcode is None) != (fmt.tensor_scale is None):
        raise ValueError(f"{fmt!r} " + ("needs a tensor_scale code" if tcode is None else
                                        "has no tensor scale, got a tensor_scale code"))
    ecodes, scodes = np.asarray(ecodes), np.asarray(scodes)
    ax = (fmt.axis if axis is None else axis) % max(ecodes.ndim, 1)
    if packed and _packable(fmt):
        ecodes = np.moveaxis(_unpack(np.moveaxis(ecodes, ax, -1), fmt.element.width), -1, ax)
    n = ecodes.shape[ax]
    if n != scodes.shape[ax] * fmt.block or ecodes.ndim != scodes.ndim:
        raise ValueError(f"element codes of shape {ecodes.shape} and scale codes of shape "
                         f"{scodes.shape} do not match blocks of {fmt.block} along axis {ax}")
    elems = from_bits(ecodes, fmt.element).astype(np.float64)
    scales = from_bits(scodes, fmt.scale).astype(np.float64)
    if tcode is not None:
        scales = scales * float(from_bits(tcode, fmt.tensor_scale))
    return elems * np.repeat(scales, fmt.block, axis=ax)

