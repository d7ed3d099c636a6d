"""BlockFMA with ``groups``: a block's products split into interleaved groups, each aligned
and cut at its own anchor, the group sums floored at the largest anchor's window, then C
(``addend_bits``, with C's drop distance as a third value): the CDNA3 FP8 adder of MMA-Sim,
``hardware.spec("MI300", "e4m3" | "e5m2")``. The blockfma row against the oracle
(reference.dot), bit for bit and count for count; the presets against MMA-Sim's FP8
arithmetic restated here in float64; worked examples by hand; the arguments; policies.
"""

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
from blockfma_cases import check, one_numba_thread, operands
from helpers import assert_policy_round_trips
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import hardware, reference

R = fs.Rounding
FNUZ = [fs.FP8_E4M3FNUZ, fs.FP8_E5M2FNUZ]


@pytest.fixture(autouse=True)
def one_thread():
    with one_numba_thread():
        yield


@st.composite
def grouped(draw):
    """A BlockFMA with addend_bits and groups (1 to 4, at most the block), blocks of 1 to
    16, any window, C dropped at a distance or not, zeros read at an exponent or not."""
    fmt = draw(st.sampled_from([fs.FP32, fs.FP16]))
    block = draw(st.integers(1, 16))
    c_bits = draw(st.integers(1, 30))
    drop = draw(st.just(()) | st.tuples(st.integers(c_bits, 60)))
    return fs.BlockFMA(
        block, draw(st.integers(-12, 8)),
        rounding=draw(st.sampled_from([R.TOWARD_ZERO, R.NEAREST_EVEN, R.DOWN, R.ODD])),
        fmt=fmt, output_frac_bits=draw(st.none() | st.integers(1, fmt.man_bits)),
        min_exp=draw(st.none() | st.integers(-150, 2)),
        addend_bits=(draw(st.integers(c_bits, 40)), c_bits, *drop),
        zero_exp=draw(st.none() | st.integers(-260, 20)),
        groups=draw(st.integers(1, min(block, 4))))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), acc=grouped(),
       fmt=st.sampled_from([fs.FP16, fs.BF16, *FNUZ]),
       shape=st.tuples(st.integers(1, 3), st.integers(0, 40), st.integers(1, 3)),
       with_c=st.booleans())
def test_groups_match_the_oracle(data, acc, fmt, shape, with_c):
    """The row's groups (an anchor and a cut sum per group, shifted to the largest anchor)
    and C's drop are the oracle's, bit for bit and count for count (accumulator, alignment,
    output); K not a multiple of the block leaves a short last block (empty groups)."""
    M, K, N = shape
    assume(K > 0 or not with_c)
    a = data.draw(operands(fmt, (M, K), top=12))
    b = data.draw(operands(fmt, (K, N), top=12))
    c = data.draw(operands(acc.fmt, (M, N), top=12)) if with_c else None
    check(a, b, fs.MatmulSpec(input=fmt, accumulator=acc), c)


def test_one_group_is_no_groups():
    """groups=1 is the block as one group: the same bits as groups=None on the same data."""
    rng = np.random.default_rng(5)
    a = np.asarray(fs.quantize(rng.standard_normal((3, 20)) * 8, fs.FP8_E4M3FNUZ), np.float64)
    b = np.asarray(fs.quantize(rng.standard_normal((20, 2)) / 8, fs.FP8_E4M3FNUZ), np.float64)
    c = -np.float32(rng.random((3, 2)) * 2.0**-20).astype(np.float64)
    acc = hardware.spec("MI300", "e4m3").accumulator
    spec = fs.MatmulSpec(input=fs.FP8_E4M3FNUZ, accumulator=dataclasses.replace(acc, groups=1))
    none = fs.MatmulSpec(input=fs.FP8_E4M3FNUZ,
                         accumulator=dataclasses.replace(acc, groups=None))
    np.testing.assert_array_equal(fs.matmul(a, b, spec, c), fs.matmul(a, b, none, c))


