"""conv2d and its two backward products: geometry, K order and rounding, against definitions."""

import itertools

import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import reference
from fixedsim.jit.rng import random_u64_array
from fixedsim.matmul import stage_keys

ACC_SPECS = [
    fs.MatmulSpec(),
    fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP16, output=fs.FP16),
    fs.MatmulSpec(input=fs.BF16, accumulator=fs.Accumulator(fs.BF16, "stochastic", block=4),
                  seed=5),
    fs.MatmulSpec(input=fs.FixedFormat(8, 4), accumulator=fs.Accumulator(
        fs.FixedFormat(10, 4), "toward_zero", "wrap")),
]


def pad_get(x, n, c, h, w):
    H, W = x.shape[2:]
    return float(x[n, c, h, w]) if 0 <= h < H and 0 <= w < W else 0.0


def draw_for(spec, seed):
    keys = stage_keys(seed)
    acc_bits = (spec.accumulator.random_bits or 64) if spec.accumulator else 64

    def draw(stage, i):
        bits = acc_bits if stage == reference.STAGE_ACCUMULATOR else (spec.random_bits or 64)
        return int(random_u64_array(keys[stage], i, 1)[0] >> np.uint64(64 - bits))

    return draw


@st.composite
def conv_case(draw):
    n, c, o = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    s, p = draw(st.integers(1, 3)), draw(st.integers(0, 2))
    h = draw(st.integers(max(1, kh - 2 * p), 6))
    w = draw(st.integers(max(1, kw - 2 * p), 6))
    vals = st.integers(-8, 8).map(lambda v: v / 4)
    x = np.array(draw(st.lists(vals, min_size=n * c * h * w, max_size=n * c * h * w)))
    wt = np.array(draw(st.lists(vals, min_size=o * c * kh * kw, max_size=o * c * kh * kw)))
    spec = draw(st.sampled_from(ACC_SPECS))
    return x.reshape(n, c, h, w), wt.reshape(o, c, kh, kw), s, p, spec


@settings(max_examples=40)
@given(conv_case())
def test_conv2d_is_the_modelled_dot_in_c_kh_kw_order(case):
    x, w, s, p, spec = case
    y = fs.conv2d(x, w, spec, stride=s, padding=p, seed=3)
    xq = fs.quantize(x, spec.input, spec.input_rounding) if spec.input else x
    wq = fs.quantize(w, spec.input, spec.input_rounding) if spec.input else w
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = y.shape[2:]
    draw = draw_for(spec, 3)
    for n, ho, wo, o in itertools.product(range(N), range(Ho), range(Wo), range(O)):
        row = [pad_get(xq, n, c, ho * s - p + i, wo * s - p + j)
               for c, i, j in itertools.product(range(C), range(kh), range(kw))]
        col = [float(wq[o, c, i, j]) for c, i, j in itertools.product(range(C), range(kh),
                                                                       range(kw))]
        index = ((n * Ho + ho) * Wo + wo) * O + o
        want = reference.dot(row, col, spec, draw=draw, index=index)
        assert_same_bits(np.float64(y[n, o, ho, wo]), np.float64(want),
                         err_msg=f"{spec} at {(n, o, ho, wo)}")


