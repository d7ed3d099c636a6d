"""Exhaustive verification of float32 -> small-float rounding against independent casts.

Every float32 bit pattern (or a seeded sample of them) is rounded with NEAREST_EVEN by
:func:`fixedsim.quantize` and by an independent implementation: NumPy's ``astype(float16)`` for
FP16, ``ml_dtypes`` for every other format (its only rounding is nearest even). Results are
compared bit for bit, with three documented exceptions that are counted, checked and reported
separately, never hidden:

* NaN payloads: both sides must give a NaN of the same sign; payload bits are not compared
  (NumPy keeps the signalling bit, fixedsim returns quiet NaNs). Formats whose one NaN has no
  sign ("fnuz", unsigned) compare NaN with NaN whatever the signs.
* Overflow in formats without infinities ("fn", "fnuz", E8M0): ml_dtypes turns overflowing
  inputs (and infinities) into NaN; fixedsim's default overflow rule for formats without
  infinities is SATURATE, so it must give exactly the largest value, with the sign of the input.
* NaN into formats without NaN (FP6, FP4: ``inf_nan="none"``): fixedsim refuses NaN (a
  ValueError), ml_dtypes gives a zero; these inputs are counted and left out of the comparison.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .formats import (
    BF16,
    E8M0,
    FP4_E2M1,
    FP6_E2M3,
    FP6_E3M2,
    FP8_E3M4,
    FP8_E4M3,
    FP8_E4M3FNUZ,
    FP8_E5M2,
    FP8_E5M2FNUZ,
    FP16,
    FloatFormat,
)
from .quantize import quantize

__all__ = ["VerifyResult", "reference_cast", "verify_format", "FORMATS", "ML_DTYPES"]

FORMATS = {"fp16": FP16, "bf16": BF16, "fp8_e4m3": FP8_E4M3, "fp8_e5m2": FP8_E5M2,
           "fp8_e4m3fnuz": FP8_E4M3FNUZ, "fp8_e5m2fnuz": FP8_E5M2FNUZ, "fp8_e3m4": FP8_E3M4,
           "fp6_e2m3": FP6_E2M3, "fp6_e3m2": FP6_E3M2, "fp4_e2m1": FP4_E2M1, "e8m0": E8M0,
           "e4m3": FloatFormat(4, 3), "e4m3b11fnuz": FloatFormat(4, 3, inf_nan="fnuz", bias=11),
           "ue5m3fn": FloatFormat(5, 3, inf_nan="fn", signed=False)}

#: The ml_dtypes type each format is checked against (FP16 is checked against NumPy).
ML_DTYPES = {"bf16": "bfloat16", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2",
             "fp8_e4m3fnuz": "float8_e4m3fnuz", "fp8_e5m2fnuz": "float8_e5m2fnuz",
             "fp8_e3m4": "float8_e3m4", "fp6_e2m3": "float6_e2m3fn",
             "fp6_e3m2": "float6_e3m2fn", "fp4_e2m1": "float4_e2m1fn", "e8m0": "float8_e8m0fnu",
             "e4m3": "float8_e4m3", "e4m3b11fnuz": "float8_e4m3b11fnuz",
             "ue5m3fn": "float8_e5m3fnu"}


@dataclasses.dataclass
class VerifyResult:
    """Outcome of verifying one format."""

    name: str
    checked: int = 0
    mismatches: int = 0
    nan_payload_only: int = 0
    saturated_vs_nan: int = 0
    nan_refused: int = 0
    seconds: float = 0.0
    first_mismatch: tuple | None = None

    @property
    def ok(self) -> bool:
        return self.mismatches == 0


def reference_cast(name: str):
    """The independent float32 -> format -> float32 round trip used as the reference."""
    if name == "fp16":
        return lambda x: x.astype(np.float16).astype(np.float32)
    try:
        import ml_dtypes
    except ImportError as err:  # pragma: no cover - ml_dtypes is a test dependency
        raise RuntimeError(
            f"verifying {name} needs ml_dtypes: pip install -e '.[test]'"
        ) from err
    dt = getattr(ml_dtypes, ML_DTYPES[name], None)
    if dt is None:
        raise RuntimeError(f"verifying {name} needs ml_dtypes.{ML_DTYPES[name]}, which ml_dtypes "
                           f"{ml_dtypes.__version__} lacks: pip install 'ml_dtypes>=0.5'")
    return lambda x: x.astype(dt).astype(np.float32)


def compare_chunk(name: str, x: np.ndarray, res: VerifyResult) -> None:
    """Round float32 ``x`` both ways and add the comparison to ``res``."""
    fmt = FORMATS[name]
    if not fmt.has_nan:  # fixedsim refuses NaN into a format without NaN
        nan = np.isnan(x)
        res.nan_refused += int(nan.sum())
        res.checked += int(nan.sum())
        x = x[~nan]
    ours = quantize(x, fmt)
    with np.errstate(all="ignore"):
        ref = reference_cast(name)(x)
    ob, rb = ours.view(np.uint32), ref.view(np.uint32)
    diff = ob != rb
    if np.any(diff):
        on, rn = np.isnan(ours), np.isnan(ref)
        same_sign = ((ob >> 31) == (rb >> 31)) | (fmt.inf_nan == "fnuz") | (not fmt.signed)
        payload = diff & on & rn & same_sign
        sat = np.zeros_like(diff)
        if not fmt.has_inf:
            sat = diff & rn & ~np.isnan(x) & (np.abs(ours) == fmt.max) & (
                np.signbit(ours) == np.signbit(x))
        bad = diff & ~payload & ~sat
        res.nan_payload_only += int(payload.sum())
        res.saturated_vs_nan += int(sat.sum())
        nbad = int(bad.sum())
        if nbad and res.first_mismatch is None:
            i = int(np.flatnonzero(bad)[0])
            res.first_mismatch = (hex(int(x.view(np.uint32)[i])), float(ours[i]), float(ref[i]))
        res.mismatches += nbad
    res.checked += x.size


def verify_format(name: str, *, sample: int | None = None, seed: int = 0,
                  chunk: int = 1 << 24, progress=None) -> VerifyResult:
    """Verify ``name`` over all 2**32 float32 inputs, or over ``sample`` seeded random ones.

    ``progress`` is called with the number of inputs done after each chunk.
    """
    res = VerifyResult(name)
    t0 = time.perf_counter()
    if sample is None:
        for start in range(0, 1 << 32, chunk):
            bits = np.arange(start, start + chunk, dtype=np.uint64).astype(np.uint32)
            compare_chunk(name, bits.view(np.float32), res)
            if progress:
                progress(chunk)
    else:
        rng = np.random.default_rng(seed)
        left = sample
        while left > 0:
            k = min(left, chunk)
            bits = rng.integers(0, 1 << 32, size=k, dtype=np.uint64).astype(np.uint32)
            compare_chunk(name, bits.view(np.float32), res)
            left -= k
            if progress:
                progress(k)
    res.seconds = time.perf_counter() - t0
    return res
