"""fixedsim.nn.Policy: presets, plain-data round trips (dict, JSON, TOML), parsing, errors; and
fixedsim.formats.parse_format as the inverse of ``repr`` of a format."""

from __future__ import annotations

import json
import math
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fixedsim as fs
from fixedsim import nn
from fixedsim import testing as fst
from fixedsim.formats import (
    BF16,
    FP8_E4M3,
    FP8_E5M2,
    FP16,
    FP32,
    FP64,
    TF32,
    FixedFormat,
    FloatFormat,
    parse_format,
)
from fixedsim.matmul import Accumulator, MatmulSpec
from fixedsim.rounding import Overflow, Rounding

RNE = Rounding.NEAREST_EVEN
SR = Rounding.STOCHASTIC
FP32_CHAIN = MatmulSpec(accumulator=Accumulator(FP32))


# -- presets ----------------------------------------------------------------------------------
def test_exact_preset():
    p = nn.Policy.exact()
    assert p.name == "exact"
    for r in nn.ROLES:
        assert getattr(p, r) == nn.Role() and getattr(p, r).fmt is None
        assert not getattr(p, r).stochastic
    for s in nn.PRODUCTS:
        assert getattr(p, s) == MatmulSpec()
        assert getattr(p, s).result_format == FP64
    assert p.loss_scale is None


def test_float32_preset():
    """float32 is exact accumulation with one nearest-even rounding into FP32 per output."""
    p = nn.Policy.float32()
    assert p.name == "float32"
    for r in nn.ROLES:
        assert getattr(p, r) == nn.Role(FP32, RNE)
    for s in nn.PRODUCTS:
        spec = getattr(p, s)
        assert spec == MatmulSpec(output=FP32)
        assert spec.accumulator is None and spec.output_rounding is RNE
    assert p.loss_scale is None


def test_float32_fma_chain_preset():
    p = nn.Policy.float32("fma_chain")
    assert p.name == "float32_fma_chain"
    for r in nn.ROLES:
        assert getattr(p, r) == nn.Role(FP32, RNE)
    for s in nn.PRODUCTS:
        spec = getattr(p, s)
        assert spec == FP32_CHAIN
        assert spec.accumulator.block == 1 and spec.accumulator.overflow is Overflow.INFINITY
        assert spec.input is None and spec.product is None and spec.output is None
    with pytest.raises(ValueError, match="'exact' or 'fma_chain'"):
        nn.Policy.float32("pairwise")


@pytest.mark.parametrize("args,rounding", [((), SR), ((16, 14, "nearest_even"), RNE),
                                           ((8, 4, Rounding.TOWARD_ZERO), Rounding.TOWARD_ZERO)])
def test_fixed_preset(args, rounding):
    p = nn.Policy.fixed(*args)
    wl, fl = args[:2] if args else (16, 14)
    fmt = FixedFormat(wl, fl)
    assert p.name == f"fixed<{wl},{fl}>:{rounding.name.lower()}"
    for r in ("weights", "activations", "errors", "weight_grads", "momentum"):
        assert getattr(p, r) == nn.Role(fmt, rounding), r
    # the step reaches the weights in the weights' single rounding
    assert p.update == nn.Role()
    for s in nn.PRODUCTS:  # Gupta et al.'s wide accumulators: exact products and sums
        assert getattr(p, s) == MatmulSpec()
    assert p.loss_scale is None
    assert p.weights.stochastic == (rounding is SR)
    assert "Gupta" in p.master_note


def test_fp16_mixed_preset():
    p = nn.Policy.fp16_mixed()
    assert p.name == "fp16_mixed"
    assert p.weights == nn.Role(FP32) and p.momentum == nn.Role(FP32)
    for r in ("activations", "errors", "weight_grads"):
        assert getattr(p, r) == nn.Role(FP16)
    assert p.update == nn.Role()
    assert p.forward == MatmulSpec(input=FP16, accumulator=Accumulator(FP32))
    assert p.grad_input == FP32_CHAIN and p.grad_weight == FP32_CHAIN
    assert p.loss_scale == nn.LossScale(65536.0, True, 2.0, 0.5, 2000)
    assert nn.Policy.fp16_mixed(128).loss_scale == nn.LossScale(128.0, dynamic=False)
    assert nn.Policy.fp16_mixed(None).loss_scale is None
    ls = nn.LossScale(1024.0, growth_interval=10)
    assert nn.Policy.fp16_mixed(ls).loss_scale is ls
    with pytest.raises(ValueError, match="loss_scale must be"):
        nn.Policy.fp16_mixed("static")


