"""fixedsim.nn layers: hand-written backward passes against finite differences, and the numerics
of the forward and backward passes under the float32, fixed-point and stochastic policies.

Gradient checks run under ``Policy.exact()``: no role rounds and every product is exact, rounded
once into float64, so each layer is the float64 function it describes and central differences
of a scalar objective ``f = sum(y * R)`` (``R`` fixed and random) estimate its gradient.

Tolerances of the gradient checks. With ``h = 1e-6`` the central difference
``(f(x+h) - f(x-h)) / 2h`` has a truncation error ``h**2 / 6 * |f'''|`` (about 1e-12 here:
the layers are linear, piecewise linear or smooth with O(1) third derivatives on these data)
and a rounding error about ``eps * |f| / h`` with ``eps = 2**-52`` and ``|f|`` at most a few
tens, i.e. below 1e-8. The analytic gradients are O(0.1 .. 10), so a relative error
(``max |num - ana| / max(1, max |ana|)``) of 1e-6 leaves a margin of about 100 above the
noise, while any error of the backward formula (a wrong index, a missing term, a transposed
kernel) shows up as an O(1) relative error. Piecewise-linear layers (ReLU, max-pooling) are
checked on data kept at least 1e-3 away from their kinks and ties, much further than ``h``.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import numeric_grad

import fixedsim as fs
from fixedsim import nn
from fixedsim.formats import FP32, FixedFormat

H = 1e-6
RTOL = 1e-6  # see the module docstring


def exact_ctx(**kw):
    return nn.Context(nn.Policy.exact(), seed=kw.pop("seed", 0), step=kw.pop("step", 0),
                      training=kw.pop("training", True))


def assert_grad(f, arr, analytic, coords=None, rtol=RTOL, what=""):
    """``analytic`` (same shape as ``arr``) agrees with central differences of ``f``."""
    analytic = np.asarray(analytic, np.float64)
    assert analytic.shape == arr.shape, (what, analytic.shape, arr.shape)
    num = numeric_grad(f, arr, coords)
    a = analytic.reshape(-1)
    idx = np.array(list(num))
    n = np.array([num[i] for i in idx])
    scale = max(1.0, float(np.abs(a).max()))
    err = float(np.abs(n - a[idx]).max()) / scale
    assert err < rtol, f"{what}: relative error {err:.3g} (numeric {n}, analytic {a[idx]})"


def assert_directional(f, arr, analytic, rng, rtol=RTOL, what=""):
    """The derivative of ``f`` along a random direction ``d`` equals ``<analytic, d>``: one
    check of every component at the cost of two evaluations."""
    d = rng.standard_normal(arr.shape)
    d /= np.linalg.norm(d)
    base = arr.copy()
    arr[...] = base + H * d
    fp = f()
    arr[...] = base - H * d
    fm = f()
    arr[...] = base
    num = (fp - fm) / (2 * H)
    ana = float(np.sum(np.asarray(analytic, np.float64) * d))
    scale = max(1.0, float(np.abs(analytic).max()))
    assert abs(num - ana) / scale < rtol, f"{what}: directional {num} vs {ana}"


def away_from_zero(rng, shape, gap=1e-3):
    """Normal values with |x| >= gap (ReLU kink kept far from the perturbation)."""
    x = rng.standard_normal(shape)
    return np.where(np.abs(x) < gap, np.copysign(gap, x) + np.sign(x) * gap, x)


def check_layer(layer, x, rng, params=(), ctx=None, coords_limit=8):
    """Gradient of ``sum(layer(x) * R)`` w.r.t. ``x`` and every parameter in ``params``:
    ``coords_limit`` random coordinates of each (all of a smaller tensor) by central
    differences, and every component at once along two random directions."""
    ctx = ctx or exact_ctx()
    if layer.name == "layer":
        layer.name = type(layer).__name__.lower()
    y = layer.forward(x, ctx)
    R = rng.standard_normal(y.shape)
    gx = layer.backward(R.copy(), ctx, need_input_grad=True)
    grads = {p.name: np.array(p.grad, copy=True) for p in layer.parameters()}

    def f():
        return float(np.sum(np.asarray(layer.forward(x, ctx), np.float64) * R))

    def check(arr, g, what):
        coords = (None if coords_limit is None or arr.size <= coords_limit
                  else sorted(rng.choice(arr.size, coords_limit, replace=False).tolist()))
        assert_grad(f, arr, g, coords, what=what)
        for _ in range(2):
            assert_directional(f, arr, g, rng, what=what + " (direction)")

    check(x, gx, f"{layer!r} input")
    for p in layer.parameters():
        if p.name in params:
            check(p.value, grads[p.name], f"{layer!r} {p.name}")
    return y, gx, grads


# -- finite-difference checks, layer by layer -------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients(bias):
    rng = np.random.default_rng(1)
    layer = nn.Linear(4, 3, bias=bias, rng=2)
    if bias:
        layer.bias.value[:] = rng.standard_normal(3)
    x = rng.standard_normal((3, 4))
    y, gx, grads = check_layer(layer, x, rng, params=("weight", "bias"), coords_limit=None)
    assert y.shape == (3, 3) and gx.shape == x.shape
    assert (layer.bias is not None) == bias
    assert set(grads) == ({"weight", "bias"} if bias else {"weight"})
    # the forward pass is x @ W + b exactly (rounded once into float64)
    ref = x @ layer.weight.value + (layer.bias.value if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("cin,cout,k,stride,padding,hw", [
    (2, 3, 3, 1, 0, (5, 5)),
    (2, 2, (2, 3), 1, 1, (4, 5)),
    (1, 2, (3, 2), 2, 0, (6, 5)),
    (2, 2, 3, 2, 1, (5, 6)),
    (1, 2, (1, 2), 2, (1, 0), (3, 4)),  # padding wider than the kernel row: rows of zeros
])
def test_conv2d_gradients(cin, cout, k, stride, padding, hw):
    rng = np.random.default_rng(3)
    layer = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, rng=4)
    layer.bias.value[:] = rng.standard_normal(cout)
    x = rng.standard_normal((2, cin, *hw))
    y, gx, grads = check_layer(layer, x, rng, params=("weight", "bias"))
    assert gx.shape == x.shape
    assert grads["weight"].shape == layer.weight.value.shape


def test_conv2d_without_bias_matches_a_loop():
    rng = np.random.default_rng(5)
    layer = nn.Conv2d(2, 2, (2, 3), stride=(1, 2), padding=1, bias=False, rng=6)
    layer.name = "conv"
    x = rng.standard_normal((1, 2, 3, 4))
    y, gx, grads = check_layer(layer, x, rng, params=("weight",))
    assert layer.parameters() == [layer.weight] and set(grads) == {"weight"}
    # the forward pass against a direct loop over the definition
    w = layer.weight.value
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.zeros(y.shape)
    for o in range(2):
        for i in range(y.shape[2]):
            for j in range(y.shape[3]):
                ref[0, o, i, j] = np.sum(xp[0, :, i:i + 2, 2 * j:2 * j + 3] * w[o])
    np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)


def test_relu_gradients():
    rng = np.random.default_rng(7)
    x = away_from_zero(rng, (3, 2, 2, 3))
    y, gx, _ = check_layer(nn.ReLU(), x, rng, coords_limit=None)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_bits_signed_zeros_nan_and_views(dtype):
    """ReLU's one-pass kernel: positives and NaN pass, -0.0, +0.0 and negatives give +0.0,
    the error passes where the input passed; strided inputs; bits as the definition's."""
    base = np.array([[1.5, -0.0, 0.0, -2.0, np.nan, 2.0**-149, -np.inf, np.inf]] * 3, dtype)
    x = base[:, ::-1]  # a view with negative strides
    g = np.arange(24, dtype=dtype).reshape(3, 8)[:, ::-1] - 5.0
    layer = nn.ReLU()
    ctx = nn.Context(nn.Policy.float32())
    y = layer.forward(x, ctx)
    keep = ~(x <= 0)
    want_y = np.where(keep, x, np.zeros((), dtype))
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_array_equal(y.view(f"u{y.itemsize}"), want_y.view(f"u{y.itemsize}"))
    gx = layer.backward(g, ctx)
    want_g = np.where(keep, g, np.zeros((), dtype))
    np.testing.assert_array_equal(gx.view(f"u{y.itemsize}"), want_g.view(f"u{y.itemsize}"))
    assert layer.forward(np.zeros((0, 3), dtype), ctx).shape == (0, 3)
    assert layer.forward(np.array([[-1, 2]]), ctx).tolist() == [[0, 2]]  # integers: numpy


