"""Block formats against torchao's MX and NVFP4 recipes (PyPI ``torchao`` on the CPU PyTorch).

torchao's ``to_mx`` with ScaleCalculationMode FLOOR, CEIL, EVEN and RCEIL is fixedsim's
``scale_rule`` "ocp", "ceil", "even" and "rceil"; its ``nvfp4_quantize`` with
``per_tensor_amax_to_scale`` is :data:`fixedsim.NVFP4`. Values are compared bit for bit on
random blocks and on block maxima at and next to ``element.max * 2**k`` and powers of two.
The differences are pinned: torchao raises an NVFP4 block scale below E4M3's smallest
*normal* (2**-6) to it, fixedsim keeps E4M3's subnormal scales (down to 2**-9); torchao
scales an NVFP4 element in float32 before rounding it (a double rounding, rare: 2 of 10 M
random values), fixedsim rounds the exact quotient; torchao's RCEIL rounds its ``log2``.
"""

import warnings
from fractions import Fraction

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import reference
from fixedsim.blockformats import BlockFormat

torch = pytest.importorskip("torch", reason="torch is not installed: the torchao cross-checks "
                            "skip (pip install torch --index-url "
                            "https://download.pytorch.org/whl/cpu; pip install torchao)")
pytest.importorskip("torchao", reason="torchao is not installed: the torchao cross-checks skip")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from torchao.prototype.mx_formats import nvfp4_tensor as nv
    from torchao.prototype.mx_formats.config import ScaleCalculationMode as Mode
    from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
    from torchao.prototype.mx_formats.kernels import f4_unpacked_to_f32, unpack_uint4
    from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx

ELEMENTS = {"E4M3": (torch.float8_e4m3fn, fs.FP8_E4M3), "E5M2": (torch.float8_e5m2, fs.FP8_E5M2),
            "E2M3": (DTYPE_FP6_E2M3, fs.FP6_E2M3), "E3M2": (DTYPE_FP6_E3M2, fs.FP6_E3M2),
            "E2M1": (torch.float4_e2m1fn_x2, fs.FP4_E2M1)}
RULES = {"ocp": Mode.FLOOR, "ceil": Mode.CEIL, "even": Mode.EVEN, "rceil": Mode.RCEIL}


def blocks():
    """Random blocks, and blocks whose maximum is at or next to max * 2**k or 2**k."""
    rng = np.random.default_rng(0)
    rows = list(rng.standard_normal((64, 32)) * 2.0 ** rng.integers(-30, 30, (64, 1)))
    for k in range(-100, 100, 9):
        for top in (448.0, 57344.0, 7.5, 28.0, 6.0, 1.0):
            for d in (-1, 0, 1):
                v = np.float32(top * 2.0**k)
                if d:
                    v = np.nextafter(v, np.float32(np.inf if d > 0 else 0))
                r = rng.standard_normal(32).astype(np.float32) * np.float32(top * 2.0 ** (k - 3))
                r[rng.integers(32)] = v if rng.integers(2) else -v
                rows.append(r)
    return np.array(rows, np.float32)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("element", ELEMENTS)
def test_mx_rules_match_torchao(element, rule):
    tdt, el = ELEMENTS[element]
    x = blocks()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s, d = to_mx(torch.from_numpy(x), tdt, 32, RULES[rule])
        theirs = to_dtype(d, s, tdt, 32, torch.float32).numpy().astype(np.float64)
    fmt = BlockFormat(el, scale_rule=rule)
    ours = fs.to_bits(x, fmt).scales.reshape(-1).astype(np.int64)
    their_codes = s.view(torch.uint8).numpy().reshape(-1).astype(np.int64)
    if rule == "rceil":
        # torchao 0.18 (CPU): 2**ceil(log2(d)), d = fl32(amax / max), log2 and ceil in float32:
        # where amax is just above max * 2**k, d or log2(d) rounds down to the power and the
        # scale is half fixedsim's exact 2**ceil(log2(amax / max))
        amax = np.abs(x).max(axis=1).astype(np.float64)
        exact = np.array([int(np.log2(float(q))) + 127 for q in (
            reference.block_scale(a, fmt) for a in amax)])
        np.testing.assert_array_equal(ours, exact)
        differ = ours != their_codes
        m, _ = np.frexp(amax / el.max)
        assert ((ours - their_codes)[differ] == 1).all() and differ.any()
        assert (m[differ] < 0.5 * (1 + 2.0**-16)).all()  # just above a power of two
    else:
        np.testing.assert_array_equal(ours, their_codes)
    same = ours == their_codes  # every block, except rceil's double roundings above
    np.testing.assert_array_equal(fs.quantize(x, fmt)[same], theirs[same])


