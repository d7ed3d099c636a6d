"""Every kind of input, at every public entry point: the one correct rounding, or a clear error.

Inputs of every Python and NumPy kind are drawn (None, bool, ints beyond 2**53 and beyond
float64's range, Fractions, Decimals, complex numbers, strings, object arrays, long doubles;
read-only, non-contiguous, big-endian, 0-d, empty and large arrays; huge and tiny magnitudes,
NaN and infinities) and each result is checked against :mod:`fixedsim.reference`, fed the
input's exact value as this file reads it (:func:`exact_of`, written apart from the library's
own conversion), or against the error the rules in docs/numerics.md ("What an input may be")
promise.
"""

import dataclasses
import decimal
import importlib
import math
import pkgutil
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_same_bits, float_toward_zero
from hypothesis import assume, given
from hypothesis import strategies as st
from numba.core.registry import CPUDispatcher

import fixedsim as fs
import fixedsim.jit
from fixedsim import hardware, reference
from fixedsim.jit.rng import random_u64_array
from fixedsim.quantize import random_key
from fixedsim.reuse import reuse_matmul
from fixedsim.testing import formats, overflows, roundings

LONG = np.longdouble
HAS_LONG = np.finfo(LONG).nmant > 52  # x86: 64-bit significands, values float64 cannot hold


# -- the exact value of an element, read independently of fixedsim --------------------------------
def exact_of(v):
    """The value an element stands for: a float (NaN, infinities, signed zeros, any float16/32/64
    value) or a nonzero Fraction (ints, Fractions, Decimals, long doubles); bools are 0 and 1,
    and an exact zero (int 0, Fraction(0)) is +0.0, as IEEE 754 reads a zero without sign."""
    e = _exact_of(v)
    return 0.0 if isinstance(e, Fraction) and e == 0 else e


def _exact_of(v):
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, np.integer)):
        return Fraction(int(v))
    if isinstance(v, LONG) and HAS_LONG:
        return float(v) if not np.isfinite(v) else Fraction(*v.as_integer_ratio())
    if isinstance(v, (float, np.floating)):
        return float(v)
    if isinstance(v, Decimal):
        if v.is_nan() or v.is_infinite() or v.is_zero():
            sign = -1.0 if v.is_signed() else 1.0
            return math.copysign(math.nan if v.is_nan() else math.inf if v.is_infinite()
                                 else 0.0, sign)
        return Fraction(v)
    if isinstance(v, Fraction):
        return v
    raise AssertionError(f"not a real element: {v!r}")


def is_nan(e):
    return isinstance(e, float) and math.isnan(e)


def finite(e):
    return isinstance(e, Fraction) or math.isfinite(e)


def in_float64(e):
    """Whether float64 holds the exact value ``e``."""
    if isinstance(e, float):
        return True
    try:
        return Fraction(float(e)) == e
    except OverflowError:
        return False


# -- element strategies ---------------------------------------------------------------------------
def _near_ties():
    """Exact values just off a midpoint of FP16, BF16 or FP32 by less than float64 resolves:
    float64 rounds them onto the midpoint, and a second rounding then goes the wrong way."""
    return st.builds(
        lambda m, prec, k, s, e: s * (Fraction(2 * m + 1, 2 ** (prec + 1)) + s * Fraction(1, 2**k))
        * Fraction(2) ** e,
        st.integers(0, 2**7 - 1), st.sampled_from([8, 11, 24]), st.integers(54, 90),
        st.sampled_from([1, -1]), st.integers(-20, 20))


INTS = st.one_of(st.integers(-(2**20), 2**20), st.integers(-(2**70), 2**70),
                 st.sampled_from([2**53 + 1, 2**60 + 2**36 + 1, -(2**63), 2**63 - 1, 2**64 - 1,
                                  2**64, 10**400, -(10**400), 0]),
                 st.integers(54, 1100).map(lambda k: 2**k + 1))
FRACTIONS = st.one_of(
    st.fractions(max_denominator=2**80),
    st.builds(Fraction, st.integers(-(10**30), 10**30), st.integers(1, 10**30)),
    _near_ties(),
    st.sampled_from([Fraction(1, 3), Fraction(-1, 10**400), Fraction(10**400, 3),
                     Fraction(1, 2**1080), Fraction(3, 2**1075), Fraction(1) + Fraction(1, 2**11)
                     + Fraction(1, 2**60)]))
DECIMALS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True),
    st.builds(lambda m, e: Decimal(m).scaleb(e), st.integers(-(10**25), 10**25),
              st.integers(-420, 420)),
    st.sampled_from([Decimal("0.1"), Decimal("-0"), Decimal("-NaN"), Decimal("1e-400"),
                     Decimal("-1e400"), Decimal("65519.99999999999999999999")]))
FLOATS = st.one_of(st.floats(width=64), st.floats(width=32), st.floats(width=16),
                   st.sampled_from([0.0, -0.0, 1e308, -5e-324, math.inf, -math.inf, math.nan]))
BOOLS = st.booleans()
REALS = st.one_of(FLOATS, INTS, FRACTIONS, DECIMALS, BOOLS)
#: Elements that are not real numbers, with the error each gives.
BAD = st.sampled_from([
    (None, "None is not a number"), ("1.5", "is a string"), (b"2", "is a string"),
    (1 + 2j, "is complex"), (np.complex64(1), "is complex"), (0j, "is complex"),
    ({}, "dict {} is not one"), ([1.0], "ragged"),
])

