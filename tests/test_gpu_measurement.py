"""The GPU measurement of studies/tensor_cores/gpu, checked off the GPU: its committed
inputs, its layout probe, and its comparison (compare.py) on results made by the presets
themselves (0 mismatches) and on one flipped bit (1 mismatch). The measurement itself needs
a lent GPU (run_device.sh); its results, once measured, are checked by compare.py."""

import os
import sys

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import hardware

GPU = os.path.join(os.path.dirname(__file__), os.pardir, "studies", "tensor_cores", "gpu")
sys.path.insert(0, os.path.abspath(GPU))
import compare  # noqa: E402
import make_inputs  # noqa: E402


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(os.path.join(GPU, "inputs.npz")))


def test_inputs_are_what_the_docstring_says(inputs):
    for fmt, (_, _, w, _, ki) in make_inputs.FORMATS.items():
        n = specials = 0
        for nk, tiles in make_inputs.CHAINS.items():
            a, b = inputs[f"mma/{fmt}/{nk}/a"], inputs[f"mma/{fmt}/{nk}/b"]
            assert a.shape == (tiles, 16, nk * ki) and b.shape == (tiles, 8, nk * ki)
            assert a.dtype == {8: np.uint8, 16: np.uint16, 32: np.uint32}[w]
            assert inputs[f"mma/{fmt}/{nk}/c_fp32"].shape == (tiles, 16, 8)
            n += tiles * 128
            v = compare.decode(fmt, np.concatenate([a, b], axis=1))
            if fmt == "tf32":
                assert not (a & 0x1FFF).any() and not (b & 0x1FFF).any()
            finite = v[np.isfinite(v)]
            # each value is one of the format's: quantizing changes nothing
            assert np.array_equal(np.asarray(fs.quantize(finite, compare._FMT[fmt])), finite)
            tiny = np.abs(finite) < compare._FMT[fmt].min_normal
            assert tiny.sum() > 100 and (finite == 0).sum() > 100  # subnormals and zeros
            specials += (~np.isfinite(v)).sum()
            assert (~np.isfinite(v)).sum() < v.size // 1000
        assert n == 102_400 and specials > 0  # a few infinities or NaNs


@pytest.mark.parametrize("fmt", list(make_inputs.FORMATS))
def test_probe_is_exact_under_every_model(inputs, fmt):
    a = compare.decode(fmt, inputs[f"probe/{fmt}/a"])
    b = compare.decode(fmt, inputs[f"probe/{fmt}/b"]).transpose(0, 2, 1)
    for out in ("fp32", "fp16") if fmt not in ("bf16", "tf32") else ("fp32",):
        c = compare.out_values(out, inputs[f"probe/{fmt}/c_{out}"])
        want = c + a @ b
        for name, spec in compare.models("H200", fmt, out):
            assert np.array_equal(np.asarray(fs.matmul(a, b, spec, c=c)), want), name


def _small(inputs, tiles=6):
    return {k: (v[:tiles] if k.startswith("mma/") else v) for k, v in inputs.items()}


@pytest.mark.parametrize("combo", ["fp16_fp32", "tf32_fp32", "e4m3_fp32", "e5m2_fp16"])
def test_compare_counts_mismatches_of_the_preset(inputs, combo):
    fmt, out = combo.split("_")
    inp = _small(inputs)
    src = f"mma/{fmt}/4"
    a, b = compare.decode(fmt, inp[f"{src}/a"]), compare.decode(fmt, inp[f"{src}/b"])
    c = compare.out_values(out, inp[f"{src}/c_{out}"])
    d = np.asarray(fs.matmul(a, b.transpose(0, 2, 1), hardware.spec("H200", fmt, out), c=c))
    bits = d.astype(np.float32 if out == "fp32" else np.float16).view(
        np.uint32 if out == "fp32" else np.uint16)

    class Measured(dict):
        files = property(lambda self: list(self))

    rows = list(compare.harness_rows(Measured({f"mma/{combo}/4/d": bits}), inp, "H200"))
    assert rows[0][2] == "preset" and rows[0][4] == 0
    flipped = bits.copy()
    flipped.flat[5] ^= 1
    rows = list(compare.harness_rows(Measured({f"mma/{combo}/4/d": flipped}), inp, "H200"))
    assert rows[0][4:] == (1, 5)
