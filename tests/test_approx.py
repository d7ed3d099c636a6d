"""Column-row sampling (fixedsim.approx): the estimator, its exact cases, counts, seeds, errors,
and the sampled Linear/Conv2d layers in training.

The statistical tests state their bound: the mean of R seeded draws must lie within 5 empirical
standard errors (``std(ddof=1) / sqrt(R)``) of the exact product, entry by entry, plus the
float64 rounding of the estimates (a few ulps of the terms summed, far below the standard
error here). The draws are seeded (seed r for draw r), so the tests are deterministic; for a
normal mean a 5-sigma excursion has probability 6e-7 per entry.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import helpers
import numpy as np
import pytest
from helpers import assert_same_bits, numeric_grad
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fixedsim as fs
from fixedsim import nn
from fixedsim.approx import Approx, keep_count, parse_approx, sampled_conv2d, sampled_matmul, select
from fixedsim.approx.core import _bernoulli_probabilities
from fixedsim.nn.train import TrainConfig, train

STOCH = fs.Rounding.STOCHASTIC
SPECS = [
    fs.MatmulSpec(),
    fs.MatmulSpec(input=fs.FP16, accumulator=fs.FP32, output=fs.FP32),
    fs.MatmulSpec(input=fs.BF16, input_rounding=STOCH, output=fs.FP16, output_rounding=STOCH,
                  seed=11),
    fs.MatmulSpec(input=fs.FixedFormat(16, 12), output=fs.FixedFormat(16, 12)),
]


def _ab(seed, M=3, K=8, N=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((M, K)), rng.standard_normal((K, N))


# -- unbiasedness ------------------------------------------------------------------------------
@pytest.mark.parametrize("method,keep,eps", [("crs", 3, 0), ("bernoulli", 3, 0),
                                             ("crs", 0.25, 0.1), ("bernoulli", 0.5, 0.2)])
def test_random_methods_are_unbiased(method, keep, eps):
    a, b = _ab(1)
    a[:, 2] = 0.0  # a pair of weight 0 (probability 0) is part of the exact sum too
    a[0, 5] = 40.0  # a pair whose Bernoulli share would exceed 1: clipped, kept for certain
    exact = a @ b
    R = 3000
    ys = np.stack([sampled_matmul(a, b, keep, method=method, seed=r, epsilon=eps)[0]
                   for r in range(R)])
    mean, se = ys.mean(axis=0), ys.std(axis=0, ddof=1) / np.sqrt(R)
    assert (se > 0).all()  # the estimate does vary: the bound below is not vacuous
    rounding = 8 * np.finfo(float).eps * (np.abs(a) @ np.abs(b)) * a.shape[1]
    assert (np.abs(mean - exact) <= 5 * se + rounding).all(), (mean, exact, se)


def test_conv_crs_is_unbiased():
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 5, 4, 4)), rng.standard_normal((3, 5, 3, 3))
    exact = fs.conv2d(x, w, padding=1)
    R = 800
    ys = np.stack([sampled_conv2d(x, w, 2, method="crs", seed=r, padding=1)[0]
                   for r in range(R)])
    mean, se = ys.mean(axis=0), ys.std(axis=0, ddof=1) / np.sqrt(R)
    assert (se > 0).all()
    assert (np.abs(mean - exact) <= 5 * se + 1e-12).all()


def test_biased_topk_is_not_unbiased():
    """The bound above can fail: top-k at k < K misses the dropped pairs' sum."""
    a, b = _ab(3)
    y, st_ = sampled_matmul(a, b, 4, method="topk")
    dropped = np.setdiff1d(np.arange(8), st_.kept)
    assert_same_bits(y, fs.matmul(a[:, st_.kept], b[st_.kept]))
    assert np.abs(a[:, dropped] @ b[dropped]).max() > 0


# -- probabilities -----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.integers(1, 12),
                  elements=st.one_of(st.just(0.0), st.floats(1e-3, 1e3))),
       st.integers(1, 12))
