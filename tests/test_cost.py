"""The cost model: counts by shape equal the counters of real steps and epochs; machine
profiles (published ones sourced, malformed ones refused); the roofline by hand; the CLI;
validation against PyTorch (structure only: no wall-clock thresholds)."""

import collections
import csv
import math

import numpy as np
import pytest

import fixedsim as fs
from fixedsim import data as fdata
from fixedsim.cli import main
from fixedsim.cost import (
    PUBLISHED,
    CountError,
    ProfileError,
    count_epoch,
    count_step,
    load_profile,
    native_class,
    predict,
    tensor_bytes,
)
from fixedsim.cost.profiles import Profile, profile_from_dict
from fixedsim.nn import Context, Policy, SoftmaxCrossEntropy
from fixedsim.nn import layers as L
from fixedsim.nn.optim import SGD, Adam
from fixedsim.nn.train import TrainConfig, train
from fixedsim.rounding import Rounding

STAGES = ("input", "product", "accumulator", "output")


def _custom_policy():
    """Every stage of every product rounds, with blocks, lanes-free chains and stochastic
    roundings: the counts of each stage must follow."""
    fwd = fs.MatmulSpec(input=fs.BF16, product=fs.FP16, accumulator=fs.Accumulator(
        fs.FP32, block=4), output=fs.FP16)
    gi = fs.MatmulSpec(input=fs.FP16, accumulator=fs.Accumulator(fs.FP16, block=2))
    gw = fs.MatmulSpec(input=fs.FixedFormat(16, 12), output=fs.FixedFormat(16, 10),
                       output_rounding=Rounding.STOCHASTIC)
    r = fs.nn.Role(fs.FP16)
    return Policy(name="custom", weights=fs.nn.Role(fs.FP32), activations=r, errors=r,
                  weight_grads=fs.nn.Role(fs.FixedFormat(16, 10), "stochastic"), update=r,
                  momentum=fs.nn.Role(fs.FP32), forward=fwd, grad_input=gi, grad_weight=gw)


POLICIES = [Policy.float32(), Policy.fp16_mixed(), Policy.bf16(), Policy.fixed(16, 12),
            Policy.exact(), Policy.fp8(), _custom_policy()]


def _models():
    rng = 0
    return {
        "lenet": (fs.nn.lenet(in_shape=(1, 16, 16), channels=(2, 3), hidden=8, classes=4),
                  (1, 16, 16)),
        "mlp": (fs.nn.mlp(in_shape=(1, 6, 6), hidden=(7,), classes=4), (1, 6, 6)),
        "cifarnet": (fs.nn.cifarnet(in_shape=(3, 8, 8), channels=(2, 3), hidden=5, classes=4,
                                    dropout=0.25), (3, 8, 8)),
        "pools": (L.Sequential(L.Conv2d(2, 3, 3, stride=2, padding=1, rng=rng), L.ReLU(),
                               L.AvgPool2d(2), L.MaxPool2d(2, stride=1), L.Flatten(),
                               L.Linear(3, 4, bias=False, rng=rng)), (2, 9, 9)),
    }


