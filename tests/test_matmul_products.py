"""The rounded_products row (fixedsim.matmul.products): products rounded into spec.product,
any accumulator, against the general kernel (bits and counts) and the Fraction oracle (bits).

``fs.matmul(..., path="rounded_products")`` runs the row, ``path="general"`` the general
kernel; :func:`product` builds what a row sees, for the tests of ``declines`` and of the
kernel's choices.
"""

import types

import numba
import numpy as np
import pytest
from helpers import assert_same_bits, ref_draw
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit import gemm_products as gp
from fixedsim.matmul import core
from fixedsim.matmul import products as rp

R = fs.Rounding
Q8_4, Q12_6, Q16_8, Q32_16 = (fs.FixedFormat(8, 4), fs.FixedFormat(12, 6),
                              fs.FixedFormat(16, 8), fs.FixedFormat(32, 16))
UQ8_2 = fs.FixedFormat(8, 2, signed=False)
FP16_FTZ = fs.FloatFormat(5, 10, subnormals=False)
PRODUCT_FORMATS = [fs.FP16, fs.BF16, fs.FP8_E4M3, fs.FP8_E5M2, fs.TF32, fs.FP32, FP16_FTZ,
                   Q8_4, Q12_6, UQ8_2, Q16_8]
INPUT_FORMATS = [fs.FP16, fs.BF16, fs.FP8_E4M3, Q8_4, Q16_8]
FLOAT_ACC = [fs.FP32, fs.FP16, fs.BF16, fs.FP8_E4M3, FP16_FTZ]
FIXED_ACC = [Q16_8, Q32_16, fs.FixedFormat(12, 3), fs.FixedFormat(16, 12, signed=False)]


@pytest.fixture(autouse=True)
def one_thread():
    """One Numba thread: these products are tiny, and on a loaded machine each parallel
    launch can wait milliseconds for a second CPU (2 threads made the oracle test 10x slower).
    The bits do not depend on the thread count: a test below checks that."""
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(threads)


def product(a, b, spec, seed=3, stats="steps"):
    """What a row of the path table sees for ``matmul(a, b, spec)``: the quantized operands,
    their scans, the stage keys, the random bits and a fresh Counters. (Once the row is in the
    table: ``fs.matmul(a, b, spec, path="rounded_products")`` against ``path="general"``.)"""
    spec, keys, rb, c = core._setup("matmul", spec, seed, stats)
    a, b = core._check_operands(a, b)
    A = core._quantize_input(a, spec.input, spec.input_rounding, rb, keys[0], c.input)
    B = core._quantize_input(b, spec.input, spec.input_rounding, rb, keys[1], c.input)
    return types.SimpleNamespace(A=A, B=B, spec=spec, ba=core._Bits.of(A), bb=core._Bits.of(B),
                                 keys=keys, rb=rb, c=c)


def check(a, b, spec, seed=3, oracle=True):
    """The row's bits equal the general kernel's and the oracle's, its counts (every stage,
    per-step events included) the general kernel's, and its bits are the same when nothing
    reads the counts. Returns the row's ``Counters.paths``."""
    assert rp.declines(product(a, b, spec, seed)) is None, rp.declines(product(a, b, spec, seed))
    try:
        want, cw = fs.matmul(a, b, spec, seed=seed, stats="steps", path="general")
    except ValueError as err:  # an infinity into a wrapping fixed-point format: both raise
        with pytest.raises(ValueError, match=str(err)[:40]):
            fs.matmul(a, b, spec, seed=seed, path=rp.NAME)
        return None
    got, c = fs.matmul(a, b, spec, seed=seed, stats="steps", path=rp.NAME)
    assert got.dtype == want.dtype == spec.result_format.dtype
    assert_same_bits(got.astype(np.float64), want.astype(np.float64), err_msg=repr(spec))
    for stage in ("input", "product", "accumulator", "output"):
        assert getattr(c, stage) == getattr(cw, stage), (stage, spec)
    unread = fs.matmul(a, b, spec, seed=seed, path=rp.NAME)
    assert_same_bits(unread.astype(np.float64), want.astype(np.float64))
    if oracle:
        ref = reference.matmul(a, b, spec, draw=ref_draw(spec, seed))
        assert_same_bits(got.astype(np.float64), ref, err_msg=repr(spec), nan_sign=False)
    return c.paths


