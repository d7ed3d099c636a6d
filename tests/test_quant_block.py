"""The fused block kernel (fixedsim.jit.quant_block.mx_from_f32) against the Fraction oracle.

Float32 input into an MX-style format (power-of-two rule, E8M0 scale, a float element) takes
the fused kernel: each block's exponent from the input bits, then every element rounded at its
quantum in float64 arithmetic (nearest even by adding and subtracting ``1.5 * 2**(q + 52)``, the
other modes from ``floor`` and the exact fraction). These tests draw float32 blocks over the
whole of float32's range (maxima from the smallest subnormal to float32's largest value, where
a rounding up gives ``2**128``), signed zeros, NaN and infinities, element midpoints and their
neighbours, blocks along another axis, every rounding mode (stochastic seeded, with several
``random_bits``), and compare the values and codes with
:func:`fixedsim.reference.block_quantize` bit for bit.
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
from fixedsim.blockquant import _fused_applies

ELEMENTS = [fs.FP8_E4M3, fs.FP8_E5M2, fs.FP6_E2M3, fs.FP6_E3M2, fs.FP4_E2M1,
            fs.FixedFormat(8, 6)]  # the last: MXINT8's
F32_MAX = float(np.finfo(np.float32).max)


def oracle(x, fmt, rounding, seed=None, random_bits=None, axis=None):
    """The oracle's (values, scales), the kernel's draws replayed under STOCHASTIC."""
    v, _, s, _ = block_oracle(x.astype(np.float64), fmt, rounding, seed, random_bits, axis)
    return v, s


@st.composite
def f32_blocks(draw, block, nblocks):
    """``nblocks`` float32 blocks of ``block`` values, each around its own top exponent
    anywhere in float32's range (subnormal maxima included): its maximum at a power of two, one
    ulp from it, or float32's largest value; the others on a 1/128 grid below it (midpoints of
    the narrow elements) or far below (subnormal inputs), a few ulps off; signed zeros, NaN
    and infinities."""
    out = []
    for _ in range(nblocks):
        top = draw(st.integers(-149, 127))
        kind_block = draw(st.integers(0, 9))
        for j in range(block):
            kind = draw(st.integers(0, 14))
            if kind_block == 0:  # an all-zero block
                v = draw(st.sampled_from([0.0, -0.0]))
            elif kind == 0:
                v = draw(st.sampled_from([0.0, -0.0]))
            elif kind == 1:
                v = draw(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 0.0]))
            elif kind == 2 or j == 0:
                v = F32_MAX if top == 127 and draw(st.booleans()) else math.ldexp(1.0, top)
            elif kind == 3:  # far below the block maximum
                v = math.ldexp(1.0 + draw(st.integers(0, 127)) / 128,
                               top - draw(st.integers(13, 40)))
            else:
                v = math.ldexp(1.0 + draw(st.integers(0, 127)) / 128,
                               top - draw(st.integers(0, 12)))
            v = np.float32(v if draw(st.booleans()) else -v)  # below 2**-149: a zero
            for _ in range(draw(st.integers(0, 2)) if np.isfinite(v) else 0):
                with np.errstate(over="ignore"):  # float32's largest value steps to inf
                    v = np.nextafter(v, np.float32(draw(st.sampled_from([-np.inf, np.inf]))))
            out.append(v)
    return np.array(out, np.float32)


@st.composite
def cases(draw):
    el = draw(st.sampled_from(ELEMENTS))
    block = draw(st.sampled_from([1, 2, 3, 4, 8, 32]))
    fmt = BlockFormat(el, block=block, scale_rule=draw(st.sampled_from(POW2_RULES)))
    nblocks = draw(st.integers(1, 6 if block < 32 else 3))
    x = draw(f32_blocks(block, nblocks))
    rows = draw(st.integers(1, 2))
    if draw(st.booleans()):  # the blocks along axis 0 of a (n, rows) array
        x = np.ascontiguousarray(np.tile(x[:, None], (1, rows)))
        if rows == 2:
            x[:, 1] = -x[:, 1]
        axis = 0
    else:
        x = x.reshape(1, -1).repeat(rows, axis=0)
        axis = -1
    return fmt, x, axis


def _check(fmt, x, axis, rounding, seed=None, random_bits=None):
    assert _fused_applies(x, fmt)
    try:
        want, scales = oracle(x, fmt, rounding, seed, random_bits, axis)
    except ValueError:  # a scale beyond E8M0's 2**127 (MXINT8, float32's largest values)
        with pytest.raises(ValueError, match="beyond E8M0's largest power of two 2\\*\\*127"):
            fs.quantize(x, fmt, rounding, seed=seed, random_bits=random_bits, axis=axis)
        return
    got = fs.quantize(x, fmt, rounding, seed=seed, random_bits=random_bits, axis=axis)
    what = f"{fmt!r} {rounding!r} bits {random_bits} axis {axis}"
    assert_same_bits(got, want, what)
    codes = fs.to_bits(x, fmt, rounding=rounding, seed=seed, random_bits=random_bits, axis=axis,
                       packed=False)
    s = fs.from_bits(codes.scales, fmt.scale).astype(np.float64)
    assert_same_bits(s, np.asarray(scales, np.float64), what)
    assert_same_bits(fs.from_bits(codes, fmt, axis=axis, packed=False), want, what)


@settings(max_examples=50)
@given(cases(), st.sampled_from([r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]))
def test_fused_deterministic_equals_oracle(case, rounding):
    """Every deterministic mode, every element, rule and block length, on float32 blocks
    over the whole float32 range: values, scale codes and element codes as the oracle's."""
    fmt, x, axis = case
    _check(fmt, x, axis, rounding)