def _step(model, policy, batch, shape, optimizer="sgd", momentum=0.9, seed=1):
    """One training step as fixedsim.nn.train runs it; the layers' counters."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (batch, *shape)).astype(np.float32)
    logits_n = None
    ctx = Context(policy, seed=seed)
    lossf = SoftmaxCrossEntropy()
    logits = model.forward(x, ctx)
    logits_n = logits.shape[1]
    lossf(logits, rng.integers(0, logits_n, batch), ctx)
    model.backward(lossf.backward(ctx, 1.0), ctx)
    params = model.named_parameters()
    opt = (Adam(params, lr=1e-4) if optimizer == "adam"
           else SGD(params, lr=1e-4, momentum=momentum))
    opt.step(ctx)
    return ctx.counters


def _recorded(counters):
    """{layer: (calls, macs, stage roundings, role roundings)} of real LayerCounters."""
    out = {}
    for name, lc in counters.items():
        stages = {s: getattr(lc.products, s).roundings for s in STAGES}
        roles = {r: s.roundings for r, s in lc.roles.items() if s.roundings}
        out[name] = (lc.products.calls, lc.products.macs, stages, roles)
    return out


def _predicted(by_layer):
    out = {}
    for name, d in by_layer.items():
        roles = {r: v for r, v in d["roles"].items() if v}
        stages = {s: d["stages"].get(s, 0) for s in STAGES}
        if d["calls"] or roles:
            out[name] = (d["calls"], d["macs"], stages, roles)
    return out


def _nonzero(rec):
    return {k: v for k, v in rec.items() if v[0] or v[3]}


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("name", ["lenet", "mlp", "cifarnet", "pools"])
def test_step_counts_equal_the_counters_of_a_real_step(policy, name):
    """Invariant: for every layer, the calls, MACs, roundings of every product stage and the
    roundings into every role that count_step predicts by shape are those the step records."""
    model, shape = _models()[name]
    pred = _predicted(count_step(model, policy, 3, shape).by_layer())
    got = _nonzero(_recorded(_step(model, policy, 3, shape)))
    assert pred == got


@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_optimizer_counts(optimizer, momentum):
    model, shape = _models()["mlp"]
    pol = Policy.float32()  # every optimizer role has a format
    pred = _predicted(count_step(model, pol, 2, shape, optimizer=optimizer,
                                 momentum=momentum).by_layer())
    got = _nonzero(_recorded(_step(model, pol, 2, shape, optimizer, momentum)))
    assert pred["optim"] == got["optim"]
    n = sum(p.value.size for p in model.parameters())
    per = {"sgd": 3 if momentum else 2, "adam": 4}[optimizer]  # momentum, update, weights
    assert sum(pred["optim"][3].values()) == per * n


def test_each_product_counted_apart():
    """The forward, grad_weight and grad_input rows match passes run alone (fresh
    contexts): forward only; backward without the input gradient; backward with it."""
    pol = _custom_policy()
    layer = L.Conv2d(2, 3, 3, stride=2, padding=1, rng=0)
    # a trained layer before the conv: it has an input gradient (a ReLU alone would not
    # give it one: the backward pass stops at the first layer with parameters)
    model = L.Sequential(L.Conv2d(2, 2, 1, rng=1), layer)
    layer_name = layer.name
    shape = (2, 7, 7)
    rows = {(r.layer, r.product): r for r in count_step(
        L.Sequential(L.Conv2d(2, 2, 1, rng=1), L.Conv2d(2, 3, 3, stride=2, padding=1, rng=0),
                     L.Flatten()), pol, 2, shape).rows}
    x = np.random.default_rng(0).uniform(-1, 1, (2, *shape))
    c1 = Context(pol, seed=3)
    y = model.forward(x, c1)
    g = np.random.default_rng(1).uniform(-1, 1, y.shape)
    c2 = Context(pol, seed=3)
    layer.backward(g, c2, need_input_grad=False)
    c3 = Context(pol, seed=3)
    layer.backward(g, c3, need_input_grad=True)
    for ctx, want in ((c1, [("forward",)]), (c2, [("grad_weight",)]),
                      (c3, [("grad_weight",), ("grad_input",)])):
        lc = ctx.counters[layer_name]
        rs = [rows[(layer_name, w[0])] for w in want]
        assert lc.products.calls == sum(r.calls for r in rs)
        assert lc.products.macs == sum(r.macs for r in rs)
        for s in STAGES:
            assert getattr(lc.products, s).roundings == sum(r.stages[s] for r in rs)
        roles = collections.Counter()
        for r in rs:
            roles.update(r.roles)
        assert {k: v.roundings for k, v in lc.roles.items()} == dict(roles)


@pytest.mark.parametrize("policy", [Policy.float32(), Policy.fixed(16, 12), Policy.bf16()],
                         ids=lambda p: p.name)
def test_epoch_counts_equal_a_real_training_epoch(policy):
    """count_epoch's steps (two full batches, a smaller last one, the test set in two
    evaluation batches) sum to the counters fixedsim.nn.train records for the epoch."""
    data = fdata.synthetic(n_train=96, n_test=48, shape=(1, 8, 8), classes=4, seed=3)
    cfg = TrainConfig(model="mlp", model_options={"hidden": [6]}, epochs=1, batch_size=40,
                      eval_batch_size=32, lr=0.01, seed=2)
    res = train(cfg, policy, progress=False, data=data)
    model = fs.nn.mlp(in_shape=(1, 8, 8), hidden=(6,), classes=4)
    steps = count_epoch(model, policy, 40, 96, (1, 8, 8), test_images=48, eval_batch=32)
    assert [(s.batch, s.training, t) for s, t in steps] == [
        (40, True, 2), (16, True, 1), (32, False, 1), (16, False, 1)]
    tot: dict = {}
    for s, times in steps:
        for name, d in s.by_layer().items():
            e = tot.setdefault(name, {"calls": 0, "macs": 0, "stages": collections.Counter(),
                                      "roles": collections.Counter()})
            e["calls"] += d["calls"] * times
            e["macs"] += d["macs"] * times
            for k, v in d["stages"].items():
                e["stages"][k] += v * times
            for k, v in d["roles"].items():
                e["roles"][k] += v * times
    assert _predicted(tot) == _nonzero(_recorded(res.counters))


def test_bytes_and_macs_by_format_by_hand():
    """One Linear layer under FP16 mixed precision, counted by hand."""
    model = L.Sequential(L.Linear(5, 3, rng=0))
    rows = {(r.layer, r.product): r for r in count_step(model, Policy.fp16_mixed(), 4,
                                                        (5,)).rows}
    f = rows[("0.linear", "forward")]
    assert f.macs_by == {("FP16", "FP32 chain"): 4 * 5 * 3}
    # x (4x5) and W (5x3) read as their FP16 copies, the FP32 bias, y (4x3) written in FP16
    assert f.reads == {"x": 40, "w": 30, "b": 12} and f.writes == {"y": 24}
    gw = rows[("0.linear", "grad_weight")]
    assert gw.macs == 5 * 4 * 3 + 4 * 3            # dW = x.T @ dy, db = ones @ dy
    assert gw.writes == {"grad_w": 30, "grad_b": 6}  # weight gradients in FP16
    assert ("0.linear", "grad_input") not in rows or rows[("0.linear", "grad_input")].macs == 0
    opt = rows[("optim", "update")]
    # SGD with momentum: FP32 momentum and master weights read and written, FP16 gradients
    # read, the FP16 copy of the weights written for the next forward pass
    n = 5 * 3 + 3
    assert opt.reads == {"momentum": 4 * n, "grad": 2 * n, "w": 4 * n}
    assert opt.writes == {"momentum": 4 * n, "w": 4 * n, "w_copy": 2 * n}


def test_tensor_bytes_pack_sub_byte_formats():
    assert tensor_bytes(fs.FloatFormat(2, 1), 5) == 3          # FP4 E2M1: two a byte
    assert tensor_bytes(fs.FixedFormat(4, 2), 4) == 2
    assert tensor_bytes(fs.FixedFormat(8, 4), 3) == 3
    assert tensor_bytes(fs.FixedFormat(12, 8), 3) == 6         # 12 bits stored in 2 bytes
    assert tensor_bytes(fs.TF32, 1) == 4 and tensor_bytes(fs.FP64, 2) == 16
    assert tensor_bytes(None, 2) == 16                         # no format: float64


def test_rounding_modes_are_counted_by_mode():
    model, shape = _models()["mlp"]
    s = count_step(model, Policy.fixed(16, 12, "stochastic"), 2, shape).total()
    modes = {m for (_, _, m) in s.roundings}
    assert modes == {"STOCHASTIC", "NEAREST_EVEN"}  # roles stochastic, exact outputs RNE
    assert sum(v for (w, _, _), v in s.roundings.items() if w == "activations") == \
        s.roles["activations"]


def test_layers_the_model_cannot_count():
    class Odd(fs.nn.Module):
        def forward(self, x, ctx):
            return x

    with pytest.raises(CountError, match=r"cannot count layer 1\.odd \(Odd\)"):
        count_step(L.Sequential(L.Flatten(), Odd(), L.Linear(4, 2)), Policy.float32(), 2, (4,))
    m = fs.nn.lenet(in_shape=(1, 16, 16), channels=(2, 3), hidden=8, classes=4)
    from fixedsim.reuse import Reuse

    m.layers[0].set_reuse(Reuse(L=5, H=4))
    with pytest.raises(CountError, match="Adaptive Deep Reuse.*depend on the data"):
        count_step(m, Policy.float32(), 2, (1, 16, 16))
    with pytest.raises(CountError, match=r"takes \(N, 5\), gets \(2, 4\)"):
        count_step(L.Sequential(L.Linear(5, 2)), Policy.float32(), 2, (4,))
    with pytest.raises(CountError, match="batch must be an int >= 1"):
        count_step(L.Sequential(L.Linear(5, 2)), Policy.float32(), 0, (5,))
    with pytest.raises(CountError, match="give in_shape"):
        count_step(L.Sequential(L.ReLU(), L.Linear(5, 2)), Policy.float32(), 1)


# -- profiles ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_profiles_cite_every_number(name):
    p = load_profile(name)
    assert p.kind == "published" and p.description
    keys = [f"rates.{k}" for k in p.rates] + ["memory.bandwidth", "overhead.per_call_s"]
    keys += ["memory.cache_bytes"] if p.cache_bytes is not None else []
    keys += [f"array.{k}" for k in p.array]
    for k in keys:
        assert len(p.sources.get(k, "")) > 20, f"{name}: {k} has no source"
    assert load_profile(p) is p
    assert profile_from_dict(_toml(p.to_toml()), "roundtrip") == p


def _toml(text):
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib.loads(text)


def test_published_rates_follow_the_datasheets():
    """MAC/s is half the datasheets' dense FLOP/s; the H200 computes as the H100 and moves
    4.8 TB/s; the FPGA's rate is its 784 MAC units times the clock."""
    h100, h200 = load_profile("h100"), load_profile("h200")
    assert h100.rates == h200.rates
    assert h100.rates["fp16"] * 2 == pytest.approx(989.4e12, rel=1e-3)
    assert (h100.bandwidth, h200.bandwidth) == (3.35e12, 4.8e12)
    assert load_profile("a100").rates["tf32"] * 2 == 156e12
    assert load_profile("v100").rates["fp16"] * 2 == 125e12
    f = load_profile("gupta2015_fpga")
    assert f.rates["int16"] == f.array["rows"] * f.array["cols"] * f.array["clock_hz"]