# -- strategies -----------------------------------------------------------------------------------
@st.composite
def matrices(draw, max_k=12):
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(0, max_k)), draw(st.integers(1, 3))
    scale = draw(st.sampled_from([1.0, 16.0, 2.0**-6, 300.0]))
    elems = st.one_of(
        st.floats(-4.0, 4.0, allow_nan=False, allow_infinity=False).map(lambda v: v * scale),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.5, 0.5 + 2.0**-10, -(1 + 2.0**-7), 2.0**-20,
                         3.0 * 2.0**-14, 448.0, -240.0]))

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c)),
                        dtype=np.float64).reshape(r, c)

    return mat(m, k), mat(k, n)


@st.composite
def accumulators(draw):
    fixed = draw(st.booleans())
    fmt = draw(st.sampled_from(FIXED_ACC if fixed else FLOAT_ACC))
    rnd = draw(st.sampled_from(list(R)))
    ovf = draw(st.sampled_from([fs.Overflow.SATURATE, fs.Overflow.WRAP] if fixed
                               else [None, fs.Overflow.SATURATE]))
    rb = draw(st.sampled_from([None, 3])) if rnd is R.STOCHASTIC else None
    return fs.Accumulator(fmt, rnd, ovf, draw(st.sampled_from([1, 2, 3, 16])), random_bits=rb)


@st.composite
def specs(draw):
    prod_rnd = draw(st.sampled_from(list(R)))
    acc = draw(st.one_of(st.none(), accumulators()))
    out = draw(st.sampled_from([None, fs.FP16, fs.FP32, Q8_4, fs.FP8_E5M2]))
    out_rnd = draw(st.sampled_from(list(R))) if out is not None or acc is None else R.NEAREST_EVEN
    stoch = R.STOCHASTIC in (prod_rnd, out_rnd)
    return fs.MatmulSpec(input=draw(st.sampled_from(INPUT_FORMATS)),
                         product=draw(st.sampled_from(PRODUCT_FORMATS)),
                         product_rounding=prod_rnd, accumulator=acc, output=out,
                         output_rounding=out_rnd,
                         random_bits=draw(st.sampled_from([None, 1, 5])) if stoch else None)


@settings(max_examples=150, deadline=None)
@given(specs(), matrices(), st.integers(0, 3))
def test_every_product_format_rounding_and_accumulator(spec, ab, seed):
    """Every product format and rounding (stochastic included), exact or float or fixed-point
    accumulation in every mode, block and overflow rule, every output: bits as the general
    kernel and the oracle, counts as the general kernel."""
    p = product(*ab, spec, seed)
    why = rp.declines(p)
    if why is not None:  # only the fixed-point accumulator's bound may decline this data
        assert why.startswith("a fixed-point accumulator whose steps"), why
        assume(False)
    check(*ab, spec, seed)


# -- the kernel's roundings and accumulators, each reached ------------------------------------
def kinds(a, b, spec):
    p = product(a, b, spec)
    return (rp._product_stage(p.spec, p.ba, p.bb, p.rb)[0][gp.I_KIND],
            rp._acc_stage(p.spec, p.ba, p.bb, p.A.shape[1])[0][gp.I_KIND])


KIND_CASES = [  # (spec, product rounding, accumulator) the row runs it with
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16), gp.P_FLOAT_RNE,
     gp.A_FLOAT_RNE),
    (fs.MatmulSpec(input=fs.BF16, product=fs.BF16, accumulator=fs.FP32), gp.P_FLOAT_RNE,
     gp.A_F32_RNE),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, output=fs.FP16), gp.P_FLOAT_RNE, gp.A_EXACT),
    (fs.MatmulSpec(input=Q16_8, product=Q16_8,
                   accumulator=fs.Accumulator(Q32_16, overflow="saturate")),
     gp.P_FIXED_RNE, gp.A_FIXED_EXACT),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, product_rounding="stochastic",
                   accumulator=fs.FP32, seed=1), gp.P_FLOAT_SR, gp.A_F32_RNE),
    (fs.MatmulSpec(input=Q8_4, product=Q8_4, product_rounding="stochastic",
                   accumulator=fs.Accumulator(fs.FixedFormat(12, 2), "stochastic", "wrap"),
                   seed=2), gp.P_BITS, gp.A_FIXED),
    (fs.MatmulSpec(input=fs.FP16, product=FP16_FTZ, product_rounding="toward_zero",
                   accumulator=fs.Accumulator(fs.BF16, "down", block=4), output=fs.FP16),
     gp.P_BITS, gp.A_BITS),
]