@settings(max_examples=40)
@given(cases(), st.integers(0, 2**32), st.sampled_from([None, 1, 8, 40, 64]))
def test_fused_stochastic_equals_oracle(case, seed, random_bits):
    """STOCHASTIC (the kernel's draws replayed in the oracle), several random_bits."""
    fmt, x, axis = case
    if np.isnan(x).any() or np.isinf(x).any():
        x = np.where(np.isfinite(x), x, np.float32(1.5))
    _check(fmt, x, axis, fs.Rounding.STOCHASTIC, seed, random_bits)


def test_tiny_blocks_in_the_kernel(monkeypatch):
    """Blocks whose maxima lie near float32's subnormal range (the element's smallest normal
    times the scale below float32's smallest normal) are rounded by the kernel too, every
    mode, the oracle's bits; the oracle is not called on the fast path."""
    rng = np.random.default_rng(21)
    tops = np.arange(-149, -96)
    x = (rng.uniform(-2, 2, (tops.size, 32)) * np.exp2(tops)[:, None]).astype(np.float32)
    x[:, 0] = np.exp2(tops).astype(np.float32)
    x[::3, 5] = -0.0
    wants = {}
    for el in ELEMENTS:
        for rounding in fs.Rounding:
            fmt = BlockFormat(el, block=32, scale_rule="ocp")
            wants[el, rounding] = oracle(x, fmt, rounding, seed=5)[0]

    def oracle_called(*args, **kw):
        raise AssertionError("a block went to the oracle")

    monkeypatch.setattr(reference, "round_to_format", oracle_called)
    for (el, rounding), want in wants.items():
        fmt = BlockFormat(el, block=32, scale_rule="ocp")
        assert_same_bits(fs.quantize(x, fmt, rounding, seed=5), want, f"{el!r} {rounding!r}")


