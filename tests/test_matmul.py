"""fixedsim.matmul against the exact sequential oracle (fixedsim.reference.dot), bit for bit."""

import importlib

import numpy as np
import pytest
from helpers import assert_same_bits, ref_draw
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit import gemm_float, gemm_fp32
from fixedsim.matmul import core as mcore
from fixedsim.testing import roundings

mm = importlib.import_module("fixedsim.matmul")  # the package (fixedsim.matmul is the function)

FIXED_IN = [fs.FixedFormat(8, 4), fs.FixedFormat(12, 6), fs.FixedFormat(16, 8),
            fs.FixedFormat(8, 8, signed=False)]
FLOAT_IN = [fs.FP16, fs.BF16, fs.FP8_E4M3, fs.FP8_E5M2]
FIXED_ACC = [fs.FixedFormat(16, 8), fs.FixedFormat(24, 12), fs.FixedFormat(12, 4),
             fs.FixedFormat(32, 16), fs.FixedFormat(20, 14)]
FLOAT_ACC = [fs.FP32, fs.FP16, fs.BF16, fs.TF32]
ALL_ROUNDINGS = list(fs.Rounding)


def check(a, b, spec, seed=7, path=None):
    got = mm.matmul(a, b, spec, seed=seed, path=path)
    want = reference.matmul(a, b, spec, draw=ref_draw(spec, seed))
    assert got.dtype == spec.result_format.dtype
    assert_same_bits(got.astype(np.float64), want, err_msg=f"{spec!r}\na={a!r}\nb={b!r}",
                     nan_sign=False)
    return got


@st.composite
def matrices(draw, scale=4.0, max_k=20, specials=False, shape=None):
    m, k, n = shape or (draw(st.integers(1, 3)), draw(st.integers(0, max_k)),
                        draw(st.integers(1, 3)))
    elems = st.one_of(
        st.floats(-scale, scale, allow_nan=False, allow_infinity=False),
        st.sampled_from([0.0, -0.0, 1.0, -1.0, scale, -scale, 2.0**-20, 0.5 + 2.0**-12]),
        st.floats(-scale * 64, scale * 64, allow_nan=False, allow_infinity=False),
    )
    if specials:
        elems = st.one_of(elems, st.sampled_from([np.inf, -np.inf, np.nan]))

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c)),
                        dtype=np.float64).reshape(r, c)

    return mat(m, k), mat(k, n)


def accumulators(fmts, blocks=(1, 2, 4, 16)):
    @st.composite
    def acc(draw):
        fmt = draw(st.sampled_from(fmts))
        rnd = draw(roundings())
        if isinstance(fmt, fs.FixedFormat):
            ovf = draw(st.sampled_from([fs.Overflow.SATURATE, fs.Overflow.WRAP]))
        else:
            ovf = draw(st.sampled_from([None, fs.Overflow.SATURATE]))
        rb = draw(st.sampled_from([None, 3])) if rnd is fs.Rounding.STOCHASTIC else None
        return fs.Accumulator(fmt, rnd, ovf, draw(st.sampled_from(blocks)), random_bits=rb)

    return acc()


# -- the combinations, against the oracle -------------------------------------------------
@given(st.sampled_from(FIXED_IN), st.one_of(st.none(), accumulators(FIXED_ACC)),
       st.sampled_from(FIXED_IN + [None]), st.sampled_from(ALL_ROUNDINGS), matrices(max_k=24))
def test_fixed_inputs_exact_saturating_wrapping(inp, acc, out, out_rnd, ab):
    if out is None and acc is not None:
        out_rnd = fs.Rounding.NEAREST_EVEN
    check(*ab, fs.MatmulSpec(input=inp, accumulator=acc, output=out, output_rounding=out_rnd))


@given(st.sampled_from([fs.FP16, fs.BF16]), accumulators([fs.FP32, fs.FP16], (1, 4, 16)),
       st.sampled_from([None, fs.FP16, fs.BF16, fs.FP32]), st.sampled_from(ALL_ROUNDINGS),
       matrices(max_k=40, scale=300.0))
def test_fp16_bf16_inputs_fp32_fp16_accumulators(inp, acc, out, out_rnd, ab):
    if out is None:
        out_rnd = fs.Rounding.NEAREST_EVEN
    check(*ab, fs.MatmulSpec(input=inp, accumulator=acc, output=out, output_rounding=out_rnd))


@given(st.sampled_from([fs.FP8_E4M3, fs.FP8_E5M2]), accumulators([fs.FP16, fs.FP32]),
       st.sampled_from([fs.FP8_E4M3, fs.FP16, None]), matrices(max_k=24, scale=200.0))
def test_fp8_inputs(inp, acc, out, ab):
    check(*ab, fs.MatmulSpec(input=inp, accumulator=acc, output=out))


@given(st.sampled_from(FLOAT_IN + FIXED_IN + [None]),
       st.sampled_from(FLOAT_IN + FIXED_IN + [fs.FP32]), st.sampled_from(ALL_ROUNDINGS),
       st.one_of(st.none(), accumulators(FLOAT_ACC + FIXED_ACC)), matrices(max_k=12))
def test_every_output_rounding(inp, out, out_rnd, acc, ab):
    check(*ab, fs.MatmulSpec(input=inp, accumulator=acc, output=out, output_rounding=out_rnd,
                             random_bits=5 if out_rnd is fs.Rounding.STOCHASTIC else None))


@given(st.sampled_from(FLOAT_IN + [fs.FixedFormat(8, 4), fs.FixedFormat(16, 12)]),
       st.sampled_from(ALL_ROUNDINGS),
       st.one_of(st.none(), accumulators(FLOAT_ACC + FIXED_ACC)), matrices(max_k=12))
def test_product_rounding(prod, prod_rnd, acc, ab):
    check(*ab, fs.MatmulSpec(input=fs.FP16, product=prod, product_rounding=prod_rnd,
                             accumulator=acc, output=fs.FP32))


@given(st.sampled_from(FLOAT_IN + [None]), st.one_of(st.none(), accumulators(FLOAT_ACC)),
       st.sampled_from([None, fs.FP16, fs.FP32]), matrices(max_k=10, specials=True))
def test_infinities_and_nans(inp, acc, out, ab):
    check(*ab, fs.MatmulSpec(input=inp, accumulator=acc, output=out))


@given(st.sampled_from([fs.FP16, fs.BF16, None]), st.sampled_from(ALL_ROUNDINGS),
       matrices(max_k=12, scale=1e3))
def test_stochastic_inputs_and_raw_float64(inp, rnd, ab):
    out = fs.FP16 if inp is None else None
    rnd_in = rnd if inp is not None else fs.Rounding.NEAREST_EVEN
    check(*ab, fs.MatmulSpec(input=inp, input_rounding=rnd_in, output=out))


@settings(max_examples=30)
@given(accumulators(FLOAT_ACC + FIXED_ACC), matrices(max_k=20))
def test_general_kernel_alone(acc, ab):
    """The general kernel (fast paths off) agrees with the oracle on the same cases."""
    check(*ab, fs.MatmulSpec(input=fs.FP16, accumulator=acc, output=fs.FP32), path="general")
    check(*ab, fs.MatmulSpec(input=fs.FixedFormat(12, 6), accumulator=None,
                             output=fs.FixedFormat(16, 8)), path="general")


# -- fast paths: the same bits and the same counts as the general kernel -------------------------
def both_paths(a, b, spec, seed=3):
    """The fast path's bits and counts equal the general kernel's, and its bits are the same
    when nothing reads its counts (kernels may then skip counting)."""
    fast, cf = mm.matmul(a, b, spec, seed=seed, stats="steps")
    unread = mm.matmul(a, b, spec, seed=seed)
    slow, cs = mm.matmul(a, b, spec, seed=seed, stats="steps", path="general")
    assert_same_bits(fast.astype(np.float64), slow.astype(np.float64), err_msg=repr(spec))
    assert_same_bits(unread.astype(np.float64), slow.astype(np.float64), err_msg=repr(spec))
    assert fast.dtype == slow.dtype == unread.dtype
    for stage in ("input", "product", "accumulator", "output"):
        assert getattr(cf, stage) == getattr(cs, stage), (stage, spec)
    assert "general" in cs.paths
    return cf.paths


@pytest.mark.parametrize("spec", [fs.MatmulSpec(), fs.MatmulSpec(output_rounding="down"),
                                  fs.MatmulSpec(output=fs.FP16, output_rounding="down"),
                                  fs.MatmulSpec(output=fs.FixedFormat(8, 4), seed=2,
                                                output_rounding="stochastic"),
                                  fs.MatmulSpec(input=fs.FixedFormat(8, 4))], ids=repr)
