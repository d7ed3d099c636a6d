"""The BlockFMA accumulator (the aligned, truncating adder of tensor cores): the blockfma row
(fixedsim.jit.gemm_blockfma) against the exact definition, reference.block_fma, bit for bit
and count for count, on random specs and inputs that stress alignment; the probes of Fasi et
al. that tell the generations apart; the definition itself on hand-computed cases.
"""

import math

import numba
import numpy as np
import pytest
from blockfma_cases import check, one_numba_thread, operands
from helpers import assert_policy_round_trips, assert_same_bits
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.matmul import blockfma as bf

R = fs.Rounding
INPUTS = [fs.FP16, fs.BF16, fs.TF32, fs.FP8_E4M3, fs.FP8_E5M2]


@pytest.fixture(autouse=True)
def one_thread():
    with one_numba_thread():
        yield


@st.composite
def block_fmas(draw):
    fmt = draw(st.sampled_from([fs.FP32, fs.FP16]))
    return fs.BlockFMA(
        draw(st.integers(1, 9)), draw(st.integers(-12, 4)),
        rounding=draw(st.sampled_from([R.TOWARD_ZERO, R.NEAREST_EVEN, R.NEAREST_AWAY, R.UP,
                                       R.DOWN, R.ODD])),
        fmt=fmt, output_frac_bits=draw(st.none() | st.integers(1, fmt.man_bits)),
        min_exp=draw(st.none() | st.integers(-150, 2)))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), acc=block_fmas(), fmt=st.sampled_from(INPUTS),
       shape=st.tuples(st.integers(1, 4), st.integers(0, 20), st.integers(1, 4)),
       with_c=st.booleans())
def test_kernel_matches_the_oracle(data, acc, fmt, shape, with_c):
    M, K, N = shape
    a = data.draw(operands(fmt, (M, K)))
    b = data.draw(operands(fmt, (K, N)))
    c = data.draw(operands(acc.fmt, (M, N))) if with_c else None
    check(a, b, fs.MatmulSpec(input=fmt, accumulator=acc), c)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), acc=block_fmas(), out=st.sampled_from([fs.FP16, fs.BF16, fs.FP8_E4M3]))
def test_output_rounding_after_the_blocks(data, acc, out):
    a = data.draw(operands(fs.FP16, (3, 11)))
    b = data.draw(operands(fs.FP16, (11, 2)))
    check(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=acc, output=out))


@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_infinite_and_nan_addends_and_overflow(special):
    """A special C stays through finite blocks (IEEE sum); overflow gives an infinity in
    every rounding mode, and then stays; inf - inf in C and products is NaN."""
    a = np.array([[1.0, 2.0, 65504.0, 65504.0]])
    b = np.array([[1.0], [-3.0], [65504.0], [65504.0]])
    for rnd in (R.TOWARD_ZERO, R.NEAREST_EVEN):
        acc = fs.BlockFMA(2, 0, rounding=rnd, fmt=fs.FP16)
        spec = fs.MatmulSpec(input=fs.FP16, accumulator=acc)
        check(a, b, spec, np.array([[special]]))
        y = fs.matmul(a, b, spec)
        assert y[0, 0] == np.inf  # 2**32 overflows FP16 even truncating
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(4, 0))
    got = fs.matmul(np.array([[np.inf, 1.0]]), np.array([[1.0], [1.0]]), spec, -np.inf)
    assert np.isnan(got[0, 0])
    assert fs.explain(np.array([[np.inf]]), np.array([[1.0]]), spec).path == "general"


def test_subnormal_inputs_keep_the_input_formats_exponent():
    """An FP16 subnormal 2**-24 is 2**-10 * 2**-14: its product with 1 has exponent -14, not
    -24, and sets the anchor there (so a product 2**-30 is cut at 2**(-14-23))."""
    acc = fs.BlockFMA(4, 0)
    a = np.array([[2.0**-24, 2.0**-15]])
    b = np.array([[1.0], [2.0**-15 * (1 + 2.0**-10)]])
    want = reference.block_fma(a[0], b[:, 0], 0.0, acc, fs.FP16.emin)
    E, q = -14, 2.0**(-14 - 23)
    assert want == 2.0**-24 + math.floor(2.0**-30 * (1 + 2.0**-10) / q) * q
    assert E + 1 > -24  # the anchor is not the product's own binade
    got = fs.matmul(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=acc))
    assert got[0, 0] == np.float32(want)