@pytest.mark.parametrize("kernel,stride", [(2, None), ((2, 3), (2, 3)), (3, 1), ((3, 2), (2, 1))])
def test_maxpool_gradients(kernel, stride):
    rng = np.random.default_rng(8)
    # a permutation of well separated values: no ties within a window, gaps >> h
    x = rng.permutation(2 * 2 * 6 * 7).reshape(2, 2, 6, 7) * 0.01 - 1.0
    layer = nn.MaxPool2d(kernel, stride)
    y, gx, _ = check_layer(layer, x, rng, coords_limit=None)
    assert layer._overlap == (stride is not None and stride != kernel)


def test_maxpool_routes_to_first_maximum_and_sums_overlaps():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 1] = 5.0  # the centre lies in all four 2x2 windows of stride 1
    layer = nn.MaxPool2d(2, 1)
    ctx = exact_ctx()
    y = layer(x, ctx)
    np.testing.assert_array_equal(y, np.full((1, 1, 2, 2), 5.0))
    g = layer.backward(np.array([[[[1.0, 2.0], [3.0, 4.0]]]]), ctx)
    expect = np.zeros((1, 1, 3, 3))
    expect[0, 0, 1, 1] = 10.0
    np.testing.assert_array_equal(g, expect)
    # ties: the first maximum of the window in row-major order takes the whole error
    layer = nn.MaxPool2d(2)
    layer(np.ones((1, 1, 2, 2)), ctx)
    g = layer.backward(np.full((1, 1, 1, 1), 3.0), ctx)
    np.testing.assert_array_equal(g, [[[[3.0, 0.0], [0.0, 0.0]]]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel,stride", [(2, None), ((2, 3), (3, 2)), (3, 1), ((3, 2), (2, 4))])
def test_maxpool_kernel_matches_numpy_argmax(kernel, stride, dtype):
    """The pooling kernel against numpy's formulation (window views, argmax: the first NaN,
    else the first maximum, -0 and +0 tied), values and routed errors bit for bit."""
    from helpers import assert_same_bits

    rng = np.random.default_rng(11)
    x = rng.integers(-3, 4, (3, 2, 9, 10)).astype(dtype)  # many ties
    x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, -0.0, 0.0)
    x[0, 0, rng.integers(0, 9, 5), rng.integers(0, 10, 5)] = np.nan
    x[1, 1] = -np.inf
    layer = nn.MaxPool2d(kernel, stride)
    ctx = exact_ctx()
    y = layer(x, ctx)
    win = np.lib.stride_tricks.sliding_window_view(x, layer.kernel_size, axis=(2, 3))
    win = win[:, :, ::layer.stride[0], ::layer.stride[1]]
    flat = win.reshape(*win.shape[:4], -1)
    arg = flat.argmax(axis=-1)
    assert y.dtype == dtype
    assert_same_bits(y, np.take_along_axis(flat, arg[..., None], -1)[..., 0])
    np.testing.assert_array_equal(layer._arg, arg)
    gy = rng.standard_normal(y.shape).astype(dtype)
    gy[0, 0, 0, 0] = -0.0
    gx = layer.backward(gy, ctx)
    if not layer._overlap:
        want = np.zeros(x.shape)
        kh, kw = layer.kernel_size
        sh, sw = layer.stride
        for (n, c, ho, wo), a in np.ndenumerate(arg):
            want[n, c, ho * sh + a // kw, wo * sw + a % kw] += gy[n, c, ho, wo]
        assert_same_bits(gx, want.astype(dtype))


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 1), ((2, 3), (1, 2))])
def test_avgpool_gradients(kernel, stride):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2, 5, 6))
    check_layer(nn.AvgPool2d(kernel, stride), x, rng, coords_limit=None)