def direct_grads(x, w, gy, s, p):
    """Gradients of sum(conv2d(x, w) * gy) by their definitions (float64, exact here)."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    Ho, Wo = gy.shape[2:]
    gx = np.zeros_like(x)
    gw = np.zeros_like(w)
    for n, o, ho, wo, c, i, j in itertools.product(range(N), range(O), range(Ho), range(Wo),
                                                   range(C), range(kh), range(kw)):
        h, v = ho * s - p + i, wo * s - p + j
        if 0 <= h < H and 0 <= v < W:
            gx[n, c, h, v] += gy[n, o, ho, wo] * w[o, c, i, j]
            gw[o, c, i, j] += gy[n, o, ho, wo] * x[n, c, h, v]
    return gx, gw


@settings(max_examples=40)
@given(conv_case())
def test_backward_products_are_the_gradients(case):
    """With exact accumulation (small dyadic data: every sum exact) the products are exact."""
    x, w, s, p, _ = case
    y = fs.conv2d(x, w, stride=s, padding=p)
    gy = np.round(np.sin(np.arange(y.size)).reshape(y.shape) * 8) / 8
    gx_want, gw_want = direct_grads(x, w, gy, s, p)
    gx = fs.conv2d_grad_input(gy, w, x.shape, stride=s, padding=p)
    gw = fs.conv2d_grad_weight(x, gy, w.shape, stride=s, padding=p)
    assert_same_bits(gx + 0.0, gx_want + 0.0)
    assert_same_bits(gw + 0.0, gw_want + 0.0)


@settings(max_examples=25)
@given(conv_case())
def test_grad_input_runs_o_and_the_flipped_kernel_through_the_accumulator(case):
    """Each dx element is reference.dot over (o, kh-1-i, kw-1-j) of the zero-spread grad_y."""
    x, w, s, p, spec = case
    y = fs.conv2d(x, w, stride=s, padding=p)
    gy = np.round(np.cos(np.arange(y.size)).reshape(y.shape) * 16) / 4
    gx = fs.conv2d_grad_input(gy, w, x.shape, spec, stride=s, padding=p, seed=2)
    assert_grad_input_is_the_modelled_dot(gx, gy, w, x.shape, s, p, spec, 2)


def assert_grad_input_is_the_modelled_dot(gx, gy, w, x_shape, s, p, spec, seed):
    gq = fs.quantize(gy, spec.input, spec.input_rounding) if spec.input else gy
    wq = fs.quantize(w, spec.input, spec.input_rounding) if spec.input else w
    N, C, H, W = x_shape
    O, _, kh, kw = w.shape
    Ho, Wo = gy.shape[2:]

    def spread(n, o, u, v):  # the zero-spread gradient at padded position (u, v)
        hu, hv = u - (kh - 1 - p), v - (kw - 1 - p)
        if hu % s or hv % s or not (0 <= hu // s < Ho and 0 <= hv // s < Wo):
            return 0.0
        return float(gq[n, o, hu // s, hv // s])

    draw = draw_for(spec, seed)
    for n, c, h, v in itertools.product(range(N), range(C), range(H), range(W)):
        ks = list(itertools.product(range(O), range(kh), range(kw)))
        row = [spread(n, o, h + i, v + j) for o, i, j in ks]
        col = [float(wq[o, c, kh - 1 - i, kw - 1 - j]) for o, i, j in ks]
        index = ((n * H + h) * W + v) * C + c
        want = reference.dot(row, col, spec, draw=draw, index=index)
        assert_same_bits(np.float64(gx[n, c, h, v]), np.float64(want),
                         err_msg=f"{spec} at {(n, c, h, v)}")


@pytest.mark.parametrize("spec", [fs.MatmulSpec(), fs.MatmulSpec(output=fs.FP32),
                                  fs.MatmulSpec(output=fs.FixedFormat(16, 2), seed=4,
                                                output_rounding="stochastic")], ids=repr)
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("s, p", [(1, 0), (2, 1), (1, 2), (3, 4)])
def test_grad_input_exact_paths_without_the_zero_grid(spec, wide, s, p):
    """The exact-accumulation paths compute the input gradient as grad_y @ w and col2im
    (no zero-spread operand), in chunks of the K dimension when the codes are wide (25-bit
    integers: chunks of 8 products): bit for bit the modelled dot product of every element,
    signed zeros of all-zero sums included."""
    rng = np.random.default_rng(s * 10 + p)
    x_shape = (2, 2, 5, 4)
    w = rng.integers(-4, 5, (3, 2, 3, 3)).astype(np.float64)
    Ho = (5 + 2 * p - 3) // s + 1
    Wo = (4 + 2 * p - 3) // s + 1
    gy = rng.integers(-6, 7, (2, 3, Ho, Wo)).astype(np.float64) / 8
    gy[0, :, 0, :] = 0.0  # rows of zero products
    if wide:
        w = w * (2.0**24 + 1)
        gy = gy * (2.0**21 + 3)
    gx, c = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=s, padding=p, seed=4,
                                 stats=True)
    if spec.output is not fs.FP32 or not wide:
        assert c.paths == {"exact_blas": 1}
    assert_grad_input_is_the_modelled_dot(gx, gy, w, x_shape, s, p, spec, 4)


def test_conv_counters():
    x = np.ones((2, 3, 5, 5))
    w = np.ones((4, 3, 3, 3))
    spec = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, block=9))
    y, c = fs.conv2d(x, w, spec, padding=1, stats=True)
    assert y.shape == (2, 4, 5, 5)
    assert c.macs == 2 * 5 * 5 * 4 * 27 and c.input.roundings == x.size + w.size
    assert c.accumulator.roundings == y.size * 3


def test_conv_bad_input():
    x, w = np.ones((1, 2, 4, 4)), np.ones((3, 2, 3, 3))
    with pytest.raises(ValueError, match="C=2 channels, w expects C=3"):
        fs.conv2d(x, np.ones((3, 3, 3, 3)))
    with pytest.raises(ValueError, match="does not fit"):
        fs.conv2d(x, np.ones((3, 2, 5, 5)))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        fs.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        fs.conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match="stride must be an int"):
        fs.conv2d(x, w, stride=1.5)
    with pytest.raises(ValueError, match=r"x must have shape \(N, C, H, W\)"):
        fs.conv2d(np.ones((2, 4, 4)), w)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        fs.conv2d_grad_input(np.ones((1, 3, 3, 3)), w, x.shape)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        fs.conv2d_grad_weight(x, np.ones((1, 3, 3, 3)), w.shape)
    with pytest.raises(ValueError, match=r"x contains NaN.*Q<8,4>"):
        fs.conv2d(x * np.nan, w, fs.MatmulSpec(input=fs.FixedFormat(8, 4)))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([r for r in fs.Rounding if r is not fs.Rounding.STOCHASTIC]),
       st.sampled_from(["normal", "eighths", "sparse"]), st.integers(0, 2**32 - 1),
       st.sampled_from([(1, 0), (1, 1), (2, 0)]), st.booleans())
def test_grad_input_exact_filtered_without_the_zero_grid(rnd, kind, seed, sp, flip):
    """FP32 data rounded once into FP32 (the float32 policy's input gradient): the
    ``exact_filtered`` row takes the product from grad_y @ w and col2im, the row norms from
    the image (patch_norms) and the rows a second look needs from im2col_rows, never
    building the zero-spread matrix; bits as the modelled dot product of every element, and
    bits and counts as the same row on the built matrix; filtered transposed (``S.T``: three
    channels, 50 pixels) or not."""
    from fixedsim.matmul import filtered
    from fixedsim.matmul import paths as _paths

    s, p = sp
    rng = np.random.default_rng(seed)
    x_shape = (2, 3, 5, 5)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    Ho = (5 + 2 * p - 3) // s + 1
    gy = rng.standard_normal((2, 4, Ho, Ho)).astype(np.float32)
    if kind == "eighths":  # exact sums: marked, then summed again (two tiny values keep
        w, gy = np.round(w * 4) / 4, np.round(gy * 8) / 8  # the data off exact_blas)
        w[0, 0, 0, 0], gy[1, 1, 0, 0] = 2.0**-30, 2.0**-31
    elif kind == "sparse":
        gy[rng.random(gy.shape) < 0.8] = 0.0
    gy[0, :, 0, :] = 0.0  # pixels whose every product is zero
    spec = fs.MatmulSpec(output=fs.FP32, output_rounding=rnd)
    built = []
    orig = _paths.Product.rows_of_A

    def spy(self, rows):
        built.append(self.lazy)
        return orig(self, rows)

    flips = filtered._FLIP_BELOW
    try:
        _paths.Product.rows_of_A = spy
        filtered._FLIP_BELOW = flips if flip else 0
        gx, c = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=s, padding=p, stats=True)
    finally:
        _paths.Product.rows_of_A = orig
        filtered._FLIP_BELOW = flips
    assert c.paths.get("exact_filtered") == 1, c.paths
    assert all(built)
    assert_grad_input_is_the_modelled_dot(gx, gy, w, x_shape, s, p, spec, 0)
    lazy = _paths.Product.lazy
    try:
        _paths.Product.lazy = property(lambda self: False)
        filtered._FLIP_BELOW = flips if flip else 0
        gx2, c2 = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=s, padding=p, stats=True)
    finally:
        _paths.Product.lazy = lazy
        filtered._FLIP_BELOW = flips
    assert gx.tobytes() == gx2.tobytes() and c.output == c2.output


# -- the im2col matrix kept from the forward pass for the weight gradient --------------------------
MEMO_SPECS = ACC_SPECS + [fs.MatmulSpec(output=fs.FP32), fs.MatmulSpec(output=fs.BF16),
                          fs.MatmulSpec(input=fs.FixedFormat(8, 4), output=fs.FixedFormat(16, 8)),
                          fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32),
                          fs.MatmulSpec(accumulator=fs.FP32)]


@pytest.mark.parametrize("spec", MEMO_SPECS, ids=repr)
def test_weight_gradient_reuses_the_forward_im2col_bit_for_bit(spec):
    """Under ``reuse_im2col`` the weight gradient takes the forward pass's matrix (built once)
    and gives the bits and counts it gives without it; no path writes into the kept matrix."""
    from fixedsim.matmul import api

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2))
    gy = rng.standard_normal((2, 4, 4, 3))
    kw = dict(stride=(2, 2), padding=(1, 0), seed=3, stats=True)
    y0, cy0 = fs.conv2d(x, w, spec, **kw)
    g0, cg0 = fs.conv2d_grad_weight(x, gy, w.shape, spec, **kw)
    memo, built = {}, []
    real = api._conv.im2col

    def counted(*args):
        built.append(args[0].shape)
        return real(*args)

    api._conv.im2col = counted
    try:
        with api.reuse_im2col(memo):
            y1, cy1 = fs.conv2d(x, w, spec, **kw)
            (xq, cols), = memo.values()
            fresh = cols.copy()
            # float32 values under an FP32 chain: the matrix is built in float32 (no copy)
            chain32 = spec.accumulator == fs.Accumulator(fs.FP32)
            assert cols.dtype == (np.float32 if chain32 else np.float64)
            g1, cg1 = fs.conv2d_grad_weight(x, gy, w.shape, spec, **kw)
    finally:
        api._conv.im2col = real
    # a deterministic input rounding gives x the same bits in both products: built once
    assert len(built) == (2 if spec.input_rounding is fs.Rounding.STOCHASTIC else 1)
    assert_same_bits(y1, y0)
    assert_same_bits(g1, g0)
    assert cy1 == cy0 and cg1 == cg0
    assert_same_bits(cols, fresh)  # not written by the products
    # a float32 matrix that reaches the general kernel is taken in float64 (exact): the
    # kernel keeps one compiled signature
    from fixedsim.jit.gemm_general import gemm_general
    assert all(str(sig[0].dtype) == str(sig[1].dtype) == "float64"
               for sig in gemm_general.signatures), gemm_general.signatures


def test_im2col_memo_sees_an_operand_changed_in_place():
    """The kept matrix is a function of the operand's bits: an operand changed in place (here
    one value's sign, -0.0 for +0.0 too) is built again, never taken from the memo."""
    from fixedsim.matmul import api

    rng = np.random.default_rng(9)
    x = rng.standard_normal((1, 2, 5, 5))
    x[0, 0, 0, 0] = 0.0
    w = rng.standard_normal((3, 2, 2, 2))
    gy = rng.standard_normal((1, 3, 4, 4))
    spec = fs.MatmulSpec(output=fs.FP32)
    memo = {}
    with api.reuse_im2col(memo):
        fs.conv2d(x, w, spec)
        x[0, 1, 2, 3] *= -1.0
        g = fs.conv2d_grad_weight(x, gy, w.shape, spec)
        assert_same_bits(g, fs.conv2d_grad_weight(x.copy(), gy, w.shape, spec))
        x[0, 0, 0, 0] = -0.0
        (kept, _), = memo.values()
        assert not api._same_bits(kept, x)
        gy[0, 0, 0, 0] = 0.0  # one product of the -0.0 pixel only: a zero sum's sign shows
        spec_dn = fs.MatmulSpec(output=fs.FP32, output_rounding="down")
        assert_same_bits(fs.conv2d_grad_weight(x, gy, w.shape, spec_dn),
                         reference.matmul(gy.transpose(1, 0, 2, 3).reshape(3, -1),
                                          _cols(x, 2, 2), spec_dn).reshape(w.shape))


def _cols(x, kh, kw):
    """im2col by its definition (stride 1, no padding), float64."""
    N, C, H, W = x.shape
    return np.array([[x[n, c, h + i, v + j] for c in range(C) for i in range(kh)
                      for j in range(kw)]
                     for n in range(N) for h in range(H - kh + 1) for v in range(W - kw + 1)])


# -- the FP32 FMA chain of the input gradient, read from the gradient ------------------------------
@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["fp16", "f32", "tiny", "zeros"]), st.integers(0, 2**32 - 1),
       st.sampled_from([(1, 0), (1, 1), (2, 0), (2, 1), (1, 3), (3, 4)]))
