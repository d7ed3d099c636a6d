"""Inputs of the GPU measurement (``run_device.sh``): written once, committed, read there.

``python make_inputs.py [OUT]`` writes ``inputs.npz`` (default: beside this file):

* ``mma/<input>/<nk>/a`` (tiles, 16, K) and ``.../b`` (tiles, 8, K) bit patterns of the input
  format (uint8, uint16 or uint32; tf32 as FP32 patterns with the low 13 bits zero), K =
  ``nk`` times the instruction's K; ``mma/<input>/<nk>/c_fp32`` (tiles, 16, 8) FP32 patterns and
  ``c_fp16`` FP16 patterns: the addend of the FP32- and FP16-output instructions.
* ``probe/...``: the same for two tiles of small integers, whose exact result every model
  gives (a check of the harness's fragment layouts, run first on the device).
* ``torch/<input>/a`` (M, K) and ``torch/<input>/b`` (K, N) for ``torch.matmul``.

Each tile draws its elements in one of five ways, to stress the alignment of a block: "wide"
(any finite value of the format, subnormals included), "near" (exponents within 3 of 1),
"cancel" (products in pairs of nearly equal magnitude and opposite sign), "tiny"
(subnormals and the smallest normals in A) and "sparse" (wide, half of them zeros, signed).
About 2% of tiles carry an infinity or NaN in A, B or C. The addends mix zeros, values near
and beyond the products' magnitudes, the rounded negated exact sum (cancellation down to the
last bits) and subnormals.
"""

from __future__ import annotations

import os
import sys

import numpy as np

#: input -> (exponent bits, fraction bits, storage bits, has infinities, instruction K)
FORMATS = {"fp16": (5, 10, 16, True, 16), "bf16": (8, 7, 16, True, 16),
           "tf32": (8, 10, 32, True, 8), "e4m3": (4, 3, 8, False, 32),
           "e5m2": (5, 2, 8, True, 32)}
#: instructions per dot product -> tiles of 128 dot products: 102,400 per input format
CHAINS = {1: 600, 4: 200}
TORCH_MNK = (320, 256, 320)
SEED = 20261205


def _bits(fmt, sign, efield, frac):
    """Bit patterns (uint64) from sign, exponent field and fraction (in the format's
    fraction bits); tf32 placed as an FP32 pattern."""
    e, m, w, _, _ = FORMATS[fmt]
    if fmt == "tf32":
        e, m = 8, 23
        frac = frac << 13
    u = np.uint64
    return (sign.astype(u) << u(e + m)) | (efield.astype(u) << u(m)) | frac.astype(u)


def _draw(rng, fmt, shape, mode):
    e, m, w, has_inf, _ = FORMATS[fmt]
    bias = 2 ** (e - 1) - 1
    top = 2 ** e - (2 if has_inf else 1)  # largest exponent field of a finite value
    sign = rng.integers(0, 2, shape)
    frac = rng.integers(0, 2 ** m, shape)
    if mode in ("wide", "sparse"):
        if e == 8:   # keep most products within FP32: exponents within 40 of 1, some beyond
            ef = np.where(rng.random(shape) < 0.1, rng.integers(0, top + 1, shape),
                          rng.integers(bias - 40, bias + 41, shape))
        else:
            ef = rng.integers(0, top + 1, shape)
    elif mode == "tiny":
        ef = rng.integers(0, 2, shape)
    else:
        ef = rng.integers(bias - 3, bias + 4, shape)
    if not has_inf:  # E4M3: S.1111.111 is NaN
        frac = np.where((ef == top) & (frac == 2 ** m - 1), 2 ** m - 2, frac)
    if mode == "sparse":
        z = rng.random(shape) < 0.5
        ef, frac = np.where(z, 0, ef), np.where(z, 0, frac)
    return sign, ef, frac


def _special(fmt):
    e, m, w, has_inf, _ = FORMATS[fmt]
    if fmt == "tf32":
        e, m = 8, 23
    inf = ((1 << e) - 1) << m
    nan = inf | (1 << (m - 1))
    if not has_inf:
        return [nan | ((1 << m) - 1)]         # E4M3's NaN
    return [inf, inf | (1 << (e + m)), nan]   # +inf, -inf, NaN


def decode(fmt, bits):
    """Values (float64) of bit patterns of an input format."""
    return np.asarray(bits).astype(_dtype(fmt)).view(_value_dtype(fmt)).astype(np.float64)