def test_flatten_gradients():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 3, 2, 2))
    y, gx, _ = check_layer(nn.Flatten(), x, rng, coords_limit=None)
    assert y.shape == (2, 12)
    np.testing.assert_array_equal(y, x.reshape(2, 12))


def test_dropout_gradients_and_mask():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 50))
    layer = nn.Dropout(0.3)
    layer.name = "drop"
    ctx = exact_ctx(seed=3, step=2)
    y, gx, _ = check_layer(layer, x, rng, ctx=ctx, coords_limit=20)
    kept = y != 0
    assert 0.5 < kept.mean() < 0.9  # p = 0.3 of 200 elements
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-15)
    # the mask is a function of (seed, step, layer name) only
    y2 = layer(x, exact_ctx(seed=3, step=2))
    np.testing.assert_array_equal(y, y2)
    y3 = layer(x, exact_ctx(seed=3, step=3))
    assert not np.array_equal(y3 != 0, kept)
    # identity in evaluation and for p = 0
    np.testing.assert_array_equal(layer(x, exact_ctx(training=False)), x)
    np.testing.assert_array_equal(layer.backward(x, exact_ctx(training=False)), x)
    np.testing.assert_array_equal(nn.Dropout(0.0)(x, ctx), x)


def test_dropout_rounds_once_from_float64():
    """The scaled value x / (1 - p) is computed in float64 and rounded once into the role: a
    float32 x / (1 - p) would round twice, which moves stochastic roundings (about 4 in 10,000
    elements here)."""
    fmt = FixedFormat(16, 14)
    policy = nn.Policy.fixed(16, 14, "stochastic")
    rng = np.random.default_rng(21)
    x = fs.quantize(rng.uniform(-1.3, 1.3, (4, 25000)), fmt)
    assert x.dtype == np.float32
    layer = nn.Dropout(0.3)
    layer.name = "drop"
    ctx = nn.Context(policy, seed=1, step=7)
    y = layer(x, ctx)
    mask = np.random.default_rng(ctx.key("drop", "dropout")).random(x.shape) >= 0.3
    expect = fs.quantize(np.where(mask, x.astype(np.float64) / 0.7, 0.0), fmt, "stochastic",
                         seed=ctx.key("drop", "activations"))
    np.testing.assert_array_equal(y, expect)
    g = layer.backward(x, ctx)
    expect = fs.quantize(np.where(mask, x.astype(np.float64) / 0.7, 0.0), fmt, "stochastic",
                         seed=ctx.key("drop", "errors"))
    np.testing.assert_array_equal(g, expect)


def test_batchnorm_gradients():
    rng = np.random.default_rng(12)
    layer = nn.BatchNorm2d(3)
    layer.gamma.value[:] = rng.uniform(0.5, 2.0, 3)
    layer.beta.value[:] = rng.standard_normal(3)
    x = rng.standard_normal((3, 3, 2, 3)) * 2.0 + 0.5
    y, gx, grads = check_layer(layer, x, rng, params=("gamma", "beta"), coords_limit=12)
    # normalised per channel over (N, H, W): mean beta, std gamma (up to eps)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), layer.beta.value, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), layer.gamma.value, rtol=1e-4)


def test_batchnorm_gradients_in_evaluation():
    """With running statistics the layer is affine in x: the batch-statistics terms of the
    training-mode backward must not appear."""
    rng = np.random.default_rng(22)
    layer = nn.BatchNorm2d(2)
    layer.gamma.value[:] = [0.7, 1.3]
    layer.beta.value[:] = [0.1, -0.2]
    layer.running_mean[:] = [0.3, -0.5]
    layer.running_var[:] = [0.8, 2.0]
    x = rng.standard_normal((2, 2, 3, 2))
    check_layer(layer, x, rng, params=("gamma", "beta"), ctx=exact_ctx(training=False),
                coords_limit=None)
    np.testing.assert_array_equal(layer.running_mean, [0.3, -0.5])  # not updated