def test_threads_do_not_change_bits():
    rng = np.random.default_rng(5)
    a = np.asarray(fs.quantize(rng.standard_normal((37, 50)) * 4.0, fs.BF16), np.float64)
    b = np.asarray(fs.quantize(rng.standard_normal((50, 9)), fs.BF16), np.float64)
    spec = fs.MatmulSpec(input=fs.BF16, accumulator=fs.BlockFMA(8, 1, min_exp=-132))
    one = fs.matmul(a, b, spec)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    assert_same_bits(fs.matmul(a, b, spec), one)


def test_counts():
    """One rounding per block and output element; the events of those roundings."""
    a = np.array([[1.0, 2.0**-30, 3.0]])
    b = np.array([[1.0], [1.0], [1.0]])
    spec = fs.MatmulSpec(input=fs.FP32, accumulator=fs.BlockFMA(2, 0))
    _, cnt = fs.matmul(a, b, spec, stats="steps")
    assert cnt.accumulator.roundings == 2
    assert cnt.accumulator.inexact == 0  # 2**-30 is cut, the cut sum 1 is exact
    assert cnt.macs == 3
    # the alignment: 3 products and the 2 blocks' starts; 2**-30 lost all its bits at the
    # window 2**-23 of the first block (anchor 0); the second block's start 1 and its
    # product 3 keep theirs
    al = cnt.alignment
    assert (al.roundings, al.inexact, al.underflow) == (5, 1, 1)
    assert (al.overflow, al.subnormal, al.nan) == (0, 0, 0)
    _, plain = fs.matmul(a, b, spec, stats=True)
    assert plain.alignment.roundings == 5 and plain.alignment.inexact is None


def test_alignment_counts_cut_terms_that_keep_some_bits():
    """A term cut but not to zero is inexact, not underflow; a term that is a multiple of the
    window's quantum is neither; a nonzero addend is a term too."""
    acc = fs.BlockFMA(4, 0)
    a = np.array([[1.0, 1.0 + 2.0**-23, 2.0**-24 * 3]])
    b = np.array([[1.0], [1.0], [1.0]])
    spec = fs.MatmulSpec(input=fs.FP32, accumulator=acc)
    # window 2**-23 (anchor 0): 1 exact, 1 + 2**-23 exact, 3 * 2**-24 = 2**-23 + 2**-24 cut
    # to 2**-23 (bits left); the addend 2**-25 cut to zero
    _, cnt = fs.matmul(a, b, spec, np.array([[2.0**-25]]), stats="steps")
    assert (cnt.alignment.roundings, cnt.alignment.inexact, cnt.alignment.underflow) == (4, 2, 1)
    al = {}
    reference.block_fma(a[0], b[:, 0], 2.0**-25, acc, fs.FP32.emin, align=al)
    assert al == {"inexact": 2, "underflow": 1}


# -- the definition, by hand ------------------------------------------------------------------
def probe(acc, a, b, c):
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=acc)
    got = fs.matmul(np.array([a]), np.array(b)[:, None], spec, c)[0, 0]
    assert got == reference.block_fma(a, b, c, acc, fs.FP16.emin)
    return float(got)


V100 = fs.BlockFMA(4, 0, min_exp=-1024)
A100 = fs.BlockFMA(8, 1, min_exp=-132)
H100 = fs.BlockFMA(16, 2, min_exp=-133)


def test_probe_1_extra_alignment_bit():
    """1 + (-(1 - 2**-24)): V100 keeps no bit beyond 23, so C's last bit is cut: 2**-23;
    A100 on keep one more: 2**-24 (Fasi et al., PeerJ CS 7:e330, 2021)."""
    c = -(1 - 2.0**-24)
    assert probe(V100, [1.0], [1.0], c) == 2.0**-23
    for acc in (A100, H100):
        assert probe(acc, [1.0], [1.0], c) == 2.0**-24


