"""Accumulators with lanes, order, combine and addend; the CPU and AMD presets; this CPU's
instructions (F16C, FMA3, VDPBF16PS, AMX TDPBF16PS) against their fixedsim models."""

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import hardware, reference
from fixedsim.hardware import cpu
from fixedsim.testing import boundary_values, float_formats

FTZ32 = fs.FloatFormat(8, 23, subnormals=False)
_DET = [fs.Rounding.NEAREST_EVEN, fs.Rounding.NEAREST_AWAY, fs.Rounding.TOWARD_ZERO,
        fs.Rounding.DOWN, fs.Rounding.UP, fs.Rounding.ODD]


# -- the definition on hand-computed cases --------------------------------------------------------
def test_reduce_block_order_within_a_pair():
    """VDPBF16PS takes the odd element first: 2**24 - 2**24 + 1 = 1; even first loses the 1."""
    desc = fs.Accumulator(fs.FP32, block=2, lanes=1, order="descending")
    asc = fs.Accumulator(fs.FP32, block=2, lanes=1)
    assert reference.reduce_block(2.0**24, [1.0, -2.0**24], desc) == 1.0
    assert reference.reduce_block(2.0**24, [1.0, -2.0**24], asc) == 0.0


def test_reduce_block_two_chains_then_addend():
    """AMX: even chain 1 + 1 = 2, odd chain 2**24 - 2**24 = 0, then C: 2**24 + 2 (one chain
    through C loses both ones)."""
    amx = fs.Accumulator(fs.FP32, block=4, lanes=2, addend="last")
    chain = fs.Accumulator(fs.FP32, block=4, lanes=1)
    prods = [1.0, 2.0**24, 1.0, -2.0**24]
    assert reference.reduce_block(2.0**24, prods, amx) == 2.0**24 + 2
    assert reference.reduce_block(2.0**24, prods, chain) == 2.0**24


def test_reduce_block_tree_or_sequential():
    """(1 + u) + (u + u) keeps 2u; ((1 + u) + u) + u loses each u (u = 2**-24, a half ulp)."""
    u = 2.0**-24
    tree = fs.Accumulator(fs.FP32, block=4, lanes=4)
    seq = fs.Accumulator(fs.FP32, block=4, lanes=4, combine="sequential")
    assert reference.reduce_block(0.0, [1.0, u, u, u], tree) == 1.0 + 2 * u
    assert reference.reduce_block(0.0, [1.0, u, u, u], seq) == 1.0


def test_exact_block_with_addend_last_rounds_twice():
    """C last: the block 1 + 2**-24 rounds to 1 first, then 2**24 + 1 rounds to 2**24."""
    last = fs.Accumulator(fs.FP32, block=2, addend="last")
    first = fs.Accumulator(fs.FP32, block=2)
    assert reference.reduce_block(2.0**24, [1.0, 1.0], last) == 2.0**24 + 2
    assert reference.reduce_block(2.0**24, [1.0, 2.0**-30], last) == 2.0**24
    assert reference.reduce_block(2.0**24, [1.0, 2.0**-30], first) == 2.0**24 + 2


