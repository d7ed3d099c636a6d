"""Block-scaled formats (MX, NVFP4): the fast path equals the Fraction oracle bit for bit.

The oracle is :func:`fixedsim.reference.block_quantize` (exact amax, exact scale rule, one
:func:`~fixedsim.reference.round_to_format` of each ``x / S``). Blocks are drawn to be
adversarial: the block maximum at and next to a power of two, element midpoints and their float
neighbours, zeros of both signs, NaN and infinities, scales at the ends of E8M0's range, and
subnormal elements; every rounding mode, stochastic included (the kernels' draws replayed into
the oracle).
"""

import math

import numpy as np
import pytest
from helpers import assert_same_bits, block_oracle
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.blockformats import POW2_RULES, BlockFormat
from fixedsim.blockquant import BlockCodes
from fixedsim.testing import block_arrays, block_formats

PRESETS = {"MXFP8_E4M3": fs.MXFP8_E4M3, "MXFP8_E5M2": fs.MXFP8_E5M2,
           "MXFP6_E2M3": fs.MXFP6_E2M3, "MXFP6_E3M2": fs.MXFP6_E3M2, "MXFP4": fs.MXFP4,
           "MXINT8": fs.MXINT8, "NVFP4": fs.NVFP4}
ELEMENTS = [fs.FP8_E4M3, fs.FP8_E5M2, fs.FP6_E2M3, fs.FP6_E3M2, fs.FP4_E2M1,
            fs.FixedFormat(8, 6), fs.FP16]
DETERMINISTIC = [r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]


def oracle(x, fmt, rounding, seed=None, random_bits=None, axis=None):
    """The oracle's values, with the kernels' draws when ``rounding`` is stochastic."""
    return block_oracle(x, fmt, rounding, seed, random_bits, axis)


@settings(max_examples=60)
@given(st.data())
def test_fast_path_equals_oracle(data):
    """Every rule, element, rounding (deterministic) and input width (float32: the fused kernel
    of fixedsim.jit.quant_block; float64: the element kernels): the same bits."""
    fmt = data.draw(block_formats())
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = data.draw(block_arrays(fmt, dtype=dtype, specials=fmt.scale.has_nan))
    rounding = data.draw(st.sampled_from(DETERMINISTIC))
    assert_same_bits(fs.quantize(x, fmt, rounding), oracle(x, fmt, rounding)[0],
                     f"{fmt!r} {rounding!r}")


@settings(max_examples=30)
@given(st.data())
def test_stochastic_equals_oracle(data):
    """STOCHASTIC: the draws of a seed, replayed in the oracle, give the same bits (float32
    input: the fused kernel); NVFP4-like formats with few random bits take the fast path
    (quotient rounded to odd)."""
    fmt = data.draw(block_formats())
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    x = data.draw(block_arrays(fmt, dtype=dtype, specials=False))
    seed = data.draw(st.integers(0, 2**32))
    rbits = data.draw(st.sampled_from([None, 1, 8, 40]))
    assert_same_bits(fs.quantize(x, fmt, "stochastic", seed=seed, random_bits=rbits),
                     oracle(x, fmt, "stochastic", seed, rbits)[0], f"{fmt!r} bits {rbits}")


@pytest.mark.parametrize("name", PRESETS)
@settings(max_examples=8)
@given(data=st.data())
def test_presets_equal_oracle(name, data):
    """The presets, blocks of 32 (16), float32 input, every deterministic mode."""
    fmt = PRESETS[name]
    x = data.draw(block_arrays(fmt, nblocks=2, dtype=np.float32)).reshape(2, -1)
    for rounding in DETERMINISTIC:
        assert_same_bits(fs.quantize(x, fmt, rounding), oracle(x, fmt, rounding)[0],
                         f"{name} {rounding!r}")