def test_probe_2_truncation_before_cancellation():
    """(-1 + 2**-24) + 1 - 2**-24: V100 cuts both 2**-24 terms, 2**-23 remains; with one
    extra bit they cancel exactly."""
    c = -1.0 + 2.0**-24
    assert probe(V100, [1.0, 1.0], [1.0, -2.0**-24], c) == 2.0**-23
    for acc in (A100, H100):
        assert probe(acc, [1.0, 1.0], [1.0, -2.0**-24], c) == 0.0


def test_probe_3_carries_without_normalisation():
    """1.875 + 1 + 1.5 + 1.75 + 1.875 = 8: the sum carries three places past the anchor and
    is normalised once at the end, exactly."""
    for acc in (V100, A100, H100):
        assert probe(acc, [1.0] * 4, [1.0, 1.5, 1.75, 1.875], 1.875) == 8.0


def test_probe_4_truncation_toward_zero_of_the_result():
    """2 + 3 * 2**-24 truncated into FP32 is 2, and -2 - 3 * 2**-24 is -2 (toward zero, not
    down)."""
    for acc in (V100, A100, H100):
        assert probe(acc, [1.0] * 4, [2.0, 3 * 2.0**-24, 0.0, 0.0], 0.0) == 2.0
        assert probe(acc, [1.0] * 4, [-2.0, -3 * 2.0**-24, 0.0, 0.0], 0.0) == -2.0


def test_definition_by_hand():
    """One block computed by hand: anchor 1 (the product 1.5 * 2 = 3 has exponent 0 + 1),
    window ``q = 2**(1 - 23 - 2)``; the term 2**-30 is cut to 0, -1.75 * 2**-23 (3.5 q) to
    -3 q: ``S q = 3 - 3 * 2**-24``; nearest even into 10 fraction bits gives 3, truncation
    into 23 fraction bits (quantum 2**-22 in [2, 4)) gives 3 - 2**-22."""
    acc = fs.BlockFMA(4, 2, rounding="nearest_even", output_frac_bits=10)
    a = [1.5, 2.0**-15, -2.0**-23]
    b = [2.0, 2.0**-15, 1.75]
    assert reference.block_fma(a, b, 0.0, acc) == 3.0
    assert reference.block_fma(a, b, 0.0, fs.BlockFMA(4, 2)) == 3.0 - 2.0**-22
    assert reference.block_fma(a, b, 0.0, fs.BlockFMA(4, 3)) == 3.0 - 2.0**-22  # 7 q: no cut
    spec = fs.MatmulSpec(input=fs.FP32, accumulator=fs.BlockFMA(4, 2))
    assert fs.matmul(np.array([a]), np.array(b)[:, None], spec)[0, 0] == 3.0 - 2.0**-22
    assert reference.block_fma([1.0], [0.0], -0.0, acc) == 0.0  # no term: +0
    assert math.copysign(1.0, reference.block_fma([1.0], [0.0], -0.0, acc)) == 1.0


def test_cut_sum_rounding_helper_on_every_mode():
    """round_cut_sum against round_to_format on integers around rounding boundaries."""
    from fixedsim.jit.gemm_blockfma import round_cut_sum

    reg = fs.FloatFormat(8, 5)
    for S in list(range(-300, 301)) + [2**52 - 1, -(2**52) + 3, 2**40 + 2**34]:
        for sexp in (-150, -140, -3, 0, 80):
            for mode in (R.TOWARD_ZERO, R.NEAREST_EVEN, R.NEAREST_AWAY, R.UP, R.DOWN, R.ODD):
                v, _ = round_cut_sum(S, sexp, 5, reg.emin, reg.emax, int(mode))
                from fractions import Fraction
                w, fl = reference.round_to_format(Fraction(S) * Fraction(2)**sexp, reg, mode,
                                                  "infinity", flags=True)
                if fl["overflow"]:
                    w = math.copysign(math.inf, S)
                if S == 0:
                    w = 0.0
                assert_same_bits(v, w, err_msg=f"{S} {sexp} {mode}")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, err, match", [
    (dict(block=0, extra_bits=1), ValueError, "BlockFMA block must be in 1"),
    (dict(block=2.0, extra_bits=1), TypeError, "BlockFMA block must be an int"),
    (dict(block=True, extra_bits=1), TypeError, "BlockFMA block must be an int"),
    (dict(block=4, extra_bits=31), ValueError, "BlockFMA extra_bits must be in -23..30"),
    (dict(block=4, extra_bits="2"), TypeError, "BlockFMA extra_bits must be an int"),
    (dict(block=4, extra_bits=0, rounding="stochastic"), ValueError, "deterministic"),
    (dict(block=4, extra_bits=0, rounding="sideways"), ValueError, "rounding"),
    (dict(block=4, extra_bits=0, fmt=fs.FP8_E4M3), TypeError, "BlockFMA fmt"),
    (dict(block=4, extra_bits=0, fmt=fs.FP64), TypeError, "BlockFMA fmt"),
    (dict(block=4, extra_bits=0, output_frac_bits=24), ValueError, "output_frac_bits"),
    (dict(block=4, extra_bits=0, output_frac_bits=0), ValueError, "output_frac_bits"),
    (dict(block=4, extra_bits=0, min_exp=1.5), TypeError, "min_exp"),
])
def test_bad_arguments_name_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        fs.BlockFMA(**kw)