def test_bernoulli_probabilities_sum_to_k_and_clip_at_one(w, k):
    k = min(k, w.size)
    p = _bernoulli_probabilities(w, k)
    nz = w > 0
    assert ((p >= 0) & (p <= 1)).all() and (p[~nz] == 0).all()
    if k >= nz.sum():
        assert (p[nz] == 1).all()
        return
    assert p.sum() == pytest.approx(k, rel=1e-12)
    free = nz & (p < 1)  # unclipped pairs: p proportional to w, with one factor mu
    mu = p[free] / w[free]
    assert np.allclose(mu, mu[0], rtol=1e-12)
    assert (mu[0] * w[p == 1] >= 1 - 1e-12).all()  # clipped pairs would exceed 1


@pytest.mark.parametrize("method,total", [("crs", 1.0), ("bernoulli", 3.0)])
def test_epsilon_mixes_uniform_over_nonzero_pairs(method, total):
    w = np.array([10.0, 0.0, 1.0, 2.0, 0.5])
    s0 = select(w, 3, method, 0)
    s1 = select(w, 3, method, 0, epsilon=0.25)
    nz = w > 0
    u = nz / nz.sum() * (1 if method == "crs" else 3)
    assert_same_bits(s1.probabilities, 0.75 * s0.probabilities + 0.25 * u)
    assert s1.probabilities.sum() == pytest.approx(total) and s1.probabilities[1] == 0
    assert (s1.probabilities <= 1).all()
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0, 1\], got 1.5"):
        select(w, 3, method, 0, epsilon=1.5)


def test_crs_scales_and_counts():
    a, b = _ab(4)
    y, s = sampled_matmul(a, b, 5, method="crs", seed=9)
    assert s.counts.sum() == 5 and (s.counts >= 1).all()
    assert np.array_equal(s.kept, np.unique(s.kept))
    assert_same_bits(s.scale, s.counts / (5 * s.probabilities[s.kept]))
    assert_same_bits(y, fs.matmul(a[:, s.kept] * s.scale, b[s.kept]))


# -- exact cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS, ids=repr)
@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**32))
def test_topk_with_every_pair_is_the_dense_product(spec, seed):
    a, b = _ab(seed, 4, 9, 3)
    y, s = sampled_matmul(a, b, 9, method="topk", spec=spec, product_seed=5)
    assert_same_bits(y, fs.matmul(a, b, spec, seed=5))
    assert s.macs == s.dense_macs == 4 * 9 * 3


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_bernoulli_with_every_pair_is_the_dense_product(spec):
    """At k = K every pair of nonzero weight has p = 1 and scale 1."""
    a, b = _ab(5, 4, 9, 3)
    y, s = sampled_matmul(a, b, 1.0, method="bernoulli", spec=spec, seed=3, product_seed=5)
    assert (s.scale == 1).all() and s.kept.size == 9
    assert_same_bits(y, fs.matmul(a, b, spec, seed=5))


def test_crs_with_every_pair_is_not_exact():
    """CRS draws with replacement: k = K is an unbiased estimate, not the product."""
    a, b = _ab(6)
    y, s = sampled_matmul(a, b, 8, method="crs", seed=0)
    assert s.kept.size < 8 and not np.allclose(y, a @ b)


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_kept_pairs_run_through_the_spec(spec):
    """The result is matmul of the scaled kept columns and the kept rows under the spec."""
    a, b = _ab(7, 5, 10, 4)
    for method in ("crs", "bernoulli", "topk"):
        y, s = sampled_matmul(a, b, 4, method=method, seed=2, spec=spec, product_seed=8)
        a_s = a[:, s.kept] * s.scale
        assert_same_bits(y, fs.matmul(a_s, b[s.kept], spec, seed=8))


