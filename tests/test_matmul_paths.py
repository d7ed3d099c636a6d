"""The path table (fixedsim.matmul.PATHS): every row against the general kernel and the oracle,
the oracle's share on ordinary data, explain() and matmul(path=...)."""

import numpy as np
import pytest
from helpers import assert_same_bits

import fixedsim as fs
from fixedsim import reference
from fixedsim.matmul import PATHS, explain

Q8_4, Q12_8, Q16_6, Q16_8 = (fs.FixedFormat(8, 4), fs.FixedFormat(12, 8), fs.FixedFormat(16, 6),
                             fs.FixedFormat(16, 8))


def ordinary(kind, shape, rng):
    """Data a network sees: normal, uniform, ReLU activations, small backpropagated errors."""
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "uniform":
        return rng.uniform(-1, 1, shape)
    if kind == "relu":
        return np.maximum(rng.standard_normal(shape), 0.0)
    return 1e-3 * rng.standard_normal(shape) * rng.uniform(0.1, 1, shape[-1])


#: One spec per row under which that row runs on ordinary data, and how the data is made (the
#: operands' container: float64 values, or float32 ones). A new row must add its case here.
ROW_CASES = {
    "blockfma": (fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(16, 2, min_exp=-133)),
                 np.float64),
    "exact_blas": (fs.MatmulSpec(input=Q12_8, output=Q16_6), np.float64),
    "zero_products": (fs.MatmulSpec(output=fs.FP16), "zeros"),
    "exact_filtered": (fs.MatmulSpec(output=fs.FP16), np.float32),
    "exact_ozaki": (fs.MatmulSpec(), np.float64),
    "fp32_chain": (fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32), np.float64),
    "fp32_fma": (fs.MatmulSpec(accumulator=fs.FP32), np.float32),
    "fp32_chain64": (fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, "toward_zero")),
                     np.float32),
    "float_chain": (fs.MatmulSpec(input=fs.BF16, accumulator=fs.BF16, output=fs.FP32),
                    np.float64),
    "fixed_chain": (fs.MatmulSpec(input=Q8_4, accumulator=fs.Accumulator(Q16_6, "stochastic"),
                                  seed=3), np.float64),
    "float_chain64": (fs.MatmulSpec(input=fs.FP16,
                                    accumulator=fs.Accumulator(fs.FP16, "stochastic", block=4),
                                    seed=5), np.float64),
    "float_chain64_scaled": (fs.MatmulSpec(accumulator=fs.Accumulator(fs.FP32, block=16)),
                             "scaled"),
    "rounded_products": (fs.MatmulSpec(input=fs.FP16, product=fs.FP16, accumulator=fs.FP16),
                         np.float64),
    "general": (fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, "down",
                                                                         block=4)), np.float64),
}


def row_case(name, kind, shape=(9, 40, 7), seed=0):
    spec, data = ROW_CASES[name]
    rng = np.random.default_rng(seed)
    R, K, N = shape
    a, b = ordinary(kind, (R, K), rng), ordinary(kind, (K, N), rng)
    if kind == "errors" and isinstance(spec.input, fs.FixedFormat):
        a, b = a * 200, b * 200  # errors scaled into the fixed-point range, as loss scaling does
    if data == "zeros":  # a dead layer: every activation zero, of both signs
        a = np.where(rng.random((R, K)) < 0.5, -0.0, 0.0)
    elif data == "scaled":  # BF16 values times an odd 24-bit factor each, as a tensor scale
        a = fs.quantize(a, fs.BF16).astype(np.float64) * (0x9CD6AB * 2.0**-24)
        b = fs.quantize(b, fs.BF16).astype(np.float64) * (0xBE0D15 * 2.0**-24)
    else:
        a, b = a.astype(data), b.astype(data)
    return spec, a, b


