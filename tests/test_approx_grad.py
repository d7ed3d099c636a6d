"""Gradient approximation (fixedsim.approx.grad): top-k and random sampling of the error, a
stale weight gradient; the layers' backward passes, their counts, training and resume.

The unbiasedness test states its bound: the mean of R seeded draws lies within 5 empirical
standard errors (``std(ddof=1) / sqrt(R)``) of the exact error, entry by entry (for a normal
mean a 5-sigma excursion has probability 6e-7 per entry; the draws are seeded, so the test is
deterministic).
"""

from __future__ import annotations

import helpers
import numpy as np
import pytest
from helpers import assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fixedsim import nn
from fixedsim.approx import Approx, GradApprox, parse_grad_approx, sample_error, topk_error
from fixedsim.nn.train import TrainConfig, train


# -- the primitives ------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 9)),
                  elements=st.sampled_from([0.0, 1.0, -1.0, 0.5, -2.0, 3.0, 0.25])),
       st.integers(1, 9))
def test_topk_keeps_exactly_k_per_example_and_zeros_the_rest(g, k):
    k = min(k, g.shape[1])
    out, kk = topk_error(g, k)
    assert kk == k and out.shape == g.shape
    for row, orow in zip(g, out, strict=True):
        # the kept entries: the k of largest magnitude, ties to the lower index
        order = sorted(range(row.size), key=lambda i: (-abs(row[i]), i))[:k]
        want = np.zeros_like(row)
        want[order] = row[order]
        assert_same_bits(orow, want)


def test_topk_per_example_over_all_entries_of_a_conv_error():
    g = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) - 11.5
    out, k = topk_error(g, 0.25)  # 12 entries per example: 3 kept
    assert k == 3
    assert (np.count_nonzero(out.reshape(2, -1), axis=1) == 3).all()
    assert_same_bits(out[0].ravel()[:3], g[0].ravel()[:3])  # -11.5, -10.5, -9.5
    assert_same_bits(out[1].ravel()[-3:], g[1].ravel()[-3:])  # 9.5, 10.5, 11.5


def test_random_sampler_is_unbiased():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 5))
    g[0, 0] = 0.0
    R, p = 4000, 0.3
    draws = np.stack([sample_error(g, p, r)[0] for r in range(R)])
    mean, se = draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(R)
    nz = g != 0
    assert (se[nz] > 0).all()  # the draws vary: the bound is not vacuous
    assert (np.abs(mean - g) <= 5 * se + 1e-15).all(), (mean, g, se)
    assert not draws[:, 0, 0].any()
    kept = np.stack([sample_error(g, p, r)[1] for r in range(200)])
    assert abs(kept.mean() - p) < 5 * np.sqrt(p * (1 - p) / kept.size)
    out, mask = sample_error(g, 1.0, 7)  # p = 1: the error itself
    assert mask.all()
    assert_same_bits(out, g)


def test_random_sampler_scales_by_one_over_p():
    g = np.array([[1.0, -2.0, 3.0, 4.0]])
    out, mask = sample_error(g, 0.25, 3)
    assert_same_bits(out, np.where(mask, g * 4.0, 0.0))


# -- the setting ---------------------------------------------------------------------------------
def test_grad_approx_parse_round_trip():
    for text in ("topk:0.3", "topk:8", "random:0.5", "random:0.5:seed=3", "stale:4"):
        ga = GradApprox.parse(text)
        assert str(ga) == text and GradApprox.parse(str(ga)) == ga
        assert GradApprox(**ga.to_dict()) == ga
    assert parse_grad_approx("") is None and parse_grad_approx(None) is None
    assert GradApprox.parse("stale:1") == GradApprox("stale", 1)


@pytest.mark.parametrize("text,match", [
    ("topk", r"expected METHOD:KEEP"),
    ("sparse:0.3", r"method must be one of topk, random, stale, got 'sparse'"),
    ("topk:x", r"KEEP must be an int or a float, got 'x'"),
    ("topk:1.5", r"topk keep must be an int count >= 1 or a float fraction in \(0, 1\], "
                 r"got 1.5"),
    ("topk:0", r"topk keep must be .* got 0"),
    ("random:2", r"random keep must be a float probability in \(0, 1\], got 2"),
    ("random:0.0", r"random keep must be a float probability in \(0, 1\], got 0.0"),
    ("stale:0.5", r"stale keep must be an int period >= 1"),
    ("stale:0", r"stale keep must be an int period >= 1 .* got 0"),
    ("random:0.5:seed=x", r"seed must be an int, got 'x'"),
    ("random:0.5:step=1", r"expected METHOD:KEEP"),
])
def test_grad_approx_parse_errors(text, match):
    with pytest.raises(ValueError, match=match):
        GradApprox.parse(text)


def test_primitive_errors():
    with pytest.raises(ValueError, match=r"keep = 5 pairs is out of range.*K = 4"):
        topk_error(np.ones((2, 4)), 5)
    with pytest.raises(ValueError, match="batch axis"):
        topk_error(np.ones(4), 1)
    with pytest.raises(ValueError, match=r"p must be a float in \(0, 1\], got 0"):
        sample_error(np.ones((2, 2)), 0, 1)