SHAPES = st.sampled_from([(), (1,), (3,), (2, 3), (0,), (2, 0), (1, 2, 2)])


@st.composite
def element_lists(draw, elements=REALS, shape=None):
    """A nested list of ``shape`` (drawn) of elements, and the flat list of them."""
    shape = draw(SHAPES) if shape is None else shape
    n = math.prod(shape)
    flat = [draw(elements) for _ in range(n)]
    return _nest(flat, shape), flat, shape


def _nest(flat, shape):
    if not shape:
        return flat[0]
    step = math.prod(shape[1:])
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def object_array(flat, shape):
    arr = np.empty(len(flat), dtype=object)
    for i, v in enumerate(flat):
        arr[i] = v
    return arr.reshape(shape)


#: NumPy dtypes of typed arrays drawn (native and big-endian).
TYPED = [np.float64, np.float32, np.float16, ">f8", ">f4", np.int64, np.uint64, np.int8, ">i8",
         np.uint16, np.bool_] + ([LONG] if HAS_LONG else [])


def _typed_values(draw, dtype, n):
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return np.array(draw(st.lists(BOOLS, min_size=n, max_size=n)), dtype=dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        ints = st.one_of(st.integers(int(info.min), int(info.max)),
                         st.sampled_from([int(info.min), int(info.max), 0, 1]))
        return np.array(draw(st.lists(ints, min_size=n, max_size=n)), dtype=dt)
    if dt == np.dtype(LONG):  # float64 values nudged by a few long double ulps
        base = draw(st.lists(st.floats(width=64), min_size=n, max_size=n))
        nudge = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
        out = np.array(base, dtype=LONG)
        with np.errstate(all="ignore"):
            for i, k in enumerate(nudge):
                for _ in range(abs(k)):
                    out[i] = np.nextafter(out[i], LONG(math.copysign(math.inf, k)))
        return out
    width = {2: 16, 4: 32, 8: 64}[dt.itemsize]
    return np.array(draw(st.lists(st.floats(width=width), min_size=n, max_size=n)), dtype=dt)


@st.composite
def typed_arrays(draw, dtypes=TYPED):
    """A NumPy array of a drawn dtype, possibly read-only, non-contiguous, 0-d or empty."""
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(SHAPES)
    layout = draw(st.sampled_from(["plain", "strided", "reversed", "transposed", "readonly",
                                   "readonly-strided"]))
    n = math.prod(shape)
    if layout in ("strided", "readonly-strided") and shape:
        big = _typed_values(draw, dtype, 2 * n).reshape(*shape[:-1], 2 * shape[-1])
        arr = big[..., ::2]
    else:
        arr = _typed_values(draw, dtype, n).reshape(shape)
        if layout == "reversed" and shape:
            arr = arr[..., ::-1]
        elif layout == "transposed":
            arr = arr.T
    if layout.startswith("readonly"):
        arr.setflags(write=False)
    return arr


@st.composite
def inputs(draw):
    """``(x, flat exact values, shape, error)``: an input of any kind; ``error`` is None or
    ``(exception type, message pattern)`` when it must be refused."""
    kind = draw(st.sampled_from(["scalar", "list", "tuple", "object", "object-readonly",
                                 "typed", "typed", "bad-list", "bad-object", "bad-typed"]))
    if kind == "typed":
        arr = draw(typed_arrays())
        flat = [arr[idx] for idx in np.ndindex(arr.shape)]
        return arr, [exact_of(v) for v in flat], arr.shape, None
    if kind == "bad-typed":
        arr, pattern = draw(st.sampled_from([
            (np.array([1 + 1j, 2]), "complex numbers"), (np.array(["1", "2"]), "strings"),
            (np.array([b"1"]), "bytes"), (np.array(["2020-01-01"], "datetime64[D]"), "datetimes"),
            (np.zeros(2, np.complex64), "complex numbers")]))
        return arr, None, arr.shape, (TypeError,
                                      f"x must hold real numbers .*an array of {pattern}")
    if kind == "scalar":
        v = draw(REALS)
        return v, [exact_of(v)], (), None
    if kind.startswith("bad"):
        nested, flat, shape = draw(element_lists(shape=draw(st.sampled_from([(1,), (3,), (2, 2)]))))
        i = draw(st.integers(0, len(flat) - 1))
        bad, pattern = draw(BAD)
        flat[i] = bad
        if kind == "bad-list":
            if isinstance(bad, list):  # a list in a 2-d nest, or alone, reads as an axis
                assume(len(shape) == 1 and len(flat) > 1)
            x = _nest(flat, shape)
        else:
            x = object_array(flat, shape)
        return x, None, shape, (TypeError, f"x must hold real numbers .* at flat index {i}, .*"
                                f"{pattern}")
    nested, flat, shape = draw(element_lists())
    if kind == "list":
        x = nested
    elif kind == "tuple":
        x = tuple(nested) if isinstance(nested, list) else nested
    else:
        x = object_array(flat, shape)
        if kind == "object-readonly":
            x.setflags(write=False)
    return x, [exact_of(v) for v in flat], shape, None


def oracle_quantize(exacts, shape, fmt, rounding, overflow, seed=None, random_bits=None,
                    flags=False):
    """The oracle's roundings of the exact values, as the float64 container holds them (and
    with ``flags``, the sums of its event flags)."""
    sr = rounding is fs.Rounding.STOCHASTIC
    if sr:
        r = 64 if random_bits is None else random_bits
        draws = random_u64_array(random_key(seed), 0, len(exacts)) >> np.uint64(64 - r)
    out = [reference.round_to_format(e, fmt, rounding, overflow, random_bits=random_bits,
                                     draw=int(draws[i]) if sr else None, flags=True)
           for i, e in enumerate(exacts)]
    y = np.array([float_toward_zero(v) for v, _ in out], dtype=np.float64).reshape(shape)
    if not flags:
        return y
    return y, {k: sum(f[k] for _, f in out) for k in
               ("inexact", "rounded_up", "overflow", "underflow", "subnormal", "nan")}


# -- quantize -------------------------------------------------------------------------------------
@given(inputs(), formats(), roundings(), st.data())
def test_quantize_rounds_every_kind_of_input_once_or_refuses_it(case, fmt, rounding, data):
    x, exacts, shape, error = case
    overflow = data.draw(overflows(fmt))
    seed = data.draw(st.integers(0, 2**32))
    random_bits = data.draw(st.sampled_from([None, 1, 7, 64])) \
        if rounding is fs.Rounding.STOCHASTIC else None
    kw = dict(overflow=overflow, seed=seed, random_bits=random_bits)
    if error is not None:
        with pytest.raises(error[0], match=error[1]):
            fs.quantize(x, fmt, rounding, **kw)
        return
    fixed = isinstance(fmt, fs.FixedFormat)
    if fixed and any(is_nan(e) for e in exacts):
        with pytest.raises(ValueError, match="NaN"):
            fs.quantize(x, fmt, rounding, **kw)
        return
    if fixed and overflow is fs.Overflow.WRAP and any(not finite(e) for e in exacts):
        with pytest.raises(ValueError, match="infinity"):
            fs.quantize(x, fmt, rounding, **kw)
        return
    numeric = isinstance(x, np.ndarray) and x.dtype != object
    before = x.copy() if numeric else None
    y, stats = fs.quantize(x, fmt, rounding, stats=True, **kw)
    assert y.shape == shape and y.dtype == fmt.dtype
    expected, flags = oracle_quantize(exacts, shape, fmt, rounding, overflow, seed,
                                      random_bits, flags=True)
    assert_same_bits(y, expected)
    assert stats == fs.QuantStats(size=len(exacts), **flags)
    if numeric:  # never modified
        np.testing.assert_array_equal(x, before)


def test_the_issue_examples():
    """None, a Fraction just above an FP16 tie, the integer 2**60 + 2**36 + 1 in a list and
    in an object array: refused, or rounded once to the oracle's value."""
    with pytest.raises(TypeError, match="at flat index 0, None is not a number"):
        fs.quantize(None, fs.FP16)
    with pytest.raises(TypeError, match="at flat index 0, None is not a number"):
        fs.quantize([None, 1.0], fs.FP16)
    x = Fraction(1) + Fraction(1, 2**11) + Fraction(1, 2**60)
    assert fs.quantize([x], fs.FP16).tolist() == [1.0009765625] == [reference.round_to_format(
        x, fs.FP16)]
    n = 2**60 + 2**36 + 1
    for v in ([n], np.array([n], dtype=object), np.array([n], dtype=np.int64), [1.5, n],
              np.array([1.5, n], dtype=object)):
        assert fs.quantize(v, fs.FP32)[-1] == np.float32(1.1529216e18) == 2.0**60 + 2**37


def test_bools_are_zero_and_one_everywhere():
    """NumPy reads bools as 0 and 1; so does every entry point, in any container."""
    for x in (True, [True, False], np.array([True, False]), np.array([True], dtype=object)):
        assert fs.quantize(x, fs.FP8_E4M3).tolist() in (1.0, [1.0, 0.0], [1.0])
    assert fs.to_bits([True, False], fs.FixedFormat(4, 0)).tolist() == [1, 0]
    assert fs.from_bits([True, False], fs.FixedFormat(4, 0)).tolist() == [1.0, 0.0]
    assert fs.add(True, True, fs.FP16) == 2.0
    assert fs.matmul([[True, True]], [[True], [False]]).tolist() == [[1.0]]


def test_large_arrays_strided_and_read_only():
    """Two million elements (several kernel chunks and threads), read-only and strided: every
    element against NumPy's float16 cast (a correct float64 rounding to nearest even) and a
    sample against the oracle."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(2 * 2**20 + 6) * np.exp2(rng.integers(-30, 20, 2 * 2**20 + 6))
    base.setflags(write=False)
    x = base[::2]
    y = fs.quantize(x, fs.FP16)
    with np.errstate(over="ignore"):  # beyond FP16's range: inf, as fs.FP16 overflows
        assert_same_bits(y, x.astype(np.float16).astype(np.float64))
    q = fs.FixedFormat(16, 8)
    yq = fs.quantize(x, q, "stochastic", seed=3)
    idx = rng.integers(0, x.size, 200)
    draws = [int(random_u64_array(random_key(3), int(i), 1)[0]) for i in idx]
    expected = [reference.round_to_format(float(x[i]), q, "stochastic", draw=d)
                for i, d in zip(idx, draws, strict=True)]
    assert_same_bits(yq[idx], expected)


def test_huge_integer_arrays_round_once():
    """uint64 and int64 arrays beyond 2**53: the values float64 cannot hold go through the
    oracle, the others through the kernels; both agree with the oracle everywhere."""
    rng = np.random.default_rng(6)
    u = rng.integers(0, 2**64 - 1, 300, dtype=np.uint64, endpoint=True)
    u[:4] = [2**64 - 1, 2**53 + 1, 2**63, 0]
    for fmt, mode in ((fs.FP32, "nearest_even"), (fs.BF16, "up"), (fs.FixedFormat(64, -8), "odd"),
                      (fs.FP16, "toward_zero")):
        expected = [float_toward_zero(reference.round_to_format(int(v), fmt, mode)) for v in u]
        assert_same_bits(fs.quantize(u, fmt, mode), expected)
        s = u.astype(np.int64)  # wraps: negative values too
        expected = [float_toward_zero(reference.round_to_format(int(v), fmt, mode)) for v in s]
        assert_same_bits(fs.quantize(s, fmt, mode), expected)


# -- to_bits / from_bits --------------------------------------------------------------------------
def _as_kind(v: float, kind: str):
    """The float ``v`` presented as another kind of element with the same value."""
    if kind == "fraction" and math.isfinite(v) and v != 0:  # Fractions have no -0
        return Fraction(v)
    if kind == "decimal" and math.isfinite(v) and v != 0:
        return Decimal(v)
    if kind == "int" and math.isfinite(v) and v == int(v) and v != 0:
        return int(v)
    return v


@given(formats(), st.lists(REALS, min_size=1, max_size=6), st.data())
def test_to_bits_of_every_kind_of_value(fmt, elements, data):
    """Values of the format given as floats, ints, Fractions, Decimals or bools get the
    oracle's codes; a value not in the format is refused, naming its index."""
    exacts = [exact_of(v) for v in elements]
    if isinstance(fmt, fs.FixedFormat):
        assume(not any(is_nan(e) for e in exacts))
    # the values of the format nearest the drawn ones, then given as a drawn kind
    vals = [reference.round_to_format(e, fmt, overflow="saturate") for e in exacts]
    kinds = data.draw(st.lists(st.sampled_from(["float", "fraction", "decimal", "int"]),
                               min_size=len(vals), max_size=len(vals)))
    vals = [math.copysign(math.nan, v) if is_nan(v) else v for v in vals]  # canonical NaNs
    given_ = [v if isinstance(v, Fraction) else _as_kind(v, k)
              for v, k in zip(vals, kinds, strict=True)]
    codes = fs.to_bits(object_array(given_, (len(given_),)), fmt)
    assert codes.dtype == fmt.code_dtype
    assert codes.tolist() == [reference.encode(v, fmt) for v in vals]
    assert fs.to_bits(given_, fmt).tolist() == codes.tolist()  # a list: the same
    # the encodings: a format without subnormals has theirs (from_bits decodes them)
    enc = dataclasses.replace(fmt, subnormals=True) if isinstance(fmt, fs.FloatFormat) else fmt
    off = [e for e in exacts if finite(e) and reference.round_to_format(e, enc, "odd") != e]
    if off:
        with pytest.raises(ValueError, match=r"to_bits: x\[0\] \(flat index\) = .* is not a "
                                             r"value of"):
            fs.to_bits([off[0]], fmt)


@given(formats(), st.data())
def test_from_bits_of_every_kind_of_code(fmt, data):
    width = fmt.width
    codes = data.draw(st.lists(st.integers(0, 2**width - 1), min_size=1, max_size=6))
    expected = [reference.decode(c, fmt) for c in codes]
    kind = data.draw(st.sampled_from(["list", "object", "uint64", "readonly", "strided", ">u8"]))
    if kind == "list":
        x = codes
    elif kind == "object":
        x = object_array(codes, (len(codes),))
    else:
        twice = [c for c in codes for _ in (0, 1)]
        arr = np.array(twice, dtype=">u8" if kind == ">u8" else np.uint64)
        x = arr[::2] if kind == "strided" else np.ascontiguousarray(arr[::2])
        if kind == "readonly":
            x.setflags(write=False)
    assume(all(isinstance(v, float) for v in expected))  # else refused (wide fixed point)
    got = fs.from_bits(x, fmt)
    assert got.dtype == fmt.dtype
    assert_same_bits(got, np.array(expected), nan_sign=True)


@pytest.mark.parametrize("codes,exc,match", [
    (None, TypeError, r"codes must be integers \(or bools\); at flat index 0, None"),
    ([1, None], TypeError, r"at flat index 1, None \(NoneType\) is not an integer"),
    ([1.0, 2.0], TypeError, r"codes must be integers \(or bools\), got an array of dtype float64"),
    (["1"], TypeError, "dtype <U1"),
    ([Fraction(1)], TypeError, r"at flat index 0, Fraction\(1, 1\) \(Fraction\)"),
    ([1j], TypeError, "complex128"),
    ([[1, 2], [3]], TypeError, "codes must be a rectangular array of integers"),
    ([2**16], ValueError, r"codes must be in \[0, 2\*\*16\) for FP16, got 65536"),
    ([-1], ValueError, r"codes must be in \[0, 2\*\*16\) for FP16, got -1"),
    ([2**70], ValueError, r"got 1180591620717411303424"),
])
def test_from_bits_refuses_what_is_not_a_code(codes, exc, match):
    with pytest.raises(exc, match=match):
        fs.from_bits(codes, fs.FP16)


def test_empty_codes_and_values():
    assert fs.from_bits([], fs.FP16).shape == (0,) and fs.to_bits([], fs.FP16).shape == (0,)
    assert fs.from_bits(np.zeros((2, 0), np.uint8), fs.FP8_E4M3).shape == (2, 0)


# -- arithmetic -----------------------------------------------------------------------------------
def _sign(e) -> float:
    return (-1.0 if e < 0 else 1.0) if isinstance(e, Fraction) else math.copysign(1.0, e)


def oracle_arith(op, ops, rounding):
    """The exact result of ``op`` on exact operands (a Fraction, or a float for an IEEE special
    or a signed zero), from IEEE 754's rules."""
    x, y, z = (list(ops) + [Fraction(0)] * 3)[:3]
    if not all(finite(v) for v in ops) or (op == "div" and y == 0):
        # an IEEE special: depends on the finite operands' signs and zeros only
        f = [v if isinstance(v, float) else _sign(v) if v != 0 else 0.0 for v in (x, y, z)]
        with np.errstate(all="ignore"):
            a, b, c = (np.float64(v) for v in f)
            if op == "fma":
                return float(c) if (finite(x) and finite(y)) else float(a * b + c)
            return float({"add": a + b, "mul": a * b, "div": a / b}[op])
    fx, fy = Fraction(x), Fraction(y)
    v = {"add": lambda: fx + fy, "mul": lambda: fx * fy, "div": lambda: fx / fy,
         "fma": lambda: fx * fy + Fraction(z)}[op]()
    if v != 0:
        return v
    if op in ("mul", "div"):
        return math.copysign(0.0, _sign(x) * _sign(y))
    p_sign = _sign(x) * _sign(y) if op == "fma" else _sign(x)
    q = z if op == "fma" else y
    p_zero = (fx * fy == 0) if op == "fma" else fx == 0
    if p_zero and Fraction(q) == 0 and p_sign == _sign(q):
        return math.copysign(0.0, p_sign)
    return -0.0 if rounding is fs.Rounding.DOWN else 0.0


ARITH = {"add": fs.add, "sub": fs.sub, "mul": fs.mul, "div": fs.div, "fma": fs.fma}


@given(st.sampled_from(sorted(ARITH)), formats(), roundings(), st.data())
def test_arithmetic_on_every_kind_of_operand(name, fmt, rounding, data):
    """Operands of every kind (broadcast against each other) give the oracle's rounding of
    the exact result; refused operands name themselves."""
    nops = 3 if name == "fma" else 2
    shape = data.draw(st.sampled_from([(), (2,), (2, 2)]))
    ops, exact = [], []
    for _ in range(nops):
        sh = data.draw(st.sampled_from([shape, shape[1:], ()]))
        kind = data.draw(st.sampled_from(["list", "object", "typed", "scalar"]))
        if kind == "typed":
            dtype = data.draw(st.sampled_from([np.float64, ">f4", np.int64, np.uint64, np.bool_]))
            arr = _typed_values(data.draw, dtype, math.prod(sh)).reshape(sh)
            if data.draw(st.booleans()):
                arr.setflags(write=False)
            ops.append(arr)
            e = np.empty(arr.size, dtype=object)
            e[:] = [exact_of(v) for v in arr.reshape(-1)]
            exact.append(e.reshape(sh))
        elif kind == "scalar" or sh == ():
            v = data.draw(REALS)
            ops.append(v)
            exact.append(np.array(exact_of(v), dtype=object))
        else:
            nested, flat, _ = data.draw(element_lists(shape=sh))
            ops.append(nested if kind == "list" else object_array(flat, sh))
            e = np.empty(len(flat), dtype=object)
            e[:] = [exact_of(v) for v in flat]
            exact.append(e.reshape(sh))
    overflow = data.draw(overflows(fmt))
    seed = data.draw(st.integers(0, 2**32))
    if name == "sub":
        exact[1] = np.vectorize(lambda e: -e, otypes=[object])(exact[1])
    full = np.broadcast_arrays(*exact)
    out_shape = full[0].shape
    op = "add" if name == "sub" else name
    results = [oracle_arith(op, [f.reshape(-1)[i] for f in full], rounding)
               for i in range(full[0].size)]
    call = lambda: ARITH[name](*ops, fmt, rounding, overflow, seed=seed)  # noqa: E731
    fixed = isinstance(fmt, fs.FixedFormat)
    if fixed and any(isinstance(r, float) and (math.isnan(r) or (
            overflow is fs.Overflow.WRAP and math.isinf(r))) for r in results):
        with pytest.raises(ValueError, match="NaN"):
            call()
        return
    got = call()
    assert got.shape == out_shape and got.dtype == fmt.dtype
    expected = oracle_quantize(results, out_shape, fmt, rounding, overflow, seed)
    assert_same_bits(got, expected, nan_sign=False)


@pytest.mark.parametrize("bad,match", [
    (None, "b must hold real numbers .* at flat index 0, None is not a number"),
    ("2", "b must hold real numbers .*an array of strings"),
    ([1.0, 2j], "b must hold real numbers .* at flat index 1, 2j is complex"),
])
def test_arithmetic_refuses_operands_that_are_not_real(bad, match):
    for f in (fs.add, fs.sub, fs.mul, fs.div):
        with pytest.raises(TypeError, match=match):
            f(1.0, bad, fs.FP16)


def test_fma_of_an_infinite_addend_and_a_product_beyond_float64():
    """The exact product 1e600 is finite: fma(1e300, 1e300, -inf) is -inf, not NaN."""
    assert fs.fma(1e300, 1e300, -math.inf, fs.FP16) == -math.inf
    assert fs.fma([1e300, -1e300], 1e300, math.inf, fs.FP32).tolist() == [math.inf] * 2
    assert math.isnan(fs.fma(math.inf, 0.0, 1.0, fs.FP16))


# -- matrix products and the layers on them -------------------------------------------------------
SPECS = [fs.MatmulSpec(), fs.MatmulSpec(input=fs.FP16, output=fs.FP16),
         fs.MatmulSpec(input=fs.BF16, accumulator=fs.FP16, output=fs.FP32)]


@st.composite
def operand(draw, shape):
    """``(x, exact values, error)``: a matrix operand of ``shape`` of any kind."""
    kinds = ["typed", "object"] + (["list"] if shape[0] else []) + (  # [] is 1-d
        ["bad"] if math.prod(shape) else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "typed":
        dtype = draw(st.sampled_from([np.float64, np.float32, ">f8", ">f4", np.float16,
                                      np.int64, np.uint64, np.bool_]))
        values = draw(st.lists(st.integers(-(2**60), 2**60) if np.dtype(dtype).kind in "iu"
                               else st.floats(-2048, 2048, width=16) if dtype == np.float16
                               else st.floats(-1e6, 1e6, width=32),
                               min_size=math.prod(shape), max_size=math.prod(shape)))
        if np.dtype(dtype).kind == "b":
            values = [bool(v) for v in values]
        if np.dtype(dtype).kind == "u":
            values = [abs(v) for v in values]
        arr = np.array(values, dtype=dtype).reshape(shape)
        layout = draw(st.sampled_from(["plain", "readonly", "reversed"]))
        if layout == "readonly":
            arr.setflags(write=False)
        elif layout == "reversed":
            arr = arr[::-1]
        flat = [arr[idx] for idx in np.ndindex(arr.shape)]
    else:
        elems = st.one_of(st.floats(-1e6, 1e6), st.integers(-(2**62), 2**62), FRACTIONS,
                          st.booleans(), DECIMALS.filter(lambda d: d.is_finite()
                                                         and abs(d) < 10**6))
        flat = [draw(elems) for _ in range(math.prod(shape))]
        if kind == "bad":
            i = draw(st.integers(0, len(flat) - 1))
            bad, pattern = draw(BAD.filter(lambda b: not isinstance(b[0], list)))
            flat[i] = bad
            return object_array(flat, shape), None, (TypeError, f"at flat index {i}, .*"
                                                     f"{pattern}")
        arr = _nest(flat, shape) if kind == "list" else object_array(flat, shape)
    exact = [exact_of(v) for v in flat]
    if not all(in_float64(e) for e in exact):
        i = next(i for i, e in enumerate(exact) if not in_float64(e))
        return arr, None, (ValueError, f"holds .* at flat index {i} .*which float64 cannot hold "
                           "exactly; matrix products take their operands as float64 values")
    return arr, np.array([float(e) for e in exact]).reshape(shape), None


@given(st.integers(1, 3), st.integers(0, 3), st.integers(1, 3), st.sampled_from(SPECS),
       st.data())
def test_matmul_operands_of_every_kind(M, K, N, spec, data):
    """Operands that are float64 values in any container give the oracle's product; values
    float64 cannot hold are refused (spec.input rounds from float64: that would be a second
    rounding), and so is whatever is not a real number."""
    a, ea, err_a = data.draw(operand((M, K)))
    b, eb, err_b = data.draw(operand((K, N)))
    err = err_a if err_a is not None else err_b
    if err is not None:
        name = "a" if err_a is not None else "b"
        with pytest.raises(err[0], match=f"{name} (must hold real numbers|holds).*" if
                           err[0] is ValueError else f"{name} must hold real numbers"):
            fs.matmul(a, b, spec)
        with pytest.raises(err[0], match=err[1]):
            fs.matmul(a, b, spec)
        return
    got = fs.matmul(a, b, spec)
    assert_same_bits(got, reference.matmul(ea, eb, spec))
    assert_same_bits(fs.matmul(ea, eb, spec), got)


def test_conv2d_and_its_gradients_take_operands_as_matmul_does():
    """Read-only, non-contiguous, big-endian, integer and object operands give the bits of
    the plain float64 arrays; values float64 cannot hold and non-numbers are refused."""
    rng = np.random.default_rng(7)
    x = rng.integers(-8, 8, (2, 2, 5, 5)).astype(np.float64)
    w = rng.integers(-4, 4, (3, 2, 3, 3)).astype(np.float64) / 4
    gy = rng.integers(-4, 4, (2, 3, 3, 3)).astype(np.float64)
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP16)
    ref = fs.conv2d(x, w, spec)
    ref_w = fs.conv2d_grad_weight(x, gy, w.shape, spec)
    ref_x = fs.conv2d_grad_input(gy, w, x.shape, spec)
    ro = x.copy()
    ro.setflags(write=False)
    variants = [ro, x.astype(">f8"), x.astype(np.int64), x.astype(object),
                np.ascontiguousarray(x[:, :, ::-1])[:, :, ::-1], x.tolist()]
    for v in variants:
        assert_same_bits(fs.conv2d(v, w, spec), ref)
        assert_same_bits(fs.conv2d_grad_weight(v, gy, w.shape, spec), ref_w)
    for v in (gy.astype(object), gy.astype(">f4"), gy.astype(np.int8)):
        assert_same_bits(fs.conv2d_grad_input(v, w, x.shape, spec), ref_x)
    bad = x.astype(object)
    bad[0, 1, 2, 3] = Fraction(1, 3)
    with pytest.raises(ValueError, match=r"x holds Fraction\(1, 3\) at flat index 38 "):
        fs.conv2d(bad, w, spec)
    bad[0, 1, 2, 3] = None
    with pytest.raises(TypeError, match="x must hold real numbers .* at flat index 38, None"):
        fs.conv2d(bad, w, spec)
    with pytest.raises(ValueError, match=r"grad_y holds 9007199254740993 at flat index 0"):
        fs.conv2d_grad_input(np.full(gy.shape, 2**53 + 1, dtype=np.int64), w, x.shape, spec)


def test_reuse_takes_operands_as_matmul_does():
    X = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.5], [-3.0, 1.0]])
    W = np.eye(2)
    Y, _ = reuse_matmul(X, W, L=2, H=4)
    ro = X.copy()
    ro.setflags(write=False)
    for v in (ro, X.astype(object), X.astype(">f8"), X.tolist()):
        assert_same_bits(reuse_matmul(v, W, L=2, H=4)[0], Y)
    with pytest.raises(ValueError, match=r"W holds Fraction\(1, 3\) at flat index 0"):
        reuse_matmul(X, [[Fraction(1, 3), 0], [0, 1]], L=2, H=4)
    with pytest.raises(TypeError, match="X must hold real numbers .* None"):
        reuse_matmul([[None, 1.0]], W, L=2, H=4)