def test_blockfma_takes_no_product_rounding():
    with pytest.raises(ValueError, match="product must be None with a BlockFMA"):
        fs.MatmulSpec(product=fs.FP16, accumulator=fs.BlockFMA(4, 0))


def test_declines_and_exponents():
    from fixedsim.jit.gemm_blockfma import NO_EXP

    e = bf.exponents(np.array([0.0, 1.0, 3.0, 2.0**-24, 2.0**-1074, -2.0**1023]), -14)
    assert e.tolist() == [NO_EXP, 0, 1, -14, -14, 1023]
    assert bf.exponents(np.array([2.0**-1074, 2.0**-1000]), -1022).tolist() == [-1022, -1000]
    spec = fs.MatmulSpec(accumulator=fs.BlockFMA(4, 0))
    a = np.array([[1.0 + 2.0**-40]])
    e = fs.explain(a, a, spec)  # a 53-bit product is not exact in float64: the oracle
    assert e.path == "general" and dict(e.declined)["blockfma"] == (
        "a product may be inexact in float64")
    assert_same_bits(fs.matmul(a, a, spec), reference.matmul(a, a, spec))


# -- wherever an accumulator goes --------------------------------------------------------------
def test_convolutions_and_their_gradients_take_a_blockfma():
    """conv2d and its gradients are matrix products: with a BlockFMA each equals the product of
    its im2col operands, which the blockfma row computes (checked against the oracle above)."""
    from fixedsim.matmul.api import _im2col

    rng = np.random.default_rng(7)
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(8, 1, min_exp=-132))
    x = np.asarray(fs.quantize(rng.standard_normal((2, 3, 5, 5)), fs.FP16), np.float64)
    w = np.asarray(fs.quantize(rng.standard_normal((4, 3, 3, 3)), fs.FP16), np.float64)
    y, cnt = fs.conv2d(x, w, spec, padding=1, stats=True)
    assert cnt.paths == {"blockfma": 1}
    cols = _im2col(x, 3, 3, (1, 1), (1, 1), 5, 5)
    want = fs.matmul(cols, w.reshape(4, -1).T, spec).reshape(2, 5, 5, 4).transpose(0, 3, 1, 2)
    assert_same_bits(y, want)
    gy = np.asarray(fs.quantize(rng.standard_normal(y.shape), fs.FP16), np.float64)
    gw = fs.conv2d_grad_weight(x, gy, w.shape, spec, padding=1)
    want = fs.matmul(gy.transpose(1, 0, 2, 3).reshape(4, -1), cols, spec).reshape(w.shape)
    assert_same_bits(gw, want)
    gx, cnt = fs.conv2d_grad_input(gy, w, x.shape, spec, padding=1, stats=True)
    assert cnt.paths == {"blockfma": 1} and gx.shape == x.shape


