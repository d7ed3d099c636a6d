"""Optimizers (SGD, Adam) under numerics policies, and learning-rate schedules.

Oracles: an independent float64 NumPy implementation of PyTorch's update rules (exact policy),
and Fraction arithmetic rounded once by :func:`fixedsim.reference.round_to_format` (rounded
policies), with the same random draws as the kernels for stochastic rounding.
"""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fixedsim as fs
import fixedsim.nn as nn
from fixedsim import reference
from fixedsim.jit.rng import random_u64_array
from fixedsim.nn.optim import (
    SGD,
    Adam,
    ConstantLR,
    CosineLR,
    StepLR,
    parse_schedule,
    schedule_from_dict,
    spans_run,
)
from fixedsim.quantize import random_key

Q = fs.FixedFormat(16, 14)
ULP = 2.0 ** -14
EXACT = nn.Policy.exact()
FIXED_RNE = nn.Policy.fixed(16, 14, "nearest_even")
FIXED_SR = nn.Policy.fixed(16, 14, "stochastic")


def make_params(rng, shapes, policy, scale=0.5):
    """Parameters with values in the policy's weight role (as the trainer stores them)."""
    out = {}
    for name, shape in shapes.items():
        out[name] = nn.Parameter(name, policy.weights.apply(rng.uniform(-scale, scale, shape),
                                                            seed=0))
    return out


def set_grads(params, rng, policy, scale=0.1, loss_scale=1.0):
    """Gradients in the weight_grads role, times ``loss_scale`` (a power of two: exact)."""
    for p in params.values():
        g = policy.weight_grads.apply(rng.normal(0.0, scale, p.value.shape), seed=1)
        p.grad = g * loss_scale


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def draws(ctx, name, purpose, n):
    """The uniform 64-bit draws a STOCHASTIC rounding of ``n`` elements seeded like the
    optimizer's rounding of parameter ``name`` uses (element i gets draw i)."""
    return random_u64_array(random_key(ctx.key(f"optim.{name}", purpose)), 0, n)


# -- float64 reference implementations of PyTorch's rules ------------------------------------
class RefSGD:
    """torch.optim.SGD (dampening 0), float64: buf = g on the first step, then mu*buf + g."""

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.lr, self.mu, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.buf = {}

    def step(self, w, grads, grad_scale=1.0):
        out = {}
        for k in w:
            g = grads[k] / grad_scale
            if self.wd != 0:
                g = g + self.wd * w[k]
            if self.mu != 0:
                if k not in self.buf:
                    self.buf[k] = g.copy()
                else:
                    self.buf[k] = self.mu * self.buf[k] + g
                g = g + self.mu * self.buf[k] if self.nesterov else self.buf[k]
            out[k] = w[k] - self.lr * g
        return out


class RefAdam:
    """torch.optim.Adam's documented algorithm (amsgrad off, L2 weight decay), float64."""

    def __init__(self, lr, betas, eps, weight_decay):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.m, self.v, self.t = {}, {}, 0

    def step(self, w, grads):
        self.t += 1
        out = {}
        for k in w:
            g = grads[k] + self.wd * w[k]
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v.get(k, 0.0) + (1 - self.b2) * g * g
            m_hat = self.m[k] / (1 - self.b1 ** self.t)
            v_hat = self.v[k] / (1 - self.b2 ** self.t)
            out[k] = w[k] - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
        return out


SHAPES = {"fc.weight": (5, 3), "fc.bias": (5,), "conv.weight": (2, 1, 3, 3)}


@pytest.mark.parametrize("momentum,nesterov,wd", [
    (0.0, False, 0.0), (0.9, False, 0.0), (0.9, True, 0.0), (0.5, False, 1e-2),
    (0.9, True, 5e-4), (0.0, False, 1e-3)])