def test_an_all_zero_operand_takes_the_zero_path(spec):
    """A dead layer's product (one operand all zeros, of both signs): signed zeros and counts
    as the general kernel gives them, without it."""
    rng = np.random.default_rng(4)
    a = np.where(rng.random((6, 40)) < 0.5, -0.0, 0.0)
    a[1] = -0.0  # rows of -0 only
    b = rng.normal(0, 1, (40, 5))
    b[:, 2] = np.abs(b[:, 2])  # a column of positive values: -0 products in row 1
    for x, y in ((a, b), (b.T, a.T)):
        assert both_paths(x, y, spec) == {"zero_products": 1}


@pytest.mark.parametrize("shape", [(7, 33, 9), (2, 3, 50, 17), (1, 0, 3)])
@pytest.mark.parametrize("acc", [None, fs.Accumulator(fs.FixedFormat(40, 16)),
                                 fs.Accumulator(fs.FixedFormat(32, 16), block=8)])
@pytest.mark.parametrize("out_rnd", ["nearest_even", "stochastic", "toward_zero"])
def test_exact_blas_path_matches_general(shape, acc, out_rnd):
    rng = np.random.default_rng(1)
    a = rng.normal(0, 3, shape[:-1])
    b = rng.normal(0, 3, shape[-2:])
    spec = fs.MatmulSpec(input=fs.FixedFormat(12, 8), accumulator=acc,
                         output=fs.FixedFormat(16, 6), output_rounding=out_rnd)
    paths = both_paths(a, b, spec)
    if shape[-2]:
        assert "exact_blas" in paths


def test_exact_blas_splits_k_under_2_53():
    """Codes of 25 bits: chunks of 8 products keep BLAS exact; chunks are summed in int64."""
    rng = np.random.default_rng(2)
    f = fs.FixedFormat(26, 0)
    a = rng.integers(-2**25 + 1, 2**25, (5, 40)).astype(np.float64)
    b = rng.integers(-2**25 + 1, 2**25, (40, 6)).astype(np.float64)
    spec = fs.MatmulSpec(input=f, output=fs.FP32)
    assert both_paths(a, b, spec) == {"exact_blas": 1}
    exact = a.astype(object) @ b.astype(object)
    want = np.array([[float(np.float32(float(v))) for v in row] for row in exact])
    assert_same_bits(fs.matmul(a, b, spec).astype(np.float64), want)


@pytest.mark.parametrize("inp", [fs.FP16, fs.BF16, fs.FP8_E4M3])
@pytest.mark.parametrize("out", [None, fs.FP16, fs.BF16])
def test_fp32_chain_path_matches_general(inp, out):
    rng = np.random.default_rng(4)
    a = rng.normal(0, 1, (9, 70)) * np.exp2(rng.integers(-30, 12, (9, 70)))
    b = rng.normal(0, 1, (70, 13))
    spec = fs.MatmulSpec(input=inp, accumulator=fs.FP32, output=out)
    assert both_paths(a, b, spec) == {"fp32_chain": 1}


@settings(max_examples=40, deadline=None)
@given(st.integers(17, 90), st.integers(1, 40), st.integers(1, 15),
       st.sampled_from([fs.FP16, fs.BF16]), st.integers(0, 2**32 - 1))
def test_fp32_chain_narrow_outputs_run_transposed(R, K, N, inp, seed):
    """An uncounted FP32 chain with fewer than 16 outputs a row and more rows runs as
    ``(B^T A^T)^T`` (vectorised over the rows): the general kernel's bits (and, counted, its
    counts, on the untransposed kernel)."""
    import sys

    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, (R, K)) * np.exp2(rng.integers(-20, 8, (R, K)))  # finite in FP16
    b = rng.normal(0, 1, (K, N)) * np.exp2(rng.integers(-8, 8, (K, N)))
    a[rng.random((R, K)) < 0.1] = 0.0
    b[rng.random((K, N)) < 0.1] = -0.0
    spec = fs.MatmulSpec(input=inp, accumulator=fs.FP32)
    paths = sys.modules["fixedsim.matmul.paths"]
    seen = []
    real = paths._g32.gemm_f32_chain

    def spy(A, B, out, how):
        seen.append((A.shape, how))
        return real(A, B, out, how)

    paths._g32.gemm_f32_chain = spy
    try:
        assert both_paths(a, b, spec) == {"fp32_chain": 1}
    finally:
        paths._g32.gemm_f32_chain = real
    assert ((N, K), gemm_fp32.F32_UNCOUNTED) in seen  # the unread call ran transposed


def test_fp32_chain_overflow_and_subnormal_counts():
    a = np.array([[6e4, 6e4, -6e4, 2.0**-24, 2.0**-24]])
    b = np.array([[6e4], [6e4], [6e4], [2.0**-24], [-2.0**-24]])
    paths = both_paths(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32))
    assert paths == {"fp32_chain": 1}
    # FP32 overflow: products of BF16 values near 2**127 are not exact in float32 -> general
    spec = fs.MatmulSpec(input=fs.BF16, accumulator=fs.FP32)
    y, c = fs.matmul([[2.0**100, 2.0**100]], [[2.0**27], [2.0**27]], spec, stats="steps")
    assert np.isinf(y).all() and c.accumulator.overflow == 1


def test_fp16_fp32_fma_chain_is_a_float32_loop():
    """FP16 x FP16 with an FP32 block-1 accumulator is a plain sequential float32 FMA loop."""
    rng = np.random.default_rng(5)
    a = fs.quantize(rng.normal(0, 10, (6, 200)), fs.FP16)
    b = fs.quantize(rng.normal(0, 10, (200, 5)), fs.FP16)
    want = np.zeros((6, 5), np.float32)
    for i in range(6):
        for j in range(5):
            acc = np.float32(0)
            for k in range(200):
                acc = np.float32(acc + a[i, k] * b[k, j])  # product exact in float32
            want[i, j] = acc
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32)
    assert_same_bits(fs.matmul(a, b, spec), want)
    assert_same_bits(fs.matmul(a, b, spec, path="general"), want)


@st.composite
def chain64_accumulators(draw):
    fmt = draw(st.sampled_from([fs.FP16, fs.BF16, fs.FP32, fs.TF32, fs.FP8_E4M3,
                                fs.FP8_E5M2]))
    rnd = draw(st.sampled_from([r for r in fs.Rounding if r is not fs.Rounding.DOWN]))
    rb = (draw(st.sampled_from([None, 1, 3, 24, 63])) if rnd is fs.Rounding.STOCHASTIC
          else None)
    return fs.Accumulator(fmt, rnd, draw(st.sampled_from([None, fs.Overflow.SATURATE])),
                          draw(st.sampled_from([1, 2, 3, 16])), random_bits=rb)


@settings(max_examples=80)
@given(st.sampled_from([fs.FP16, fs.BF16, fs.FP8_E5M2, None]), chain64_accumulators(),
       st.sampled_from([None, fs.FP16]), matrices(max_k=40, scale=300.0), st.integers(0, 99))
def test_float_chain64_path_matches_general(inp, acc, out, ab, seed):
    """The float64-lane accumulator kernel: the general kernel's bits, draws and counts, for
    every mode but DOWN, block size, random_bits and overflow rule; sums it cannot prove
    exact in float64 (float32 data, far exponents) go back to the general kernel. (FMA chains
    in deterministic modes take the float32 kernels first when their products allow.)"""
    a, b = ab
    if inp is None:  # float32 data: products exact in float64, sums not always
        a, b = a.astype(np.float32), b.astype(np.float32)
    paths = both_paths(a, b, fs.MatmulSpec(input=inp, accumulator=acc, output=out), seed)
    if acc.block > 1 or acc.rounding is fs.Rounding.STOCHASTIC:
        assert "float_chain64" in paths


@pytest.mark.parametrize("acc", [fs.Accumulator(fs.FP16, "stochastic"),
                                 fs.Accumulator(fs.FP16, "stochastic", block=3),
                                 fs.Accumulator(fs.FP16, "odd", block=16),
                                 fs.Accumulator(fs.BF16, "nearest_away", "saturate", block=2),
                                 fs.Accumulator(fs.FP8_E4M3, "stochastic", block=2),
                                 fs.Accumulator(fs.FP16, "stochastic", "saturate", block=4)])
