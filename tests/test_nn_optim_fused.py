"""The one-pass SGD step (fixedsim.jit.optim.sgd_step) against the separate passes it replaces.

Invariant: for every preset whose roles the kernel serves (FP32 nearest even, saturating fixed
point, an unrounded step), SGD with and without momentum, Nesterov, weight decay and a loss
scale gives the same weights, momentum buffers and role counters, bit for bit and count for
count, as :meth:`fixedsim.nn.SGD._update` (quantize, add_into, fs.add), stochastic draws
included; inputs the kernel leaves alone (non-finite values, other formats) take the separate
passes. The separate passes themselves are checked against the Fraction oracle in
test_nn_optim.py.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
import fixedsim.nn as nn
import fixedsim.nn.optim as optim
from fixedsim.jit import optim as kernel
from fixedsim.nn.optim import SGD

PRESETS = ["float32", "fixed:16:14:stochastic", "fixed:16:14:nearest_even", "fp16", "bf16",
           "fp8"]
#: (momentum, nesterov, weight_decay, grad_scale)
SETTINGS = [(0.9, False, 0.0, 1.0), (0.0, False, 0.0, 1.0), (0.9, True, 0.0, 1.0),
            (0.5, False, 1e-3, 1.0), (0.9, True, 5e-4, 1024.0)]
#: Sizes across the kernel's chunks (16,384 elements), a bias, a scalar.
SHAPES = {"fc.weight": (3, 16390), "fc.bias": (7,), "s": ()}


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _grads(rng, shape):
    """Gradients spread over many binades (tiny steps whose difference with the weight float64
    cannot hold, large ones that saturate), with exact zeros and negative zeros."""
    g = rng.normal(0.0, 1.0, shape) * 10.0 ** rng.integers(-12, 2, shape)
    flat = g.reshape(-1)
    flat[::11] = 0.0
    flat[5::13] = -0.0
    return g


def _run(policy, fused, momentum, nesterov, wd, grad_scale, steps=3, seed=0, values=None,
         grads=None):
    """Weights, buffers and per-step optim counters after ``steps`` SGD steps."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in SHAPES.items():
        if values is None:
            w0 = rng.uniform(-1.5, 1.5, shape)
            flat = w0.reshape(-1)
            flat[::17] = 0.0  # with the zero gradients: exact zero sums
            flat[3::19] = -0.0
        else:
            w0 = values[name]
        params[name] = nn.Parameter(name, policy.weights.apply(w0, seed=0))
    opt = SGD(params, lr=0.02, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    counters = []
    old = optim._FUSED
    optim._FUSED = fused
    try:
        for k in range(steps):
            for name, p in params.items():
                g = _grads(rng, p.value.shape) if grads is None else grads[name]
                p.grad = policy.weight_grads.apply(np.asarray(g) * grad_scale, seed=k)
            ctx = nn.Context(policy, seed=7, step=k)
            opt.lr = 0.02 * 0.8 ** k
            opt.step(ctx, grad_scale=grad_scale)
            lc = ctx.counters.get("optim")
            counters.append({} if lc is None else
                            {r: s for r, s in lc.roles.items()})
    finally:
        optim._FUSED = old
    return ({n: p.value for n, p in params.items()}, dict(opt.buffers), counters)


def _assert_same(a, b):
    (wa, ba, ca), (wb, bb, cb) = a, b
    assert wa.keys() == wb.keys() and ba.keys() == bb.keys()
    for name in wa:
        assert wa[name].dtype == wb[name].dtype, name
        np.testing.assert_array_equal(_bits(wa[name]), _bits(wb[name]), err_msg=name)
    for name in ba:
        assert ba[name].dtype == bb[name].dtype, name
        np.testing.assert_array_equal(_bits(ba[name]), _bits(bb[name]), err_msg=name)
    assert ca == cb


@pytest.fixture
def no_fallback(monkeypatch):
    """Fail if any parameter leaves the one-pass kernel."""
    def refuse(self, *args):
        raise AssertionError("the separate passes ran")

    monkeypatch.setattr(SGD, "_update", refuse)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("momentum,nesterov,wd,grad_scale", SETTINGS)
def test_fused_step_matches_separate_passes(name, momentum, nesterov, wd, grad_scale):
    policy = nn.Policy.parse(name)
    separate = _run(policy, False, momentum, nesterov, wd, grad_scale)
    _assert_same(_run(policy, True, momentum, nesterov, wd, grad_scale), separate)
    # the roles that round are counted, every step
    rounding = [r for r in ("momentum", "update", "weights")
                if getattr(policy, r).fmt is not None and (r != "momentum" or momentum)]
    assert all(sorted(c) == sorted(rounding) for c in separate[2])


@pytest.mark.parametrize("name", PRESETS)
def test_presets_take_the_kernel(name, no_fallback):
    _run(nn.Policy.parse(name), True, 0.9, True, 1e-4, 2.0)


_EDGE = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0**-14, -2.0**-14, 2.0**-126, 2.0**-149,
                         -2.0**-149, 1e-30, 1.9999, -2.0, 3.0e38, -3.4028234663852886e38])