def test_bf16_preset():
    p = nn.Policy.bf16()
    assert p.name == "bf16"
    assert p.weights == nn.Role(FP32) and p.momentum == nn.Role(FP32)
    for r in ("activations", "errors", "weight_grads"):
        assert getattr(p, r) == nn.Role(BF16)
    assert p.forward == MatmulSpec(input=BF16, accumulator=Accumulator(FP32))
    assert p.grad_input == FP32_CHAIN and p.grad_weight == FP32_CHAIN
    assert p.loss_scale is None


def test_fp8_preset():
    p = nn.Policy.fp8()
    assert p.name == "fp8"
    assert p.weights == nn.Role(FP32) and p.weight_grads == nn.Role(FP32)
    assert p.momentum == nn.Role(FP32)
    assert p.activations == nn.Role(FP8_E4M3) and p.errors == nn.Role(FP8_E5M2)
    assert p.forward == MatmulSpec(input=FP8_E4M3, accumulator=Accumulator(FP32))
    assert p.grad_input == FP32_CHAIN and p.grad_weight == FP32_CHAIN
    assert p.loss_scale == nn.LossScale()
    assert nn.Policy.fp8(loss_scale=None).loss_scale is None


PRESETS = [nn.Policy.exact(), nn.Policy.float32(), nn.Policy.fixed(),
           nn.Policy.fixed(12, 10, "nearest_even"), nn.Policy.fp16_mixed(),
           nn.Policy.fp16_mixed(256.0), nn.Policy.bf16(), nn.Policy.fp8()]


def test_describe_lists_every_role_and_product():
    text = nn.Policy.fp16_mixed().describe()
    for key in (*nn.ROLES, *nn.PRODUCTS, "loss_scale", "'fp16_mixed'", "FP16"):
        assert key in text


# -- strategies ---------------------------------------------------------------------------------
def _random_bits(rounding):
    return st.none() | st.integers(1, 64) if rounding is SR else st.none()


@st.composite
def roles(draw):
    if draw(st.integers(0, 4)) == 0:
        return nn.Role()
    fmt = draw(fst.formats())
    rounding = draw(fst.roundings())
    overflow = draw(st.none() | fst.overflows(fmt))
    return nn.Role(fmt, rounding, overflow, draw(_random_bits(rounding)))


@st.composite
def accumulators(draw):
    fmt = draw(fst.formats())
    rounding = draw(fst.roundings())
    return Accumulator(fmt, rounding, draw(st.none() | fst.overflows(fmt)),
                       draw(st.integers(1, 64)), random_bits=draw(_random_bits(rounding)),
                       via=draw(st.none() | fst.float_formats()))


@st.composite
def specs(draw):
    maybe = st.none() | fst.formats()
    inp, prod, out = draw(maybe), draw(maybe), draw(maybe)
    acc = draw(st.none() | accumulators())
    kw = {}
    if inp is not None:
        kw["input_rounding"] = draw(fst.roundings())
    if prod is not None:
        kw["product_rounding"] = draw(fst.roundings())
    if out is not None or acc is None:
        kw["output_rounding"] = draw(fst.roundings())
    spec = MatmulSpec(input=inp, product=prod, accumulator=acc, output=out, **kw)
    if SR in spec._stage_roundings() and draw(st.booleans()):
        spec = MatmulSpec(input=inp, product=prod, accumulator=acc, output=out, **kw,
                          random_bits=draw(st.integers(1, 64)))
    return spec


loss_scales = st.builds(
    nn.LossScale,
    init=st.floats(1e-30, 1e30) | st.sampled_from([1.0, 2.0 ** 16, 2.0 ** -3]),
    dynamic=st.booleans(), growth=st.floats(1.0, 16.0), backoff=st.floats(0.01, 1.0),
    growth_interval=st.integers(1, 10 ** 6))


