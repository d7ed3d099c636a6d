"""Formats: validation, identity, and every derived fact checked against enumerated values."""

import dataclasses
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import reference

SMALL_FLOATS = [fs.FloatFormat(e, m, subnormals=s, inf_nan=k)
                for e, m, s, k in itertools.product(range(2, 6), range(1, 6), (True, False),
                                                    ("ieee", "fn"))]
SMALL_FIXED = [fs.FixedFormat(w, f, signed=s)
               for w, f, s in itertools.product((1, 2, 5, 8), (-3, 0, 3, 9), (True, False))]


@pytest.mark.parametrize("fmt", SMALL_FLOATS, ids=repr)
def test_float_facts_match_enumerated_values(fmt):
    vals = [Fraction(v) for v in reference.values(fmt)]
    pos = [v for v in vals if v > 0]
    assert Fraction(fmt.max) == max(vals) and Fraction(fmt.min) == min(vals)
    assert Fraction(fmt.smallest) == min(pos)
    assert Fraction(fmt.min_normal) == 2**fmt.emin
    normals = [v for v in pos if v >= fmt.min_normal]
    assert Fraction(fmt.min_normal) == min(normals)
    above_one = min(v for v in pos if v > 1)
    assert Fraction(fmt.eps) == above_one - 1
    assert fmt.precision == fmt.man_bits + 1 and fmt.width == 1 + fmt.exp_bits + fmt.man_bits
    assert fmt.bias == 2 ** (fmt.exp_bits - 1) - 1
    # container: float32 exactly when every value is a float32
    exact32 = all(Fraction(float(np.float32(float(v)))) == v for v in vals)
    assert (fmt.dtype == np.float32) == exact32


@pytest.mark.parametrize("fmt", SMALL_FIXED, ids=repr)
def test_fixed_facts_match_enumerated_values(fmt):
    vals = [Fraction(v) for v in reference.values(fmt)]
    assert Fraction(fmt.max) == max(vals) and Fraction(fmt.min) == min(vals)
    assert Fraction(fmt.eps) == Fraction(2) ** -fmt.frac_length == vals[1] - vals[0]
    assert len(vals) == 2**fmt.word_length
    assert fmt.int_bits == fmt.word_length - fmt.frac_length
    assert fmt.max_code == max(vals) / Fraction(fmt.eps)


@pytest.mark.parametrize("fmt,facts", [
    (fs.FP16, dict(max=65504.0, eps=2**-10, min_normal=2**-14, min_subnormal=2**-24, bias=15)),
    (fs.BF16, dict(max=float(0xFF << 120), eps=2**-7, min_normal=2**-126, bias=127)),
    (fs.TF32, dict(eps=2**-10, min_normal=2**-126, width=19)),
    (fs.FP32, dict(max=float(np.finfo(np.float32).max), min_subnormal=2**-149, width=32)),
    (fs.FP8_E5M2, dict(max=57344.0, min_subnormal=2**-16, has_inf=True)),
    (fs.FP8_E4M3, dict(max=448.0, min_normal=2**-6, min_subnormal=2**-9, has_inf=False)),
    (fs.FP64, dict(max=float(np.finfo(np.float64).max), min_subnormal=5e-324)),
    (fs.FixedFormat(16, 14), dict(max=2 - 2**-14, min=-2.0, int_bits=2, eps=2**-14)),
    (fs.FixedFormat(8, 8, signed=False), dict(max=1 - 2**-8, min=0.0, max_code=255)),
])
def test_preset_facts(fmt, facts):
    for name, value in facts.items():
        assert getattr(fmt, name) == value, name


def test_reprs():
    assert [repr(f) for f in (fs.FixedFormat(16, 14), fs.FixedFormat(8, 8, signed=False),
                              fs.FP16, fs.FP8_E4M3, fs.FP8_E5M2, fs.BF16, fs.TF32, fs.FP32)] == [
        "Q<16,14>", "UQ<8,8>", "FP16", "FP8_E4M3", "FP8_E5M2", "BF16", "TF32", "FP32"]
    assert repr(fs.FloatFormat(3, 4)) == "FP8_E3M4"  # a preset (ml_dtypes' float8_e3m4)
    assert repr(fs.FloatFormat(4, 3)) == "E4M3"  # the IEEE-style E4M3 is not the OCP one
    assert repr(fs.FloatFormat(3, 2, inf_nan="fn")) == "E3M2fn"
    assert repr(fs.FloatFormat(5, 10, subnormals=False)) == "FP16-ftz"


def test_formats_are_values():
    assert fs.FloatFormat(5, 10) == fs.FP16 and hash(fs.FloatFormat(5, 10)) == hash(fs.FP16)
    assert fs.FloatFormat(4, 3, inf_nan="fn") == fs.FP8_E4M3 != fs.FloatFormat(4, 3)
    assert fs.FixedFormat(8, 4) == fs.FixedFormat(8, 4) != fs.FixedFormat(8, 4, signed=False)
    assert len({fs.FP16, fs.FloatFormat(5, 10), fs.BF16, fs.FixedFormat(8, 4)}) == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        fs.FP16.man_bits = 3
    assert fs.FixedFormat(np.int64(8), np.int32(2)).word_length == 8


@pytest.mark.parametrize("make,exc,match", [
    (lambda: fs.FixedFormat(0, 0), ValueError, r"word_length must be in \[1, 64\], got 0"),
    (lambda: fs.FixedFormat(65, 0), ValueError, r"word_length must be in \[1, 64\], got 65"),
    (lambda: fs.FixedFormat(8.0, 2), TypeError, "word_length must be an int"),
    (lambda: fs.FixedFormat(True, 2), TypeError, "word_length must be an int"),
    (lambda: fs.FixedFormat(8, 1075), ValueError, "frac_length must be in"),
    (lambda: fs.FixedFormat(64, -1000), ValueError, "fits in float64"),
    (lambda: fs.FixedFormat(8, 2, signed="yes"), TypeError, "signed must be a bool"),
    (lambda: fs.FloatFormat(1, 3), ValueError, r"exp_bits must be in \[2, 11\], got 1"),
    (lambda: fs.FloatFormat(12, 3), ValueError, r"exp_bits must be in \[2, 11\], got 12"),
    (lambda: fs.FloatFormat(5, 0), ValueError, "man_bits=0 is an exponent-only format"),
    (lambda: fs.FloatFormat(5, -1), ValueError, r"man_bits must be in \[0, 52\], got -1"),
    (lambda: fs.FloatFormat(5, 53), ValueError, r"man_bits must be in \[0, 52\]"),
    (lambda: fs.FloatFormat(5, 2, inf_nan="fnu"), ValueError, "inf_nan must be 'ieee'"),
    (lambda: fs.FloatFormat(11, 3, inf_nan="fn"), ValueError, "beyond float64"),
    (lambda: fs.FloatFormat(5, 2, subnormals=1), TypeError, "subnormals must be a bool"),
])
def test_impossible_formats_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_wide_fixed_max_is_the_largest_container_value():
    q = fs.FixedFormat(64, 3)
    assert q.max_code == 2**63 - 1 and q.dtype == np.float64 and not q.exact_in_container
    assert Fraction(q.max) <= Fraction(q.max_code, 8)
    assert Fraction(math.nextafter(q.max, math.inf)) > Fraction(q.max_code, 8)