def test_batchnorm_running_statistics_and_eval():
    rng = np.random.default_rng(13)
    layer = nn.BatchNorm2d(2, momentum=0.25)
    x = rng.standard_normal((4, 2, 3, 3)) + 1.0
    layer(x, exact_ctx())
    m = 4 * 3 * 3
    np.testing.assert_allclose(layer.running_mean, 0.25 * x.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(layer.running_var,
                               0.75 + 0.25 * x.var(axis=(0, 2, 3)) * m / (m - 1))
    y = layer(x, exact_ctx(training=False))
    ref = (x - layer.running_mean.reshape(1, -1, 1, 1)) / np.sqrt(
        layer.running_var.reshape(1, -1, 1, 1) + layer.eps)
    np.testing.assert_allclose(y, ref, rtol=1e-13)


def test_softmax_cross_entropy_gradients():
    rng = np.random.default_rng(14)
    z = rng.standard_normal((4, 5)) * 3
    labels = np.array([0, 4, 2, 2])
    lossf = nn.SoftmaxCrossEntropy()
    ctx = exact_ctx()
    loss = lossf(z, labels, ctx)
    ref = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(4), labels])
    assert abs(loss - ref) < 1e-14 * max(1.0, abs(ref)) * 10
    g = lossf.backward(ctx, scale=1.0)
    assert_grad(lambda: lossf(z, labels, ctx), z, g, what="softmax cross-entropy")
    # the loss scale multiplies the error (a power of two: exactly)
    lossf(z, labels, ctx)
    np.testing.assert_array_equal(lossf.backward(ctx, scale=1024.0), g * 1024.0)
    # large logits: the shifted log-sum-exp does not overflow
    assert np.isfinite(lossf(z * 1e3, labels, ctx))


def tiny_net(seed=0):
    """(2, 1, 5, 5) -> conv 3x3 -> batchnorm -> relu -> overlapping max-pool -> conv (1, 2)
    with padding (0, 1) -> relu -> avg-pool -> flatten -> linear: 4 logits."""
    rng = np.random.default_rng(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, rng=rng), nn.BatchNorm2d(2), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(2, 3, (1, 2), padding=(0, 1), rng=rng), nn.ReLU(), nn.AvgPool2d(2, 1),
        nn.Flatten(), nn.Linear(3 * 1 * 2, 4, rng=rng))
    for p in net.parameters():  # no zero biases, gamma away from 1: every term matters
        if p.name in ("bias", "beta"):
            p.value[:] = rng.standard_normal(p.value.shape) * 0.1
        if p.name == "gamma":
            p.value[:] = rng.uniform(0.5, 1.5, p.value.shape)
    return net


def test_whole_network_gradients():
    rng = np.random.default_rng(15)
    net = tiny_net()
    x = rng.standard_normal((2, 1, 5, 5))
    labels = np.array([1, 3])
    lossf = nn.SoftmaxCrossEntropy()
    ctx = exact_ctx()

    def f():
        return lossf(net.forward(x, ctx), labels, ctx)

    f()
    gx = net.backward(lossf.backward(ctx), ctx, need_input_grad=True)
    grads = net.named_parameters()
    assert [k for k in grads] == ["0.conv2d.weight", "0.conv2d.bias", "1.batchnorm2d.gamma",
                                  "1.batchnorm2d.beta", "4.conv2d.weight", "4.conv2d.bias",
                                  "8.linear.weight", "8.linear.bias"]
    analytic = {k: np.array(p.grad, copy=True) for k, p in grads.items()}
    assert all(np.any(g != 0) for g in analytic.values())
    # every parameter tensor along a random direction, and two coordinates of each
    for k, p in grads.items():
        assert_directional(f, p.value, analytic[k], rng, what=k)
        coords = sorted(rng.choice(p.value.size, min(p.value.size, 2), replace=False).tolist())
        assert_grad(f, p.value, analytic[k], coords, what=k)
    assert_directional(f, x, gx, rng, what="input")
    assert_grad(f, x, gx, [0, 12, 31, 44], what="input")
    # without need_input_grad the first layer's input gradient is skipped
    f()
    assert net.backward(lossf.backward(ctx), ctx) is None


# -- float32: agreement with a plain NumPy float32 implementation -----------------------------
def _im2col(x, kh, kw):
    N, C, Hh, W = x.shape
    Ho, Wo = Hh - kh + 1, W - kw + 1
    cols = np.empty((N, Ho, Wo, C, kh, kw), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[..., i, j] = x[:, :, i:i + Ho, j:j + Wo].transpose(0, 2, 3, 1)
    return cols.reshape(N * Ho * Wo, C * kh * kw), (N, Ho, Wo)


def _np_conv(x, w, b):
    O, C, kh, kw = w.shape
    cols, (N, Ho, Wo) = _im2col(x, kh, kw)
    y = cols @ w.reshape(O, -1).T + b
    return y.reshape(N, Ho, Wo, O).transpose(0, 3, 1, 2), cols


def _np_conv_backward(gy, cols, w, x_shape):
    O, C, kh, kw = w.shape
    N, _, Hh, W = x_shape
    g2 = gy.transpose(0, 2, 3, 1).reshape(-1, O)
    dw = (g2.T @ cols).reshape(w.shape)
    db = g2.sum(axis=0)
    dcols = (g2 @ w.reshape(O, -1)).reshape(N, Hh - kh + 1, W - kw + 1, C, kh, kw)
    dx = np.zeros(x_shape, np.float32)
    Ho, Wo = Hh - kh + 1, W - kw + 1
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + Ho, j:j + Wo] += dcols[..., i, j].transpose(0, 3, 1, 2)
    return dx, dw, db


