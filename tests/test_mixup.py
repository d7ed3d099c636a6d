"""Mixup: soft targets in the loss, the seeded mix of a batch, and mixup in training (resumed
bit for bit, with emulated workers, from the CLI)."""

import numpy as np
import pytest
from helpers import assert_train_setting_checked, numeric_grad, same_weights, whole_and_resumed
from scipy import stats

from fixedsim import data as fdata
from fixedsim.nn import Context, Policy, SoftmaxCrossEntropy
from fixedsim.nn.mixup import mix_batch
from fixedsim.nn.train import TrainConfig, train


def _logp(z):
    logp = z - z.max(1, keepdims=True)
    return logp - np.log(np.exp(logp).sum(1, keepdims=True))


def test_one_hot_targets_are_the_integer_labels_bit_for_bit():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(6, 5)) * 4, np.array([0, 3, 1, 4, 4, 2])
    ctx = Context(Policy.float32())
    onehot = np.eye(5)[y]
    for eps in (0.0, 0.1):
        a, b = SoftmaxCrossEntropy(eps), SoftmaxCrossEntropy(eps)
        la, lb = a(z, y, ctx), b(z, onehot, ctx)
        ga, gb = a.backward(ctx, 8.0), b.backward(ctx, 8.0)
        if eps == 0:  # 0 * log p and p - 0 are exact: the same bits
            assert la == lb and ga.tobytes() == gb.tobytes()
        else:  # (1 - eps) onehot + eps / K summed in another order
            assert la == pytest.approx(lb, rel=1e-15)
            np.testing.assert_allclose(ga, gb, rtol=0, atol=1e-6)  # FP32 errors: last bit


