"""add/sub/mul/div/fma: one correct rounding of the exact result, against the Fraction oracle."""

import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_same_bits, float_toward_zero
from hypothesis import given
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit.rng import random_u64_array
from fixedsim.quantize import random_key
from fixedsim.testing import boundary_values, fixed_formats, formats, overflows, roundings

OPS = {"add": 2, "sub": 2, "mul": 2, "div": 2, "fma": 3}


def expected(op, operands, fmt, rounding, overflow, seed, random_bits):
    """The oracle: exact Fraction result (IEEE specials natively, they are exact), one rounding."""
    rounding = fs.Rounding.coerce(rounding)
    n = len(operands[0])
    r = 64 if random_bits is None else random_bits
    draws = random_u64_array(random_key(seed), 0, n) >> np.uint64(64 - r) \
        if rounding is fs.Rounding.STOCHASTIC else [None] * n
    out = []
    for i in range(n):
        x, y, *rest = (float(o[i]) for o in operands)
        z = rest[0] if rest else 0.0
        if op == "sub":
            y = -y
        special = not all(math.isfinite(v) for v in (x, y, z)) or (op == "div" and y == 0)
        if special:
            with np.errstate(all="ignore"):
                v = {"add": x + y, "sub": x + y, "mul": x * y,
                     "fma": x * y + z}.get(op, None)
                if op == "div":
                    v = float(np.float64(x) / np.float64(y))
        else:
            fx, fy, fz = Fraction(x), Fraction(y), Fraction(z)
            v = (fx / fy if op == "div" else fx * fy + fz if op == "fma"
                 else fx * fy if op == "mul" else fx + fy)
            if v == 0:  # IEEE signs of exact zeros
                if op in ("mul", "div"):
                    v = math.copysign(0.0, x) * math.copysign(1.0, y)
                else:
                    t = math.copysign(1.0, x * y) if op == "fma" else math.copysign(1.0, x)
                    u = math.copysign(1.0, y if op != "fma" else z)
                    if t == u:
                        v = math.copysign(0.0, t)
                    else:
                        v = -0.0 if rounding is fs.Rounding.DOWN else 0.0
        d = None if draws[i] is None else int(draws[i])
        res = reference.round_to_format(v, fmt, rounding, overflow, draw=d,
                                        random_bits=random_bits)
        out.append(float_toward_zero(res))
    return np.array(out)


def call(op, operands, fmt, rounding, overflow, seed=None, random_bits=None, stats=False):
    return getattr(fs, op)(*operands, fmt, rounding, overflow, seed=seed,
                           random_bits=random_bits, stats=stats)


@st.composite
def arith_cases(draw):
    fmt = draw(formats())
    op = draw(st.sampled_from(sorted(OPS)))
    rounding = draw(roundings())
    overflow = draw(overflows(fmt))
    n = draw(st.integers(1, 12))
    fixed = isinstance(fmt, fs.FixedFormat)
    elem = st.one_of(
        boundary_values(fmt, allow_nan=not fixed, allow_infinity=not fixed),
        boundary_values(fmt, allow_nan=not fixed, allow_infinity=not fixed, dtype=np.float32),
        st.floats(-4, 4, width=32, allow_subnormal=False),
    )
    operands = [np.array(draw(st.lists(elem, min_size=n, max_size=n)))
                for _ in range(OPS[op])]
    return op, operands, fmt, rounding, overflow


def _fixed_invalid(op, operands, fmt, overflow):
    """Operands whose exact result is NaN (or inf with WRAP): a fixed format must refuse them."""
    if not isinstance(fmt, fs.FixedFormat):
        return False
    with np.errstate(all="ignore"):
        x, y, *rest = operands
        y = -y if op == "sub" else y
        r = {"add": x + y, "sub": x + y, "mul": x * y, "div": x / y,
             "fma": x * y + (rest[0] if rest else 0)}[op]
        finite = np.isfinite(x) & np.isfinite(y) & (np.isfinite(rest[0]) if rest else True)
        if op == "div":
            finite &= y != 0
    bad = np.isnan(r) & ~finite
    if overflow is fs.Overflow.WRAP:
        bad |= np.isinf(r) & ~finite
    return bool(bad.any())


@given(arith_cases(), st.integers(0, 2**31), st.sampled_from([None, 3, 17, 64]))
def test_matches_oracle(case, seed, random_bits):
    op, operands, fmt, rounding, overflow = case
    if rounding is not fs.Rounding.STOCHASTIC:
        random_bits = None
    if _fixed_invalid(op, operands, fmt, overflow):
        with pytest.raises(ValueError, match="cannot represent"):
            call(op, operands, fmt, rounding, overflow, seed, random_bits)
        return
    y, s = call(op, operands, fmt, rounding, overflow, seed, random_bits, stats=True)
    exp = expected(op, operands, fmt, rounding, overflow, seed, random_bits)
    assert_same_bits(y, exp, f"{op} {fmt} {rounding} {overflow}", nan_sign=False)
    assert s.size == y.size