def test_grad_input_fp32_chain_without_the_zero_grid(kind, seed, sp):
    """The FP32 FMA chain of the input gradient, when nothing reads its steps' events (a
    training step), runs on the gradient itself (conv_t_f32_chain; the grid's +0.0 steps
    left out when no partial sum can be -0.0), never building the zero-spread matrix: bits
    as the same row on the built matrix (its steps counted) and as the modelled dot product
    of every element, with sums that underflow to -0.0 (tiny), sums of zeros, signed zeros,
    strides and paddings wider than the kernel."""
    from fixedsim.matmul import paths as _paths

    s, p = sp
    rng = np.random.default_rng(seed)
    x_shape = (2, 2, 5, 4)
    w = rng.standard_normal((3, 2, 3, 2)).astype(np.float32)
    Ho, Wo = (5 + 2 * p - 3) // s + 1, (4 + 2 * p - 2) // s + 1
    gy = rng.standard_normal((2, 3, Ho, Wo)).astype(np.float32)
    if kind == "fp16":  # the fp16 policy's operands: products exact in float32
        w, gy = fs.quantize(w, fs.FP16), fs.quantize(gy, fs.FP16)
    elif kind == "tiny":  # products below float32's subnormals: sums round to +-0
        w = w * np.float32(2.0**-70)
        gy = gy * np.float32(2.0**-75)
    elif kind == "zeros":
        gy[rng.random(gy.shape) < 0.7] = 0.0
        gy[0, 1, 0, 0] = -0.0
    gy[0, :, 0, :] = 0.0  # pixels whose every product is zero
    spec = fs.MatmulSpec(accumulator=fs.FP32)
    row = "fp32_chain" if kind == "fp16" else "fp32_fma"
    built = []
    orig = _paths.Product.A

    def spy(self):
        built.append(True)
        return orig.fget(self)

    _paths.Product.A = property(spy)
    try:
        gx, c = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=s, padding=p, stats=True)
    finally:
        _paths.Product.A = orig
    assert c.paths == {row: 1} and not built  # the zero-spread matrix was never made
    gs, cs = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=s, padding=p, stats="steps")
    assert cs.paths == {row: 1}
    assert_same_bits(gx, gs)
    if kind == "tiny":  # the signed zeros of underflowing sums, against the definition
        assert_grad_input_is_the_modelled_dot(gx, gy, w, x_shape, s, p, spec, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 3), st.integers(1, 20),
       st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3),
       st.integers(0, 3), st.booleans(), st.booleans())
