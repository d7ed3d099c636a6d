"""to_bits / from_bits: exhaustive round trips and agreement with independent decoders."""

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import reference

EIGHT_BIT = [fs.FP8_E4M3, fs.FP8_E5M2, fs.FloatFormat(4, 3), fs.FloatFormat(3, 4),
             fs.FloatFormat(2, 5), fs.FloatFormat(3, 4, inf_nan="fn"),
             fs.FloatFormat(5, 2, subnormals=False)] + [
    fs.FixedFormat(8, f, signed=s) for f in (-3, 0, 4, 8, 11) for s in (True, False)]


@pytest.mark.parametrize("fmt", [fs.FP16, fs.BF16, *EIGHT_BIT], ids=repr)
def test_every_code_round_trips_and_matches_the_oracle(fmt):
    codes = np.arange(1 << fmt.width, dtype=np.uint64)
    vals = fs.from_bits(codes, fmt)
    assert vals.dtype == fmt.dtype
    np.testing.assert_array_equal(fs.to_bits(vals, fmt), codes.astype(fmt.code_dtype))
    step = 1 if fmt.width <= 8 else 61  # the oracle is slow: every 61st 16-bit code
    for c in codes[::step]:
        ref = reference.decode(int(c), fmt)
        v = vals[int(c)]
        if ref != ref:
            assert np.isnan(v)
        else:
            assert v == ref and np.signbit(v) == np.signbit(float(ref)), (hex(c), v, ref)
            assert reference.encode(float(v), fmt) == c


def test_fp16_decoding_matches_numpy_bit_for_bit():
    codes = np.arange(1 << 16, dtype=np.uint16)
    ours = fs.from_bits(codes, fs.FP16)
    np.testing.assert_array_equal(ours.view(np.uint32),
                                  codes.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("fmt,dtype", [(fs.FP32, np.float32), (fs.FP64, np.float64)])
def test_native_formats_encode_as_their_own_bits(fmt, dtype):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** (8 * np.dtype(dtype).itemsize), 10_000, dtype=np.uint64)
    x = bits.astype(np.dtype(f"u{np.dtype(dtype).itemsize}")).view(dtype)
    x = x[~np.isnan(x)]
    np.testing.assert_array_equal(fs.to_bits(x, fmt), x.view(fmt.code_dtype))
    np.testing.assert_array_equal(fs.from_bits(x.view(fmt.code_dtype), fmt).view(
        fmt.code_dtype), x.view(fmt.code_dtype))


def test_nan_codes_keep_sign_and_payload():
    codes = np.array([0x7C01, 0x7E00, 0xFE00, 0xFC01, 0x7FFF], dtype=np.uint16)
    np.testing.assert_array_equal(fs.to_bits(fs.from_bits(codes, fs.FP16), fs.FP16), codes)
    # a float32 NaN whose payload lies below FP16's mantissa gets the quiet bit
    low = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert fs.to_bits(low, fs.FP16)[0] == 0x7E00
    assert fs.to_bits([np.nan, -np.nan], fs.FP8_E4M3).tolist() == [0x7F, 0xFF]


def test_wide_fixed_point_codes():
    q = fs.FixedFormat(64, 0)
    assert fs.to_bits([-1.0, 2.0**62], q).tolist() == [2**64 - 1, 2**62]
    assert fs.from_bits(np.array([2**63], dtype=np.uint64), q).tolist() == [-(2.0**63)]
    with pytest.raises(ValueError, match="float64 cannot hold exactly"):
        fs.from_bits(np.array([2**63 - 1], dtype=np.uint64), q)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fs.to_bits([0.1], fs.FP16), ValueError, r"0\.1 is not a value of FP16.*quantize"),
    (lambda: fs.to_bits([np.nan], fs.FixedFormat(8, 2)), ValueError, "NaN"),
    (lambda: fs.to_bits([np.inf], fs.FP8_E4M3), ValueError, "not a value of FP8_E4M3"),
    (lambda: fs.to_bits([1000.0], fs.FixedFormat(8, 2)), ValueError, "not a value of Q<8,2>"),
    (lambda: fs.from_bits([256], fs.FP8_E5M2), ValueError, r"\[0, 2\*\*8\).*256"),
    (lambda: fs.from_bits([-1], fs.FixedFormat(8, 2)), ValueError, r"\[0, 2\*\*8\).*-1"),
    (lambda: fs.from_bits([1.0], fs.FP16), TypeError, "codes must be integers"),
    (lambda: fs.to_bits([1.0], "FP16"), TypeError, "fmt must be"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