def test_native_class_is_the_narrowest_that_holds_the_format():
    v100 = load_profile("v100").rates  # fp64, fp32, fp16 only
    assert native_class(fs.BF16, v100) == "fp32"        # no BF16 units on Volta
    assert native_class(fs.FP8_E4M3, v100) == "fp16"
    assert native_class(fs.FixedFormat(8, 4), v100) == "fp16"
    h100 = load_profile("h100").rates
    assert native_class(fs.FP8_E5M2, h100) == "fp8"
    assert native_class(fs.FixedFormat(8, 4), h100) == "int8"
    assert native_class(fs.FixedFormat(16, 14), h100) == "fp32"  # no int16 units
    assert native_class(fs.FixedFormat(16, 14), load_profile("gupta2015_fpga").rates) == "int16"
    assert native_class(None, h100) == "fp64"
    with pytest.raises(ProfileError, match="no native format of the profile holds FP32"):
        native_class(fs.FP32, {"int8": 1.0})


GOOD = """name = "toy"
[rates]
fp32 = 1e9
[memory]
bandwidth = 1e9
"""


@pytest.mark.parametrize("text,match", [
    ("name = 'x'\n[memory]\nbandwidth = 1.0\n", r"\[rates\] must give at least one"),
    ("name = 'x'\n[rates]\nfp32 = 1e9\n", r"missing the \[memory\] table"),
    ("name = 'x'\n[rates]\nfp17 = 1e9\n[memory]\nbandwidth = 1.0\n", "unknown format.*fp17"),
    ("name = 'x'\n[rates]\nfp32 = -1\n[memory]\nbandwidth = 1.0\n",
     "fp32 must be a finite number > 0, got -1"),
    ("name = 'x'\n[rates]\nfp32 = 'fast'\n[memory]\nbandwidth = 1.0\n", "fp32 must be a finite"),
    ("name = 'x'\n[rates]\nfp32 = 1.0\n[memory]\ncache_bytes = 1.0\n", r"missing 'bandwidth'"),
    ("colour = 'red'\n" + GOOD, r"unknown key\(s\) 'colour'"),
    (GOOD + "cache_byte = 1e6\n", r"\[memory\] has unknown key\(s\) 'cache_byte'"),
    (GOOD + "llc_bytes = -1\n", r"llc_bytes must be a finite number > 0"),
    (GOOD + "[efficiency]\npoints = [[64, 0.5], [8, 1.0]]\n", "dims >= 1 increasing"),
    (GOOD + "[efficiency]\nbf16 = [[8, 1.5]]\n", r"bf16 must be .*fractions in \(0, 1\]"),
    (GOOD + "[efficiency]\nfp17 = [[8, 1.0]]\n", r"\[efficiency\] has unknown key\(s\) 'fp17'"),
    (GOOD + "[kind_bandwidth]\n'MaxPool2d.forward' = 0\n",
     r"MaxPool2d.forward must be a finite number > 0"),
    ("kind_bandwidth = 3\n" + GOOD, r"\[kind_bandwidth\] must be a table"),
    (GOOD + "[conv_efficiency]\nbackward = [[1, 0.5]]\n",
     r"\[conv_efficiency\] has unknown key\(s\) 'backward'"),
    (GOOD + "[conv_efficiency]\nforward = [[4, 0.5], [1, 0.1]]\n",
     r"\[conv_efficiency\] forward must be \[\[channels, fraction\].*increasing"),
    (GOOD + "[conv_efficiency]\ngrad_weight = [[1, 0]]\n", r"fractions in \(0, 4\]"),
    (GOOD + "[conv_efficiency]\n'fp17.forward' = [[1, 0.5]]\n", r"unknown key\(s\) 'fp17.forward'"),
    (GOOD + "[linear_efficiency]\n'bf16.grad_input' = -1\n",
     r"bf16.grad_input must be a finite number > 0"),
    ("conv_efficiency = 2\n" + GOOD, r"\[conv_efficiency\] must be a table of passes"),
    ("name = [rates\n", "not valid TOML"),
    ("[rates]\nfp32 = 1.0\n[memory]\nbandwidth = 1.0\n", "'name' must be a non-empty string"),
])
def test_malformed_profiles_are_refused_naming_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=match) as e:
        load_profile(path)
    assert str(path) in str(e.value)


