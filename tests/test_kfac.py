"""K-FAC (fixedsim.nn.KFAC): the factors against their definition (exact oracle), the
preconditioned gradient against the explicit Kronecker formula in float64, the roles' grids
under low-precision policies, the SGD fallback, the adaptive refresh, bit-identical resume,
and the errors on bad settings."""

from fractions import Fraction

import numpy as np
import pytest
from helpers import same_weights, whole_and_resumed

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.nn import (
    KFAC,
    BatchNorm2d,
    Context,
    Conv2d,
    Flatten,
    Linear,
    Policy,
    ReLU,
    Role,
    Sequential,
    SoftmaxCrossEntropy,
)
from fixedsim.nn.kfac import check_kfac_settings
from fixedsim.nn.train import TrainConfig, train


def _batch(model, x, y, policy, step=0, seed=0):
    """Forward and backward of one batch; the context (for the optimizer step)."""
    ctx = Context(policy, seed=seed, step=step)
    lossf = SoftmaxCrossEntropy()
    lossf(model.forward(x, ctx), y, ctx)
    model.backward(lossf.backward(ctx), ctx)
    return ctx


def _linear_model():
    rng = np.random.default_rng(1)
    return Sequential(Linear(5, 4, rng=rng), ReLU(), Linear(4, 3, bias=False, rng=rng))


def _conv_model():
    rng = np.random.default_rng(2)
    return Sequential(Conv2d(2, 3, 3, stride=1, padding=1, rng=rng), ReLU(),
                      Conv2d(3, 2, 2, stride=2, bias=False, rng=rng), Flatten(),
                      Linear(2 * 2 * 2, 3, rng=rng))


def _data(shape, n=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)), rng.integers(0, classes, n)