@pytest.mark.parametrize("grad_scale", [1.0, 1024.0])
def test_sgd_exact_policy_matches_pytorch_rule(momentum, nesterov, wd, grad_scale):
    rng = np.random.default_rng(1)
    params = make_params(rng, SHAPES, EXACT)
    ref_w = {k: p.value.copy() for k, p in params.items()}
    opt = SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ref = RefSGD(0.1, momentum, nesterov, wd)
    for k in range(6):
        lr = 0.1 * 0.7 ** k  # the trainer changes lr between steps
        opt.lr, ref.lr = lr, lr
        set_grads(params, rng, EXACT, loss_scale=grad_scale)
        grads = {name: p.grad.copy() for name, p in params.items()}
        opt.step(nn.Context(EXACT, seed=0, step=k), grad_scale=grad_scale)
        ref_w = ref.step(ref_w, grads, grad_scale)
        for name, p in params.items():
            assert p.value.dtype == np.float64
            # same float64 operations in the same order: equal, not just close
            np.testing.assert_array_equal(p.value, ref_w[name], err_msg=f"step {k} {name}")
    assert opt.steps == 6


@pytest.mark.parametrize("betas,eps,wd", [((0.9, 0.999), 1e-8, 0.0), ((0.8, 0.99), 1e-6, 1e-2),
                                          ((0.0, 0.5), 0.0, 0.0)])
def test_adam_exact_policy_matches_pytorch_rule(betas, eps, wd):
    rng = np.random.default_rng(2)
    params = make_params(rng, SHAPES, EXACT)
    ref_w = {k: p.value.copy() for k, p in params.items()}
    opt = Adam(params, lr=1e-2, betas=betas, eps=eps, weight_decay=wd)
    ref = RefAdam(1e-2, betas, eps, wd)
    for k in range(8):
        set_grads(params, rng, EXACT)
        grads = {name: p.grad.copy() for name, p in params.items()}
        opt.step(nn.Context(EXACT, step=k))
        ref_w = ref.step(ref_w, grads)
        for name, p in params.items():
            # the documented form and PyTorch's implemented form differ in float64 rounding
            # order only: a few ulps of the step
            np.testing.assert_allclose(p.value, ref_w[name], rtol=1e-13, atol=1e-15)


def test_adam_grad_scale_divides_out():
    rng = np.random.default_rng(3)
    a = make_params(rng, SHAPES, EXACT)
    b = {k: nn.Parameter(k, p.value.copy()) for k, p in a.items()}
    oa, ob = Adam(a, lr=1e-2), Adam(b, lr=1e-2)
    for k in range(3):
        set_grads(a, rng, EXACT)
        for name in a:
            b[name].grad = a[name].grad * 2.0 ** 20
        oa.step(nn.Context(EXACT, step=k))
        ob.step(nn.Context(EXACT, step=k), grad_scale=2.0 ** 20)
    for name in a:
        np.testing.assert_array_equal(bits(a[name].value), bits(b[name].value))


# -- rounded policies ----------------------------------------------------------------------------
def exact_update(w, step, rounding, draw=None):
    """Fraction oracle: w - step exactly, rounded once into Q<16,14>."""
    return float(reference.round_to_format(Fraction(float(w)) - Fraction(float(step)), Q,
                                           rounding, draw=draw))


@given(w=st.lists(st.integers(-2 ** 15, 2 ** 15 - 1), min_size=1, max_size=8),
       g=st.lists(st.floats(-4, 4, allow_subnormal=False), min_size=8, max_size=8),
       lr=st.floats(0, 2))
def test_sgd_fixed_nearest_is_one_rounding_of_exact_difference(w, g, lr):
    w = np.array(w, np.float64) * ULP  # values of Q<16,14>
    g = fs.quantize(np.array(g[: w.size]), Q)  # in the weight_grads role
    p = nn.Parameter("w", fs.quantize(w, Q))
    p.grad = g
    SGD([p], lr=lr).step(nn.Context(FIXED_RNE))
    step = lr * g.astype(np.float64)  # the update role of Policy.fixed keeps float64
    expect = [exact_update(wi, si, "nearest_even") for wi, si in zip(w, step, strict=True)]
    assert p.value.dtype == Q.dtype
    np.testing.assert_array_equal(p.value, expect)
    np.testing.assert_array_equal(bits(p.value), bits(fs.sub(w, step, Q)))