def test_specials_follow_ieee():
    inf, nan = np.inf, np.nan
    assert_same_bits(fs.add([inf, inf, 1.0], [-inf, 1.0, nan], fs.FP16), [nan, inf, nan],
                     nan_sign=False)
    assert_same_bits(fs.div([1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, -0.0], fs.FP16),
                     [inf, -inf, nan, -inf], nan_sign=False)
    assert_same_bits(fs.mul([0.0, -2.0], [inf, 0.0], fs.FP16), [nan, -0.0], nan_sign=False)
    assert_same_bits(fs.div([1.0], [0.0], fs.FP8_E4M3), [448.0])  # no inf: saturates
    assert_same_bits(fs.sub([1.0, -0.0], [1.0, 0.0], fs.FP16), [0.0, -0.0])
    assert_same_bits(fs.sub([1.0], [1.0], fs.FP16, "down"), [-0.0])
    with pytest.raises(ValueError, match="cannot represent"):
        fs.div(0.0, 0.0, fs.FixedFormat(8, 2))


def test_fma_rounds_once():
    x = 1 + 2**-8
    assert fs.fma(x, x, -1.0, fs.FP16) == 2**-7 + 2**-16
    assert fs.add(fs.mul(x, x, fs.FP16), -1.0, fs.FP16) == 2**-7


def test_fma_beyond_float64_exactness():
    """a*b + c whose exact value float64 cannot hold: double rounding would give 1 + 2**-10."""
    a = 1 + 2**-11  # FP16 tie position relative to 1 after the product
    c = -(2.0**-40)
    got = fs.fma(a, 1.0, c, fs.FP16)  # exact: just below the tie -> rounds down
    assert got == 1.0


def test_wide_operands_take_the_exact_path():
    a = np.array([1 + 2**-40, 3.0])
    b = np.array([1 + 2**-45, 1 / 3])
    assert_same_bits(fs.mul(a, b, fs.FP32, "up"),
                     expected("mul", [a, b], fs.FP32, "up", None, None, None))
    assert_same_bits(fs.div(a, b, fs.FP64, "down"),
                     expected("div", [a, b], fs.FP64, "down", None, None, None))


def test_broadcasting_and_errors():
    assert fs.add(np.ones((3, 1)), np.ones(4), fs.FP16).shape == (3, 4)
    with pytest.raises(ValueError, match="do not broadcast"):
        fs.add(np.ones(3), np.ones(4), fs.FP16)
    with pytest.raises(TypeError, match="fmt must be"):
        fs.add(1.0, 2.0, "FP16")
    with pytest.raises(ValueError, match="unknown rounding"):
        fs.mul(1.0, 2.0, fs.FP16, "nearest")