# -- read-only arrays take the compiled kernels ---------------------------------------------------
def _signatures():
    """The compiled signatures of every kernel of fixedsim.jit."""
    mods = [importlib.import_module(f"fixedsim.jit.{m.name}")
            for m in pkgutil.iter_modules(fixedsim.jit.__path__)]
    return {f"{m.__name__}.{k}": len(v.signatures) for m in mods for k, v in vars(m).items()
            if isinstance(v, CPUDispatcher)}


def _readonly(v):
    v = np.array(v)
    v.setflags(write=False)
    return v


_RNG = np.random.default_rng(11)
_A, _B = _RNG.standard_normal((6, 5)), _RNG.standard_normal((5, 4))
_X, _W = _RNG.standard_normal((2, 2, 5, 5)), _RNG.standard_normal((3, 2, 3, 3))
# FP16 operands and an FP32 addend for a matrix unit without its input stage, so that the
# caller's arrays themselves reach the BlockFMA kernel
_AH, _BH = (fs.quantize(v, fs.FP16) for v in (_A, _B))
_CH = fs.quantize(_RNG.standard_normal((6, 4)), fs.FP32)


def _ro_if(v, a):
    """``v``, read-only when the call's operand ``a`` is."""
    return v if a.flags.writeable else _readonly(v)