@st.composite
def policies(draw):
    kw = {r: draw(roles()) for r in nn.ROLES}
    kw.update({p: draw(specs()) for p in nn.PRODUCTS})
    name = draw(st.text(min_size=1, max_size=12) | st.sampled_from(["custom", "fp16"]))
    return nn.Policy(name=name, loss_scale=draw(st.none() | loss_scales), **kw)


# -- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("p", PRESETS, ids=lambda p: p.name)
def test_preset_round_trips(p, tmp_path):
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain data
    assert nn.Policy.from_dict(d) == p
    for suffix in (".json", ".toml"):
        path = tmp_path / f"policy{suffix}"
        p.save(path)
        assert nn.Policy.load(path) == p
        assert nn.Policy.parse(str(path)) == p
        assert nn.Policy.load(str(path)) == p


def _hardware_presets():
    from fixedsim import hardware
    return hardware.devices()


@pytest.mark.parametrize("preset", _hardware_presets(),
                         ids=lambda q: f"{q.device}-{q.input}-{q.out}")
def test_hardware_spec_round_trips(preset, tmp_path):
    """Every matrix-unit preset (BlockFMA; Accumulator lanes, order, combine, addend; formats
    without subnormals) survives a policy's dict, JSON and TOML."""
    spec = preset.build()
    p = nn.Policy(name="unit", forward=spec, grad_input=spec, grad_weight=spec)
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert nn.Policy.from_dict(d) == p
    for suffix in (".json", ".toml"):
        p.save(tmp_path / f"p{suffix}")
        assert nn.Policy.load(tmp_path / f"p{suffix}") == p


def test_accumulator_structure_keys_checked():
    bad = {"forward": {"accumulator": {"format": "FP32", "block": 4, "lanes": 8}}}
    with pytest.raises(ValueError, match="lanes must be in 1..block"):
        nn.Policy.from_dict(bad)
    bad = {"forward": {"accumulator": {"format": "FP32", "block": 4, "addend": "middle"}}}
    with pytest.raises(ValueError, match="addend"):
        nn.Policy.from_dict(bad)


@given(policies())
def test_dict_round_trip(p):
    d = p.to_dict()
    assert json.loads(json.dumps(d)) == d
    q = nn.Policy.from_dict(d)
    assert q == p
    assert q.to_dict() == d
    for r in nn.ROLES:
        assert nn.Role.from_dict(getattr(p, r).to_dict()) == getattr(p, r)


@given(policies())
def test_file_round_trip(p):
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".json", ".toml"):
            path = pathlib.Path(tmp) / f"p{suffix}"
            p.save(path)
            assert nn.Policy.load(path) == p, path.read_text()


@pytest.mark.parametrize("name", ['quote " and \\ backslash', "é ü", "emoji 😀", "tab\tnl\n",
                                  "del \x7f", "[table]"])
def test_toml_names_with_special_characters(name, tmp_path):
    p = nn.Policy(name=name)
    p.save(tmp_path / "p.toml")
    assert nn.Policy.load(tmp_path / "p.toml").name == name


def test_policy_table_wrapper_and_partial_files(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('[policy]\nname = "mine"\n\n[policy.errors]\nformat = "FP16"\n')
    p = nn.Policy.load(f)
    assert p.name == "mine" and p.errors == nn.Role(FP16)
    assert p.weights == nn.Role() and p.forward == MatmulSpec()
    f.write_text('name = "acc"\n[forward]\naccumulator = "FP32"\ninput = "bf16"\n'
                 '[grad_weight.accumulator]\nformat = "Q<32,20>"\nrounding = "toward_zero"\n'
                 'overflow = "wrap"\nblock = 4\n')
    p = nn.Policy.load(f)
    assert p.forward == MatmulSpec(input=BF16, accumulator=FP32)
    assert p.grad_weight == MatmulSpec(accumulator=Accumulator(FixedFormat(32, 20),
                                                               "toward_zero", "wrap", 4))
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"policy": {"weights": {"format": "E4M3fn",
                                                    "rounding": "stochastic",
                                                    "random_bits": 8}}}))
    assert nn.Policy.load(j).weights == nn.Role(FP8_E4M3, SR, random_bits=8)