def test_axis_and_shapes():
    """Blocks along another axis: the same as moving that axis last; draws by the blocked
    layout's flat index."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 3, 4)) * 10.0 ** rng.integers(-5, 5, (8, 3, 4))
    fmt = BlockFormat(fs.FP4_E2M1, block=4)
    got = fs.quantize(x, fmt, axis=0)
    want = np.moveaxis(fs.quantize(np.moveaxis(x, 0, -1), fmt), -1, 0)
    assert_same_bits(got, want)
    assert_same_bits(got, oracle(x, fmt, "nearest_even", axis=0)[0])
    sr = fs.quantize(x, fmt, "stochastic", seed=5, axis=0)
    assert_same_bits(sr, oracle(x, fmt, "stochastic", 5, axis=0)[0])
    assert_same_bits(fs.quantize(x, BlockFormat(fs.FP4_E2M1, block=4, axis=0)), got)
    y = rng.standard_normal((64, 3)).astype(np.float32)  # codes, blocks along axis 0
    for name, fmt in PRESETS.items():
        c = fs.to_bits(y, fmt, axis=0)
        assert c.scales.shape == (64 // fmt.block, 3), name
        assert_same_bits(fs.from_bits(c, fmt, axis=0), fs.quantize(y, fmt, axis=0), name)


def test_worked_example_957():
    """microxcaling issue 4: 957 in MXFP8_E4M3 is 896 under the OCP floor scale (957/2 rounds
    to 480 > 448, clamped), 960 under rceil (scale 4, 957/4 = 239.25 -> 240)."""
    x = np.array([957.0] + [1.0] * 31)
    assert fs.quantize(x, fs.MXFP8_E4M3)[0] == 896.0
    for rule, scale, val in (("ocp", 2, 896.0), ("ceil", 4, 960.0), ("even", 2, 896.0),
                             ("rceil", 4, 960.0)):
        fmt = BlockFormat(fs.FP8_E4M3, scale_rule=rule)
        assert reference.block_scale(957, fmt) == scale
        assert fs.quantize(x, fmt)[0] == val
    # "even" rounds amax to E4M3's 4 significant bits first (957 -> 960 keeps floor's scale
    # 2): 900 -> 896 keeps it, 1000 -> 1024 doubles it
    for amax, k in ((900, 1), (1000, 2)):
        assert reference.block_scale(amax, BlockFormat(fs.FP8_E4M3, scale_rule="even")) == 2**k


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adversarial_blocks(dtype):
    """All zero, NaN and infinity in a block, maxima around powers of two, E8M0 underflow
    (scale 2**-127 and elements below it), subnormal elements: fast path == oracle."""
    tiny = np.finfo(dtype).smallest_subnormal

    def up(v, n=1):  # n steps of dtype's own nextafter
        v = dtype(v)
        for _ in range(abs(n)):
            v = np.nextafter(v, dtype(np.inf if n > 0 else -np.inf))
        return v

    rows = [
        [0.0, -0.0, 0.0, 0.0],
        [1.0, np.nan, 2.0, 3.0],
        [1.0, -np.inf, 2.0, 3.0],
        [4.0, up(4.0, -1), 1e-3, -2.0],
        [up(4.0), 4.0, -0.5, 0.25],
        [-up(4.0, 2), 3.0, -0.5, 0.25],
        [up(448.0), 1.0, up(6.0), -up(7.5)],  # just above the elements' max * 2**k
        [up(57344.0, -1), 28.0, up(28.0), 1.0],
        [tiny, -tiny, 3 * tiny, 0.0],
        [2.0**-125, 2.0**-130, -(2.0**-127), 2.0**-140],
        [6.0, 0.75, 0.25, 1.0 / 8],
    ]
    if dtype == np.float64:
        rows.append([2.0**-1074, -(2.0**-1060), 2.0**-1000, 0.0])
        rows.append([2.0**100, 2.0**-1074, -(2.0**-1000), -0.0])  # x / S below float64's
    x = np.array(rows, dtype)
    for fmt in [BlockFormat(el, block=4, scale_rule=r) for el in ELEMENTS for r in POW2_RULES]:
        for rounding in fs.Rounding:
            got = fs.quantize(x, fmt, rounding, seed=3)
            assert_same_bits(got, oracle(x, fmt, rounding, 3)[0], f"{fmt!r} {rounding!r}")
    assert np.isnan(fs.quantize(x, fs.MXFP4.__class__(fs.FP4_E2M1, block=4))[1:3]).all()
    z = fs.quantize(np.zeros(32), fs.MXFP4)
    assert not z.any() and fs.to_bits(np.zeros(32), fs.MXFP4).scales[0] == 0  # 2**-127


def test_float32_max_rounds_to_2_128():
    """float32's largest value: "rceil" and "ceil" scales make the element round up to
    2**128, one past float32's range, which the fused kernel writes as the float64 2**128."""
    fmax = float(np.finfo(np.float32).max)
    x = np.array([fmax, -fmax, 1.0, fmax / 2], np.float32)
    for el in ELEMENTS[:5]:
        for rule in POW2_RULES:
            fmt = BlockFormat(el, block=4, scale_rule=rule)
            for rounding in fs.Rounding:
                assert_same_bits(fs.quantize(x, fmt, rounding, seed=1),
                                 oracle(x, fmt, rounding, 1)[0], f"{fmt!r} {rounding!r}")
    assert fs.quantize(x, BlockFormat(fs.FP8_E4M3, block=4, scale_rule="rceil"))[0] == 2.0**128


