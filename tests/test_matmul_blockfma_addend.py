"""BlockFMA with ``addend_bits``: C enters after the products' cut sum, both aligned again
and floored (the CDNA3 adder of MMA-Sim, ``hardware.spec("MI300", ...)``). The blockfma row
against the oracle (reference.dot), bit for bit and count for count; the MI300 presets
against MMA-Sim's arithmetic restated here in float64; worked examples by hand; the
arguments; policies.
"""

import dataclasses
import math

import numpy as np
import pytest
from blockfma_cases import check, one_numba_thread, operands
from helpers import assert_policy_round_trips
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import hardware, reference

R = fs.Rounding


@pytest.fixture(autouse=True)
def one_thread():
    with one_numba_thread():
        yield


@st.composite
def second_stage(draw):
    """A BlockFMA with addend_bits (or, a fifth of the time, without), blocks of 1 to 8, any
    window, both cuts, zero operands read at an exponent or not."""
    fmt = draw(st.sampled_from([fs.FP32, fs.FP16]))
    block = draw(st.integers(1, 8))
    c_bits = draw(st.integers(1, 30))
    return fs.BlockFMA(
        block, draw(st.integers(-12, 8)),
        rounding=draw(st.sampled_from([R.TOWARD_ZERO, R.NEAREST_EVEN, R.DOWN, R.ODD])),
        fmt=fmt, output_frac_bits=draw(st.none() | st.integers(1, fmt.man_bits)),
        min_exp=draw(st.none() | st.integers(-150, 2)),
        addend_bits=draw(st.just((draw(st.integers(c_bits, 40)), c_bits)) | st.none()),
        zero_exp=draw(st.none() | st.integers(-260, 20)),
        product_inf_exp=draw(st.none() | st.integers(27, 300)))  # out of the operands' reach


@settings(max_examples=60, deadline=None)
@given(data=st.data(), acc=second_stage(), fmt=st.sampled_from([fs.FP16, fs.BF16]),
       shape=st.tuples(st.integers(1, 3), st.integers(0, 20), st.integers(1, 3)),
       with_c=st.booleans())
def test_second_stage_matches_the_oracle(data, acc, fmt, shape, with_c):
    """The row's second stage (the cut sum shifted on its bits, C scaled and floored) is the
    oracle's, bit for bit and count for count (accumulator, alignment, output)."""
    M, K, N = shape
    assume(K > 0 or not with_c)
    a = data.draw(operands(fmt, (M, K), top=12))
    b = data.draw(operands(fmt, (K, N), top=12))
    c = data.draw(operands(acc.fmt, (M, N), top=12)) if with_c else None
    check(a, b, fs.MatmulSpec(input=fmt, accumulator=acc), c)


# -- MMA-Sim's CDNA3 step, restated ---------------------------------------------------------
def _sig_exp(x, emin):
    """(significand in [0, 2), exponent at least emin) of x; a zero at exponent -126."""
    if x == 0:
        return 0.0, -126
    m, e = math.frexp(x)
    m, e = 2 * m, e - 1
    if e < emin:
        m, e = m * 2.0 ** (e - emin), emin
    return m, e


def _cdna3_step(a, b, c, emin):
    """One block of MMA-Sim's CDNA3 f16/bf16 MFMA step (mmasim/simulator/arithmetic.py,
    amd_fused_dot_rd_add, commit c785138), written out here for finite operands
    whose products stay below 2**128 (zeros too, read at exponent -126 as MMA-Sim reads
    them): the products aligned to their largest exponent and
    truncated at 24 fraction bits, their sum and C aligned again and floored at 31 and 24
    bits, the float64 sum rounded to nearest even into float32."""
    ps = []
    for x, y in zip(a, b, strict=True):
        (sx, ex), (sy, ey) = _sig_exp(x, emin), _sig_exp(y, emin)
        ps.append((sx * sy, ex + ey))
    E = max(e for _, e in ps)
    s = sum(math.trunc(v * 2.0 ** (24 + e - E)) * 2.0**-24 for v, e in ps)
    sc, ec = _sig_exp(c, -126)
    M = max(E, ec)
    s = math.floor(s * 2.0 ** (31 + E - M)) * 2.0**-31
    sc = math.floor(sc * 2.0 ** (24 + ec - M)) * 2.0**-24
    return float(np.float32((s + sc) * 2.0**M))


@settings(max_examples=40, deadline=None)
@given(inp=st.sampled_from(["fp16", "bf16"]), seed=st.integers(0, 2**32 - 1),
       spread=st.integers(0, 40))