# -- MMA-Sim's CDNA3 FP8 step, restated ----------------------------------------------------
def _sig_exp(x, emin):
    """(significand in [0, 2), exponent at least emin) of x; a zero at exponent -126."""
    if x == 0:
        return 0.0, -126
    m, e = math.frexp(x)
    m, e = 2 * m, e - 1
    if e < emin:
        m, e = m * 2.0 ** (e - emin), emin
    return m, e


def _half(ps):
    """One half's sum: its products truncated 24 fraction bits below its largest exponent."""
    E = max(e for _, e in ps)
    return sum(math.trunc(v * 2.0 ** (24 + e - E)) * 2.0**-24 for v, e in ps), E


def _cdna3_fp8_step(a, b, c, emin):
    """One block of 16 of MMA-Sim's CDNA3 FP8 MFMA step (mmasim/simulator/arithmetic.py,
    amd_fused_dot_rd_add with is_fp8, commit c785138), written out here for finite
    operands (zeros read at exponent -126): the even and the odd products each truncated at
    24 fraction bits below their own largest exponent, the two sums floored at 24 bits below
    the larger of the two and added; that sum and C aligned again, floored at 31 and 24
    bits, C of exponent below the anchor minus 25 read as 0; the float64 sum rounded to
    nearest even into float32."""
    ps = []
    for x, y in zip(a, b, strict=True):
        (sx, ex), (sy, ey) = _sig_exp(x, emin), _sig_exp(y, emin)
        ps.append((sx * sy, ex + ey))
    (s0, e0), (s1, e1) = _half(ps[0::2]), _half(ps[1::2])
    E = max(e0, e1)
    s = (math.floor(s0 * 2.0 ** (24 + e0 - E)) + math.floor(s1 * 2.0 ** (24 + e1 - E))) \
        * 2.0**-24
    sc, ec = _sig_exp(c, -126)
    M = max(E, ec)
    s = math.floor(s * 2.0 ** (31 + E - M)) * 2.0**-31
    sc = math.floor(sc * 2.0 ** (24 + ec - M)) * 2.0**-24 if ec >= M - 25 else 0.0
    return float(np.float32((s + sc) * 2.0**M))


@settings(max_examples=40, deadline=None)
@given(inp=st.sampled_from(["e4m3", "e5m2"]), seed=st.integers(0, 2**32 - 1),
       spread=st.integers(0, 16))
def test_mi300_fp8_is_mma_sims_arithmetic(inp, seed, spread):
    """The MI300 FP8 presets give MMA-Sim's CDNA3 FP8 result on rows of K = 32 (two blocks
    of 16, as v_mfma_f32_16x16x32_fp8_fp8), FNUZ operands of both signs spread over
    2**-spread .. 2**spread (subnormals among them) with zeros, and C of any size (a tiny
    negative C is where the drop differs from the floor) or zero."""
    fmt = hardware.spec("MI300", inp).input
    rng = np.random.default_rng(seed)
    lim = min(spread, fmt.emax)

    def draw(shape):
        x = rng.standard_normal(shape) * 2.0 ** rng.integers(-lim, lim + 1, shape)
        x = np.asarray(fs.quantize(x, fmt), np.float64)
        x[rng.random(shape) < 0.2] = 0.0
        return x

    a, b = draw((4, 32)), draw((32, 3))
    c = np.float32(rng.standard_normal((4, 3)) * 2.0 ** rng.integers(-150, 20, (4, 3)))
    c[rng.random(c.shape) < 0.2] = 0.0
    got = fs.matmul(a, b, hardware.spec("MI300", inp), c.astype(np.float64))
    for i in range(4):
        for j in range(3):
            r = float(c[i, j])
            for k0 in (0, 16):
                r = _cdna3_fp8_step(a[i, k0:k0 + 16], b[k0:k0 + 16, j], r, fmt.emin)
            assert float(got[i, j]) == r, (i, j)