READ_ONLY_CALLS = {
    "quantize FP16 from float64": lambda a, b: fs.quantize(a, fs.FP16),
    "quantize FP16 from float32": lambda a, b: fs.quantize(a.astype(np.float32), fs.FP16),
    "quantize Q<16,8>": lambda a, b: fs.quantize(a, fs.FixedFormat(16, 8)),
    "quantize Q<16,8> wrap": lambda a, b: fs.quantize(a, fs.FixedFormat(16, 8), overflow="wrap"),
    "quantize FP8 stochastic, stats": lambda a, b: fs.quantize(a, fs.FP8_E5M2, "stochastic",
                                                               seed=1, stats=True)[0],
    "quantize wide fixed, stats": lambda a, b: fs.quantize(a, fs.FixedFormat(60, 20),
                                                           stats=True)[0],
    "to_bits": lambda a, b: fs.to_bits(fs.quantize(a, fs.BF16), fs.BF16),
    "add": lambda a, b: fs.add(a, a, fs.FP16),
    "add on the grid": lambda a, b: fs.add(fs.quantize(a, fs.FixedFormat(16, 8)), a,
                                           fs.FixedFormat(16, 8)),
    "fma": lambda a, b: fs.fma(a, a, a, fs.BF16),
    "matmul": lambda a, b: fs.matmul(a, b),
    "matmul FP16 in, FP32 chain": lambda a, b: fs.matmul(a, b, fs.MatmulSpec(
        input=fs.FP16, accumulator=fs.FP32, output=fs.FP16)),
    "matmul FP16 chain": lambda a, b: fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP16)),
    "matmul FP16 blocks of 4, addend": lambda a, b: fs.matmul(
        a, b, fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, block=4)), c=_ro_if(_CH, a)),
    "matmul BlockFMA, addend": lambda a, b: fs.matmul(
        _ro_if(_AH, a), _ro_if(_BH, a), fs.MatmulSpec(
            accumulator=hardware.spec("H100", "fp16").accumulator), c=_ro_if(_CH, a)),
    "conv2d": lambda a, b: fs.conv2d(_ro_if(_X, a), _ro_if(_W, a),
                                     fs.MatmulSpec(input=fs.BF16, output=fs.FP16)),
}