def test_mi300_is_mma_sims_arithmetic(inp, seed, spread):
    """The MI300 presets give MMA-Sim's CDNA3 result on rows of K = 16 (two blocks of 8),
    operands of both signs spread over 2**-spread .. 2**spread with zeros among them (a
    zero facing a large operand moves the anchor), and C of any size or zero."""
    fmt = fs.FP16 if inp == "fp16" else fs.BF16
    rng = np.random.default_rng(seed)
    lim = min(spread, 14)
    a = fs.quantize(rng.standard_normal((4, 16)) * 2.0 ** rng.integers(-lim, lim + 1, (4, 16)),
                    fmt)
    b = fs.quantize(rng.standard_normal((16, 3)) * 2.0 ** rng.integers(-lim, lim + 1, (16, 3)),
                    fmt)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a[rng.random(a.shape) < 0.2] = 0.0
    b[rng.random(b.shape) < 0.2] = 0.0
    c = np.float32(rng.standard_normal((4, 3)) * 2.0 ** rng.integers(-150, 30, (4, 3)))
    c[rng.random(c.shape) < 0.2] = 0.0
    got = fs.matmul(a, b, hardware.spec("MI300", inp), c.astype(np.float64))
    for i in range(4):
        for j in range(3):
            r = float(c[i, j])
            for k0 in (0, 8):
                r = _cdna3_step(a[i, k0:k0 + 8], b[k0:k0 + 8, j], r, fmt.emin)
            assert float(got[i, j]) == r, (i, j)


# -- worked examples, by hand from MMA-Sim's model ------------------------------------------
def test_rounding_is_asymmetric():
    """C = 1 and the products 2**-24, 2**-40: the second stage floors their sum at 2**-31
    to 2**-24 and 1 + 2**-24 is a tie, to even: 1. Negated, the floor goes the other way:
    -(1 + 2**-24 + 2**-31) rounds to -(1 + 2**-23). The exact sum rounds to 1 + 2**-23 both
    ways; C as a term of the block (cut toward zero at 2**-24) gives 1 both ways."""
    mi300 = hardware.spec("MI300", "fp16")
    a = np.array([[2.0**-12, 2.0**-20]])
    b = np.array([[2.0**-12], [2.0**-20]])
    assert fs.matmul(a, b, mi300, 1.0)[0, 0] == 1.0
    assert fs.matmul(-a, b, mi300, -1.0)[0, 0] == np.float32(-(1 + 2.0**-23))
    term = dataclasses.replace(mi300, accumulator=dataclasses.replace(mi300.accumulator,
                                                                      addend_bits=None))
    assert fs.matmul(-a, b, term, -1.0)[0, 0] == -1.0
    exact = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP32, block=8))
    assert fs.matmul(a, b, exact, 1.0)[0, 0] == np.float32(1 + 2.0**-23)


def test_a_small_c_is_floored_at_24_bits():
    """The product 1 and C = -2**-30: C is floored at 2**-24 (24 bits below the common
    anchor 0) to -2**-24, and 1 - 2**-24 is an FP32 number; C = +2**-30 floors to 0."""
    mi300 = hardware.spec("MI300", "fp16")
    one = np.ones((1, 1))
    assert fs.matmul(one, one, mi300, -(2.0**-30))[0, 0] == np.float32(1 - 2.0**-24)
    assert fs.matmul(one, one, mi300, 2.0**-30)[0, 0] == 1.0
    acc = mi300.accumulator
    assert reference.block_fma([1.0], [1.0], -(2.0**-30), acc, -14) == 1 - 2.0**-24


def test_products_are_cut_at_24_bits_below_their_own_anchor():
    """The products 1 and 2**-26 (anchor 0): the first stage cuts 2**-26 to 0 (one term
    cut, all of it lost); 1 and -2**-24 are kept whole, and 1 - 2**-24 is an FP32 number."""
    acc = hardware.spec("MI300", "fp16").accumulator
    align = {}
    assert reference.block_fma([1.0, 2.0**-13], [1.0, 2.0**-13], 0.0, acc, -14,
                               align=align) == 1.0
    assert align.get("inexact", 0) == 1 and align.get("underflow", 0) == 1
    v = reference.block_fma([1.0, 2.0**-12], [1.0, -(2.0**-12)], 0.0, acc, -14)
    assert v == 1 - 2.0**-24  # kept at 24 bits, exact in FP32