def test_conv_topk_with_every_channel_is_the_dense_convolution():
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((2, 4, 5, 5)), rng.standard_normal((3, 4, 3, 3))
    spec = SPECS[1]
    y, s = sampled_conv2d(x, w, 4, method="topk", spec=spec, stride=2, padding=1)
    assert_same_bits(y, fs.conv2d(x, w, spec, stride=2, padding=1))
    y, s = sampled_conv2d(x, w, 2, method="bernoulli", spec=spec, seed=4, padding=1)
    xs = x[:, s.kept] * s.scale[None, :, None, None]
    assert_same_bits(y, fs.conv2d(xs, w[:, s.kept], spec, padding=1))
    assert s.macs * 4 == s.dense_macs * s.kept.size


# -- counts and seeds --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["crs", "bernoulli", "topk"])
def test_counted_macs_are_the_kept_pairs(method):
    a, b = _ab(9, 6, 20, 5)
    for seed in range(5):
        y, s = sampled_matmul(a, b, 0.3, method=method, seed=seed)
        assert s.macs == s.counters.macs == 6 * 5 * s.kept.size
        assert s.dense_macs == 6 * 5 * 20
    with fs.counters.record() as c:  # a record() block sees the MACs performed
        _, s = sampled_matmul(a, b, 6, method=method, seed=1)
    assert c.macs == 6 * 5 * s.kept.size


@pytest.mark.parametrize("method", ["crs", "bernoulli"])
def test_same_seed_same_bits(method):
    a, b = _ab(10, 4, 16, 3)
    y1, s1 = sampled_matmul(a, b, 5, method=method, seed=123, spec=SPECS[2])
    y2, s2 = sampled_matmul(a, b, 5, method=method, seed=123, spec=SPECS[2])
    assert_same_bits(y1, y2)
    assert np.array_equal(s1.kept, s2.kept)
    kept = {tuple(sampled_matmul(a, b, 5, method=method, seed=r)[1].kept) for r in range(20)}
    assert len(kept) > 1  # the seed does change the draws


def test_generator_seed_is_accepted():
    a, b = _ab(11)
    y1, _ = sampled_matmul(a, b, 3, seed=np.random.default_rng(4))
    y2, _ = sampled_matmul(a, b, 3, seed=4)
    assert_same_bits(y1, y2)


@pytest.mark.parametrize("method", ["crs", "bernoulli", "topk"])
def test_all_zero_operand_gives_zeros(method):
    a, b = np.zeros((3, 4)), np.ones((4, 2))
    y, s = sampled_matmul(a, b, 2, method=method, seed=0)
    assert_same_bits(y, np.zeros((3, 2)))
    assert s.macs == 3 * 2 * s.kept.size
    assert s.kept.size == (2 if method == "topk" else 0)
    y, s = sampled_conv2d(np.zeros((1, 2, 3, 3)), np.ones((2, 2, 2, 2)), 1, method=method)
    assert_same_bits(y, np.zeros((1, 2, 2, 2)))


def test_zero_weight_pairs_are_never_drawn():
    a, b = _ab(12)
    b[[1, 4]] = 0.0
    for r in range(50):
        for method in ("crs", "bernoulli"):
            kept = sampled_matmul(a, b, 6, method=method, seed=r)[1].kept
            assert not np.isin([1, 4], kept).any()


# -- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,match", [
    (0, r"keep = 0 pairs is out of range.*\[1, 8\]"),
    (9, r"keep = 9 pairs is out of range.*K = 8"),
    (0.0, r"fraction must be in \(0, 1\], got 0.0"),
    (1.5, r"fraction must be in \(0, 1\], got 1.5"),
    (float("nan"), r"fraction must be in \(0, 1\]"),
    (True, r"int count of pairs or a float fraction"),
    ("half", r"int count of pairs or a float fraction"),
])
def test_bad_keep(keep, match):
    a, b = _ab(13)
    with pytest.raises(ValueError, match=match):
        sampled_matmul(a, b, keep)