def test_float_chain64_edges(acc):
    """Overflow (to infinity, or saturating), subnormal and underflowing sums, signed zeros,
    and sums not exact in float64 (handed to the general kernel), against the general kernel
    and the oracle."""
    rng = np.random.default_rng(11)
    lo = acc.fmt.emin // 2 - 6  # products reach 12 binades below the smallest normal
    a = (rng.normal(0, 1, (12, 30)) * np.exp2(rng.integers(lo, 9, (12, 30)))).astype(np.float32)
    b = (rng.normal(0, 1, (30, 9)) * np.exp2(rng.integers(lo, 9, (30, 9)))).astype(np.float32)
    a[0] = -0.0
    a[1, ::2] = 0.0
    a[2] = acc.fmt.max / 4
    b[:, 3] = np.abs(b[:, 3])
    a[3] = acc.fmt.min_normal * rng.normal(0, 0.3, 30)  # sums of tiny products in column 4
    b[:, 4] = rng.choice([1.0, -1.0, 0.5], 30)
    spec = fs.MatmulSpec(accumulator=acc)
    paths = both_paths(a, b, spec)
    assert paths["float_chain64"] == 1 and paths.get("float_chain64_general", 0) > 0
    check(a, b, spec)
    y, c = fs.matmul(a, b, spec, seed=3, stats="steps")
    assert c.accumulator.overflow > 0 and c.accumulator.underflow + c.accumulator.subnormal > 0
    # sums exactly at the smallest normal, the smallest subnormal and the largest value
    f = acc.fmt
    a = np.array([[f.min_normal, f.min_subnormal, f.max, f.min_normal / 2]])
    b = np.eye(4)
    assert both_paths(a, b, spec) == {"float_chain64": 1}
    y, c = fs.matmul(a, b, spec, stats="steps")
    assert_same_bits(y, a.astype(f.dtype))
    # the running sum of column j is a[0, j] from the block holding k = j on (the subnormal
    # columns are 1 and 3), and exact at every step
    sub = sum((t + 1) * acc.block > j for j in (1, 3) for t in range(-(-4 // acc.block)))
    assert c.accumulator.inexact == 0 and c.accumulator.subnormal == sub


@given(st.sampled_from(FIXED_IN), matrices(max_k=30))
def test_exact_fixed_equals_integer_matmul_on_codes(fmt, ab):
    a, b = ab
    spec = fs.MatmulSpec(input=fmt)
    got = fs.matmul(a, b, spec)
    ca = fs.to_bits(fs.quantize(a, fmt), fmt).astype(np.int64)
    cb = fs.to_bits(fs.quantize(b, fmt), fmt).astype(np.int64)
    if fmt.signed:
        w = fmt.word_length
        ca = np.where(ca >= 2 ** (w - 1), ca - 2**w, ca)
        cb = np.where(cb >= 2 ** (w - 1), cb - 2**w, cb)
    want = np.ldexp((ca @ cb).astype(np.float64), -2 * fmt.frac_length)
    assert_same_bits(got, want + 0.0)


# -- semantics spelled out ------------------------------------------------------------------------
def test_three_meanings_of_an_fp16_accumulator():
    """numpy (FP32 sum, one rounding), per-step FP16 rounding, and double rounding differ."""
    a = np.array([[1.0] + [2.0**-12] * 16])
    b = np.ones((17, 1))
    one_rounding = fs.matmul(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32,
                                                 output=fs.FP16))
    per_step = fs.matmul(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP16))
    assert one_rounding[0, 0] == 1.00390625 and per_step[0, 0] == 1.0


def test_batched_and_counters():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(2, 3, 4, 5))
    b = rng.normal(size=(5, 6))
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, block=2),
                         output=fs.FP16)
    with fs.counters.record() as outer:
        y, c = fs.matmul(a, b, spec, stats="steps")
        with fs.counters.record() as inner:
            fs.matmul(a, b, spec)
    assert y.shape == (2, 3, 4, 6)
    assert c.macs == 2 * 3 * 4 * 5 * 6 and c.calls == 1
    assert c.input.roundings == a.size + b.size
    assert c.accumulator.roundings == 2 * 3 * 4 * 6 * 3
    assert c.output.roundings == y.size
    assert inner.calls == 1 and outer.calls == 2 and outer.macs == 2 * c.macs
    for i in range(2):
        assert_same_bits(y[i], fs.matmul(a[i], b, spec), err_msg="batch slices")


def test_seed_semantics():
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(4, 9)), rng.normal(size=(9, 4))
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP8_E5M2, "stochastic"), seed=11)
    y1, y2 = fs.matmul(a, b, spec), fs.matmul(a, b, spec)
    assert_same_bits(y1, y2)
    g = np.random.default_rng(0)
    z1, z2 = fs.matmul(a, b, spec, seed=g), fs.matmul(a, b, spec, seed=g)
    assert not np.array_equal(z1, z2)


def test_thread_count_does_not_change_bits():
    import numba

    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(16, 40)), rng.normal(size=(40, 8))
    spec = fs.MatmulSpec(input=fs.BF16, accumulator=fs.Accumulator(fs.BF16, "stochastic",
                                                                    block=4), seed=1)
    y2 = fs.matmul(a, b, spec)
    old = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        y1 = fs.matmul(a, b, spec)
    finally:
        numba.set_num_threads(old)
    assert_same_bits(y1, y2)


def test_small_outputs_round_on_one_thread_and_restore_the_count(monkeypatch):
    """The output rounding of a small product runs on one Numba thread (a parallel kernel
    right after BLAS waits for OpenBLAS's spinning workers); the caller's count is restored
    and the bits are those of the parallel kernel."""
    import numba

    rng = np.random.default_rng(10)
    a, b = rng.normal(size=(40, 30)), rng.normal(size=(30, 20))
    spec = fs.MatmulSpec(input=fs.FixedFormat(12, 6), output=fs.FixedFormat(10, 4),
                         output_rounding="stochastic", seed=5)
    before = numba.get_num_threads()
    y = fs.matmul(a, b, spec)
    assert numba.get_num_threads() == before
    monkeypatch.setattr(mcore, "_SERIAL_OUTPUT", 0)  # the size threshold: every output parallel
    assert_same_bits(fs.matmul(a, b, spec), y)


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_named():
    with pytest.raises(ValueError, match="K=3.*K=4"):
        fs.matmul(np.ones((2, 3)), np.ones((4, 2)))
    with pytest.raises(ValueError, match="b must have shape"):
        fs.matmul(np.ones((2, 3)), np.ones(3))
    with pytest.raises(ValueError, match=r"batch dimensions .* do not broadcast"):
        fs.matmul(np.ones((3, 2, 3)), np.ones((2, 3, 2)))
    with pytest.raises(ValueError, match="a must have shape"):
        fs.matmul(np.ones(3), np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"a contains NaN.*Q<8,4>.*spec.input"):
        fs.matmul([[np.nan]], [[1.0]], fs.MatmulSpec(input=fs.FixedFormat(8, 4)))
    with pytest.raises(ValueError, match=r"b contains NaN.*spec.accumulator"):
        fs.matmul([[1.0]], [[np.inf]], fs.MatmulSpec(accumulator=fs.FixedFormat(8, 4)))
    with pytest.raises(ValueError, match="block must be >= 1"):
        fs.Accumulator(fs.FP16, block=0)
    with pytest.raises(TypeError, match="block must be an int"):
        fs.Accumulator(fs.FP16, block=2.0)
    with pytest.raises(ValueError, match="WRAP"):
        fs.Accumulator(fs.FP16, overflow="wrap")
    with pytest.raises(ValueError, match="input_rounding"):
        fs.MatmulSpec(input_rounding="stochastic")
    with pytest.raises(ValueError, match="product_rounding"):
        fs.MatmulSpec(product_rounding="up")
    with pytest.raises(ValueError, match="output_rounding=DOWN has no effect"):
        fs.MatmulSpec(accumulator=fs.FP16, output_rounding="down")
    with pytest.raises(ValueError, match="random_bits"):
        fs.MatmulSpec(output=fs.FP16, random_bits=8)
    with pytest.raises(TypeError, match="spec must be a MatmulSpec"):
        fs.matmul([[1.0]], [[1.0]], fs.FP16)
    with pytest.raises(TypeError, match="accumulator"):
        fs.MatmulSpec(accumulator="fp16")
    with pytest.raises(ValueError, match="random_bits"):
        fs.Accumulator(fs.FP16, random_bits=4)


@pytest.mark.parametrize("rnd", [r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC])
@pytest.mark.parametrize("acc", [fs.FP16, fs.BF16, fs.FP8_E4M3, fs.FP8_E5M2, fs.TF32,
                                 fs.FloatFormat(5, 3)])