# -- layers --------------------------------------------------------------------------------------
def _ctx(step=0, policy=None):
    return nn.Context(policy or nn.Policy.exact(), seed=1, step=step, training=True)


def _linear(ga=None, bias=True):
    layer = nn.Linear(7, 4, bias=bias, rng=0)
    layer.name = "fc"
    layer.set_grad_approx(GradApprox.parse(ga) if ga else None)
    return layer


def _conv(ga=None, bias=True):
    layer = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=bias, rng=0)
    layer.name = "conv"
    layer.set_grad_approx(GradApprox.parse(ga) if ga else None)
    return layer


@pytest.mark.parametrize("setting", ["topk:2", "random:0.5"])
@pytest.mark.parametrize("make,shape,K", [(_linear, (5, 7), 7), (_conv, (2, 3, 5, 5), 27)])
@pytest.mark.parametrize("policy", [nn.Policy.exact(), nn.Policy.fixed(16, 12)],
                         ids=lambda p: p.name)
def test_layer_backward_is_the_dense_backward_of_the_sparse_error_and_counted(
        setting, make, shape, K, policy):
    """The gradients are the dense layer's gradients of the approximated error, bit for bit;
    the MACs counted are nnz(dY') * K per product against size(dY) * K."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 0.5
    layer, dense = make(setting), make(None)
    ctx, dctx = _ctx(3, policy), _ctx(3, policy)
    y = layer.forward(x, ctx)
    dense.forward(x, dctx)
    g = ctx.round("errors", rng.standard_normal(y.shape) * 0.1, "test")
    ga = GradApprox.parse(setting)
    if ga.method == "topk":
        gs = topk_error(g, ga.keep)[0]
    else:
        from fixedsim.quantize import child_seed

        gs = sample_error(g, ga.keep, child_seed(0, ctx.key(layer.name, "grad_approx")))[0]
        gs = ctx.round("errors", gs, layer.name, "grad_approx")
    dx = layer.backward(g, ctx)
    dx0 = dense.backward(gs, dctx)
    assert_same_bits(dx, dx0)
    assert_same_bits(layer.weight.grad, dense.weight.grad)
    assert_same_bits(layer.bias.grad, dense.bias.grad)
    nnz = np.count_nonzero(gs)
    if ga.method == "topk":
        assert nnz == shape[0] * 2
    assert 0 < nnz < g.size
    a = ctx.counters[layer.name].approx
    assert (a.backward_macs, a.backward_dense_macs) == (2 * nnz * K, 2 * g.size * K)
    assert a.backward_dense_macs - a.backward_macs == 2 * (g.size - nnz) * K  # skipped work
    assert (a.pairs, a.kept, a.macs, a.dense_macs) == (g.size, nnz, 0, 0)
    # the first layer of a model needs no input gradient: one product counted
    layer.forward(x, _ctx(4, policy))
    c4 = _ctx(4, policy)
    layer.backward(g, c4, need_input_grad=False)
    assert c4.counters[layer.name].approx.backward_dense_macs == g.size * K


@pytest.mark.parametrize("make,shape", [(_linear, (5, 7)), (_conv, (2, 3, 5, 5))])
def test_stale_weight_gradient_is_computed_every_nth_step(make, shape):
    layer, dense = make("stale:3"), make(None)
    rng = np.random.default_rng(2)
    last = None
    for step in range(8):
        x = rng.standard_normal(shape)
        ctx, dctx = _ctx(step), _ctx(step)
        y = layer.forward(x, ctx)
        dense.forward(x, dctx)
        g = rng.standard_normal(y.shape)
        dx = layer.backward(g, ctx)
        assert_same_bits(dx, dense.backward(g, dctx))  # the input gradient: every step
        assert_same_bits(layer.bias.grad, dense.bias.grad)
        pc, dc = ctx.counters[layer.name], dctx.counters[layer.name]
        a = pc.approx
        if step % 3 == 0:  # computed: the dense gradient, stored
            assert_same_bits(layer.weight.grad, dense.weight.grad)
            last = dense.weight.grad.copy()
            assert pc.products.macs == dc.products.macs
            assert a.backward_macs == a.backward_dense_macs and a.kept == 1
        else:  # reused: the last one computed; its product did not run
            assert_same_bits(layer.weight.grad, last)
            assert not np.array_equal(layer.weight.grad, dense.weight.grad)
            skipped = a.backward_dense_macs - a.backward_macs
            assert skipped == dc.products.macs - pc.products.macs == y.size * (
                layer.weight.value.size // layer.weight.value.shape[
                    0 if make is _conv else 1])
            assert a.kept == 0
        assert a.pairs == 1
        layer.weight.grad[...] = 0.0  # the stored gradient is a copy
    layer.set_grad_approx(GradApprox("stale", 3))
    assert layer.stale_grad is None


def test_layer_errors():
    layer = _linear()
    with pytest.raises(TypeError, match="grad_approx must be a fixedsim.approx.GradApprox"):
        layer.set_grad_approx("topk:0.3")
    layer.set_grad_approx(GradApprox("topk", 9))
    layer.forward(np.ones((2, 7)), _ctx())
    with pytest.raises(ValueError, match=r"fc: grad approx topk:9: grad approx keep = 9 "
                                         r"pairs is out of range"):
        layer.backward(np.ones((2, 4)), _ctx())
    with pytest.raises(ValueError, match="column-row sampling and gradient approximation"):
        layer.set_approx(Approx())
    from fixedsim.reuse import Reuse

    with pytest.raises(ValueError, match="deep reuse and gradient approximation"):
        layer.set_reuse(Reuse(3, 2))
    layer.set_grad_approx(None)
    layer.set_approx(Approx())
    with pytest.raises(ValueError, match="gradient approximation and column-row sampling"):
        layer.set_grad_approx(GradApprox())


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_images():
    return helpers.tiny_images()


def _config(**kw):
    return helpers.tiny_lenet_config(**{"grad_approx": "stale:3", **kw})


@pytest.mark.parametrize("setting", ["stale:3", "random:0.5"])
def test_training_with_grad_approx_counts_and_resumes_bit_for_bit(tiny_images, tmp_path,
                                                                    setting):
    """4 steps an epoch: with stale:3 the resumed epoch starts at step 4, which reuses the
    weight gradient of step 3 from the checkpoint."""
    cfg, pol = _config(grad_approx=setting), nn.Policy.fixed(16, 12)
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny_images)
    for h in whole.history:
        assert 0 < h["approx.backward_macs"] < h["approx.backward_dense_macs"]
        assert h["approx.macs"] == h["approx.dense_macs"] == 0
    part = train(cfg, pol, tmp_path / "split", progress=False, data=tiny_images,
                 stop_after_epoch=1)
    rest = train(cfg, pol, tmp_path / "split", resume=True, progress=False, data=tiny_images)
    for k, p in whole.model.named_parameters().items():
        q = rest.model.named_parameters()[k]
        assert p.value.dtype == q.value.dtype and p.value.tobytes() == q.value.tobytes(), k
    assert rest.history[-1]["approx.backward_macs"] == whole.history[-1]["approx.backward_macs"]
    if setting != "stale:3":
        return
    dense = train(_config(grad_approx="", epochs=1), pol, None, progress=False,
                  data=tiny_images)
    hidden = train(_config(grad_approx=setting, grad_approx_layers="hidden", epochs=1), pol,
                   None, progress=False, data=tiny_images)
    assert hidden.model.layers[-1].grad_approx is None  # the classifier keeps its gradient
    assert all(m.grad_approx is not None for m in hidden.model.layers[:-1]
               if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert any(p.value.tobytes() != dense.model.named_parameters()[k].value.tobytes()
               for k, p in part.model.named_parameters().items())


def test_train_config_grad_approx_errors():
    with pytest.raises(ValueError, match=r"grad approx setting 'topk:2\.0'.*topk keep must"):
        _config(grad_approx="topk:2.0")
    with pytest.raises(ValueError, match="grad_approx_layers must be 'conv', 'linear', 'all' "
                                         "or 'hidden'"):
        _config(grad_approx_layers="dense")
    with pytest.raises(ValueError, match=r"approx \(on linear layers\) and grad_approx \(on "
                                         r"hidden layers\)"):
        _config(approx="crs:0.5", approx_layers="linear", grad_approx_layers="hidden")
    with pytest.raises(ValueError, match=r"approx \(on all layers\) and grad_approx"):
        _config(approx="crs:0.5")
    with pytest.raises(ValueError, match=r"reuse \(on conv layers\) and grad_approx"):
        _config(reuse="L=25,H=6")
    cfg = _config(reuse="L=25,H=6", reuse_layers="conv", grad_approx_layers="linear")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_and_study_key(tmp_path, capsys):
    import json

    from fixedsim.cli import main
    from fixedsim.study.spec import parse_study

    rc = main(["train", "--model", "mlp", "--model-options", '{"hidden": [8]}', "--data",
               "synthetic", "--train-size", "32", "--test-size", "16", "--epochs", "1",
               "--batch-size", "16", "--grad-approx", "topk:0.5", "--grad-approx-layers",
               "linear", "--no-estimate", "--quiet", "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["grad_approx"] == "topk:0.5"
    assert run["config"]["grad_approx_layers"] == "linear"
    rc = main(["train", "--grad-approx", "stale:0", "--out", str(tmp_path / "bad")])
    assert rc != 0
    assert "grad approx setting 'stale:0'" in capsys.readouterr().err
    study = parse_study({"train": {"model": "mlp", "epochs": 1},
                         "grid": {"train": {"grad_approx": ["", "topk:0.3", "stale:2"]}}})
    assert [r.config().grad_approx for r in study.runs] == ["", "topk:0.3", "stale:2"]
    assert len({r.run_id for r in study.runs}) == 3