def test_bad_method_shape_and_values():
    a, b = _ab(14)
    with pytest.raises(ValueError, match=r"unknown method 'uniform'.*crs, bernoulli, topk"):
        sampled_matmul(a, b, 2, method="uniform")
    with pytest.raises(ValueError, match=r"same K, got \(3, 8\) and \(7, 2\)"):
        sampled_matmul(a, b[:7], 2)
    with pytest.raises(ValueError, match=r"same C"):
        sampled_conv2d(np.ones((1, 2, 3, 3)), np.ones((1, 3, 2, 2)), 1)
    a[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        sampled_matmul(a, b, 2)
    with pytest.raises(ValueError, match=r"count must be in \[1, 4\]"):
        keep_count(5, 4)
    with pytest.raises(ValueError, match="weights must be a 1-D array"):
        select([1.0, -1.0], 1)


def test_keep_fraction_rounds_to_nearest():
    assert [keep_count(f, 10) for f in (0.01, 0.25, 0.3, 0.5, 1.0)] == [1, 3, 3, 5, 10]


# -- the setting ---------------------------------------------------------------------------------
def test_approx_parse_round_trip():
    for text in ("crs:0.5:forward", "topk:16:forward+grad_weight", "bernoulli:0.3:grad_input",
                 "crs:0.5:forward:seed=3", "crs:0.5:forward:eps=0.1",
                 "bernoulli:8:grad_weight:seed=2:eps=0.25"):
        a = Approx.parse(text)
        assert str(a) == text and Approx.parse(str(a)) == a
        assert Approx(**a.to_dict()) == a
    assert Approx.parse("crs:0.5") == Approx("crs", 0.5, ("forward",))
    assert Approx.parse("crs:0.5:grad_weight+forward").products == ("forward", "grad_weight")
    assert Approx.parse("crs:1").keep == 1 and Approx.parse("crs:1.0").keep == 1.0
    assert parse_approx("") is None and parse_approx(None) is None
    assert Approx.parse("crs:0.5:eps=0.1:seed=4") == Approx("crs", 0.5, seed=4, epsilon=0.1)


@pytest.mark.parametrize("text,match", [
    ("crs", r"expected METHOD:KEEP"),
    ("uniform:0.5", r"method must be one of crs, bernoulli, topk, got 'uniform'"),
    ("crs:half", r"KEEP must be a count \(int\) or a fraction"),
    ("crs:1.5", r"keep must be an int count >= 1 or a float fraction in \(0, 1\], got 1.5"),
    ("crs:0", r"got 0"),
    ("crs:0.5:backward", r"products must be distinct names among forward, grad_input, "
                         r"grad_weight"),
    ("crs:0.5:forward+forward", r"distinct"),
    ("crs:0.5:forward:seed=x", r"seed must be an int, got 'x'"),
    ("crs:0.5:forward:step=3", r"expected METHOD:KEEP"),
    ("crs:0.5:forward:seed=1:seed=2", r"expected METHOD:KEEP"),
    ("crs:0.5:eps=x", r"eps must be a float in \[0, 1\], got 'x'"),
    ("crs:0.5:eps=1.5", r"Approx epsilon must be a number in \[0, 1\], got 1.5"),
])
def test_approx_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        Approx.parse(text)


# -- layers ------------------------------------------------------------------------------------
def _ctx(step=0, training=True, policy=None):
    return nn.Context(policy or nn.Policy.exact(), seed=1, step=step, training=training)


def _linear(approx, seed=0, bias=True):
    layer = nn.Linear(7, 4, bias=bias, rng=seed)
    layer.name = "fc"
    layer.set_approx(Approx.parse(approx) if approx else None)
    return layer


def _conv(approx, seed=0, bias=True):
    layer = nn.Conv2d(4, 3, 3, stride=2, padding=(1, 0), bias=bias, rng=seed)
    layer.name = "conv"
    layer.set_approx(Approx.parse(approx) if approx else None)
    return layer


@pytest.mark.parametrize("make,shape", [(_linear, (5, 7)), (_conv, (2, 4, 5, 5))])
def test_topk_forward_backward_is_the_gradient_of_the_sampled_forward(make, shape):
    """Top-k keeps a fixed set of pairs under small perturbations, so central differences of
    the sampled forward check its backward (the other pairs get zero gradient)."""
    rng = np.random.default_rng(0)
    layer = make("topk:2:forward")
    x = rng.standard_normal(shape)
    r = None

    def loss():
        nonlocal r
        y = layer.forward(x, _ctx())
        if r is None:
            r = np.random.default_rng(1).standard_normal(y.shape)
        return float((y * r).sum())

    loss()
    dx = layer.backward(r, _ctx())
    dw = layer.weight.grad.copy()
    kept = layer._approx_cache[0]
    assert kept.size == 2
    for arr, grad in ((x, dx), (layer.weight.value, dw)):  # 40 coordinates of each
        coords = np.random.default_rng(2).choice(arr.size, min(40, arr.size), replace=False)
        num = numeric_grad(loss, arr, coords)
        assert np.allclose([num[i] for i in coords], grad.reshape(-1)[coords], atol=1e-6)
    axis = 1
    dropped = np.setdiff1d(np.arange(x.shape[axis]), kept)
    assert not np.take(dx, dropped, axis=axis).any()
    assert not np.take(dw, dropped, axis=0 if make is _linear else 1).any()


@pytest.mark.parametrize("policy", [nn.Policy.exact(), nn.Policy.float32(),
                                    nn.Policy.fixed(16, 12)], ids=lambda p: p.name)
def test_linear_crs_backward_is_the_formula_and_counted(policy):
    """The scaled operands are held in their roles (or rounded by the spec's input stage), and
    dW_S = (X_S D)^T dY, dX_S = dY (D W_S)^T under the policy's specs, bit for bit."""
    rng = np.random.default_rng(2)
    layer = _linear("crs:3:forward")
    x = ctx_x = rng.standard_normal((5, 7)) * 0.5
    ctx = _ctx(policy=policy)
    y = layer.forward(x, ctx)
    g = ctx.round("errors", rng.standard_normal(y.shape) * 0.1, "test")
    dx = layer.backward(g, ctx)
    kept, scale, xs = layer._approx_cache
    S = kept.size
    a = ctx.counters["fc"].approx
    assert (a.macs, a.dense_macs) == (5 * 4 * S, 5 * 4 * 7)
    assert (a.backward_macs, a.backward_dense_macs) == (2 * 5 * 4 * S, 2 * 5 * 4 * 7)
    assert a.sampled == 1 and a.pairs == 7 and a.kept == S and a.calls == 3
    assert ctx.counters["fc"].products.macs == 5 * 4 * S * 3 + 5 * 4  # + the bias gradient
    # the forward's scaled operand: x's kept columns times their scales, held as activations
    assert policy.forward.input is None
    assert_same_bits(xs, ctx.round("activations", ctx_x[:, kept] * scale, "fc",
                                   "approx.forward"))
    dW = np.zeros((7, 4))
    dW[kept] = fs.matmul(xs.T, g, policy.grad_weight, seed=ctx.key("fc", "grad_weight")
                         if policy.grad_weight.stochastic else 0)
    assert_same_bits(layer.weight.grad, ctx.round("weight_grads", dW, "fc"))
    assert policy.grad_input.input is None
    wk = ctx.round("weights", layer.weight.value[kept] * scale[:, None], "fc",
                   "approx.grad_input.w")
    dX = np.zeros((5, 7))
    dX[:, kept] = fs.matmul(g, wk.T, policy.grad_input, seed=ctx.key("fc", "grad_input")
                            if policy.grad_input.stochastic else 0)
    assert_same_bits(dx, ctx.round("errors", dX, "fc"))


@pytest.mark.parametrize("make,shape", [(_linear, (5, 7)), (_conv, (2, 4, 5, 5))])
def test_evaluation_is_exact(make, shape):
    x = np.random.default_rng(3).standard_normal(shape)
    dense = make(None).forward(x, _ctx(training=False))
    assert_same_bits(make("bernoulli:0.5:forward").forward(x, _ctx(training=False)), dense)
    assert not np.array_equal(make("bernoulli:0.5:forward").forward(x, _ctx()), dense)


@pytest.mark.parametrize("make,shape", [(_linear, (6, 7)), (_conv, (3, 4, 5, 5))])
@pytest.mark.parametrize("product", ["grad_weight", "grad_input"])
def test_sampled_backward_products_are_unbiased(make, shape, product):
    """Sampling only a backward product: over the steps' draws its mean is the dense one."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape)
    dense = make(None, bias=False)  # (the bias gradient is dense either way)
    y = dense.forward(x, _ctx())
    g = rng.standard_normal(y.shape)
    dx0 = dense.backward(g, _ctx())
    want = dense.weight.grad if product == "grad_weight" else dx0
    layer = make(f"crs:2:{product}", bias=False)
    R = 200
    got = []
    for step in range(R):
        layer.forward(x, _ctx(step))
        dx = layer.backward(g, _ctx(step))
        got.append(layer.weight.grad if product == "grad_weight" else dx)
    got = np.stack(got)
    mean, se = got.mean(axis=0), got.std(axis=0, ddof=1) / np.sqrt(R)
    varies = se > 0
    assert varies.mean() > 0.5
    assert (np.abs(mean - want) <= 5 * se + 1e-12).all()
    assert_same_bits(mean[~varies], want[~varies])


def test_layer_errors():
    layer = _linear(None)
    with pytest.raises(TypeError, match="approx must be a fixedsim.approx.Approx or None"):
        layer.set_approx("crs:0.5")
    layer.set_approx(Approx.parse("crs:9:forward"))
    with pytest.raises(ValueError, match=r"fc: approx crs:9:forward on the forward product: "
                                         r"keep = 9 pairs is out of range"):
        layer.forward(np.ones((2, 7)), _ctx())
    from fixedsim.reuse import Reuse

    with pytest.raises(ValueError, match="deep reuse and column-row sampling"):
        layer.set_reuse(Reuse(3, 2))
    layer.set_approx(None)
    layer.set_reuse(Reuse(3, 2))
    with pytest.raises(ValueError, match="column-row sampling and deep reuse"):
        layer.set_approx(Approx())


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_images():
    return helpers.tiny_images()


def _config(**kw):
    return helpers.tiny_lenet_config(**{"approx": "bernoulli:0.5:forward+grad_weight", **kw})


def test_training_with_approx_counts_and_resumes_bit_for_bit(tiny_images, tmp_path):
    cfg, pol = _config(), nn.Policy.fixed(16, 12)
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny_images)
    for h in whole.history:
        assert 0 < h["approx.macs"] < h["approx.dense_macs"]
        assert 0 < h["approx.backward_macs"] < h["approx.backward_dense_macs"]
        assert 0 < h["approx.keep_ratio"] < 1
    header = next(csv.DictReader(open(tmp_path / "whole" / "history.csv")))
    assert "approx.macs" in header and "approx.dense_macs" in header
    rows = list(csv.DictReader(open(tmp_path / "whole" / "counters.csv")))
    assert any(int(r["approx.calls"] or 0) > 0 for r in rows if r["layer"] == "0.conv2d")
    part = train(cfg, pol, tmp_path / "split", progress=False, data=tiny_images,
                 stop_after_epoch=1)
    assert len(part.history) == 1
    rest = train(cfg, pol, tmp_path / "split", resume=True, progress=False, data=tiny_images)
    for k, p in whole.model.named_parameters().items():
        q = rest.model.named_parameters()[k]
        assert p.value.dtype == q.value.dtype and p.value.tobytes() == q.value.tobytes(), k
    assert rest.history[-1]["approx.macs"] == whole.history[-1]["approx.macs"]
    # another setting seed draws other pairs: the run differs
    other = train(_config(approx="bernoulli:0.5:forward+grad_weight:seed=1", epochs=1), pol,
                  None, progress=False, data=tiny_images)
    assert any(p.value.tobytes() != other.model.named_parameters()[k].value.tobytes()
               for k, p in part.model.named_parameters().items())


def test_train_config_approx_errors():
    with pytest.raises(ValueError, match=r"approx setting 'crs:2\.0'.*keep must be"):
        _config(approx="crs:2.0")
    with pytest.raises(ValueError, match="approx_layers must be 'conv', 'linear' or 'all'"):
        _config(approx_layers="dense")
    with pytest.raises(ValueError, match="would both apply to the same layers"):
        _config(reuse="L=25,H=6")
    cfg = _config(reuse="L=25,H=6", reuse_layers="conv", approx_layers="linear")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_train_approx(tmp_path, capsys):
    from fixedsim.cli import main

    rc = main(["train", "--model", "mlp", "--model-options", '{"hidden": [8]}', "--data",
               "synthetic", "--train-size", "32", "--test-size", "16", "--epochs", "1",
               "--batch-size", "16", "--approx", "topk:0.5", "--approx-layers", "linear",
               "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["approx"] == "topk:0.5" and run["config"]["approx_layers"] == "linear"
    rc = main(["train", "--approx", "crs:0", "--out", str(tmp_path / "bad")])
    assert rc != 0
    assert "approx setting 'crs:0'" in capsys.readouterr().err


def test_study_file_key_and_grid_axis():
    from fixedsim.study.spec import parse_study

    study = parse_study({"train": {"model": "mlp", "epochs": 1, "approx_layers": "linear"},
                         "grid": {"train": {"approx": ["", "crs:0.5:forward",
                                                       "topk:0.3:forward+grad_weight"]}}})
    assert [r.config().approx for r in study.runs] == ["", "crs:0.5:forward",
                                                       "topk:0.3:forward+grad_weight"]
    assert len({r.run_id for r in study.runs}) == 3  # the setting is part of a run's identity
    with pytest.raises(ValueError, match=r"train: approx setting 'crs:0': Approx keep must "
                                         r"be an int count >= 1"):
        parse_study({"train": {"model": "mlp", "approx": "crs:0"}})


def test_scaled_operand_under_an_input_format_and_a_block_format():
    """A spec with an input format rounds the scaled operand (bf16: the layer does, as it does
    the unscaled operands); a block format is applied by the product to the kept, scaled
    operand, blocks along the kept K."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 40))
    for policy in (nn.Policy.bf16(), nn.Policy.mx()):
        layer = nn.Linear(40, 3, rng=0)
        layer.name = "fc"
        layer.set_approx(Approx.parse("bernoulli:0.5:forward"))
        ctx = _ctx(policy=policy)
        z = layer.forward(x, ctx)
        kept, scale, xs = layer._approx_cache
        spec = policy.forward
        if policy.name.startswith("bf16"):
            xq = ctx.round_operand(spec, x, "fc", "forward.x")
            assert_same_bits(xs, ctx.round_operand(spec, xq[:, kept] * scale, "fc",
                                                   "approx.forward"))
            wq = ctx.round_operand(spec, layer.weight.value, "fc", "forward.w")
            prod = fs.matmul(xs, wq[kept], dataclasses.replace(
                spec, input=None, input_rounding=fs.Rounding.NEAREST_EVEN, random_bits=None))
        else:
            assert_same_bits(xs, x[:, kept] * scale)
            prod = fs.matmul(xs, layer.weight.value[kept], spec)
        want = ctx.add_into("activations", prod, layer.bias.value, "fc", "activations")
        assert_same_bits(z, want)