@pytest.mark.parametrize("ovf", [None, "saturate"])
def test_float_chain_path_matches_general(rnd, acc, ovf):
    rng = np.random.default_rng(10)
    a = fs.quantize(rng.normal(0, 4, (5, 60)) * np.exp2(rng.integers(-14, 8, (5, 60))), fs.FP16)
    b = fs.quantize(rng.normal(0, 4, (60, 11)), fs.FP8_E4M3)
    a[0, :10] = 6e4  # overflow of the accumulator ...
    a[-1, :] = 2.0**117  # ... and of the float32 sum: products up to 2**126, exact
    b[:, 0] = 448.0
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(acc, rnd, ovf), output=fs.FP16)
    assert both_paths(a, b, spec) == {"float_chain": 1}


@st.composite
def fp16_chain_matrices(draw):
    """FP16 values (products exact in float32) on scales chosen per row and per column, so
    that some elements' chains stay in the accumulator's normal range (the lean steps of
    ``float_chain``), some become subnormal, underflow, overflow or cancel to signed zeros
    (recomputed element by element), and some rows are mostly rare (recomputed whole); rows
    not a multiple of four, ties and exact zeros included."""
    m, k, n = draw(st.integers(1, 9)), draw(st.integers(0, 24)), draw(st.integers(1, 40))
    sig = st.one_of(st.integers(-2048, 2048).map(lambda c: c / 1024.0),
                    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1.5, 1.0 + 2.0**-10, 0.75]))
    scales = st.sampled_from([-24, -14, -9, -4, 0, 0, 0, 3, 7, 14])

    def exps(size, choices=scales):
        return np.exp2(np.array(draw(st.lists(choices, min_size=size, max_size=size)), float))

    def values(r, c):
        return np.array(draw(st.lists(sig, min_size=r * c, max_size=r * c)), float).reshape(r, c)

    # a's scale: per row, times per k (a sum meeting a product 2**30 times larger, or smaller)
    sa = exps(m, st.sampled_from([-12, -4, 0, 3, 7]))[:, None] * exps(
        k, st.sampled_from([-12, 0, 0, 6]))[None, :]
    return (fs.quantize(values(m, k) * sa, fs.FP16),
            fs.quantize(values(k, n) * exps(n)[None, :], fs.FP16))


@settings(max_examples=60, deadline=None)
@given(fp16_chain_matrices(), roundings(include_stochastic=False),
       st.sampled_from([fs.FP16, fs.BF16, fs.FP8_E5M2, fs.FP8_E4M3, fs.FloatFormat(5, 3),
                        fs.FloatFormat(5, 21)]),
       st.sampled_from([None, "saturate"]))
def test_float_chain_lean_and_rare_elements_match_general(ab, rnd, acc, ovf):
    """The lean four-row pass and both recomputations of its marked elements give the general
    kernel's bits and counts."""
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(acc, rnd, ovf))
    assert both_paths(*ab, spec) == {"float_chain": 1}


@settings(max_examples=40, deadline=None)
@given(fp16_chain_matrices())
def test_fp32_chain_safe_rows_match_general(ab):
    """FP16 data into an FP32 chain: the operands' bits prove that no sum is subnormal or
    infinite, and the four-row, four-step kernel without those checks gives the general
    kernel's bits and counts."""
    a, b = ab
    assert mcore._f32_chain_safe(mcore._Bits.of(a), mcore._Bits.of(b), a.shape[1])
    assert both_paths(a, b, fs.MatmulSpec(accumulator=fs.FP32)) == {"fp32_chain": 1}


@pytest.mark.parametrize("k", [1, 3, 4, 7])
def test_fp32_chain_safe_at_its_bounds(k):
    """At the bounds of the proof: products that are multiples of 2**-126 (every nonzero sum
    normal, however they cancel) and magnitudes whose sums approach 2**126."""
    rng = np.random.default_rng(k)
    tiny = rng.choice([-1.0, 1.0], (6, k)) * rng.integers(1, 256, (6, k)) * 2.0**-70
    small = rng.choice([-1.0, 1.0], (k, 5)) * rng.integers(1, 256, (k, 5)) * 2.0**-56
    tiny[0, 0], small[0, 0] = 2.0**-70, 2.0**-56  # lsb -70 + -56 = -126 exactly
    top = 126 - int(k).bit_length()  # the largest ba.top + bb.top the proof allows
    big = rng.choice([-1.0, 1.0], (6, k)) * (2.0**(top // 2) - 2.0**(top // 2 - 8))
    large = np.full((k, 5), 2.0**(top - top // 2) - 2.0**(top - top // 2 - 8))
    for a, b in ((tiny, small), (big, large), (np.abs(big), large)):
        ba, bb = mcore._Bits.of(a), mcore._Bits.of(b)
        assert mcore._f32_chain_safe(ba, bb, k), (ba, bb)
        assert both_paths(a, b, fs.MatmulSpec(accumulator=fs.FP32)) == {"fp32_chain": 1}
        _, c = fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP32), stats="steps")
        assert c.accumulator.subnormal == c.accumulator.overflow == 0
    assert not mcore._f32_chain_safe(mcore._Bits.of(tiny / 2), mcore._Bits.of(small), k)
    assert not mcore._f32_chain_safe(mcore._Bits.of(big * 2), mcore._Bits.of(large * 2), k)


def test_float_chain_rare_columns_and_rows():
    """One subnormal column among many (element-by-element recomputation), whole rows of
    subnormal or overflowing sums (row recomputation), and rows beyond a multiple of four."""
    rng = np.random.default_rng(21)
    a = fs.quantize(rng.standard_normal((7, 50)), fs.FP16)
    b = fs.quantize(rng.standard_normal((50, 48)), fs.FP16)
    b[:, 3] = fs.quantize(b[:, 3] * 2.0**-20, fs.FP16)
    a[2] = fs.quantize(a[2] * 2.0**-14, fs.FP16)
    a[5] = fs.quantize(a[5] * 2.0**13, fs.FP16)
    for rnd in fs.Rounding:
        if rnd is not fs.Rounding.STOCHASTIC:
            spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, rnd))
            assert both_paths(a, b, spec) == {"float_chain": 1}
    _, c = fs.matmul(a, b, spec, stats="steps")
    assert c.accumulator.subnormal > 0 and c.accumulator.overflow > 0


@pytest.mark.parametrize("acc", [fs.FP16, fs.FP8_E5M2, fs.FloatFormat(5, 3), fs.FloatFormat(6, 5)])
@pytest.mark.parametrize("ovf", [None, "saturate"])
def test_float_chain_edges(acc, ovf):
    """Sums at the edges of the lean steps' range: the largest value, just beyond it (rounding
    down to it or overflowing, by mode), the smallest normal and just below it, exact zeros
    of both signs, ties; each chain in its own row, in every deterministic mode."""
    big, tiny, u = acc.max, acc.min_normal, acc.min_subnormal
    ulp = 2.0**(acc.emax - acc.man_bits)  # the quantum at the largest binade
    h = 2.0**-(acc.man_bits + 1)  # half the quantum at 1
    chains = [[big, 0.0], [big, u], [big, ulp / 2], [big, ulp / 4], [big - ulp, ulp / 2],
              [big - ulp, ulp], [tiny, -u], [tiny, u], [tiny + u, -u], [tiny, -tiny],
              [-tiny, tiny], [-0.0, -0.0], [-0.0, 0.0], [tiny * 2, -tiny - u], [1.0, h],
              [1.0 + 2 * h, h], [1.0, h / 2], [1.0, 3 * h / 2]]
    chains += [[-x for x in c] for c in chains]
    a = np.array(chains)
    assert np.array_equal(a.astype(np.float32), a), "products exact in float32"
    b = np.ones((2, 3))
    for rnd in fs.Rounding:
        if rnd is not fs.Rounding.STOCHASTIC:
            spec = fs.MatmulSpec(accumulator=fs.Accumulator(acc, rnd, ovf))
            assert both_paths(a, b, spec) == {"float_chain": 1}, rnd


NARROW = [fs.FP16, fs.FP8_E5M2, fs.FP8_E4M3, fs.FloatFormat(5, 3), fs.FloatFormat(5, 21),
          fs.FloatFormat(4, 21)]


def narrow_chain(f, a):
    """``gemm_chain_narrow`` on rows ``a`` times a column of ones: each row's chain, in order."""
    A = np.ascontiguousarray(a, np.float64)
    out = np.empty((A.shape[0], 1), np.float32)
    over = gemm_float.gemm_chain_narrow(A, np.ones((A.shape[1], 1)), out, *mcore._narrow_params(f))
    return out[:, 0], over