@pytest.mark.parametrize("name", sorted(READ_ONLY_CALLS))
def test_read_only_inputs_give_the_same_bits_and_compile_nothing(name):
    """``setflags(write=False)`` arrays (np.load(mmap_mode="r"), frozen weights) run the
    signatures the writeable ones compiled: no new signature in any dispatcher."""
    f = READ_ONLY_CALLS[name]
    expected = f(_A, _B)  # compiles (or loads from the cache) what it needs
    before = _signatures()
    got = f(_readonly(_A), _readonly(_B))
    assert _signatures() == before
    assert_same_bits(got, expected)


@pytest.mark.parametrize("spec", [
    fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, block=4)),
    fs.MatmulSpec(accumulator=hardware.spec("H100", "fp16").accumulator)],
    ids=["general", "blockfma"])
def test_batch_broadcast_compiles_nothing_more(spec):
    """Broadcast batch dimensions reach the kernels as numpy.broadcast_to's read-only views,
    plain operands as writable arrays: the kernels take both as read-only
    (:func:`fixedsim.compiling.read_only`), so one signature serves both (Numba compiles one
    per combination of writeable flags: 30 s more for the BlockFMA kernel)."""
    a3 = np.stack([_AH, -_AH])
    expected = fs.matmul(_AH, _BH, spec, c=_CH)  # compiles (or loads) the plain call's
    before = _signatures()
    got = fs.matmul(a3, _BH, spec, c=_CH)  # _BH and the addend broadcast over the batch
    assert _signatures() == before
    assert_same_bits(got[0], expected)