# -- parse ------------------------------------------------------------------------------------
def test_parse_names(tmp_path):
    assert nn.Policy.parse("float32") == nn.Policy.float32()
    assert nn.Policy.parse("fp32") == nn.Policy.float32()
    assert nn.Policy.parse("float32:fma_chain") == nn.Policy.float32("fma_chain")
    for empty in ("", "  "):
        with pytest.raises(ValueError, match="policy is empty"):
            nn.Policy.parse(empty)
    assert nn.Policy.parse("float32_fma_chain") == nn.Policy.float32("fma_chain")
    assert nn.Policy.parse("fp16") == nn.Policy.fp16_mixed()
    assert nn.Policy.parse("fp16_mixed") == nn.Policy.fp16_mixed()
    assert nn.Policy.parse("bf16") == nn.Policy.bf16()
    assert nn.Policy.parse(" FP8 ") == nn.Policy.fp8()
    assert nn.Policy.parse("exact") == nn.Policy.exact()
    assert nn.Policy.parse("fixed:16:14") == nn.Policy.fixed(16, 14, "stochastic")
    assert nn.Policy.parse("fixed:16:14:nearest_even") == nn.Policy.fixed(16, 14,
                                                                          "nearest_even")
    assert nn.Policy.parse("FIXED:8:6:TOWARD_ZERO").weights == nn.Role("Q<8,6>", "toward_zero")
    path = tmp_path / "mine.toml"
    nn.Policy.bf16().save(path)
    assert nn.Policy.parse(str(path)) == nn.Policy.bf16()
    # a file without a policy suffix is read as JSON
    other = tmp_path / "mine.policy"
    nn.Policy.fp8().save(other)
    assert nn.Policy.parse(str(other)) == nn.Policy.fp8()