# -- worked examples, by hand from MMA-Sim's model ------------------------------------------
def test_the_odd_products_are_floored_at_the_even_anchor():
    """E4M3 FNUZ, products 8 * 8 = 64 (even, anchor 6) and -2**-10 * 2**-10 = -2**-20 (odd,
    subnormal operands: anchor -14, kept whole there). Floored at 2**(6 - 24) = 2**-18 the
    odd sum is -2**-18: 64 - 2**-18, an FP32 number (the binade below 64 has ulp 2**-18).
    In one group (the f16 adder) -2**-20 is cut toward zero to 0: 64; the exact sum
    64 - 2**-20 rounds to nearest into FP32 as 64 too."""
    spec = hardware.spec("MI300", "e4m3")
    a = np.array([[8.0, -(2.0**-10)]])
    b = np.array([[8.0], [2.0**-10]])
    want = Fraction(64) - Fraction(1, 2**18)
    got, cnt = fs.matmul(a, b, spec, stats="steps")
    assert Fraction(float(got[0, 0])) == want and cnt.paths == {"blockfma": 1}
    assert reference.block_fma(a[0], b[:, 0], 0.0, spec.accumulator, -7) == float(want)
    one = dataclasses.replace(spec, accumulator=dataclasses.replace(spec.accumulator,
                                                                    groups=None))
    assert fs.matmul(a, b, one)[0, 0] == 64.0
    exact = fs.MatmulSpec(input=fs.FP8_E4M3FNUZ, accumulator=fs.Accumulator(fs.FP32, block=16))
    assert fs.matmul(a, b, exact)[0, 0] == 64.0
    # the same two products both even (k = 0 and 2): one group, cut toward zero, 64
    a2 = np.array([[8.0, 0.0, -(2.0**-10)]])
    b2 = np.array([[8.0], [0.0], [2.0**-10]])
    assert fs.matmul(a2, b2, spec)[0, 0] == 64.0


@pytest.mark.parametrize("e", [10, 40])
def test_a_far_negative_group_floors_to_one_quantum(e):
    """BF16, products 2**e * 2**e (even) and -2**-e * 2**-e (odd), anchors 4e apart (40 and
    160: the kernel's shift below and beyond 63 bits): the odd sum floors to one quantum
    below zero at 24 bits below the even anchor, -2**(2e - 24), and 2**(2e) - 2**(2e - 24)
    is an FP32 number; in one group it is cut toward zero: 2**(2e)."""
    acc = fs.BlockFMA(2, 1, rounding="nearest_even", addend_bits=(31, 24), groups=2)
    spec = fs.MatmulSpec(input=fs.BF16, accumulator=acc)
    a = np.array([[2.0**e, -(2.0**-e)]])
    b = np.array([[2.0**e], [2.0**-e]])
    got, cnt = fs.matmul(a, b, spec, stats="steps")
    assert got[0, 0] == np.float32(2.0 ** (2 * e) - 2.0 ** (2 * e - 24))
    assert cnt.paths == {"blockfma": 1}
    assert reference.block_fma(a[0], b[:, 0], 0.0, acc, -126) == float(got[0, 0])
    one = fs.MatmulSpec(input=fs.BF16, accumulator=dataclasses.replace(acc, groups=None))
    assert fs.matmul(a, b, one)[0, 0] == 2.0 ** (2 * e)


def test_a_small_negative_c_is_dropped_below_25_bits():
    """The product 1 (anchor 0) and C = -2**-26: C's exponent is below 0 - 25, so C is read
    as 0 and the result is 1; the f16 adder floors it to -2**-24 instead: 1 - 2**-24. At
    C = -2**-25 (exponent 0 - 25, kept) the floor gives -2**-24 on both: 1 - 2**-24."""
    fp8 = hardware.spec("MI300", "e4m3")
    f16 = hardware.spec("MI300", "fp16")
    one = np.ones((1, 1))
    assert fs.matmul(one, one, fp8, -(2.0**-26))[0, 0] == 1.0
    assert fs.matmul(one, one, f16, -(2.0**-26))[0, 0] == np.float32(1 - 2.0**-24)
    for spec in (fp8, f16):
        assert fs.matmul(one, one, spec, -(2.0**-25))[0, 0] == np.float32(1 - 2.0**-24)
    align = {}
    assert reference.block_fma([1.0], [1.0], -(2.0**-26), fp8.accumulator, -7,
                               align=align) == 1.0
    assert align == {"inexact": 1, "underflow": 1}  # C counted as cut to zero


