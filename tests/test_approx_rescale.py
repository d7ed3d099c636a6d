"""Kernel rescaling (fixedsim.approx.rescale): the s**2 factor, exact where it is exact, the
low-resolution network and its expansion, the schedule, training and resume, errors."""

from __future__ import annotations

from fractions import Fraction

import helpers
import numpy as np
import pytest
from helpers import assert_same_bits

import fixedsim as fs
from fixedsim import nn
from fixedsim.approx import Rescale, parse_rescale, rescale_kernel
from fixedsim.approx.rescale import (
    downsample,
    expand_model,
    low_resolution_model,
    rescale_rows,
    upsample,
)
from fixedsim.nn.train import TrainConfig, train


# -- the s**2 factor -----------------------------------------------------------------------------
@pytest.mark.parametrize("padding", [0, 1])
def test_rescaled_kernel_on_the_upsampled_image_reproduces_the_low_resolution_conv(padding):
    """s = 2: the rescaled kernel w/4 is exact, so under the exact accumulator the sampled
    outputs of the full-resolution convolution are the low-resolution ones bit for bit."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 5, 6)), rng.standard_normal((4, 3, 2, 3))
    y_lo = fs.conv2d(x, w, padding=padding)
    y_hi = fs.conv2d(upsample(x, 2), rescale_kernel(w, 2), padding=2 * padding)
    assert y_hi.shape[2:] == (2 * y_lo.shape[2] - 1, 2 * y_lo.shape[3] - 1)
    assert_same_bits(y_hi[:, :, ::2, ::2], y_lo)
    # without the 1/s**2 factor every sampled output is 4 times too large
    y4 = fs.conv2d(upsample(x, 2), upsample(w, 2), padding=2 * padding)
    assert_same_bits(y4[:, :, ::2, ::2], 4 * y_lo)
    # between the sampled positions: a mix of neighbouring blocks, not a copy
    assert not np.allclose(y_hi[:, :, 1::2, ::2], y_lo[:, :, :-1, :])


def test_the_factor_is_exact_in_real_arithmetic_for_s_3():
    """s = 3 on a concrete example: with the kernel entries w/9 as exact fractions the
    identity holds exactly; in float64 w/9 is rounded, and so is the identity."""
    x = np.array([[1, -2, 3], [0, 4, -1], [2, 2, -3]])
    w = np.array([[5, -1], [2, 7]])
    s = 3
    y_lo = [[sum(int(x[P + i, Q + j]) * int(w[i, j]) for i in range(2) for j in range(2))
             for Q in range(2)] for P in range(2)]
    X = upsample(x, s)
    K = [[Fraction(int(w[i // s, j // s]), s * s) for j in range(6)] for i in range(6)]
    for P in range(2):
        for Q in range(2):
            y_hi = sum(int(X[s * P + i, s * Q + j]) * K[i][j] for i in range(6)
                       for j in range(6))
            assert y_hi == y_lo[P][Q]  # exactly, as fractions
    Kf = rescale_kernel(w[None, None].astype(float), s)[0, 0]
    assert_same_bits(Kf, np.array([[float(k) for k in row] for row in K]))  # w/9, rounded
    assert any(Fraction(float(k)) != k for row in K for k in row)  # 7/9 is not a float
    exact_of_rounded = [[sum(int(X[s * P + i, s * Q + j]) * Fraction(float(Kf[i, j]))
                             for i in range(6) for j in range(6)) for Q in range(2)]
                        for P in range(2)]
    assert exact_of_rounded != y_lo  # the rounded kernel: the identity is no longer exact
    y = fs.conv2d(X[None, None].astype(float), Kf[None, None])[0, 0, ::s, ::s]
    assert np.allclose(y, y_lo, rtol=1e-15, atol=1e-14)


def test_rows_of_the_linear_layer_after_a_flatten():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 2, 2, 3))  # (N, C, h, w)
    W = rng.standard_normal((12, 5))
    y_lo = fs.matmul(x.reshape(3, -1), W)
    y_hi = fs.matmul(upsample(x, 2).reshape(3, -1), rescale_rows(W, (2, 2, 3), 2))
    assert_same_bits(y_hi, y_lo)


def test_downsample_averages_blocks_and_inverts_upsample():
    x = np.arange(2 * 4 * 6, dtype=float).reshape(1, 2, 4, 6)
    assert_same_bits(downsample(upsample(x, 3), 3), x)
    d = downsample(x, 2)
    assert d.shape == (1, 2, 2, 3) and d[0, 0, 0, 0] == (0 + 1 + 6 + 7) / 4
    with pytest.raises(ValueError, match=r"rescale factor 4 does not divide the image size "
                                         r"4x6"):
        downsample(x, 4)


# -- the schedule --------------------------------------------------------------------------------
def test_rescale_parse_state_and_errors():
    r = Rescale.parse("2:3")
    assert (r.factor, r.epoch, str(r)) == (2, 3, "2:3") and parse_rescale("") is None
    assert [r.factor_at(e) for e in range(5)] == [2, 2, 2, 1, 1]
    r.load_state_dict(r.state_dict())
    with pytest.raises(ValueError, match="is not this run's"):
        r.load_state_dict({"factor": 2, "epoch": 4})
    for text, match in [("2", "expected FACTOR:EPOCH"), ("2:x", "expected FACTOR:EPOCH"),
                        ("1:3", r"factor must be an int >= 2, got 1"),
                        ("2:0", r"epoch must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            Rescale.parse(text)


# -- networks ------------------------------------------------------------------------------------
def _lenet(kernel=4, seed=0):
    return nn.build("lenet", seed=seed, in_shape=(1, 16, 16), classes=4, channels=[3, 4],
                    hidden=8, kernel=kernel)


def test_low_resolution_lenet_and_its_expansion():
    model = _lenet()
    low = low_resolution_model(model, (1, 16, 16), 2, seed=5)
    assert low.layers[0].kernel_size == (2, 2)
    assert type(low.layers[2]).__name__ == "Crop" and low.layers[2].size == (6, 6)
    x = np.random.default_rng(2).standard_normal((3, 1, 8, 8))
    ctx = nn.Context(nn.Policy.exact(), training=False)
    assert low.forward(x, ctx).shape == (3, 4)
    # the layers after the reduction are the model's
    assert_same_bits(low.layers[3].weight.value, model.layers[3].weight.value)
    values = expand_model(low, model, (1, 16, 16), 2)
    for name, p in model.named_parameters().items():
        assert values[name].shape == p.value.shape
        p.value = values[name]
    assert_same_bits(values["0.conv2d.weight"], rescale_kernel(low.layers[0].weight.value, 2))
    # the first convolution of the expanded model reproduces the low-resolution one
    y_lo = low.layers[0].forward(x, ctx)
    y_hi = model.layers[0].forward(upsample(x, 2), ctx)
    assert_same_bits(y_hi[:, :, ::2, ::2], y_lo)


def test_mlp_expansion_is_exact():
    model = nn.build("mlp", in_shape=(1, 4, 4), classes=3, hidden=[5])
    low = low_resolution_model(model, (1, 4, 4), 2, seed=1)
    assert low.layers[1].in_features == 4
    for name, v in expand_model(low, model, (1, 4, 4), 2).items():
        model.named_parameters()[name].value = v
    x = np.random.default_rng(3).standard_normal((2, 1, 2, 2))
    ctx = nn.Context(nn.Policy.exact(), training=False)
    assert_same_bits(model.forward(upsample(x, 2), ctx), low.forward(x, ctx))


def test_layers_that_do_not_scale():
    with pytest.raises(ValueError, match=r"the 5x5 kernel \(padding \(0, 0\)\) of layer "
                                         r"0.conv2d does not scale by 2"):
        low_resolution_model(_lenet(kernel=5), (1, 16, 16), 2)
    with pytest.raises(ValueError, match=r"rescale factor 3 does not divide the image size "
                                         r"16x16"):
        low_resolution_model(_lenet(), (1, 16, 16), 3)
    with pytest.raises(ValueError, match=r"layer 0.conv2d has stride \(2, 2\)"):
        low_resolution_model(nn.Sequential(nn.Conv2d(1, 2, 2, stride=2)), (1, 4, 4), 2)


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_images():
    return helpers.tiny_images(n_train=48)


def _config(**kw):
    return helpers.tiny_lenet_config(**{
        "model_options": {"channels": [3, 4], "hidden": 8, "kernel": 4}, "rescale": "2:1",
        **kw})


def test_training_with_rescale_switches_and_resumes_bit_for_bit(tiny_images, tmp_path):
    """Stopped after epoch 1 (low resolution: the resumed run rescales the kernels at the
    switch) or 2 (full resolution), the resumed run ends with the bits of the run that never
    stopped."""
    cfg, pol = _config(epochs=3), nn.Policy.fixed(16, 12)
    whole = train(cfg, pol, tmp_path / "whole", progress=False, data=tiny_images)
    assert [h["rescale.factor"] for h in whole.history] == [2, 1, 1]
    assert whole.history[0]["macs"] < whole.history[1]["macs"]  # the low resolution is cheaper
    assert whole.model.layers[0].kernel_size == (4, 4)
    for stop in (1, 2):
        out = tmp_path / f"split{stop}"
        part = train(cfg, pol, out, progress=False, data=tiny_images, stop_after_epoch=stop)
        assert part.model.layers[0].kernel_size == ((2, 2) if stop == 1 else (4, 4))
        rest = train(cfg, pol, out, resume=True, progress=False, data=tiny_images)
        for k, p in whole.model.named_parameters().items():
            q = rest.model.named_parameters()[k]
            assert p.value.dtype == q.value.dtype and p.value.tobytes() == q.value.tobytes(), k
        assert rest.history[-1]["test_acc"] == whole.history[-1]["test_acc"]
    import json

    with np.load(tmp_path / "whole" / "checkpoint.npz") as z:  # the schedule is saved
        assert json.loads(bytes(z["meta"]).decode())["rescale"] == {"factor": 2, "epoch": 1}


def test_train_config_rescale_errors(tiny_images):
    with pytest.raises(ValueError, match=r"rescale setting '2': expected FACTOR:EPOCH"):
        _config(rescale="2")
    with pytest.raises(ValueError, match="rescale and reuse cannot be combined"):
        _config(reuse="L=25,H=6")
    with pytest.raises(ValueError, match="does not divide the image size 16x16"):
        train(_config(rescale="3:1"), nn.Policy.exact(), progress=False, data=tiny_images)
    cfg = _config()
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_cli_flag_and_study_key(tmp_path, capsys):
    import json

    from fixedsim.cli import main
    from fixedsim.study.spec import parse_study

    rc = main(["train", "--model", "mlp", "--model-options", '{"hidden": [8]}', "--data",
               "synthetic", "--train-size", "32", "--test-size", "16", "--epochs", "2",
               "--batch-size", "16", "--rescale", "2:1", "--no-estimate", "--quiet",
               "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["rescale"] == "2:1"
    assert "rescale.factor" in (tmp_path / "run" / "history.csv").read_text().split("\n")[0]
    rc = main(["train", "--rescale", "1:1", "--out", str(tmp_path / "bad")])
    assert rc != 0
    assert "rescale setting '1:1': Rescale factor must be an int >= 2" in capsys.readouterr().err
    study = parse_study({"train": {"model": "mlp", "epochs": 2},
                         "grid": {"train": {"rescale": ["", "2:1"]}}})
    assert [r.config().rescale for r in study.runs] == ["", "2:1"]
    assert len({r.run_id for r in study.runs}) == 2
