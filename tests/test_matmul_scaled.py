"""The ``float_chain64_scaled`` row (fixedsim/matmul/scaled.py): a float accumulator on operands
sharing a common odd factor (NVFP4's tensor scale), against the oracle bit for bit, counts
against the general kernel, and where it declines."""

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.matmul import explain
from fixedsim.matmul.scaled import common_odd_factor

NAME = "float_chain64_scaled"
MODES = ["nearest_even", "nearest_away", "toward_zero", "up", "odd"]


def scaled_operands(rng, shape, fmt, g, spread):
    """Values of ``fmt`` (normal values times ``2**j``, ``j`` in ``+-spread`` per element),
    some zeros of both signs, times the odd integer ``g`` and a power of two."""
    x = rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))
    x = fs.quantize(x, fmt).astype(np.float64)
    x[rng.random(shape) < 0.1] = 0.0
    x[rng.random(shape) < 0.05] = -0.0
    return x * (g * 2.0 ** -int(g).bit_length())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), R=st.integers(1, 4), K=st.integers(1, 60),
       N=st.integers(1, 4), block=st.integers(1, 33), mode=st.sampled_from(MODES),
       acc_fmt=st.sampled_from([fs.FP32, fs.BF16, fs.FP16, fs.TF32]),
       el=st.sampled_from([fs.BF16, fs.FP8_E4M3, fs.FP4_E2M1]),
       ga=st.integers(1, 2**23).map(lambda v: 2 * v + 1),
       gb=st.integers(1, 2**23).map(lambda v: 2 * v + 1), spread=st.integers(0, 40))
def test_row_equals_the_oracle(seed, R, K, N, block, mode, acc_fmt, el, ga, gb, spread):
    """Every deterministic mode, blocks of 1 to 33 along K, FP32 / BF16 / FP16 / TF32 running
    sums, elements of 2 to 8 significant bits times odd factors of up to 24 bits (products of
    up to 64 bits, inexact in float64), magnitudes spread over 2**+-40 (cancellations, ties
    at 53 bits, overflow and underflow of the narrow formats); values and counts."""
    rng = np.random.default_rng(seed)
    a = scaled_operands(rng, (R, K), el, ga, spread)
    b = scaled_operands(rng, (K, N), el, gb, spread)
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(acc_fmt, mode, block=block))
    got, c = fs.matmul(a, b, spec, stats=True)
    want = reference.matmul(a, b, spec)
    assert_same_bits(got.astype(np.float64), want)
    gen, cg = fs.matmul(a, b, spec, stats=True, path="general")
    assert c.accumulator == cg.accumulator
    if explain(a, b, spec).path == NAME:
        assert c.paths.get(NAME) == 1


def test_nvfp4_products_take_the_row_and_equal_the_general_kernel():
    """NVFP4 operands (an FP32 tensor scale each): the row runs and leaves no element to the
    general kernel on ordinary data (where about 1% of the steps are ties at 53 bits, which a
    strict bound would leave to it); its bits and counts are the general kernel's."""
    rng = np.random.default_rng(4)
    a = rng.standard_normal((16, 256)).astype(np.float32)
    b = rng.standard_normal((256, 24)).astype(np.float32)
    spec = fs.MatmulSpec(input=fs.NVFP4, accumulator=fs.Accumulator(fs.FP32, block=16))
    assert explain(a, b, spec).path == NAME
    got, c = fs.matmul(a, b, spec, stats=True)
    want, cw = fs.matmul(a, b, spec, stats=True, path="general")
    assert_same_bits(got.astype(np.float64), want.astype(np.float64))
    assert c.accumulator == cw.accumulator
    assert c.paths == {NAME: 1}


def test_zero_block_sums():
    """Blocks whose products cancel exactly (+0 in the model's sum to nearest) or are all
    signed zeros (-0 products keep a -0 sum), before and after nonzero blocks: against the
    oracle in every mode. (With a common odd factor the running sum, a value of the
    accumulator, is never cancelled exactly by a nonzero block sum.)"""
    t = 0x9CD6AB * 2.0**-24
    a = np.array([[3.0, -3.0, -0.0, -0.0, 0.625, 0.25],
                  [-0.0, -0.0, 3.0, -3.0, -1.0, 0.0],
                  [1.0, 2.0, 3.0, -3.0, -0.0, -0.0]]) * t
    b = np.array([[1.75], [1.75], [1.25], [1.25], [1.875 * 2.0**-30], [1.5]]) * t
    for mode in MODES:
        spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, mode, block=2))
        assert explain(a, b, spec).path == NAME
        assert_same_bits(fs.matmul(a, b, spec).astype(np.float64),
                         reference.matmul(a, b, spec))


def test_rounding_to_odd_decides_a_sum_just_above_a_tie():
    """Two constructed sums ``1 + 2**-24 + tiny`` (just above FP32's midpoint between 1 and
    ``1 + 2**-23``), whose float64 rounding is the midpoint itself: rounded to nearest first,
    the FP32 step would go to the even 1.0; the exact sum goes up. The tiny part is the
    running sum's TwoSum error (factors 3 and ``(2**31 + 1) / 3``: ``1 + 2**-24 + 2**-55``)
    or the product's FMA error (factor ``2**26 + 1`` times a 52-bit block sum: ``2**-24 +
    2**-102``)."""
    g = (2**31 + 1) // 3
    a = np.array([[g * 2.0**-31, g * 2.0**-55, 0.0]])
    b = np.array([[3.0], [3.0], [3.0 * 0xABCDEF * 2.0**-24]])  # the last: products inexact
    g2 = 2**26 + 1
    a2 = np.array([[g2 * 2.0**-26, g2 * 2.0**-50]])
    b2 = np.array([[1.0], [1.0 - 2.0**-26 + 2.0**-52]])
    for x, y in ((a, b), (a2, b2)):
        spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, block=1))
        assert explain(x, y, spec).path == NAME
        got = fs.matmul(x, y, spec)
        assert got[0, 0] == np.float32(1.0 + 2.0**-23)
        assert_same_bits(got.astype(np.float64), reference.matmul(x, y, spec))


@pytest.mark.parametrize("acc, why", [
    (fs.Accumulator(fs.FP32, "stochastic", block=4), "DOWN or stochastically"),
    (fs.Accumulator(fs.FP32, "down", block=4), "DOWN or stochastically"),
    (fs.Accumulator(fs.FP64, block=4), "more than 50 fraction bits"),
])
def test_declines(acc, why):
    t = 0x9CD6AB * 2.0**-24
    a, b = np.full((2, 8), 0.6875 * t), np.full((8, 2), 0.9375 * t)  # 28 + 28 bits
    declined = dict(explain(a, b, fs.MatmulSpec(accumulator=acc, seed=1)).declined)
    assert why in declined[NAME]


def test_declines_operands_without_a_common_factor():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((8, 3))  # 53-bit values
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, block=4))
    declined = dict(explain(a, b, spec).declined)
    assert "no common factor" in declined[NAME]


def test_common_odd_factor():
    assert common_odd_factor(np.array([3.0, 0.75, -9.0, 0.0, -0.0])) == 3
    assert common_odd_factor(np.array([0.0, -0.0])) == 1
    t = 0xBE0D15 * 2.0**-30
    assert common_odd_factor(np.array([t, 5 * t, 2.0**-20 * t])) == 0xBE0D15
    assert common_odd_factor(np.array([1.0, 3.0])) == 1
