"""Foundation: prepare / quantize / convert / report, layer rules, tracing fallbacks, errors, state_dict."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import quantkit
from quantkit.errors import (CalibrationDataError, ConfigError, NoQuantizableLayerError, UnknownSchemeError,
                             UnsupportedModelError)
from quantkit.nn.uniform import QuantConv2d, QuantLinear


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class Branchy(SmallCNN):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        if x.sum() > 0:
            x = torch.relu(self.conv2(x))
        else:
            x = -torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def batches(n=3, bs=4):
    return [torch.randn(bs, 1, 8, 8) for _ in range(n)]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_untouched(model, snap):
    sd, types = snap
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == sd.keys()
    for k in sd:
        assert torch.equal(now[k], sd[k]), k


def test_schemes_lists_builtin_with_descriptions():
    s = quantkit.schemes()
    for name in ("w8a8", "w4a4", "xnor"):
        assert name in s and len(s[name]) > 10


def test_quantize_small_cnn_w8a8_close_to_fp_and_input_untouched():
    model = SmallCNN().eval()
    snap = snapshot(model)
    q = quantkit.quantize(model, "w8a8", calib_data=batches(), progress=False)
    assert_untouched(model, snap)
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.fc, QuantLinear)
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)
    err = (q(x) - ref).abs().max() / ref.abs().max()
    assert err < 0.05
    rep = quantkit.report(q)
    assert rep.stage == "calibrated" and rep.trace_method == "fx"
    assert [r.name for r in rep.records] == ["conv1", "conv2", "conv3", "fc"]
    assert all(r.bits_w == 8 and r.bits_a == 8 for r in rep.records)
    assert rep.size_after() * 3.9 < rep.size_before()
    text = str(rep)
    assert "conv2" in text and "QuantConv2d" in text


def test_w4a4_is_coarser_than_w8a8():
    model = SmallCNN().eval()
    data = batches()
    x = torch.randn(8, 1, 8, 8)
    ref = model(x)
    e8 = (quantkit.quantize(model, "w8a8", data, progress=False)(x) - ref).pow(2).mean()
    e4 = (quantkit.quantize(model, "w4a4", data, progress=False)(x) - ref).pow(2).mean()
    assert e4 > 4 * e8


def test_convert_matches_simulated_and_state_dict_round_trips(tmp_path):
    model = SmallCNN().eval()
    q = quantkit.quantize(model, "w4a4", batches(), progress=False)
    d = quantkit.convert(q)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(d(x), q(x), rtol=1e-5, atol=1e-5)
    assert d.conv2.weight_int.dtype == torch.int8
    assert quantkit.report(d).stage == "deployed"
    # prepared and deploy state_dicts: plain tensors, weights_only loading
    for m, path in ((q, tmp_path / "q.pt"), (d, tmp_path / "d.pt")):
        torch.save(m.state_dict(), path)
        sd = torch.load(path, weights_only=True)
        fresh = quantkit.prepare(SmallCNN(), "w4a4")
        if m is d:  # an uncalibrated model does not convert: the skeleton comes from another calibration
            fresh = quantkit.convert(quantkit.calibrate(fresh, batches(), progress=False))
        fresh.load_state_dict(sd)
        fresh.eval()
        torch.testing.assert_close(fresh(x), m(x))


def test_float_checkpoint_loads_into_prepared_model():
    model = SmallCNN()
    q = quantkit.prepare(SmallCNN(), "w8a8")
    q.load_state_dict(model.state_dict())  # quantizer state is optional: initialises, does not error
    assert torch.equal(q.conv1.weight, model.conv1.weight)
    assert not bool(q.conv1.act_ready)


def test_inplace_modifies_only_on_success():
    model = SmallCNN().eval()
    out = quantkit.quantize(model, "w8a8", batches(), inplace=True, progress=False)
    assert out is model and isinstance(model.conv1, QuantConv2d)
    model2 = SmallCNN().eval()
    snap = snapshot(model2)
    with pytest.raises(CalibrationDataError):
        quantkit.quantize(model2, "w8a8", [torch.full((2, 1, 8, 8), float("nan"))], inplace=True, progress=False)
    assert_untouched(model2, snap)


def test_rule_precedence_name_over_regex_over_type():
    cfg = dict(rules={
        nn.Conv2d: {"bits_w": 6},                       # type
        "re:conv[23]": {"bits_w": 5},                   # regex beats type
        "conv3": {"bits_w": 4},                         # exact name beats regex
        re.compile("f."): None,                         # regex -> keep FP
    })
    q = quantkit.prepare(SmallCNN(), "w8a8", **cfg)
    rep = quantkit.report(q)
    assert rep["conv1"].bits_w == 6 and "type Conv2d" in rep["conv1"].rule
    assert rep["conv2"].bits_w == 5 and "regex" in rep["conv2"].rule
    assert rep["conv3"].bits_w == 4 and "name" in rep["conv3"].rule
    assert not rep["fc"].quantized and "regex" in rep["fc"].kept_fp_reason
    assert isinstance(q.fc, nn.Linear) and not isinstance(q.fc, QuantLinear)


def test_skip_only_and_first_last_defaults():
    rep = quantkit.report(quantkit.prepare(SmallCNN(), "w8a8", skip=["conv2"]))
    assert [r.name for r in rep.kept_fp] == ["conv2"]
    rep = quantkit.report(quantkit.prepare(SmallCNN(), "w8a8", only=[nn.Linear]))
    assert [r.name for r in rep.quantized] == ["fc"]
    rep = quantkit.report(quantkit.prepare(SmallCNN(), "xnor"))  # binary: first and last stay FP
    assert [r.name for r in rep.kept_fp] == ["conv1", "fc"]
    assert "first layer" in rep["conv1"].kept_fp_reason and "last layer" in rep["fc"].kept_fp_reason
    rep = quantkit.report(quantkit.prepare(SmallCNN(), "xnor", rules={"conv1": {}}))
    assert rep["conv1"].quantized


def test_untraceable_model_uses_fallback_and_says_so():
    model = Branchy().eval()
    q = quantkit.quantize(model, "w8a8", batches(), example_inputs=(torch.randn(1, 1, 8, 8),), progress=False)
    rep = quantkit.report(q)
    assert rep.trace_method == "hooks" and "torch.fx could not trace" in rep.trace_note
    assert [r.name for r in rep.quantized] == ["conv1", "conv2", "conv3", "fc"]
    rep2 = quantkit.report(quantkit.prepare(Branchy(), "xnor"))  # no example inputs: module tree order
    assert rep2.trace_method == "module_tree"
    assert [r.name for r in rep2.kept_fp] == ["conv1", "fc"]


def test_calibration_batch_forms():
    model = SmallCNN().eval()
    xs = batches(2)
    ref = quantkit.quantize(model, "w8a8", xs, progress=False)
    x = torch.randn(2, 1, 8, 8)
    variants = [
        [(b, torch.zeros(4)) for b in xs],                                       # (input, target) pairs
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(xs)), batch_size=4),
        [{"x": b} for b in xs],                                                  # dicts -> kwargs
    ]
    for data in variants:
        q = quantkit.quantize(model, "w8a8", data, progress=False)
        torch.testing.assert_close(q(x), ref(x))
    q = quantkit.quantize(model, "w8a8", [{"img": b} for b in xs], transform_fn=lambda b: b["img"], progress=False)
    torch.testing.assert_close(q(x), ref(x))
    q = quantkit.quantize(model, "w8a8", lambda m: [m(b) for b in xs], progress=False)
    torch.testing.assert_close(q(x), ref(x))


@pytest.mark.parametrize("data, match", [
    ([], "empty"),
    ([torch.randn(2, 1, 8, 8), torch.full((2, 1, 8, 8), float("inf"))], r"batch 1.*NaN/Inf"),
    ([torch.randn(2, 3, 8, 8)], r"batch 0 with input shape\(s\) \(2, 3, 8, 8\) does not fit"),
    (42, "neither iterable nor callable"),
])
def test_bad_calibration_data(data, match):
    model = SmallCNN().eval()
    snap = snapshot(model)
    with pytest.raises(CalibrationDataError, match=match):
        quantkit.quantize(model, "w8a8", data, progress=False)
    assert_untouched(model, snap)


def test_config_errors():
    with pytest.raises(UnknownSchemeError, match=r"unknown scheme 'w3a3'; known schemes: .*w8a8"):
        quantkit.quantize(SmallCNN(), "w3a3", batches())
    with pytest.raises(ConfigError, match=r"bits_w=9 is out of range; use an integer from 2 to 8"):
        quantkit.prepare(SmallCNN(), "w8a8", bits_w=9)
    with pytest.raises(ConfigError, match=r"has no option\(s\) \['bitz'\]"):
        quantkit.prepare(SmallCNN(), "w8a8", bitz=4)
    with pytest.raises(ConfigError, match="not a shape"):
        quantkit.prepare(SmallCNN(), "w8a8", example_inputs=(1, 1, 8, 8))
    with pytest.raises(NoQuantizableLayerError, match="no candidate layer"):
        quantkit.prepare(nn.Sequential(nn.ReLU(), nn.Flatten()), "w8a8")
    with pytest.raises(NoQuantizableLayerError, match="left every candidate layer"):
        quantkit.prepare(SmallCNN(), "w8a8", skip=["conv1", "conv2", "conv3", "fc"])
    with pytest.raises(UnsupportedModelError, match="already prepared"):
        quantkit.prepare(quantkit.prepare(SmallCNN(), "w8a8"), "w8a8")
    with pytest.raises(UnsupportedModelError, match="not prepared by quantkit"):
        quantkit.convert(SmallCNN())


@pytest.mark.parametrize("rules, needles", [
    (dict(skip=["conv4"]), ["'conv4'", "matches no layer", "'conv1'"]),             # a typo: the close matches
    (dict(only=["convv2"]), ["only entry 'convv2'", "'conv2'"]),
    (dict(rules={"re:layer[0-9]": None}), ["regex 'layer[0-9]' matches no layer"]),
    (dict(rules={"conv2.weight": {"bits_w": 4}}), ["names a parameter", "'conv2'"]),
    (dict(skip=["re:["]), ["'re:['", "not a valid regular expression", "re.escape"]),
    (dict(only=["re:conv(1"]), ["not a valid regular expression"]),
])
def test_rules_that_match_nothing_are_errors(rules, needles):
    model = SmallCNN()
    snap = snapshot(model)
    with pytest.raises(ConfigError) as exc:
        quantkit.prepare(model, "w8a8", **rules)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)
    assert_untouched(model, snap)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.blocks = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1))

    def forward(self, x):
        return self.blocks(self.stem(x))


def test_rule_naming_a_module_the_scheme_does_not_rewrite():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))
    with pytest.raises(ConfigError, match=r"'1' names a layer that scheme 'w8a8' does not consider.*Conv2d, Linear"):
        quantkit.prepare(model, "w8a8", skip=["1"])
    with pytest.raises(ConfigError, match=r"'blocks' names a block.*'re:blocks\[\.\]\.\*'.*'blocks\.0'"):
        quantkit.prepare(_Blocks(), "w8a8", skip=["blocks"])
    rep = quantkit.report(quantkit.prepare(_Blocks(), "w8a8", skip=["re:blocks[.].*"]))
    assert [r.name for r in rep.kept_fp] == ["blocks.0", "blocks.1"]
    # rules that do match, and type rules (generic: a type need not occur), are fine
    rep = quantkit.report(quantkit.prepare(model, "w8a8", skip=["0"], only=[nn.Linear, nn.Conv1d]))
    assert [r.name for r in rep.quantized] == ["4"]


@pytest.mark.parametrize("override, needles", [
    (dict(bits_w="abc"), ["bits_w='abc' must be of type int"]),
    (dict(percentile=None), ["percentile=None", "float"]),
    (dict(observer=3), ["observer=3", "str"]),
    (dict(keep_first="yes"), ["keep_first='yes'", "bool"]),
])
def test_option_of_the_wrong_type_is_a_config_error(override, needles):
    with pytest.raises(ConfigError) as exc:
        quantkit.prepare(SmallCNN(), "w8a8", **override)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_family_member_with_bad_bits_is_named_as_requested():
    with pytest.raises(ConfigError) as exc:
        quantkit.get_scheme("adder_ptq4", bits=1)
    assert "scheme 'adder_ptq4': bits=1 is out of range" in str(exc.value) and "adder_ptq1" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"scheme 'adder_ptq4': bits='abc' must be an integer"):
        quantkit.get_scheme("adder_ptq4", bits="abc")
    assert quantkit.get_scheme("adder_ptq4", bits=3).name == "adder_ptq3"  # a valid override still renames


def test_meta_device_calibration_data_is_a_calibration_error():
    with pytest.raises(CalibrationDataError, match="meta device"):
        quantkit.quantize(SmallCNN(), "w8a8", [torch.empty(2, 1, 8, 8, device="meta")], progress=False)


class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ptq_returns_an_eval_model_and_keeps_the_input_mode(mode):
    model = BNDropNet().train(mode == "train")
    q = quantkit.quantize(model, "w8a8", batches(), progress=False)
    assert not any(m.training for m in q.modules())  # an inference model: deterministic, running BN statistics
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(q(x), q(x))
    assert all(m.training == (mode == "train") for m in model.modules())  # the input keeps its mode
    p = quantkit.prepare(model, "w8a8")  # prepare keeps the input's mode (QAT trains it)
    assert all(m.training == (mode == "train") for m in p.modules())
    quantkit.calibrate(p, batches(), progress=False)
    assert not p.training and not p.bn.training
    assert not quantkit.convert(q).training


def test_failed_calibration_restores_every_module_mode():
    p = quantkit.prepare(BNDropNet().train(), "w8a8")
    p.drop.eval()  # a mixed mode is restored as it was
    with pytest.raises(CalibrationDataError):
        quantkit.calibrate(p, [torch.randn(2, 3, 8, 8)], progress=False)
    assert p.training and p.bn.training and not p.drop.training


def test_report_table_shows_whole_reasons():
    rep = quantkit.report(quantkit.prepare(SmallCNN(), "xnor"))
    lines = rep.table().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    column = lines[start + 1].split("  ")[5]  # the dashes under "rule / kept-FP reason"
    col0 = lines[start + 1].index(column)
    for r in rep.kept_fp:
        assert len(r.kept_fp_reason) > len(column)  # the reasons here are longer than the column
        row = next(i for i, line in enumerate(lines) if line.startswith(r.name + " "))
        pieces = [lines[row][col0:col0 + len(column)].strip()]
        for line in lines[row + 1:]:
            if line[:col0].strip():
                break  # the next layer's row
            pieces.append(line[col0:col0 + len(column)].strip())
        assert " ".join(p for p in pieces if p) == r.kept_fp_reason
    assert "..." not in rep.table()


@pytest.mark.parametrize("name, size", [("resnet18", 64), ("mobilenet_v2", 64), ("swin_t", 64), ("vit_b_16", 224)])
def test_torchvision_models_quantize(name, size):
    model = getattr(torchvision.models, name)().eval()
    x = torch.randn(1, 3, size, size)
    q = quantkit.quantize(model, "w8a8", [x], progress=False)
    rep = quantkit.report(q)
    convs_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    mhas = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]  # their in_proj_weight
    assert sorted(r.name for r in rep.records) == sorted(convs_linears + mhas)  # every conv/linear/MHA has a fate
    for r in rep.kept_fp:  # only the attention projections, which the attention modules use functionally
        assert re.search(r"(MultiheadAttention|ShiftedWindowAttention|in_proj)", r.kept_fp_reason), r
        assert r.name.endswith(("out_proj", "qkv", "proj")) or r.name in mhas
    assert q(x).shape == model(x).shape