def test_every_row_has_a_case():
    """A row added to the table without a case here would go untested."""
    assert set(ROW_CASES) == {r.name for r in PATHS}
    assert PATHS[-1].name == "general"
    assert len({r.name for r in PATHS}) == len(PATHS)
    for r in PATHS:
        assert len(r.computes) > 20 and len(r.proof) > 20, r.name


@pytest.mark.parametrize("kind", ["normal", "uniform", "relu", "errors"])
@pytest.mark.parametrize("name", [r.name for r in PATHS])
def test_row_matches_the_general_kernel(name, kind):
    """Each row, where it applies, gives the general kernel's bits and counts, counted or
    not; the Fraction oracle computes no element of ordinary data (its share is zero for
    every row), and a row's own fallback to the general kernel stays under 1%."""
    spec, a, b = row_case(name, kind)
    assert explain(a, b, spec).path == name
    got, c = fs.matmul(a, b, spec, stats="steps")
    unread = fs.matmul(a, b, spec)
    forced = fs.matmul(a, b, spec, path=name)
    want, cw = fs.matmul(a, b, spec, stats="steps", path="general")
    for y in (got, unread, forced):
        assert y.dtype == want.dtype
        assert_same_bits(y.astype(np.float64), want.astype(np.float64), err_msg=name)
    for stage in ("input", "product", "accumulator", "output"):
        assert getattr(c, stage) == getattr(cw, stage), stage
    assert c.paths.get(name) == 1
    outputs = got.size
    assert c.paths.get("reference", 0) == 0
    assert c.paths.get(f"{name}_general", 0) <= 0.01 * outputs
    fmt = spec.result_format
    if name not in ("general", "blockfma") and not (isinstance(fmt, fs.FloatFormat)
                                                    and fmt.man_bits > 50):
        # (the general kernel leaves an inexact sum rounded into a 53-bit format, float64,
        # to the oracle: that is what exact_ozaki is for; for a BlockFMA the general row is
        # the oracle on every element)
        assert cw.paths.get("reference", 0) == 0


@pytest.mark.parametrize("name", [r.name for r in PATHS if not ROW_CASES[r.name][0].stochastic])
def test_row_matches_the_oracle(name):
    """Each deterministic row's case against fixedsim.reference, on a small product."""
    spec, a, b = row_case(name, "normal", shape=(4, 12, 3), seed=1)
    assert explain(a, b, spec).path == name
    got = fs.matmul(a, b, spec)
    want = reference.matmul(a, b, spec)
    assert_same_bits(got.astype(np.float64), want)


def test_explain_says_why_each_faster_row_declined():
    a = np.ones((2, 3))
    b = np.ones((3, 2))
    e = explain(a, b, fs.MatmulSpec(product=fs.FP16))
    assert e.path == "rounded_products"
    names = [r.name for r in PATHS]
    assert [n for n, _ in e.declined] == names[:names.index("rounded_products")]
    assert all(why == "products are rounded (spec.product is set)" for _, why in e.declined)
    text = str(e)
    assert text.splitlines()[0].startswith("exact_blas: declined: products are rounded")
    assert "rounded_products: runs:" in text and "proof:" in text
    e = explain(a, b, fs.MatmulSpec(product=fs.FP16,
                                    accumulator=fs.Accumulator(fs.FP16, via=fs.FP32)))
    assert e.path == "general" and len(e.declined) == len(PATHS) - 1
    assert "via" in dict(e.declined)["rounded_products"]
    e = explain(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP32, "up")))
    reasons = dict(e.declined)
    assert reasons["fp32_chain"] == "the accumulator does not round to nearest even"
    assert reasons["exact_blas"] == "the accumulator is not fixed point"
    assert e.path == "fp32_chain64"
    e = explain(np.array([[np.inf, 1.0]]), np.ones((2, 1)), fs.MatmulSpec(accumulator=fs.FP32))
    assert dict(e.declined)["fp32_fma"] == "an operand holds an infinity or a NaN"
    assert fs.matmul.explain is fs.explain is explain