def test_decimal_context_does_not_matter():
    """A Decimal is its exact value, whatever the decimal context's precision."""
    d = Decimal("1.00048828125000000000000000000001")  # just above an FP16 tie
    with decimal.localcontext() as ctx:
        ctx.prec = 3
        assert fs.quantize(d, fs.FP16) == 1.0009765625


@pytest.mark.parametrize("fmt", [fs.FixedFormat(1, 0), fs.FixedFormat(8, 2, signed=False)])
def test_an_infinity_saturated_to_zero_is_an_overflow_not_an_underflow(fmt, monkeypatch):
    """-inf into an unsigned format (or +inf into Q<1,0>, whose largest value is 0) saturates
    to 0: the oracle counts an overflow and no underflow (its input is not finite), and so do
    the fast and the general kernels."""
    x = np.array([-math.inf, math.inf, -1e300, 1e-300])
    flags = [reference.round_to_format(v, fmt, flags=True)[1] for v in x]
    expected = fs.QuantStats(size=4, **{k: sum(f[k] for f in flags) for k in flags[0]})
    qmod = importlib.import_module("fixedsim.quantize")
    for fast in (True, False):
        monkeypatch.setattr(qmod, "_FAST_STATS", fast)
        assert fs.quantize(x, fmt, stats=True)[1] == expected