def test_the_presets_chain_blocks_of_16():
    """E5M2 FNUZ, the products -2**-13 * 2**-13 = -2**-26 and 1 * 1. At k = 0 and k = 16
    (two blocks, the first's FP32 result the second's C): the first block gives -2**-26,
    which the second reads as C of exponent -26 < 0 - 25 and drops: 1. At k = 0 and k = 1
    (one block, the even and the odd group): -2**-26 is floored at 2**-24 below the odd
    group's anchor 0 to -2**-24: 1 - 2**-24."""
    spec = hardware.spec("MI300", "e5m2")
    assert spec.input == fs.FP8_E5M2FNUZ
    a, b = np.zeros((2, 32)), np.zeros((32, 1))
    a[:, 0], b[0, 0] = -(2.0**-13), 2.0**-13
    a[0, 16], b[16, 0] = 1.0, 1.0
    a[1, 1], b[1, 0] = 1.0, 1.0
    got, cnt = fs.matmul(a, b, spec, stats="steps")
    assert got[0, 0] == 1.0 and got[1, 0] == np.float32(1 - 2.0**-24)
    assert cnt.accumulator.roundings == 2 * 2 == 2 * spec.accumulator.roundings(32)
    assert reference.block_fma(a[0, :16], b[:16, 0], 0.0, spec.accumulator, -15) == -(2.0**-26)


# -- arguments and policies -----------------------------------------------------------------
@pytest.mark.parametrize("kw,err,match", [
    (dict(groups=2), ValueError, r"BlockFMA groups needs addend_bits"),
    (dict(groups=0, addend_bits=(31, 24)), ValueError,
     r"BlockFMA groups must be in 1\.\.block \(16\).*got 0"),
    (dict(groups=17, addend_bits=(31, 24)), ValueError,
     r"BlockFMA groups must be in 1\.\.block \(16\).*got 17"),
    (dict(groups=2.0, addend_bits=(31, 24)), TypeError, "BlockFMA groups must be an int"),
    (dict(groups=True, addend_bits=(31, 24)), TypeError, "BlockFMA groups must be an int"),
    (dict(addend_bits=(31, 24, 23)), ValueError, r"\(m, c, d\) needs c <= d <= 4096"),
    (dict(addend_bits=(31, 24, 5000)), ValueError, r"\(m, c, d\) needs c <= d <= 4096"),
    (dict(addend_bits=(31, 24, 25.0)), TypeError, "addend_bits must be a pair of ints"),
    (dict(addend_bits=(31, 24, 25, 1)), TypeError, "addend_bits must be a pair of ints"),
])
def test_bad_groups_name_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        fs.BlockFMA(16, 1, **kw)


def test_a_policy_keeps_groups(tmp_path):
    from fixedsim.nn.policy import Policy

    spec = hardware.spec("MI300", "e4m3")
    assert repr(spec.accumulator) == ("BlockFMA(16, 1, rounding=NEAREST_EVEN, "
                                      "addend_bits=(31, 24, 25), zero_exp=-126, "
                                      "product_inf_exp=128, groups=2)")
    p = dataclasses.replace(Policy.fp16_mixed(), name="mi300fp8", forward=spec)
    d = p.to_dict()
    assert d["forward"]["accumulator"]["addend_bits"] == [31, 24, 25]
    assert d["forward"]["accumulator"]["groups"] == 2
    assert_policy_round_trips(p, tmp_path)
    with pytest.raises(ValueError, match=r"forward.accumulator.*groups needs addend_bits"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "block_fma", "block": 16,
                                                      "extra_bits": 1, "groups": 2}}})