def test_explain_follows_input_quantization():
    """The rows see the operands as quantized by spec.input: float64 data quantized to FP16
    takes the FP16 rows."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((5, 2))
    assert explain(a, b, fs.MatmulSpec(accumulator=fs.FP32)).path != "fp32_chain"
    assert explain(a, b, fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32)).path == "fp32_chain"


def test_forced_path_that_declines_or_is_unknown_raises():
    a, b = np.ones((2, 3)), np.ones((3, 2))
    with pytest.raises(ValueError, match=r"path 'fp32_chain' does not apply: there is no "
                                         r"accumulator"):
        fs.matmul(a, b, fs.MatmulSpec(output=fs.FP16), path="fp32_chain")
    with pytest.raises(ValueError, match=r"unknown path 'fastest'; the paths are exact_blas, "):
        fs.matmul(a, b, path="fastest")
    with pytest.raises(TypeError, match="spec must be a MatmulSpec"):
        explain(a, b, "fp16")


@pytest.mark.parametrize("rnd", ["nearest_even", "toward_zero", "down", "odd"])
def test_general_kernel_rounds_long_residuals_without_the_oracle(rnd):
    """Exact sums of float32 products leave expansions whose residual below the rounded sum
    has three or more components; the general kernel rounds them itself (their sum has the
    residual's sign, all a deterministic rounding reads) and matches the oracle."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((6, 40)).astype(np.float32)
    b = rng.standard_normal((40, 5)).astype(np.float32)
    for out in (fs.FP16, fs.FP32, fs.BF16):
        spec = fs.MatmulSpec(output=out, output_rounding=rnd)
        got, c = fs.matmul(a, b, spec, stats="steps", path="general")
        assert "reference" not in c.paths
        assert_same_bits(got.astype(np.float64), reference.matmul(a, b, spec))


@pytest.mark.parametrize("name", ["fp32_chain", "fp32_fma", "float_chain", "float_chain64",
                                  "fixed_chain", "rounded_products", "general"])
def test_stats_true_counts_all_but_the_per_step_events(name):
    """``stats=True`` gives the counts that do not grow with the MACs exactly (calls, MACs,
    every stage's roundings, input and output events, paths) and None for the product and
    accumulator events; ``stats="steps"`` and ``record(steps=True)`` count those too. The
    bits are the same."""
    spec, a, b = row_case(name, "normal")
    y, cheap = fs.matmul(a, b, spec, stats=True)
    z, full = fs.matmul(a, b, spec, stats="steps")
    assert_same_bits(y.astype(np.float64), z.astype(np.float64))
    assert (cheap.calls, cheap.macs, cheap.paths) == (full.calls, full.macs, full.paths)
    assert cheap.input == full.input and cheap.output == full.output
    for stage in ("product", "accumulator"):
        c, f = getattr(cheap, stage), getattr(full, stage)
        assert c.roundings == f.roundings
        assert c.inexact is c.overflow is c.underflow is c.subnormal is c.nan is None
        assert None not in (f.inexact, f.overflow, f.underflow, f.subnormal, f.nan)
    assert full.accumulator.roundings > 0 and full.accumulator.inexact > 0
    with fs.counters.record(steps=True) as outer:
        with fs.counters.record() as inner:  # an outer block asking for steps rules
            fs.matmul(a, b, spec)
    assert outer.accumulator == inner.accumulator == full.accumulator
    with fs.counters.record() as rec:
        fs.matmul(a, b, spec)
    assert rec.accumulator.inexact is None and rec.output == full.output
    total = fs.counters.Counters()
    total += full
    total += cheap
    assert total.accumulator.inexact is None and total.accumulator.roundings == 2 * (
        full.accumulator.roundings)


def test_stats_must_be_a_known_value():
    with pytest.raises(ValueError, match=r"stats must be False, True or 'steps'.*got 'all'"):
        fs.matmul(np.ones((1, 1)), np.ones((1, 1)), stats="all")
    with pytest.raises(TypeError, match="record: steps must be True or False"):
        with fs.counters.record(steps="yes"):
            pass


@pytest.mark.parametrize("name", [r.name for r in PATHS])
def test_every_row_takes_the_addend_or_declines_it(name):
    """An addend ``c`` is computed by the rows that take it, bit for bit as the oracle, and
    declined with its reason by the others (then a row that takes it runs): never ignored."""
    row = next(r for r in PATHS if r.name == name)
    spec, a, b = row_case(name, "normal", shape=(4, 12, 3), seed=2)
    c = np.random.default_rng(3).standard_normal((4, 3)) * 2.0 ** np.arange(-3, 3)[:3]
    if spec.stochastic:
        spec = fs.MatmulSpec(input=spec.input, accumulator=fs.Accumulator(
            spec.accumulator.fmt, "nearest_even", block=spec.accumulator.block))
    want = reference.matmul(a, b, spec, c=c)
    if "c" in row.takes:
        assert_same_bits(fs.matmul(a, b, spec, c, path=name).astype(np.float64), want)
    else:
        with pytest.raises(ValueError, match="addend c is given"):
            fs.matmul(a, b, spec, c, path=name)
        declined = dict(explain(a, b, spec, c=c).declined)
        assert declined[name] == "an addend c is given, which this row does not take"
    assert_same_bits(fs.matmul(a, b, spec, c).astype(np.float64), want)


@pytest.mark.parametrize("name", [r.name for r in PATHS if "blockfma" not in r.takes])
def test_rows_that_do_not_take_blockfma_decline_it(name):
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.BlockFMA(8, 1))
    a, b = np.ones((2, 8)), np.ones((8, 2))
    with pytest.raises(ValueError, match="BlockFMA"):
        fs.matmul(a, b, spec, path=name)


