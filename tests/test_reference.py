"""Tests of the exact oracle fixedsim.reference.

The oracle is checked against independent implementations (NumPy's float16 cast, ml_dtypes'
bfloat16 and FP8 casts) exhaustively, against hand-worked examples, and by properties.

ml_dtypes converts float64 to bfloat16 / FP8 through float32 (a double rounding: 1 + 2**-8 +
2**-52 becomes bfloat16 1.0, not 1.0078125), so those formats are compared on float32 inputs, the
midpoints nudged by one float32 ulp. NumPy rounds float64 to float16 directly, so FP16 is compared
on float64 inputs nudged by one float64 ulp.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fixedsim.formats import (
    BF16,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FixedFormat,
    FloatFormat,
)
from fixedsim.reference import decode, encode, neighbours, quantize, round_to_format, values
from fixedsim.rounding import Overflow, Rounding
from fixedsim.testing import (
    arrays,
    boundary_values,
    fixed_formats,
    float_formats,
    formats,
    overflows,
    roundings,
    values_near,
)

R = Rounding
DETERMINISTIC = [r for r in Rounding if r != R.STOCHASTIC]
ML_DTYPES = {BF16: ml_dtypes.bfloat16, FP8_E5M2: ml_dtypes.float8_e5m2,
             FP8_E4M3: ml_dtypes.float8_e4m3fn, FP16: np.float16}
CODE_DTYPE = {8: np.uint8, 16: np.uint16}


def _is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _probe_inputs(fmt, dtype) -> np.ndarray:
    """Every value of fmt (all codes), every midpoint between neighbouring finite values and the
    overflow thresholds, each also nudged one ulp of ``dtype`` either way, as ``dtype``."""
    codes = [decode(c, fmt) for c in range(2**fmt.width)]
    finite = values(fmt)
    half_top = Fraction(2) ** (fmt.emax - fmt.man_bits - 1)
    mids = [(Fraction(a) + Fraction(b)) / 2 for a, b in zip(finite, finite[1:], strict=False)]
    mids += [Fraction(fmt.max) + half_top, -Fraction(fmt.max) - half_top]
    typ = np.dtype(dtype).type
    mids_arr = np.array([float(q) for q in mids], dtype=dtype)
    exact = [Fraction(float(a)) == q for a, q in zip(mids_arr, mids, strict=True)]
    assert all(exact), "midpoints not exact in dtype"
    inf = typ(np.inf)
    extra = np.array([1e30, -1e30, 1e-30, -1e-30, 0.0, -0.0], dtype=dtype)
    return np.concatenate([np.array(codes, dtype=dtype), mids_arr, np.nextafter(mids_arr, inf),
                           np.nextafter(mids_arr, -inf), extra])


def _compare_with_cast(fmt, dtype):
    x = _probe_inputs(fmt, dtype)
    code_dt = CODE_DTYPE[fmt.width]
    with np.errstate(over="ignore", invalid="ignore"):
        theirs = x.astype(ML_DTYPES[fmt])
    their_codes = theirs.view(code_dt)
    their_nan = np.isnan(theirs.astype(np.float64))
    checked = 0
    for xi, code, tnan in zip(x.tolist(), their_codes.tolist(), their_nan.tolist(),
                                   strict=True):
        ours, fl = round_to_format(xi, fmt, flags=True)
        if fmt == FP8_E4M3 and tnan and not math.isnan(xi):
            # ml_dtypes gives NaN on overflow; our default is SATURATE
            assert ours == math.copysign(448.0, xi) and fl["overflow"], xi
            continue
        if fmt == FP8_E4M3 and not math.isnan(xi):
            assert not fl["overflow"], xi
        if tnan:
            assert _is_nan(ours), xi
        else:
            assert encode(ours, fmt) == code, (xi, ours, decode(code, fmt))
        checked += 1
    assert checked > 2**fmt.width


def test_fp16_exhaustive_against_numpy():
    _compare_with_cast(FP16, np.float64)


@pytest.mark.parametrize("fmt", [BF16, FP8_E5M2, FP8_E4M3], ids=str)
def test_exhaustive_against_ml_dtypes(fmt):
    _compare_with_cast(fmt, np.float32)


def test_fp16_float32_inputs_against_numpy():
    x = _probe_inputs(FP8_E5M2, np.float32)  # E5M2 values are FP16 values: probe FP16 ties
    with np.errstate(over="ignore"):
        codes = x.astype(np.float16).view(np.uint16).tolist()
    assert all(encode(round_to_format(float(v), FP16), FP16) == c
               for v, c in zip(x, codes, strict=True) if not math.isnan(v))


def test_ml_dtypes_float64_casts():
    """Why BF16 and FP8 are compared on float32 inputs: ml_dtypes before 0.7 rounded float64
    to bfloat16 twice (through float32: 1 + 2**-8 + 2**-52 became the tie 1 + 2**-8, then 1);
    0.7 rounds once, as fixedsim does."""
    x = 1 + 2**-8 + 2**-52
    assert round_to_format(x, BF16) == 1.0078125
    version = tuple(int(p) for p in ml_dtypes.__version__.split(".")[:2])
    want = 1.0 if version < (0, 7) else 1.0078125
    assert float(np.array([x]).astype(ml_dtypes.bfloat16)[0]) == want


# -- encode / decode -----------------------------------------------------------------------------
EIGHT_BIT = [FloatFormat(e, 7 - e, inf_nan=k, subnormals=s)
             for e in range(2, 7) for k in ("ieee", "fn") for s in (True, False)]
EIGHT_BIT += [FixedFormat(8, f, signed=s) for f in (-3, 0, 4, 8, 11) for s in (True, False)]


@pytest.mark.parametrize("fmt", EIGHT_BIT + [FP16, BF16], ids=str)
def test_encode_decode_round_trip(fmt):
    nan_codes = 0
    for code in range(2**fmt.width):
        v = decode(code, fmt)
        if _is_nan(v):
            nan_codes += 1
            assert _is_nan(decode(encode(v, fmt), fmt))
            assert (encode(v, fmt) >> (fmt.width - 1)) == (code >> (fmt.width - 1))  # sign kept
        else:
            assert encode(v, fmt) == code, (code, v)
            if isinstance(fmt, FixedFormat) or fmt.subnormals or v == 0 or abs(v) >= \
                    fmt.min_normal:
                assert round_to_format(v, fmt) == v  # (a ftz format flushes subnormal codes)
    if isinstance(fmt, FloatFormat):
        assert nan_codes == (2 * (2**fmt.man_bits - 1) if fmt.has_inf else 2)


@pytest.mark.parametrize("fmt", list(ML_DTYPES), ids=str)
def test_decode_matches_numpy_and_ml_dtypes(fmt):
    codes = np.arange(2**fmt.width, dtype=CODE_DTYPE[fmt.width])
    with np.errstate(invalid="ignore"):
        theirs = codes.view(ML_DTYPES[fmt]).astype(np.float64)
    for code, t in zip(codes.tolist(), theirs.tolist(), strict=True):
        ours = decode(code, fmt)
        if math.isnan(t):
            assert _is_nan(ours)
        else:
            assert ours == t and math.copysign(1, ours) == math.copysign(1, t)


def test_canonical_nan_codes():
    assert encode(math.nan, FP16) == 0x7E00
    assert encode(-math.nan, FP16) == 0xFE00
    assert encode(math.nan, FP8_E4M3) == 0x7F
    assert encode(math.inf, FP16) == 0x7C00 and encode(-math.inf, FP8_E5M2) == 0xFC
    assert decode(0x7C01, FP16) != decode(0x7C01, FP16)  # NaN
    assert decode(0x78, FP8_E4M3) == 256.0  # all-ones exponent, normal in "fn"


def test_ftz_formats_decode_subnormal_codes():
    ftz = FloatFormat(5, 10, subnormals=False)
    assert decode(1, ftz) == 2.0**-24 and encode(2.0**-24, ftz) == 1
    assert 2.0**-24 not in values(ftz) and 2.0**-14 in values(ftz)


def test_values():
    assert values(FixedFormat(3, 1, signed=False)) == [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]
    fp16 = values(FP16)
    assert len(fp16) == 2 * (31 * 1024 - 1) + 1 and fp16 == sorted(fp16)
    assert fp16[0] == -65504.0 and fp16[-1] == 65504.0 and fp16.count(0.0) == 1
    assert len(values(FP8_E4M3)) == 253  # 256 codes, -0 and two NaNs left out
    with pytest.raises(ValueError, match="at most 16 bits"):
        values(FixedFormat(17, 0))


# -- fixed point, by hand ------------------------------------------------------------------------
Q82 = FixedFormat(8, 2)


@pytest.mark.parametrize(("x", "mode", "expected"), [
    (0.375, R.NEAREST_EVEN, 0.5), (0.625, R.NEAREST_EVEN, 0.5), (-0.375, R.NEAREST_EVEN, -0.5),
    (-0.625, R.NEAREST_EVEN, -0.5), (0.3, R.NEAREST_EVEN, 0.25), (0.4, R.NEAREST_EVEN, 0.5),
    (0.375, R.NEAREST_AWAY, 0.5), (0.625, R.NEAREST_AWAY, 0.75), (-0.625, R.NEAREST_AWAY, -0.75),
    (0.3, R.NEAREST_AWAY, 0.25),
    (0.375, R.TOWARD_ZERO, 0.25), (-0.375, R.TOWARD_ZERO, -0.25),
    (0.375, R.DOWN, 0.25), (-0.375, R.DOWN, -0.5), (-0.3, R.DOWN, -0.5),
    (0.375, R.UP, 0.5), (-0.375, R.UP, -0.25), (0.26, R.UP, 0.5),
    (0.375, R.ODD, 0.25), (0.4, R.ODD, 0.25), (0.625, R.ODD, 0.75), (-0.375, R.ODD, -0.25),
    (0.5, R.ODD, 0.5), (0.5, R.UP, 0.5), (-1.75, R.DOWN, -1.75),
])
def test_fixed_rounding_by_hand(x, mode, expected):
    assert round_to_format(x, Q82, mode) == expected
    assert round_to_format(x, Q82, mode.name.lower()) == expected


@pytest.mark.parametrize(("x", "fmt", "overflow", "expected"), [
    (130, FixedFormat(8, 0), "saturate", 127), (130, FixedFormat(8, 0), "wrap", -126),
    (-129, FixedFormat(8, 0), "saturate", -128), (-129, FixedFormat(8, 0), "wrap", 127),
    (127.5, FixedFormat(8, 0), "saturate", 127), (127.5, FixedFormat(8, 0), "wrap", -128),
    (256, FixedFormat(8, 0, signed=False), "saturate", 255),
    (256, FixedFormat(8, 0, signed=False), "wrap", 0),
    (-1, FixedFormat(8, 0, signed=False), "saturate", 0),
    (-1, FixedFormat(8, 0, signed=False), "wrap", 255),
    (32.0, Q82, "saturate", 31.75), (32.0, Q82, "wrap", -32.0),
    (10, FixedFormat(8, -2), "saturate", 8), (math.inf, Q82, "saturate", 31.75),
    (-math.inf, Q82, "saturate", -32.0), (-math.inf, FixedFormat(4, 0, False), "saturate", 0),
])
def test_fixed_range(x, fmt, overflow, expected):
    assert round_to_format(x, fmt, overflow=overflow) == expected


def test_fixed_results_and_types():
    q64 = FixedFormat(64, 0)
    top = round_to_format(2**63, q64)
    assert top == 2**63 - 1 and isinstance(top, Fraction)
    assert isinstance(round_to_format(-(2**63), q64), float)
    assert round_to_format(Fraction(2**62 + 1), q64) == 2**62 + 1  # beyond float64, kept exact
    assert math.copysign(1, round_to_format(-0.0, Q82)) == 1  # no negative zero in fixed point
    assert math.copysign(1, round_to_format(-0.1, Q82)) == 1
    v, f = round_to_format(130, FixedFormat(8, 0), flags=True)
    assert v == 127 and f["overflow"] and f["inexact"] and not f["rounded_up"]
    v, f = round_to_format(0.1, Q82, flags=True)
    assert v == 0 and f["underflow"] and f["inexact"] and not f["subnormal"]
    assert round_to_format(Fraction(1, 3), FixedFormat(8, 7, signed=False)) == 43 / 128


# -- floats, by hand -----------------------------------------------------------------------------
@pytest.mark.parametrize(("x", "mode", "overflow", "expected"), [
    (65520.0, R.NEAREST_EVEN, None, math.inf), (65519.0, R.NEAREST_EVEN, None, 65504.0),
    (65520.0, R.NEAREST_AWAY, None, math.inf), (-65520.0, R.NEAREST_EVEN, None, -math.inf),
    (65520.0, R.NEAREST_EVEN, "saturate", 65504.0),
    (1e6, R.TOWARD_ZERO, None, 65504.0), (-1e6, R.TOWARD_ZERO, None, -65504.0),
    (1e6, R.ODD, None, 65504.0), (-1e6, R.ODD, None, -65504.0),
    (-1e6, R.UP, None, -65504.0), (1e6, R.UP, None, math.inf),
    (-1e6, R.DOWN, None, -math.inf), (1e6, R.DOWN, None, 65504.0),
    (1e6, R.UP, "saturate", 65504.0), (-1e6, R.DOWN, "saturate", -65504.0),
    (65504.5, R.UP, None, math.inf), (65504.5, R.NEAREST_EVEN, None, 65504.0),
    (math.inf, R.NEAREST_EVEN, None, math.inf), (-math.inf, R.TOWARD_ZERO, None, -math.inf),
    (math.inf, R.NEAREST_EVEN, "saturate", 65504.0), (1 + 2**-11, R.NEAREST_EVEN, None, 1.0),
    (1 + 3 * 2**-11, R.NEAREST_EVEN, None, 1 + 2**-9), (1 + 2**-11, R.ODD, None, 1 + 2**-10),
    (1 + 2**-11, R.NEAREST_AWAY, None, 1 + 2**-10), (-(1 + 2**-11), R.UP, None, -1.0),
    (2 - 2**-12, R.NEAREST_EVEN, None, 2.0), (2 - 2**-12, R.ODD, None, 2 - 2**-10),
])
def test_fp16_by_hand(x, mode, overflow, expected):
    assert round_to_format(x, FP16, mode, overflow) == expected


@pytest.mark.parametrize(("x", "mode", "expected", "over"), [
    (448.0, R.NEAREST_EVEN, 448.0, False), (449.0, R.NEAREST_EVEN, 448.0, False),
    (464.0, R.NEAREST_EVEN, 448.0, False), (464.0, R.NEAREST_AWAY, 448.0, True),
    (465.0, R.NEAREST_EVEN, 448.0, True), (449.0, R.UP, 448.0, True),
    (-449.0, R.DOWN, -448.0, True), (-449.0, R.UP, -448.0, False),
    (math.inf, R.NEAREST_EVEN, 448.0, True), (-math.inf, R.UP, -448.0, True),
])
def test_e4m3_saturates(x, mode, expected, over):
    v, f = round_to_format(x, FP8_E4M3, mode, flags=True)
    assert v == expected and f["overflow"] == over


def test_ftz_flush_after_rounding():
    ftz = FloatFormat(5, 10, subnormals=False)
    tiny = 2.0**-14  # smallest normal
    q = 2.0**-25  # quantum just below it, on the unbounded grid
    assert round_to_format(tiny - q / 2, ftz) == tiny  # tie, rounds up to min normal: stays
    v, f = round_to_format(tiny - q / 2, ftz, flags=True)
    assert not f["underflow"] and not f["subnormal"] and f["inexact"]
    v, f = round_to_format(tiny - 0.75 * q, ftz, flags=True)
    assert v == 0 and f["underflow"]
    assert round_to_format(tiny - q / 2, ftz, "toward_zero") == 0
    assert round_to_format(2.0**-15, ftz, "up") == 0  # exact on the grid, still flushed
    assert round_to_format(-(2.0**-15), ftz) == 0 and math.copysign(1, round_to_format(
        -(2.0**-15), ftz)) == -1
    assert round_to_format(2.0**-15, FP16) == 2.0**-15  # kept with subnormals


def test_signed_zeros_and_nan():
    def sign(v):
        return math.copysign(1, v)

    assert sign(round_to_format(-0.0, FP16)) == -1
    assert sign(round_to_format(0.0, FP16)) == 1 and sign(round_to_format(0, FP16)) == 1
    assert sign(round_to_format(-1e-30, FP16)) == -1
    assert sign(round_to_format(1e-30, FP16, "down")) == 1
    assert round_to_format(-1e-30, FP16, "down") == -(2.0**-24)
    v, f = round_to_format(-math.nan, BF16, flags=True)
    assert math.isnan(v) and sign(v) == -1 and f["nan"] and not any(
        f[k] for k in ("inexact", "rounded_up", "overflow", "underflow", "subnormal"))
    assert sign(round_to_format(math.nan, FP8_E4M3)) == 1


def test_subnormal_flags():
    v, f = round_to_format(3e-8, FP16, flags=True)
    assert v == 2.0**-24 and f["subnormal"] and f["inexact"] and f["rounded_up"]
    v, f = round_to_format(2.0**-14, FP16, flags=True)
    assert not f["subnormal"] and not f["inexact"]
    v, f = round_to_format(2.0**-26, FP16, flags=True)  # below half the smallest subnormal
    assert v == 0 and f["underflow"] and not f["subnormal"]
    v, f = round_to_format(-65520.0, FP16, flags=True)
    assert v == -math.inf and f["overflow"] and not f["rounded_up"] and f["inexact"]
    v, f = round_to_format(math.inf, FP16, flags=True)
    assert v == math.inf and not any(f.values())


# -- stochastic rounding -------------------------------------------------------------------------
def test_stochastic_draws():
    sr = R.STOCHASTIC
    assert round_to_format(0.3, Q82, sr, draw=0) == 0.5  # draw 0 rounds up when frac > 0
    assert round_to_format(0.3, Q82, sr, draw=2**64 - 1) == 0.25
    assert round_to_format(0.25, Q82, sr, draw=0) == 0.25  # exact: unaffected
    for d in (0, 1):  # frac 0.2 < 1/2 with one random bit: never up
        assert round_to_format(0.3, Q82, sr, draw=d, random_bits=1) == 0.25
    for d in (0, 1):
        assert round_to_format(0.5 + 0.2, Q82, sr, draw=d, random_bits=1) == (0.75 if d == 0
                                                                             else 0.5)
    assert round_to_format(-0.3, Q82, sr, draw=0) == -0.25  # hi is toward +inf
    assert round_to_format(65505.0, FP16, sr, draw=0) == math.inf
    assert round_to_format(65505.0, FP16, sr, draw=2**64 - 1) == 65504.0
    assert round_to_format(65505.0, FP16, sr, "saturate", draw=0) == 65504.0


@given(st.fractions(-32, Fraction(127, 4)), st.integers(1, 8))
def test_stochastic_counts(x, bits):
    lo, hi = neighbours(x, Q82)
    ups = sum(round_to_format(x, Q82, "stochastic", draw=d, random_bits=bits) == hi != lo
              for d in range(2**bits))
    expected = 0 if lo == hi else math.floor((x - lo) / (hi - lo) * 2**bits)
    assert ups == expected


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "match"), [
    (lambda: round_to_format(math.nan, Q82), "NaN"),
    (lambda: round_to_format(math.inf, Q82, overflow="wrap"), "WRAP an infinity"),
    (lambda: round_to_format(1.0, FP16, overflow="wrap"), "WRAP is for fixed-point"),
    (lambda: round_to_format(1.0, Q82, overflow="infinity"), "INFINITY needs"),
    (lambda: round_to_format(1.0, FP8_E4M3, overflow=Overflow.INFINITY), "INFINITY needs"),
    (lambda: round_to_format(1.0, FP16, random_bits=8), "random_bits is only"),
    (lambda: round_to_format(1.0, FP16, "stochastic", draw=0, random_bits=0), "1..64"),
    (lambda: round_to_format(1.0, FP16, "stochastic", draw=0, random_bits=65), "1..64"),
    (lambda: round_to_format(1.0, FP16, "stochastic"), "needs a draw"),
    (lambda: round_to_format(1.0, FP16, "stochastic", draw=2, random_bits=1), "draw must be"),
    (lambda: round_to_format(1.0, FP16, "stochastic", draw=-1), "draw must be"),
    (lambda: round_to_format(1.0, FP16, "sideways"), "unknown rounding"),
    (lambda: encode(1.1, FP16), "not exactly representable"),
    (lambda: encode(480.0, FP8_E4M3), "not exactly representable"),
    (lambda: encode(65536.0, FP16), "not exactly representable"),
    (lambda: encode(math.inf, FP8_E4M3), "no infinities"),
    (lambda: encode(0.1, Q82), "not exactly representable"),
    (lambda: encode(32.0, Q82), "not exactly representable"),
    (lambda: encode(math.nan, Q82), "not a value"),
    (lambda: decode(256, FP8_E5M2), "code must be"),
    (lambda: decode(-1, Q82), "code must be"),
    (lambda: neighbours(math.inf, FP16), "finite"),
])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_type_errors():
    with pytest.raises(TypeError):
        round_to_format("1.0", FP16)
    with pytest.raises(TypeError):
        round_to_format(1.0, "FP16")


# -- quantize ------------------------------------------------------------------------------------
def test_quantize():
    out = quantize([[0.375, -0.375], [1e6, -0.0]], FP8_E5M2, "down")
    assert out.dtype == np.float64 and out.shape == (2, 2)
    assert out.tolist() == [[0.375, -0.375], [57344.0, -0.0]]
    assert math.copysign(1, out[1, 1]) == -1
    out = quantize([0.3, 0.3, 0.3], Q82, "stochastic", draws=[0, 2**63, 2**64 - 1])
    assert out.tolist() == [0.5, 0.25, 0.25]
    wide = quantize(np.array([2.0**70, 1.0]), FixedFormat(64, 0))
    assert wide.dtype == object and wide[0] == 2**63 - 1
    assert quantize(np.float32(0.1), FP16).shape == ()
    assert quantize(np.arange(4, dtype=np.int64), Q82).tolist() == [0, 1, 2, 3]


# -- properties ----------------------------------------------------------------------------------
@st.composite
def _cases(draw, deterministic=False):
    fmt = draw(st.one_of(formats(), float_formats(max_exp_bits=11, max_man_bits=52)))
    x = draw(values_near(fmt))
    mode = draw(st.sampled_from(DETERMINISTIC) if deterministic else roundings())
    bits = draw(st.integers(1, 64))
    d = draw(st.integers(0, 2**bits - 1))
    kw = {"draw": d, "random_bits": bits} if mode == R.STOCHASTIC else {}
    return fmt, x, mode, draw(overflows(fmt)), kw


@given(_cases())
def test_result_is_a_neighbour_or_the_range_rule(case):
    fmt, x, mode, overflow, kw = case
    assume(math.isfinite(x))
    v, f = round_to_format(x, fmt, mode, overflow, flags=True, **kw)
    lo, hi = neighbours(x, fmt)
    assert isinstance(v, float) or Fraction(float(v)) != v
    if f["overflow"]:
        assert lo < fmt.min or hi > fmt.max  # fmt.max of a wide fixed format is rounded down
        if overflow == Overflow.SATURATE and isinstance(fmt, FixedFormat):
            assert v * 2**fmt.frac_length in (fmt.min_code, fmt.max_code)
        elif overflow == Overflow.SATURATE:
            assert abs(v) == fmt.max
        elif overflow == Overflow.INFINITY:
            assert abs(v) in (fmt.max, math.inf)
        return
    assert fmt.min <= v <= fmt.max or isinstance(v, Fraction)
    if isinstance(fmt, FloatFormat) and not fmt.subnormals and v == 0 and x != 0:
        assert min(abs(lo), abs(hi)) < Fraction(fmt.min_normal)  # flushed
        return
    assert v in (lo, hi)
    assert f["inexact"] == (lo != hi) and f["rounded_up"] == (v > x)
    if mode == R.NEAREST_EVEN:
        assert abs(v - Fraction(x)) <= (hi - lo) / 2


@given(_cases(deterministic=True), st.data())
def test_monotonic(case, data):
    fmt, x, mode, overflow, _ = case
    assume(overflow != Overflow.WRAP and not math.isnan(x))
    y = data.draw(values_near(fmt).filter(lambda y: not math.isnan(y)))
    x, y = min(x, y), max(x, y)
    assert round_to_format(x, fmt, mode, overflow) <= round_to_format(y, fmt, mode, overflow)


@given(_cases())
def test_idempotent(case):
    fmt, x, mode, overflow, kw = case
    assume(not (math.isnan(x) and isinstance(fmt, FixedFormat)))
    assume(not (math.isinf(x) and overflow == Overflow.WRAP))
    v = round_to_format(x, fmt, "nearest_even", overflow if overflow != Overflow.WRAP else None)
    w, f = round_to_format(v, fmt, mode, overflow, flags=True, **kw)
    assert (w == v and math.copysign(1, w) == math.copysign(1, v)) or (_is_nan(v) and _is_nan(w))
    assert not f["inexact"] and not f["overflow"] and not f["underflow"]


@given(float_formats(max_exp_bits=4, max_man_bits=4), st.data())
def test_neighbours_against_value_list(fmt, data):
    """The grid against a plain search of values() inside the range (independent of neighbours)."""
    vs = values(fmt)
    x = data.draw(st.fractions(Fraction(fmt.min), Fraction(fmt.max)))
    lo, hi = neighbours(x, fmt)
    below, above = vs[bisect_right(vs, x) - 1], vs[bisect_left(vs, x)]
    if fmt.subnormals or abs(x) >= fmt.min_normal:
        assert (lo, hi) == (below, above)
    for mode in DETERMINISTIC:
        v = round_to_format(x, fmt, mode)
        assert v in vs


@given(fixed_formats(max_word_length=12), st.data())
def test_fixed_against_value_list(fmt, data):
    vs = values(fmt)
    x = data.draw(st.fractions(Fraction(fmt.min), Fraction(fmt.max)))
    below, above = vs[bisect_right(vs, x) - 1], vs[bisect_left(vs, x)]
    assert round_to_format(x, fmt, "down") == below and round_to_format(x, fmt, "up") == above


# -- the strategies themselves -------------------------------------------------------------------
@given(st.data())
def test_strategies_produce_exact_dtype_values(data):
    fmt = data.draw(formats())
    a = data.draw(arrays(fmt, dtype=np.float32))
    assert a.dtype == np.float32
    b = data.draw(arrays(fmt, shape=3))
    assert b.shape == (3,) and b.dtype == np.float64
    x = data.draw(boundary_values(fmt, allow_nan=True))
    assert isinstance(x, float)
    if isinstance(fmt, FixedFormat):
        assert not math.isinf(x)
