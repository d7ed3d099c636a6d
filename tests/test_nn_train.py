"""The training loop: determinism, bit-identical resume, divergence, loss scaling, run files,
and the ``fixedsim train`` command."""

import csv
import json

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.cli import main
from fixedsim.nn import Context, Linear, LossScale, Policy
from fixedsim.nn.train import (
    CHECKPOINT,
    HISTORY_COLUMNS,
    TrainConfig,
    TrainingDiverged,
    load_run,
    train,
)


@pytest.fixture(scope="module")
def tiny():
    return fdata.synthetic(n_train=96, n_test=48, shape=(1, 8, 8), classes=4, seed=3)


def _config(**kw):
    base = dict(model="mlp", model_options={"hidden": [12]}, epochs=2, batch_size=32, lr=0.1,
                schedule="constant", seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _params(result):
    return {k: p.value.copy() for k, p in result.model.named_parameters().items()}


def _same_history(h1, h2):
    assert len(h1) == len(h2)
    for a, b in zip(h1, h2, strict=True):
        assert {k: v for k, v in a.items() if not k.endswith("seconds")} == \
            {k: v for k, v in b.items() if not k.endswith("seconds")}  # timings differ


POLICIES = [Policy.fixed(16, 12, "stochastic"), Policy.float32(), Policy.fp16_mixed()]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_resume_continues_bit_for_bit(tiny, tmp_path, policy):
    cfg = _config(epochs=3, optimizer="sgd", momentum=0.9)
    whole = train(cfg, policy, tmp_path / "whole", progress=False, data=tiny)
    part = train(cfg, policy, tmp_path / "split", progress=False, data=tiny, stop_after_epoch=1)
    assert len(part.history) == 1
    rest = train(cfg, policy, tmp_path / "split", resume=True, progress=False, data=tiny)
    _same_history(whole.history, rest.history)
    p1, p2 = _params(whole), _params(rest)
    for k in p1:
        assert p1[k].dtype == p2[k].dtype
        assert p1[k].tobytes() == p2[k].tobytes(), k


def test_cosine_over_the_run_resumes_but_keeps_its_epochs(tiny, tmp_path):
    """``schedule="cosine"`` anneals over the run's epochs: the rate after the last epoch is
    0; a resumed run continues it bit for bit, and refuses other epochs (the rate would jump)."""
    from fixedsim.nn.train import RunFolderError

    cfg = _config(epochs=3, schedule="cosine")
    whole = train(cfg, Policy.float32(), tmp_path / "whole", progress=False, data=tiny)
    assert [h["lr"] for h in whole.history] == [
        pytest.approx(0.1 * (1 + np.cos(np.pi * e / 3)) / 2, abs=1e-15) for e in (1, 2, 3)]
    train(cfg, Policy.float32(), tmp_path / "split", progress=False, data=tiny,
          stop_after_epoch=1)
    with pytest.raises(RunFolderError,
                       match=r"schedule 'cosine' anneal\(s\) over the run's 3 epochs"):
        train(_config(epochs=4, schedule="cosine"), Policy.float32(), tmp_path / "split",
              resume=True, progress=False, data=tiny)
    rest = train(cfg, Policy.float32(), tmp_path / "split", resume=True, progress=False,
                 data=tiny)
    _same_history(whole.history, rest.history)
    assert all(p.tobytes() == q.tobytes() for p, q in zip(_params(whole).values(),
                                                           _params(rest).values(), strict=True))


def test_runs_are_deterministic_and_seeds_matter(tiny):
    pol = Policy.fixed(16, 12, "stochastic")
    a = train(_config(), pol, progress=False, data=tiny)
    b = train(_config(), pol, progress=False, data=tiny)
    c = train(_config(seed=6), pol, progress=False, data=tiny)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(pa[k].tobytes() == pb[k].tobytes() for k in pa)
    assert any(pa[k].tobytes() != pc[k].tobytes() for k in pa)


def test_weights_stay_in_their_format(tiny):
    pol = Policy.fixed(16, 12, "nearest_even")
    res = train(_config(), pol, progress=False, data=tiny)
    for k, p in res.model.named_parameters().items():
        assert np.array_equal(fs.quantize(p.value, fs.FixedFormat(16, 12)), p.value), k


def test_learns_the_synthetic_task(tiny):
    res = train(_config(epochs=4), Policy.float32(), progress=False, data=tiny)
    # 4 classes (chance 0.25) after 12 steps of SGD on 96 images: well above chance
    assert res.history[-1]["test_acc"] >= 0.6
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_run_directory(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = _config()
    pol = Policy.fixed(16, 12, "stochastic")
    train(cfg, pol, out, progress=False, data=tiny)
    for name in ("run.json", "history.csv", "counters.csv", CHECKPOINT, "curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0])[:len(HISTORY_COLUMNS)] == list(HISTORY_COLUMNS)
    assert int(rows[0]["macs"]) > 0
    rec = json.loads((out / "run.json").read_text())
    assert rec["provenance"]["fixedsim_version"] == fs.__version__
    assert load_run(out) == (cfg, pol)
    assert Policy.load(out / "policy.toml") == pol
    layers = {r["layer"] for r in csv.DictReader(open(out / "counters.csv"))}
    assert {"1.linear", "3.linear", "optim"} <= layers
    with pytest.raises(FileExistsError, match="resume"):
        train(cfg, pol, out, progress=False, data=tiny)
    with pytest.raises(ValueError, match="differs"):
        train(_config(lr=0.2), pol, out, resume=True, progress=False, data=tiny)


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    cfg = _config(epochs=3)
    pol = Policy.float32()
    train(cfg, pol, out, progress=False, data=tiny, stop_after_epoch=1)
    # Corrupt the model state the next epoch starts from: its first loss is NaN.
    with np.load(out / CHECKPOINT) as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k.startswith("param/"))
    arrays[key] = np.full_like(arrays[key], np.nan)
    np.savez(out / CHECKPOINT, **arrays)
    before = (out / CHECKPOINT).read_bytes(), (out / "history.csv").read_bytes()
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3: loss nan.*float32"):
        train(cfg, pol, out, resume=True, progress=False, data=tiny)
    assert ((out / CHECKPOINT).read_bytes(), (out / "history.csv").read_bytes()) == before


def test_exploding_loss_is_divergence(tiny):
    with pytest.raises(TrainingDiverged, match="max_loss") as err:
        train(_config(lr=1e4, max_loss=50.0), Policy.float32(), progress=False, data=tiny)
    assert "K-FAC" not in str(err.value)
    with pytest.raises(TrainingDiverged, match="max_loss.*K-FAC.*larger damping"):
        train(_config(lr=1e4, max_loss=50.0, optimizer="kfac"), Policy.float32(),
              progress=False, data=tiny)


def test_dynamic_loss_scale_backs_off_on_overflow(tiny):
    # A scale of 2**40 overflows FP16 errors at once: steps are skipped and the scale halves
    # until the gradients fit.
    pol = Policy.fp16_mixed(LossScale(init=2.0**40, growth_interval=1000))
    res = train(_config(epochs=1), pol, progress=False, data=tiny)
    row = res.history[0]
    assert row["skipped_steps"] >= 1
    assert row["loss_scale"] == 2.0**(40 - row["skipped_steps"])


def test_static_loss_scale_never_changes(tiny):
    pol = Policy.fp16_mixed(1024.0)
    res = train(_config(epochs=1), pol, progress=False, data=tiny)
    assert res.history[0]["loss_scale"] == 1024.0 and res.history[0]["skipped_steps"] == 0


def test_docs_worked_example():
    """docs/training.md: one Linear layer under Policy.fixed(16, 14, 'nearest_even')."""
    ctx = Context(Policy.fixed(16, 14, "nearest_even"))
    layer = Linear(1, 1)
    layer.name = "l"
    layer.weight.value = ctx.round("weights", np.array([[0.7]]), "w")
    layer.bias.value = ctx.round("weights", np.array([0.1]), "b")
    x = ctx.round("activations", np.array([[0.3]]), "input")
    assert x[0, 0] * 2**14 == 4915 and layer.weight.value[0, 0] * 2**14 == 11469
    y = layer.forward(x, ctx)
    assert y[0, 0] * 2**14 == 5079


def test_bad_config():
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="schedule|unknown"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({"epochs": 1, "epoch": 2})
    with pytest.raises(ValueError, match="model_options must hold JSON values"):
        TrainConfig(model_options={"hidden": np.int64(3)})


def test_model_options_survive_the_json_round_trip():
    """A tuple in model_options is held as a list: the config read back from run.json equals
    the one given (resume compares them), and the model is the same."""
    cfg = TrainConfig(model="mlp", model_options={"hidden": (12, 8)})
    assert cfg.model_options == {"hidden": [12, 8]}
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--model-options", '{"hidden": [8]}', "--data",
            "synthetic", "--train-size", "64", "--test-size", "32", "--epochs", "1",
            "--batch-size", "32", "--policy", "fixed:16:12:stochastic", "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "final test accuracy" in text and "Q<16,12>" in text
    assert (out / "history.csv").is_file()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0  # finished: nothing to do
    assert main(["train", "--policy", "fixed:16", "--quiet"]) == 2
    assert "fixed:WORD_LENGTH" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing"), "--quiet"]) == 2


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fixedsim.nn import Role  # noqa: E402


@settings(deadline=None, max_examples=60)
@given(fmt=st.sampled_from([fs.FixedFormat(16, 14), fs.FixedFormat(8, 3), fs.FP16, fs.BF16,
                            fs.FP8_E5M2, fs.FP32]),
       rounding=st.sampled_from(["nearest_even", "nearest_away", "toward_zero", "down", "up",
                                 "odd", "stochastic"]),
       a=st.lists(st.floats(-1e6, 1e6, allow_subnormal=True), min_size=6, max_size=6),
       b=st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
       scale=st.integers(-60, 10),
       layout=st.sampled_from(["linear", "conv", "same", "float32", "column", "apart"]))
def test_add_into_fast_path_is_fs_add_bit_for_bit(fmt, rounding, a, b, scale, layout):
    """Context.add_into (the bias addition) quantizes float64 sums when they are exact:
    identical bits, draws and counts to fs.add's single rounding, for exact and inexact sums,
    in every layout its one-pass kernel takes (a bias along the features of a Linear output
    or the channels of a Conv2d output, along the first axis, arrays of one shape, float32
    outputs) and one it leaves to numpy (broadcast along a middle axis)."""
    pol = Policy(name="t", activations=Role(fmt, rounding))
    a = np.ldexp(np.array(a).reshape(2, 3), scale)
    b = np.array(b)
    if layout == "conv":
        a, b = np.repeat(a[..., None, None], 2, axis=3), b.reshape(1, 3, 1, 1)
    elif layout == "same":
        b = np.concatenate([b, -b[::-1]]).reshape(2, 3)
    elif layout == "float32":
        with np.errstate(over="ignore", under="ignore"):
            a = a.astype(np.float32)
    elif layout == "column":
        b = b[:2].reshape(2, 1)
    elif layout == "apart":
        a, b = np.repeat(a[..., None], 2, axis=2), np.append(b, b[0]).reshape(2, 1, 2)
    ctx = Context(pol, seed=3)
    got = ctx.add_into("activations", a, b, "layer", "bias")
    want, qs = fs.add(a, b, fmt, rounding, seed=ctx.key("layer", "bias"), stats=True)
    assert got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()
    c = ctx.counters["layer"].roles["activations"]
    assert (c.roundings, c.inexact, c.overflow, c.underflow, c.nan) == \
        (qs.size, qs.inexact, qs.overflow, qs.underflow, qs.nan)


def test_cifarnet_trains_on_three_channel_images():
    """cifarnet (conv + BatchNorm stages, dropout) runs a whole training loop, BatchNorm's
    running statistics included, on 3-channel images."""
    ds = fdata.synthetic(n_train=64, n_test=32, shape=(3, 16, 16), classes=3, seed=1)
    cfg = TrainConfig(model="cifarnet", model_options={"channels": [4, 8], "hidden": 16,
                                                       "dropout": 0.25},
                      epochs=2, batch_size=16, lr=0.05, seed=2)
    res = train(cfg, Policy.float32(), progress=False, data=ds)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    bn = res.model.layers[1]
    assert type(bn).__name__ == "BatchNorm2d" and not np.allclose(bn.running_mean, 0)


def test_cli_train_counts_per_step_events_when_asked(tmp_path):
    """``counters.csv`` leaves the accumulator's per-step events empty (not counted) unless
    ``--count-steps`` asks for them; the weights are the same either way."""
    import csv

    base = ["train", "--model", "mlp", "--model-options", '{"hidden": [8]}', "--data",
            "synthetic", "--train-size", "64", "--test-size", "32", "--epochs", "1",
            "--batch-size", "32", "--policy", "fp16", "--quiet"]
    rows = {}
    for flag in ([], ["--count-steps"]):
        out = tmp_path / ("steps" if flag else "cheap")
        assert main(base + flag + ["--out", str(out)]) == 0
        with open(out / "counters.csv") as f:
            rows[bool(flag)] = list(csv.DictReader(f))
    cheap, full = rows[False], rows[True]
    assert any(int(r["calls"]) for r in cheap)
    assert all(r["products.accumulator.inexact"] == "" for r in cheap if int(r["calls"]))
    assert sum(int(r["products.accumulator.inexact"]) for r in full) > 0
    for c, f in zip(cheap, full, strict=True):
        assert c["products.accumulator.roundings"] == f["products.accumulator.roundings"]
        assert c["products.output.roundings"] == f["products.output.roundings"]
