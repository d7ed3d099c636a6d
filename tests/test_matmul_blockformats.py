"""Matrix products and convolutions on block-scaled operands (MatmulSpec(input=BlockFormat)):
the product against its two-level definition built from the block codes (each block's element
products summed exactly, scaled by the two block scales and the tensor scales, added to the
running sum with the accumulator's rounding), the composition with fs.quantize along K, the
convolution's lowered operands, the Policy.mx presets and their files, bad input.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import hardware, reference
from fixedsim.matmul.engine import im2col
from fixedsim.matmul.spec import stage_keys
from fixedsim.nn import Policy

PRESETS = [fs.MXFP8_E4M3, fs.MXFP8_E5M2, fs.MXFP6_E2M3, fs.MXFP6_E3M2, fs.MXFP4, fs.MXINT8,
           fs.NVFP4]


def decoded(x, fmt, axis):
    """(elements, scales per element, tensor scale) of ``x`` in ``fmt`` along ``axis``, all
    Fractions, from the codes fs.to_bits returns (decoded by the oracle)."""
    codes = fs.to_bits(x, fmt, axis=axis, packed=False)
    el = np.vectorize(lambda c: Fraction(reference.decode(int(c), fmt.element)),
                      otypes=[object])(codes.elements)
    sc = np.vectorize(lambda c: Fraction(reference.decode(int(c), fmt.scale)),
                      otypes=[object])(codes.scales)
    sc = np.repeat(sc, fmt.block, axis=axis)
    t = Fraction(1) if codes.tensor_scale is None else \
        Fraction(reference.decode(int(codes.tensor_scale), fmt.tensor_scale))
    return el, sc, t


def two_level(a, b, fmt, acc):
    """The definition: K zero-padded to whole blocks; for each block t of K, the exact sum of
    the element products times the two block scales (and tensor scales), added to the running
    sum (from +0) and rounded into ``acc.fmt`` with ``acc.rounding``: one rounding per block
    (``acc.block`` equals the format's block)."""
    K = a.shape[1]
    pad = -K % fmt.block
    ea, sa, ta = decoded(np.pad(a, ((0, 0), (0, pad))), fmt, -1)
    eb, sb, tb = decoded(np.pad(b, ((0, pad), (0, 0))), fmt, 0)
    out = np.empty((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            s = Fraction(0)
            for k0 in range(0, K + pad, fmt.block):
                blk = range(k0, k0 + fmt.block)
                part = sum(ea[i, k] * eb[k, j] for k in blk)
                if isinstance(s, float):  # an infinity stays (the products are finite)
                    continue
                s = reference.round_to_format(s + part * sa[i, k0] * sb[k0, j] * ta * tb,
                                              acc.fmt, acc.rounding, fs.Overflow.INFINITY)
                s = s if math.isinf(s) else Fraction(s)
            out[i, j] = float(s)
    return out


def operands(seed, shape, spread=6):
    """Normal values scaled by a power of two per element in ``2**+-spread``: blocks whose
    maxima and smallest elements differ by far (elements underflow, scales differ)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape) * np.exp2(rng.integers(-spread, spread + 1, shape))


@pytest.mark.parametrize("fmt", PRESETS, ids=lambda f: repr(f.element) + f"/{f.block}")
def test_product_is_the_scaled_block_sum(fmt):
    """K = 45 (not a multiple of the block): the padding changes no scale and adds nothing."""
    a, b = operands(1, (3, 45)), operands(2, (45, 4))
    acc = fs.Accumulator(fs.FP32, block=fmt.block)
    got = fs.matmul(a, b, fs.MatmulSpec(input=fmt, accumulator=acc))
    assert_same_bits(got.astype(np.float64), two_level(a, b, fmt, acc))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), fmt=st.sampled_from(PRESETS),
       K=st.integers(1, 70), rounding=st.sampled_from(["nearest_even", "toward_zero"]))
def test_product_is_the_scaled_block_sum_drawn(seed, fmt, K, rounding):
    a, b = operands(seed, (2, K), 10), operands(seed + 1, (K, 2), 10)
    acc = fs.Accumulator(fs.FP16, rounding=rounding, block=fmt.block)
    got = fs.matmul(a, b, fs.MatmulSpec(input=fmt, accumulator=acc))
    assert_same_bits(got.astype(np.float64), two_level(a, b, fmt, acc))


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_product_is_the_product_of_the_quantized_operands(rounding):
    """Operands quantized along K (a's last axis, b's second to last, zero-padded), with the
    documented draws (seeds ``stage_keys(seed)[0]`` and ``[1]``), then the product of those
    values under the rest of the spec: every accumulator and output, batches too."""
    a, b = operands(3, (2, 3, 50)), operands(4, (50, 5))
    fmt = fs.MXFP6_E3M2
    keys = stage_keys(9)
    pad = 64 - 50
    kw = dict(seed=int(keys[0])) if rounding == "stochastic" else {}
    qa = fs.quantize(np.pad(a, ((0, 0), (0, 0), (0, pad))), fmt, rounding, axis=-1, **kw)[..., :50]
    if rounding == "stochastic":
        kw = dict(seed=int(keys[1]))
    qb = fs.quantize(np.pad(b, ((0, pad), (0, 0))), fmt, rounding, axis=0, **kw)[:50]
    for acc, out in ((None, fs.FP32), (fs.Accumulator(fs.FP32), None),
                     (fs.Accumulator(fs.BF16, block=32), fs.FP16),
                     (hardware.spec("H100", "fp16").accumulator, None)):
        spec = fs.MatmulSpec(input=fmt, input_rounding=rounding, accumulator=acc, output=out,
                             seed=9)
        got, c = fs.matmul(a, b, spec, stats=True)
        inner = fs.MatmulSpec(accumulator=acc, output=out)
        assert_same_bits(got, fs.matmul(qa, qb, inner))
        assert c.input.roundings == a.size + b.size and c.input.inexact is None
    if rounding == "stochastic":  # the draws follow the seed
        other = fs.matmul(a, b, fs.MatmulSpec(input=fmt, input_rounding=rounding,
                                              output=fs.FP32, seed=10))
        assert not np.array_equal(other, fs.matmul(a, b, spec))


def test_batched_b_quantizes_each_matrix_along_its_k():
    a, b = operands(5, (2, 4, 40)), operands(6, (2, 40, 3))
    spec = fs.MatmulSpec(input=fs.MXFP4, output=fs.FP32)
    got = fs.matmul(a, b, spec)
    for i in range(2):
        assert_same_bits(got[i], fs.matmul(a[i], b[i], spec))


def test_conv2d_takes_its_lowered_operands_in_blocks_along_k():
    """conv2d and its two gradients: the blocks run along the K of the lowered product
    (channel x kernel offset for the forward; kernel x output channel, and image x position,
    for the gradients), as matmul on those matrices takes them."""
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((2, 3, 7, 7)), rng.standard_normal((4, 3, 3, 3))
    spec = fs.MatmulSpec(input=fs.MXFP8_E4M3, accumulator=fs.Accumulator(fs.FP32, block=32))
    y = fs.conv2d(x, w, spec, padding=1)
    cols = im2col(x, 3, 3, (1, 1), (1, 1), 7, 7)
    want = fs.matmul(cols, w.reshape(4, -1).T, spec)
    assert_same_bits(y, want.reshape(2, 7, 7, 4).transpose(0, 3, 1, 2))
    gy = rng.standard_normal(y.shape)
    gw = fs.conv2d_grad_weight(x, gy, w.shape, spec, padding=1)
    want = fs.matmul(gy.transpose(1, 0, 2, 3).reshape(4, -1), cols, spec)
    assert_same_bits(gw, want.reshape(w.shape))
    gx = fs.conv2d_grad_input(gy, w, x.shape, spec, padding=1)
    assert gx.shape == x.shape and np.isfinite(gx).all()


def test_policy_mx_presets_files_and_names(tmp_path):
    p = Policy.mx("mxfp8")
    assert p.forward.input == fs.MXFP8_E4M3 == p.grad_weight.input
    assert p.forward.accumulator == fs.Accumulator(fs.FP32, block=32)
    assert p.weights.fmt == fs.FP32 and p.name == "mx_mxfp8_e4m3"
    q = Policy.mx("mxfp4", "mxfp8_e5m2", "stochastic")
    assert q.forward.input == fs.MXFP4 and q.forward.input_rounding is fs.Rounding.NEAREST_EVEN
    assert q.grad_input.input == fs.MXFP8_E5M2
    assert q.grad_input.input_rounding is fs.Rounding.STOCHASTIC
    assert Policy.mx("nvfp4").forward.accumulator.block == 16
    assert Policy.parse("mx:mxfp4:mxfp8_e5m2:stochastic") == q
    for pol in (p, q, Policy.mx(fs.BlockFormat(fs.FP8_E4M3, block=16, scale_rule="rceil"))):
        path = tmp_path / f"{pol.name}.toml"
        pol.save(path)
        assert Policy.load(path) == pol
        assert Policy.from_dict(pol.to_dict()) == pol
    assert q.to_dict()["forward"]["input"] == "MXFP4"


def test_training_steps_under_mx_are_reproducible():
    from fixedsim.nn.train import TrainConfig, train

    cfg = TrainConfig(model="mlp", model_options={"hidden": [16]}, data="synthetic",
                      train_size=64, test_size=32, epochs=1, batch_size=32)
    pol = Policy.mx("mxfp4", "mxfp8_e5m2", "stochastic")
    one, two = train(cfg, pol, None, progress=False), train(cfg, pol, None, progress=False)
    assert one.history[-1]["train_loss"] == two.history[-1]["train_loss"]
    assert math.isfinite(one.history[-1]["train_loss"])


@pytest.mark.parametrize("bad, match", [
    (lambda: fs.MatmulSpec(output=fs.MXFP8_E4M3), "output cannot be a block format"),
    (lambda: fs.MatmulSpec(product=fs.MXFP4), "product cannot be a block format"),
    (lambda: Policy.mx("mxfp9"), "forward must be a BlockFormat or one of"),
    (lambda: Policy.parse("mx:"), "expected mx:FORWARD"),
    (lambda: Policy.from_dict({**Policy.mx().to_dict(),
                               "forward": {"input": {"block": 32}}}), "'element' is required"),
])
def test_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        bad()


def test_nan_reaches_the_whole_block_and_no_further():
    """A NaN makes its block's scale NaN (OCP MX): every product with that block is NaN, the
    outputs that do not read it are not."""
    a = np.ones((2, 64))
    a[0, 3] = np.nan
    b = np.ones((64, 2))
    got = fs.matmul(a, b, fs.MatmulSpec(input=fs.MXFP8_E4M3, output=fs.FP32))
    assert np.isnan(got[0]).all() and (got[1] == 64).all()