def test_sgd_fixed_momentum_buffer_rounds_its_float64_value():
    rng = np.random.default_rng(4)
    params = make_params(rng, {"w": (200,)}, FIXED_RNE)
    opt = SGD(params, lr=0.05, momentum=0.9, nesterov=True)
    v = np.zeros(200)
    for k in range(3):
        set_grads(params, rng, FIXED_RNE)
        g = params["w"].grad.astype(np.float64)
        w0 = params["w"].value.copy()
        opt.step(nn.Context(FIXED_RNE, step=k))
        # documented: mu * v + g evaluated in float64, then rounded once into the role
        v = np.array([float(reference.round_to_format(Fraction(0.9 * vi + gi), Q))
                      for vi, gi in zip(v, g, strict=True)])
        np.testing.assert_array_equal(opt.buffers["w"], v)
        step = 0.05 * (g + 0.9 * v)
        np.testing.assert_array_equal(
            params["w"].value, [exact_update(a, b, "nearest_even") for a, b in zip(w0, step,
                                                                                 strict=True)])


def test_sgd_stochastic_matches_oracle_draws_and_neighbours():
    rng = np.random.default_rng(5)
    params = make_params(rng, {"a": (64,), "b": (3, 7)}, FIXED_SR)
    set_grads(params, rng, FIXED_SR)
    before = {k: p.value.astype(np.float64) for k, p in params.items()}
    grads = {k: p.grad.astype(np.float64) for k, p in params.items()}
    ctx = nn.Context(FIXED_SR, seed=11, step=4)
    SGD(params, lr=0.01).step(ctx)
    for name, p in params.items():
        w, step = before[name].ravel(), 0.01 * grads[name].ravel()
        d = draws(ctx, name, "weights", w.size)
        expect = [exact_update(wi, si, "stochastic", int(di))
                  for wi, si, di in zip(w, step, d, strict=True)]
        np.testing.assert_array_equal(p.value.ravel(), expect)
        for wi, si, new in zip(w, step, p.value.ravel(), strict=True):
            lo, hi = reference.neighbours(Fraction(float(wi)) - Fraction(float(si)), Q)
            assert Fraction(float(new)) in (lo, hi)


def _one_step(policy, seed, step, n=1000, momentum=0.0):
    p = nn.Parameter("w", np.full(n, 0.25, Q.dtype))
    p.grad = np.full(n, 3 * 2.0 ** -17, Q.dtype)
    SGD({"w": p}, lr=1.0, momentum=momentum).step(nn.Context(policy, seed=seed, step=step))
    return p.value


def test_stochastic_update_is_deterministic_per_seed_and_step():
    a = _one_step(FIXED_SR, seed=3, step=7)
    np.testing.assert_array_equal(bits(a), bits(_one_step(FIXED_SR, seed=3, step=7)))
    assert not np.array_equal(a, _one_step(FIXED_SR, seed=3, step=8))
    assert not np.array_equal(a, _one_step(FIXED_SR, seed=4, step=7))
    assert set(np.unique(a)) <= {0.25, 0.25 - ULP}


def test_stochastic_update_is_unbiased():
    # w - step lies 3/8 of a quantum below w: each of n weights independently moves down one
    # quantum with probability 3/8. The count is Binomial(n, 3/8); 6 standard deviations bound
    # a false failure by ~2e-9 (and the draws are fixed by the seed, so the test is repeatable).
    n, p = 200_000, 3 / 8
    moved = int(np.sum(_one_step(FIXED_SR, seed=0, step=0, n=n) == 0.25 - ULP))
    assert abs(moved - n * p) < 6 * math.sqrt(n * p * (1 - p))
    mean_new = 0.25 - moved / n * ULP
    assert abs(mean_new - (0.25 - 3 * 2.0 ** -17)) < 6 * math.sqrt(p * (1 - p) / n) * ULP