def test_lanes_one_is_the_fma_chain():
    """lanes=1, ascending, addend first is the chain of block=1, bit for bit."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 19)) * np.exp2(rng.integers(-30, 30, (6, 19)))
    b = rng.standard_normal((19, 5))
    for blk in (1, 3, 8):
        s1 = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, block=1))
        s2 = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, block=blk,
                                                                    lanes=1))
        assert_same_bits(fs.matmul(a, b, s2), fs.matmul(a, b, s1))


# -- the kernel against the oracle ----------------------------------------------------------------
@st.composite
def structured_specs(draw):
    fmt = draw(st.one_of(st.sampled_from([fs.FP32, FTZ32, fs.FP16, fs.BF16]),
                         float_formats(max_exp_bits=8, max_man_bits=23)))
    block = draw(st.integers(1, 6))
    lanes = draw(st.one_of(st.none(), st.integers(1, block)))
    acc = fs.Accumulator(fmt, draw(st.sampled_from(_DET)), block=block, lanes=lanes,
                         order=draw(st.sampled_from(["ascending", "descending"])),
                         combine=draw(st.sampled_from(["tree", "sequential"])),
                         addend=draw(st.sampled_from(["first", "last"])))
    inp = draw(st.sampled_from([None, fs.FP16, fs.BF16, fs.FloatFormat(5, 10,
                                                                        subnormals=False)]))
    prod = draw(st.sampled_from([None, None, FTZ32, fs.FP16]))
    out = draw(st.sampled_from([None, fs.FP16]))
    return fs.MatmulSpec(input=inp, product=prod, accumulator=acc, output=out)


@settings(max_examples=150, deadline=None)
@given(spec=structured_specs(), data=st.data())
def test_kernel_matches_oracle(spec, data):
    """matmul (the general kernel's lanes path) equals reference.matmul bit for bit: boundary
    values of the accumulator's format (subnormals, near overflow, specials) and zeros."""
    K = data.draw(st.integers(0, 13))
    M, N = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    el = st.one_of(boundary_values(spec.accumulator.fmt), st.sampled_from([0.0, -0.0, 1.0]),
                   st.floats(-4, 4, width=32))
    a = np.array(data.draw(st.lists(el, min_size=M * K, max_size=M * K))).reshape(M, K)
    b = np.array(data.draw(st.lists(el, min_size=K * N, max_size=K * N))).reshape(K, N)
    got, c = fs.matmul(a, b, spec, stats=True)
    assert "general" in c.paths or not spec.accumulator.structured
    assert_same_bits(got, reference.matmul(a, b, spec), nan_sign=False)


@pytest.mark.parametrize("mode", ["nearest_even", "down"])
@pytest.mark.parametrize("addend", ["first", "last"])
@pytest.mark.parametrize("lanes", [None, 1, 2])
def test_zero_signs_of_every_step(mode, addend, lanes):
    """Sums of zeros and of cancelling terms take IEEE's sign (+0 + +0 is +0 even rounding
    DOWN; x - x is -0 only rounding DOWN), as the oracle: every sign combination."""
    acc = fs.Accumulator(fs.FP32, mode, block=2, lanes=lanes, addend=addend)
    spec = fs.MatmulSpec(accumulator=acc)
    vals = [0.0, -0.0, 1.0, -1.0]
    a = np.array([[x, y] for x in vals for y in vals])
    b = np.array([[1.0, -0.0, 1.0], [1.0, 1.0, -1.0]])
    assert_same_bits(fs.matmul(a, b, spec), reference.matmul(a, b, spec))


def test_kernel_counts_every_step():
    """Counters: lanes=2, block 4, addend last, K = 10: 10 products + 3 blocks x (1 + 1)."""
    acc = fs.Accumulator(fs.FP32, block=4, lanes=2, addend="last")
    assert acc.roundings(10) == 16
    _, c = fs.matmul(np.ones((2, 10)), np.ones((10, 3)), fs.MatmulSpec(accumulator=acc),
                     stats=True)
    assert c.accumulator.roundings == 2 * 3 * 16


def test_explain_says_the_general_kernel_runs():
    acc = fs.Accumulator(fs.FP32, block=2, lanes=1, order="descending")
    e = fs.explain(np.ones((2, 4)), np.ones((4, 2)), fs.MatmulSpec(accumulator=acc))
    assert e.path == "general"
    assert any("lanes, an order or an addend" in why for _, why in e.declined)


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"block": 4, "lanes": 0}, "lanes must be in 1..block"),
    ({"block": 2, "lanes": 3}, "lanes must be in 1..block"),
    ({"block": 2, "lanes": 1.5}, "lanes must be None or an int"),
    ({"order": "sideways"}, "order must be one of"),
    ({"combine": "random"}, "combine must be one of"),
    ({"addend": "middle"}, "addend must be one of"),
])
def test_bad_structure(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fs.Accumulator(fs.FP32, **kw)


def test_structure_needs_a_float_format_and_a_deterministic_rounding():
    with pytest.raises(ValueError, match="must be a FloatFormat"):
        fs.Accumulator(fs.FixedFormat(16, 8), block=2, lanes=2)
    with pytest.raises(ValueError, match="deterministic rounding"):
        fs.Accumulator(fs.FP32, "stochastic", block=2, addend="last")


# -- presets ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device, inp, acc", [
    ("AVX512_BF16", "bf16", fs.Accumulator(FTZ32, block=2, lanes=1, order="descending")),
    ("AMX_BF16", "bf16", fs.Accumulator(FTZ32, block=32, lanes=2, addend="last")),
    ("AMX_FP16", "fp16", fs.Accumulator(FTZ32, block=32, lanes=2, addend="last")),
    ("MI100", "fp16", fs.Accumulator(fs.FP32, block=4)),
    ("MI100", "bf16", fs.Accumulator(fs.FP32, block=2)),
    ("MI250", "fp16", fs.Accumulator(FTZ32, block=4, lanes=4, addend="last")),
])
def test_presets(device, inp, acc):
    assert hardware.spec(device, inp).accumulator == acc