def _value_dtype(fmt):
    """The NumPy type whose values are those of ``fmt`` (tf32: float32, its low 13 bits 0)."""
    import ml_dtypes

    return {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "tf32": np.float32,
            "e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}[fmt]


def _dtype(fmt):
    return {8: np.uint8, 16: np.uint16, 32: np.uint32}[FORMATS[fmt][2]]


def _tile(rng, fmt, K):
    mode = rng.choice(["wide", "near", "cancel", "tiny", "sparse"])
    sa = _draw(rng, fmt, (16, K), mode)
    sb = _draw(rng, fmt, (8, K), "near" if mode == "tiny" and rng.random() < 0.5 else mode)
    a, b = _bits(fmt, *sa), _bits(fmt, *sb)
    if mode == "cancel":  # a[:, 2m+1] ~ a[:, 2m], b[:, 2m+1] ~ -b[:, 2m]: low bits redrawn
        m = FORMATS[fmt][1]
        low = np.uint64(2 ** max(1, m // 2) - 1)
        if fmt == "tf32":
            low = low << np.uint64(13)
        a[:, 1::2] = (a[:, 0::2] & ~low) | (a[:, 1::2] & low)
        flip = np.uint64(1) << np.uint64(FORMATS[fmt][2] - 1)
        b[:, 1::2] = ((b[:, 0::2] ^ flip) & ~low) | (b[:, 1::2] & low)
    if rng.random() < 0.02:
        target = a if rng.random() < 0.5 else b
        i, j = rng.integers(0, target.shape[0]), rng.integers(0, K)
        target[i, j] = rng.choice(_special(fmt))
    return a, b


def _addend(rng, exact, out):
    """Addends (float64 values exactly representable in ``out``) for exact sums ``exact``."""
    dt = np.float32 if out == "fp32" else np.float16
    big = 60 if out == "fp32" else 6
    with np.errstate(all="ignore"):
        mag = np.where(np.isfinite(exact) & (exact != 0), np.abs(exact), 1.0)
        e = np.floor(np.log2(mag))
        kind = rng.integers(0, 6, exact.shape)
        sig = rng.uniform(1, 2, exact.shape) * rng.choice([-1.0, 1.0], exact.shape)
        near = sig * np.exp2(np.clip(e + rng.integers(-30, 11, exact.shape), -big - 60, big))
        cancel = -exact * (1 + rng.integers(-4, 5, exact.shape) * 2.0 ** -20)
        sub = sig * (2.0 ** -130 if out == "fp32" else 2.0 ** -20) * rng.random(exact.shape)
        zero = rng.choice([0.0, -0.0], exact.shape)
        wide = sig * np.exp2(rng.integers(-big, big + 1, exact.shape).astype(float))
        c = np.select([kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
                      [zero, near, cancel, cancel, sub], wide)
        c = np.where(np.isfinite(c), c, 0.0).astype(dt)
    specials = rng.random(exact.shape) < 0.003
    c[specials] = rng.choice(np.array([np.inf, -np.inf, np.nan], dt), specials.sum())
    return c


def make(rng):
    out = {}
    for fmt, (_, _, _, _, ki) in FORMATS.items():
        for nk, tiles in CHAINS.items():
            K = nk * ki
            ab = [_tile(rng, fmt, K) for _ in range(tiles)]
            a = np.stack([t[0] for t in ab]).astype(_dtype(fmt))
            b = np.stack([t[1] for t in ab]).astype(_dtype(fmt))
            with np.errstate(all="ignore"):
                exact = np.einsum("tik,tjk->tij", decode(fmt, a), decode(fmt, b))
            key = f"mma/{fmt}/{nk}"
            out[f"{key}/a"], out[f"{key}/b"] = a, b
            out[f"{key}/c_fp32"] = _addend(rng, exact, "fp32").view(np.uint32)
            out[f"{key}/c_fp16"] = _addend(rng, exact, "fp16").view(np.uint16)
        # the probe: small integers, exact in every model and output
        K = 2 * ki
        va = rng.integers(-3, 4, (2, 16, K)).astype(np.float64)
        vb = rng.integers(-3, 4, (2, 8, K)).astype(np.float64)
        vc = rng.integers(-8, 9, (2, 16, 8)).astype(np.float64)
        out[f"probe/{fmt}/a"], out[f"probe/{fmt}/b"] = encode(fmt, va), encode(fmt, vb)
        out[f"probe/{fmt}/c_fp32"] = vc.astype(np.float32).view(np.uint32)
        out[f"probe/{fmt}/c_fp16"] = vc.astype(np.float16).view(np.uint16)
        M, K, N = TORCH_MNK
        ta = np.stack([_draw_row(rng, fmt, K) for _ in range(M)])
        tb = np.stack([_draw_row(rng, fmt, K) for _ in range(N)]).T
        out[f"torch/{fmt}/a"], out[f"torch/{fmt}/b"] = ta, np.ascontiguousarray(tb)
    return out


def _draw_row(rng, fmt, K):
    mode = rng.choice(["near", "near", "wide", "tiny"])
    if mode == "wide" and FORMATS[fmt][0] < 8:
        mode = "near"
    return _bits(fmt, *_draw(rng, fmt, (K,), mode)).astype(_dtype(fmt))


def encode(fmt, values):
    """Bit patterns of float64 values exactly representable in ``fmt``."""
    return np.asarray(values, np.float64).astype(_value_dtype(fmt)).view(_dtype(fmt))


def main(argv):
    path = argv[0] if argv else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                             "inputs.npz")
    arrays = make(np.random.default_rng(SEED))
    np.savez_compressed(path, **arrays)
    print(f"{path}: {len(arrays)} arrays, {os.path.getsize(path) / 1e6:.1f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
