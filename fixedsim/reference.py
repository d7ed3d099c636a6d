"""Exact reference rounding: the oracle that fast kernels are checked against.

Everything here is computed on :class:`fractions.Fraction`, so no intermediate value is ever
rounded. A rounding is done the way its definition reads: find the two neighbours
``lo <= x <= hi`` of ``x`` on the format's grid (:func:`neighbours`), pick one by the rounding
rule, then apply the format's range (the overflow rule, or the flush to zero of a format without
subnormals). The code is written to be obviously correct, not fast (some 20 microseconds a value).

The grid is *unbounded above*: a float format's grid continues past ``max`` with the quantum of
the top binade (and with ``2**(E - man_bits)`` in every binade ``E`` beyond), a fixed-point grid
continues past the largest code. Overflow is decided on the rounded value, as in IEEE 754.

Results are Python floats whenever they are exactly a float64 (always for float formats), else
:class:`~fractions.Fraction` (wide fixed-point formats). Zeros, infinities and NaN are floats.

Examples
--------
>>> from fixedsim.formats import FP16, FP8_E4M3, FixedFormat
>>> round_to_format(0.1, FP16)
0.0999755859375
>>> round_to_format(464.0, FP8_E4M3), round_to_format(1e9, FP16)
(448.0, inf)
>>> round_to_format(0.375, FixedFormat(8, 2), "toward_zero")
0.25
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from fixedsim.formats import FixedFormat, FloatFormat, _to_float_toward_zero
from fixedsim.rounding import Overflow, Rounding

__all__ = ["round_to_format", "quantize", "encode", "decode", "values", "neighbours",
           "reduce_block", "block_fma", "promote_add", "deal"]

_FLAG_NAMES = ("inexact", "rounded_up", "overflow", "underflow", "subnormal", "nan")


# -- small exact helpers -------------------------------------------------------------------------
def _pow2(k: int) -> Fraction:
    return Fraction(2) ** k


def _floor_log2(a: Fraction) -> int:
    """Exact ``floor(log2(a))`` for ``a > 0``."""
    e = a.numerator.bit_length() - a.denominator.bit_length()  # floor(log2 a) is e or e - 1
    return e - 1 if _pow2(e) > a else e


def _exact(x) -> Fraction | float:
    """``x`` as a Fraction when finite; NaN and infinities are returned as floats."""
    if isinstance(x, (Fraction, int, np.integer)):
        return Fraction(int(x)) if isinstance(x, np.integer) else Fraction(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return Fraction(x) if math.isfinite(x) else x
    raise TypeError(f"x must be an int, float or Fraction, got {type(x).__name__} {x!r}")


def _negative(x) -> bool:
    """Sign of ``x``, -0.0 and -nan included."""
    if isinstance(x, (float, np.floating)):
        return math.copysign(1.0, x) < 0
    return x < 0


def _out(v: Fraction) -> Fraction | float:
    """``v`` as a float when that is exact, else the Fraction itself."""
    f = float(v)
    return f if Fraction(f) == v else v


def _quantum(x: Fraction, fmt) -> Fraction:
    """Distance between grid points around ``x`` (the grid of :func:`neighbours`)."""
    if isinstance(fmt, FixedFormat):
        return _pow2(-fmt.frac_length)
    e = _floor_log2(abs(x)) if x != 0 else fmt.emin
    if fmt.subnormals:
        e = max(e, fmt.emin)
    return _pow2(e - fmt.man_bits)


def neighbours(x, fmt) -> tuple[Fraction, Fraction]:
    """The grid points ``lo <= x <= hi`` next to a finite ``x`` (``lo == hi`` if x is on it).

    The grid is unbounded above. For a fixed-point format it is every ``c * 2**-frac_length``.
    For a float format, in the binade ``2**E <= |x| < 2**(E+1)`` the quantum is
    ``2**(max(E, emin) - man_bits)``, or ``2**(E - man_bits)`` without subnormals (then the
    grid is unbounded below too; results under ``2**emin`` are flushed afterwards).

    Examples
    --------
    >>> from fixedsim.formats import FP8_E4M3, FixedFormat
    >>> neighbours(460, FP8_E4M3)
    (Fraction(448, 1), Fraction(480, 1))
    >>> neighbours(-0.3, FixedFormat(8, 2))
    (Fraction(-1, 2), Fraction(-1, 4))
    """
    x = _exact(x)
    if isinstance(x, float):
        raise ValueError(f"neighbours: x must be finite, got {x}")
    q = _quantum(x, fmt)
    lo = math.floor(x / q) * q
    return (lo, lo) if lo == x else (lo, lo + q)


def _pick(x: Fraction, lo: Fraction, hi: Fraction, q: Fraction, mode, draw, bits,
          magnitude: bool) -> Fraction:
    """Choose ``lo`` or ``hi`` (quantum ``q`` at x) for ``lo < x < hi`` by the rounding rule."""
    lo_is_even = (lo / q) % 2 == 0  # integer significands of lo and hi differ by one
    even, odd = (lo, hi) if lo_is_even else (hi, lo)
    small, large = (lo, hi) if abs(lo) < abs(hi) else (hi, lo)
    if mode in (Rounding.NEAREST_EVEN, Rounding.NEAREST_AWAY):
        if x - lo != hi - x:
            return lo if x - lo < hi - x else hi
        return even if mode == Rounding.NEAREST_EVEN else large
    if mode == Rounding.TOWARD_ZERO:
        return small
    if mode == Rounding.DOWN:
        return lo
    if mode == Rounding.UP:
        return hi
    if mode == Rounding.ODD:
        return odd
    # STOCHASTIC: hardware adds `bits` random bits below the kept bits, then truncates.
    if magnitude:  # sign-magnitude floats truncate the magnitude (toward zero)
        return large if draw < math.floor(abs(x - small) / q * 2**bits) else small
    # two's complement fixed point truncates the value (toward -inf)
    return hi if draw < math.floor((x - lo) / (hi - lo) * 2**bits) else lo


def _check_args(fmt, rounding, overflow, draw, random_bits):
    rounding = Rounding.coerce(rounding, what="rounding")
    if overflow is None:
        overflow_ = Overflow.INFINITY if getattr(fmt, "has_inf", False) else Overflow.SATURATE
    else:
        overflow_ = Overflow.coerce(overflow, what="overflow")
    if not isinstance(fmt, (FixedFormat, FloatFormat)):
        raise TypeError(f"fmt must be a FixedFormat or FloatFormat, got {fmt!r}")
    if isinstance(fmt, FloatFormat) and overflow_ == Overflow.WRAP:
        raise ValueError(f"overflow WRAP is for fixed-point formats only, not {fmt}")
    if overflow_ == Overflow.INFINITY and not getattr(fmt, "has_inf", False):
        raise ValueError(f"overflow INFINITY needs a format with infinities, {fmt} has none")
    if random_bits is not None:
        if rounding != Rounding.STOCHASTIC:
            raise ValueError(f"random_bits is only meaningful with STOCHASTIC, not {rounding}")
        if isinstance(random_bits, bool) or not isinstance(random_bits, (int, np.integer)) \
                or not 1 <= random_bits <= 64:
            raise ValueError(f"random_bits must be an int in 1..64, got {random_bits!r}")
    bits = 64 if random_bits is None else int(random_bits)
    if rounding == Rounding.STOCHASTIC:
        if draw is None:
            raise ValueError("STOCHASTIC rounding needs a draw (an int in [0, 2**random_bits))")
        if isinstance(draw, bool) or not isinstance(draw, (int, np.integer)) \
                or not 0 <= draw < 2**bits:
            raise ValueError(f"draw must be an int in [0, 2**{bits}), got {draw!r}")
        draw = int(draw)
    return rounding, overflow_, draw, bits


def round_to_format(x, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, draw=None,
                    random_bits=None, flags=False):
    """Round ``x`` exactly to ``fmt`` (single rounding, then the range of the format).

    Parameters
    ----------
    x : int, float or Fraction
        The exact value; floats may be NaN, +-inf or -0.0.
    fmt : FixedFormat or FloatFormat
    rounding : Rounding or str, default NEAREST_EVEN
    overflow : Overflow or str, optional
        Default SATURATE for fixed point and "fn" floats, INFINITY for "ieee" floats.
    draw : int, optional
        STOCHASTIC only (ignored otherwise): a uniform integer in ``[0, 2**random_bits)``.
        Fixed point (two's complement truncates the value): the result is ``hi`` iff
        ``draw < floor((x - lo) / (hi - lo) * 2**random_bits)``. Floats (sign-magnitude
        truncates the magnitude): the result is the neighbour of larger magnitude iff
        ``draw < floor(|x - small| / (hi - lo) * 2**random_bits)``, ``small`` the neighbour
        of smaller magnitude.
    random_bits : int, optional
        STOCHASTIC only: random bits in the draw, 1 to 64; default 64.
    flags : bool, default False
        Also return a dict of bools: ``inexact`` (result != x), ``rounded_up`` (result > x),
        ``overflow`` (the overflow rule applied: the rounding on the unbounded grid is out of
        range, or x is infinite and the result finite), ``underflow`` (x finite, nonzero, and
        the result zero), ``subnormal`` (float result finite, nonzero, below ``2**emin``),
        ``nan`` (result NaN).

    Returns
    -------
    float or Fraction, or (value, dict) with ``flags=True``
        A float when exactly a float64, else a Fraction. Fixed-point zero is ``+0.0``; float
        zeros keep the sign of x (``+0.0`` in "fnuz" and unsigned formats); NaN keeps its sign.
        An unsigned float format gives NaN for a negative x (not -0.0), and E8M0 (no zero) for
        zero too; a value below E8M0's smallest is that smallest value (flag ``underflow``).

    Raises
    ------
    ValueError
        NaN into a fixed format or a float format without NaN (``inf_nan="none"``); inf with
        WRAP; WRAP on a float format; INFINITY on a format without infinities;
        ``random_bits`` with a deterministic rounding or outside 1..64;
        STOCHASTIC without a ``draw`` (or with one out of range).

    Examples
    --------
    >>> from fixedsim.formats import FP16, FixedFormat
    >>> round_to_format(65520.0, FP16), round_to_format(65520.0, FP16, "toward_zero")
    (inf, 65504.0)
    >>> round_to_format(130, FixedFormat(8, 0), overflow="wrap")
    -126.0
    >>> round_to_format(0.4, FixedFormat(8, 2), "stochastic", draw=0, random_bits=1)
    0.5
    >>> v, f = round_to_format(-1e-9, FP16, flags=True)
    >>> v, f["inexact"], f["underflow"], f["rounded_up"], f["overflow"]
    (-0.0, True, True, True, False)
    """
    rounding, overflow, draw, bits = _check_args(fmt, rounding, overflow, draw, random_bits)
    ex = _exact(x)
    over = False
    if isinstance(fmt, FixedFormat):
        result, over = _round_fixed(ex, fmt, rounding, overflow, draw, bits)
    else:
        result, over = _round_float(ex, _negative(x), fmt, rounding, overflow, draw, bits)
    if not flags:
        return result
    is_nan = isinstance(result, float) and math.isnan(result)
    x_nan = isinstance(ex, float) and math.isnan(ex)
    finite_nonzero = isinstance(ex, Fraction) and ex != 0
    res_finite = not isinstance(result, float) or math.isfinite(result)
    f = dict.fromkeys(_FLAG_NAMES, False)
    f["nan"] = is_nan
    if not x_nan:
        f["inexact"] = result != ex
        f["rounded_up"] = result > ex
        f["overflow"] = over
        f["underflow"] = finite_nonzero and (result == 0 or (
            isinstance(fmt, FloatFormat) and not fmt.has_zero and result == fmt.min_normal
            and abs(ex) < Fraction(fmt.min_normal)))
        f["subnormal"] = (isinstance(fmt, FloatFormat) and res_finite and result != 0
                          and abs(result) < fmt.min_normal)
    return result, f


def _round_fixed(x, fmt: FixedFormat, rounding, overflow, draw, bits):
    q = _pow2(-fmt.frac_length)
    if isinstance(x, float):  # NaN or inf
        if math.isnan(x):
            raise ValueError(f"cannot round NaN to the fixed-point format {fmt}")
        if overflow == Overflow.WRAP:
            raise ValueError(f"cannot WRAP an infinity into {fmt}; use SATURATE")
        return _out((fmt.max_code if x > 0 else fmt.min_code) * q), True
    lo, hi = neighbours(x, fmt)
    code = int((lo if lo == hi else _pick(x, lo, hi, q, rounding, draw, bits, False)) / q)
    over = not fmt.min_code <= code <= fmt.max_code
    if over and overflow == Overflow.SATURATE:
        code = min(max(code, fmt.min_code), fmt.max_code)
    elif over:  # WRAP: keep the low word_length bits, read them as two's complement if signed
        code %= 2**fmt.word_length
        if fmt.signed and code >= 2 ** (fmt.word_length - 1):
            code -= 2**fmt.word_length
    return (0.0 if code == 0 else _out(code * q)), over


def _round_float(x, negative: bool, fmt: FloatFormat, rounding, overflow, draw, bits):
    sign = -1.0 if negative else 1.0
    if isinstance(x, float) and math.isnan(x):
        if not fmt.has_nan:
            raise ValueError(f"cannot round NaN to {fmt}, which has no NaN")
        return math.copysign(math.nan, sign), False
    if not fmt.signed and (negative and x != 0 or not fmt.has_zero and x == 0):
        return math.nan, False  # an unsigned format has no negative values (E8M0: no zero)
    if isinstance(x, float):  # infinity
        if overflow == Overflow.INFINITY:
            return x, False
        return math.copysign(fmt.max, sign), True
    lo, hi = neighbours(x, fmt)
    v = lo if lo == hi else _pick(x, lo, hi, _quantum(x, fmt), rounding, draw, bits, True)
    if not fmt.subnormals and abs(v) < _pow2(fmt.emin):
        v = 0  # flush; tininess after rounding
        if not fmt.has_zero:  # no zero (E8M0): the smallest value instead
            return fmt.min_normal, False
    if v == 0:
        return (math.copysign(0.0, sign) if fmt.has_negative_zero else 0.0), False
    if abs(v) <= Fraction(fmt.max):
        return float(v), False
    big = math.copysign(math.inf, sign)
    if overflow == Overflow.SATURATE or rounding in (Rounding.TOWARD_ZERO, Rounding.ODD):
        return math.copysign(fmt.max, sign), True
    if rounding == Rounding.DOWN:
        return (fmt.max if sign > 0 else big), True
    if rounding == Rounding.UP:
        return (big if sign > 0 else -fmt.max), True
    return big, True  # nearest modes and STOCHASTIC


def quantize(x, fmt, rounding=Rounding.NEAREST_EVEN, overflow=None, *, draws=None,
             random_bits=None):
    """Elementwise :func:`round_to_format` over an array.

    Parameters
    ----------
    x : array_like
    fmt, rounding, overflow, random_bits
        As for :func:`round_to_format`.
    draws : array_like of int, optional
        STOCHASTIC only: one draw per element (broadcast to the shape of ``x``).

    Returns
    -------
    numpy.ndarray
        float64, or object (holding Fractions) if some result is not exactly a float64.

    Examples
    --------
    >>> from fixedsim.formats import FixedFormat
    >>> quantize([0.375, -0.375], FixedFormat(8, 2), "down")
    array([ 0.25, -0.5 ])
    """
    x = np.asarray(x)
    d = None if draws is None else np.broadcast_to(np.asarray(draws, dtype=object), x.shape)
    out = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        draw = None if d is None else d[idx]
        out[idx] = round_to_format(x[idx].item() if x.dtype != object else x[idx], fmt, rounding,
                                   overflow, draw=draw, random_bits=random_bits)
    if all(isinstance(v, float) for v in out.flat):
        return out.astype(np.float64)
    return out


def encode(value, fmt) -> int:
    """Unsigned integer code of a value exactly representable in ``fmt``.

    Fixed point: the ``word_length``-bit two's complement code. Float: sign, biased exponent,
    mantissa. NaN gets the canonical code (sign kept): all-ones exponent and the quiet bit for
    "ieee", all-ones exponent and mantissa for "fn" (no sign bit in an unsigned format: 0xFF
    in E8M0), the sign bit alone for "fnuz" (0x80); "none" has no NaN. Subnormal values are
    encoded also for formats with ``subnormals=False`` (the encoding exists; rounding never
    produces them).

    Examples
    --------
    >>> from fixedsim.formats import FP16, FixedFormat
    >>> hex(encode(1.0, FP16)), hex(encode(-0.0, FP16)), encode(-1, FixedFormat(8, 0))
    ('0x3c00', '0x8000', 255)
    """
    v = _exact(value)
    if isinstance(fmt, FixedFormat):
        if isinstance(v, float):
            raise ValueError(f"{value!r} is not a value of the fixed-point format {fmt}")
        code = v / _pow2(-fmt.frac_length)
        if code.denominator != 1 or not fmt.min_code <= code <= fmt.max_code:
            raise ValueError(f"{value!r} is not exactly representable in {fmt}")
        return int(code) % 2**fmt.word_length
    e, m = fmt.exp_bits, fmt.man_bits
    top = 2**e - 1  # all-ones exponent field
    neg = _negative(value)
    if neg and not fmt.signed and not (isinstance(v, float) and math.isnan(v)):
        raise ValueError(f"{value!r} is not a value of the unsigned format {fmt}")
    sign = (1 << (e + m)) if neg and fmt.signed else 0
    if isinstance(v, float) and math.isnan(v):
        if fmt.inf_nan == "fnuz":
            return 1 << (e + m)  # the one NaN: the negative zero's code
        if not fmt.has_nan:
            raise ValueError(f"{fmt} has no NaN, cannot encode {value!r}")
        return sign | (top << m) | ((1 << (m - 1)) if fmt.has_inf else 2**m - 1)
    if isinstance(v, float):
        if not fmt.has_inf:
            raise ValueError(f"{fmt} has no infinities, cannot encode {value!r}")
        return sign | (top << m)
    if v == 0:
        if not fmt.has_zero or (sign and not fmt.has_negative_zero):
            raise ValueError(f"{value!r} is not a value of {fmt}")
        return sign
    a = abs(v)
    exp = max(_floor_log2(a), fmt.emin)
    sig = a / _pow2(exp - m)
    if sig.denominator != 1 or a > Fraction(fmt.max) or a < Fraction(fmt.min_subnormal):
        raise ValueError(f"{value!r} is not exactly representable in {fmt}")
    if sig < 2**m:  # subnormal
        return sign | int(sig)
    return sign | ((exp + fmt.bias) << m) | (int(sig) - 2**m)


def decode(code, fmt):
    """Value of an unsigned integer code in ``[0, 2**fmt.width)``; inverse of :func:`encode`.

    Codes with a zero exponent field and a nonzero mantissa decode to their subnormal value
    even for formats with ``subnormals=False`` (the encoding exists; rounding never makes it).

    Examples
    --------
    >>> from fixedsim.formats import FP8_E4M3, FP16, FixedFormat
    >>> decode(0x7BFF, FP16), decode(0x7E, FP8_E4M3), decode(0x7F, FP8_E4M3)
    (65504.0, 448.0, nan)
    >>> decode(0xFF, FixedFormat(8, 2))
    -0.25
    """
    if isinstance(code, bool) or not isinstance(code, (int, np.integer)) \
            or not 0 <= int(code) < 2**fmt.width:
        raise ValueError(f"code must be an int in [0, 2**{fmt.width}), got {code!r}")
    code = int(code)
    if isinstance(fmt, FixedFormat):
        if fmt.signed and code >= 2 ** (fmt.word_length - 1):
            code -= 2**fmt.word_length
        return 0.0 if code == 0 else _out(code * _pow2(-fmt.frac_length))
    e, m = fmt.exp_bits, fmt.man_bits
    sign = -1.0 if fmt.signed and code >> (e + m) else 1.0
    exp_field, man = (code >> m) & (2**e - 1), code & (2**m - 1)
    if fmt.inf_nan == "fnuz" and code == 1 << (e + m):
        return math.nan
    if exp_field == 2**e - 1:
        if fmt.has_inf:
            return math.copysign(math.inf if man == 0 else math.nan, sign)
        if fmt.inf_nan == "fn" and man == 2**m - 1:
            return math.copysign(math.nan, sign)
    if m == 0:  # exponent-only (E8M0): every field is a power of two
        return float(_pow2(exp_field - fmt.bias))
    if exp_field == 0:
        mag = man * _pow2(fmt.emin - m)
    else:
        mag = (2**m + man) * _pow2(exp_field - fmt.bias - m)
    return math.copysign(float(mag), sign)


def values(fmt) -> list:
    """Sorted list of every finite value of ``fmt`` (width 16 bits at most), zero once.

    For formats without subnormals the subnormal encodings are left out: they are not values
    that rounding produces.

    Examples
    --------
    >>> from fixedsim.formats import FixedFormat, FloatFormat, _to_float_toward_zero
    >>> values(FixedFormat(3, 1))
    [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    >>> values(FloatFormat(2, 1))[5:]
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    """
    if fmt.width > 16:
        raise ValueError(f"values() lists formats of at most 16 bits, {fmt} has {fmt.width}")
    if isinstance(fmt, FixedFormat):
        q = _pow2(-fmt.frac_length)
        return [0.0 if c == 0 else _out(c * q) for c in range(fmt.min_code, fmt.max_code + 1)]
    positive = []
    for code in range(2 ** (fmt.width - fmt.signed)):  # sign bit clear
        v = decode(code, fmt)
        if math.isfinite(v) and (v == 0 or fmt.subnormals or v >= fmt.min_normal):
            positive.append(v)
    positive.sort()
    if not fmt.signed:
        return positive
    return [-v for v in reversed(positive) if v != 0] + positive


# -- matrix products -----------------------------------------------------------------------------
#: Stages of a matrix product whose roundings draw random bits, in the order of their keys.
STAGE_INPUT_A, STAGE_INPUT_B, STAGE_PRODUCT, STAGE_ACCUMULATOR, STAGE_OUTPUT = range(5)
#: The alignment of a :class:`~fixedsim.BlockFMA`'s terms to each block's window: an event
#: stage of :func:`dot` (no random draws).
STAGE_ALIGNMENT = 5


def _exact_product(x: float, y: float):
    """``x * y`` exactly: a Fraction, or a float for IEEE specials and signed zeros."""
    if not (math.isfinite(x) and math.isfinite(y)):
        return x * y  # IEEE: inf * 0 is NaN
    if x == 0 or y == 0:
        return math.copysign(0.0, x) * math.copysign(1.0, y)
    return Fraction(x) * Fraction(y)


def exact_sum(terms, rounding=Rounding.NEAREST_EVEN):
    """The exact sum of ``terms`` (floats and Fractions), with IEEE 754 specials and zero signs.

    A term that is an infinity or NaN makes the sum the IEEE sum of those terms (``inf - inf``
    is NaN). An exact zero sum is ``-0.0`` when every term is a zero and all are ``-0.0``, or
    when ``rounding`` is DOWN and some term is ``-0.0`` or nonzero; else ``+0.0`` (the rule of
    IEEE 754 addition, extended to many terms).

    Examples
    --------
    >>> exact_sum([0.5, Fraction(1, 3)])
    Fraction(5, 6)
    >>> exact_sum([-0.0, -0.0]), exact_sum([1.0, -1.0]), exact_sum([1.0, -1.0], "down")
    (-0.0, 0.0, -0.0)
    """
    rounding = Rounding.coerce(rounding, what="rounding")
    specials = [t for t in terms if isinstance(t, float) and not math.isfinite(t)]
    if specials:
        return float(sum(specials))
    s = sum((Fraction(t) for t in terms), Fraction(0))
    if s != 0:
        return s
    zeros_only = all(t == 0 for t in terms)
    negs = [math.copysign(1.0, t) < 0 for t in terms if isinstance(t, float) and t == 0]
    if zeros_only and terms and all(negs) and len(negs) == len(terms):
        return -0.0
    if rounding is Rounding.DOWN and (not zeros_only or any(negs)):
        return -0.0
    return 0.0


def reduce_block(s, prods, acc, rnd=None):
    """One block of an accumulator with ``lanes``, ``order`` or ``addend`` set, exactly.

    ``s`` is the running sum (the previous blocks' result, or the addend C), ``prods`` the
    block's products in ``k`` order (exact, or already rounded into the product format),
    ``acc`` the :class:`~fixedsim.Accumulator`; ``rnd(v)`` rounds an exact value into the
    accumulator (default :func:`round_to_format` with its format, rounding and overflow).
    Every step is an exact sum of two values (:func:`exact_sum`, IEEE specials and zero signs)
    rounded once:

    - ``lanes=None``: the block's products (with ``s`` when ``addend="first"``) summed exactly,
      one rounding;
    - ``lanes=L``: the products taken in ``order``, the ``i``-th added to chain ``i mod L``
      (chains start at +0, chain 0 at ``s`` when ``addend="first"``), then the chains added
      pairwise (``combine="tree"``) or in order (``"sequential"``);
    - ``addend="last"``: ``s`` plus that value, rounded once more.

    Examples
    --------
    The two chains of an AMX tile instruction (even and odd products), their sum, then C:

    >>> import fixedsim as fs
    >>> acc = fs.Accumulator(fs.FP32, block=4, lanes=2, addend="last")
    >>> reduce_block(2.0**24, [1.0, 2.0**24, 1.0, -2.0**24], acc)
    16777218.0
    """
    if rnd is None:
        def rnd(v):
            return round_to_format(v, acc.fmt, acc.rounding, acc.overflow)
    mode = acc.rounding

    def add(x, y):
        return rnd(exact_sum([x, y], mode))

    seq = list(prods)[::-1] if acc.order == "descending" else list(prods)
    first = acc.addend == "first"
    if acc.lanes is None:
        if first:
            return rnd(exact_sum([s, *seq], mode))
        return add(s, rnd(exact_sum([0.0, *seq], mode)))
    chains = [0.0] * acc.lanes
    if first:
        chains[0] = s
    for i, p in enumerate(seq):
        chains[i % acc.lanes] = add(chains[i % acc.lanes], p)
    if acc.combine == "sequential":
        v = chains[0]
        for c in chains[1:]:
            v = add(v, c)
    else:
        while len(chains) > 1:
            nxt = [add(chains[i], chains[i + 1]) for i in range(0, len(chains) - 1, 2)]
            if len(chains) % 2:
                nxt.append(chains[-1])
            chains = nxt
        v = chains[0]
    return v if first else add(s, v)


def block_fma(a, b, c, acc, input_emin=-1022, *, flags=False, align=None):
    """One block of a :class:`~fixedsim.BlockFMA` accumulator, exactly: ``c + sum a[k] b[k]``
    as an aligned, truncating multi-term adder computes it.

    Parameters
    ----------
    a, b : sequence of float
        The block's operands (already in the input format).
    c : float
        The addend: C for the first block, the previous block's result after it.
    acc : BlockFMA
    input_emin : int
        Exponent of the input format's smallest normal: a subnormal input ``x`` is read as
        ``sx 2**input_emin`` with ``sx < 1`` (default float64's).
    flags : bool, default False
        Also return the flags (:func:`round_to_format`'s) of the rounding of the cut sum
        ``S q``: ``inexact`` when ``S q`` itself had to be rounded (the cut terms are not
        counted), ``overflow`` when it became an infinity, ``nan`` for a NaN result; all
        False for a special or zero result but ``nan``.
    align : dict, optional
        If given, the events of the alignment are counted into it: ``align["inexact"]``, the
        nonzero terms (products, and ``c``) that lost bits when cut to the window,
        ``align["underflow"]``, those of them cut to zero. Nothing is aligned, nor counted,
        when an infinity or a NaN decides the result.

    Returns
    -------
    float, or (float, dict) with ``flags=True``

    Notes
    -----
    The definition, in integers: every nonzero term ``x`` (each product ``a[k] b[k]``, and
    ``c`` when it is not zero) has an exponent ``e``: ``ea + eb`` for a product, with ``ea =
    max(floor(log2 |a[k]|), input_emin)`` (products are not renormalised: ``x / 2**e`` is in
    ``[0, 4)``), ``max(floor(log2 |c|), -126)`` for ``c``. The anchor is ``E = max(e)``, at
    least ``acc.min_exp``. With ``q = 2**(E - 23 - acc.extra_bits)`` the block's value is
    ``S q``, ``S = sum over the terms of sign(x) floor(|x| / q)``: each term cut toward zero
    to the anchor's window, the cut terms summed exactly. ``S q`` is rounded once into
    ``acc.register`` with ``acc.rounding``; a result beyond its largest value is an
    infinity; ``S = 0`` gives +0. An infinity or NaN among the products or ``c`` gives their
    IEEE sum instead.

    With ``acc.addend_bits = (m, cb)``, ``c`` is no term: the anchor ``E`` and the cut
    ``S`` are those of the products alone (without a nonzero product ``S = 0`` and ``E`` is
    ``acc.min_exp``, or absent), then ``E2 = max(E, e_c)`` with ``e_c = max(floor(log2
    |c|), -126)`` (-126 for ``c = 0``; ``E2 = e_c`` without ``E``), and the value is
    ``floor(S q / 2**(E2 - m)) 2**(E2 - m) + floor(c / 2**(E2 - cb)) 2**(E2 - cb)``,
    rounded as above. ``align`` counts ``c``'s cut there (its ``underflow``: cut to 0); the
    floor of ``S q`` is not counted. With ``acc.addend_bits = (m, cb, d)``, a nonzero ``c``
    with ``e_c < E2 - d`` is dropped: its floor is replaced by 0 (counted as cut to 0).

    With ``acc.groups = G`` (and ``addend_bits``), product ``k`` of the block belongs to group
    ``k mod G``; each group ``g`` with a term has its own anchor ``E_g`` (its largest term
    exponent, at least ``acc.min_exp``) and cut sum ``S_g`` (its terms cut toward zero to
    multiples of ``q_g = 2**(E_g - 23 - acc.extra_bits)``); ``E = max E_g`` and ``S = sum
    floor(S_g q_g / q)``: the group sums floored at the largest anchor's window. ``G = 1``
    is the definition above.

    With ``acc.product_inf_exp`` set (and every product and ``c`` finite), products of
    magnitude ``2**acc.product_inf_exp`` or more are infinities of their sign, and their
    IEEE sum is the result.

    With ``acc.zero_exp`` set, a zero operand has that exponent and a zero product is a term
    of exponent ``e_a + e_b`` (it takes part in the anchor; its cut is 0).

    Examples
    --------
    Probes of Fasi et al. (2021) on a V100-like unit (``block=4``, no extra bits): five
    terms of exponent 0 sum to 8 in the wide register, which carries past the anchor
    without renormalising in between; and in ``(-1 + 2**-24) + 1 - 2**-24`` the addend's
    last bit and the product ``2**-24`` are both cut at ``2**-23``, leaving ``2**-23``:

    >>> import fixedsim as fs
    >>> block_fma([1.0] * 4, [1.0, 1.5, 1.75, 1.875], 1.875, fs.BlockFMA(4, 0))
    8.0
    >>> block_fma([1.0, 1.0], [1.0, -2.0**-24], -1.0 + 2.0**-24, fs.BlockFMA(4, 0))
    1.1920928955078125e-07
    """
    quiet = dict.fromkeys(_FLAG_NAMES, False)

    def done(v, fl=quiet):
        return (v, dict(fl, nan=math.isnan(v))) if flags else v

    prods = [_exact_product(float(x), float(y)) for x, y in zip(a, b, strict=True)]
    c = float(c)
    specials = [t for t in [*prods, c] if isinstance(t, float) and not math.isfinite(t)]
    if specials:
        return done(float(sum(specials)))  # IEEE: inf - inf is NaN, NaN wins

    lim = getattr(acc, "product_inf_exp", None)
    if lim is not None:  # products beyond the limit are infinities and decide the result
        big = [math.inf if p > 0 else -math.inf for p in prods if abs(p) >= _pow2(lim)]
        if big:
            return done(float(sum(big)))

    def expo(x, emin):
        return max(_floor_log2(abs(Fraction(x))), emin)

    def cut(x, q, floor=False):  # x cut to a multiple of q (toward zero, or minus infinity)
        m = math.floor(x / q) if floor else int(x / q)
        if align is not None and x != 0 and m * q != x:
            align["inexact"] = align.get("inexact", 0) + 1
            align["underflow"] = align.get("underflow", 0) + int(m == 0)
        return m

    second = getattr(acc, "addend_bits", None)
    ze = getattr(acc, "zero_exp", None)

    def op_expo(x):  # an operand's exponent; a zero's is zero_exp (None: no exponent)
        return expo(x, input_emin) if x != 0 else ze

    G = getattr(acc, "groups", None) or 1  # product i of the block in group i mod G
    terms = [(p, op_expo(x) + op_expo(y), i % G)
             for i, (p, x, y) in enumerate(zip(prods, a, b, strict=True))
             if p != 0 or ze is not None]
    if c != 0 and second is None:  # (G is 1 without addend_bits)
        terms.append((Fraction(c), expo(c, -126), 0))
    if not terms and second is None:
        return done(0.0)
    anchors = {}  # each group's anchor: its largest term exponent, at least min_exp
    for _, e, g in terms:
        anchors[g] = max(anchors.get(g, e), e)
    if acc.min_exp is not None:
        anchors = {g: max(e, acc.min_exp) for g, e in anchors.items()}
    E = max(anchors.values(), default=None)
    if acc.min_exp is not None and (E is not None or second is not None):
        E = acc.min_exp if E is None else max(E, acc.min_exp)
    S = 0
    if E is not None:  # each group cut at its anchor, then floored at the largest one's
        q = _pow2(E - 23 - acc.extra_bits)
        for g, Eg in anchors.items():
            qg = _pow2(Eg - 23 - acc.extra_bits)
            S += math.floor(sum(cut(Fraction(x), qg) for x, _, h in terms if h == g) * qg / q)
    if second is not None:  # C enters after the products: both aligned again, floored
        m, cb = second[:2]
        ec = expo(c, -126) if c != 0 else -126
        E2 = max(ec, -126 if E is None else E)
        q2 = _pow2(E2 - m)
        if len(second) == 3 and c != 0 and ec < E2 - second[2]:  # C dropped: read as 0
            cf = 0
            if align is not None:  # counted as a term cut to zero
                align["inexact"] = align.get("inexact", 0) + 1
                align["underflow"] = align.get("underflow", 0) + 1
        else:
            cf = cut(Fraction(c), _pow2(E2 - cb), True)
        S = (math.floor(S * q / q2) if S else 0) + cf * 2 ** (m - cb)
        q = q2
    if S == 0:
        return done(0.0)
    r, fl = round_to_format(S * q, acc.register, acc.rounding, Overflow.INFINITY, flags=True)
    if fl["overflow"]:
        r = math.copysign(math.inf, S)
        fl["rounded_up"] = S > 0
    return done(r, fl)


def promote_add(s, p, fmt):
    """``s + p`` rounded once to nearest even into ``fmt`` (overflow to an infinity), as an
    IEEE addition: the step of a :class:`~fixedsim.BlockFMA` with ``promote`` that adds a
    chunk's result ``p`` to the running sum ``s``. Returns ``(value, flags)``
    (:func:`round_to_format`'s flags; for an infinite or NaN term, only ``nan``).

    An exact zero sum is +0, or -0 when both terms are -0.

    >>> import fixedsim as fs
    >>> promote_add(1.0, 2.0**-24, fs.FP32)[0]  # a tie: to even
    1.0
    >>> promote_add(1.0, 3 * 2.0**-24, fs.FP32)[0] == 1 + 2.0**-22
    True
    """
    s, p = float(s), float(p)
    if not (math.isfinite(s) and math.isfinite(p)):
        v = s + p
        return v, dict(dict.fromkeys(_FLAG_NAMES, False), nan=math.isnan(v))
    x = Fraction(s) + Fraction(p)
    if x == 0:
        z = -0.0 if math.copysign(1.0, s) < 0 and math.copysign(1.0, p) < 0 else 0.0
        return z, dict.fromkeys(_FLAG_NAMES, False)
    return round_to_format(x, fmt, Rounding.NEAREST_EVEN, Overflow.INFINITY, flags=True)


def deal(n, block, group):
    """The order in which the blocks of a chunk of ``n`` products take them, with a
    :class:`~fixedsim.BlockFMA`'s ``interleave``: groups of ``group`` consecutive indices
    dealt round robin to the ``n // block`` blocks (group ``g`` to block ``g mod (n //
    block)``), block after block (``block`` a multiple of ``group``, ``n`` of ``block``).

    >>> deal(8, 4, 1)
    [0, 2, 4, 6, 1, 3, 5, 7]
    >>> deal(16, 8, 2)
    [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15]
    """
    nb = n // block
    return [g * group + r for t in range(nb) for g in range(t, n // group, nb)
            for r in range(group)]


def dot(a_row, b_col, spec, *, draw=None, index=0, events=None, c=0.0):
    """One output element of ``fixedsim.matmul`` computed exactly, step by step.

    This is the definition the kernels are tested against: products in order ``k = 0..K-1``,
    each exact or rounded into ``spec.product``; an exact sum (``spec.accumulator is None``)
    or a running sum starting at ``c`` (+0.0 by default) to which each block of ``block``
    consecutive products is added exactly and rounded once into the accumulator format (a
    :class:`~fixedsim.BlockFMA`: :func:`block_fma` per block); then one rounding into
    ``spec.output`` (into float64 when both accumulator and output are None; none when only the
    output is None).

    Parameters
    ----------
    a_row, b_col : sequence of float
        The (already quantized) operands: row ``i`` of ``a``, column ``j`` of ``b``.
    spec : MatmulSpec
        Read by attribute: ``product``, ``product_rounding``, ``accumulator`` (with ``fmt``,
        ``rounding``, ``overflow``, ``block``, ``random_bits``, ``via``), ``output``,
        ``output_rounding``, ``random_bits``.
    draw : callable, optional
        ``draw(stage, i)`` returns the random integer of the ``i``-th stochastic rounding of
        ``stage`` (:data:`STAGE_PRODUCT` with ``i = index * K + k``,
        :data:`STAGE_ACCUMULATOR` with ``i = index * nblocks + t``, :data:`STAGE_OUTPUT`
        with ``i = index``). Needed only when a stage rounds stochastically.
    index : int
        The flat index of this output element.
    events : dict, optional
        If given, the flags of every rounding (see :func:`round_to_format`) are counted into
        ``events[stage][flag]``; for a :class:`~fixedsim.BlockFMA` also the alignment's
        (``events[STAGE_ALIGNMENT]``: see :func:`block_fma`'s ``align``).
    c : float, default +0.0
        The addend C (``D = C + A B``): the start of the running sum (it takes part in the
        first block's exact sum), a term of the exact sum when there is no accumulator, and
        for a :class:`~fixedsim.BlockFMA` a term of the first block (:func:`block_fma`), or
        with ``promote`` the start of the running sum the chunks are added to
        (:func:`promote_add`).

    Returns
    -------
    float or Fraction
    """
    from fixedsim.formats import FP64

    K = len(a_row)
    if len(b_col) != K:
        raise ValueError(f"a_row has {K} elements, b_col {len(b_col)}")

    def rnd(stage, v, fmt, rounding, i, overflow=None, random_bits=None):
        sr = rounding is Rounding.STOCHASTIC
        r, fl = round_to_format(v, fmt, rounding, overflow, draw=draw(stage, i) if sr else None,
                                random_bits=random_bits if sr else None, flags=True)
        if events is not None:
            ev = events.setdefault(stage, {})
            for name, on in fl.items():
                ev[name] = ev.get(name, 0) + int(on)
        return r

    prods = []
    for k in range(K):
        p = _exact_product(float(a_row[k]), float(b_col[k]))
        if spec.product is not None:
            p = rnd(STAGE_PRODUCT, p, spec.product, spec.product_rounding, index * K + k,
                    random_bits=spec.random_bits)
        prods.append(p)
    acc = spec.accumulator
    if acc is None:
        v = exact_sum([c, *prods], spec.output_rounding)
        out = spec.output if spec.output is not None else FP64
    elif hasattr(acc, "extra_bits"):  # a BlockFMA (reference imports no matmul module)
        emin = spec.input.emin if isinstance(spec.input, FloatFormat) else FP64.emin

        def count(fl):
            if events is not None:
                ev = events.setdefault(STAGE_ACCUMULATOR, {})
                for name, on in fl.items():
                    ev[name] = ev.get(name, 0) + int(on)

        def chain(a, b, s):  # the blocks of consecutive products of a, b, from s
            for t0 in range(0, len(a), acc.block):
                blk = slice(t0, t0 + acc.block)
                al = events.setdefault(STAGE_ALIGNMENT, {}) if events is not None else None
                s, fl = block_fma(a[blk], b[blk], s, acc, emin, flags=True, align=al)
                count(fl)
            return s

        def dealt(x, k0):  # a chunk's products in the order its blocks take them, zero-padded
            return [float(x[k0 + i]) if k0 + i < K else 0.0
                    for i in deal(acc.promote, acc.block, acc.interleave)]

        if acc.promote is None:
            s = chain(a_row, b_col, c)
        else:  # chunks summed from +0, each added to the running sum (from C) in acc.fmt
            s = c
            for k0 in range(0, K, acc.promote):
                if acc.interleave is None:
                    k1 = min(k0 + acc.promote, K)
                    part = chain(a_row[k0:k1], b_col[k0:k1], 0.0)
                else:
                    part = chain(dealt(a_row, k0), dealt(b_col, k0), 0.0)
                s, fl = promote_add(s, part, acc.fmt)
                count(fl)
        if spec.output is None:
            return s
        v, out = s, spec.output
    else:
        s = c
        nblocks = -(-K // acc.block)
        for t in range(nblocks):
            if getattr(acc, "structured", False):  # lanes, order, addend: no random draws
                s = reduce_block(s, prods[t * acc.block:(t + 1) * acc.block], acc,
                                 lambda v: rnd(STAGE_ACCUMULATOR, v, acc.fmt, acc.rounding, 0,
                                               acc.overflow))
                continue
            v = exact_sum([s, *prods[t * acc.block:(t + 1) * acc.block]], acc.rounding)
            if getattr(acc, "via", None) is not None:
                v = round_to_format(v, acc.via)
            s = rnd(STAGE_ACCUMULATOR, v, acc.fmt, acc.rounding, index * nblocks + t,
                    acc.overflow, acc.random_bits)
        if spec.output is None:
            return s
        v, out = s, spec.output
    return rnd(STAGE_OUTPUT, v, out, spec.output_rounding, index,
               random_bits=spec.random_bits)


def _container(v) -> float:
    """``v`` as float64, toward zero when it is not one (wide fixed point)."""
    return v if isinstance(v, float) else _to_float_toward_zero(v)


def matmul(a, b, spec, *, draw=None, c=None):
    """``fixedsim.matmul(a, b, spec, c)`` computed exactly, element by element, as float64.

    Inputs are rounded into ``spec.input`` with :func:`round_to_format` (draws of stages
    :data:`STAGE_INPUT_A` / :data:`STAGE_INPUT_B` indexed by the flat element index of ``a``
    and ``b`` as given), then each output element is :func:`dot` with its addend ``c``
    (broadcast to the output shape; None: +0). ``a`` of shape ``(..., M, K)`` and ``b`` of
    shape ``(..., K, N)`` broadcast their batch dimensions as :func:`numpy.matmul` does; the
    draw index of an output element is its flat index in the output. Values that are not
    float64 (wide fixed point) are given toward zero, as the kernels' float64 containers
    hold them.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)

    def quant(x, stage):
        if spec.input is None:
            return x
        r = spec.input_rounding
        sr = r is Rounding.STOCHASTIC
        flat = [round_to_format(float(v), spec.input, r,
                                random_bits=spec.random_bits if sr else None,
                                draw=draw(stage, i) if sr else None)
                for i, v in enumerate(x.reshape(-1))]
        return np.array([_container(v) for v in flat], dtype=np.float64).reshape(x.shape)

    qa, qb = quant(a, STAGE_INPUT_A), quant(b, STAGE_INPUT_B)
    if qb.ndim == 1 or qa.ndim == 1:
        raise ValueError("reference.matmul: a and b must have at least 2 dimensions")
    batch = np.broadcast_shapes(qa.shape[:-2], qb.shape[:-2])
    M, N = qa.shape[-2], qb.shape[-1]
    A = np.broadcast_to(qa, (*batch, *qa.shape[-2:]))
    B = np.broadcast_to(qb, (*batch, *qb.shape[-2:]))
    C = np.broadcast_to(np.zeros(()) if c is None else np.asarray(c, np.float64),
                        (*batch, M, N))
    out = np.empty((*batch, M, N))
    for o, idx in enumerate(np.ndindex(*batch, M, N)):
        *bi, i, j = idx
        bi = tuple(bi)
        out[idx] = _container(dot(A[bi][i], B[bi][:, j], spec, draw=draw, index=o,
                                  c=float(C[idx])))
    return out


# -- block-scaled formats ------------------------------------------------------------------------
def _ceil_log2(a: Fraction) -> int:
    """Exact ``ceil(log2(a))`` for ``a > 0``."""
    e = _floor_log2(a)
    return e if _pow2(e) == a else e + 1


def tensor_scale(amax, fmt):
    """The per-tensor scale of a two-level block format (NVFP4) for a tensor whose largest
    finite magnitude is ``amax`` (exact): ``amax / (element.max * scale.max)`` rounded to
    nearest even into ``fmt.tensor_scale``, at least its smallest positive value.

    Raises
    ------
    ValueError
        The scale is beyond the tensor scale format's largest value.

    Examples
    --------
    >>> from fixedsim.blockformats import NVFP4
    >>> tensor_scale(2688, NVFP4), tensor_scale(0, NVFP4) == 2.0**-149
    (Fraction(1, 1), True)
    """
    from fixedsim.blockformats import BlockFormat

    if not isinstance(fmt, BlockFormat) or fmt.tensor_scale is None:
        raise ValueError(f"tensor_scale: {fmt!r} has no per-tensor scale")
    amax = _exact(amax)
    target = amax / (Fraction(fmt.element.max) * Fraction(fmt.scale.max))
    t, fl = round_to_format(target, fmt.tensor_scale, Rounding.NEAREST_EVEN, Overflow.SATURATE,
                            flags=True)
    if fl["overflow"]:
        raise ValueError(f"the tensor's largest magnitude {float(amax)!r} needs a per-tensor "
                         f"scale beyond {fmt.tensor_scale!r}'s largest value")
    return max(Fraction(t), Fraction(fmt.tensor_scale.smallest))


def block_scale(amax, fmt, tensor=1):
    """The scale of one block of the block format ``fmt`` whose largest magnitude is ``amax``.

    Parameters
    ----------
    amax : int, float or Fraction
        The exact largest magnitude of the block; NaN or infinity give a NaN scale.
    fmt : BlockFormat
    tensor : Fraction, default 1
        The per-tensor scale (:func:`tensor_scale`) of a two-level format.

    Returns
    -------
    Fraction or float
        The scale (a Fraction), or NaN. The rules, from ``emax`` = floor(log2(element.max)):
        "ocp" ``2**(floor(log2 amax) - emax)``; "ceil" ``2**(ceil(log2 amax) - emax)``;
        "even" ``2**(floor(log2 r) - emax)``, ``r`` = amax rounded to the element's precision
        with ties away from zero; "rceil" ``2**ceil(log2(amax / element.max))``; a power of
        two below the scale format's smallest is raised to it (and 0 gives it). "nearest":
        ``amax / (element.max * tensor)`` rounded to nearest even into the scale format, at
        least its smallest positive value.

    Raises
    ------
    ValueError
        The scale is beyond the scale format's largest value, or a NaN scale in a scale
        format without NaN.

    Examples
    --------
    >>> from fixedsim.blockformats import MXFP8_E4M3, BlockFormat
    >>> from fixedsim.formats import FP8_E4M3
    >>> block_scale(957, MXFP8_E4M3), block_scale(957, BlockFormat(FP8_E4M3, scale_rule="rceil"))
    (Fraction(2, 1), Fraction(4, 1))
    """
    from fixedsim.blockformats import (
        POW2_RULES,
        _element_emax,
        _element_precision,
        _pow2_range,
    )

    amax = _exact(amax)
    if isinstance(amax, float):
        if not fmt.scale.has_nan:
            raise ValueError(f"a block holding NaN or an infinity needs a NaN scale, which "
                             f"{fmt.scale!r} does not have")
        return math.nan
    el, rule = fmt.element, fmt.scale_rule
    if rule in POW2_RULES:
        lo, hi = _pow2_range(fmt.scale)
        if amax == 0:
            return _pow2(lo)
        emax = _element_emax(el)
        if rule == "ocp":
            k = _floor_log2(amax) - emax
        elif rule == "ceil":
            k = _ceil_log2(amax) - emax
        elif rule == "even":
            q = _pow2(_floor_log2(amax) - _element_precision(el) + 1)
            k = _floor_log2(math.floor(amax / q + Fraction(1, 2)) * q) - emax
        else:  # rceil
            k = _ceil_log2(amax / Fraction(el.max))
        if k > hi:
            raise ValueError(f"a block whose largest magnitude is {float(amax)!r} needs the "
                             f"scale 2**{k}, beyond {fmt.scale!r}'s largest power of two 2**{hi}")
        return _pow2(max(k, lo))
    smallest = Fraction(fmt.scale.smallest)
    if amax == 0:
        return smallest
    target = amax / (Fraction(el.max) * Fraction(tensor))
    s, fl = round_to_format(target, fmt.scale, Rounding.NEAREST_EVEN, Overflow.SATURATE,
                            flags=True)
    if fl["overflow"]:
        raise ValueError(f"a block whose largest magnitude is {float(amax)!r} needs a scale "
                         f"beyond {fmt.scale!r}'s largest value")
    return max(Fraction(s), smallest)


def block_quantize(x, fmt, rounding=Rounding.NEAREST_EVEN, *, draws=None, random_bits=None,
                   axis=None):
    """Quantize the array ``x`` into the block format ``fmt``, exactly.

    The blocks run along ``axis`` (default ``fmt.axis``), whose length ``block`` must divide.
    For each block: its scale ``S`` (:func:`block_scale`, with :func:`tensor_scale` of the
    whole tensor's largest finite magnitude for a two-level format), then every element
    ``x / S`` rounded once into ``fmt.element`` by :func:`round_to_format` (overflow
    SATURATE: values beyond the element's largest clamp to it); the value is element * S.
    A block holding NaN or an infinity is all NaN, with a NaN scale and zero elements.

    Parameters
    ----------
    x : array_like of float, int or Fraction
    fmt : BlockFormat
    rounding : Rounding or str
    draws : sequence or callable, optional
        STOCHASTIC only: the draw of the element at position ``i`` of the blocked layout
        (``x`` with ``axis`` moved last, in C order), ``draws[i]`` or ``draws(i)``.
    random_bits : int, optional
    axis : int, optional

    Returns
    -------
    values : numpy.ndarray
        float64, the shape of ``x``.
    elements : numpy.ndarray
        float64, the element values (before scaling), the shape of ``x``.
    scales : numpy.ndarray
        object (Fractions, NaN floats), shape of ``x`` with the block axis divided by
        ``block``.
    tensor : Fraction or None
        The per-tensor scale of a two-level format.

    Examples
    --------
    >>> from fixedsim.blockformats import MXFP4
    >>> v, e, s, t = block_quantize([[957.0] + [1.0] * 31], MXFP4)
    >>> v[0, :2], e[0, :2], s
    (array([768.,   0.]), array([6., 0.]), array([[Fraction(128, 1)]], dtype=object))
    """
    rounding = Rounding.coerce(rounding, what="rounding")
    arr = np.asarray(x, dtype=object if np.asarray(x).dtype == object else np.float64)
    ax = fmt.axis if axis is None else axis
    moved = np.moveaxis(arr, ax, -1)
    n = moved.shape[-1] if moved.ndim else 1
    if moved.ndim == 0 or n % fmt.block:
        raise ValueError(f"the block length {fmt.block} must divide the axis length {n}")
    shape = moved.shape
    raw = [v.item() if hasattr(v, "item") else v for v in moved.reshape(-1)]
    flat = [_exact(v) for v in raw]
    nb = len(flat) // fmt.block
    tensor = None
    if fmt.tensor_scale is not None:
        finite = [abs(v) for v in flat if isinstance(v, Fraction)]
        tensor = tensor_scale(max(finite, default=Fraction(0)), fmt)
    values = np.empty(len(flat), np.float64)
    elements = np.empty(len(flat), np.float64)
    scales = np.empty(nb, dtype=object)
    for b in range(nb):
        blk = flat[b * fmt.block:(b + 1) * fmt.block]
        special = [v for v in blk if isinstance(v, float)]
        amax = math.nan if special else max(abs(v) for v in blk)
        s = block_scale(amax, fmt, 1 if tensor is None else tensor)
        scales[b] = s
        total = s if tensor is None or isinstance(s, float) else s * tensor
        for j, v in enumerate(blk):
            i = b * fmt.block + j
            if isinstance(s, float):
                values[i], elements[i] = math.nan, 0.0
                continue
            draw = None
            if rounding is Rounding.STOCHASTIC:
                draw = draws(i) if callable(draws) else draws[i]
            e = round_to_format(v / total if v != 0 else raw[i] * 0.0, fmt.element,
                                rounding, Overflow.SATURATE, draw=draw, random_bits=random_bits)
            elements[i] = e
            val = Fraction(e) * total
            values[i] = math.copysign(float(val), e) if val == 0 else float(val)
    out_shape = shape[:-1] + (nb // max(1, int(np.prod(shape[:-1], dtype=np.int64))),)
    return (np.moveaxis(values.reshape(shape), -1, ax),
            np.moveaxis(elements.reshape(shape), -1, ax),
            np.moveaxis(scales.reshape(out_shape), -1, ax), tensor)