def test_a_policy_names_a_blockfma(tmp_path):
    """A Policy's products take a BlockFMA, and its plain-data form (JSON, TOML) keeps it."""
    from fixedsim.nn.policy import Policy

    h100 = fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(16, 2, min_exp=-133))
    fp8 = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=fs.BlockFMA(
        32, -10, output_frac_bits=13, min_exp=-133))
    base = Policy.fp16_mixed()
    import dataclasses
    p = dataclasses.replace(base, name="h100", forward=fp8, grad_input=h100, grad_weight=h100)
    d = p.to_dict()
    assert d["forward"]["accumulator"] == {"kind": "block_fma", "block": 32, "extra_bits": -10,
                                           "rounding": "toward_zero", "format": "FP32",
                                           "output_frac_bits": 13, "min_exp": -133}
    assert_policy_round_trips(p, tmp_path)
    with pytest.raises(ValueError, match=r"forward.accumulator: 'extra_bits' is required"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "block_fma", "block": 4}}})
    with pytest.raises(ValueError, match=r"BlockFMA block must be in 1"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "block_fma", "block": 0,
                                                      "extra_bits": 0}}})
    with pytest.raises(ValueError, match=r"kind must be 'accumulator'.*'block_fma'"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "tensor", "format": "FP32"}}})


# -- promotion of the partial sum (DeepSeek-V3's remedy) ----------------------------------------
@st.composite
def addends(draw, shape):
    """Addends of any float64 value: most not in FP32 (so that a running sum and a chunk's
    result may have no exact float64 sum), some huge, tiny, zero of both signs, special."""
    n = int(np.prod(shape))
    v = draw(st.lists(st.one_of(
        st.floats(-1e6, 1e6), st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, -0.0, 1.0 + 2.0**-24, -(1.0 + 2.0**-24) * 2.0**-30, 2.0**-149,
                         3.4028234663852886e38, 2.0**-160, np.inf, -np.inf, np.nan])),
        min_size=n, max_size=n))
    return np.array(v, np.float64).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), acc=block_fmas(), m=st.integers(1, 3), fmt=st.sampled_from(INPUTS),
       shape=st.tuples(st.integers(1, 3), st.integers(0, 30), st.integers(1, 4)),
       addend=st.sampled_from(["none", "fmt", "any"]))
def test_promotion_matches_the_oracle(data, acc, m, fmt, shape, addend):
    """With ``promote``, the row (the kernel per chunk, then the promotions) is the oracle's,
    bit for bit and count for count, whatever the addend."""
    import dataclasses

    acc = dataclasses.replace(acc, promote=acc.block * m)
    M, K, N = shape
    assume(K > 0 or addend != "any")  # K = 0: D is C as it is (held in fmt's dtype)
    a = data.draw(operands(fmt, (M, K)))
    b = data.draw(operands(fmt, (K, N)))
    c = {"none": lambda: None, "fmt": lambda: data.draw(operands(acc.fmt, (M, N))),
         "any": lambda: data.draw(addends((M, N)))}[addend]()
    check(a, b, fs.MatmulSpec(input=fmt, accumulator=acc), c)


def test_promotion_add_is_the_oracles_on_edge_cases():
    """The vectorised promotion (two-sum, then one rounding or the oracle) against
    reference.promote_add, value and flags: ties, a float64 sum that is itself a tie of FP32
    but not exact (1 + 2**-24 + 2**-80 rounds up, not to even), overflow, zeros, specials,
    subnormal results."""
    from fixedsim.quantize import FLAG_COLUMNS

    big = 3.4028234663852886e38
    pairs = [(1.0, 2.0**-24), (1.0, 3 * 2.0**-24), (1.0 + 2.0**-24, 2.0**-80),
             (1.0 + 2.0**-24, -2.0**-80), (big, 2.0**103), (big, 2.0**102), (-big, -2.0**103),
             (-0.0, -0.0), (-0.0, 0.0), (0.0, -0.0), (1.5, -1.5), (np.inf, 1.0),
             (np.inf, -np.inf), (np.nan, 0.0), (2.0**-149, 2.0**-148), (2.0**-126, -2.0**-149),
             (1e-300, 0.0), (-1e-300, 0.0), (2.0**-150, 2.0**-200), (1e30, 1e-30)]
    for fmt in (fs.FP32, fs.FP16):
        s = np.array([[x for x, _ in pairs]])
        p = np.array([[y for _, y in pairs]])
        r, fl = bf.promote_add(s, p, fmt)
        want_fl = np.zeros(fl.shape[1], np.int64)
        for k, (x, y) in enumerate(pairs):
            v, f = reference.promote_add(x, y, fmt)
            assert_same_bits(np.array([r[0, k]]), np.array([v]))
            for name, col in FLAG_COLUMNS:
                want_fl[col] += int(f[name])
        assert fl[0].tolist() == want_fl.tolist()
    assert reference.promote_add(1.0 + 2.0**-24, 2.0**-80, fs.FP32)[0] == 1.0 + 2.0**-23
    v, f = reference.promote_add(big, 2.0**103, fs.FP32)
    assert v == math.inf and f["overflow"]
    assert math.copysign(1.0, reference.promote_add(-0.0, -0.0, fs.FP32)[0]) == -1.0
    assert math.copysign(1.0, reference.promote_add(1.5, -1.5, fs.FP32)[0]) == 1.0