@st.composite
def _arrays(draw):
    """Weights and gradients for the shapes, with boundary values planted."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values, grads = {}, {}
    for name, shape in SHAPES.items():
        scale = draw(st.sampled_from([1e-3, 1.0, 1e30]))
        w = rng.uniform(-1.0, 1.0, shape) * scale
        g = _grads(rng, shape) * draw(st.sampled_from([1e-20, 1.0, 1e6]))
        wf, gf = w.reshape(-1), g.reshape(-1)
        wf[::23] = 0.0  # some meet _grads' zeros: exact zero sums
        for _ in range(draw(st.integers(0, 4))):
            i = draw(st.integers(0, wf.size - 1))
            wf[i] = draw(_EDGE)
            gf[i] = draw(_EDGE)
        values[name], grads[name] = w, g
    return values, grads


@settings(max_examples=20, deadline=None)
@given(arrays=_arrays(), name=st.sampled_from(PRESETS),
       setting=st.sampled_from(SETTINGS))
def test_fused_step_matches_separate_passes_at_the_edges(arrays, name, setting):
    """Exact zero sums, signed zeros, subnormal and overflowing FP32 results, saturated fixed
    point, steps far below the weight's quantum: the same bits and counts, or the same
    error."""
    policy = nn.Policy.parse(name)
    values, grads = arrays
    outcomes = []
    for fused in (False, True):
        try:
            with np.errstate(all="ignore"):
                outcomes.append(_run(policy, fused, *setting, steps=2, values=values,
                                     grads=grads))
        except ValueError as err:  # NaN into fixed point: raised by both paths alike
            outcomes.append(str(err))
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
    else:
        _assert_same(outcomes[1], outcomes[0])


def test_non_finite_elements_take_the_separate_passes():
    """An infinite gradient leaves the whole tensor to the separate passes (the IEEE specials
    are theirs to round), with the same result."""
    policy = nn.Policy.float32()
    rng = np.random.default_rng(3)
    grads = {name: _grads(rng, shape) for name, shape in SHAPES.items()}
    grads["fc.bias"][2] = np.inf
    with np.errstate(all="ignore"):
        a = _run(policy, False, 0.9, False, 0.0, 1.0, grads=grads)
        b = _run(policy, True, 0.9, False, 0.0, 1.0, grads=grads)
    _assert_same(b, a)
    assert np.isnan(b[0]["fc.bias"][2]) or np.isinf(b[0]["fc.bias"][2])


def test_roles_the_kernel_does_not_serve():
    """Stochastic FP32, FP16 weights, float64 momentum: the separate passes, as before."""
    r32 = nn.Role(fs.FP32, "stochastic")
    for policy in (nn.Policy(name="sr32", weights=r32, momentum=r32, update=r32,
                             weight_grads=nn.Role(fs.FP32)),
                   nn.Policy(name="h", weights=nn.Role(fs.FP16), momentum=nn.Role(fs.FP32),
                             weight_grads=nn.Role(fs.FP32)),
                   nn.Policy(name="m64", weights=nn.Role(fs.FP32),
                             weight_grads=nn.Role(fs.FP32))):
        assert optim._sgd_tables(policy) is None
        _assert_same(_run(policy, True, 0.9, False, 0.0, 1.0, steps=2),
                     _run(policy, False, 0.9, False, 0.0, 1.0, steps=2))


def test_identical_at_one_and_two_threads():
    import numba

    before = numba.get_num_threads()
    policy = nn.Policy.parse("fixed:16:14:stochastic")
    results = []
    try:
        for t in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(t)
            results.append(_run(policy, True, 0.9, False, 0.0, 1.0, steps=2))
    finally:
        numba.set_num_threads(before)
    _assert_same(results[1], results[0])


def test_one_compiled_signature():
    """Every call shares one compiled kernel (read-only inputs, float32 arrays)."""
    for name in PRESETS:
        _run(nn.Policy.parse(name), True, 0.9, False, 0.0, 1.0, steps=2)
        _run(nn.Policy.parse(name), True, 0.0, False, 0.0, 1.0, steps=1)
    assert len(kernel.sgd_step.signatures) == 1


@pytest.mark.parametrize("rounding,random_bits",
                         [(r, None) for r in fs.Rounding] + [(fs.Rounding.STOCHASTIC, 3)])
@pytest.mark.parametrize("lr", [0.5, 0.02])
def test_fixed_weights_against_fs_sub(rounding, random_bits, lr):
    """Fixed-point weights, every rounding mode (3 random bits: draws that meet the limit),
    steps below one quantum of both signs (the difference's fraction float64 cannot hold),
    exact half-quantum ties (lr 0.5), steps across many quanta, saturation: the kernel's
    weights and counts equal fs.sub(w, lr * g) seeded as the optimizer seeds it."""
    q = 2.0**-14
    Q = fs.FixedFormat(16, 14)
    role = nn.Role(Q, rounding, random_bits=random_bits)
    policy = nn.Policy(name="q", weights=role, momentum=role, weight_grads=role)
    rng = np.random.default_rng(int(rounding) + 11)
    n = 20000
    w0 = policy.weights.apply(rng.uniform(-2.0, 2.0, n), seed=0)
    w0[:50] = 0.0
    w0[50:100] = -2.0
    w0[100:150] = 2.0 - q
    g = (rng.uniform(-1.0, 1.0, n) * 10.0 ** rng.integers(-3, 4, n) * q / lr).astype(
        np.float32)
    g[::7] = rng.integers(-3, 4, g[::7].size) * q  # lr 0.5: steps of half quanta, ties
    p = nn.Parameter("w", w0.copy())
    p.grad = g
    ctx = nn.Context(policy, seed=5, step=3)
    SGD({"w": p}, lr=lr).step(ctx)
    seed = ctx.key("optim.w", "weights") if rounding is fs.Rounding.STOCHASTIC else None
    expected, qs = fs.sub(w0, lr * g.astype(np.float64), Q, rounding, seed=seed,
                          random_bits=random_bits, stats=True)
    np.testing.assert_array_equal(_bits(p.value), _bits(expected))
    s = ctx.counters["optim"].roles["weights"]
    assert (s.roundings, s.inexact, s.overflow, s.underflow) == (
        qs.size, qs.inexact, qs.overflow, qs.underflow)
    assert 0 < s.inexact < n