@pytest.mark.parametrize("spec, pkind, akind", KIND_CASES, ids=lambda v: repr(v)[:60])
def test_each_rounding_and_accumulator_of_the_kernel(spec, pkind, akind):
    """Ordinary data reaches every product rounding and accumulator of the kernel; each gives
    the general kernel's bits and counts and the oracle's bits, without fallback."""
    rng = np.random.default_rng(int(pkind) * 10 + int(akind))
    a, b = rng.standard_normal((5, 33)) * 3, rng.standard_normal((33, 6)) * 3
    assert kinds(a, b, spec) == (pkind, akind)
    assert check(a, b, spec, seed=4) == {"rounded_products": 1}


@pytest.mark.parametrize("spec", [c[0] for c in KIND_CASES], ids=lambda v: repr(v)[:60])
def test_ordinary_data_needs_no_fallback(spec):
    """On normal data (64x200x48) no element goes to the general kernel."""
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((64, 200)), rng.standard_normal((200, 48))
    assert check(a, b, spec, oracle=False) == {"rounded_products": 1}


@pytest.mark.parametrize("spec, scale, psafe, asafe", [
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16), 1.0, 1, 1),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16), 300.0, 0, 1),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, output=fs.FP16), 1.0, 1, 1),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, product_rounding="stochastic",
                   accumulator=fs.Accumulator(fs.FP32, block=8), seed=1), 1.0, 1, 1),
    (fs.MatmulSpec(input=fs.BF16, product=fs.BF16, accumulator=fs.FP32), 2.0**-50, 1, 0),
    (fs.MatmulSpec(input=fs.FP32, product=fs.BF16, output=fs.FP32), 1.0, 1, 0)],
    ids=lambda v: repr(v)[:50])
