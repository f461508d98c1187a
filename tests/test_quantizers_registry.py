"""Registered quantizer objects and the generic layers: a new binarizer (ReActNet's RSign) is one registered
quantizer, used by the existing layers and schemes, simulated == deploy after convert."""
import dataclasses
import json
import re

import pytest
import torch
from torch import nn

import quantkit
from quantkit.errors import ConfigError
from quantkit.nn.binary_deploy import BinaryDeployConv2d, BinaryDeployLinear
from quantkit.nn.layers import QuantConv2d, QuantLinear
from quantkit.nn.xnor import XnorLinear
from quantkit.quantizers import get_quantizer, list_quantizers
from quantkit.quantizers.rsign import RSign, rsign
from quantkit.schemes.base import SchemeConfig


def test_registry_names_and_kinds():
    assert {"sign_ste", "xnor_weight", "adabin_weight", "adabin_act", "pws", "bivit_sign", "uniform_weight",
            "uniform_act", "rsign"} <= set(list_quantizers())
    assert get_quantizer("rsign") is RSign
    with pytest.raises(ConfigError, match="unknown quantizer 'nope'"):
        get_quantizer("nope")
    with pytest.raises(ConfigError, match="quantizes inputs, not weights"):
        get_quantizer("rsign", "weight")


def _with_threshold(layer, values):
    with torch.no_grad():
        layer.input_quantizer.learned_threshold.copy_(values.view_as(layer.input_quantizer.learned_threshold))
    return layer


def test_rsign_conv_simulated_equals_deploy_and_threshold_learns():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=1, stride=2)
    sim = QuantConv2d.from_float(conv, None, "c", input_quantizer="rsign", weight_quantizer="xnor_weight")
    _with_threshold(sim, torch.linspace(-0.5, 0.5, 6))
    x = torch.randn(2, 6, 9, 9)
    y = sim(x)
    y.square().sum().backward()
    grad = sim.input_quantizer.learned_threshold.grad
    assert grad is not None and grad.shape == (6, 1, 1) and bool((grad != 0).all())
    # the threshold gradient is -sum of the input gradient of sign(x - t) inside the STE window
    xs = x.clone().requires_grad_(True)
    t = sim.input_quantizer.learned_threshold.detach().clone().requires_grad_(True)
    rsign(xs, t).mul(torch.randn_like(xs)).sum().backward()
    torch.testing.assert_close(t.grad.flatten(), -xs.grad.sum(dim=(0, 2, 3)))
    dep = sim.to_deploy()
    assert isinstance(dep, BinaryDeployConv2d)
    torch.testing.assert_close(dep(x), sim(x).detach(), rtol=1e-5, atol=1e-4)


def test_rsign_linear_in_the_xnor_scheme_converts_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 8), nn.Linear(8, 3))
    q = quantkit.prepare(model, "xnor", input_quantizer="rsign")
    mid = q[1]
    assert isinstance(mid, XnorLinear) and isinstance(mid, QuantLinear) and isinstance(mid.input_quantizer, RSign)
    _with_threshold(mid, torch.randn(16) * 0.3)
    x = torch.randn(4, 12)
    with torch.no_grad():
        expect = q(x)
    dep = quantkit.convert(q)
    assert isinstance(dep[1], BinaryDeployLinear)
    torch.testing.assert_close(dep(x), expect, rtol=1e-5, atol=1e-4)


def test_unknown_quantizer_name_in_a_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="input_quantizer='rsgn'"):
        quantkit.get_scheme("xnor", input_quantizer="rsgn")


def test_state_dict_keeps_flat_names_and_round_trips():
    conv = nn.Conv2d(3, 4, 3)
    sim = QuantConv2d.from_float(conv, None, "c", input_quantizer="rsign", weight_quantizer="xnor_weight")
    sd = sim.state_dict()
    assert set(sd) == {"weight", "bias", "learned_threshold"}
    other = QuantConv2d.from_float(nn.Conv2d(3, 4, 3), None, "c", input_quantizer="rsign",
                                   weight_quantizer="xnor_weight")
    other.load_state_dict({**sd, "learned_threshold": torch.full((3, 1, 1), 0.25)})
    assert torch.equal(other.learned_threshold, torch.full((3, 1, 1), 0.25))
    other.load_state_dict(conv.state_dict())  # a float checkpoint: the threshold is optional state


@pytest.mark.parametrize("name", ["xnor", "adabin", "w4a4", "bivit", "bibert", "adder_ptq4", "adder_qssf3_w"])
def test_scheme_to_dict_from_dict_round_trip(name):
    cfg = quantkit.get_scheme(name, skip=("fc",), rules={re.compile(r"layer\d"): None, nn.Conv2d: {}})
    data = cfg.to_dict()
    again = type(cfg).from_dict(json.loads(json.dumps(data)))
    # a compiled regex comes back as its "re:" string, the same rule; everything else as it was
    assert again.rules == {r"re:layer\d": None, nn.Conv2d: {}}
    expect = dict(dataclasses.asdict(cfg), rules=again.rules)
    assert dataclasses.asdict(again) == expect and again.name == cfg.name
    assert again.to_dict() == data
    assert SchemeConfig.from_dict(data).name == cfg.name


def test_generic_layer_defaults_to_uniform_and_disabled_layer_deploys_as_float():
    conv = nn.Conv2d(3, 4, 3, groups=1, padding="same")
    sim = QuantConv2d.from_float(conv)
    assert (sim.weight_quantizer.name, sim.input_quantizer.name, sim.bits_w, sim.bits_a) == (
        "uniform_weight", "uniform_act", 8, 8)
    xnor = XnorLinear.from_float(nn.Linear(6, 5))
    xnor.enabled = False
    dep = xnor.to_deploy()
    assert type(dep) is nn.Linear and torch.equal(dep.weight, xnor.weight.detach())


def test_adder_scale_methods_are_registered_rules():
    from quantkit.quantizers.adder import SCALE_RULES, AdderQuantOptions

    assert set(SCALE_RULES) == {"ptq", "qssf_w", "qssf_a", "round"}
    assert not SCALE_RULES["qssf_a"].compensate_clamp and SCALE_RULES["ptq"].compensate_clamp
    absmax = torch.tensor([0.5, 2.0, 1.0])
    gi, s = SCALE_RULES["round"].scales(absmax, 1.5, 3.0, AdderQuantOptions(method="round"))
    assert gi.tolist() == [0, 0, 0] and s.tolist() == [3.0]
    with pytest.raises(ConfigError, match="method='nope'"):
        quantkit.get_scheme("adder_ptq4", method="nope")