def torchao_nvfp4(x):
    xt = torch.from_numpy(x)
    t = nv.per_tensor_amax_to_scale(xt.abs().max())
    s, d = nv.nvfp4_quantize(xt, 16, t)
    e = f4_unpacked_to_f32(unpack_uint4(d.view(torch.uint8))).double().reshape(x.shape)
    n = x.shape[0]
    v = e.reshape(n, -1, 16) * s.double().reshape(n, -1, 1) * t.double()
    return v.reshape(x.shape).numpy(), s.view(torch.uint8).numpy(), float(t)


def test_nvfp4_matches_torchao():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((512, 64)) * 2.0 ** rng.integers(-6, 6, (512, 1))).astype(np.float32)
    vals, scales, t = torchao_nvfp4(x)
    np.testing.assert_array_equal(fs.quantize(x, fs.NVFP4), vals)
    codes = fs.to_bits(x, fs.NVFP4)
    np.testing.assert_array_equal(codes.scales, scales.reshape(codes.scales.shape))
    assert float(fs.from_bits(codes.tensor_scale, fs.FP32)) == t


def test_nvfp4_small_block_scale_differs():
    """A block far below the tensor maximum: torchao's scale 2**-6 (E4M3's smallest normal)
    turns 0.01 and 0.004 both into 0.0078125; fixedsim's scale 2**-9 (E4M3 subnormal) keeps
    0.01171875 and 0.00390625."""
    x = np.array([[2688.0] + [0.0] * 15 + [0.01] + [0.004] * 15], np.float32)
    vals, scales, _ = torchao_nvfp4(x)
    assert scales[0, 1] == 0x08 and vals[0, 16] == vals[0, 17] == 0.0078125
    ours = fs.quantize(x, fs.NVFP4)
    assert fs.to_bits(x, fs.NVFP4).scales[0, 1] == 0x01
    assert ours[0, 16] == 0.01171875 and ours[0, 17] == 0.00390625


def test_nvfp4_torchao_rounds_a_scaled_element_twice():
    """torchao scales an element as ``x * ((1 / t) / s)`` in float32 and then rounds that into
    E2M1: a double rounding. Here (found by ``benchmarks/quantize.py`` on 10 M values) the
    block scale is ``s = 0.03515625``, the tensor scale ``t = 607.7454... / 2688``, and
    ``x = 0.009935849...``: ``x / (s t)`` is 1.2500000330 (above the tie, so 1.5), torchao's
    float32 quotient is 1.25 exactly, a tie it rounds to even, 1.0. fixedsim and the oracle
    round the exact quotient."""
    def f32(code):
        return np.array([code], np.uint32).view(np.float32)[0]
    x = np.zeros((1, 32), np.float32)
    x[0, 0], x[0, 16], x[0, 17] = f32(0x4417EFB5), f32(0x3C22C9F9), f32(0x3D4D5651)
    theirs, scales, t = torchao_nvfp4(x)
    codes = fs.to_bits(x, fs.NVFP4)
    np.testing.assert_array_equal(codes.scales, scales.reshape(codes.scales.shape))
    s = float(fs.from_bits(codes.scales, fs.NVFP4.scale).reshape(-1)[1])
    assert s == 0.03515625 and float(fs.from_bits(codes.tensor_scale, fs.FP32)) == t
    exact = Fraction(float(x[0, 16])) / (Fraction(s) * Fraction(t))
    assert Fraction(5, 4) < exact < Fraction(5, 4) + Fraction(1, 2**24)
    scaled = x[0, 16] * ((np.float32(1) / np.float32(t)) / np.float32(s))  # torchao's, float32
    assert scaled == np.float32(1.25)
    ours = fs.quantize(x, fs.NVFP4)
    oracle = reference.block_quantize(x.astype(np.float64), fs.NVFP4, fs.Rounding.NEAREST_EVEN)
    assert ours[0, 16] == oracle[0][0, 16] == 1.5 * s * t
    assert theirs[0, 16] == 1.0 * s * t
    np.testing.assert_array_equal(np.delete(ours, 16), np.delete(theirs, 16))