def test_non_contiguous_integers_beyond_float64_count_once():
    """A transposed int64 array with a value float64 cannot hold: the kernels see 0.0 in its
    place (C order), the oracle rounds it, and its events are counted once."""
    x = np.array([[0, 0], [0, 2**53 + 1]], dtype=np.int64).T[:, ::-1]
    fmt = fs.FixedFormat(1, 0, signed=False)
    y, stats = fs.quantize(x, fmt, stats=True)
    assert y.tolist() == [[0.0, 0.0], [1.0, 0.0]]
    assert stats == fs.QuantStats(size=4, inexact=1, rounded_up=0, overflow=1, underflow=0,
                                  subnormal=0, nan=0)


def test_to_bits_of_the_finest_fixed_point_formats():
    """frac_length 1024 to 1074 (quanta down to the smallest subnormal): 2.0**1074 is no
    float, the codes are still exact."""
    assert fs.to_bits([0.0, 2.0**-1074, 3 * 2.0**-1074], fs.FixedFormat(2, 1074, signed=False)
                      ).tolist() == [0, 1, 3]
    assert fs.to_bits([0.0, -(2.0**-1024)], fs.FixedFormat(1, 1024)).tolist() == [0, 1]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix's own warning
def test_ndarray_subclasses_are_read_as_plain_arrays():
    """np.matrix (whose reshape(-1) stays 2-d) gives the bits of the plain array."""
    a = np.array([[1.0, 2.5], [3.0, -4.75]])
    m = np.matrix(a)
    assert_same_bits(fs.quantize(m, fs.FixedFormat(8, 1)), fs.quantize(a, fs.FixedFormat(8, 1)))
    assert_same_bits(fs.mul(m, m, fs.FP8_E4M3), fs.mul(a, a, fs.FP8_E4M3))
    assert_same_bits(fs.matmul(m, m, fs.MatmulSpec(output=fs.BF16)),
                     fs.matmul(a, a, fs.MatmulSpec(output=fs.BF16)))


