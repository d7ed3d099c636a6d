"""Hypothesis strategies for testing code that rounds to fixedsim formats.

The strategies aim at the places where roundings go wrong: values exactly on the format's grid,
exact ties between neighbours, and the float64 (or float32) values one ulp either side of them,
around zero, the subnormal range, the smallest normal, and the overflow threshold.

Examples
--------
>>> from hypothesis import given
>>> from fixedsim.reference import round_to_format
>>> from fixedsim.testing import boundary_values, float_formats
>>> from fixedsim.formats import FP16
>>> @given(boundary_values(FP16))
... def test_idempotent(x):
...     y = round_to_format(x, FP16)
...     assert round_to_format(y, FP16) == y or y != y
>>> test_idempotent()
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from fractions import Fraction

import numpy as np

try:
    from hypothesis import settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as err:  # pragma: no cover - hypothesis is a test dependency
    raise ImportError(
        "fixedsim.testing needs hypothesis: pip install hypothesis (or fixedsim[test])"
    ) from err

from fixedsim.formats import (
    BF16,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FP64,
    TF32,
    FixedFormat,
    FloatFormat,
)
from fixedsim.reference import neighbours
from fixedsim.rounding import Overflow, Rounding

__all__ = [
    "fixed_formats",
    "float_formats",
    "formats",
    "roundings",
    "overflows",
    "boundary_values",
    "values_near",
    "arrays",
    "block_formats",
    "block_arrays",
    "register_profiles",
]

_FLOAT_PRESETS = (FP64, FP32, TF32, FP16, BF16, FP8_E5M2, FP8_E4M3)


# -- formats and rules ---------------------------------------------------------------------------
@st.composite
def fixed_formats(draw, max_word_length: int = 64, signed: bool | None = None):
    """Fixed-point formats with ``word_length <= max_word_length``.

    ``frac_length`` is usually within a few bits of ``[0, word_length]`` (so values are mostly
    fractions, sometimes integers or coarser), occasionally at the extremes allowed.
    """
    if not 1 <= max_word_length <= 64:
        raise ValueError(f"max_word_length must be in 1..64, got {max_word_length}")
    w = draw(st.integers(1, max_word_length))
    extreme = draw(st.integers(0, 7)) == 0  # now and then, anywhere in the allowed range
    f = draw(st.integers(w - 1023, 1074) if extreme else st.integers(-4, w + 4))
    s = draw(st.booleans()) if signed is None else bool(signed)
    return FixedFormat(w, f, signed=s)


@st.composite
def float_formats(draw, max_exp_bits: int = 8, max_man_bits: int = 23,
                  inf_nan: str | None = None, subnormals: bool | None = None):
    """Float formats within the given field widths; the presets (FP16, BF16, ...) come often.

    ``inf_nan`` ("ieee" or "fn") and ``subnormals`` are drawn unless given.
    """
    if not (2 <= max_exp_bits <= 11 and 1 <= max_man_bits <= 52):
        raise ValueError("max_exp_bits must be in 2..11 and max_man_bits in 1..52")
    if inf_nan == "fn" and max_exp_bits == 2 and max_man_bits == 1:
        raise ValueError("no 'fn' format fits in 2 exponent bits and 1 mantissa bit")
    presets = [p for p in _FLOAT_PRESETS
               if p.exp_bits <= max_exp_bits and p.man_bits <= max_man_bits
               and inf_nan in (None, p.inf_nan)]
    if presets and draw(st.booleans()):
        fmt = draw(st.sampled_from(presets))
        sub = draw(st.sampled_from([True, True, True, False])) if subnormals is None \
            else subnormals
        return dataclasses.replace(fmt, subnormals=bool(sub))
    kinds = ["ieee", "fn"] if max_exp_bits > 2 or max_man_bits > 1 else ["ieee"]
    kind = draw(st.sampled_from(kinds)) if inf_nan is None else inf_nan
    # an 11-bit "fn" exponent puts max beyond float64 (FloatFormat.max overflows): left out
    top_e = min(max_exp_bits, 10) if kind == "fn" else max_exp_bits
    e = draw(st.integers(3 if kind == "fn" and max_man_bits == 1 else 2, top_e))
    m = draw(st.integers(2 if kind == "fn" and e == 2 else 1, max_man_bits))  # no E2M1 "fn"
    sub = draw(st.booleans()) if subnormals is None else subnormals
    return FloatFormat(e, m, subnormals=bool(sub), inf_nan=kind)


def formats():
    """Any format: fixed point (up to 64 bits) or float (up to 8 exponent, 23 mantissa bits)."""
    return st.one_of(fixed_formats(), float_formats())


def roundings(include_stochastic: bool = True):
    """Rounding modes (all seven, or the six deterministic ones)."""
    modes = [r for r in Rounding if include_stochastic or r != Rounding.STOCHASTIC]
    return st.sampled_from(modes)


def overflows(fmt):
    """The overflow rules valid for ``fmt``: fixed SATURATE/WRAP, "ieee" SATURATE/INFINITY,
    "fn" SATURATE."""
    if isinstance(fmt, FixedFormat):
        return st.sampled_from([Overflow.SATURATE, Overflow.WRAP])
    if fmt.has_inf:
        return st.sampled_from([Overflow.SATURATE, Overflow.INFINITY])
    return st.just(Overflow.SATURATE)


# -- values --------------------------------------------------------------------------------------
def _bracket(t: Fraction, dtype) -> tuple:
    """The floats ``a <= t <= b`` of ``dtype`` next to ``t`` (``a == b`` when t is exact)."""
    typ = np.dtype(dtype).type
    inf = typ(np.inf)
    try:
        approx = float(t)
    except OverflowError:
        approx = math.inf if t > 0 else -math.inf
    with np.errstate(over="ignore"):  # nextafter(max, inf) is inf: wanted, not an error
        a = typ(approx)
        while float(a) > t:
            a = np.nextafter(a, -inf)
        while float(np.nextafter(a, inf)) <= t:
            a = np.nextafter(a, inf)
        return (a, a) if float(a) == t else (a, np.nextafter(a, inf))


# Strategies are built once and reused (cached per format): building hypothesis strategies
# inside every draw cost more than drawing from them.
@functools.cache
def _significands(lo: int, hi: int):
    """Integers in ``[lo, hi]``, often at or next to either end."""
    edge = [lo, lo + 1, hi - 1, hi]
    return st.one_of(st.sampled_from([k for k in edge if lo <= k <= hi]), st.integers(lo, hi))


@functools.cache
def _exponents(fmt):
    """Exponents of :func:`_grid_point`: near a range edge, or anywhere from below the
    smallest to beyond the largest."""
    low_e = fmt.emin - (0 if fmt.subnormals else fmt.man_bits + 2)
    return st.one_of(st.sampled_from([low_e, fmt.emin - 1, fmt.emin, fmt.emax, fmt.emax + 1]),
                     st.integers(low_e, fmt.emax + 2))


@functools.cache
@st.composite
def _grid_point(draw, fmt) -> Fraction:
    """A nonnegative point of the unbounded grid of ``fmt``, near a range edge or anywhere."""
    if isinstance(fmt, FixedFormat):
        q = Fraction(2) ** -fmt.frac_length
        top = 2 ** (fmt.word_length - fmt.signed)
        return draw(_significands(0, top + 2)) * q
    m = fmt.man_bits
    e = draw(_exponents(fmt))
    if e < fmt.emin and fmt.subnormals:  # the subnormal range, one quantum throughout
        return draw(_significands(0, 2**m - 1)) * Fraction(2) ** (fmt.emin - m)
    return draw(_significands(2**m, 2 ** (m + 1) - 1)) * Fraction(2) ** (e - m)


_KINDS = st.sampled_from(["grid", "grid", "midpoint", "midpoint", "edge", "special"])
_PICK4 = st.integers(0, 3)


@functools.cache
def _specials(allow_nan: bool, allow_infinity: bool):
    """Signed zeros, and infinities and NaN where allowed."""
    specials = [0.0, -0.0]
    specials += [math.inf, -math.inf] if allow_infinity else []
    specials += [math.nan] if allow_nan else []
    return st.sampled_from(specials)


@functools.cache
def _edges(fmt):
    return st.sampled_from(_special_targets(fmt))


def _special_targets(fmt) -> list[Fraction]:
    """Exact values at the edges of the range of ``fmt`` (nonnegative)."""
    if isinstance(fmt, FixedFormat):
        q = Fraction(2) ** -fmt.frac_length
        mx = fmt.max_code * q
        return [Fraction(0), q / 2, q, mx, mx + q / 2, mx + q, 2 * mx + 2 * q]
    sub = Fraction(fmt.min_subnormal)
    mx = Fraction(fmt.max)
    half_top = Fraction(2) ** (fmt.emax - fmt.man_bits - 1)  # half ulp of the top binade
    return [Fraction(0), sub / 2, sub, sub + sub / 2, Fraction(fmt.min_normal),
            Fraction(fmt.min_normal) - sub / 2, mx, mx + half_top, mx + 2 * half_top, 4 * mx]


@st.composite
def boundary_values(draw, fmt, allow_nan: bool | None = None, allow_infinity: bool | None = None,
                    dtype=np.float64):
    """Floats at and next to the rounding boundaries of ``fmt``, as Python floats.

    A target is drawn exactly (a point of the grid, the midpoint between two neighbours, or a
    range edge: zero, smallest subnormal and half of it, smallest normal, ``max``, the overflow
    threshold ``max + half ulp``, beyond ``max``) and given a random sign; the result is the
    target itself when ``dtype`` holds it exactly, else a ``dtype`` value next to it, or such a
    value nudged by one ulp of ``dtype`` up or down. Signed zeros, infinities and NaN are mixed in.

    Parameters
    ----------
    fmt : FixedFormat or FloatFormat
    allow_nan, allow_infinity : bool, optional
        Default: True for float formats (NaN: those that have a NaN), False for fixed point.
    dtype : np.float64 or np.float32
        Every value returned is exactly a value of this dtype.
    """
    is_float = isinstance(fmt, FloatFormat)
    allow_nan = is_float and fmt.has_nan if allow_nan is None else allow_nan
    allow_infinity = is_float if allow_infinity is None else allow_infinity
    kind = draw(_KINDS)
    if kind == "special":
        return draw(_specials(bool(allow_nan), bool(allow_infinity)))
    if kind == "edge":
        target = draw(_edges(fmt))
    else:
        target = draw(_grid_point(fmt))
        if kind == "midpoint":
            # the neighbours of a point just above the target: the target and the next point
            lo, hi = neighbours(target + Fraction(1, 2**2300), fmt)
            target = (lo + hi) / 2
    if draw(st.booleans()):
        target = -target
    a, b = _bracket(target, dtype)
    typ = np.dtype(dtype).type
    inf = typ(np.inf)
    with np.errstate(over="ignore"):
        nudged = [np.nextafter(a, -inf), np.nextafter(b, inf)]
    x = float([a, b, *nudged][draw(_PICK4)])
    if math.isinf(x) and not allow_infinity:
        x = math.copysign(float(np.finfo(dtype).max), x)
    return x


def values_near(fmt, allow_nan: bool | None = None, allow_infinity: bool | None = None):
    """Boundary values (:func:`boundary_values`) mixed with plain floats in the range of fmt."""
    is_float = isinstance(fmt, FloatFormat)
    allow_nan = is_float and fmt.has_nan if allow_nan is None else allow_nan
    allow_infinity = is_float if allow_infinity is None else allow_infinity
    big = float(np.finfo(np.float64).max)
    bound = min(2 * max(abs(fmt.max), abs(fmt.min), fmt.smallest), big)
    tiny = min(64 * fmt.smallest, big)
    return st.one_of(
        boundary_values(fmt, allow_nan=allow_nan, allow_infinity=allow_infinity),
        st.floats(-bound, bound, width=64),
        st.floats(-tiny, tiny, width=64),
    )


def arrays(fmt, shape=None, dtype=np.float64, elements=None):
    """NumPy arrays of ``dtype`` (float64 or float32) filled with boundary values of ``fmt``.

    Parameters
    ----------
    fmt : FixedFormat or FloatFormat
    shape : int, tuple or strategy, optional
        Default: 1 to 3 dimensions of at most 8.
    dtype : np.float64 or np.float32
    elements : strategy, optional
        Default ``boundary_values(fmt, dtype=dtype)``; must produce values exact in ``dtype``.
    """
    if np.dtype(dtype) not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise ValueError(f"dtype must be float64 or float32, got {np.dtype(dtype)}")
    if shape is None:
        shape = hnp.array_shapes(min_dims=1, max_dims=3, max_side=8)
    if elements is None:
        elements = boundary_values(fmt, dtype=dtype)
    return hnp.arrays(dtype, shape, elements=elements)


# -- block formats -------------------------------------------------------------------------------
@st.composite
def block_formats(draw, blocks=(1, 2, 4, 8)):
    """Block formats (:class:`~fixedsim.BlockFormat`): an OCP element (E4M3, E5M2, E2M3, E3M2,
    E2M1), MXINT8's ``Q<8,6>`` or FP16, a block length from ``blocks``, and either a
    power-of-two rule with an E8M0 scale or the "nearest" rule with an E4M3 scale (an FP32
    tensor scale or none)."""
    from fixedsim.blockformats import POW2_RULES, BlockFormat
    from fixedsim.formats import E8M0, FP4_E2M1, FP6_E2M3, FP6_E3M2

    el = draw(st.sampled_from([FP8_E4M3, FP8_E5M2, FP6_E2M3, FP6_E3M2, FP4_E2M1,
                               FixedFormat(8, 6), FP16]))
    block = draw(st.sampled_from(list(blocks)))
    if isinstance(el, FloatFormat) and draw(st.booleans()):
        return BlockFormat(el, block=block, scale=FP8_E4M3, scale_rule="nearest",
                           tensor_scale=draw(st.sampled_from([None, FP32])))
    return BlockFormat(el, block=block, scale=E8M0, scale_rule=draw(st.sampled_from(POW2_RULES)))


@st.composite
def block_arrays(draw, fmt, nblocks: int = 3, dtype=np.float64, specials: bool = True):
    """1-d arrays of ``nblocks`` blocks of ``fmt``, each around its own top exponent: the block
    maximum at a power of two or one or two ulps (of ``dtype``) from it, values on a 1/128 grid
    below it (ties of the narrow elements), signed zeros, and, with ``specials``, NaN and
    infinities. The top exponents keep the scale within E8M0's range (and within E4M3's for
    the "nearest" rule without a tensor scale)."""
    lo, hi = (-150, 125) if dtype == np.float64 else (-126, 125)
    if fmt.scale_rule == "nearest" and fmt.tensor_scale is None:  # no scale overflow
        hi = math.floor(math.log2(fmt.scale.max * fmt.element.max)) - 1
    out = []
    for _ in range(nblocks):
        top = draw(st.integers(lo, hi))
        for j in range(fmt.block):
            kind = draw(st.integers(0, 12))
            if kind == 0:
                v = draw(st.sampled_from([0.0, -0.0]))
            elif kind == 1 and specials:
                v = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0]))
            elif kind == 2 or j == 0:  # the block maximum at a power of two, or next to it
                v = math.ldexp(1.0, top)
            else:
                v = math.ldexp(1.0 + draw(st.integers(0, 127)) / 128,
                               top - draw(st.integers(0, 12)))
            v = dtype(v if draw(st.booleans()) else -v)
            for _ in range(draw(st.integers(0, 2)) if np.isfinite(v) else 0):
                v = np.nextafter(v, dtype(draw(st.sampled_from([-np.inf, np.inf]))))
            out.append(v)
    return np.array(out, dtype)


# -- profiles ------------------------------------------------------------------------------------
def register_profiles() -> str:
    """Register the hypothesis profiles "dev", "ci" and "thorough" and load one.

    The profile loaded is named by the environment variable ``FIXEDSIM_HYPOTHESIS_PROFILE``
    (default "dev"); its name is returned.
    """
    settings.register_profile("dev", max_examples=100, deadline=None)
    settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None,
                              print_blob=True)
    settings.register_profile("thorough", max_examples=2000, deadline=None)
    name = os.environ.get("FIXEDSIM_HYPOTHESIS_PROFILE", "dev")
    settings.load_profile(name)
    return name
