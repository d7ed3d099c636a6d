"""Block formats against Graphcore's gfloat (PyPI ``gfloat``), bit for bit.

gfloat's ``quantize_block`` with ``compute_scale_amax`` is the OCP rule (scale
``2**(floor(log2 amax) - emax)``, clipped to ``2**[-127, 127]``, all-zero blocks ``2**-127``)
and ``encode_block`` gives the codes. For every MX preset, on random and adversarial blocks of
float32 values (all zero, a NaN, the maximum at and next to a power of two, E8M0 underflow,
subnormal elements) and every rounding gfloat has, values, scale codes and element codes agree.

Where the two differ by design, a test pins the difference (docs/block_formats.md): an infinity
(gfloat: scale 2**127, elements saturated; fixedsim: a NaN block), scale overflow (gfloat clips
the scale to 2**127; fixedsim refuses), and float64 block maxima just below a power of two,
where gfloat's float64 ``log2`` rounds up to the power and takes the next scale.
"""

import math

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs

gfloat = pytest.importorskip("gfloat", reason="gfloat is not installed (pip install gfloat, "
                             "or pip install -e '.[crosscheck]'): the gfloat cross-checks skip")
from gfloat import RoundMode, compute_scale_amax, encode_block, quantize_block  # noqa: E402
from gfloat import formats as gf  # noqa: E402

PAIRS = {
    "MXFP8_E4M3": (fs.MXFP8_E4M3, gf.format_info_mxfp8_e4m3),
    "MXFP8_E5M2": (fs.MXFP8_E5M2, gf.format_info_mxfp8_e5m2),
    "MXFP6_E2M3": (fs.MXFP6_E2M3, gf.format_info_mxfp6_e2m3),
    "MXFP6_E3M2": (fs.MXFP6_E3M2, gf.format_info_mxfp6_e3m2),
    "MXFP4": (fs.MXFP4, gf.format_info_mxfp4_e2m1),
    "MXINT8": (fs.MXINT8, gf.format_info_mxint8),
}
MODES = {fs.Rounding.NEAREST_EVEN: RoundMode.TiesToEven,
         fs.Rounding.NEAREST_AWAY: RoundMode.TiesToAway,
         fs.Rounding.TOWARD_ZERO: RoundMode.TowardZero,
         fs.Rounding.DOWN: RoundMode.TowardNegative,
         fs.Rounding.UP: RoundMode.TowardPositive}


def gfloat_block(gfi, block, mode):
    """gfloat's values and codes (scale first) of one block (float64 array)."""
    vals = quantize_block(gfi, block, compute_scale_amax, mode)
    scale = compute_scale_amax(gfi.etype.emax, block)
    codes = list(encode_block(gfi, scale, block / scale, mode))
    return vals, codes


def adversarial(rng, kind):
    """One block of 32 float32 values of the named kind."""
    tiny = np.float32(2.0**-149)
    x = (rng.standard_normal(32) * 2.0 ** rng.integers(-8, 8)).astype(np.float32)
    if kind == "zero":
        x[:] = 0.0
        x[::3] = -0.0
    elif kind == "pow2":
        x[5] = np.float32(2.0 ** math.ceil(math.log2(np.abs(x).max())))
    elif kind == "below_pow2":
        x[7] = np.nextafter(np.float32(2.0 ** math.ceil(math.log2(np.abs(x).max()) + 1)),
                            np.float32(0))
    elif kind == "above_pow2":
        x[9] = -np.nextafter(np.float32(2.0 ** math.ceil(math.log2(np.abs(x).max()) + 1)),
                             np.float32(np.inf))
    elif kind == "underflow":  # scale 2**-127 and elements below it
        x = (x * np.float32(2.0**-130)).astype(np.float32)
        x[0] = tiny
    elif kind == "subnormal":  # elements far below the block maximum
        x[1:] = x[1:] * np.float32(2.0**-12)
    elif kind == "midpoints":  # exact midpoints of E2M1/E3M2/E2M3 grids after scaling
        x = (rng.integers(-64, 64, 32) / 8.0).astype(np.float32)
    return x