def test_soft_targets_loss_and_error():
    """A mixed target's loss is the mix of the two labels' losses; its error is the loss's
    gradient (central differences), with and without label smoothing."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(4, 5))
    ya, yb, lam = np.array([0, 3, 1, 4]), np.array([2, 3, 0, 1]), 0.3
    T = lam * np.eye(5)[ya] + (1 - lam) * np.eye(5)[yb]
    ctx = Context(Policy.exact())
    for eps in (0.0, 0.2):
        f = SoftmaxCrossEntropy(eps)
        target = (1 - eps) * T + eps / 5
        assert f(z, T, ctx) == pytest.approx(-(target * _logp(z)).sum(1).mean(), rel=1e-14)
        mixed = lam * SoftmaxCrossEntropy(eps)(z, ya, ctx) + (1 - lam) * SoftmaxCrossEntropy(
            eps)(z, yb, ctx)
        assert f(z, T, ctx) == pytest.approx(mixed, rel=1e-14)
        g = f.backward(ctx)
        num = numeric_grad(lambda f=f: f(z, T, ctx), z)
        np.testing.assert_allclose(g.reshape(-1), [num[i] for i in range(z.size)], atol=1e-8)


@pytest.mark.parametrize("bad, match", [
    (np.full((4, 5), 0.3), r"target row 0 is not a distribution"),
    (np.eye(5)[[0, 1, 2, 3]] * np.array([[1], [1], [-1], [1]]), r"target row 2 is not"),
    (np.where(np.eye(5)[[0, 1, 2, 3]] == 1, np.nan, 0.0), r"target row 0 is not"),
    (np.eye(4), r"must be a \(4, 5\) float array, got float64 of shape \(4, 4\)"),
    (np.eye(5, dtype=np.int64)[:4], r"must be a \(4, 5\) float array, got int64"),
    (np.zeros(4), r"labels must be 4 integers or a \(4, 5\) float array of target "
                  r"distributions, got float64 of shape \(4,\)"),
])
def test_bad_targets_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SoftmaxCrossEntropy()(np.zeros((4, 5)), bad, Context(Policy.exact()))


def test_mix_batch_mixes_a_permutation_of_the_batch():
    """With each input the one-hot of its index, a mixed row shows its partner and lam; the
    targets mix the same partner's label with the same lam; the draw is keyed by (seed,
    step) and lam follows Beta(alpha, alpha)."""
    n, classes = 16, 3
    x = np.eye(n).reshape(n, 1, 4, 4)
    y = np.arange(n) % classes
    ctx = Context(Policy.exact(), seed=7, step=3)
    xm, T, lam = mix_batch(x, y, classes, 0.4, ctx)
    rows = xm.reshape(n, n)
    assert xm.dtype == T.dtype == np.float64 and 0 <= lam <= 1
    for i in range(n):
        others = [j for j in range(n) if j != i and rows[i, j] != 0]
        partner = others[0] if others else i
        assert len(others) <= 1
        want = np.zeros(n)
        want[i] += lam
        want[partner] += 1 - lam
        assert rows[i].tolist() == want.tolist()
        t = np.zeros(classes)
        t[y[i]] += lam
        t[y[partner]] += 1 - lam
        assert T[i].tolist() == t.tolist()
    partners = [int(np.flatnonzero(rows[i] == 1 - lam)[0]) if (rows[i] == 1 - lam).any()
                else i for i in range(n)]
    assert sorted(partners) == list(range(n))  # a permutation
    again = mix_batch(x, y, classes, 0.4, Context(Policy.exact(), seed=7, step=3))
    assert again[2] == lam and again[0].tobytes() == xm.tobytes()
    assert mix_batch(x, y, classes, 0.4, Context(Policy.exact(), seed=7, step=4))[2] != lam
    lams = [mix_batch(x[:2], y[:2], classes, 0.4, Context(Policy.exact(), seed=1, step=s))[2]
            for s in range(2000)]
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3
    assert stats.kstest(lams, stats.beta(1.0, 1.0).cdf).pvalue < 1e-6  # it tells them apart


def test_mix_batch_refuses_bad_input():
    ctx = Context(Policy.exact())
    x, y = np.zeros((4, 2)), np.arange(4)
    with pytest.raises(ValueError, match=r"mixup alpha must be > 0 to mix a batch"):
        mix_batch(x, y, 4, 0.0, ctx)
    with pytest.raises(ValueError, match=r"mixup must be >= 0.0, got -1"):
        mix_batch(x, y, 4, -1, ctx)
    with pytest.raises(ValueError, match=r"3 inputs for 4 labels"):
        mix_batch(x[:3], y, 4, 0.2, ctx)


def _tiny():
    return fdata.synthetic(n_train=64, n_test=16, shape=(1, 12, 12), classes=4, seed=3)


@pytest.mark.parametrize("extra", [
    {},
    {"optimizer": "kfac", "damping": 0.01, "inv_interval": 2, "workers": 2,
     "allreduce": "bf16"},
], ids=["sgd", "kfac-2-workers-bf16"])
def test_mixup_in_training_resumes_bit_for_bit_and_changes_the_run(tmp_path, extra):
    """The mix is keyed by the step: a resumed run ends with the bits of one that never
    stopped; mixup changes the trained weights; the training accuracy is the mean weight the
    mixed targets give the predicted class (not a count of exact hits)."""
    tiny = _tiny()
    base = dict(model="mlp", model_options={"hidden": [8]}, epochs=2, batch_size=32, lr=0.05,
                seed=5, **extra)
    pol = Policy.fixed(16, 10, "stochastic")
    whole, rest = whole_and_resumed(TrainConfig(**base, mixup=0.4), pol, tiny, tmp_path)
    plain = train(TrainConfig(**base), pol, progress=False, data=tiny)
    assert same_weights(whole.model, rest.model)
    assert not same_weights(whole.model, plain.model)
    timeless = [[{k: v for k, v in r.items() if "seconds" not in k} for r in run.history]
                for run in (whole, rest)]
    assert timeless[0] == timeless[1]
    accs = [r["train_acc"] for r in whole.history]
    assert all(0 <= a <= 1 for a in accs)
    assert any(a * 64 != round(a * 64) for a in accs)  # weights, not whole hits
    assert all(a * 64 == round(a * 64) for a in (r["train_acc"] for r in plain.history))


def test_mixup_setting_is_checked_and_reaches_the_cli(tmp_path):
    assert_train_setting_checked(tmp_path, "mixup", 0.3, (-0.1, float("nan"), "0.2", True), -1,
                                 "--model", "mlp", "--model-options", '{"hidden": [8]}')