def _patches(x, kh, kw, stride, pad):
    """im2col written out: rows (n, ho, wo), columns (c, i, j); independent of the kernel."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, H + 2 * pad, W + 2 * pad))
    xp[:, :, pad:pad + H, pad:pad + W] = x
    Ho, Wo = (H + 2 * pad - kh) // stride + 1, (W + 2 * pad - kw) // stride + 1
    rows = []
    for n in range(N):
        for ho in range(Ho):
            for wo in range(Wo):
                rows.append([xp[n, c, ho * stride + i, wo * stride + j]
                             for c in range(C) for i in range(kh) for j in range(kw)])
    return np.array(rows)


def _rows(layer, scale=1.0):
    """(a with the bias column, per-example errors e = N grad_y / scale, N) by definition."""
    x = np.asarray(layer._cache[0], np.float64)
    gy = np.asarray(layer.kfac_error, np.float64)
    N = x.shape[0]
    if isinstance(layer, Conv2d):
        a = _patches(x, *layer.kernel_size, layer.stride, layer.padding)
        e = gy.transpose(0, 2, 3, 1).reshape(-1, gy.shape[1])
    else:
        a, e = x, gy
    if layer.bias is not None:
        a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    return a, e, N


def _gram_oracle(m):
    """m^T m, each entry the exact sum of products rounded once to float64 (Fractions)."""
    k = m.shape[1]
    out = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            out[i, j] = float(sum((Fraction(u) * Fraction(v) for u, v in
                                   zip(m[:, i], m[:, j], strict=True)), Fraction(0)))
    return out


@pytest.mark.parametrize("make, shape", [(_linear_model, (5,)), (_conv_model, (2, 4, 4))],
                         ids=["linear", "conv"])
def test_factors_equal_their_definition_bit_for_bit(make, shape):
    """Exact policy: A = (a^T a rounded once) / rows, G = (E^T E rounded once) * N, the
    first batch setting the averages; a second batch is folded in with stat_decay."""
    model = make()
    d = 0.75
    opt = KFAC(model, lr=0.0, damping=0.1, stat_decay=d)
    pol = Policy.exact()
    x, y = _data(shape)
    ctx = _batch(model, x, y, pol)
    expect = {}
    for name, layer in opt.layers.items():
        a, e, N = _rows(layer)
        expect[name] = (_gram_oracle(a) / a.shape[0], _gram_oracle(e) * N)
    opt.step(ctx)
    for name, (A, G) in expect.items():
        np.testing.assert_array_equal(opt.A[name], A)
        np.testing.assert_array_equal(opt.G[name], G)
    x2, y2 = _data(shape, seed=1)
    ctx = _batch(model, x2, y2, pol, step=1)
    for name, layer in opt.layers.items():
        a, e, N = _rows(layer)
        A, G = expect[name]
        expect[name] = (d * A + (1 - d) * (_gram_oracle(a) / a.shape[0]),
                        d * G + (1 - d) * (_gram_oracle(e) * N))
    opt.step(ctx)
    for name, (A, G) in expect.items():
        np.testing.assert_array_equal(opt.A[name], A)
        np.testing.assert_array_equal(opt.G[name], G)


@pytest.mark.parametrize("quarters", [False, True], ids=["normal", "quarters"])
@pytest.mark.parametrize("policy", [Policy.float32(), Policy.parse("bf16"),
                                    Policy.fixed(16, 8, "stochastic")],
                         ids=["float32", "bf16", "fixed-stochastic"])
def test_batch_factors_are_products_of_the_rows_on_copies(policy, quarters):
    """The factor products ``a^T a`` and ``e^T e`` (Gram products from ``a`` alone, ``a``'s
    values bounded by the scan of the layer's input and 1) give the bits of fs.matmul on a
    transposed copy of the rows, under an exact sum rounded once (float32), an FP32 FMA
    chain (bf16) and stochastic rounding (its draws keyed as K-FAC keys them); on normal
    data and on multiples of 1/4 (fixed-point-like: the scaled-integer row, which reads the
    scan's last bit)."""
    model = _conv_model()
    opt = KFAC(model, lr=0.0, damping=0.1)
    x, y = _data((2, 4, 4), n=5)
    x = np.maximum(x, 0) * 8
    ctx = _batch(model, np.round(x * 4) / 4 if quarters else x, y, policy)
    got = opt.batch_factors(ctx)
    spec = policy.curvature_spec()
    for lname, layer in opt.layers.items():
        a, e, N = opt._rows(layer)
        assert np.array_equal(a, _rows(layer)[0])
        for f, m in (("A", a), ("G", e)):
            seed = ctx.key(f"optim.{lname}", f"kfac.{f}") if spec.stochastic else 0
            want = np.asarray(fs.matmul(np.ascontiguousarray(m.T), m, spec, seed=seed),
                              np.float64)
            want = want / len(a) if f == "A" else want * float(N)
            assert got[f"{f}.{lname}"].tobytes() == want.tobytes(), (lname, f)


def _kronecker(A, G, grad_out_in, lam):
    """(G + sqrt(lam)/pi I)^-1 grad (A + pi sqrt(lam) I)^-1 in float64 with numpy."""
    pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
    r = np.sqrt(lam)
    return (np.linalg.inv(G + r / pi * np.eye(len(G))) @ grad_out_in
            @ np.linalg.inv(A + pi * r * np.eye(len(A))))


@pytest.mark.parametrize("make, shape", [(_linear_model, (5,)), (_conv_model, (2, 4, 4))],
                         ids=["linear", "conv"])
@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_preconditioned_gradient_is_the_kronecker_formula(make, shape, scale):
    """Exact policy: the preconditioned gradient of every layer (bias column included)
    equals the explicit formula, in float64 to 1e-10 relative (the inversions differ only
    in float64 rounding); a loss scale is divided out of both the gradient and G."""
    model = make()
    lam = 0.05
    opt = KFAC(model, lr=0.0, damping=lam, stat_decay=0.5)
    pol = Policy.exact()
    x, y = _data(shape, n=8)
    ctx = Context(pol)
    lossf = SoftmaxCrossEntropy()
    lossf(model.forward(x, ctx), y, ctx)
    model.backward(lossf.backward(ctx, scale), ctx)
    opt.step(ctx, grad_scale=scale)
    pre = opt.preconditioned(ctx, grad_scale=scale)
    names = {id(p): n for n, p in model.named_parameters().items()}
    for layer in opt.layers.values():
        a, e, N = _rows(layer)
        e = e * N / scale
        A, G = a.T @ a / len(a), e.T @ e / N
        w = layer.weight.grad / scale
        g = w.reshape(w.shape[0], -1) if isinstance(layer, Conv2d) else w.T  # (out, in)
        if layer.bias is not None:
            g = np.concatenate([g, (layer.bias.grad / scale).reshape(-1, 1)], axis=1)
        P = _kronecker(A, G, g, lam)
        pw = pre[names[id(layer.weight)]]
        got = pw.reshape(pw.shape[0], -1) if isinstance(layer, Conv2d) else pw.T
        if layer.bias is not None:
            got = np.concatenate([got, pre[names[id(layer.bias)]].reshape(-1, 1)], axis=1)
        np.testing.assert_allclose(got, P, rtol=1e-10, atol=1e-12 * np.abs(P).max())


def test_step_is_sgd_with_the_preconditioned_gradient():
    """Momentum and weight decay as SGD has them, with the preconditioned gradient; a
    parameter outside Linear/Conv2d (BatchNorm) takes SGD's step with its own gradient."""
    rng = np.random.default_rng(4)
    model = Sequential(Conv2d(1, 2, 3, rng=rng), BatchNorm2d(2), ReLU(), Flatten(),
                       Linear(2 * 2 * 2, 3, rng=rng))
    opt = KFAC(model, lr=0.1, momentum=0.9, weight_decay=0.01, damping=0.1,
               unitwise_bn=False)
    pol = Policy.exact()
    params = model.named_parameters()
    for step in range(2):
        x, y = _data((1, 4, 4), seed=step)
        ctx = _batch(model, x, y, pol, step=step)
        before = {k: p.value.copy() for k, p in params.items()}
        grads = {k: p.grad.copy() for k, p in params.items()}
        vel = {k: opt.buffers.get(k, np.zeros_like(v)).copy() for k, v in before.items()}
        opt.step(ctx)
        pre = opt.preconditioned(ctx)
        for k, p in params.items():
            g = (pre[k] if k in pre else grads[k]) + 0.01 * before[k]
            v = 0.9 * vel[k] + g
            np.testing.assert_array_equal(opt.buffers[k], v, err_msg=k)
            np.testing.assert_array_equal(p.value, before[k] - 0.1 * v, err_msg=k)
    assert set(pre) == {k for k in params if "batchnorm" not in k}


def _low_policy(**roles):
    return Policy.from_dict({**Policy.bf16().to_dict(), **roles})


@pytest.mark.parametrize("policy, expect", [
    (Policy.bf16(), ("BF16", "BF16", "BF16")),  # unset roles: weight_grads' format
    (_low_policy(curvature={"format": "FP16"}, inverse={"format": "Q<16,8>"},
                 preconditioned={"format": "FP8_E4M3"},
                 curvature_product={"accumulator": {"format": "BF16"}}),
     ("FP16", "Q<16,8>", "FP8_E4M3")),
    (_low_policy(curvature={"format": "Q<16,10>", "rounding": "stochastic"},
                 inverse={"format": "BF16", "rounding": "stochastic"},
                 preconditioned={"format": "Q<12,8>", "rounding": "stochastic"}),
     ("Q<16,10>", "BF16", "Q<12,8>")),
], ids=["bf16-default", "mixed", "stochastic"])
def test_state_lies_on_the_role_grids(policy, expect):
    """Each stored factor, inverse and preconditioned gradient is a value of its role's
    format: rounding it again changes nothing."""
    model = _conv_model()
    opt = KFAC(model, lr=0.01, damping=0.1, inv_interval=2)
    fmts = [fs.formats.parse_format(f) for f in expect]
    assert [repr(policy.curvature_role(r).fmt) for r in
            ("curvature", "inverse", "preconditioned")] == [repr(f) for f in fmts]
    for step in range(3):
        x, y = _data((2, 4, 4), n=5, seed=step)
        ctx = _batch(model, x, y, policy, step=step, seed=7)
        opt.step(ctx)
        pre = opt.preconditioned(ctx)
        for arrays, fmt in ((list(opt.A.values()) + list(opt.G.values()), fmts[0]),
                            (list(opt.Ainv.values()) + list(opt.Ginv.values()), fmts[1]),
                            (list(pre.values()), fmts[2])):
            for arr in arrays:
                a = np.asarray(arr, np.float64)
                np.testing.assert_array_equal(fs.quantize(a, fmt).astype(np.float64), a)
        counted = ctx.counters["optim"].as_dict()
        assert counted["curvature.roundings"] > 0 and counted["preconditioned.roundings"] > 0


def test_inverses_refresh_on_their_interval_and_adaptively():
    """Fixed refresh: the inverses change on steps 1, 1 + T, ...; adaptive: factors that do
    not change (the same batch, lr 0) double the interval at each refresh."""
    model = _linear_model()
    x, y = _data((5,))
    pol = Policy.exact()
    opt = KFAC(model, lr=0.0, damping=0.1, inv_interval=3, stat_decay=0.5)
    seen = []
    for step in range(7):
        xb, yb = _data((5,), seed=step)
        opt.step(_batch(model, xb, yb, pol, step=step))
        seen.append(opt.Ainv["0.linear"].copy())
    changed = [s for s in range(1, 7) if not np.array_equal(seen[s], seen[s - 1])]
    assert changed == [3, 6]  # steps 4 and 7 (counted from 1)
    m = _linear_model()
    ad = KFAC(m, lr=0.0, damping=0.1, inv_interval=1, refresh="adaptive",
              refresh_threshold=0.1)
    refreshes = []
    for step in range(1, 16):
        due = ad.next_refresh
        ad.step(_batch(m, x, y, pol, step=step))
        if step >= due:
            refreshes.append(step)
    assert refreshes == [1, 2, 4, 8]
    assert ad.interval == 8 and ad.next_refresh == 16


def _tiny():
    return fdata.synthetic(n_train=64, n_test=16, shape=(1, 12, 12), classes=4, seed=3)


@pytest.mark.parametrize("policy, extra", [
    (Policy.fixed(16, 12, "stochastic"), {}),
    (Policy.float32(), {"refresh": "adaptive", "inv_interval": 1, "stat_interval": 2,
                        "damping_schedule": "poly:2:2:0.001", "schedule": "poly:2:1:0:0.5"}),
], ids=["fixed-stochastic", "float32-adaptive"])
def test_resume_continues_bit_for_bit(tmp_path, policy, extra):
    """The checkpoint holds the factors, the inverses and the refresh state: a run stopped
    after epoch 1 and resumed ends with the bits of a run that never stopped."""
    tiny = _tiny()
    kw = dict(model="lenet", model_options={"channels": [2, 3], "hidden": 6, "kernel": 3},
              epochs=2, batch_size=32, lr=0.05, seed=5, optimizer="kfac", damping=0.01,
              inv_interval=2)
    cfg = TrainConfig(**{**kw, **extra})
    whole = train(cfg, policy, tmp_path / "whole", progress=False, data=tiny)
    part = train(cfg, policy, tmp_path / "split", progress=False, data=tiny, stop_after_epoch=1)
    assert len(part.history) == 1
    rest = train(cfg, policy, tmp_path / "split", resume=True, progress=False, data=tiny)
    for a, b in zip(whole.history, rest.history, strict=True):
        assert ({k: v for k, v in a.items() if not k.endswith("seconds")}
                == {k: v for k, v in b.items() if not k.endswith("seconds")})
    p1, p2 = whole.model.named_parameters(), rest.model.named_parameters()
    for k in p1:
        assert p1[k].value.dtype == p2[k].value.dtype
        assert p1[k].value.tobytes() == p2[k].value.tobytes(), k
    with np.load(tmp_path / "split" / "checkpoint.npz") as z:
        assert {"optim/kfac.A.0.conv2d", "optim/kfac.Ginv.7.linear"} <= set(z.files)


def test_damping_over_the_run_keeps_its_epochs(tmp_path):
    """A damping schedule that anneals over the run's epochs (``cosine``) refuses a resume
    that changes them, as the learning-rate schedule does."""
    from fixedsim.nn.train import RunFolderError

    kw = dict(model="mlp", model_options={"hidden": [8]}, batch_size=32, lr=0.05, seed=5,
              optimizer="kfac", damping=0.01, inv_interval=2, damping_schedule="cosine:run:0.001")
    train(TrainConfig(epochs=2, **kw), Policy.float32(), tmp_path / "r", progress=False,
          data=_tiny(), stop_after_epoch=1)
    with pytest.raises(RunFolderError, match="damping_schedule 'cosine:run:0.001'"):
        train(TrainConfig(epochs=3, **kw), Policy.float32(), tmp_path / "r", resume=True,
              progress=False, data=_tiny())


def test_state_dict_round_trip_and_refusals():
    model = _linear_model()
    opt = KFAC(model, lr=0.1, momentum=0.9, damping=0.1)
    x, y = _data((5,))
    opt.step(_batch(model, x, y, Policy.float32()))
    st = opt.state_dict()
    other = KFAC(_linear_model(), lr=0.5, momentum=0.9, damping=0.1)
    other.load_state_dict(st)
    st2 = other.state_dict()
    assert st.keys() == st2.keys()
    for k in st:
        assert np.asarray(st[k]).tobytes() == np.asarray(st2[k]).tobytes(), k
    with pytest.raises(ValueError, match="unknown key 'kfac.A.9.linear'"):
        other.load_state_dict({**st, "kfac.A.9.linear": np.eye(2)})
    with pytest.raises(ValueError, match="lacks kfac.interval"):
        other.load_state_dict({k: v for k, v in st.items() if k != "kfac.interval"})


@pytest.mark.parametrize("kw, match", [
    ({"damping": 0.0}, "damping must be > 0.0, got 0.0"),
    ({"damping": -1.0}, "damping must be > 0.0"),
    ({"inv_interval": 0}, r"inv_interval \(the refresh interval\) must be an int >= 1, got 0"),
    ({"stat_interval": 0}, "stat_interval must be an int >= 1"),
    ({"stat_decay": 1.0}, r"stat_decay must be < 1.0, got 1.0"),
    ({"stat_decay": -0.1}, "stat_decay must be >= 0.0"),
    ({"refresh": "sometimes"}, "refresh must be one of fixed, adaptive"),
    ({"refresh_threshold": 0.0}, "refresh_threshold must be > 0.0"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        check_kfac_settings(**kw)
    with pytest.raises(ValueError, match=match):
        KFAC(_linear_model(), lr=0.1, **kw)
    with pytest.raises(ValueError, match="TrainConfig " + match):
        TrainConfig(optimizer="kfac", **kw)


def test_kfac_needs_dense_products_and_a_backward():
    with pytest.raises(ValueError, match="optimizer 'kfac' needs the layers' dense products; "
                                         "reuse"):
        TrainConfig(optimizer="kfac", reuse="L=25,H=8")
    model = _linear_model()
    opt = KFAC(model, lr=0.1)
    for p in model.parameters():
        p.grad = np.zeros_like(p.value)
    with pytest.raises(ValueError, match="has no forward input or output error"):
        opt.step(Context(Policy.exact()))


def test_policy_without_curvature_roles_keeps_its_plain_data():
    """Unset roles are left out of to_dict (the run ids of earlier studies hash it); set
    ones round-trip through dict and TOML."""
    for p in (Policy.float32(), Policy.bf16(), Policy.fixed(16, 12), Policy.exact()):
        d = p.to_dict()
        assert not {"curvature", "inverse", "preconditioned", "curvature_product"} & set(d)
        assert p.curvature_role("inverse") == p.weight_grads
        assert p.curvature_spec() == p.grad_weight
    q = _low_policy(curvature={"format": "FP16"}, curvature_product={"output": "FP32"})
    assert Policy.from_dict(q.to_dict()) == q
    assert q.curvature_role("curvature") == Role("FP16")
    assert "curvature_product" in q.describe()
    with pytest.raises(ValueError, match="unknown curvature role 'hessian'"):
        q.curvature_role("hessian")


@pytest.mark.parametrize("policy", [Policy.float32(), Policy.fixed(16, 10, "stochastic")],
                         ids=lambda p: p.name)
def test_one_pass_update_matches_the_separate_passes(monkeypatch, policy):
    """K-FAC feeds the preconditioned gradient to SGD's one-pass kernel where float32 holds
    it: the same bits as SGD's separate roundings."""
    from fixedsim.nn import optim

    out = []
    for fused in (True, False):
        monkeypatch.setattr(optim, "_FUSED", fused)
        model = _conv_model()
        opt = KFAC(model, lr=0.05, momentum=0.9, weight_decay=0.01, damping=0.1)
        for step in range(2):
            x, y = _data((2, 4, 4), seed=step)
            opt.step(_batch(model, x, y, policy, step=step, seed=3))
        out.append({k: p.value.copy() for k, p in model.named_parameters().items()})
    for k in out[0]:
        assert out[0][k].dtype == out[1][k].dtype == np.float32
        assert out[0][k].tobytes() == out[1][k].tobytes(), k


def test_label_smoothing_loss_and_error():
    """The smoothed loss is -sum(target * log softmax) with target (1 - eps) onehot + eps/K;
    its error is the loss's gradient (central differences); eps = 0 is the plain loss, bit
    for bit."""
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(4, 5)), np.array([0, 3, 1, 4])
    ctx = Context(Policy.exact())
    eps = 0.2
    f = SoftmaxCrossEntropy(label_smoothing=eps)
    target = (1 - eps) * np.eye(5)[y] + eps / 5
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    assert f(z, y, ctx) == pytest.approx(-(target * logp).sum(1).mean(), rel=1e-14)
    g = f.backward(ctx)
    num = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        d = np.zeros_like(z)
        d[i] = 1e-6
        num[i] = (f(z + d, y, ctx) - f(z - d, y, ctx)) / 2e-6
    np.testing.assert_allclose(g, num, atol=1e-8)
    plain, zero = SoftmaxCrossEntropy(), SoftmaxCrossEntropy(label_smoothing=0.0)
    assert plain(z, y, ctx) == zero(z, y, ctx)
    assert plain.backward(ctx).tobytes() == zero.backward(ctx).tobytes()
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\), got 1"):
        SoftmaxCrossEntropy(label_smoothing=1)


def test_gaussian_smoothing_perturbs_on_the_weights_grid_and_restores():
    from fixedsim.nn.smoothing import perturb_weights, restore_weights

    pol = Policy.fixed(16, 10, "nearest_even")
    model = _linear_model()
    params = model.named_parameters()
    for p in params.values():
        p.value = pol.weights.apply(p.value)
    orig = {k: p.value.copy() for k, p in params.items()}
    draws = []
    for _ in range(2):
        ctx = Context(pol, seed=3, step=5)
        saved = perturb_weights(params, ctx, 0.05)
        draws.append({k: p.value.copy() for k, p in params.items()})
        for k, p in params.items():
            np.testing.assert_array_equal(pol.weights.apply(p.value), p.value)  # on the grid
            assert not np.array_equal(p.value, orig[k])
            assert np.abs(p.value.astype(float) - orig[k]).max() < 0.05 * 6
        restore_weights(params, saved)
        for k, p in params.items():
            assert p.value.tobytes() == orig[k].tobytes()
    assert all(draws[0][k].tobytes() == draws[1][k].tobytes() for k in orig)  # seeded
    other = perturb_weights(params, Context(pol, seed=3, step=6), 0.05)
    assert any(params[k].value.tobytes() != draws[0][k].tobytes() for k in orig)
    restore_weights(params, other)
    assert perturb_weights(params, Context(pol), 0.0) is None
    with pytest.raises(ValueError, match="smoothing_sigma must be >= 0.0, got -1.0"):
        perturb_weights(params, Context(pol), -1.0)


def test_smoothing_in_training_resumes_bit_for_bit_and_changes_the_run(tmp_path):
    """TrainConfig label_smoothing and smoothing_sigma: the noise is keyed by the step, so a
    resumed run ends with the bits of one that never stopped; either setting changes the
    trained weights; bad values are refused."""
    tiny = _tiny()
    base = dict(model="mlp", model_options={"hidden": [8]}, epochs=2, batch_size=32, lr=0.05,
                seed=5, optimizer="kfac", damping=0.01, inv_interval=2)
    pol = Policy.fixed(16, 10, "stochastic")
    cfg = TrainConfig(**base, label_smoothing=0.1, smoothing_sigma=0.02)
    whole, rest = whole_and_resumed(cfg, pol, tiny, tmp_path)
    plain = train(TrainConfig(**base), pol, progress=False, data=tiny)
    assert same_weights(whole.model, rest.model)
    assert not same_weights(whole.model, plain.model)
    with pytest.raises(ValueError, match="TrainConfig smoothing_sigma must be >= 0.0"):
        TrainConfig(smoothing_sigma=-0.1)
    with pytest.raises(ValueError, match=r"TrainConfig label_smoothing must be a number in "
                                         r"\[0, 1\)"):
        TrainConfig(label_smoothing=1.5)


def test_poly_schedule_and_the_damping_schedule():
    """PolyLR: warm-up, polynomial decay, its spelling round-trips; the damping schedule
    must keep damping > 0 and sets KFAC.damping, which refuses 0."""
    from fixedsim.nn.optim import PolyLR, parse_schedule, schedule_from_dict

    s = parse_schedule("poly:10:3:0.001:2")
    assert s == PolyLR(10, 3, 0.001, 2) and str(s) == "poly:10:3:0.001:2"
    assert parse_schedule(str(s)) == s and schedule_from_dict(s.to_dict()) == s
    assert s(0.1, 0) == 0.001 and s(0.1, 2) == 0.1 and s(0.1, 10) == 0.001
    assert s(0.1, 6) == pytest.approx(0.001 + 0.099 * 0.5 ** 3, rel=1e-15)
    with pytest.raises(ValueError, match="PolyLR power must be > 0.0"):
        parse_schedule("poly:10:0")
    with pytest.raises(ValueError, match="damping must stay > 0"):
        TrainConfig(optimizer="kfac", epochs=3, damping_schedule="poly:3")
    TrainConfig(optimizer="kfac", epochs=3, damping_schedule="poly:3:2:0.0001")
    opt = KFAC(_linear_model(), lr=0.1)
    with pytest.raises(ValueError, match="damping must be > 0.0, got 0.0"):
        opt.damping = 0.0


def test_non_finite_factors_are_refused_with_the_reason():
    model = _linear_model()
    opt = KFAC(model, lr=0.1, inv_interval=1)
    x, y = _data((5,))
    opt.step(_batch(model, x, y, Policy.exact()))
    x = x.copy()
    x[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="the factor A of layer '0.linear' holds "
                                                 "non-finite values"):
        opt.step(_batch(model, x, y, Policy.exact(), step=1))


def test_batchnorm_is_preconditioned_unit_wise():
    """Exact policy: per channel, F = (1/N) sum_n v_n v_n^T with v_n = N (sum_hw dy xhat,
    sum_hw dy) of example n, and the preconditioned (gamma, beta) is (F + lambda I)^-1 g, in
    float64 to 1e-10 relative; the state round-trips."""
    rng = np.random.default_rng(5)
    model = Sequential(Conv2d(1, 2, 3, rng=rng), BatchNorm2d(2), ReLU(), Flatten(),
                       Linear(2 * 2 * 2, 3, rng=rng))
    lam = 0.05
    opt = KFAC(model, lr=0.0, damping=lam)
    x, y = _data((1, 4, 4), n=7)
    ctx = _batch(model, x, y, Policy.exact())
    bn = model.layers[1]
    xhat, dy = bn._cache[0], bn.kfac_error
    N = len(x)
    v = np.stack([(dy * xhat).sum(axis=(2, 3)), dy.sum(axis=(2, 3))], axis=-1) * N  # (N, C, 2)
    opt.step(ctx)
    pre = opt.preconditioned(ctx)
    for c in range(2):
        F = v[:, c].T @ v[:, c] / N
        np.testing.assert_allclose(opt.F["1.batchnorm2d"][c], F, rtol=1e-12)
        g = np.array([bn.gamma.grad[c], bn.beta.grad[c]])
        P = np.linalg.inv(F + lam * np.eye(2)) @ g
        got = np.array([pre["1.batchnorm2d.gamma"][c], pre["1.batchnorm2d.beta"][c]])
        np.testing.assert_allclose(got, P, rtol=1e-10, atol=1e-14)
    st = opt.state_dict()
    assert {"kfac.F.1.batchnorm2d", "kfac.Finv.1.batchnorm2d"} <= set(st)
    other = KFAC(model, lr=0.0, damping=lam)
    other.load_state_dict(st)
    assert other.state_dict()["kfac.Finv.1.batchnorm2d"].tobytes() == \
        st["kfac.Finv.1.batchnorm2d"].tobytes()


# -- K-FAC under emulated data parallelism (fixedsim.nn.parallel) ----------------------------

def _ring_sum64(parts):
    """The ring all-reduce of docs/parallel.md in float64, written out: the flattened arrays
    cut into len(parts) contiguous chunks (array_split), chunk c summed
    ((x_c + x_{c+1}) + x_{c+2}) + ... (indices mod n), each + one float64 rounding."""
    n = len(parts)
    flat = [np.asarray(p, np.float64).reshape(-1) for p in parts]
    out = np.empty(flat[0].size)
    for c, idx in enumerate(np.array_split(np.arange(flat[0].size), n)):
        acc = flat[c][idx].copy()
        for k in range(1, n):
            acc = acc + flat[(c + k) % n][idx]
        out[idx] = acc
    return out.reshape(np.shape(parts[0]))


def _bn_model():
    rng = np.random.default_rng(5)
    return Sequential(Conv2d(1, 2, 3, rng=rng), BatchNorm2d(2), ReLU(), Flatten(),
                      Linear(2 * 2 * 2, 3, rng=rng))


@pytest.mark.parametrize("make, shape, workers, scale", [
    (_linear_model, (5,), 2, 1.0), (_conv_model, (2, 4, 4), 4, 8.0),
    (_bn_model, (1, 4, 4), 2, 4.0)], ids=["linear-2", "conv-4-scaled", "batchnorm-2"])
def test_workers_factors_are_the_ring_of_the_shard_factors(make, shape, workers, scale):
    """Exact policy, float64 all-reduce: the factors the data-parallel pass hands to K-FAC
    are, bit for bit, the ring sum (in its order) of each worker's shard factors written
    from their definition with the global B (A_w = a_w^T a_w / (B T), G_w = E_w^T E_w B /
    scale^2, F_w = V_w^T V_w / B, each product rounded once); and, without BatchNorm (whose
    shards normalise by their own statistics), the one-worker factors of the whole batch up
    to the float64 rounding of the partial sums (not exact: each worker's product is rounded
    before the sum)."""
    from fixedsim.nn.parallel import AllReduce, WorkerContext, data_parallel_pass

    pol = Policy.exact()
    x, y = _data(shape, n=8, seed=3)
    B = len(x)
    model = make()
    opt = KFAC(model, lr=0.1, damping=0.1)
    ctx = Context(pol, seed=2, step=0)
    assert opt.gathers_statistics()
    _, _, sent = data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, workers,
                                    AllReduce(), scale, kfac=opt)
    got = opt.reduced_factors
    assert list(got) == opt._factor_names()
    parts = {k: [] for k in got}
    for w, idx in enumerate(np.array_split(np.arange(B), workers)):
        m = make()
        KFAC(m, lr=0.1)  # keeps the layers' output errors
        wctx = WorkerContext(pol, seed=2, step=0, worker=w)
        lossf = SoftmaxCrossEntropy()
        lossf(m.forward(x[idx], wctx), y[idx], wctx)
        m.backward(lossf.backward(wctx, scale, batch=B), wctx)
        for layer in m.layers:
            if isinstance(layer, (Linear, Conv2d)):
                a, e, n = _rows(layer)
                parts[f"A.{layer.name}"].append(_gram_oracle(a) / (len(a) // n * B))
                parts[f"G.{layer.name}"].append(_gram_oracle(e) * (B / (scale * scale)))
            elif isinstance(layer, BatchNorm2d):
                xhat, dy = layer._cache[0], np.asarray(layer.kfac_error, np.float64)
                v = np.stack([(dy * xhat).sum(axis=(2, 3)), dy.sum(axis=(2, 3))],
                             axis=-1) * (B / scale)  # (n, C, 2)
                parts[f"F.{layer.name}"].append(
                    np.stack([_gram_oracle(v[:, c]) for c in range(v.shape[1])]) / B)
    for k, arr in got.items():
        assert arr.dtype == np.float64
        n = arr.shape[-1]
        rows, cols = np.triu_indices(n)  # only the upper triangles travel, row by row
        upper = _ring_sum64([p[..., rows, cols] for p in parts[k]])
        want = np.zeros(arr.shape)
        want[..., rows, cols] = upper
        want[..., cols, rows] = upper
        assert arr.tobytes() == want.tobytes(), k
    sizes = ([p.value.size for p in model.parameters()]
             + [a.size // a.shape[-1] * (a.shape[-1] + 1) // 2 for a in got.values()])
    assert sent == sum(
        fs.nn.parallel.ring_allreduce([np.zeros(s)] * workers, None)[1].bytes_per_worker
        for s in sizes)
    if make is _bn_model:
        return
    one = make()
    KFAC(one, lr=0.1, damping=0.1)
    octx = Context(pol, seed=2, step=0)
    lossf = SoftmaxCrossEntropy()
    lossf(one.forward(x, octx), y, octx)
    one.backward(lossf.backward(octx, scale), octx)
    whole = KFAC(one, lr=0.1, damping=0.1).batch_factors(octx, scale)
    for k, arr in got.items():
        np.testing.assert_allclose(arr, whole[k], rtol=1e-13,
                                   atol=1e-15 * np.abs(whole[k]).max())
        assert np.abs(whole[k]).max() > 0


def test_workers_factors_in_bf16_enter_the_average_on_statistics_steps_only():
    """BF16 all-reduce: the reduced factors are BF16 values and are what the running average
    takes (stat_decay 0, FP32 curvature: they pass unchanged); the layer's "allreduce" role
    counts 2 casts and 1 addition per element of a factor's upper triangle on statistics
    steps, and the bytes include them then; on other steps only the gradients travel."""
    from fixedsim.nn.parallel import AllReduce, data_parallel_pass, ring_allreduce

    pol = Policy.float32()
    x, y = _data((5,), n=8, seed=4)
    model = _linear_model()
    opt = KFAC(model, lr=0.05, damping=0.1, stat_decay=0.0, inv_interval=4, stat_interval=2)
    params = model.named_parameters()
    ar = AllReduce(fs.BF16)

    def nbytes(arrays, triangles=False):
        return sum(ring_allreduce([np.zeros(upper(a) if triangles else a.size)] * 2,
                                  fs.BF16)[1].bytes_per_worker for a in arrays)

    def upper(a):  # the elements of a factor's upper triangles
        return a.size // a.shape[-1] * (a.shape[-1] + 1) // 2

    gathered = []
    for step in range(3):
        ctx = Context(pol, seed=1, step=step)
        stats = opt.gathers_statistics()
        gathered.append(stats)
        _, _, sent = data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, 2, ar,
                                        kfac=opt)
        red = opt.reduced_factors
        grads = [p.value for p in params.values()]
        if not stats:
            assert red is None and sent == nbytes(grads)
            for lname in opt.layers:
                n = sum(p.value.size for p in opt.layers[lname].parameters())
                assert ctx.counters[lname].roles["allreduce"].roundings == 3 * n
            opt.step(ctx)
            continue
        assert sent == nbytes(grads) + nbytes(red.values(), triangles=True)
        for k, v in red.items():
            assert np.array_equal(np.asarray(fs.quantize(v, fs.BF16), np.float64), v), k
            assert np.array_equal(v, np.swapaxes(v, -1, -2)), k
        for lname, layer in opt.layers.items():
            n = sum(p.value.size for p in layer.parameters())
            n += upper(red[f"A.{lname}"]) + upper(red[f"G.{lname}"])
            assert ctx.counters[lname].roles["allreduce"].roundings == 3 * n
        opt.step(ctx)
        assert opt.reduced_factors is None
        for lname in opt.layers:
            assert opt.A[lname].tobytes() == red[f"A.{lname}"].astype(np.float32).tobytes()
            assert opt.G[lname].tobytes() == red[f"G.{lname}"].astype(np.float32).tobytes()
    assert gathered == [True, False, True]
    # factors handed over for a step that gathers no statistics are refused
    ctx = Context(pol, seed=1, step=3)
    data_parallel_pass(model, SoftmaxCrossEntropy(), x, y, ctx, 2, ar, kfac=opt)
    opt.reduced_factors = {k: np.zeros(1) for k in opt._factor_names()}
    with pytest.raises(ValueError, match="not wanted"):
        opt.step(ctx)


def _kfac_config(**kw):
    base = dict(model="mlp", model_options={"hidden": [6]}, epochs=2, batch_size=32,
                lr=0.05, seed=5, optimizer="kfac", damping=0.01, inv_interval=2,
                stat_interval=2)
    base.update(kw)
    return TrainConfig(**base)


def test_workers_one_is_the_run_of_old_and_workers_two_resume_bit_for_bit(tmp_path):
    """workers=1 through the all-reduce path (float64) gives every bit of the plain K-FAC
    run; workers=2 with a BF16 stochastic all-reduce resumes bit for bit, and its history
    counts the factor bytes on the statistics steps (steps 1 and 3 of 4: one per epoch)."""
    tiny = _tiny()
    pol = Policy.float32()
    plain = train(_kfac_config(), pol, progress=False, data=tiny)
    one = train(_kfac_config(allreduce="float64"), pol, progress=False, data=tiny)
    for k, p in plain.model.named_parameters().items():
        assert p.value.tobytes() == one.model.named_parameters()[k].value.tobytes(), k
    pol = Policy.fixed(16, 12, "stochastic")
    cfg = _kfac_config(workers=2, allreduce="bf16:stochastic")
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny)
    part = train(cfg, pol, tmp_path / "split", progress=False, data=tiny, stop_after_epoch=1)
    rest = train(cfg, pol, tmp_path / "split", resume=True, progress=False, data=tiny)
    for a, b in zip(whole.history, rest.history, strict=True):
        assert ({k: v for k, v in a.items() if not k.endswith("seconds")}
                == {k: v for k, v in b.items() if not k.endswith("seconds")})
    for k, p in whole.model.named_parameters().items():
        assert p.value.tobytes() == rest.model.named_parameters()[k].value.tobytes(), k
    assert len(part.history) == 1
    from fixedsim.nn.parallel import ring_allreduce

    def nbytes(size):
        return ring_allreduce([np.zeros(size)] * 2, fs.BF16)[1].bytes_per_worker

    opt = KFAC(whole.model, lr=0.1)
    grads = sum(nbytes(p.value.size) for p in whole.model.parameters())
    factors = 0
    for layer in opt.layers.values():  # the upper triangles of A and G
        n_in = layer.weight.value.shape[0] + (layer.bias is not None)  # Linear: (in, out)
        n_out = layer.weight.value.shape[1]
        factors += nbytes(n_in * (n_in + 1) // 2) + nbytes(n_out * (n_out + 1) // 2)
    for row in whole.history:
        assert row["allreduce.bytes_per_worker"] == 2 * grads + factors


def test_workers_with_kfac_are_accepted_other_refusals_stay():
    assert _kfac_config(workers=2).workers == 2
    with pytest.raises(ValueError, match="optimizer 'kfac' needs the layers' dense products"):
        _kfac_config(workers=2, grad_approx="topk:0.5")
    with pytest.raises(ValueError, match="workers > 1 cannot be combined with reuse"):
        TrainConfig(workers=2, batch_size=32, reuse="L=4,H=4")
    with pytest.raises(ValueError, match="workers must divide batch_size"):
        _kfac_config(workers=3)


def test_workers_with_empty_shards_and_batchnorm():
    """34 images in batches of 32 over 4 workers: the last batch of 2 leaves two workers
    without images, which send zero factors; BatchNorm's unit-wise Fisher travels too. Both
    steps gather statistics (stat_interval 1): 4 casts and 3 additions for each of the 250
    parameters and the 684 entries of the factors' upper triangles (n (n + 1) / 2 of an
    n x n factor: conv 55 + 3, BatchNorm 2 x 3, Linear 561 + 21 and 28 + 10)."""
    short = fdata.synthetic(n_train=34, n_test=8, shape=(1, 8, 8), classes=4, seed=3)
    r = train(TrainConfig(model="cifarnet", model_options={"channels": [2], "hidden": 6},
                          epochs=1, batch_size=32, lr=0.05, seed=5, optimizer="kfac",
                          damping=0.1, workers=4, allreduce="bf16"), Policy.float32(),
              progress=False, data=short)
    row = r.history[0]
    assert row["steps"] == 2 and np.isfinite(row["train_loss"]) and row["skipped_steps"] == 0
    assert sum(p.value.size for p in r.model.parameters()) == 250
    assert row["allreduce.roundings"] == 2 * 7 * (250 + 684)