@pytest.mark.parametrize("f", NARROW, ids=repr)
def test_narrow_chain_rounds_every_tie(f):
    """One step from zero: the kernel's rounding is the quantizer's on every midpoint of the
    smallest normal binade, of [1, 2) and of the binade below ``2**emax`` (all of them up to
    12 significand bits, 2**15 drawn for more), on every subnormal midpoint, and on their
    float64 neighbours; negative values underflowing to -0 included. Alone (K = 1, the tail
    loop) and as the last of four steps after zero products (the four-step loop)."""
    rng = np.random.default_rng(3)
    P = f.man_bits + 1
    odd = np.arange(1, 2**P, 2, dtype=np.float64)  # (2m + 1): midpoints in units of q/2
    if odd.size > 2**11:
        odd = np.union1d(rng.choice(odd, 2**15, replace=False), [1.0, 2.0**P - 1])
    mids = [odd * f.min_subnormal / 2]  # below the smallest normal: the quantum is u
    for e in (f.emin, 0, f.emax - 1):
        mids.append(2.0**e + odd * 2.0**(e - P))  # quantum 2**(e + 1 - P) at binade e
    v = np.concatenate(mids)
    v = np.concatenate([v, np.nextafter(v, 0), np.nextafter(v, np.inf), [0.0]])
    v = np.concatenate([v, -v])
    want = fs.quantize(v, f)
    want[v == 0] = 0.0  # +0 + -0 is +0 (IEEE 754's sign of an exact zero sum)
    assert np.count_nonzero(np.signbit(want) & (want == 0)) == 2  # -u/2 and above: -0
    for zeros in (0, 3):
        a = np.zeros((v.size, zeros + 1))
        a[:, -1] = v
        got, over = narrow_chain(f, a)
        assert not over.any()
        assert_same_bits(got, want, err_msg=f"{f!r} after {zeros} zero products")


@pytest.mark.parametrize("f", NARROW, ids=repr)
def test_narrow_chain_marks_rows_reaching_the_top_binade(f):
    """A row is marked (and its chain left to the counting kernel) exactly when one of its
    sums reaches ``2**emax``: just below it, passing through it, overflowing and coming
    back, cancelling to +0 and underflowing to -0. The matmul gives the general kernel's
    bits, IEEE and saturating, with rows beyond a multiple of four."""
    top = 2.0**f.emax
    q = 2.0**(f.emax - 1 - f.man_bits)  # the quantum below the top binade
    u = f.min_subnormal
    rows = [([top / 2 - q / 2, top / 2 - q / 2, 0.0, 0.0, 0.0], False),  # the largest below
            ([top / 2 - q / 2, top / 2 - q / 2, q / 2, 0.0, 0.0], True),  # a tie, up to top
            ([top, -top, 1.0, 0.0, 0.0], True),
            ([f.max, f.max, -f.max, -f.max, 1.0], True),  # overflow, then back
            ([1.0, -1.0, -u / 4, -0.0, -0.0], False),  # to +0, then -0
            ([u, u, -u, top - q, q - top], False),
            ([1.0, 1.0, 4 * f.max, -4 * f.max, 1.0], True),  # at the third step, then back
            ([1.0, 1.0, 1.0, 4 * f.max, -4 * f.max], True),  # at the fourth, back in the tail
            ([0.5, 0.25, 0.125, 0.0625, 1.0], False)]
    a = np.array([r for r, _ in rows])
    assert np.array_equal(a.astype(np.float32), a), "products exact in float32"
    got, over = narrow_chain(f, a)
    assert over.tolist() == [m for _, m in rows]
    assert got[0] == top - q and got[5] == 0 and not np.signbit(got[5])  # u absorbed
    assert got[4] == 0 and np.signbit(got[4])
    for k in (5, 4, 3):  # the four-step loop and its tail, each alone and both
        for ovf in (None, "saturate"):
            spec = fs.MatmulSpec(accumulator=fs.Accumulator(f, overflow=ovf))
            assert both_paths(a[:, :k], np.ones((k, 2)), spec) == {"float_chain": 1}


@pytest.mark.parametrize("shapes", [((3, 4), (4, 0)), ((0, 4), (4, 3)), ((3, 0), (0, 3))])
def test_narrow_chain_empty_shapes(shapes):
    """No rows, no columns or no products: the kernel's shapes at their edges."""
    a, b = (np.full(s, 1.5) for s in shapes)
    assert both_paths(a, b, fs.MatmulSpec(accumulator=fs.FP16)) == {"float_chain": 1}
    A = np.full(shapes[0], 1.5)
    out = np.empty((shapes[0][0], shapes[1][1]), np.float32)
    over = gemm_float.gemm_chain_narrow(A, np.full(shapes[1], 1.5), out,
                                   *mcore._narrow_params(fs.FP16))
    assert over.shape == (shapes[0][0],) and not over.any()
    assert_same_bits(out, np.zeros_like(out) + 2.25 * shapes[0][1])


def test_narrow_params_only_for_narrow_formats():
    """FP16 and FP8 get the narrow kernel; BF16, TF32 and a 6-bit exponent do not (their
    range is too wide for its proof); the bound is ``2**(emax + 1) <= 2**53 * u``."""
    for f in NARROW:
        assert mcore._narrow_params(f) is not None, f
    for f in (fs.BF16, fs.TF32, fs.FloatFormat(6, 5), fs.FloatFormat(6, 2)):
        assert mcore._narrow_params(f) is None, f
    assert 2.0**(fs.FloatFormat(5, 21).emax + 1) == 2.0**51 * fs.FloatFormat(5, 21).min_subnormal


@pytest.mark.parametrize("rnd", list(fs.Rounding))
@pytest.mark.parametrize("acc", [fs.FixedFormat(16, 8), fs.FixedFormat(24, 16),
                                 fs.FixedFormat(12, 10), fs.FixedFormat(20, 20, signed=False)])
@pytest.mark.parametrize("ovf", ["saturate", "wrap"])
def test_fixed_chain_path_matches_general(rnd, acc, ovf):
    rng = np.random.default_rng(11)
    inp = fs.FixedFormat(10, 6)
    a = fs.quantize(rng.normal(0, 3, (6, 50)), inp)
    b = fs.quantize(rng.normal(0, 3, (50, 7)), inp)
    rb = 5 if rnd is fs.Rounding.STOCHASTIC else None
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(acc, rnd, ovf, random_bits=rb))
    assert both_paths(a, b, spec) == {"fixed_chain": 1}


@pytest.mark.parametrize("rnd", ["nearest_even", "stochastic", "down"])
@pytest.mark.parametrize("ovf", ["saturate", "wrap"])
def test_fixed_chain_without_rounding_lean_and_clipped_rows(rnd, ovf):
    """Q<16,8> x Q<16,8> into Q<24,16>: the accumulator has the products' quantum, so no step
    rounds and rows run the lean kernel; rows whose sums leave the range (every other row,
    scaled up) are recomputed with the counting step. Both equal the general kernel, counts
    included."""
    rng = np.random.default_rng(12)
    q = fs.FixedFormat(16, 8)
    a = fs.quantize(rng.normal(0, 1, (8, 67)) * np.array([1.0, 9.0] * 4)[:, None], q)
    b = fs.quantize(rng.normal(0, 1, (67, 9)), q)
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FixedFormat(24, 16), rnd, ovf))
    assert both_paths(a, b, spec) == {"fixed_chain": 1}
    _, c = fs.matmul(a, b, spec, stats="steps")
    assert 0 < c.accumulator.overflow


@given(st.sampled_from([fs.FP16, fs.BF16, fs.FP8_E5M2]), st.sampled_from(ALL_ROUNDINGS),
       st.sampled_from([1, 3]), matrices(max_k=16, scale=50.0))
def test_accumulator_via_a_wider_register(fmt, rnd, block, ab):
    acc = fs.Accumulator(fmt, rnd, block=block, via=fs.FP32)
    check(*ab, fs.MatmulSpec(input=fs.FP16, accumulator=acc))


def test_naive_kernel_double_rounds_through_fp32():
    """acc16 = fp16(fp32(acc16 + a*b)) is Accumulator(FP16, via=FP32), not the FMA chain."""
    rng = np.random.default_rng(0)
    a = fs.quantize(rng.standard_normal((64, 64)), fs.FP16)
    b = fs.quantize(rng.standard_normal((64, 64)), fs.FP16)
    naive = np.zeros((64, 64), np.float32)
    for k in range(64):  # the product is exact in float32; the sum rounds twice
        naive = fs.quantize(naive + np.outer(a[:, k], b[k]), fs.FP16)
    via = fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, via=fs.FP32)))
    chain = fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP16))
    assert_same_bits(via, naive)
    assert (chain != naive).sum() > 0
    numpy16 = (a.astype(np.float16) @ b.astype(np.float16)).astype(np.float32)
    assert_same_bits(fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP32, output=fs.FP16)),
                     numpy16)