def test_mx_nan_block_and_mxint8():
    """A NaN or an infinity makes the block's scale NaN (E8M0 0xFF) and every value NaN, for
    MXINT8 and MXFP4 too (their elements have no NaN); other blocks are untouched."""
    x = np.array([1.0] * 31 + [np.nan] + [0.5] * 32)
    for fmt in (fs.MXINT8, fs.MXFP4, fs.MXFP8_E4M3):
        v = fs.quantize(x, fmt)
        assert np.isnan(v[:32]).all() and (v[32:] == 0.5).all()
        codes = fs.to_bits(x, fmt)
        assert list(codes.scales) == [0xFF, 127 - 1 - fmt.element_emax]
        assert_same_bits(fs.from_bits(codes, fmt), v)


def test_nvfp4_two_level():
    """NVFP4: tensor scale amax/(6*448) in FP32, block scale amax_b/(6 t) in E4M3 (nearest
    even), elements x/(s t) in E2M1, saturating."""
    x = np.arange(32.0).reshape(2, 16)
    v, e, s, t = reference.block_quantize(x, fs.NVFP4)
    assert t == reference.round_to_format(31 / 2688, fs.FP32)
    assert float(s[1, 0]) == 448.0 and float(s[0, 0]) == 224.0
    assert_same_bits(fs.quantize(x, fs.NVFP4), v)
    codes = fs.to_bits(x, fs.NVFP4)
    assert codes.tensor_scale == reference.encode(float(t), fs.FP32)
    assert_same_bits(fs.from_bits(codes, fs.NVFP4), v)
    y = x.copy()
    y[0, 3] = np.nan  # a NaN block: E4M3's NaN scale (0x7f); the tensor scale is unchanged
    c = fs.to_bits(y, fs.NVFP4)
    assert c.scales.ravel().tolist() == [0x7F, codes.scales[1, 0]]
    assert c.tensor_scale == codes.tensor_scale
    assert np.isnan(fs.quantize(y, fs.NVFP4)[0]).all()
    for rounding in fs.Rounding:  # a block with tiny values: scale raised to E4M3's smallest
        y = np.array([1e6] + [1e-3] * 15 + [2.0**-20] * 16)
        rb = 8 if rounding is fs.Rounding.STOCHASTIC else None
        assert_same_bits(fs.quantize(y, fs.NVFP4, rounding, seed=1, random_bits=rb),
                         oracle(y, fs.NVFP4, rounding, 1, rb)[0])