def test_gupta_small_updates_lost_to_nearest_kept_by_stochastic():
    # step = 0.3 quantum < half a quantum: round-to-nearest never moves the weight; stochastic
    # rounding moves it by 0.3 quantum per step in expectation.
    n, steps = 20_000, 50
    for policy in (FIXED_RNE, FIXED_SR):
        p = nn.Parameter("w", np.full(n, 0.5, Q.dtype))
        opt = SGD([p], lr=0.3 * ULP)
        for k in range(steps):
            p.grad = np.ones(n, Q.dtype)
            opt.step(nn.Context(policy, seed=2, step=k))
        if policy is FIXED_RNE:
            assert np.all(p.value == 0.5)
        else:
            moved = (0.5 - p.value.astype(np.float64)) / ULP  # quanta moved: sum of 50 Bernoullis
            expect = 0.3 * steps
            sd = math.sqrt(steps * 0.3 * 0.7 / n)  # of the mean over n independent weights
            assert abs(moved.mean() - expect) < 6 * sd
            assert moved.min() >= 0 and moved.max() <= steps


def test_update_role_rounds_the_float64_step():
    pol = nn.Policy(name="upd", update=nn.Role(fs.FP16), weights=nn.Role(fs.FP32))
    rng = np.random.default_rng(6)
    params = make_params(rng, {"w": (50,)}, pol)
    set_grads(params, rng, pol)
    g = params["w"].grad.astype(np.float64)
    w = params["w"].value.copy()
    SGD(params, lr=0.37).step(nn.Context(pol))
    step = fs.quantize(0.37 * g, fs.FP16)  # lr * direction in float64, then the role
    np.testing.assert_array_equal(bits(params["w"].value), bits(fs.sub(w, step, fs.FP32)))
    assert params["w"].value.dtype == np.float32


def test_counters_and_dtypes():
    rng = np.random.default_rng(7)
    params = make_params(rng, SHAPES, FIXED_SR)
    set_grads(params, rng, FIXED_SR)
    ctx = nn.Context(FIXED_SR, step=1)
    SGD(params, lr=0.1, momentum=0.9).step(ctx)
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    roles = ctx.counters["optim"].roles
    assert roles["weights"].roundings == n
    assert roles["momentum"].roundings == n
    assert "update" not in roles  # Policy.fixed keeps the step in float64
    assert all(p.value.dtype == Q.dtype for p in params.values())

    set_grads(params, rng, FIXED_SR)
    ctx = nn.Context(FIXED_SR, step=2)
    Adam(params, lr=1e-3).step(ctx)
    assert ctx.counters["optim"].roles["momentum"].roundings == 2 * n  # m and v


def test_overflowing_weight_saturates_and_is_counted():
    p = nn.Parameter("w", np.array([1.99], Q.dtype))
    p.grad = np.array([-1.0], Q.dtype)
    ctx = nn.Context(FIXED_RNE)
    SGD([p], lr=1.0).step(ctx)
    assert p.value[0] == Q.max == 2 - ULP
    assert ctx.counters["optim"].roles["weights"].overflow == 1