def test_preset_inputs_flush_where_the_unit_does():
    assert not hardware.spec("AMX_BF16", "bf16").input.subnormals
    assert hardware.spec("AMX_FP16", "fp16").input.subnormals  # FP16 denormals kept
    assert not hardware.spec("MI250", "bf16").input.subnormals
    assert hardware.spec("MI100", "fp16").input.subnormals


def test_preset_provenance():
    by = {(p.device, p.input): p for p in hardware.devices()}
    assert by[("AMX_BF16", "bf16")].mismatches == 0 and by[("AMX_BF16", "bf16")].vectors > 0
    assert "validated on this CPU" in by[("AVX512_BF16", "bf16")].provenance
    for key in [("AMX_FP16", "fp16"), ("MI100", "fp16"), ("MI250", "bf16")]:
        assert by[key].provenance.startswith("published model, not validated here")
        assert by[key].mismatches is None


def test_mi300_presets():
    """MMA-Sim's CDNA3 adder: blocks of 8 (4 for xf32), 24 bits below the products' anchor,
    the sum and C aligned again at 31 and 24 bits, zeros read at exponent -126, products of
    2**128 or more infinities; xf32 inputs truncated to TF32; FP8 (FNUZ inputs): blocks of
    16 in two groups (even, odd), C dropped below 25 bits."""
    acc = fs.BlockFMA(8, 1, rounding="nearest_even", addend_bits=(31, 24), zero_exp=-126,
                      product_inf_exp=128)
    assert hardware.spec("MI300", "fp16") == fs.MatmulSpec(input=fs.FP16, accumulator=acc)
    assert hardware.spec("MI300", "bf16") == fs.MatmulSpec(input=fs.BF16, accumulator=acc)
    x = hardware.spec("MI300", "tf32")
    assert x.accumulator == fs.BlockFMA(4, 1, rounding="nearest_even", addend_bits=(31, 24),
                                        zero_exp=-126, product_inf_exp=128)
    assert x.input == fs.TF32 and x.input_rounding is fs.Rounding.TOWARD_ZERO
    fp8 = fs.BlockFMA(16, 1, rounding="nearest_even", addend_bits=(31, 24, 25),
                      zero_exp=-126, product_inf_exp=128, groups=2)
    assert hardware.spec("MI300", "e4m3") == fs.MatmulSpec(input=fs.FP8_E4M3FNUZ,
                                                           accumulator=fp8)
    assert hardware.spec("MI300", "e5m2") == fs.MatmulSpec(input=fs.FP8_E5M2FNUZ,
                                                           accumulator=fp8)
    by = {(p.device, p.input): p for p in hardware.devices()}
    for i in ("fp16", "bf16", "tf32", "e4m3", "e5m2"):
        assert by[("MI300", i)].provenance.startswith("published model, not validated here: "
                                                     "MMA-Sim")
        assert by[("MI300", i)].mismatches is None
    assert "fp8_fp8" in by[("MI300", "e4m3")].provenance
    assert "bf8_bf8" in by[("MI300", "e5m2")].provenance


def test_a_missing_preset_says_why(monkeypatch):
    """A combination the device has but no model expresses raises with MISSING's reason."""
    monkeypatch.setitem(hardware.MISSING, ("MI300", "fp16", "fp16"), "the reason")
    with pytest.raises(ValueError, match="MI300 has fp16 input with fp16 output, but no "
                                         "preset: the reason"):
        hardware.spec("MI300", "fp16", "fp16")


def test_mi300_lacks_fp16_output():
    with pytest.raises(ValueError, match="MI300 has no fp16 input with fp16 output; it has "
                                         "bf16->fp32, e4m3->fp32, e5m2->fp32, fp16->fp32, "
                                         "tf32->fp32"):
        hardware.spec("MI300", "fp16", "fp16")