def test_a_zero_facing_a_large_operand_moves_the_anchor():
    """BF16, MMA-Sim's reading of zeros: 0 * 2**100 is a term of exponent -126 + 100 = -26,
    so the product 2**-40 (1 + 2**-7) (1 + 2**-7) is cut at 2**-50 to 2**-40 (1 + 2**-6);
    without the zero, or with zero products out of the anchor, it is kept whole and rounds
    into FP32 as it is."""
    mi300 = hardware.spec("MI300", "bf16")
    x = 2.0**-20 * (1 + 2.0**-7)
    want = x * x
    assert fs.matmul(np.array([[0.0, x]]), np.array([[2.0**100], [x]]), mi300)[0, 0] == \
        np.float32(2.0**-40 * (1 + 2.0**-6))
    assert fs.matmul(np.array([[x]]), np.array([[x]]), mi300)[0, 0] == np.float32(want)
    out = dataclasses.replace(mi300, accumulator=dataclasses.replace(mi300.accumulator,
                                                                     zero_exp=None))
    assert fs.matmul(np.array([[0.0, x]]), np.array([[2.0**100], [x]]), out)[0, 0] == \
        np.float32(want)


def test_a_product_of_2_to_the_128_is_an_infinity():
    """BF16 products of 2**128 or more are infinities (MMA-Sim's CDNA3 model): 2**64 * 2**64
    next to -2**127 gives +inf (the exact sum 2**127 is finite), next to -2**128 NaN; the
    rows go to the oracle (the blockfma row declines: a product may reach 2**128)."""
    mi300 = hardware.spec("MI300", "bf16")
    a = np.array([[2.0**64, 2.0**63], [2.0**64, 2.0**64]])
    b = np.array([[2.0**64], [-1.0 * 2.0**64]])
    got, cnt = fs.matmul(a, b, mi300, np.array([[1.0], [1.0]]), stats="steps")
    assert got[0, 0] == np.inf and np.isnan(got[1, 0])
    assert "blockfma" not in cnt.paths
    exact = fs.MatmulSpec(input=fs.BF16, accumulator=fs.Accumulator(fs.FP32, block=8))
    assert fs.matmul(a[:1], b, exact)[0, 0] == np.float32(2.0**127)
    assert reference.block_fma([2.0**64, 2.0**63], [2.0**64, -(2.0**64)], 1.0,
                               mi300.accumulator, -126) == math.inf
    ok = np.array([[2.0**63, 2.0**63]])  # products of 2**126, out of the limit's reach
    out, c2 = fs.matmul(ok, np.array([[2.0**63], [-(2.0**63)]]), mi300, stats="steps")
    assert out[0, 0] == 0.0 and c2.paths.get("blockfma") == 1


def test_zero_c_and_zero_products_give_plus_zero():
    acc = hardware.spec("MI300", "fp16").accumulator
    assert math.copysign(1.0, reference.block_fma([0.0], [-1.0], -0.0, acc, -14)) == 1.0
    out = fs.matmul(np.array([[-0.0, 1.0]]), np.array([[1.0], [-0.0]]),
                    hardware.spec("MI300", "fp16"), -0.0)
    assert math.copysign(1.0, float(out[0, 0])) == 1.0


# -- arguments and policies -----------------------------------------------------------------
@pytest.mark.parametrize("kw,err,match", [
    (dict(addend_bits=(24, 31)), ValueError, r"needs 1 <= c <= m"),
    (dict(addend_bits=(31, 0)), ValueError, r"needs 1 <= c <= m"),
    (dict(addend_bits=(46, 24)), ValueError, r"m \+ bitlen\(block\) <= 48 \(block 8\)"),
    (dict(addend_bits=31), TypeError, "BlockFMA addend_bits must be a pair of ints"),
    (dict(addend_bits=(31.0, 24)), TypeError, "BlockFMA addend_bits must be a pair of ints"),
    (dict(addend_bits=(31, 24), promote=16), ValueError, "does not combine with promote"),
    (dict(zero_exp=-2000), ValueError, r"BlockFMA zero_exp must be in -1100\.\.1100"),
    (dict(zero_exp=-126.0), TypeError, "BlockFMA zero_exp must be an int or None"),
    (dict(product_inf_exp=1200), ValueError, r"product_inf_exp must be in -1100\.\.1100"),
    (dict(product_inf_exp="128"), TypeError, "BlockFMA product_inf_exp must be an int"),
])
def test_bad_addend_bits_names_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        fs.BlockFMA(8, 1, **kw)


def test_a_policy_keeps_addend_bits(tmp_path):
    from fixedsim.nn.policy import Policy

    spec = hardware.spec("MI300", "bf16")
    assert repr(spec.accumulator) == ("BlockFMA(8, 1, rounding=NEAREST_EVEN, "
                                      "addend_bits=(31, 24), zero_exp=-126, "
                                      "product_inf_exp=128)")
    p = dataclasses.replace(Policy.fp16_mixed(), name="mi300", forward=spec)
    d = p.to_dict()
    assert d["forward"]["accumulator"]["addend_bits"] == [31, 24]
    assert d["forward"]["accumulator"]["zero_exp"] == -126
    assert d["forward"]["accumulator"]["product_inf_exp"] == 128
    assert_policy_round_trips(p, tmp_path)