@pytest.mark.parametrize("text,match", [
    ("float16", "unknown policy 'float16'"),
    ("fixed:16", r"expected fixed:WORD_LENGTH:FRAC_LENGTH\[:ROUNDING\]"),
    ("fixed:16:14:nearest:x", "expected fixed:WORD_LENGTH"),
    ("fixed:a:14", "must be integers"),
    ("fixed:16:14:nearest", "'fixed:16:14:nearest'.*nearest"),
    ("fixed:0:0", "'fixed:0:0'"),
    ("missing.toml", "policy file missing.toml"),
])
def test_parse_errors(text, match, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        nn.Policy.parse(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="policy must be a string"):
        nn.Policy.parse(16)


# -- errors -------------------------------------------------------------------------------------
def _load_error(tmp_path, text, suffix=".toml"):
    f = tmp_path / f"bad{suffix}"
    f.write_text(text)
    with pytest.raises(ValueError) as info:
        nn.Policy.load(f)
    msg = str(info.value)
    assert str(f) in msg, msg  # every load error names the file
    return msg


def test_unknown_keys_name_the_key_and_the_file(tmp_path):
    msg = _load_error(tmp_path, 'name = "x"\nweigths = {}\n')
    assert "'weigths'" in msg and "unknown key" in msg
    msg = _load_error(tmp_path, '[errors]\nformat = "FP16"\nround = "nearest_even"\n')
    assert "errors" in msg and "'round'" in msg
    msg = _load_error(tmp_path, '[forward]\nseed = 3\n')
    assert "forward" in msg and "'seed'" in msg
    msg = _load_error(tmp_path, '[forward.accumulator]\nformat = "FP32"\nblocks = 2\n')
    assert "forward.accumulator" in msg and "'blocks'" in msg
    msg = _load_error(tmp_path, '[loss_scale]\ninitial = 8.0\n')
    assert "loss_scale" in msg and "'initial'" in msg
    msg = _load_error(tmp_path, json.dumps({"momentum": {"fmt": "FP32"}}), ".json")
    assert "momentum" in msg and "'fmt'" in msg


@pytest.mark.parametrize("text,where", [
    ('weights = "FP16"\n', "weights"),                                # a string, not a table
    ('[weights]\nformat = 16\n', "weights"),                          # a number, not a format
    ('[weights]\nformat = "FP16"\nrounding = 3\n', "weights"),
    ('[errors]\nformat = "Q<8,4>"\nrounding = "stochastic"\nrandom_bits = "8"\n', "errors"),
    ('[forward]\ninput = 16\n', "forward.input"),
    ('[forward]\naccumulator = 32\n', "forward.accumulator"),
    ('[forward.accumulator]\nformat = "FP32"\nblock = "4"\n', "forward.accumulator"),
    ('[forward.accumulator]\nformat = "FP32"\nvia = 32\n', "forward.accumulator"),
    ('[forward.accumulator]\nformat = 32\n', "forward.accumulator"),
    ('[forward.accumulator]\nrounding = "toward_zero"\n', "forward.accumulator"),
    ('[loss_scale]\ndynamic = "yes"\n', "loss_scale"),
    ('[loss_scale]\ninit = -1.0\n', "loss_scale"),
    ('[loss_scale]\ngrowth_interval = 2.5\n', "loss_scale"),
    ('name = 3\n', ""),
    ('name = ""\n', ""),
])
def test_wrong_types_are_value_errors_naming_the_key(tmp_path, text, where):
    msg = _load_error(tmp_path, text)
    assert f"{tmp_path / 'bad.toml'}{'.' if where else ''}{where}" in msg, msg


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"fp16"', "null"])
def test_json_that_is_not_a_table(tmp_path, text):
    msg = _load_error(tmp_path, text, ".json")
    assert "expected a table" in msg


def test_syntax_errors_name_the_file(tmp_path):
    assert "not valid toml" in _load_error(tmp_path, "name = \n")
    assert "not valid json" in _load_error(tmp_path, "{name: 1}", ".json")


@pytest.mark.parametrize("fmt", ["Q<16>", "FP17", "E0M3", "Q<8,4>-ftz", "float"])
def test_bad_format_strings(fmt, tmp_path):
    with pytest.raises(ValueError, match="format"):
        nn.Role(fmt)
    msg = _load_error(tmp_path, f'[activations]\nformat = "{fmt}"\n')
    assert "activations" in msg
    msg = _load_error(tmp_path, f'[grad_input]\noutput = "{fmt}"\n')
    assert "grad_input.output" in msg


def test_bad_rounding_names(tmp_path):
    with pytest.raises(ValueError, match="nearest"):
        nn.Role("FP16", "nearest")
    msg = _load_error(tmp_path, '[weights]\nformat = "FP16"\nrounding = "round_half_up"\n')
    assert "weights" in msg and "round_half_up" in msg
    msg = _load_error(tmp_path, '[forward]\ninput = "FP16"\ninput_rounding = "sr"\n')
    assert "forward" in msg and "'sr'" in msg
    with pytest.raises(ValueError, match="Policy.fixed rounding"):
        nn.Policy.fixed(16, 14, "banker")
    with pytest.raises(ValueError, match="overflow"):
        nn.Role("FP16", overflow="clip")


def test_spec_with_a_seed_is_rejected():
    for p in nn.PRODUCTS:
        with pytest.raises(ValueError, match=f"Policy {p}: the spec's seed must be None"):
            nn.Policy(**{p: MatmulSpec(seed=1)})


def test_role_validation():
    with pytest.raises(ValueError, match="without a format"):
        nn.Role(None, "stochastic")
    with pytest.raises(ValueError, match="without a format"):
        nn.Role(None, overflow="saturate")
    with pytest.raises(ValueError, match="without a format"):
        nn.Role(random_bits=8)
    assert nn.Role(None, "nearest_even") == nn.Role()
    with pytest.raises(ValueError, match="STOCHASTIC rounding only"):
        nn.Role("FP16", "nearest_even", random_bits=8)
    with pytest.raises(ValueError):
        nn.Role("FP16", overflow="wrap")  # WRAP is for fixed point
    with pytest.raises(ValueError):
        nn.Role("Q<8,4>", "stochastic", random_bits=0)
    with pytest.raises(ValueError, match="weights: .*without a format"):
        nn.Policy.from_dict({"weights": {"rounding": "stochastic"}})
    # Role.apply and the role's repr
    r = nn.Role("Q<8,4>", "stochastic", "wrap", random_bits=8)
    assert repr(r) == "Role(Q<8,4>, STOCHASTIC, WRAP, random_bits=8)"
    assert r.stochastic and not nn.Role("FP16").stochastic
    x = np.array([0.1, 9.0])
    expect = fs.quantize(x, FixedFormat(8, 4), "stochastic", "wrap", seed=3, random_bits=8)
    np.testing.assert_array_equal(r.apply(x, seed=3), expect)
    out, qs = nn.Role().apply(x, stats=True)
    assert out is x and qs is None


def test_policy_field_validation():
    with pytest.raises(ValueError, match="non-empty string"):
        nn.Policy(name="")
    with pytest.raises(TypeError, match="Policy weights must be a fixedsim.nn.Role"):
        nn.Policy(weights="FP16")
    with pytest.raises(TypeError, match="Policy forward must be a fixedsim.MatmulSpec"):
        nn.Policy(forward=FP32)
    with pytest.raises(TypeError, match="loss_scale must be a LossScale"):
        nn.Policy(loss_scale=1024.0)
    with pytest.raises(ValueError, match="policy: unknown key"):
        nn.Policy.from_dict({"seed": 1})


@pytest.mark.parametrize("kw,match", [
    ({"init": 0.0}, "init must be a positive finite"),
    ({"init": -2.0}, "init must be a positive finite"),
    ({"init": math.inf}, "init must be a positive finite"),
    ({"init": math.nan}, "init must be a positive finite"),
    ({"init": "8"}, "init must be a positive finite"),
    ({"init": True}, "init must be a positive finite"),
    ({"growth": 0.0}, "growth must be"),
    ({"growth": math.inf}, "growth must be"),
    ({"backoff": 0.0}, r"backoff must be in \(0, 1\]"),
    ({"backoff": 1.5}, r"backoff must be in \(0, 1\]"),
    ({"growth_interval": 0}, "growth_interval must be an int >= 1"),
    ({"growth_interval": 2.0}, "growth_interval must be an int >= 1"),
    ({"growth_interval": True}, "growth_interval must be an int >= 1"),
])
def test_loss_scale_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        nn.LossScale(**kw)


def test_loss_scale_values():
    with pytest.raises(TypeError, match="dynamic must be a bool"):
        nn.LossScale(dynamic=1)
    ls = nn.LossScale(init=1024)
    assert ls.init == 1024.0 and isinstance(ls.init, float)
    assert nn.LossScale(backoff=1.0).backoff == 1.0
    assert nn.LossScale.from_dict(ls.to_dict()) == ls
    with pytest.raises(ValueError, match="loss_scale: unknown key"):
        nn.LossScale.from_dict({"scale": 2.0})
    with pytest.raises(ValueError, match="loss_scale: LossScale dynamic"):
        nn.LossScale.from_dict({"dynamic": "no"})


# -- parse_format -------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [FP64, FP32, TF32, FP16, BF16, FP8_E5M2, FP8_E4M3,
                                 FixedFormat(16, 14), FixedFormat(8, 8, signed=False)])