# -- this CPU -----------------------------------------------------------------------------------
def _need(flag):
    lib, err = cpu.harness()
    if lib is None:
        pytest.skip(err)
    if flag not in cpu.cpu_info()["flags"]:
        pytest.skip(f"this CPU reports no {flag}")
    return lib


def _bf(x):
    v = np.asarray(x, np.float32)
    return (v.view(np.uint32) >> 16).astype(np.uint16)


def test_vdpbf16ps_probes():
    """The facts the AVX512_BF16 preset rests on, each from one instruction: the odd element
    first; one rounding per product (fused: 2**64 * 2**64 - 2**127 is finite); C read as zero
    when subnormal; a result below 2**-126 after rounding at full precision is flushed; the
    sign of a flushed input kept."""
    _need("avx512_bf16")

    def dp(a, b, c):
        return float(cpu.dpbf16ps_gemm(_bf([a]), _bf(np.array([b]).T), [[c]])[0, 0])

    assert dp([1, -2.0**24], [1, 1], 2.0**24) == 1.0
    assert dp([1, 1], [1, 1], 2.0**24) == 2.0**24
    assert dp([2.0**64, 0], [2.0**64, 0], -2.0**127) == 2.0**127
    assert dp([2.0**-63, 0], [2.0**-63, 0], 2.0**-140) == 2.0**-126
    assert dp([2.0**-80, 0], [-2.0**-80, 0], 2.0**-126) == 2.0**-126
    assert dp([1.5 * 2**-76, 0], [-2.0**-75, 0], 2.0**-126) == 0.0
    a = np.array([[0x8001, 0x8001]], np.uint16)
    assert np.signbit(cpu.dpbf16ps_gemm(a, _bf([[1.0], [1.0]]), [[-0.0]])[0, 0])


def test_tdpbf16ps_probe():
    """Two chains, their sum, then C: 2**24 + 2 (one chain through C would give 2**24)."""
    lib = _need("amx_bf16")
    if not cpu._amx_ready(lib):
        pytest.skip("the kernel refused AMX tile data")
    a = np.zeros((1, 32), np.float32)
    a[0, :4] = [1.0, 2.0**24, 1.0, -2.0**24]
    d = cpu.tdpbf16ps_gemm(_bf(a), _bf(np.ones((32, 1))), [[2.0**24]])
    assert d[0, 0] == 2.0**24 + 2


@pytest.fixture(scope="module")
def checks():
    return {c.name: c for c in cpu.check_all(sample=1 << 18, seed=7, dots=512)}


@pytest.mark.parametrize("name", ["f16c_nearest_even", "f16c_down", "f16c_up",
                                  "f16c_toward_zero", "fma32_nearest_even", "fma32_down",
                                  "fma32_up", "fma32_toward_zero", "fma32_nearest_even_ftz_daz",
                                  "fma64_nearest_even", "fma64_down", "fma64_up",
                                  "fma64_toward_zero", "avx512_bf16", "amx_bf16"])
def test_cpu_instruction_matches_its_model(checks, name):
    """Every result of the instruction on stress inputs equals the model's, bit for bit."""
    c = checks.get(name)
    if c is None:
        c = next(v for k, v in checks.items() if name.startswith(k))
    if c.skipped:
        pytest.skip(c.skipped)
    assert c.rows > 0
    assert c.mismatches == 0, c.example


def test_stress_inputs_can_tell_models_apart():
    """The AMX check is not vacuous: on its inputs a one-chain model (C first) differs."""
    lib = _need("amx_bf16")
    if not cpu._amx_ready(lib):
        pytest.skip("the kernel refused AMX tile data")
    rng = np.random.default_rng(1)
    A = cpu.stress_bits(rng, (16, 64), fs.BF16, special=0).astype(np.uint16)
    B = cpu.stress_bits(rng, (64, 16), fs.BF16, special=0).astype(np.uint16)
    d = cpu.tdpbf16ps_gemm(A, B, np.zeros((16, 16), np.float32))
    av, bv = cpu._bf16_values(A), cpu._bf16_values(B)
    good = fs.matmul(av, bv, hardware.spec("AMX_BF16", "bf16"))
    wrong = fs.matmul(av, bv, fs.MatmulSpec(input=fs.FloatFormat(8, 7, subnormals=False),
                                            accumulator=fs.Accumulator(FTZ32)))
    assert cpu._mismatches(d, good)[0] == 0
    assert cpu._mismatches(d, wrong)[0] > 0
