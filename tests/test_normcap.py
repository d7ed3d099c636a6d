"""SP-NGD's weight-norm cap: the scaling against an exact oracle, what it leaves alone, and the
cap in training (resumed bit for bit, binding or not, from the CLI)."""

import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import assert_train_setting_checked, same_weights, whole_and_resumed
from hypothesis import given, settings
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.nn import Context, Policy
from fixedsim.nn.normcap import EPS, cap_weight_norms, weight_norm_limit
from fixedsim.nn.train import TrainConfig, train


def _model(seed):
    """A Conv2d (4 output channels), a ReLU and a Linear (8 -> 3), He-initialized."""
    rng = np.random.default_rng(seed)
    return fs.nn.Sequential(fs.nn.Conv2d(2, 4, 3, rng=rng), fs.nn.ReLU(), fs.nn.Flatten(),
                            fs.nn.Linear(8, 3, rng=rng))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), c=st.floats(0.05, 8.0),
       grow=st.floats(0.1, 30.0))
def test_capped_weights_against_an_exact_oracle(seed, c, grow):
    """FP32 weights (scaled by ``grow`` so that some exceed the cap and some do not): a
    weight whose ``sqrt(c * out) / (norm + 1e-9)`` is below 1, the norm the correctly rounded
    root of the exact sum of squares (Fractions), becomes the float64 product rounded to
    nearest FP32 (NumPy's cast); the others, and the biases, keep every bit."""
    model = _model(seed)
    for p in model.parameters():
        p.value = np.asarray(p.value * grow, np.float32).astype(np.float64)
    before = {k: p.value.copy() for k, p in model.named_parameters().items()}
    ctx = Context(Policy.float32(), seed=seed, step=3)
    want, n = {}, 0
    for layer in (model.layers[0], model.layers[3]):
        w = before[f"{layer.name}.weight"]
        out = w.shape[0] if isinstance(layer, fs.nn.Conv2d) else w.shape[1]
        norm = math.sqrt(float(sum(Fraction(v) ** 2 for v in w.ravel())))
        factor = math.sqrt(c * out) / (norm + EPS)
        assert weight_norm_limit(layer, c) == math.sqrt(c * out)
        if factor < 1.0:
            want[layer.name] = (w * factor).astype(np.float32).astype(np.float64)
            n += 1
    assert cap_weight_norms(model.layers, ctx, c) == n
    for name, p in model.named_parameters().items():
        layer = name.rpartition(".")[0]
        if name.endswith(".weight") and layer in want:
            assert np.asarray(p.value, np.float64).tobytes() == want[layer].tobytes(), name
            assert math.sqrt(np.sum(p.value ** 2)) <= math.sqrt(c * p.value.size) + 1e-6
        else:
            assert p.value.tobytes() == before[name].tobytes(), name
    rounded = sum(ctx.counters[k].roles["weights"].roundings for k in want)
    assert rounded == sum(before[f"{k}.weight"].size for k in want)


def test_the_cap_holds_the_norm_and_the_direction():
    """A weight 10 times over the cap ends at the cap (to FP32's precision), pointing the
    same way; a zero weight and a cap of 0 change nothing."""
    model = _model(1)
    lin = model.layers[3]
    lin.weight.value = np.asarray(lin.weight.value, np.float32).astype(np.float64)
    lin.weight.value *= 10 * math.sqrt(2 * 3) / np.linalg.norm(lin.weight.value)
    w0 = lin.weight.value.copy()
    assert cap_weight_norms([lin], Context(Policy.float32(), seed=0, step=0), 2.0) == 1
    np.testing.assert_allclose(np.linalg.norm(lin.weight.value), math.sqrt(6), rtol=1e-7)
    np.testing.assert_allclose(lin.weight.value, w0 / 10, rtol=1e-7)
    lin.weight.value = np.zeros_like(w0)
    assert cap_weight_norms([lin], Context(Policy.float32(), seed=0, step=0), 2.0) == 0
    lin.weight.value = w0.copy()
    assert cap_weight_norms([lin], Context(Policy.float32(), seed=0, step=0), 0.0) == 0
    assert lin.weight.value.tobytes() == w0.tobytes()


def test_stochastic_weights_draw_from_the_layer_and_step():
    """With a stochastic weights role the rounding of a scaled weight is keyed by the seed,
    the step and the layer: the same key gives the same bits, another step others."""
    pol = Policy.fixed(16, 12, "stochastic")

    def capped(step):
        model = _model(2)
        for p in model.parameters():
            p.value = p.value * 20
        cap_weight_norms(model.layers, Context(pol, seed=4, step=step), 2.0)
        return model.layers[3].weight.value

    assert capped(5).tobytes() == capped(5).tobytes()
    assert capped(5).tobytes() != capped(6).tobytes()


def _tiny():
    return fdata.synthetic(n_train=64, n_test=16, shape=(1, 16, 16), classes=4, seed=3)


@pytest.mark.parametrize("extra", [
    {},
    {"optimizer": "kfac", "damping": 0.01, "inv_interval": 2, "workers": 2,
     "allreduce": "bf16"},
], ids=["sgd", "kfac-2-workers-bf16"])
def test_cap_in_training_resumes_bit_for_bit(tmp_path, extra):
    """A cap that binds (c = 0.05: all 4 weights are over it after the first step) changes
    the run and is counted (4 on the first step; later an update may leave a weight at the
    cap inside it), and a resumed run ends with the bits of one that never stopped; a cap no
    weight reaches (c = 1e6) leaves every bit of the plain run."""
    base = dict(model="lenet", epochs=2, batch_size=32, lr=0.05, seed=5, **extra)
    pol = Policy.float32()
    whole, rest = whole_and_resumed(TrainConfig(**base, weight_norm_cap=0.05), pol, _tiny(),
                                    tmp_path)
    plain = train(TrainConfig(**base), pol, progress=False, data=_tiny())
    loose = train(TrainConfig(**base, weight_norm_cap=1e6), pol, progress=False, data=_tiny())
    assert same_weights(whole.model, rest.model)
    assert not same_weights(whole.model, plain.model)
    assert same_weights(loose.model, plain.model)
    counts = [r["weight_norm.capped"] for r in whole.history]
    assert counts == [r["weight_norm.capped"] for r in rest.history]
    assert 4 <= counts[0] <= 8 and 0 <= counts[1] <= 8  # 2 steps an epoch, 4 layers
    assert [r["weight_norm.capped"] for r in loose.history] == [0, 0]
    assert "weight_norm.capped" not in plain.history[0]
    for layer in whole.model.layers:
        if isinstance(layer, (fs.nn.Linear, fs.nn.Conv2d)):
            assert np.linalg.norm(layer.weight.value) <= weight_norm_limit(layer, 0.05) * (
                1 + 1e-6)


def test_cap_setting_is_checked_and_reaches_the_cli(tmp_path):
    out = assert_train_setting_checked(
        tmp_path, "weight_norm_cap", 2.0, (-0.1, float("nan"), float("inf"), "2", True), -1)
    assert "weight_norm.capped" in (out / "history.csv").read_text()