def test_parse_format_presets(fmt):
    assert parse_format(repr(fmt)) == fmt
    assert parse_format(repr(fmt).lower()) == fmt
    assert parse_format(fmt) is fmt
    if isinstance(fmt, FloatFormat):
        ftz = FloatFormat(fmt.exp_bits, fmt.man_bits, subnormals=False, inf_nan=fmt.inf_nan)
        assert parse_format(repr(ftz)) == ftz


@given(fst.formats())
def test_parse_format_round_trips_repr(fmt):
    assert parse_format(repr(fmt)) == fmt
    assert parse_format(f"  {repr(fmt).lower()} ") == fmt


@given(fst.float_formats(max_exp_bits=11, max_man_bits=52))
def test_parse_format_round_trips_wide_floats(fmt):
    assert parse_format(repr(fmt)) == fmt


@given(fst.fixed_formats())
def test_parse_format_round_trips_fixed(fmt):
    assert parse_format(repr(fmt)) == fmt
    assert parse_format(str(fmt)) == fmt


@pytest.mark.parametrize("text", ["Q<16>", "Q16.14", "FP17", "E4", "E4M3fnx", "Q<8,4>-ftz",
                                  "UQ<0,0>", "", "float"])
def test_parse_format_errors(text):
    with pytest.raises(ValueError, match="format"):
        parse_format(text)


def test_parse_format_type_error():
    with pytest.raises(TypeError, match="a format must be"):
        parse_format(16)