def test_grad_input_fp32_chain_flat_kernel(seed, N, O, C, kh, kw, sh, ph, pw, zeros, half):
    """With the grid's zeros left out and a column stride of 1, the FP32 FMA chain of the
    input gradient runs ``conv_t_f32_flat`` (a row's outputs side by side, one loop over
    their ``(w, c)``): the same bits as the chain on the built matrix (counted steps), for
    channel counts around the vector width (16, 17), row strides 1-3, paddings up to and
    beyond the kernel, sums of zeros and signed zeros, FP16 operands (exact products) and
    FP32 ones (the FMA's one rounding); the flat kernel really ran."""
    from fixedsim.jit import gemm_fp32 as _g32

    rng = np.random.default_rng(seed)
    H, W = int(rng.integers(kh, kh + 6)), int(rng.integers(kw, kw + 6))
    x_shape = (N, C, H, W)
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, W + 2 * pw - kw + 1
    w = rng.standard_normal((O, C, kh, kw)).astype(np.float32)
    gy = rng.standard_normal((N, O, Ho, Wo)).astype(np.float32)
    if half:
        w, gy = fs.quantize(w, fs.FP16), fs.quantize(gy, fs.FP16)
    if zeros:
        gy[rng.random(gy.shape) < 0.6] = 0.0
        gy[0, 0, 0, 0] = -0.0
    spec = fs.MatmulSpec(accumulator=fs.FP32)
    ran = []
    orig = _g32.conv_t_f32_flat

    def spy(*args):
        ran.append(True)
        return orig(*args)

    _g32.conv_t_f32_flat = spy
    try:
        gx, c = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=(sh, 1), padding=(ph, pw),
                                     stats=True)
    finally:
        _g32.conv_t_f32_flat = orig
    assert ran and c.paths == {"fp32_chain" if half else "fp32_fma": 1}
    gs, cs = fs.conv2d_grad_input(gy, w, x_shape, spec, stride=(sh, 1), padding=(ph, pw),
                                  stats="steps")
    assert cs.paths == {"fp32_chain" if half else "fp32_fma": 1}
    assert_same_bits(gx, gs)