@pytest.mark.parametrize("scale", ["normal", "wide"])
def test_naive_kernel_in_float64_is_the_fma_chain(scale):
    """acc16 = fp16(fp64(acc16) + fp64(a*b)) on FP16 data is the FMA chain bit for bit: the
    float64 sum may round, but never onto an FP16 midpoint from off it
    (``matmul._narrow_params``). Sums that underflow, reach the top binade and overflow to
    infinity included (numpy's float64 -> float16 cast is the rounding), as is
    ``via=FP64``."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((24, 64)), rng.standard_normal((64, 24))
    if scale == "wide":
        a *= np.exp2(rng.integers(-20, 9, a.shape))
        b *= np.exp2(rng.integers(-16, 7, b.shape))
    a, b = fs.quantize(a, fs.FP16), fs.quantize(b, fs.FP16)
    naive = np.zeros((24, 24), np.float16)
    with np.errstate(over="ignore"):
        for k in range(64):
            naive = (naive.astype(np.float64) + np.outer(a[:, k], b[k]).astype(np.float64)
                     ).astype(np.float16)
    for spec in (fs.MatmulSpec(accumulator=fs.FP16),
                 fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP16, via=fs.FP64))):
        assert_same_bits(fs.matmul(a, b, spec), naive.astype(np.float32), nan_sign=False)
        assert_same_bits(fs.matmul(a, b, spec, stats="steps")[0], naive.astype(np.float32),
                         nan_sign=False)
    if scale == "wide":
        _, c = fs.matmul(a, b, fs.MatmulSpec(accumulator=fs.FP16), stats="steps")
        assert c.accumulator.overflow and c.accumulator.subnormal and c.accumulator.underflow


# -- FP32 chain on products exact only in float64 (fp32_chain64) ----------------------------------
F32_SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0**-24, -(2.0**-24), 3 * 2.0**-25, 1.0 + 2.0**-23,
               0.5 + 2.0**-24, 2.0**-149, -(2.0**-149), 2.0**-126, 3 * 2.0**-127,
               float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max), 2.0**64,
               2.0**-64, 2.0**100, -(2.0**-100), 1.0 / 3.0]


@st.composite
def f32_matrices(draw, max_k=12):
    """Arbitrary float32 values (subnormals, huge, ties, cancellations): products need float64."""
    m, k, n = draw(st.integers(1, 3)), draw(st.integers(0, max_k)), draw(st.integers(1, 3))
    if draw(st.booleans()):
        elems = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                          st.floats(-4.0, 4.0, width=32),
                          st.sampled_from(F32_SPECIAL).map(lambda v: float(np.float32(v))))
    else:  # few-bit values on nearby scales: sums land on float32 midpoints (ties)
        elems = st.builds(lambda sg, m, e: sg * m * 2.0**e, st.sampled_from([1.0, -1.0]),
                          st.sampled_from([1.0, 3.0, 0.75, 1.0 + 2.0**-23, 1.0 - 2.0**-24]),
                          st.sampled_from([0, -1, -12, -13, -24, -25]))

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c)),
                        dtype=np.float32).reshape(r, c)

    return mat(m, k), mat(k, n)


DETERMINISTIC = [r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]


@pytest.mark.parametrize("data,rnd,ovf,path", [
    (fs.BF16, "nearest_even", None, "fp32_chain"),  # float32 loop: products exact in float32
    (None, "nearest_even", None, "fp32_fma"),  # float32 data: the FMA instruction
    (None, "nearest_even", "saturate", "fp32_chain64"),  # float64 lanes from here on
    (None, "up", None, "fp32_chain64"),
    (None, "toward_zero", "saturate", "fp32_chain64"),
    (fs.BF16, "odd", None, "fp32_chain64")])
def test_fp32_chains_rare_columns_and_rows(data, rnd, ovf, path):
    """FP32 chains, four rows at a time: a column of subnormal sums among many (recomputed
    element by element), rows of subnormal or overflowing sums (recomputed whole), and rows
    beyond a multiple of four, in each FP32 chain kernel."""
    rng = np.random.default_rng(22)
    a = ((0.5 + abs(rng.standard_normal((7, 50)))) * rng.choice([-1, 1], (7, 50))
         ).astype(np.float32)
    b = (0.5 + abs(rng.standard_normal((50, 48)))).astype(np.float32)
    b[:, 3] *= np.float32(2.0**-127)
    a[5] = 1.875 * 2.0**123
    if data is None:
        a[2] *= np.float32(2.0**-130)
    else:  # its products with the tiny column would not be exact in float32
        a[2] = a[5]
    a, b = (x if data is None else fs.quantize(x, data).astype(np.float32) for x in (a, b))
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, rnd, ovf))
    assert both_paths(a, b, spec) == {path: 1}
    _, c = fs.matmul(a, b, spec, stats="steps")
    assert c.accumulator.subnormal > 0 and c.accumulator.overflow > 0


@settings(max_examples=300)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from([None, fs.Overflow.SATURATE]),
       st.sampled_from([None, fs.FP16, fs.BF16]), f32_matrices())
def test_fp32_chain64_matches_general(rnd, ovf, out, ab):
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, rnd, ovf), output=out)
    paths = both_paths(*ab, spec)
    assert set(paths) <= {"fp32_chain", "fp32_fma", "fp32_chain64"} and len(paths) == 1


@settings(max_examples=40)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from([None, fs.Overflow.SATURATE]),
       f32_matrices(max_k=6))
def test_fp32_chain64_matches_the_oracle(rnd, ovf, ab):
    check(*ab, fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, rnd, ovf)))


@pytest.mark.parametrize("rnd", DETERMINISTIC)
@pytest.mark.parametrize("ovf", [None, "saturate"])
def test_fp32_chain64_ties_overflow_zeros(rnd, ovf):
    """Crafted rows: exact ties, round to zero, overflow and back, cancellation to zero."""
    big = float(np.finfo(np.float32).max)
    a = np.array([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                  [2.0**-100, 2.0**-100, 2.0**-100, -(2.0**-100), 1.0, 1.0],
                  [big, big, -big, -big, -big, 1.0],
                  [1.0, -1.0, 0.0, -0.0, 1.0 + 2.0**-23, 1.0],
                  [-0.0, -0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    b = np.array([[1.0, 2.0**-24, 3.0],
                  [2.0**-24, 2.0**-24, 1.0 / 3.0],
                  [3 * 2.0**-25, 2.0**-60, -1.0],
                  [-(2.0**-48), 0.0, 2.0**40],
                  [1.0 + 2.0**-23, -0.0, 1.0],
                  [-0.0, 0.0, 2.0**-149]], np.float32)
    spec = fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, rnd, ovf))
    want = "fp32_fma" if (rnd, ovf) == (fs.Rounding.NEAREST_EVEN, None) else "fp32_chain64"
    assert both_paths(a, b, spec) == {want: 1}
    check(a, b, spec)


@pytest.mark.parametrize("scale", ["normal", "wide", "rare"])
def test_fp32_fma_kernel_equals_the_float64_kernel(scale):
    """Nearest even on float32 data runs the FMA instruction (gemm_fma32): the same bits and
    counts as the float64 TwoSum kernel, rows with overflows, subnormals and underflows
    (recomputed by the counting step) included."""
    rng = np.random.default_rng(5)
    shape_a, shape_b = (37, 70), (70, 45)
    if scale == "normal":
        a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
    else:
        lo, hi = (-60, 60) if scale == "wide" else (-75, 66)
        a = rng.standard_normal(shape_a) * 2.0 ** rng.integers(lo, hi, shape_a)
        b = rng.standard_normal(shape_b) * 2.0 ** rng.integers(lo, hi, shape_b)
    a, b = a.astype(np.float32), b.astype(np.float32)
    a[3, ::2] = -a[3, 1::2]  # cancellations to exact zeros
    spec = fs.MatmulSpec(accumulator=fs.FP32)
    got, cg = mm.matmul(a, b, spec, stats="steps")
    want, cw = mm.matmul(a, b, spec, stats="steps", path="fp32_chain64")
    assert cg.paths == {"fp32_fma": 1} and cw.paths == {"fp32_chain64": 1}
    assert_same_bits(got, want)
    assert cg.accumulator == cw.accumulator
    if scale == "rare":
        assert cg.accumulator.overflow and cg.accumulator.subnormal


@pytest.mark.parametrize("data", ["fp16", "float32"])
def test_fp32_chains_count_only_when_read(monkeypatch, data):
    """The FP32 FMA chains run uncounted (the FMA instruction alone) exactly when nothing can
    read the call's counts: no ``stats="steps"`` and no active record block. The bits are the
    same either way (``both_paths`` checks that on every fast-path test)."""
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((6, 33)), rng.standard_normal((33, 5))
    a, b = ((fs.quantize(x, fs.FP16) if data == "fp16" else x).astype(np.float32)
            for x in (a, b))
    spec = fs.MatmulSpec(accumulator=fs.FP32)
    ran = []
    for name in ("gemm_f32_chain", "gemm_fma32"):
        kernel = getattr(gemm_fp32, name)
        monkeypatch.setattr(gemm_fp32, name, lambda *args, _k=kernel, _n=name: (
            ran.append((_n, args[-1] if _n == "gemm_f32_chain" else None)), _k(*args))[1])
    counted = ("gemm_f32_chain", gemm_fp32.F32_SAFE) if data == "fp16" else ("gemm_fma32", None)
    want, c = fs.matmul(a, b, spec, stats="steps")
    assert ran.pop() == counted and c.accumulator.inexact > 0
    assert_same_bits(fs.matmul(a, b, spec), want)
    assert ran.pop() == ("gemm_f32_chain", gemm_fp32.F32_UNCOUNTED)
    with fs.counters.record(steps=True) as rec:
        assert_same_bits(fs.matmul(a, b, spec), want)
    assert ran.pop() == counted and rec.accumulator == c.accumulator
    assert not ran


@pytest.mark.parametrize("kernel,unread,acc", [
    ("gemm_chain_f64", "gemm_chain_f64", fs.Accumulator(fs.FP16, "stochastic")),
    ("gemm_chain_f64", "gemm_chain_f64", fs.Accumulator(fs.BF16, "stochastic", block=3)),
    ("gemm_chain_float", "gemm_chain_narrow", fs.Accumulator(fs.FP16)),
    ("gemm_chain_float", "gemm_chain_narrow", fs.Accumulator(fs.FP8_E5M2)),
    ("gemm_chain_float", "gemm_chain_float", fs.Accumulator(fs.BF16)),
    ("gemm_chain_float", "gemm_chain_float", fs.Accumulator(fs.FloatFormat(6, 5))),
    ("gemm_chain_float", "gemm_chain_float", fs.Accumulator(fs.FP16, "toward_zero"))])
def test_float_chains_count_only_when_read(monkeypatch, kernel, unread, acc):
    """The float-accumulator kernels are told to count exactly when something can read the
    counts (nearest even and stochastic rounding then skip the work that only counts); the
    bits (draws included) are the same either way. Unread, a nearest-even chain into a
    format of narrow range (FP16, FP8; not BF16 or a 6-bit exponent) runs the uncounted
    float64 kernel instead."""
    rng = np.random.default_rng(10)
    a, b = (fs.quantize(rng.standard_normal(s), fs.FP16) for s in ((5, 40), (40, 7)))
    spec = fs.MatmulSpec(accumulator=acc, seed=4)
    ran = []
    for name in {kernel, unread}:
        run = getattr(gemm_float, name)
        monkeypatch.setattr(gemm_float, name, lambda *args, _r=run, _n=name: (
            ran.append((_n, args[-1] if _n != "gemm_chain_narrow" else False)), _r(*args))[1])
    want, c = fs.matmul(a, b, spec, stats="steps")
    assert ran.pop() == (kernel, True) and c.accumulator.inexact > 0
    assert_same_bits(fs.matmul(a, b, spec), want)
    assert ran.pop() == (unread, False)
    with fs.counters.record(steps=True) as rec:
        assert_same_bits(fs.matmul(a, b, spec), want)
    assert ran.pop() == (kernel, True) and rec.accumulator == c.accumulator
    assert not ran


def test_fp32_chain64_wide_fixed_point_inputs():
    """Q<16,8> x Q<16,8> products have up to 32 bits: exact in float64, not in float32."""
    rng = np.random.default_rng(12)
    a = rng.normal(0, 30, (7, 90))
    b = rng.normal(0, 30, (90, 5))
    for rnd in DETERMINISTIC:
        spec = fs.MatmulSpec(input=fs.FixedFormat(16, 8),
                             accumulator=fs.Accumulator(fs.FP32, rnd), output=fs.FP16)
        want = "fp32_fma" if rnd is fs.Rounding.NEAREST_EVEN else "fp32_chain64"
        assert both_paths(a, b, spec) == {want: 1}


# -- the operand scan that chooses the kernels ----------------------------------------------------
def bits_numpy(x):
    """The former numpy implementation of ``_Bits.of`` (several passes), kept as the oracle."""
    finite = bool(np.isfinite(x).all())
    v = np.abs(x[np.isfinite(x) & (x != 0)])
    if v.size == 0:
        return mcore._Bits(finite, 0, 0, -1075, 0)
    m, e = np.frexp(v)
    mi = (m * 2.0**53).astype(np.int64)
    low = mi & -mi
    tz = np.frexp(low.astype(np.float64))[1] - 1
    lsb = int((e - 53 + tz).min())
    top = int(e.max())
    return mcore._Bits(finite, int((53 - tz).max()), lsb, top, top - lsb)


@settings(max_examples=300)
@given(st.sampled_from([np.float64, np.float32]), st.data())
def test_operand_scan_matches_numpy(dtype, data):
    from hypothesis.extra import numpy as hnp

    width = 64 if dtype is np.float64 else 32
    elems = st.one_of(
        st.floats(width=width),  # zeros, subnormals, infinities, NaN, huge
        st.sampled_from([0.0, -0.0, 5e-324, 2.0**-1022, 2.0**-149, 1.0, -3.0, 2.0**-126]),
        st.integers(-2**20, 2**20).map(float))
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=0, max_side=40))
    with np.errstate(all="ignore"):  # float32 casts of the sampled float64 values
        x = data.draw(hnp.arrays(dtype, shape, elements=elems.map(lambda v: dtype(v))))
    assert mcore._Bits.of(x) == bits_numpy(x)


def test_operand_scan_large_and_chunked():
    """Several chunks of the parallel scan: the combined fields are those of the whole array."""
    rng = np.random.default_rng(13)
    x = rng.standard_normal(100_003) * np.exp2(rng.integers(-1060, 1000, 100_003))
    x[::7] = 0.0
    x[5] = np.ldexp(3.0, -1074)
    assert mcore._Bits.of(x) == bits_numpy(x)
    x[99_999] = np.nan
    assert mcore._Bits.of(x) == bits_numpy(x)
    assert mcore._Bits.of(np.zeros((3, 0))) == bits_numpy(np.zeros((3, 0)))
    # float32 data are scanned as float32 (widened in a register): the same fields
    with np.errstate(over="ignore"):
        x32 = x.astype(np.float32)
    x32[7] = np.float32(2.0**-149)
    assert mcore._Bits.of(x32) == bits_numpy(x32) == bits_numpy(x32.astype(np.float64))
    x32[99_999] = 1.0
    assert mcore._Bits.of(x32) == bits_numpy(x32)


@settings(max_examples=200)
@given(st.one_of(st.integers(0, 2**52), st.integers(0, 52).map(lambda e: 2**e),
                 st.integers(1, 52).map(lambda e: 2**e - 1)))
def test_small_f64_and_log2_by_bits(n):
    """The conversions the scan and the filter use instead of int64 -> float64 (which AVX2
    lacks): exact for every ``0 <= n <= 2**52``, the top included (``2**52``, whose bit
    pattern an OR with ``2**52``'s would not change)."""
    from numba import njit

    from fixedsim.jit.bits import small_f64, small_log2

    f = njit(lambda v: (small_f64(v), small_log2(v)))
    val, lg = f(np.int64(n))
    assert val == float(n)
    assert lg == (n.bit_length() - 1 if n else -1023)


@settings(max_examples=200)
@given(st.one_of(st.integers(0, 2**52 - 1), st.integers(0, 51).map(lambda e: 2**e),
                 st.integers(1, 52).map(lambda e: 2**e - 1)))
def test_small_int_by_bits(n):
    """float64 -> int64 for the integers below ``2**52`` by bits (AVX2 has no instruction for
    it either): exact, the inverse of ``small_f64``."""
    from numba import njit

    from fixedsim.jit.bits import small_f64, small_int

    f = njit(lambda x: small_int(x))
    assert f(float(n)) == n
    assert njit(lambda v: small_int(small_f64(v)))(np.int64(n)) == n


def _sr_limit_rule(frac, neg, draw, rbits):
    """Stochastic rounding's rule as :func:`fixedsim.jit.quant.sr_limit` states it, in
    Python's integers and fractions: floor and ceil of ``frac * 2**rbits``, then the limit."""
    import fractions
    import math

    z = fractions.Fraction(frac) * 2**rbits
    t, c = math.floor(z), math.ceil(z)
    if neg:
        return int(draw >= (2**rbits - c) % 2**64)
    return int(draw < t)


@settings(max_examples=400)
@given(st.integers(1, 64), st.booleans(), st.data())
def test_sr_up_is_sr_limits_rule(rbits, neg, data):
    """``sr_up`` (no float64 <-> uint64 conversion, so that loops vectorise on AVX2) decides
    as ``sr_limit`` does, for every number of random bits and both signs: draws at, just
    below and just above ``floor``/``ceil`` of ``frac * 2**rbits`` and its complement,
    fractions with 53 significant bits, tiny ones, zero, dyadic ones (``z`` an integer)."""
    from numba import njit

    from fixedsim.jit import quant as q

    frac = data.draw(st.one_of(
        st.floats(0.0, 1.0, exclude_max=True),
        st.integers(0, 2**53 - 1).map(lambda m: m / 2**53),
        st.integers(0, 2**rbits - 1).map(lambda m: m / 2**rbits),
        st.integers(1, 1074).map(lambda e: 2.0**-e)))
    import math

    z = frac * 2.0**rbits
    top = 2**rbits - 1
    near = [math.floor(z), math.ceil(z), top - math.floor(z), top - math.ceil(z)]
    draws = {min(max(v + d, 0), top) for v in near for d in (-1, 0, 1)}
    draws.add(data.draw(st.integers(0, top)))
    sr_up = njit(lambda f, n, dr, r: q.sr_up(f, n, dr, r))
    limit = njit(lambda t, c, r, n: q.sr_limit(t, c, r, n, True))
    for draw in sorted(draws):
        want = _sr_limit_rule(frac, neg, draw, rbits)
        got = sr_up(frac, np.int64(neg), np.uint64(draw), np.int64(rbits))
        assert got == want, (frac, neg, draw, rbits)
        if frac:  # the kernel's own rule, by its uint64 limit, agrees as well
            t, c = np.uint64(math.floor(z)), np.uint64(math.ceil(z))
            lim, below = limit(t, c, np.int64(rbits), neg)
            assert want == int((draw < lim) if below else (draw >= lim))


@st.composite
def bf16_scaled_matrices(draw, max_k=12):
    """BF16-like values (8 significant bits) on scales where FP32 sums overflow or become
    subnormal while every product stays exact in float32."""
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(0, max_k)), draw(st.integers(1, 3))
    elems = st.builds(lambda sg, c, e: sg * c * 2.0**e, st.sampled_from([1.0, -1.0]),
                      st.integers(128, 255).map(lambda c: c / 128.0),
                      st.sampled_from([-66, -64, -40, -1, 0, 20, 60, 62]))

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c))).reshape(r, c)

    return mat(m, k), mat(k, n)