def test_unknown_machine_and_missing_calibration(tmp_path, monkeypatch):
    with pytest.raises(ProfileError, match="unknown machine 'tpu9'.*h100"):
        load_profile("tpu9")
    with pytest.raises(ProfileError, match="No such file"):
        load_profile(tmp_path / "none.toml")
    monkeypatch.setenv("FIXEDSIM_PROFILE", str(tmp_path / "this.toml"))
    with pytest.raises(ProfileError, match="run `fixedsim cost calibrate` first"):
        load_profile("this")
    (tmp_path / "this.toml").write_text(GOOD)
    assert load_profile("this").name == "toy"


def test_a_machine_that_cannot_run_the_formats():
    with pytest.raises(ProfileError, match="'gupta2015_fpga' cannot run layer 0.conv2d"):
        predict("lenet", "float32", "gupta2015_fpga", images=64)
    p = predict("lenet", "fixed:16:14", "gupta2015_fpga", images=64)
    assert {r["native"] for r in p.rows if r["macs"]} == {"int16"}


# -- the model -----------------------------------------------------------------------------------
def test_the_roofline_by_hand(tmp_path):
    """One Linear layer, float32, a toy machine: every row's time computed by hand."""
    prof = Profile(name="toy", rates={"fp32": 1e6}, bandwidth=1e3, per_call_s=1e-3,
                   efficiency={"points": ((1, 0.25), (4, 1.0))})
    model = L.Sequential(L.Linear(4, 2, rng=0))
    p = predict(model, Policy.float32(), prof, batch=8, images=16, in_shape=(4,))
    rows = {(r["layer"], r["product"]): r for r in p.rows}
    f = rows[("0.linear", "forward")]
    # 2 steps; forward (8x4)@(4x2): 64 MACs, smallest dimension 2: efficiency 0.25 + 0.5*0.75
    eff = 0.25 + 0.5 * 0.75
    assert f["macs"] == 2 * 64
    assert f["compute_s"] == pytest.approx(2 * 64 / (1e6 * eff))
    # bytes: x 8*4*4, W 4*2*4, b 2*4 read, y 8*2*4 written
    assert f["bytes"] == 2 * (128 + 32 + 8 + 64)
    assert f["memory_s"] == pytest.approx(f["bytes"] / 1e3)
    assert f["predicted_s"] == pytest.approx(max(f["compute_s"], f["memory_s"]) + 2 * 1e-3)
    assert f["bound"] == "memory"
    assert p.epoch_s == pytest.approx(sum(r["predicted_s"] for r in p.rows))
    fast = Profile(name="fast-memory", rates={"fp32": 1e6}, bandwidth=1e12)
    p2 = predict(model, Policy.float32(), fast, batch=8, images=16, in_shape=(4,))
    assert {(r["layer"], r["product"]): r["bound"] for r in p2.rows
            if r["macs"]} == {("0.linear", "forward"): "compute",
                              ("0.linear", "grad_weight"): "compute"}