# -- state --------------------------------------------------------------------------------------
OPTIMIZERS = [
    (FIXED_SR, lambda ps: SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (FIXED_SR, lambda ps: Adam(ps, lr=1e-2, weight_decay=1e-4)),
    (nn.Policy.fp16_mixed(), lambda ps: Adam(ps, lr=1e-3)),
    (nn.Policy(name="sr-all", weights=nn.Role(fs.BF16, "stochastic"),
               momentum=nn.Role(fs.FP16, "stochastic"), update=nn.Role(fs.FP16, "stochastic")),
     lambda ps: SGD(ps, lr=0.1, momentum=0.5)),
    (EXACT, lambda ps: SGD(ps, lr=0.1)),
]


@pytest.mark.parametrize("policy,make", OPTIMIZERS)
def test_state_dict_resume_is_bit_identical(policy, make):
    def grads_for(k, params):
        r = np.random.default_rng(100 + k)  # the gradient of step k, whoever computes it
        for name in sorted(params):
            p = params[name]
            p.grad = policy.weight_grads.apply(r.normal(0, 0.1, p.value.shape), seed=k)

    init = make_params(np.random.default_rng(8), SHAPES, policy)
    straight = {k: nn.Parameter(k, p.value.copy()) for k, p in init.items()}
    opt = make(straight)
    for k in range(5):
        grads_for(k, straight)
        opt.lr = 0.1 / (k + 1)
        opt.step(nn.Context(policy, seed=9, step=k))

    first = {k: nn.Parameter(k, p.value.copy()) for k, p in init.items()}
    opt1 = make(first)
    for k in range(3):
        grads_for(k, first)
        opt1.lr = 0.1 / (k + 1)
        opt1.step(nn.Context(policy, seed=9, step=k))
    state = opt1.state_dict()
    saved_w = {k: p.value.copy() for k, p in first.items()}
    # plain data only; survives a trip through JSON-like storage as arrays and numbers
    for key, v in state.items():
        assert isinstance(v, (int, float, np.ndarray)), (key, type(v))
    json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in state.items()})
    opt1.step(nn.Context(policy, seed=9, step=99))  # later changes must not touch `state`

    resumed = {k: nn.Parameter(k, v) for k, v in saved_w.items()}
    opt2 = make(resumed)
    opt2.load_state_dict({k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in state.items()})
    assert opt2.steps == 3
    for k in range(3, 5):
        grads_for(k, resumed)
        opt2.lr = 0.1 / (k + 1)
        opt2.step(nn.Context(policy, seed=9, step=k))
    for name in init:
        assert resumed[name].value.dtype == straight[name].value.dtype
        np.testing.assert_array_equal(bits(resumed[name].value), bits(straight[name].value))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1.keys() == s2.keys()
    for key in s1:
        if isinstance(s1[key], np.ndarray):
            assert s1[key].dtype == s2[key].dtype
            np.testing.assert_array_equal(bits(s1[key]), bits(s2[key]))
        else:
            assert s1[key] == s2[key]


def test_state_dict_keys():
    ps = {"a.weight": nn.Parameter("a.weight", np.zeros(3)), "b": nn.Parameter("b", np.zeros(2))}
    for p in ps.values():
        p.grad = np.ones_like(p.value)
    sgd = SGD(ps, lr=0.1, momentum=0.9)
    assert set(sgd.state_dict()) == {"step", "lr"}
    sgd.step(nn.Context(EXACT))
    assert set(sgd.state_dict()) == {"step", "lr", "momentum.a.weight", "momentum.b"}
    adam = Adam(list(ps.values()))
    adam.step(nn.Context(EXACT))
    assert set(adam.state_dict()) == {"step", "lr", "adam.m.p0", "adam.m.p1", "adam.v.p0",
                                      "adam.v.p1"}
    assert adam.state_dict()["step"] == 1