@pytest.mark.parametrize("fmt", [fs.E8M0, fs.FP8_E4M3FNUZ, fs.FP4_E2M1, fs.FP6_E3M2],
                         ids=str)
def test_exact_values_into_formats_without_zero_or_sign(fmt):
    """The kernels' stand-in for a value float64 cannot hold is a value of the format (E8M0
    has no zero): the values and every event count are the oracle's."""
    values = [Fraction(1, 3), 2**60 + 1, Fraction(-1, 10**400), 1.0, Decimal("0.1")]
    exacts = [exact_of(v) for v in values]
    for mode in (fs.Rounding.NEAREST_EVEN, fs.Rounding.UP):
        y, stats = fs.quantize(values, fmt, mode, stats=True)
        expected, flags = oracle_quantize(exacts, (5,), fmt, mode, None, flags=True)
        assert_same_bits(y, expected)
        assert stats == fs.QuantStats(size=5, **flags)
    y, stats = fs.add(values, 1, fmt, stats=True)
    sums = [oracle_arith("add", [e, Fraction(1)], fs.Rounding.NEAREST_EVEN) for e in exacts]
    expected, flags = oracle_quantize(sums, (5,), fmt, fs.Rounding.NEAREST_EVEN, None, flags=True)
    assert_same_bits(y, expected)
    assert stats == fs.QuantStats(size=5, **flags)