def test_checks_proved_away_where_the_bounds_allow(spec, scale, psafe, asafe):
    """Uncounted, the kernel skips the product's overflow check when no product can reach the
    format's largest value, and TwoSum when every float64 sum is provably exact; each choice
    gives the general kernel's bits (``check`` runs the uncounted call too)."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((6, 300)) * scale
    a[0, :3] = [scale, 1.0, 2.0**-20]  # a wide spread in the row that is scaled
    b = rng.standard_normal((300, 4)) * max(scale, 1.0)
    p = product(a, b, spec)
    PI, _ = rp._product_stage(p.spec, p.ba, p.bb, p.rb)
    AI, _ = rp._acc_stage(p.spec, p.ba, p.bb, p.A.shape[1])
    assert (PI[gp.I_SAFE], AI[gp.I_SAFE]) == (psafe, asafe)
    check(a, b, spec, oracle=False)


# -- ties, ranges, zero signs -----------------------------------------------------------------
def midpoints(fmt):
    """Positive values halfway between neighbours of ``fmt`` (subnormal, normal and top
    binades, and above the largest value) and a little either side of each."""
    pos = [v for v in reference.values(fmt) if v > 0]
    idx = sorted(set(range(min(10, len(pos) - 1))) | set(range(0, len(pos) - 1,
                                                                 max(1, len(pos) // 16)))
                 | {len(pos) - 2})
    xs = []
    for i in idx:
        lo, hi = pos[i], pos[i + 1]
        mid, d = (lo + hi) / 2, (hi - lo) * 2.0**-30
        xs += [mid, mid + d, mid - d]
    q = pos[-1] - pos[-2]
    xs += [pos[-1] + q / 2, pos[-1] + q / 2 + q * 2.0**-30, pos[-1] + q / 2 - q * 2.0**-30,
           pos[-1] + q]
    return np.array(xs)


@pytest.mark.parametrize("fmt", [fs.FP16, fs.BF16, fs.FP8_E5M2, fs.FP8_E4M3, Q8_4, UQ8_2],
                         ids=repr)
def test_products_on_and_next_to_every_midpoint(fmt):
    """Products exactly halfway between two values of the product format and a little either
    side, of both signs, in the subnormal, normal and top binades and beyond the largest
    value: each rounding mode (K = 1: the result is the rounded product)."""
    a = midpoints(fmt)[:, None]
    b = np.array([[1.0, -1.0]])
    for mode in R:
        spec = fs.MatmulSpec(product=fmt, product_rounding=mode,
                             seed=5 if mode is R.STOCHASTIC else None,
                             random_bits=7 if mode is R.STOCHASTIC else None)
        check(a, b, spec)


def test_products_beyond_the_range():
    """FP16 products beyond 65504 overflow to infinity: those elements go to the general
    kernel (counted in paths), the others stay; into FP8 E4M3 (no infinities) and toward zero
    into FP16 they saturate in the row itself, counted as overflows."""
    a = np.array([[300.0, 1.0], [1.0, 2.0], [-300.0, 0.5]])
    b = np.array([[300.0, 1.0], [2.0, 3.0]])
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP32)
    assert check(a, b, spec) == {"rounded_products": 1, "rounded_products_general": 2}
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, product_rounding="toward_zero",
                         accumulator=fs.FP32)
    assert check(a, b, spec) == {"rounded_products": 1}
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP8_E4M3, accumulator=fs.FP16)
    assert check(a, b, spec) == {"rounded_products": 1}
    p = product(a, b, spec)
    rp.run(p)
    assert p.c.product.overflow == 2  # 300 * 300 and -300 * 300


def test_sums_not_exact_in_float64_fall_back():
    """BF16 products 2**-100 apart cannot be summed exactly in float64: those elements go to
    the general kernel, with the same bits and counts."""
    a = np.array([[2.0**60, 2.0**-60, 1.0], [1.0, 2.0, 3.0]])
    b = np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    for acc in (None, fs.BF16, fs.Accumulator(fs.FP32, block=3)):
        spec = fs.MatmulSpec(input=fs.BF16, product=fs.BF16, accumulator=acc, output=fs.FP32)
        paths = check(a, b, spec)
        assert paths["rounded_products_general"] == 2, (acc, paths)


@pytest.mark.parametrize("spec", [
    fs.MatmulSpec(input=fs.FixedFormat(20, 4), product=fs.FixedFormat(12, 10),
                  product_rounding="nearest_away",
                  accumulator=fs.Accumulator(fs.FixedFormat(24, 8), "nearest_away", "wrap",
                                             block=5)),
    fs.MatmulSpec(input=fs.FP16, product=fs.FP8_E4M3, accumulator=fs.FP32),
    fs.MatmulSpec(input=fs.FP16, product=fs.FP8_E4M3, output=fs.FP32)], ids=repr)
def test_saturated_products_are_on_the_coarse_grid_no_longer(spec):
    """Data on a grid coarser than the product format's (multiples of 2**4 and 2**8): the
    rounded products are multiples of it, but those that saturate take the format's largest
    value, a multiple of its own quantum only. The accumulator's grid, and the proof that
    float64 sums are exact, must allow for them (a regression: a fixed-point accumulator as
    fine as the data's grid skipped its rounding)."""
    rng = np.random.default_rng(12)
    a = np.round(rng.standard_normal((4, 300)) * 8) * 16
    b = np.round(rng.standard_normal((300, 3)) * 8) * 16
    p = product(a, b, spec)
    top, g = rp._product_top(p.spec, p.ba, p.bb)
    assert 2.0**-g <= (2.0**-10 if isinstance(spec.product, fs.FixedFormat) else 32.0)
    check(a, b, spec, oracle=False)


def test_an_accumulator_overflow_falls_back():
    """A running FP16 sum beyond 65504 (an infinity, nearest even) goes to the general
    kernel; saturating, it stays in the row."""
    a = np.full((2, 4), 250.0)
    b = np.full((4, 3), 100.0)
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16)
    assert check(a, b, spec)["rounded_products_general"] == 6
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16,
                         accumulator=fs.Accumulator(fs.FP16, overflow="saturate"))
    assert check(a, b, spec) == {"rounded_products": 1}