def test_lower_formats_are_never_slower_on_a_gpu():
    """On the H100 the FP16 and BF16 epochs of the LeNet take no longer than float32's
    (faster rates, fewer bytes); FP8's forward products run on the FP8 rate."""
    t = {pol: predict("lenet", pol, "h100", images=6400).epoch_s
         for pol in ("float32", "bf16", "fp16", "fp8")}
    assert t["bf16"] <= t["float32"] and t["fp16"] <= t["float32"]
    p = predict("lenet", "fp8", "h100", images=6400)
    assert {r["native"] for r in p.rows if r["product"] == "forward" and r["macs"]} == {"fp8"}


def test_csv_has_a_row_per_layer_and_product_and_the_epoch(tmp_path):
    path = tmp_path / "p.csv"
    main(["cost", "predict", "--model", "mlp", "--policy", "bf16", "--machine", "a100",
          "--images", "1000", "--csv", str(path)])
    rows = list(csv.DictReader(path.open()))
    assert {"layer", "product", "macs", "bytes", "predicted_s"} <= set(rows[0])
    assert rows[-1]["layer"] == "epoch"
    body = rows[:-1]
    assert {r["product"] for r in body} <= {"forward", "grad_input", "grad_weight", "update"}
    assert len({(r["phase"], r["layer"], r["product"]) for r in body}) == len(body)
    assert math.isclose(float(rows[-1]["predicted_s"]),
                        sum(float(r["predicted_s"]) for r in body), rel_tol=1e-12)
    assert int(rows[-1]["macs"]) == sum(int(r["macs"]) for r in body)