def test_promotion_by_hand():
    """The H100 FP8 unit (blocks of 32, 13 fraction bits, 10 bits fewer than FP32 below the
    anchor): 128 products of 8 make 1024; then 128 products of 2**-6, each cut to 0 in a
    window anchored at 1024 (quantum 2**-3): 1024. Promoting every 128 products, the second
    chunk sums from +0 to 2 exactly and FP32 adds it: 1026, the exact result."""
    import dataclasses

    acc = fs.BlockFMA(32, -10, output_frac_bits=13, min_exp=-133)
    pro = dataclasses.replace(acc, promote=128)
    assert repr(pro) == "BlockFMA(32, -10, output_frac_bits=13, min_exp=-133, promote=128)"
    a = np.array([[4.0] * 128 + [1.0] * 128])
    b = np.array([[2.0] * 128 + [2.0**-6] * 128]).T
    for acc_, want in ((acc, 1024.0), (pro, 1026.0)):
        spec = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=acc_)
        got, cnt = fs.matmul(a, b, spec, stats=True)
        assert got[0, 0] == want and cnt.paths == {"blockfma": 1}
        assert reference.dot(a[0], b[:, 0], spec) == want
    assert cnt.accumulator.roundings == 256 // 32 + 256 // 128
    assert pro.roundings(257) == 9 + 3
    # C is the running sum's start: it takes part in no block, so it is never cut
    c = np.array([[2.0**-20]])
    spec = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=pro)
    assert fs.matmul(a, b, spec, c)[0, 0] == np.float32(1026.0 + 2.0**-20)
    spec0 = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=acc)
    assert fs.matmul(a, b, spec0, c)[0, 0] == 1024.0


@pytest.mark.parametrize("kw,err,match", [
    (dict(block=4, extra_bits=0, promote=0), ValueError, "BlockFMA promote must be at least 1"),
    (dict(block=4, extra_bits=0, promote=-4), ValueError, "promote must be at least 1"),
    (dict(block=4, extra_bits=0, promote=6), ValueError,
     r"BlockFMA promote must be a multiple of block \(4\), got 6"),
    (dict(block=4, extra_bits=0, promote=8.0), TypeError, "BlockFMA promote must be an int"),
    (dict(block=4, extra_bits=0, promote=True), TypeError, "BlockFMA promote must be an int"),
])
def test_bad_promote_names_the_argument(kw, err, match):
    with pytest.raises(err, match=match):
        fs.BlockFMA(**kw)


def test_a_policy_keeps_promote(tmp_path):
    import dataclasses

    from fixedsim.nn.policy import Policy

    fp8 = fs.MatmulSpec(input=fs.FP8_E4M3, accumulator=fs.BlockFMA(
        32, -10, output_frac_bits=13, min_exp=-133, promote=128))
    p = dataclasses.replace(Policy.fp16_mixed(), name="deepseek", forward=fp8)
    d = p.to_dict()
    assert d["forward"]["accumulator"]["promote"] == 128
    assert_policy_round_trips(p, tmp_path)
    with pytest.raises(ValueError, match=r"forward.accumulator.*promote must be a multiple"):
        Policy.from_dict({"forward": {"accumulator": {"kind": "block_fma", "block": 32,
                                                      "extra_bits": 0, "promote": 100}}})