def test_load_state_dict_errors():
    ps = [nn.Parameter("w", np.zeros(3))]
    ps[0].grad = np.ones(3)
    opt = SGD(ps, lr=0.1, momentum=0.9)
    opt.step(nn.Context(EXACT))
    good = opt.state_dict()
    fresh = SGD([nn.Parameter("w", np.zeros(3))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="unknown key"):
        fresh.load_state_dict({**good, "momentum.q": np.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        fresh.load_state_dict({**good, "momentum.p0": np.zeros(4)})
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict({"step": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="lacks 'step'"):
        fresh.load_state_dict({"lr": 0.1})
    with pytest.raises(ValueError, match="unknown key"):
        Adam(ps).load_state_dict(good)
    fresh.load_state_dict(good)
    np.testing.assert_array_equal(fresh.buffers["p0"], opt.buffers["p0"])


# -- argument checking ------------------------------------------------------------------------
def _p():
    return nn.Parameter("w", np.zeros(2))


@pytest.mark.parametrize("kw,match", [
    ({"lr": -0.1}, "lr"), ({"lr": float("nan")}, "lr"), ({"lr": "0.1"}, "lr"),
    ({"lr": 0.1, "momentum": 1.0}, "momentum"), ({"lr": 0.1, "momentum": -0.1}, "momentum"),
    ({"lr": 0.1, "nesterov": True}, "nesterov"), ({"lr": 0.1, "weight_decay": -1}, "weight_decay"),
])
def test_sgd_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SGD([_p()], **kw)


@pytest.mark.parametrize("kw,match", [
    ({"betas": (0.9,)}, "betas"), ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
    ({"betas": (0.9, -0.1)}, r"betas\[1\]"), ({"eps": -1e-8}, "eps"), ({"lr": -1}, "lr"),
    ({"weight_decay": float("inf")}, "weight_decay"),
])
def test_adam_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        Adam([_p()], **kw)


def test_params_and_step_checks():
    with pytest.raises(ValueError, match="empty"):
        SGD([], lr=0.1)
    with pytest.raises(ValueError, match="Parameter"):
        SGD([np.zeros(2)], lr=0.1)
    with pytest.raises(ValueError, match="one Parameter"):
        SGD(_p(), lr=0.1)
    p = _p()
    with pytest.raises(ValueError, match="twice"):
        SGD([p, p], lr=0.1)
    opt = SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="no gradient"):
        opt.step(nn.Context(EXACT))
    p.grad = np.ones(3)
    with pytest.raises(ValueError, match="shape"):
        opt.step(nn.Context(EXACT))
    p.grad = np.ones(2)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(nn.Context(EXACT), grad_scale=0.0)
    with pytest.raises(TypeError, match="Context"):
        opt.step(EXACT)
    with pytest.raises(ValueError, match="lr"):
        opt.lr = -1.0
    assert opt.steps == 0 and np.all(p.value == 0)
    opt.lr = 0.5
    opt.step(nn.Context(EXACT))
    np.testing.assert_array_equal(p.value, [-0.5, -0.5])
    assert opt.to_dict() == {"name": "sgd", "lr": 0.5, "momentum": 0.0, "nesterov": False,
                             "weight_decay": 0.0}


# -- schedules ----------------------------------------------------------------------------------
def test_schedule_values():
    assert ConstantLR()(0.3, 100.0) == 0.3
    s = StepLR(5, 0.1)
    assert [s(1.0, e) for e in (0, 4.999, 5.0)] == [1.0, 1.0, 0.1]
    assert s(1.0, 10.5) == pytest.approx(0.01, rel=1e-15)
    c = CosineLR(10.0)
    assert c(0.2, 0.0) == 0.2
    assert c(0.2, 5.0) == pytest.approx(0.1, rel=1e-15)
    assert c(0.2, 2.5) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)), rel=1e-15)
    assert c(0.2, 10.0) == 0.0 and c(0.2, 50.0) == 0.0
    w = CosineLR(11.0, min_lr=0.01, warmup_epochs=1.0)
    assert w(0.1, 0.0) == 0.01
    assert w(0.1, 0.5) == pytest.approx(0.055, rel=1e-15)
    assert w(0.1, 1.0) == 0.1
    assert w(0.1, 6.0) == pytest.approx(0.055, rel=1e-15)
    assert w(0.1, 11.0) == 0.01


@given(total=st.floats(0.5, 100), frac_min=st.floats(0, 1), frac_warm=st.floats(0, 0.99),
       base=st.floats(0, 10), e1=st.floats(0, 200), e2=st.floats(0, 200))