def test_nan_blocks_and_the_scale_range():
    """A NaN or an infinity makes its block NaN with the NaN scale code, the other blocks
    unchanged; a block needing a scale beyond E8M0's largest is refused, naming the block."""
    x = np.ones((3, 32), np.float32)
    x[1, 7] = np.inf
    x[2, 0] = np.nan
    got = fs.quantize(x, fs.MXFP8_E4M3)
    assert np.isnan(got[1:]).all() and (got[0] == 1.0).all()
    assert list(fs.to_bits(x, fs.MXFP8_E4M3).scales[:, 0]) == [119, 255, 255]  # 2**-8
    fp4 = BlockFormat(fs.FP4_E2M1, block=32, scale_rule="ocp")
    y = np.full((2, 32), F32_MAX, np.float32)
    assert (fs.quantize(y, fp4) == 6.0 * 2.0**125).all()
    big = BlockFormat(fs.FP8_E4M3, block=2, scale_rule="ocp")
    assert fs.quantize(np.array([F32_MAX, 1], np.float32), big)[0] == 448 * 2.0**119
    e5m0 = fs.FloatFormat(5, 0, inf_nan="fn", signed=False, subnormals=False)
    narrow = BlockFormat(fs.FP8_E4M3, block=2, scale=e5m0)  # scales 2**-15 .. 2**15
    assert _fused_applies(np.ones(2, np.float32), narrow)
    with pytest.raises(ValueError, match=r"block 1 .* needs the scale 2\*\*22, beyond"):
        fs.quantize(np.array([1, 1, 2.0**30, 1], np.float32), narrow)
    tiny = np.array([2.0**-30, -(2.0**-33), 3.0, 2.0**-20], np.float32)  # scales raised to 2**-15
    for rounding in fs.Rounding:
        assert_same_bits(fs.quantize(tiny, narrow, rounding, seed=2),
                         oracle(tiny, narrow, rounding, seed=2)[0], f"{rounding!r}")


# -- the "nearest" rule (NVFP4): scaled_from_f32 ---------------------------------------------

SCALES = [fs.FP8_E4M3, fs.FP8_E5M2, fs.BF16, fs.FP16]


@st.composite
def nearest_cases(draw):
    """A "nearest"-rule format (any float element and scale format; the FP8 scales with or
    without an FP32 tensor scale: NVFP4 among them) and float32 blocks over the whole float32
    range."""
    el = draw(st.sampled_from(ELEMENTS[:5]))
    block = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 32]))
    sc = draw(st.sampled_from(SCALES))
    ts = draw(st.sampled_from([None, fs.FP32, fs.FP32])) if sc.man_bits <= 3 else None
    fmt = BlockFormat(el, block=block, scale=sc, scale_rule="nearest", tensor_scale=ts)
    x = draw(f32_blocks(block, draw(st.integers(1, 6 if block < 32 else 3))))
    if draw(st.booleans()):  # the blocks along axis 0
        return fmt, np.ascontiguousarray(x[:, None]), 0
    return fmt, x.reshape(1, -1), -1


def _check_nearest(fmt, x, axis, rounding, seed=None, random_bits=None):
    from fixedsim.blockquant import _scaled_applies

    assert _scaled_applies(x, fmt)
    try:
        want, _, scales, t = block_oracle(x.astype(np.float64), fmt, rounding, seed, random_bits,
                                          axis)
    except ValueError as e:  # a scale beyond the scale format: the same error
        with pytest.raises(ValueError) as got:
            fs.quantize(x, fmt, rounding, seed=seed, random_bits=random_bits, axis=axis)
        assert str(got.value) == str(e)
        return
    what = f"{fmt!r} {rounding!r} bits {random_bits} axis {axis}"
    got = fs.quantize(x, fmt, rounding, seed=seed, random_bits=random_bits, axis=axis)
    assert_same_bits(got, want, what)
    codes = fs.to_bits(x, fmt, rounding=rounding, seed=seed, random_bits=random_bits, axis=axis,
                       packed=False)
    assert codes.tensor_scale == (None if t is None else fs.to_bits(float(t), fmt.tensor_scale))
    s = np.asarray(fs.from_bits(codes.scales, fmt.scale), np.float64)
    assert_same_bits(s, np.array([float(v) for v in np.ravel(scales)]).reshape(s.shape), what)
    assert_same_bits(fs.from_bits(codes, fmt, axis=axis, packed=False), want, what)