@pytest.mark.parametrize("name", [r.name for r in PATHS])
def test_float32_operands_give_the_bits_of_their_float64_copies(name, monkeypatch):
    """Operands that come as float32 stay float32 in the product (widened to float64 only
    when a row asks): every row gives the same bits and counts for float32 operands as for
    their float64 copies, and the FP32 chains, uncounted, read them without any float64
    copy."""
    from fixedsim.matmul import paths as _paths

    spec, a, b = row_case(name, "normal")
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    if name in ("float_chain64_scaled", "zero_products") or not (
            np.array_equal(a32, a) and np.array_equal(b32, b)):
        a, b = a32.astype(np.float64), b32.astype(np.float64)  # the float32 values
    path = None if name == "float_chain64_scaled" else name  # float32 data: float_chain64
    got, c = fs.matmul(a32, b32, spec, stats="steps", path=path)
    widened = []  # the Product's widenings of A and B to float64
    orig = _paths.contiguous
    monkeypatch.setattr(_paths, "contiguous",
                        lambda x, dt=None: widened.append(x.shape) or orig(x, dt))
    unread = fs.matmul(a32, b32, spec, path=path)
    if name in ("fp32_chain", "fp32_fma"):  # uncounted: the FMA instruction on float32
        assert widened == []
    want, cw = fs.matmul(a, b, spec, stats="steps", path=path)
    for y in (got, unread):
        assert_same_bits(y.astype(np.float64), want.astype(np.float64), err_msg=name)
    for stage in ("input", "product", "accumulator", "output"):
        assert getattr(c, stage) == getattr(cw, stage), stage


def _gram_case(name, kind):
    """Row ``name``'s case as a Gram product ``x @ x.T`` (``x`` its first operand), the input
    rounding done beforehand (a Gram product is recognised only without one)."""
    import dataclasses

    spec, a, _ = row_case(name, kind)
    if spec.input is not None:
        a = fs.quantize(a, spec.input, spec.input_rounding).astype(a.dtype)
        spec = dataclasses.replace(spec, input=None)
    return spec, a