KINDS = ["random", "zero", "pow2", "below_pow2", "above_pow2", "underflow", "subnormal",
         "midpoints"]


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("kind", KINDS)
def test_mx_presets_match_gfloat(name, kind):
    """Values, scale codes and element codes, every gfloat rounding, bit for bit."""
    fmt, gfi = PAIRS[name]
    rng = np.random.default_rng(abs(hash((name, kind))) % 2**32)
    x = np.stack([adversarial(rng, kind) for _ in range(3)])
    for rounding, mode in MODES.items():
        ours = fs.quantize(x, fmt, rounding)
        codes = fs.to_bits(x, fmt, rounding=rounding, packed=False)
        for b in range(x.shape[0]):
            vals, gcodes = gfloat_block(gfi, x[b].astype(np.float64), mode)
            assert_same_bits(ours[b], vals, f"{name} {kind} {rounding!r} block {b}")
            assert int(codes.scales[b, 0]) == gcodes[0]
            assert [int(c) for c in codes.elements[b]] == gcodes[1:], (name, kind, rounding)


@settings(max_examples=25)
@given(st.data())
def test_random_blocks_match_gfloat(data):
    """hypothesis: any float32 block (no infinities), any MX preset and gfloat rounding."""
    name = data.draw(st.sampled_from(sorted(PAIRS)))
    fmt, gfi = PAIRS[name]
    nan_ok = name.startswith("MXFP8")
    elems = st.floats(width=32, allow_infinity=False, allow_nan=nan_ok,
                      min_value=None if nan_ok else -(2.0**100),
                      max_value=None if nan_ok else 2.0**100)
    x = np.array(data.draw(st.lists(elems, min_size=32, max_size=32)), np.float32)
    rounding = data.draw(st.sampled_from(sorted(MODES)))
    vals, _ = gfloat_block(gfi, x.astype(np.float64), MODES[rounding])
    assert_same_bits(fs.quantize(x, fmt, rounding), vals, f"{name} {rounding!r}")


def test_nan_block_matches_gfloat():
    """A NaN in an MXFP8 block: both give the NaN scale (0xFF) and all values NaN."""
    x = np.ones(32)
    x[3] = np.nan
    vals, codes = gfloat_block(gf.format_info_mxfp8_e4m3, x, RoundMode.TiesToEven)
    assert np.isnan(vals).all() and np.isnan(fs.quantize(x, fs.MXFP8_E4M3)).all()
    assert codes[0] == 0xFF == int(fs.to_bits(x, fs.MXFP8_E4M3).scales[0])


def test_disagreements_pinned():
    """The documented differences, with their numbers."""
    # an infinity: gfloat saturates with scale 2**127; fixedsim makes the block NaN
    x = np.array([np.inf] + [1.0] * 31)
    vals, codes = gfloat_block(gf.format_info_mxfp8_e4m3, x, RoundMode.TiesToEven)
    assert codes[0] == 254 and vals[0] == 448.0 * 2.0**127 and vals[1] == 0.0
    assert np.isnan(fs.quantize(x, fs.MXFP8_E4M3)).all()
    # scale overflow (float64 input): gfloat clips the scale; fixedsim refuses
    x = np.array([1e300] + [1.0] * 31)
    vals, _ = gfloat_block(gf.format_info_mxfp8_e4m3, x, RoundMode.TiesToEven)
    assert vals[0] == 448.0 * 2.0**127
    with pytest.raises(ValueError, match="largest power of two"):
        fs.quantize(x, fs.MXFP8_E4M3)
    # float64 maximum just below 2**10: log2 rounds to 10.0 in float64
    x = np.array([np.nextafter(1024.0, 0)] + [1.0] * 31)
    vals, codes = gfloat_block(gf.format_info_mxfp8_e4m3, x, RoundMode.TiesToEven)
    assert codes[0] == 127 + 2 and vals[0] == 1024.0
    q = fs.quantize(x, fs.MXFP8_E4M3)
    assert int(fs.to_bits(x, fs.MXFP8_E4M3).scales[0]) == 127 + 1 and q[0] == 896.0