@settings(max_examples=150)
@given(bf16_scaled_matrices())
def test_fp32_chain_lean_and_rare_rows_match_general(ab):
    """Rows whose sums stay normal run the lean kernel; the others are recomputed counting
    overflows and subnormals: both equal the general kernel, counts included."""
    paths = both_paths(*ab, fs.MatmulSpec(accumulator=fs.FP32))
    assert paths == {"fp32_chain": 1}


# -- exact accumulation of float32 data rounded once (exact_filtered) -----------------------------
FILTER_OUT = [fs.FP32, fs.FP16, fs.BF16, fs.FP8_E4M3, fs.FP8_E5M2]
FILTERED = {"exact_filtered", "exact_filtered_general", "reference"}


@st.composite
def f32_wide_matrices(draw, max_k=14):
    """float32 data for exact sums: huge dynamic range, few-bit values on nearby scales (ties
    and exact results), small integers, cancellation to zero, scales whose sums are subnormal
    or overflow in FP16/FP32."""
    m, k, n = draw(st.integers(1, 4)), draw(st.integers(1, max_k)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["any", "ties", "ints", "scaled"]))
    if kind == "any":
        elems = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                          st.floats(-4.0, 4.0, width=32),
                          st.sampled_from(F32_SPECIAL).map(lambda v: float(np.float32(v))))
    elif kind == "ties":
        elems = st.builds(lambda sg, m, e: sg * m * 2.0**e, st.sampled_from([1.0, -1.0]),
                          st.sampled_from([1.0, 3.0, 0.75, 1.0 + 2.0**-23, 1.0 - 2.0**-24]),
                          st.sampled_from([0, -1, -11, -12, -24, -25, -60]))
    elif kind == "ints":
        elems = st.one_of(st.integers(-8, 8).map(float), st.sampled_from([2.0**-70, 2.0**40]))
    else:
        e = draw(st.sampled_from([-80, -70, -62, -14, 7, 8, 60, 63]))
        elems = st.builds(lambda v: float(np.float32(v * 2.0**e)), st.floats(-2.0, 2.0))

    def mat(r, c):
        return np.array(draw(st.lists(elems, min_size=r * c, max_size=r * c)),
                        dtype=np.float32).reshape(r, c)

    a, b = mat(m, k), mat(k, n)
    if draw(st.booleans()):  # a row that cancels to an exact zero
        a[0] = np.concatenate([a[0, : k // 2], -a[0, : k // 2], a[0, 2 * (k // 2):] * 0])
        b[: 2 * (k // 2)] = np.concatenate([b[: k // 2], b[: k // 2]])
    return a, b


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(DETERMINISTIC), st.sampled_from(FILTER_OUT), f32_wide_matrices())
def test_exact_filtered_matches_general(rnd, out, ab):
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    paths = both_paths(*ab, spec)
    if ab[0].any() and ab[1].any():  # all-zero operands: the general kernel (signs of zero)
        assert set(paths) <= FILTERED | {"exact_blas"}, paths
        assert len(set(paths) & {"exact_filtered", "exact_blas"}) == 1, paths


def test_exact_filtered_taken_on_plain_float32():
    rng = np.random.default_rng(21)
    a = rng.standard_normal((12, 40)).astype(np.float32)
    b = rng.standard_normal((40, 12)).astype(np.float32)
    for out in FILTER_OUT:
        for rnd in DETERMINISTIC:
            spec = fs.MatmulSpec(output=out, output_rounding=rnd)
            assert both_paths(a, b, spec) == {"exact_filtered": 1}
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    _, c = fs.conv2d(x, w, fs.MatmulSpec(output=fs.FP32), padding=1, stats="steps")
    assert "exact_filtered" in c.paths


@pytest.mark.parametrize("rnd", DETERMINISTIC)
@pytest.mark.parametrize("out", [fs.FP32, fs.FP16, fs.BF16])
def test_exact_filtered_recomputes_undecided_elements(rnd, out):
    """Sums that are exact ties or exact values of the output, all-zero products (signed
    zeros), cancellations and overflow: those elements fail the filter and are recomputed."""
    m = out.man_bits
    big = float(np.float32(out.max))
    a = np.array([[1.0, 2.0**-(m + 1), 0.0, 0.0],  # a tie of the output format
                  [1.0, 2.0**-(m + 1), 2.0**-60, 0.0],  # just above the tie
                  [3.0, 5.0, 0.0, 0.0],  # an exact small integer
                  [-0.0, 0.0, -0.0, 0.0],  # all products zero
                  [1.0 / 3.0, -1.0 / 3.0, 0.0, 0.0],  # cancels to an exact zero
                  [big, big, 0.0, 0.0],  # overflows
                  [2.0**-100, 0.0, 0.0, 2.0**60]], np.float32)  # a wide span: no exact_blas
    b = np.array([[1.0, -1.0, 0.0],
                  [1.0, -1.0, -0.0],
                  [1.0, 1.0, 2.0**-24],
                  [1.0, -0.0, 3.0]], np.float32)
    spec = fs.MatmulSpec(output=out, output_rounding=rnd)
    paths = both_paths(a, b, spec)
    assert paths["exact_filtered"] == 1 and paths["exact_filtered_general"] >= 4
    check(a, b, spec)