@pytest.mark.parametrize("kind", ["normal", "relu"])
@pytest.mark.parametrize("name", [r.name for r in PATHS])
def test_gram_products_give_the_bits_of_a_copy(name, kind, monkeypatch):
    """``x @ x.T`` and ``x.T @ x`` (the first operand the second transposed in memory: a
    Gram product, built from one operand, scanned once) give the bits, the counts and the
    path of the same product on a transposed copy, by whichever row runs and by the row of
    each case forced; the operands are scanned once, not twice."""
    from fixedsim.matmul import core as _core

    spec, x = _gram_case(name, kind)
    xt = np.ascontiguousarray(x.T)
    scans = []
    orig = _core._Bits.of
    monkeypatch.setattr(_core._Bits, "of", lambda arr: scans.append(arr.shape) or orig(arr))
    for a, b, copy in ((x, x.T, (x, xt)), (xt.T, xt, (x, xt))):
        scans.clear()
        got, c = fs.matmul(a, b, spec, stats="steps")
        n_gram = len(scans)
        scans.clear()
        want, cw = fs.matmul(*copy, spec, stats="steps")
        assert n_gram == len(scans) - 1, (n_gram, scans)  # (a row may scan data it makes)
        assert_same_bits(got.astype(np.float64), want.astype(np.float64), err_msg=name)
        for stage in ("input", "product", "accumulator", "output"):
            assert getattr(c, stage) == getattr(cw, stage), stage
        assert c.paths == cw.paths
        try:
            forced = fs.matmul(*copy, spec, path=name)
        except ValueError:  # the row does not apply to the Gram data: nor to the Gram product
            with pytest.raises(ValueError, match="does not apply"):
                fs.matmul(a, b, spec, path=name)
        else:
            assert_same_bits(fs.matmul(a, b, spec, path=name).astype(np.float64),
                             forced.astype(np.float64), err_msg=name)


@pytest.mark.parametrize("name", [r.name for r in PATHS])
def test_products_leave_no_reference_cycle(name):
    """A product, Gram or not, by whichever row runs and by the row forced, frees its
    operands and the copies it made when it returns: nothing of it waits for the cyclic
    garbage collector (a cycle through the call's state held the im2col rows of every
    K-FAC statistics product until the collector ran, gigabytes at batch 8,192)."""
    import gc

    spec, x = _gram_case(name, "normal")
    xt = np.ascontiguousarray(x.T)
    calls = [lambda: fs.matmul(x, x.T, spec), lambda: fs.matmul(xt.T, xt, spec),
             lambda: fs.matmul(x, xt, spec)]
    try:
        fs.matmul(x, xt, spec, path=name)
        calls += [lambda: fs.matmul(x, x.T, spec, path=name),
                  lambda: fs.matmul(x, xt, spec, path=name)]
    except ValueError:  # the row does not apply to this case
        pass
    for call in calls:
        call()  # compiled and imported once, before counting
    gc.collect()
    gc.disable()
    try:
        for i, call in enumerate(calls):
            call()
            assert gc.collect() == 0, (name, i)
    finally:
        gc.enable()


def test_union_of_scans_is_the_scan_of_the_values_together():
    """``_Bits.union`` of two arrays' scans equals the scan of their values together (what
    K-FAC gives its Gram products for an im2col matrix with a column of ones), with zeros,
    an all-zero array and a non-finite value."""
    from fixedsim.matmul.core import _Bits

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(7), np.round(rng.standard_normal(5) * 16) / 4,
              np.zeros(3), np.ones(1), np.array([0.0, 2.0**-30, -(2.0**12)]),
              np.array([1.5, np.inf]), rng.standard_normal(4).astype(np.float32)]
    for x in arrays:
        for y in arrays:
            together = np.concatenate([x.astype(np.float64), y.astype(np.float64)])
            assert _Bits.of(x).union(_Bits.of(y)) == _Bits.of(together), (x, y)