@pytest.mark.parametrize("op", ["add", "mul", "div", "fma"])
def test_stochastic_is_unbiased(op):
    n = 100_000
    args = {"add": (np.full(n, 1.0), np.full(n, 2**-12)), "mul": (np.full(n, 1 / 3),
            np.full(n, 3.0)), "div": (np.full(n, 1.0), np.full(n, 3.0)),
            "fma": (np.full(n, 1 / 3), np.full(n, 3.0), np.full(n, 2**-13))}[op]
    exact = {"add": Fraction(1) + Fraction(2) ** -12,
             "mul": Fraction(1 / 3) * 3, "div": Fraction(1, 3),
             "fma": Fraction(1 / 3) * 3 + Fraction(2) ** -13}[op]
    y = getattr(fs, op)(*args, fs.BF16, "stochastic", seed=4)
    lo, hi = (float(v) for v in reference.neighbours(exact, fs.BF16))
    p = float((exact - Fraction(lo)) / (Fraction(hi) - Fraction(lo)))
    ups = np.count_nonzero(y == hi)
    assert np.count_nonzero((y != hi) & (y != lo)) == 0
    assert abs(ups - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1e-9


def test_stochastic_keeps_the_sign_of_an_exact_zero():
    """-0 + -0 is -0 and x - x rounding DOWN is -0 under every mode, STOCHASTIC included."""
    for rnd in fs.Rounding:
        assert np.signbit(fs.add(-0.0, -0.0, fs.FP16, rnd, seed=1))
        assert np.signbit(fs.fma(-0.0, 1.0, -0.0, fs.BF16, rnd, seed=1))
    assert np.signbit(fs.sub(1.0, 1.0, fs.FP16, "down"))


@pytest.mark.parametrize("random_bits", [1, 3])
@pytest.mark.parametrize("frac_length", [-1, -5])
def test_stochastic_tiny_negative_sum_with_few_random_bits(frac_length, random_bits):
    """-2**-1074 lies a whole quantum (minus 2**-1074) above the lower neighbour; with r
    random bits it goes down with probability 2**-r (the kernel once scaled it to -0 when
    the quantum is coarse, frac_length < 0, and took it for zero)."""
    fmt = fs.FixedFormat(4, frac_length)
    a, b = np.zeros(64), np.full(64, -5e-324)
    for seed in range(4):
        got = fs.add(a, b, fmt, "stochastic", seed=seed, random_bits=random_bits)
        exp = expected("add", [a, b], fmt, fs.Rounding.STOCHASTIC, fs.Overflow.SATURATE, seed,
                       random_bits)
        assert_same_bits(got, exp)
        assert_same_bits(fs.add(b, a, fmt, "stochastic", seed=seed, random_bits=random_bits),
                         exp)


@pytest.mark.parametrize("fmt", [fs.FixedFormat(1, 0), fs.FixedFormat(8, 2),
                                 fs.FixedFormat(16, 14)])
def test_stochastic_tiny_negative_sum_rounds_to_zero(fmt):
    """-2**-1074 is 2**-1074 above the next quantum down, so stochastic rounding goes to 0
    except with probability ~2**-1074 (the kernel once lost that gap in ``hi - lo_grid``)."""
    for seed in range(8):
        got = fs.add(np.zeros(4), np.full(4, -5e-324), fmt, "stochastic", seed=seed)
        exp = expected("add", [np.zeros(4), np.full(4, -5e-324)], fmt,
                       fs.Rounding.STOCHASTIC, fs.Overflow.SATURATE, seed, None)
        assert_same_bits(got, exp, nan_sign=False)
        assert not got.any()


@st.composite
def grid_sums(draw):
    """A saturating fixed format, ``a`` on its grid and ``b`` anywhere (a weight and a step):
    the case :func:`fixedsim.jit.arith.add_fixed_grid` takes without the general kernel."""
    fmt = draw(fixed_formats(max_word_length=51))
    n = draw(st.integers(1, 12))
    near_grid = boundary_values(fmt, allow_nan=False, allow_infinity=False)
    step = st.one_of(
        boundary_values(fmt, allow_nan=False, allow_infinity=False),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(-fmt.ulp * 4, fmt.ulp * 4),
        st.sampled_from([0.0, -0.0, 5e-324, -5e-324, fmt.ulp / 2, -fmt.ulp / 2, np.inf]),
    )
    a = np.array(draw(st.lists(near_grid, min_size=n, max_size=n)))
    b = np.array(draw(st.lists(step, min_size=n, max_size=n)))
    return fmt, a, b, draw(st.booleans())


def _on_grid(case):
    """``(fmt, a, b)`` of a :func:`grid_sums` case: ``a`` put on the grid here, not in the
    strategy (a first call of the quantizer compiles it, which would count as slow data
    generation on an empty kernel cache), and the operands swapped when the case says so."""
    fmt, a, b, swap = case
    a = fs.quantize(a, fmt).astype(np.float64)
    return (fmt, b, a) if swap else (fmt, a, b)


@given(grid_sums(), roundings(), st.integers(0, 2**31), st.sampled_from([None, 1, 17, 64]))
def test_grid_aligned_sums_match_oracle_and_general_kernel(case, rounding, seed, random_bits):
    """The grid-aligned sum kernel (one operand on the fixed-point grid): every value equals
    the oracle's, and values and event counts equal the general kernel's, bit for bit."""
    import fixedsim.arith as fa

    fmt, a, b = _on_grid(case)
    if rounding is not fs.Rounding.STOCHASTIC:
        random_bits = None
    sat = fs.Overflow.SATURATE
    if _fixed_invalid("add", [a, b], fmt, sat):
        return
    got, s = fs.add(a, b, fmt, rounding, sat, seed=seed, random_bits=random_bits, stats=True)
    exp = expected("add", [a, b], fmt, rounding, sat, seed, random_bits)
    assert_same_bits(got, exp, f"{fmt} {rounding}")
    fa._GRID_ADD = False
    try:
        gen, sg = fs.add(a, b, fmt, rounding, sat, seed=seed, random_bits=random_bits,
                         stats=True)
    finally:
        fa._GRID_ADD = True
    assert_same_bits(got, gen, f"{fmt} {rounding}")
    assert s == sg


def test_grid_aligned_sum_decisions():
    """Q<8,2> (quantum 1/4): 1/8 beyond a grid value is a tie, broken per mode from the
    parity and the sign of the lower neighbour; the range saturates and counts an overflow."""
    fmt = fs.FixedFormat(8, 2)
    a = np.array([0.25, 0.5, -0.25, -0.5, 31.75, -32.0])
    b = np.array([0.125, 0.125, -0.125, -0.125, 0.125, -0.125])
    want = {"nearest_even": [0.5, 0.5, -0.5, -0.5, 31.75, -32.0],
            "nearest_away": [0.5, 0.75, -0.5, -0.75, 31.75, -32.0],
            "toward_zero": [0.25, 0.5, -0.25, -0.5, 31.75, -32.0],
            "down": [0.25, 0.5, -0.5, -0.75, 31.75, -32.0],
            "up": [0.5, 0.75, -0.25, -0.5, 31.75, -32.0],
            "odd": [0.25, 0.75, -0.25, -0.75, 31.75, -32.0]}
    for mode, w in want.items():
        y, s = fs.add(a, b, fmt, mode, stats=True)
        assert_same_bits(y, np.array(w, np.float32), mode)
        assert s.inexact == 6
    y, s = fs.add(a, b, fmt, "up", stats=True)
    assert s.overflow == 1 and s.rounded_up == 5  # 31.875 rounds up to 32: saturates to 31.75


@pytest.mark.parametrize("fmt", [fs.FixedFormat(16, 14), fs.FixedFormat(8, 2)])
def test_grid_sums_below_one_quantum_decided_on_the_grid(fmt):
    """``x`` on the grid, ``y = -a q`` with ``0 < a < 1`` whose ``1 - a`` float64 cannot hold
    (an optimizer's step below one quantum): the grid kernel decides every mode itself (``ok``,
    no general path), from TwoSum's exact ``phi`` or, for stochastic rounding, from ``a``;
    values and counts as the oracle's with the same draws. Around the midpoint (``a`` just
    below 1/2: ``phi`` rounds to 1/2), near a whole quantum (``phi`` rounds to 1) and far
    below it."""
    from fixedsim.jit import arith as _ka

    q = fmt.ulp
    xs = [0.0, q, -q, 5 * q, -6 * q, fmt.max, fmt.min]
    As = [0.5 - 2.0**-54, 0.25 + 2.0**-54, 0.125 + 2.0**-55, 0.3, 2.0**-60, 2.0**-1000]
    x = np.array([v for v in xs for _ in As])
    y = np.array([-a * q for _ in xs for a in As])
    assert all(1.0 - a != Fraction(1) - Fraction(a) for a in As)  # none exact in float64
    up, down, cmax, cmin = 2.0**fmt.frac_length, q, fmt.max / q, fmt.min / q
    for rounding in fs.Rounding:
        for i in range(x.size):
            ok = _ka._grid_add_one(x[i], y[i], int(rounding), up, down, cmax, cmin, 64,
                                   np.uint64(7), np.uint64(i))[1]
            assert ok == 1, (rounding, x[i], y[i])
        for seed in (0, 1, 2) if rounding is fs.Rounding.STOCHASTIC else (None,):
            got, s = fs.add(x, y, fmt, rounding, seed=seed, stats=True)
            exp = expected("add", [x, y], fmt, rounding, fs.Overflow.SATURATE, seed, None)
            assert_same_bits(got, exp, f"{fmt} {rounding} {seed}")
            assert s.inexact == x.size


def test_kernels_write_float64():
    """The elementwise kernels write float64 whatever the format's container (one compiled
    signature each); a format held in float32 gets the oracle's bits back."""
    from fixedsim.jit import arith as _ka

    x = np.array([1.5, -0.375, 3.25, 0.0, -2.0, 100.0])
    y = np.array([0.0078125, 0.3, -1e-3, -0.0, 2.0**-20, 7.0])
    for fmt in (fs.FixedFormat(16, 8), fs.FixedFormat(40, 8), fs.FP16, fs.FloatFormat(11, 40)):
        for op in ("add", "mul"):
            for rounding in (fs.Rounding.NEAREST_EVEN, fs.Rounding.STOCHASTIC):
                operands = (x, y)  # x on every grid here: add takes the grid kernel
                got = call(op, operands, fmt, rounding, None, seed=5)
                want = expected(op, operands, fmt, rounding, None, 5, None)
                assert_same_bits(got, want, f"{op} {fmt} {rounding}")
    for kernel, out in ((_ka.arith, 4), (_ka.add_fixed_grid, 2)):
        assert all(str(sig[out].dtype) == "float64" for sig in kernel.signatures), \
            kernel.signatures