def _np_maxpool(x):
    N, C, Hh, W = x.shape
    win = x.reshape(N, C, Hh // 2, 2, W // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(
        N, C, Hh // 2, W // 2, 4)
    arg = win.argmax(axis=-1)
    return np.take_along_axis(win, arg[..., None], -1)[..., 0], arg


def _np_maxpool_backward(gy, arg, x_shape):
    N, C, Hh, W = x_shape
    g = np.zeros((*gy.shape, 4), np.float32)
    np.put_along_axis(g, arg[..., None], gy[..., None], -1)
    return g.reshape(N, C, Hh // 2, W // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(x_shape)


def numpy_lenet_f32(params, x, labels):
    """Forward and backward of fixedsim.nn.lenet in plain NumPy float32."""
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = params
    z1, c1 = _np_conv(x, w1, b1)
    a1 = np.maximum(z1, 0)
    p1, arg1 = _np_maxpool(a1)
    z2, c2 = _np_conv(p1, w2, b2)
    a2 = np.maximum(z2, 0)
    p2, arg2 = _np_maxpool(a2)
    f = p2.reshape(len(x), -1)
    z3 = f @ w3 + b3
    a3 = np.maximum(z3, 0)
    logits = a3 @ w4 + b4
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    g = prob.copy()
    g[np.arange(len(x)), labels] -= 1
    g = (g / len(x)).astype(np.float32)
    grads = [None] * 4
    grads[3] = (a3.T @ g, g.sum(axis=0))
    g = (g @ w4.T) * (z3 > 0)
    grads[2] = (f.T @ g, g.sum(axis=0))
    g = (g @ w3.T).reshape(p2.shape)
    g = _np_maxpool_backward(g, arg2, a2.shape) * (z2 > 0)
    gx2, dw2, db2 = _np_conv_backward(g, c2, w2, p1.shape)
    grads[1] = (dw2, db2)
    g = _np_maxpool_backward(gx2, arg1, a1.shape) * (z1 > 0)
    _, dw1, db1 = _np_conv_backward(g, c1, w1, x.shape)
    grads[0] = (dw1, db1)
    acts = [z1, a1, p1, z2, a2, p2, f, z3, a3, logits]
    return acts, grads


def _round_weights(net, ctx):
    """Round the parameters into the policy's weight role, as a trainer does at the start."""
    for layer in net.layers:
        for p in layer.parameters():
            p.value = ctx.round("weights", p.value, layer.name, "init")


def test_float32_lenet_matches_numpy_float32():
    rng = np.random.default_rng(16)
    net = nn.lenet(3, channels=(4, 8), hidden=32)
    ctx = nn.Context(nn.Policy.float32(), seed=0, step=0)
    _round_weights(net, ctx)
    for p in net.parameters():  # non-zero biases
        if p.name == "bias":
            p.value = rng.uniform(-0.1, 0.1, p.value.shape).astype(np.float32)
    x = rng.uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    labels = np.array([0, 7, 3])

    # fixedsim, layer by layer, keeping every output and every error
    acts, h = [], x
    h = ctx.round("activations", h, "input")
    for layer in net.layers:
        h = layer.forward(h, ctx)
        acts.append(h)
    lossf = nn.SoftmaxCrossEntropy()
    lossf(h, labels, ctx)
    g = lossf.backward(ctx)
    errors = [g]
    for i in range(len(net.layers) - 1, -1, -1):
        g = net.layers[i].backward(g, ctx, need_input_grad=i > 0)
        if g is not None:
            errors.append(g)

    # dtype float32, every value a float32 (quantize is the identity)
    for v in acts + errors + [p.grad for p in net.parameters()]:
        assert v.dtype == np.float32, v.dtype
        np.testing.assert_array_equal(fs.quantize(v, FP32), v)

    params = [(layer.weight.value, layer.bias.value) for layer in net.layers
              if isinstance(layer, (nn.Conv2d, nn.Linear))]
    assert all(w.dtype == np.float32 and b.dtype == np.float32 for w, b in params)
    ref_acts, ref_grads = numpy_lenet_f32(params, x, labels)
    # Tolerance: fixedsim rounds each exact dot product once into float32 (Policy.float32()),
    # NumPy sums in float32 in BLAS's blocked order, rounding every multiply and add, so
    # each float32 dot product of K <= 256 terms differs by at most ~2 K u sum|a_k b_k|,
    # u = 2**-24, i.e. ~3e-5 of the size of its terms; through four products and a softmax
    # the differences stay a few 1e-5 of each tensor's largest element, and no ReLU or
    # max-pooling decision flips on these data (checked by the tight tolerance itself).
    # Measured (OpenBLAS, x86-64): the activations agree bit for bit, the weight gradients
    # (sums over the batch and image, K up to 1728) within 6e-7. 1e-4 leaves margin for
    # other BLAS blockings, while any real error (a wrong index, a missing term) is O(1).
    tol = 1e-4
    for k, (a, r) in enumerate(zip(acts, ref_acts, strict=True)):
        assert a.shape == r.shape
        err = np.abs(a.astype(np.float64) - r).max() / max(np.abs(r).max(), 1e-30)
        assert err < tol, f"activation {k}: {err}"
    conv_lin = [layer for layer in net.layers if isinstance(layer, (nn.Conv2d, nn.Linear))]
    for layer, (dw, db) in zip(conv_lin, ref_grads, strict=True):
        for mine_g, r in ((layer.weight.grad, dw), (layer.bias.grad, db)):
            err = np.abs(mine_g.astype(np.float64) - r).max() / np.abs(r).max()
            assert err < tol, f"{layer.name}: {err}"


# -- fixed point: every tensor on the grid ----------------------------------------------------
def _run_layers(net, x, labels, ctx):
    """Forward and backward layer by layer: (activations, errors, parameter gradients)."""
    acts = [ctx.round("activations", x, "input")]
    for layer in net.layers:
        acts.append(layer.forward(acts[-1], ctx))
    lossf = nn.SoftmaxCrossEntropy()
    loss = lossf(acts[-1], labels, ctx)
    errors = [lossf.backward(ctx)]
    for i in range(len(net.layers) - 1, -1, -1):
        g = net.layers[i].backward(errors[-1], ctx, need_input_grad=True)
        errors.append(g)
    grads = {k: p.grad for k, p in net.named_parameters().items()}
    return loss, acts, errors, grads


def small_cnn(seed):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, rng=rng), nn.BatchNorm2d(3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, stride=2, rng=rng), nn.ReLU(),
        nn.AvgPool2d(2, 1), nn.Flatten(), nn.Dropout(0.25), nn.Linear(4, 5, rng=rng))


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_fixed_point_everything_on_the_grid(rounding):
    fmt = FixedFormat(16, 14)
    policy = nn.Policy.fixed(16, 14, rounding)
    rng = np.random.default_rng(17)
    net = small_cnn(1)
    ctx = nn.Context(policy, seed=5, step=1)
    _round_weights(net, ctx)
    x = rng.uniform(-1, 1, (3, 1, 10, 10))
    labels = np.array([0, 4, 2])
    loss, acts, errors, grads = _run_layers(net, x, labels, ctx)
    assert np.isfinite(loss)
    tensors = ([("activation", a) for a in acts] + [("error", e) for e in errors]
               + [(k, g) for k, g in grads.items()]
               + [(k, p.value) for k, p in net.named_parameters().items()])
    for what, v in tensors:
        np.testing.assert_array_equal(fs.quantize(v, fmt), v, err_msg=what)
    assert any(np.any(e != 0) for e in errors[1:])  # the errors are not all flushed to zero


