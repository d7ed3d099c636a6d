"""Shared helpers for the tests: bit-for-bit comparison of value arrays, central differences."""

import math
from fractions import Fraction

import numpy as np


def float_toward_zero(v):
    """An oracle result as a float64 container value: Fractions (wide fixed point) toward zero.

    A fixed-point value wider than 53 bits may not be a float64; fixedsim returns the largest
    float64 not beyond it, as docs/numerics.md says.
    """
    if isinstance(v, float):
        return v
    f = float(v)
    return math.nextafter(f, 0.0) if abs(Fraction(f)) > abs(v) else f


def canonical_bits(a, nan_sign=True) -> np.ndarray:
    """float64 bit patterns of ``a`` with every NaN replaced by the quiet NaN of its sign."""
    with np.errstate(invalid="ignore"):  # a float32 signaling NaN made quiet: still a NaN
        a = np.asarray(a, dtype=np.float64)
    bits = a.view(np.uint64).copy()
    nan = np.isnan(a)
    neg = np.signbit(a[nan]) & nan_sign
    bits[nan] = np.where(neg, np.uint64(0xFFF8000000000000), np.uint64(0x7FF8000000000000))
    return bits


def assert_same_bits(actual, expected, err_msg="", nan_sign=True):
    """Equal bit for bit as float64 (signed zeros distinguished), NaN compared by sign only.

    ``nan_sign=False`` ignores the sign of NaNs too (IEEE 754 leaves the sign of a NaN made by
    an invalid operation unspecified).
    """
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = canonical_bits(actual, nan_sign), canonical_bits(expected, nan_sign)
    if not np.array_equal(a, e):
        bad = np.flatnonzero((a != e).reshape(-1))
        i = bad[0]
        raise AssertionError(
            f"{bad.size} of {a.size} differ; first at flat index {i}: "
            f"got {actual.reshape(-1)[i]!r}, expected {expected.reshape(-1)[i]!r} {err_msg}"
        )


def numeric_grad(f, arr, coords=None, h=1e-6):
    """Central differences of the scalar ``f()`` w.r.t. ``arr`` (perturbed in place), at the
    flat indices ``coords`` (all when None)."""
    flat = arr.reshape(-1)
    assert np.shares_memory(flat, arr)
    idx = range(flat.size) if coords is None else coords
    out = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[i] = (fp - fm) / (2 * h)
    return out


def ref_draw(spec, seed):
    """The Fraction oracle's draws for a matrix product: the kernels' stage keys
    (:func:`fixedsim.matmul.stage_keys`) and random bits, stage by stage."""
    from fixedsim import reference
    from fixedsim.jit.rng import random_u64_array
    from fixedsim.matmul import stage_keys

    keys = stage_keys(seed)
    bits = {s: spec.random_bits or 64 for s in range(5)}
    if spec.accumulator is not None:
        bits[reference.STAGE_ACCUMULATOR] = spec.accumulator.random_bits or 64

    def draw(stage, i):
        return int(random_u64_array(keys[stage], i, 1)[0] >> np.uint64(64 - bits[stage]))

    return draw


def tiny_images(n_train=64):
    """The small synthetic image set (1x16x16, 4 classes) the training tests of reuse and
    the approximations train on."""
    from fixedsim import data

    return data.synthetic(n_train=n_train, n_test=32, shape=(1, 16, 16), classes=4, seed=3)


def tiny_lenet_config(**kw):
    """The small LeNet run those tests train (2 epochs of batch 16 on :func:`tiny_images`);
    ``kw`` replaces or adds settings."""
    from fixedsim.nn.train import TrainConfig

    base = dict(model="lenet", model_options={"channels": [3, 4], "hidden": 8},
                data="synthetic", epochs=2, batch_size=16, lr=0.05, seed=2)
    base.update(kw)
    return TrainConfig(**base)


def whole_and_resumed(cfg, policy, data, folder):
    """``(whole, resumed)``: the run of ``cfg`` trained in one go, and the same run stopped
    after its first epoch and resumed from its checkpoint (run folders under ``folder``)."""
    from fixedsim.nn.train import train

    whole = train(cfg, policy, folder / "whole", progress=False, data=data)
    train(cfg, policy, folder / "split", progress=False, data=data, stop_after_epoch=1)
    resumed = train(cfg, policy, folder / "split", resume=True, progress=False, data=data)
    return whole, resumed


def same_weights(a, b) -> bool:
    """Do two trained models hold the same bits in every parameter?"""
    pa, pb = a.named_parameters(), b.named_parameters()
    return pa.keys() == pb.keys() and all(pa[k].value.tobytes() == pb[k].value.tobytes()
                                          for k in pa)


def assert_policy_round_trips(policy, folder):
    """``policy`` equals itself through its dict and through a TOML and a JSON file written
    into ``folder``."""
    from fixedsim.nn.policy import Policy

    assert Policy.from_dict(policy.to_dict()) == policy
    for ext in ("toml", "json"):
        policy.save(folder / f"p.{ext}")
        assert Policy.load(folder / f"p.{ext}") == policy


def block_oracle(x, fmt, rounding, seed=None, random_bits=None, axis=None):
    """``fixedsim.reference.block_quantize`` of ``x``, with the kernels' draws (their seeded
    random numbers, ``random_bits`` of them) when ``rounding`` is stochastic."""
    import fixedsim as fs
    from fixedsim import reference
    from fixedsim.jit.rng import random_u64_array
    from fixedsim.quantize import random_key

    draws = None
    if fs.Rounding.coerce(rounding) is fs.Rounding.STOCHASTIC:
        key = random_key(seed)
        shift = np.uint64(64 - (random_bits or 64))

        def draws(i):
            return int(random_u64_array(key, i, 1)[0] >> shift)
    return reference.block_quantize(x, fmt, rounding, draws=draws, random_bits=random_bits,
                                     axis=axis)


def assert_train_setting_checked(tmp_path, key, good, bad, bad_cli, *args):
    """``TrainConfig`` refuses each value of ``bad`` for ``key``, naming it; ``fixedsim train
    --KEY good`` (``args`` added to a one-epoch run on 64 synthetic images) runs and records
    ``good`` in its run.json; ``--KEY bad_cli`` exits with status 2. Returns the run folder."""
    import json

    import pytest

    from fixedsim.cli import main
    from fixedsim.nn.train import TrainConfig

    for value in bad:
        with pytest.raises(ValueError, match=f"TrainConfig {key} must be"):
            TrainConfig(**{key: value})
    option = "--" + key.replace("_", "-")
    out = tmp_path / "run"
    assert main(["train", *args, "--data", "synthetic", "--train-size", "64", "--test-size",
                 "32", "--batch-size", "32", "--epochs", "1", option, str(good), "--quiet",
                 "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["config"][key] == good
    assert main(["train", "--data", "synthetic", option, str(bad_cli), "--quiet"]) == 2
    return out