def test_cosine_bounded_and_monotone_after_warmup(total, frac_min, frac_warm, base, e1, e2):
    s = CosineLR(total, min_lr=base * frac_min, warmup_epochs=total * frac_warm)
    lo, hi = sorted((e1, e2))
    for e in (lo, hi):
        assert s.min_lr <= s(base, e) <= base
    assert s(base, s.warmup_epochs) == base
    if lo >= s.warmup_epochs:
        assert s(base, hi) <= s(base, lo) * (1 + 1e-12)


@given(st.one_of(
    st.just(ConstantLR()),
    st.builds(StepLR, st.integers(1, 1000), st.floats(1e-6, 10)),
    st.builds(CosineLR, st.floats(0.01, 1e4), st.floats(0, 1)).flatmap(
        lambda c: st.builds(CosineLR, st.just(c.total_epochs), st.just(c.min_lr),
                            st.floats(0, c.total_epochs * 0.999)))))
def test_schedule_text_and_dict_round_trip(s):
    assert parse_schedule(str(s)) == s
    assert schedule_from_dict(s.to_dict()) == s
    json.dumps(s.to_dict())


def test_parse_schedule():
    assert parse_schedule("constant") == ConstantLR()
    assert parse_schedule(" Step:5 ") == StepLR(5, 0.1)
    assert parse_schedule("step:5:0.5") == StepLR(5, 0.5)
    assert parse_schedule("cosine:10") == CosineLR(10.0)
    assert parse_schedule("cosine:10:0.001") == CosineLR(10.0, 0.001)
    assert parse_schedule("cosine:10:0:2") == CosineLR(10.0, 0.0, 2.0)


def test_cosine_over_the_run():
    """``cosine`` and ``cosine:run...`` take the run's epochs; an explicit length ignores them."""
    assert parse_schedule("cosine", epochs=7) == CosineLR(7.0)
    assert parse_schedule("Cosine:RUN:0.001:1", epochs=4) == CosineLR(4.0, 0.001, 1.0)
    assert parse_schedule("cosine:10", epochs=4) == CosineLR(10.0)
    assert [spans_run(t) for t in ("cosine", " cosine:run:0.1", "cosine:3", "constant",
                                   "step:2")] == [True, True, False, False, False]
    with pytest.raises(ValueError, match="warmup_epochs"):
        parse_schedule("cosine:run:0:3", epochs=3)


@pytest.mark.parametrize("text,match", [
    ("", "unknown schedule"), ("linear", "unknown schedule"), ("constant:3", "0 to 0"),
    ("step", "1 to 2"), ("step:1:2:3", "1 to 2"), ("step:x", "STEP_SIZE"),
    ("step:2.5", "STEP_SIZE"), ("step:0", "step_size"), ("step:5:abc", "GAMMA"),
    ("step:5:0", "gamma"), ("cosine", "needs them"), ("cosine:run:0.1", "needs them"),
    ("cosine:0", "total_epochs"),
    ("cosine:10:-1", "min_lr"), ("cosine:10:0:10", "warmup_epochs"), ("cosine:nan", "finite"),
    ("cosine:10:0:1:2", "0 to 3"),
])
def test_parse_schedule_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_schedule(text)


def test_schedule_argument_errors():
    with pytest.raises(ValueError):
        StepLR(True)
    with pytest.raises(ValueError):
        CosineLR(5, warmup_epochs=-1)
    with pytest.raises(ValueError, match="epoch"):
        ConstantLR()(0.1, -1.0)
    with pytest.raises(ValueError, match="base_lr"):
        StepLR(2)(-0.1, 1.0)
    with pytest.raises(ValueError):
        schedule_from_dict({"name": "step", "step_size": 2, "bogus": 1})
    with pytest.raises(ValueError):
        schedule_from_dict({"name": "nope"})
    with pytest.raises(ValueError):
        parse_schedule(5)
    s = StepLR(3)
    with pytest.raises(AttributeError):
        s.gamma = 0.5  # frozen