@pytest.mark.parametrize("acc", [None, fs.Accumulator(fs.FP16, "down"),
                                 fs.Accumulator(fs.BF16, "down", block=2),
                                 fs.Accumulator(fs.FP16, "up", block=3), fs.FP32],
                         ids=repr)
@pytest.mark.parametrize("out_rnd", ["down", "nearest_even"])
def test_signs_of_zero_sums(acc, out_rnd):
    """Exact zero sums: cancelling products, products that underflow to -0, products that
    are -0: the model's sign in every mode (DOWN: -0 unless every term is +0)."""
    t = 2.0**-13  # t * t underflows in FP16 products
    a = np.array([[1.0, -1.0, 0.0, 0.0], [-0.0, -0.0, -0.0, -0.0], [t, -t, 0.0, 0.0],
                  [-t, 0.0, 0.0, -0.0], [0.0, 0.0, 0.0, 0.0]])
    b = np.array([[1.0, -0.0, t], [1.0, 0.0, t], [-0.0, 1.0, t], [0.0, -1.0, t]])
    if acc is None:
        spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, output=fs.FP16,
                             output_rounding=out_rnd)
    elif out_rnd == "down":
        spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=acc, output=fs.FP32,
                             output_rounding=out_rnd)
    else:
        spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=acc)
    check(a, b, spec)
    check(a, b, fs.MatmulSpec(input=fs.FP16, product=Q8_4, accumulator=spec.accumulator,
                              output=spec.output, output_rounding=spec.output_rounding))


@pytest.mark.parametrize("rbits", [None, 1, 4, 20, 63])
def test_stochastic_products_and_accumulator_draws(rbits):
    """Stochastic products (draw o*K + k) into a stochastic FP16 accumulator with blocks
    (draw o*nblocks + t), random bits from 1 to 64: the general kernel's and the oracle's
    draws; another seed gives other bits."""
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((3, 14)), rng.standard_normal((14, 4))
    acc = fs.Accumulator(fs.FP16, "stochastic", block=3, random_bits=rbits)
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP8_E5M2, product_rounding="stochastic",
                         accumulator=acc, random_bits=rbits, seed=9)
    check(a, b, spec)
    spec = fs.MatmulSpec(input=fs.FP16, product=Q8_4, product_rounding="stochastic",
                         accumulator=fs.Accumulator(Q16_8, "stochastic", random_bits=rbits),
                         random_bits=rbits, seed=9)
    check(a, b, spec)
    x, y = rp.run(product(a, b, spec, seed=1)), rp.run(product(a, b, spec, seed=2))
    assert not np.array_equal(x, y)


@pytest.mark.parametrize("acc", [
    fs.Accumulator(Q16_8, "nearest_even", "wrap"),
    fs.Accumulator(fs.FixedFormat(10, 2), "nearest_away", "saturate", block=2),
    fs.Accumulator(fs.FixedFormat(10, 2), "odd", "wrap", block=3),
    fs.Accumulator(fs.FixedFormat(12, 4, signed=False), "up", block=1),
    fs.Accumulator(fs.FixedFormat(12, 12), "toward_zero", "wrap")], ids=repr)