@settings(max_examples=60)
@given(nearest_cases(), st.sampled_from([r for r in fs.Rounding
                                         if r is not fs.Rounding.STOCHASTIC]))
def test_nearest_rule_kernel_deterministic_equals_oracle(case, rounding):
    """The "nearest" rule's kernel (each block's scale from its largest magnitude, then every
    element against exact thresholds ``(n + 1/2) * 2**q * S``): values, scale and element
    codes and the tensor scale as the oracle's, in every deterministic mode."""
    _check_nearest(*case, rounding)


@settings(max_examples=40)
@given(nearest_cases(), st.integers(0, 2**32), st.sampled_from([None, 1, 8, 40, 64]))
def test_nearest_rule_kernel_stochastic_equals_oracle(case, seed, random_bits):
    """STOCHASTIC: the fraction's 64 bits by exact long division, the kernel's draws replayed
    in the oracle, several random_bits."""
    fmt, x, axis = case
    x = np.where(np.isfinite(x), x, np.float32(1.5))
    _check_nearest(fmt, x, axis, fs.Rounding.STOCHASTIC, seed, random_bits)


def test_nearest_rule_kernel_declines_what_it_cannot_do_exactly():
    """A scale times tensor scale of more than 31 significant bits (BF16 x FP32), a scale
    format without subnormals (E8M0), float64 input: the general path, which the oracle tests
    of test_blockformats.py cover."""
    from fixedsim.blockquant import _scaled_applies

    x = np.ones(32, np.float32)
    assert _scaled_applies(x, fs.NVFP4)
    assert not _scaled_applies(x, BlockFormat(fs.FP4_E2M1, 16, fs.BF16, "nearest", fs.FP32))
    assert not _scaled_applies(x, BlockFormat(fs.FP4_E2M1, 16, fs.E8M0, "nearest"))
    assert not _scaled_applies(x.astype(np.float64), fs.NVFP4)
    assert not _scaled_applies(x, fs.MXFP4)


def test_nearest_rule_kernel_ties_and_thresholds():
    """NVFP4 with a tensor scale of exactly 1 (the tensor's largest magnitude 6 * 448) and
    block scales that are E4M3 values: elements exactly on E2M1's midpoints (ties), one
    float32 ulp either side, signed; and block maxima whose scale is itself a tie between two
    E4M3 values (6 * 1.0625, 6 * 0.0703125). Every mode: the exact comparisons decide, not the
    float64 guesses."""
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    blocks = [[2688.0] + [0.0] * 15]  # t = 2688 / (6 * 448) = 1 exactly
    for s in (1.0, 0.125, 1.5, 2.0**-9, 1.0625, 0.0703125):
        for lo in (0, 7):  # two blocks per scale: the midpoints, and their ulp neighbours
            v = [6.0 * s]
            for m in mids:
                m32 = np.float32(m * s)
                v += [m32] if lo == 0 else [np.nextafter(m32, np.float32(0)),
                                            np.nextafter(m32, np.float32(9))]
            v = v[:16]
            v += [-x for x in v[1:16 - len(v) + 1]][:16 - len(v)]
            blocks.append(v + [0.0] * (16 - len(v)))
    x = np.array(blocks, np.float32).reshape(-1)
    for r in fs.Rounding:
        want = block_oracle(x.astype(np.float64), fs.NVFP4, r, 5, None)[0]
        assert_same_bits(fs.quantize(x, fs.NVFP4, r, seed=5), want, repr(r))
    # ties are there: nearest even and nearest away differ only on them
    rne, rna = (fs.quantize(x, fs.NVFP4, r) for r in ("nearest_even", "nearest_away"))
    assert (rne != rna).sum() >= 20