def test_cli_errors(tmp_path, capsys):
    assert main(["cost", "predict", "--machine", "tpu9"]) == 2
    assert "unknown machine 'tpu9'" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n")
    assert main(["cost", "predict", "--machine", str(bad)]) == 2
    assert "[rates] must give" in capsys.readouterr().err
    assert main(["cost", "predict", "--machine", "h100", "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["cost", "predict", "--machine", "h100", "--batch", "0"]) == 2
    assert "batch must be an int >= 1" in capsys.readouterr().err
    assert main(["cost", "profiles", "--sources"]) == 0
    out = capsys.readouterr().out
    assert "gupta2015_fpga" in out and "rates.fp16" in out


# -- validation ----------------------------------------------------------------------------------
def test_validate_refuses_policies_without_a_native_twin():
    from fixedsim.cost.validate import validate

    with pytest.raises(ValueError, match="no native PyTorch run stands for policy"):
        validate("mlp", "fixed:16:14", "h100")


def test_validate_pairs_every_row_with_a_measurement():
    """Structure only (times on a shared machine are not asserted): every layer row with
    work has a native measurement, and the epoch row has the measured epoch."""
    pytest.importorskip("torch")
    from fixedsim.cost.validate import validate

    prof = Profile(name="toy", rates={"fp32": 1e9, "bf16": 1e9, "fp64": 1e9}, bandwidth=1e9)
    v = validate("mlp", "float32", prof, batch=16, images=40, reps=1,
                 model_options={"hidden": [8]})
    rows = v.prediction.csv_rows()
    assert len(v.measured) == len(rows)
    for r, m in zip(rows[:-1], v.measured[:-1], strict=True):
        if r["macs"] or r["launches"]:
            assert m is not None and m > 0, (r["layer"], r["product"])
    assert v.measured[-1] > 0 and v.epoch_error is not None
    assert len(v.layer_errors) >= 8
    assert "median |error|" in v.table()


def test_a_measured_pass_moves_its_bytes_at_its_own_rate(tmp_path):
    """``kind_bandwidth``: the rows of one pass of one kind of layer move their bytes at the
    machine's measured rate for it, every other row at the memory's; the profile keeps it
    through its TOML file."""
    prof = Profile(name="toy", rates={"fp32": 1e6}, bandwidth=1e3,
                   kind_bandwidth={"MaxPool2d.forward": 10.0})
    # after a layer with parameters, so that the pool has an input gradient
    model = L.Sequential(L.Conv2d(1, 1, 1, rng=0), L.MaxPool2d(2), L.Flatten(),
                         L.Linear(4, 2, rng=0))
    p = predict(model, Policy.float32(), prof, batch=8, images=16, in_shape=(1, 4, 4))
    rows = {(r["layer"], r["product"]): r for r in p.rows}
    f, b = rows[("1.maxpool2d", "forward")], rows[("1.maxpool2d", "grad_input")]
    assert f["bytes"] and b["bytes"]
    assert f["memory_s"] == pytest.approx(f["bytes"] / 10.0)
    assert b["memory_s"] == pytest.approx(b["bytes"] / 1e3)
    assert rows[("0.conv2d", "forward")]["memory_s"] == pytest.approx(
        rows[("0.conv2d", "forward")]["bytes"] / 1e3)
    path = tmp_path / "toy.toml"
    prof.save(path)
    assert load_profile(path) == prof


def test_bytes_move_at_the_rate_of_the_smallest_level_that_holds_them(tmp_path):
    """A row's bytes move at the core's cache's rate when they fit in it, else at the shared
    last-level cache's when they fit in that, else at main memory's; a measured pass of a
    kind of layer at its own rate whatever its size."""
    prof = Profile(name="toy", rates={"fp32": 1e9}, bandwidth=1.0, cache_bytes=100.0,
                   cache_bandwidth=3.0, llc_bytes=1000.0, llc_bandwidth=2.0,
                   kind_bandwidth={"MaxPool2d.forward": 5.0})
    assert [prof.memory_rate(n) for n in (1, 100, 101, 1000, 1001)] == [3.0, 3.0, 2.0, 2.0, 1.0]
    assert prof.memory_rate(10**6, "MaxPool2d.forward") == 5.0
    no_llc = Profile(name="toy", rates={"fp32": 1e9}, bandwidth=1.0, cache_bytes=100.0,
                     cache_bandwidth=3.0)
    assert no_llc.memory_rate(500) == 1.0
    path = tmp_path / "toy.toml"
    prof.save(path)
    assert load_profile(path) == prof


def test_a_convolution_runs_at_the_machines_convolution_efficiency(tmp_path):
    """``conv_efficiency``: a convolution's own product of each pass is computed at the
    machine's fraction of the peak for its input channels (interpolated in log2), its bias
    gradient's and every Linear product at the GEMM's; without a table for a pass, the GEMM's;
    the profile keeps it through its TOML file."""
    table = {"forward": ((1, 0.1), (4, 0.4)), "grad_weight": ((1, 0.2), (16, 0.6))}
    prof = Profile(name="toy", rates={"fp32": 1e9}, bandwidth=1e15, conv_efficiency=table)
    assert prof.conv_efficiency_at("forward", 2) == pytest.approx(0.25)
    assert prof.conv_efficiency_at("forward", 64) == 0.4  # the ends held
    assert prof.conv_efficiency_at("grad_input", 2) is None
    plain = Profile(name="toy", rates={"fp32": 1e9}, bandwidth=1e15)
    model = L.Sequential(L.Conv2d(2, 3, 3, rng=0), L.ReLU(), L.Conv2d(3, 2, 3, rng=0),
                         L.Flatten(), L.Linear(2 * 4 * 4, 5, rng=0))
    kw = dict(batch=8, images=8, in_shape=(2, 8, 8))
    got = {(r["layer"], r["product"]): r for r in predict(model, Policy.float32(), prof,
                                                          **kw).rows}
    want = {(r["layer"], r["product"]): r for r in predict(model, Policy.float32(), plain,
                                                           **kw).rows}
    steps = count_step(model, Policy.float32(), 8, (2, 8, 8))
    by = {(r.layer, r.product): r for r in steps.rows}
    assert by[("0.conv2d", "forward")].channels == 2 and by[("4.linear", "forward")].channels == 0
    for layer, C in (("0.conv2d", 2), ("2.conv2d", 3)):
        f = by[(layer, "forward")]
        (M, N, K, *_), = f.gemm
        assert got[(layer, "forward")]["compute_s"] == pytest.approx(
            M * N * K / (1e9 * prof.conv_efficiency_at("forward", C)))
        gw = by[(layer, "grad_weight")]
        (M, N, K, *_), (Mb, Nb, Kb, *_) = gw.gemm  # the weights', then the bias's
        assert got[(layer, "grad_weight")]["compute_s"] == pytest.approx(
            M * N * K / (1e9 * prof.conv_efficiency_at("grad_weight", C)) + Mb * Nb * Kb / 1e9)
    assert got[("2.conv2d", "grad_input")]["compute_s"] == pytest.approx(
        want[("2.conv2d", "grad_input")]["compute_s"])  # no table for that pass
    for product in ("forward", "grad_weight", "grad_input"):
        assert got[("4.linear", product)]["compute_s"] == want[("4.linear", product)]["compute_s"]
    path = tmp_path / "toy.toml"
    prof.save(path)
    assert load_profile(path) == prof


def test_a_format_s_own_tables_come_first(tmp_path):
    """A format's convolution table and Linear factors are taken before the tables of any
    format; a Linear layer's pass runs at the GEMM's efficiency times its factor, its bias
    gradient at the GEMM's."""
    prof = Profile(name="toy", rates={"fp32": 1e9, "bf16": 1e9}, bandwidth=1e15,
                   conv_efficiency={"forward": ((1, 0.5),), "bf16.forward": ((1, 0.25),)},
                   linear_efficiency={"grad_input": 0.5, "bf16.grad_input": 0.1})
    assert prof.conv_efficiency_at("forward", 3, "bf16") == 0.25
    assert prof.conv_efficiency_at("forward", 3, "fp32") == 0.5
    assert prof.linear_factor("grad_input", "bf16") == 0.1
    assert prof.linear_factor("grad_input", "fp32") == 0.5
    assert prof.linear_factor("grad_weight", "bf16") == 1.0
    model = L.Sequential(L.Conv2d(1, 2, 3, rng=0), L.Flatten(), L.Linear(2 * 4 * 4, 5, rng=0),
                         L.ReLU(), L.Linear(5, 3, rng=0))
    kw = dict(batch=4, images=4, in_shape=(1, 6, 6))
    plain = Profile(name="toy", rates={"fp32": 1e9, "bf16": 1e9}, bandwidth=1e15)
    for pol in (Policy.float32(), Policy.bf16()):
        got = {(r["layer"], r["product"]): r for r in predict(model, pol, prof, **kw).rows}
        want = {(r["layer"], r["product"]): r for r in predict(model, pol, plain, **kw).rows}
        rows = {(r.layer, r.product): r for r in count_step(model, pol, 4, (1, 6, 6)).rows}
        row = rows[("4.linear", "grad_input")]
        (M, N, K, _, _, fa, fb), = row.gemm
        cls = got[("4.linear", "grad_input")]["native"]
        assert got[("4.linear", "grad_input")]["compute_s"] == pytest.approx(
            want[("4.linear", "grad_input")]["compute_s"] / prof.linear_factor("grad_input", cls))
        assert got[("2.linear", "grad_weight")]["compute_s"] == pytest.approx(
            want[("2.linear", "grad_weight")]["compute_s"])
        (M, N, K, *_), = rows[("0.conv2d", "forward")].gemm
        cls = got[("0.conv2d", "forward")]["native"]
        assert got[("0.conv2d", "forward")]["compute_s"] == pytest.approx(
            M * N * K / (1e9 * prof.conv_efficiency_at("forward", 1, cls)))
    path = tmp_path / "toy.toml"
    prof.save(path)
    assert load_profile(path) == prof


def test_calibration_multiplies_as_the_layers_do():
    """calibrate's libraries: each product is ``(M, K) @ (K, N)``, its result the float64
    product's; PyTorch's float formats through ``linear`` with an ``(N, K)`` weight, as a
    Linear layer calls it."""
    from fixedsim.cost.profiles import _gemm_libraries

    libs, torch = _gemm_libraries()
    for cls, (name, mm, make_a, make_b) in libs.items():
        a, b = make_a(3, 5), make_b(5, 4)
        got = np.asarray((mm(a, b).float() if torch is not None and hasattr(a, "float")
                          else mm(a, b)), np.float64)
        a64, b64 = (np.asarray(v.float() if hasattr(v, "float") else v, np.float64)
                    for v in (a, b))
        if name.endswith("linear"):
            assert tuple(b.shape) == (4, 5) and b.is_contiguous()
            b64 = b64.T
        assert got.shape == (3, 4)
        assert np.allclose(got, a64 @ b64, rtol=1e-2, atol=1e-2), cls


def test_calibrate_writes_a_profile_that_loads_back(tmp_path, monkeypatch):
    """A quick calibration: every rate has its source, the file loads back equal, and
    --machine this reads it (values are not asserted: they depend on the machine's load)."""
    path = tmp_path / "this.toml"
    monkeypatch.setenv("FIXEDSIM_PROFILE", str(path))
    assert main(["cost", "calibrate", "--quick", "--threads", "1"]) == 0
    p = load_profile("this")
    assert p.kind == "measured" and {"fp64", "fp32"} <= set(p.rates)
    for k in p.rates:
        assert p.sources[f"rates.{k}"].startswith("measured: ")
        assert p.rates[k] > 0 and 0 < p.gemm_efficiency(1, 1, 1, k) <= 1
    assert p.bandwidth > 0 and p.per_call_s > 0 and p.measured["threads"] == 1
    if fs.cost.profiles._cache_bytes(3):  # a CPU with an L3: its share and its rate
        assert p.llc_bytes == fs.cost.profiles._cache_bytes(3) / 2 and p.llc_bandwidth > 0
        assert p.sources["memory.llc_bandwidth"].startswith("measured: ")
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        assert p.kind_bandwidth == {}
    else:  # PyTorch's max pooling, by pass
        assert set(p.kind_bandwidth) == {"MaxPool2d.forward", "MaxPool2d.grad_input"}
        for k, v in p.kind_bandwidth.items():
            assert v > 0 and p.sources[f"kind_bandwidth.{k}"].startswith("measured: ")
        # PyTorch's convolutions by format, pass and input channels; its Linear layer's
        # backward passes against its forward
        passes = ("forward", "grad_input", "grad_weight")
        torch_floats = [c for c in ("fp32", "bf16", "fp16") if c in p.rates]
        assert set(p.conv_efficiency) == {f"{c}.{q}" for c in torch_floats for q in passes}
        for k, table in p.conv_efficiency.items():
            assert [c for c, _ in table] == list(fs.cost.profiles.CONV_CHANNELS)
            assert all(0 < e <= 4 for _, e in table)
            assert p.sources[f"conv_efficiency.{k}"].startswith("measured: ")
        assert set(p.linear_efficiency) == {f"{c}.{q}" for c in torch_floats
                                            for q in passes[1:]}
        for k, v in p.linear_efficiency.items():
            assert v > 0 and p.sources[f"linear_efficiency.{k}"].startswith("measured: ")
    assert load_profile(path) == p
    assert predict("mlp", "float32", "this", images=64).epoch_s > 0
    with pytest.raises(ProfileError, match="threads must be an int >= 1"):
        fs.cost.calibrate(threads=0)


def test_fixedsim_as_the_machine_fits_every_layer_and_pass():
    """The self model measures every (phase, layer, pass) a step has work in, and sums an
    epoch over the same keys (times are not asserted: they depend on the machine's load)."""
    from fixedsim.cost.selfmodel import _work, measure, predict_self

    model = fs.nn.mlp(in_shape=(1, 6, 6), hidden=(7,), classes=4)
    pol = Policy.fixed(16, 12)
    prof = measure(pol, model, (1, 6, 6), batches=(2, 4), classes=4, reps=1)
    keys = set(_work(count_step(model, pol, 2, (1, 6, 6))))
    keys |= set(_work(count_step(model, pol, 2, (1, 6, 6), training=False)))
    assert keys <= set(prof.fits)
    assert all(t0 >= 0 and s >= 0 for t0, s in prof.fits.values())
    p = predict_self(model, pol, 4, 10, (1, 6, 6), test_images=6, eval_batch=4, profile=prof)
    assert p["epoch_s"] == pytest.approx(p["train_s"] + p["eval_s"])
    assert p["epoch_s"] > 0 and {k[0] for k in p["rows"]} == {"train", "eval"}


def test_fixedsim_as_the_machine_measures_the_step_training_runs(monkeypatch):
    """The self model times the layers as training runs them: weights held in the policy's
    weights role (unrounded ones sent products of this model to the Ozaki path) and BLAS on
    one thread (a multi-threaded BLAS on busy cores made a LeNet step up to 100x slower); the
    caller's model keeps its weights."""
    from threadpoolctl import threadpool_info

    from fixedsim.cost import selfmodel

    model = fs.nn.mlp(in_shape=(1, 6, 6), hidden=(7,), classes=4)
    before = {n: p.value.copy() for n, p in model.named_parameters().items()}
    threads = []
    timed = selfmodel._timed_step

    def spy(*a, **kw):
        threads.extend(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
        return timed(*a, **kw)

    monkeypatch.setattr(selfmodel, "_timed_step", spy)
    with fs.counters.record() as c:
        selfmodel.measure(Policy.fixed(16, 12), model, (1, 6, 6), batches=(2, 4), classes=4,
                          reps=1)
    assert set(c.paths) == {"exact_blas"} and c.paths["exact_blas"] == c.calls
    assert threads and set(threads) == {1}
    for n, p in model.named_parameters().items():
        np.testing.assert_array_equal(p.value, before[n])


def test_instruction_model_fits_and_checks_callgrind_profiles(tmp_path):
    """analyse() reads callgrind dumps (the case name from the client request, the totals),
    fits i0 + i_mac MACs + i_out outputs per kernel on the fit cases and checks the others:
    profiles made exactly linear are predicted exactly; one off by 20% fails the check."""
    import json

    from fixedsim.cost.instructions import analyse, pmu_status

    cases, n = [], 0
    for kernel, (i0, imac, iout) in (("k1", (5e5, 3.0, 40.0)), ("k2", (7e5, 0.0, 11.0))):
        for role, shapes in (("fit", [(16, 16, 16), (16, 16, 64), (32, 32, 16)]),
                             ("predict", [(48, 48, 32)])):
            for M, N, K in shapes:
                macs = M * N * K if kernel == "k1" else 0
                outs = M * N if kernel == "k1" else M * N * K
                name = f"case{n}"
                n += 1
                cases.append({"case": name, "kernel": kernel, "role": role, "shape": [M, N, K],
                              "macs": macs, "outputs": outs, "paths": {kernel: 1}})
                total = round(i0 + imac * macs + iout * outs)
                (tmp_path / f"cg.1.{n}").write_text(
                    f"desc: Trigger: Client Request: {name}\nsummary: 0\ntotals: {total}\n")
    from fixedsim.cost import instructions

    kernels = instructions._KERNELS
    instructions._KERNELS = (("k1", "", ""), ("k2", "", ""))
    try:
        (tmp_path / "cases.json").write_text(json.dumps(cases))
        lines = []
        assert analyse(tmp_path, lines.append) == 0
        model = json.loads((tmp_path / "model.json").read_text())
        assert model[0]["i_mac"] == pytest.approx(3.0) and model[1]["i_out"] == pytest.approx(11)
        last = tmp_path / f"cg.1.{n}"
        total = int(last.read_text().split("totals: ")[1])
        last.write_text(last.read_text().replace(str(total), str(round(total * 1.2))))
        assert analyse(tmp_path, lines.append) == 1
    finally:
        instructions._KERNELS = kernels
    why = pmu_status()
    assert why is None or isinstance(why, str)