@pytest.mark.parametrize("name", PRESETS)
def test_codes_round_trip(name):
    """from_bits(to_bits(x)) == quantize(x), packed and unpacked; to_bits of quantized values
    of a power-of-two rule gives them back (quantize is idempotent there)."""
    fmt = PRESETS[name]
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 64)) * 2.0 ** rng.integers(-30, 30, (3, 1))).astype(np.float32)
    q = fs.quantize(x, fmt)
    for packed in (True, False):
        codes = fs.to_bits(x, fmt, packed=packed)
        assert isinstance(codes, BlockCodes)
        assert codes.scales.shape == (3, 64 // fmt.block)
        assert_same_bits(fs.from_bits(codes, fmt, packed=packed), q)
    if fmt.scale_rule == "ocp" and isinstance(fmt.element, fs.FloatFormat):
        assert_same_bits(fs.quantize(q, fmt), q)


def test_mxint8_minus_two():
    """MXINT8's element -2.0 (code 0x80): a block whose largest magnitude is negative and just
    below 2**(k+1) rounds to -2 * 2**k, whose floor(log2) is one more: quantizing again doubles
    the scale (OCP quantize is not idempotent there; float elements are symmetric)."""
    x = np.array([-1.999] + [0.25] * 31)
    q = fs.quantize(x, fs.MXINT8)
    assert q[0] == -2.0 and fs.to_bits(x, fs.MXINT8).scales[0] == 127
    assert fs.to_bits(q, fs.MXINT8).scales[0] == 128


def test_packing_layout():
    """FP4: two codes per byte, the first in the low nibble; FP6: four per three bytes,
    little-endian 24-bit word, the first in the low 6 bits."""
    x = np.array([0.5, 1.0, -6.0, 0.0] + [0.0] * 28)  # scale 2**(2-2) = 1
    c = fs.to_bits(x, fs.MXFP4)
    assert c.scales[0] == 127 and list(c.elements[:2]) == [0x21, 0x0F]
    u = fs.to_bits(x, fs.MXFP4, packed=False).elements
    assert list(u[:4]) == [0x1, 0x2, 0xF, 0x0]
    c6 = fs.to_bits(x, fs.MXFP6_E3M2).elements
    u6 = fs.to_bits(x, fs.MXFP6_E3M2, packed=False).elements
    word = int(c6[0]) | int(c6[1]) << 8 | int(c6[2]) << 16
    assert [(word >> (6 * j)) & 0x3F for j in range(4)] == list(u6[:4])


def test_errors():
    x = np.ones(32)
    with pytest.raises(ValueError, match="block length 32 .* must divide"):
        fs.quantize(np.ones(30), fs.MXFP4)
    with pytest.raises(ValueError, match="overflow=.*WRAP.*does not apply"):
        fs.quantize(x, fs.MXINT8, overflow="wrap")
    with pytest.raises(ValueError, match="does not apply"):
        fs.quantize(x, fs.MXFP8_E5M2, overflow="infinity")
    with pytest.raises(ValueError, match="beyond E8M0's largest power of two"):
        fs.quantize(np.full(32, 1e300), fs.MXFP8_E4M3)
    with pytest.raises(ValueError, match="beyond FP32's largest"):
        fs.quantize(np.full(16, 1e300), fs.NVFP4)
    with pytest.raises(ValueError, match="no NaN"):
        fs.quantize([np.nan, 1.0], BlockFormat(fs.FP4_E2M1, block=2,
                                               scale=fs.FloatFormat(3, 2, inf_nan="none")))
    with pytest.raises(ValueError, match="stats is not available"):
        fs.quantize(x, fs.MXFP4, stats=True)
    with pytest.raises(ValueError, match="out must be a writeable C-contiguous float64"):
        fs.quantize(x, fs.MXFP4, out=np.empty(32, np.float32))
    with pytest.raises(ValueError, match="axis applies to block formats only"):
        fs.quantize(x, fs.FP16, axis=0)
    with pytest.raises(ValueError, match="out of range"):
        fs.quantize(x, fs.MXFP4, axis=1)
    with pytest.raises(ValueError, match="multiple of 2"):
        fs.to_bits(np.ones(3), BlockFormat(fs.FP4_E2M1, block=1))
    with pytest.raises(TypeError, match="apply to block formats only"):
        fs.to_bits(x, fs.FP16, packed=False)
    with pytest.raises(ValueError, match="scale_rule must be one of"):
        BlockFormat(fs.FP4_E2M1, scale_rule="floor")
    with pytest.raises(ValueError, match="tensor_scale needs scale_rule='nearest'"):
        BlockFormat(fs.FP4_E2M1, tensor_scale=fs.FP32)
    with pytest.raises(TypeError, match="scale must be a FloatFormat"):
        BlockFormat(fs.FP4_E2M1, scale=fs.FixedFormat(8, 0))
    with pytest.raises(ValueError, match="block must be an int"):
        BlockFormat(fs.FP4_E2M1, block=0)
    with pytest.raises(ValueError, match="do not match blocks"):
        fs.from_bits((np.zeros(16, np.uint8), np.zeros(2, np.uint8)), fs.MXFP4)


def test_presets_fields():
    """The presets are what OCP MX v1.0 and NVIDIA's NVFP4 define."""
    for name, el in (("MXFP8_E4M3", fs.FP8_E4M3), ("MXFP8_E5M2", fs.FP8_E5M2),
                     ("MXFP6_E2M3", fs.FP6_E2M3), ("MXFP6_E3M2", fs.FP6_E3M2),
                     ("MXFP4", fs.FP4_E2M1), ("MXINT8", fs.FixedFormat(8, 6))):
        f = PRESETS[name]
        assert (f.element, f.block, f.scale, f.scale_rule, f.tensor_scale) == (
            el, 32, fs.E8M0, "ocp", None)
    assert fs.MXINT8.element.max == 127 / 64 and fs.MXINT8.element.min == -2.0
    assert fs.MXINT8.element_emax == 0
    assert (fs.NVFP4.element, fs.NVFP4.block, fs.NVFP4.scale, fs.NVFP4.tensor_scale) == (
        fs.FP4_E2M1, 16, fs.FP8_E4M3, fs.FP32)


def test_out():
    """out= (float64, the shape of x) gets the same bits, on the fused path (float32, last
    axis), another axis and the float64 path."""
    rng = np.random.default_rng(4)
    for x, axis in ((rng.standard_normal((4, 64)).astype(np.float32), None),
                    (rng.standard_normal((64, 4)).astype(np.float32), 0),
                    (rng.standard_normal((4, 64)), None)):
        out = np.full(x.shape, np.nan)
        got = fs.quantize(x, fs.MXFP4, "stochastic", seed=2, axis=axis, out=out)
        assert got is out
        assert_same_bits(out, fs.quantize(x, fs.MXFP4, "stochastic", seed=2, axis=axis))


def test_threads_do_not_change_bits():
    """The fused kernel splits blocks across threads; draws are by element index: 1 thread and
    all threads give the same bits, stochastic included."""
    import numba

    rng = np.random.default_rng(11)
    x = (rng.standard_normal(64 * 300) * 2.0 ** rng.integers(-20, 20, 64 * 300)).astype(
        np.float32)
    runs = []
    old = numba.get_num_threads()
    try:
        for t in (1, old):
            numba.set_num_threads(t)
            runs.append([fs.quantize(x, f, r, seed=9) for f in (fs.MXFP4, fs.MXFP8_E4M3)
                         for r in ("nearest_even", "stochastic")])
    finally:
        numba.set_num_threads(old)
    for a, b in zip(*runs, strict=True):
        assert_same_bits(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_rule_stochastic_all_bits(dtype):
    """NVFP4-style scales (not powers of two) under STOCHASTIC with more random bits than the
    odd quotient holds (the default 64, 52): the fraction's bits by long division of the
    significands, the same bits as the oracle's."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((8, 64)) * 2.0 ** rng.integers(-30, 30, (8, 1))).astype(dtype)
    x[0, :5] = [0.0, -0.0, 1e-30, -1e-30, 3.0]
    e4m3 = BlockFormat(fs.FP8_E4M3, block=8, scale=fs.FP8_E4M3, scale_rule="nearest",
                       tensor_scale=fs.FP32)
    for fmt in (fs.NVFP4, e4m3):
        for rb in (None, 52, 49):
            assert_same_bits(fs.quantize(x, fmt, "stochastic", seed=3, random_bits=rb),
                             oracle(x, fmt, "stochastic", 3, rb)[0], f"{fmt!r} {rb}")


def test_sr_exact_threshold():
    """The long division gives every one of the 64 fraction bits: with the draw at the exact
    threshold floor(frac * 2**64) the quotient rounds down, one below it rounds up."""
    from fractions import Fraction

    from fixedsim.blockquant import _div_odd, _sr_exact

    rng = np.random.default_rng(13)
    a = (rng.standard_normal(400) * 2.0 ** rng.integers(-20, 20, 400)).astype(np.float32)
    a = a.astype(np.float64)
    s = fs.quantize(rng.uniform(2.0**-9, 448, 400), fs.FP8_E4M3).astype(np.float64)
    S = s * float(np.float32(rng.uniform(1e-3, 1e3)))  # E4M3 times FP32: exact
    q = _div_odd(a, S)
    el = fs.FP4_E2M1
    thresholds, lows, highs = [], [], []
    for ai, si in zip(a.tolist(), S.tolist(), strict=True):
        u = abs(Fraction(ai) / Fraction(si))
        lo_, hi_ = reference.neighbours(u, el)
        frac = (u - lo_) / (hi_ - lo_) if hi_ != lo_ else Fraction(0)
        thresholds.append(math.floor(frac * 2**64))
        lows.append(math.copysign(min(float(lo_), el.max), ai))
        highs.append(math.copysign(min(float(hi_), el.max), ai))
    t = np.array(thresholds, dtype=np.uint64)
    got_lo, ok = _sr_exact(a, S, q, el, t, 64)
    assert ok.all()
    np.testing.assert_array_equal(np.abs(got_lo), np.abs(lows))
    has = t > 0
    got_hi, _ = _sr_exact(a, S, q, el, t - has.astype(np.uint64), 64)
    np.testing.assert_array_equal(np.abs(got_hi[has]), np.abs(np.array(highs)[has]))


def test_fused_kernel_equals_float64_path():
    """The same float32 values through the fused float32 kernel and through the float64 path
    (element kernels on x * 2**-k): the same bits, every float element, rule and mode, on
    blocks spread over float32's exponent range (subnormals, maxima one ulp above powers of
    two). A larger run of this comparison (35.8 M values) is in docs/block_formats.md."""
    rng = np.random.default_rng(5)
    n = 32 * 100
    e = rng.integers(-150, 128, n // 32).repeat(32) - rng.integers(0, 30, n)
    with np.errstate(over="ignore"):
        x = (rng.standard_normal(n) * np.exp2(e.astype(float))).astype(np.float32)
        x[::97] = np.nextafter(np.exp2(rng.integers(-140, 120, x[::97].size)).astype(np.float32),
                               np.float32(np.inf))
    for el in ELEMENTS[:5]:
        for rule in POW2_RULES:
            fmt = BlockFormat(el, scale_rule=rule)
            for rounding in ("nearest_even", "up", "stochastic"):  # all seven in the docs' run
                assert_same_bits(fs.quantize(x, fmt, rounding, seed=7),
                                 fs.quantize(x.astype(np.float64), fmt, rounding, seed=7),
                                 f"{fmt!r} {rounding!r}")


def test_zero_blocks_in_the_fused_kernel(monkeypatch):
    """All-zero blocks (the zero-padded rows of a lowered product) are decided by the fused
    kernel, not by the oracle per element: their zeros, signs kept, at the smallest scale,
    as the oracle gives them, and their scale code is the smallest."""
    x = np.zeros((3, 64), np.float32)
    x[1, 32:] = -0.0
    x[2, :32] = 3.0
    want = {f: reference.block_quantize(x.astype(np.float64), f)[0]
            for f in (fs.MXFP8_E4M3, fs.MXFP4)}

    def oracle_called(*args, **kw):
        raise AssertionError("a zero block went to the oracle")

    monkeypatch.setattr(reference, "round_to_format", oracle_called)
    for fmt in (fs.MXFP8_E4M3, fs.MXFP4):
        got = fs.quantize(x, fmt)
        assert_same_bits(got, want[fmt])
        assert np.signbit(got[1, 32:]).all() and not np.signbit(got[0]).any()
        assert fs.to_bits(x, fmt).scales[0, 0] == 0  # E8M0 code 0: 2**-127