def test_fixed_point_accumulators_saturate_wrap_and_round(acc):
    """Fixed-point accumulators coarser than the products (every step rounds), as fine
    (nothing rounds) or finer, saturating or wrapping at every step, unsigned too."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 21)) * 6, rng.standard_normal((21, 5)) * 6
    spec = fs.MatmulSpec(input=Q12_6, product=fs.FixedFormat(14, 6), accumulator=acc,
                         output=Q8_4)
    check(a, b, spec)
    check(a, b, fs.MatmulSpec(input=fs.FP8_E4M3, product=fs.FP8_E4M3, accumulator=acc))


def test_an_infinite_product_into_a_wrapping_accumulator_raises():
    """As in the general kernel: an infinity cannot wrap into a fixed-point format."""
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16,
                         accumulator=fs.Accumulator(Q32_16, overflow="wrap"))
    p = product(np.array([[300.0]]), np.array([[300.0]]), spec)
    assert rp.declines(p) is None
    with pytest.raises(ValueError, match="reached a fixed-point format"):
        rp.run(p)


@pytest.mark.parametrize("shape", [(3, 0, 4), (0, 5, 2), (2, 5, 0)])
@pytest.mark.parametrize("acc", [None, fs.FP16, Q16_8])
def test_empty_products(shape, acc):
    """K = 0 (every sum +0), no rows, no columns."""
    M, K, N = shape
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=acc,
                         output=fs.FP16 if acc is None else None)
    check(np.ones((M, K)), np.ones((K, N)), spec)


def test_bits_do_not_depend_on_the_thread_count():
    """Rows are split among threads; each row's draws and sums are its own."""
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((37, 50)), rng.standard_normal((50, 9))
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, product_rounding="stochastic",
                         accumulator=fs.Accumulator(fs.BF16, "stochastic", block=2), seed=3)
    numba.set_num_threads(1)  # (the fixture restores the count)
    one = rp.run(product(a, b, spec))
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    two = rp.run(product(a, b, spec))
    assert_same_bits(one, two)


def test_per_step_events_only_when_asked():
    """Without per-step events asked for, the kernel skips counting products and steps (the
    call reports them as None; the bits are the same); the output's events are counted when
    the counts are read."""
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((6, 30)), rng.standard_normal((30, 5))
    spec = fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16, output=fs.FP8_E4M3)
    x, steps = fs.matmul(a, b, spec, stats="steps", path=rp.NAME)
    y, plain = fs.matmul(a, b, spec, stats=True, path=rp.NAME)
    assert_same_bits(x, y)
    assert steps.product.inexact > 0 and steps.accumulator.inexact > 0
    assert plain.product.inexact is None and plain.accumulator.inexact is None
    assert plain.output == steps.output and plain.output.inexact > 0
    p = product(a, b, spec, stats=True)
    rp.run(p)
    assert p.c.product.inexact == p.c.accumulator.inexact == 0  # the kernel did not count


# -- where the row does not apply -------------------------------------------------------------
ONES = np.ones((2, 2))
DECLINE_CASES = [
    (fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP16), ONES, ONES, "products are exact"),
    (fs.MatmulSpec(product=fs.FP16), np.array([[np.inf, 1.0], [1.0, 1.0]]), ONES,
     "infinity or NaN"),
    (fs.MatmulSpec(product=fs.FP16), np.full((2, 2), 1.0 + 2.0**-40),
     np.full((2, 2), 1.0 + 2.0**-30), "not provably exact in float64"),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FixedFormat(60, 10)), ONES, ONES,
     "wider than 53 bits"),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP16,
                   accumulator=fs.Accumulator(fs.FP16, via=fs.FP32)), ONES, ONES,
     "via register"),
    (fs.MatmulSpec(input=fs.FP16, product=fs.FP32, accumulator=fs.FixedFormat(40, 2)),
     np.array([[2.0**-20, 1.0], [1.0, 1.0]]), ONES, "fixed-point accumulator whose steps"),
]


@pytest.mark.parametrize("spec, a, b, why", DECLINE_CASES, ids=[c[3] for c in DECLINE_CASES])
def test_declines_state_the_rule(spec, a, b, why):
    assert why in rp.declines(product(a, b, spec))


def test_declines_looks_at_k():
    p = product(np.ones((1, 2)), np.ones((2, 1)), fs.MatmulSpec(product=fs.FP16))
    p.A = types.SimpleNamespace(shape=(1, 2**31))
    assert rp.declines(p) == "K is 2**31 or more"


def test_the_table_runs_the_row():
    """The first row that applies to rounded products on ordinary data, counted by name."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 2))
    spec = fs.MatmulSpec(input=fs.BF16, product=fs.BF16)
    assert fs.explain(a, b, spec).path == rp.NAME == "rounded_products"
    assert fs.matmul(a, b, spec, stats=True)[1].paths == {rp.NAME: 1}