def test_stochastic_policy_is_deterministic_per_seed_and_step():
    policy = nn.Policy.fixed(16, 14, "stochastic")
    rng = np.random.default_rng(18)
    x = rng.uniform(-1, 1, (2, 1, 10, 10))
    labels = np.array([1, 2])

    def run(seed, step):
        net = small_cnn(2)
        ctx = nn.Context(policy, seed=seed, step=step)
        _round_weights(net, nn.Context(policy, seed=seed, step=0))
        loss, acts, errors, grads = _run_layers(net, x, labels, ctx)
        return [*acts, *errors[:-1], *grads.values()], ctx

    a, ctx_a = run(0, 3)
    b, _ = run(0, 3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c, _ = run(0, 4)
    d, _ = run(1, 3)
    differs = lambda p, q: any(not np.array_equal(u, v) for u, v in zip(p, q, strict=True))  # noqa: E731
    assert differs(a, c) and differs(a, d)
    # the first layer's output already differs: its rounding draws depend on the step
    assert not np.array_equal(a[1], c[1])
    # and stochastic rounding did round inexactly somewhere
    assert ctx_a.counters["0.conv2d"].roles["activations"].inexact > 0


# -- counters: MACs per layer ----------------------------------------------------------------
def test_counters_record_analytic_macs():
    rng = np.random.default_rng(19)
    N, C, O, Hh, W, kh, kw, s, p = 2, 2, 3, 6, 5, 3, 2, 2, 1
    conv = nn.Conv2d(C, O, (kh, kw), stride=s, padding=p, rng=0)
    conv.name = "conv"
    lin = nn.Linear(7, 4, rng=0)
    lin.name = "fc"
    Ho, Wo = (Hh + 2 * p - kh) // s + 1, (W + 2 * p - kw) // s + 1
    x = rng.standard_normal((N, C, Hh, W))
    xl = rng.standard_normal((N, 7))
    policy = nn.Policy.float32()

    fwd = nn.Context(policy)
    y = conv(x, fwd)
    yl = lin(xl, fwd)
    assert fwd.counters["conv"].products.macs == N * O * Ho * Wo * C * kh * kw
    assert fwd.counters["conv"].products.calls == 1
    assert fwd.counters["fc"].products.macs == N * 7 * 4
    # the output rounding into activations is counted per element
    assert fwd.counters["conv"].roles["activations"].roundings == y.size

    bwd_w = nn.Context(policy)  # weight and bias gradients only
    conv.backward(np.ones(y.shape, np.float32), bwd_w, need_input_grad=False)
    lin.backward(np.ones(yl.shape, np.float32), bwd_w, need_input_grad=False)
    assert bwd_w.counters["conv"].products.macs == (O * N * Ho * Wo * C * kh * kw  # dW
                                                    + N * Ho * Wo * O)             # db
    assert bwd_w.counters["fc"].products.macs == 7 * N * 4 + N * 4
    assert bwd_w.counters["conv"].products.calls == 2

    bwd = nn.Context(policy)  # and the input gradients
    conv.backward(np.ones(y.shape, np.float32), bwd)
    lin.backward(np.ones(yl.shape, np.float32), bwd)
    # the transposed convolution multiplies the zeros of the spread gradient too: one dot
    # product of length O*kh*kw per input element
    assert (bwd.counters["conv"].products.macs - bwd_w.counters["conv"].products.macs
            == N * C * Hh * W * O * kh * kw)
    assert bwd.counters["fc"].products.macs - bwd_w.counters["fc"].products.macs == N * 4 * 7
    assert bwd.counters["conv"].roles["errors"].roundings == x.size
    assert bwd.counters["fc"].roles["weight_grads"].roundings == 7 * 4 + 4

    # a whole model: the per-layer sum over the Sequential's names
    net = nn.lenet(0, channels=(2, 3), hidden=8)
    ctx = nn.Context(policy)
    out = net(rng.uniform(0, 1, (1, 1, 28, 28)), ctx)
    expect = {"0.conv2d": 1 * 2 * 24 * 24 * 1 * 25, "3.conv2d": 1 * 3 * 8 * 8 * 2 * 25,
              "7.linear": 1 * 48 * 8, "9.linear": 1 * 8 * 10}
    got = {k: c.products.macs for k, c in ctx.counters.items() if c.products.calls}
    assert got == expect
    assert out.shape == (1, 10)
    d = ctx.counters["0.conv2d"].as_dict()
    assert d["macs"] == expect["0.conv2d"] and d["calls"] == 1
    assert d["activations.roundings"] == 2 * 24 * 24


# -- bad input ----------------------------------------------------------------------------------
def test_bad_shapes_raise_clear_errors():
    ctx = exact_ctx()
    lin = nn.Linear(3, 2, rng=0)
    with pytest.raises(ValueError, match="Linear: expected 3 input features"):
        lin(np.zeros((2, 4)), ctx)
    with pytest.raises(ValueError, match="Linear: expected a 2-D input"):
        lin(np.zeros(3), ctx)
    conv = nn.Conv2d(2, 3, 3, rng=0)
    with pytest.raises(ValueError, match="Conv2d: expected a 4-D input"):
        conv(np.zeros((2, 5, 5)), ctx)
    with pytest.raises(ValueError, match="Conv2d: expected 2 input channels"):
        conv(np.zeros((1, 3, 5, 5)), ctx)
    with pytest.raises(ValueError, match="does not fit"):
        conv(np.zeros((1, 2, 2, 2)), ctx)
    with pytest.raises(ValueError, match="BatchNorm2d: expected 2 channels"):
        nn.BatchNorm2d(2)(np.zeros((1, 3, 2, 2)), ctx)
    with pytest.raises(ValueError, match="BatchNorm2d: expected a 4-D input"):
        nn.BatchNorm2d(2)(np.zeros((1, 2)), ctx)
    for pool in (nn.MaxPool2d(3), nn.AvgPool2d(3)):
        with pytest.raises(ValueError, match="larger than the input"):
            pool(np.zeros((1, 1, 2, 5)), ctx)
        with pytest.raises(ValueError, match="4-D input"):
            pool(np.zeros((1, 5, 5)), ctx)
    lossf = nn.SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        lossf(np.zeros((2, 3)), np.array([0, 1, 2]), ctx)
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        lossf(np.zeros((2, 3)), np.array([0.0, 1.0]), ctx)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        lossf(np.zeros((2, 3)), np.array([0, 3]), ctx)
    with pytest.raises(ValueError, match="SoftmaxCrossEntropy: expected a 2-D input"):
        lossf(np.zeros(3), np.array([0]), ctx)


def test_bad_backward_and_constructor_arguments():
    ctx = exact_ctx()
    rng = np.random.default_rng(20)
    layers = [(nn.Linear(3, 2, rng=0), (4, 3)), (nn.Conv2d(1, 2, 2, rng=0), (2, 1, 4, 4)),
              (nn.ReLU(), (2, 3)), (nn.MaxPool2d(2), (1, 1, 4, 4)),
              (nn.AvgPool2d(2), (1, 1, 4, 4)), (nn.Flatten(), (2, 2, 2)),
              (nn.Dropout(0.5), (2, 3)), (nn.BatchNorm2d(1), (2, 1, 2, 2))]
    for layer, shape in layers:
        name = type(layer).__name__
        with pytest.raises(RuntimeError, match=f"{name}: backward before forward"):
            layer.backward(np.zeros(shape), ctx)
        y = layer(rng.standard_normal(shape), ctx)
        bad = np.zeros((*y.shape[:-1], y.shape[-1] + 1))
        with pytest.raises(ValueError, match=f"{name}: grad_y must have shape"):
            layer.backward(bad, ctx)
        with pytest.raises(ValueError, match=f"{name}: grad_y must have shape"):
            layer.backward(np.zeros(y.shape[1:]), ctx)  # would broadcast
    with pytest.raises(RuntimeError, match="backward before forward"):
        nn.SoftmaxCrossEntropy().backward(ctx)
    with pytest.raises(ValueError, match="Linear in_features"):
        nn.Linear(0, 2)
    with pytest.raises(ValueError, match="Conv2d kernel_size"):
        nn.Conv2d(1, 2, 0)
    with pytest.raises(ValueError, match="Conv2d stride"):
        nn.Conv2d(1, 2, 3, stride=0)
    with pytest.raises(ValueError, match="Conv2d padding"):
        nn.Conv2d(1, 2, 3, padding=-1)
    with pytest.raises(ValueError, match="Dropout p"):
        nn.Dropout(1.0)
    with pytest.raises(ValueError, match="MaxPool2d stride"):
        nn.MaxPool2d(2, 0)
    with pytest.raises(TypeError, match="item 1 is not a fixedsim.nn layer"):
        nn.Sequential(nn.ReLU(), lambda x: x)
    with pytest.raises(ValueError, match="Context step"):
        nn.Context(nn.Policy.exact(), step=-1)
    with pytest.raises(TypeError, match="Context policy"):
        nn.Context("float32")
    with pytest.raises(ValueError, match="unknown model"):
        nn.build("resnet")
    with pytest.raises(ValueError, match="too small"):
        nn.lenet(0, in_shape=(1, 8, 8))


def test_lenet_batchnorm_variant():
    """``lenet(batchnorm=True)``: conv (no bias) - BatchNorm - ReLU - pool twice, with the
    weights of the plain LeNet of the same seed; built by name with the option (as
    ``model_options``); a bad flag is refused."""
    plain, bn = nn.lenet(5, channels=(3, 4), hidden=8), nn.lenet(5, channels=(3, 4), hidden=8,
                                                                  batchnorm=True)
    kinds = [type(m).__name__ for m in bn.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Conv2d", "BatchNorm2d",
                     "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert bn.layers[0].bias is None and bn.layers[4].bias is None
    pw = [p.value for k, p in plain.named_parameters().items() if k.endswith("weight")]
    bw = [p.value for k, p in bn.named_parameters().items() if k.endswith("weight")]
    assert len(pw) == len(bw) == 4
    assert all(np.array_equal(a, b) for a, b in zip(pw, bw, strict=True))
    x = np.random.default_rng(0).standard_normal((6, 1, 28, 28))
    y = bn.forward(x, nn.Context(nn.Policy.exact()))
    # in training mode each BatchNorm output channel has mean 0 over (N, H, W)
    h = bn.layers[1].forward(bn.layers[0].forward(x, nn.Context(nn.Policy.exact())),
                             nn.Context(nn.Policy.exact()))
    assert np.abs(h.mean(axis=(0, 2, 3))).max() < 1e-12
    ref = nn.build("lenet", 5, channels=(3, 4), hidden=8, batchnorm=True)
    assert np.array_equal(ref.forward(x, nn.Context(nn.Policy.exact())), y)
    with pytest.raises(ValueError, match="batchnorm must be true or false"):
        nn.lenet(0, batchnorm="yes")


@pytest.mark.parametrize("policy", ["fp16", "float32", "fixed:16:14:stochastic"])
def test_linear_scans_each_operand_once(policy, monkeypatch):
    """A Linear step scans the input and the weights once in its forward pass and the error
    once in its backward pass, for its four products (forward, weight and bias gradients,
    input gradient), and computes what the products compute when each scans its own
    operands (the layer's gradients and output, bit for bit)."""
    from fixedsim.matmul import core as mcore

    def step(layer, scans_given):
        ctx = nn.Context(nn.Policy.parse(policy), seed=3, step=0)
        y = layer.forward(x, ctx)
        if not scans_given:  # the backward products scan their operands themselves
            layer._scans = None
        dx = layer.backward(g, ctx)
        return y, dx, layer.weight.grad.copy(), layer.bias.grad.copy()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    g = (rng.standard_normal((6, 30)) * 0.1).astype(np.float32)
    layer = nn.Linear(40, 30, rng=1)
    sizes = []
    real = mcore._Bits.of.__func__
    monkeypatch.setattr(mcore._Bits, "of", classmethod(
        lambda cls, a: sizes.append(np.size(a)) or real(cls, a)))
    got = step(layer, True)
    assert sizes.count(40 * 30) == 1 and sizes.count(6 * 40) == 1 and sizes.count(6 * 30) == 1
    sizes.clear()
    want = step(layer, False)
    assert sizes.count(40 * 30) == 2  # the layer's (forward) and grad_input's own
    for a, b in zip(got, want, strict=True):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


@pytest.mark.parametrize("policy", ["float32", "fixed:16:12:stochastic"])
def test_backward_stops_at_the_first_trained_layer(policy):
    """The MLP begins with a Flatten: its first Linear computes no input gradient (nothing
    needs it) unless the model's input gradient is asked for; the parameter gradients are the
    same either way, bit for bit, and the MACs counted are those of the products run."""
    model = nn.build("mlp", 0, in_shape=(1, 6, 5), hidden=(7, 4))
    assert model.first_trained == 1
    assert nn.Sequential(nn.ReLU(), nn.Flatten()).first_trained == 2
    rng = np.random.default_rng(2)
    x = rng.random((3, 1, 6, 5)).astype(np.float32)
    y = np.array([0, 3, 9])
    lossf = nn.SoftmaxCrossEntropy()
    grads, macs = [], []
    for need in (False, True):
        ctx = nn.Context(nn.Policy.parse(policy), seed=1, step=0)
        lossf(model.forward(x, ctx), y, ctx)
        gx = model.backward(lossf.backward(ctx), ctx, need_input_grad=need)
        assert (gx is None) if not need else gx.shape == x.shape
        grads.append({k: p.grad.copy() for k, p in model.named_parameters().items()})
        macs.append(ctx.layer_counters("1.linear").products.macs)
    for k, g in grads[0].items():
        assert np.array_equal(g.view(np.uint8), grads[1][k].view(np.uint8)), k
    n, i, o = 3, 30, 7
    assert macs[0] == n * i * o + i * o * n + n * o  # forward, weight and bias gradients
    assert macs[1] == macs[0] + n * o * i  # and the input gradient
