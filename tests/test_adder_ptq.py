"""AdderNet PTQ end to end: simulated layers == the integer l1 reference of quantkit.ops, the schemes and their
baselines, BN re-estimation, bad inputs, and quantize(adder_resnet18()) with its report."""
import pytest
import torch
from torch import nn

import quantkit
from quantkit.errors import CalibrationDataError, ConfigError, UnknownSchemeError, UnsupportedModelError
from quantkit.models import adder_resnet18
from quantkit.nn.adder import AdderConv2d, AdderLinear
from quantkit.nn.adder_quant import AdderDeployConv2d, QuantAdderConv2d, QuantAdderLinear
from quantkit.ops.adder import adder_conv2d_reference, adder_l1_conv2d_reference, adder_l1_reference, adder_linear_reference
from quantkit.schemes import get_scheme


def _calibrated(layer_fp, scheme, batches, name="layer", **overrides):
    cfg = get_scheme(scheme, **overrides)
    cls = QuantAdderConv2d if isinstance(layer_fp, AdderConv2d) else QuantAdderLinear
    q = cls.from_float(layer_fp, cfg, name)
    q.start_calibration()
    with torch.no_grad():
        for b in batches:
            q(b)
    q.finish_calibration()
    return q


def _spread_weights(layer, seed=0):
    """Filters with very different ranges (what the grouping is for)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = torch.randn(layer.weight.shape, generator=gen)
        ranges = torch.logspace(-0.7, 0.7, layer.weight.shape[0])
        layer.weight.copy_(w * ranges.view(-1, *([1] * (w.dim() - 1))))
    return layer


@pytest.mark.parametrize("bits,clamp", [(2, "scale"), (4, "scale"), (8, "scale"), (3, "grid")])
@pytest.mark.parametrize("act", ["relu", "signed"])
def test_conv_simulated_equals_integer_reference(bits, clamp, act):
    torch.manual_seed(bits)
    layer = _spread_weights(AdderConv2d(5, 12, 3, stride=2, padding=1, dilation=1))
    make = (lambda: torch.relu(torch.randn(3, 5, 9, 7) * 1.5)) if act == "relu" else (lambda: torch.randn(3, 5, 9, 7))
    q = _calibrated(layer, f"adder_ptq{bits}", [make() for _ in range(3)], weight_clamp=clamp)
    assert q.signed_act == (act == "signed") and q.w_mult == (1 if act == "signed" else 2)
    assert q.n_groups == 4
    x = make() * 1.3  # some inputs beyond the clamp
    p = q.quant_params()
    xq = torch.stack([q.act_codes(x, g, ste=False) for g in range(q.n_groups)]).to(torch.int16)
    wq = p["w_codes"].to(torch.int8)
    assert torch.equal(wq.float(), p["w_codes"])
    # integer sums: the simulated path's float sums are exactly the int64 reference
    s_ref = adder_l1_conv2d_reference(xq, wq, p["group_index"], 2, 1, 1, q.w_mult)
    for g in range(q.n_groups):
        idx = torch.nonzero(p["group_index"] == g).flatten()
        s_sim = -q._neg_l1(xq[g].float(), (p["w_codes"] * q.w_mult)[idx])
        assert torch.equal(s_sim.to(torch.int64), s_ref[:, idx].to(torch.int64))
        assert torch.equal(s_sim, s_sim.round())
    with torch.no_grad():
        y_sim = q(x)
        y_ref = adder_conv2d_reference(xq, wq, p["group_index"], p["delta"], p["bias"], 2, 1, 1, q.w_mult)
        y_dep = q.to_deploy()(x)
    scale = y_ref.abs().max()
    torch.testing.assert_close(y_sim, y_ref, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(y_dep, y_ref, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("mode", ["signed", "unsigned"])
def test_linear_simulated_equals_integer_reference(mode):
    layer = _spread_weights(AdderLinear(23, 9, bias=True), seed=4)
    batches = [torch.randn(6, 23).abs() for _ in range(2)]
    q = _calibrated(layer, "adder_ptq5", batches, act_mode=mode)
    assert q.signed_act == (mode == "signed")
    x = torch.randn(2, 3, 23)  # extra leading dims
    p = q.quant_params()
    xq = torch.stack([q.act_codes(x.reshape(-1, 23), g, ste=False) for g in range(q.n_groups)]).to(torch.int16)
    s_ref = adder_l1_reference(xq, p["w_codes"].to(torch.int8), p["group_index"], q.w_mult)
    y_ref = adder_linear_reference(xq, p["w_codes"].to(torch.int8), p["group_index"], p["delta"], p["bias"], q.w_mult)
    with torch.no_grad():
        y_sim = q(x)
        y_dep = q.to_deploy()(x)
    assert torch.equal(p["bias"], (q.bias - (q.weight.abs() - q.group_scale[q.group_index][:, None]).clamp_min(0).sum(1)).detach())
    assert s_ref.dtype == torch.int32
    scale = y_ref.abs().max()
    torch.testing.assert_close(y_sim.reshape(-1, 9), y_ref, rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(y_dep.reshape(-1, 9), y_ref, rtol=1e-6, atol=1e-6 * scale)


def test_ptq_parameters_follow_the_algorithm():
    torch.manual_seed(0)
    layer = _spread_weights(AdderConv2d(4, 16, 3, padding=1))
    batches = [torch.relu(torch.randn(8, 4, 6, 6)) for _ in range(3)]
    q = _calibrated(layer, "adder_ptq4", batches)
    # A = max over batches of the 99.94th percentile of |x|
    from quantkit.quantizers.adder import abs_percentile
    a = max(abs_percentile(b, 99.94).item() for b in batches)
    assert q.act_clamp.item() == pytest.approx(a)
    absmax = layer.weight.detach().abs().flatten(1).amax(1)
    for g in range(q.n_groups):
        own = absmax[q.group_index == g].max().item()
        assert q.group_scale[g].item() == pytest.approx(min(own, a))
    info = q.describe()
    assert info["groups"] == 4 and sum(info["group_sizes"]) == 16 and info["act"] == "unsigned"
    assert info["clamped_groups"] >= 1 and info["clamp_A"] == pytest.approx(a)
    # 8-bit adder PTQ stays close to the FP layer on in-range inputs
    q8 = _calibrated(layer, "adder_ptq8", batches)
    x = torch.relu(torch.randn(4, 4, 6, 6)).clamp_max(a)
    with torch.no_grad():
        y_fp, y_q = layer(x), q8(x)
    assert ((y_q - y_fp).norm() / y_fp.norm()).item() < 0.01


def test_baseline_scales():
    torch.manual_seed(1)
    layer = _spread_weights(AdderConv2d(3, 8, 3, padding=1))
    batches = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    wmax = layer.weight.detach().abs().max().item()
    xmax = max(b.abs().max().item() for b in batches)
    qw = _calibrated(layer, "adder_qssf4_w", batches)
    qa = _calibrated(layer, "adder_qssf4_a", batches)
    qr = _calibrated(layer, "adder_round4", batches)
    assert qw.n_groups == qa.n_groups == qr.n_groups == 1
    assert qw.group_scale.item() == pytest.approx(wmax)
    assert qa.group_scale.item() == pytest.approx(qa.act_clamp.item())
    assert qr.group_scale.item() == pytest.approx(max(wmax, xmax))
    assert torch.equal(qw.quant_params()["bias"], torch.zeros(8))  # no weight exceeds the scale
    assert torch.equal(qa.quant_params()["bias"], torch.zeros(8))  # weights clipped without a correction
    assert get_scheme("adder_qssf3_a").name == "adder_qssf3_a" and get_scheme("adder_round6").name == "adder_round6"
    assert get_scheme("adder_ptq4", bits=6).name == "adder_ptq6"
    for b in range(2, 9):
        for fam in ("adder_ptq{}", "adder_qssf{}_w", "adder_qssf{}_a", "adder_round{}"):
            assert fam.format(b) in quantkit.schemes()


def test_bad_inputs_have_clear_errors():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), AdderConv2d(4, 6, 3), nn.BatchNorm2d(6), AdderConv2d(6, 3, 1))
    data = [torch.randn(2, 1, 8, 8)]
    for bad in (1, 9, 0, 2.5):
        with pytest.raises(ConfigError, match="bits"):
            quantkit.quantize(model, "adder_ptq4", data, bits=bad, progress=False)
    with pytest.raises(UnknownSchemeError):
        quantkit.quantize(model, "adder_ptq9", data)
    with pytest.raises(ConfigError, match="groups"):
        get_scheme("adder_ptq4", groups=0)
    with pytest.raises(ConfigError, match="act_mode"):
        get_scheme("adder_ptq4", act_mode="maybe")
    with pytest.raises(ConfigError, match="weight_clamp"):
        get_scheme("adder_ptq4", weight_clamp="none")
    with pytest.raises(ConfigError, match="round_mode"):
        get_scheme("adder_ptq4", round_mode="up")
    # calibration data with NaN
    nan_batch = torch.randn(2, 1, 8, 8)
    nan_batch[0, 0, 0, 0] = float("nan")
    with pytest.raises(CalibrationDataError, match="NaN"):
        quantkit.quantize(model, "adder_ptq4", [nan_batch], progress=False)
    # NaN produced inside the network reaches the adder layer: the layer names itself
    with pytest.raises(CalibrationDataError, match="'layer'"):
        _calibrated(AdderConv2d(2, 4, 3), "adder_ptq4", [torch.full((1, 2, 4, 4), float("nan"))])
    # a layer whose weights are all equal
    flat = nn.Sequential(nn.Conv2d(1, 4, 3), AdderConv2d(4, 6, 3))
    nn.init.constant_(flat[1].weight, 0.25)
    with pytest.raises(UnsupportedModelError, match=r"'1'.*all 216 weights equal 0\.25.*skip=\['1'\]"):
        quantkit.quantize(flat, "adder_ptq4", data, progress=False)
    # G larger than a layer's channel count: capped to the channel count, and the report says so
    q = quantkit.quantize(model, "adder_ptq4", data, groups=5, progress=False)
    rec = quantkit.report(q)["3"]
    assert rec.info["groups"] == 3 and rec.info["groups_requested"] == 5
    assert quantkit.report(q)["1"].info["groups"] == 5
    # convert before calibration
    prepared = quantkit.prepare(model, "adder_ptq4")
    with pytest.raises(UnsupportedModelError, match="not calibrated"):
        quantkit.convert(prepared)


def test_act_mode_auto_and_bn_recalibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          _spread_weights(AdderConv2d(8, 8, 3, padding=1)), nn.BatchNorm2d(8),
                          AdderConv2d(8, 4, 1))
    with torch.no_grad():  # give the BN layers a realistic state
        model.train()
        for _ in range(5):
            model(torch.randn(16, 1, 6, 6))
    model.eval()
    data = [torch.randn(16, 1, 6, 6) for _ in range(3)]
    q = quantkit.quantize(model, "adder_ptq3", data, fold_bn=False, progress=False)  # the BNs stay to be inspected
    assert quantkit.report(q)["3"].info["act"] == "unsigned"  # after ReLU
    assert quantkit.report(q)["5"].info["act"] == "signed"  # after BN, no ReLU
    assert torch.equal(q[4].running_mean, model[4].running_mean)  # off by default
    qb = quantkit.quantize(model, "adder_ptq3", data, bn_recalib_batches=2, fold_bn=False, progress=False)
    assert not qb.training and not qb[4].training and qb[4].momentum == model[4].momentum
    assert int(qb[4].num_batches_tracked) == 2
    # exact average of the two batches' statistics of the quantized model (earlier BNs use their batch statistics)
    feats = []
    with torch.no_grad():
        for b in data[:2]:
            h = nn.functional.batch_norm(q[0](b), None, None, q[1].weight, q[1].bias, training=True, eps=q[1].eps)
            feats.append(q[3](torch.relu(h)))
    means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    torch.testing.assert_close(qb[4].running_mean, means, rtol=1e-4, atol=1e-4)
    assert not torch.equal(qb[1].running_mean, model[1].running_mean)  # every BN is re-estimated


def test_batchnorm_folds_into_the_simulated_layer_as_convert_folds_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          _spread_weights(AdderConv2d(8, 8, 3, padding=1)), nn.BatchNorm2d(8), nn.ReLU(),
                          _spread_weights(AdderConv2d(8, 8, 3, padding=1)), nn.BatchNorm2d(8))
    with torch.no_grad():
        model.train()
        for _ in range(5):
            model(torch.randn(16, 3, 6, 6))
    model.eval()
    data = [torch.randn(16, 3, 6, 6) for _ in range(3)]
    unfolded = quantkit.quantize(model, "adder_ptq4", data, fold_bn=False, progress=False)
    folded = quantkit.quantize(model, "adder_ptq4", data, progress=False)
    assert all(isinstance(folded[i], nn.Identity) for i in (1, 4, 7))  # FP stem's, and each adder layer's
    assert isinstance(unfolded[1], nn.BatchNorm2d) and isinstance(unfolded[4], nn.BatchNorm2d)
    assert sorted(bn for _, bn in quantkit.report(folded).folded) == ["1", "4", "7"]
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        # the same inputs in both: only the fold's float rounding separates them
        torch.testing.assert_close(folded[0](x), unfolded[1](unfolded[0](x)), rtol=1e-5, atol=1e-5)
        h = torch.relu(folded[0](x))
        torch.testing.assert_close(folded[3](h), unfolded[4](unfolded[3](h)), rtol=1e-5, atol=1e-5)
        deploy = quantkit.convert(folded)
        # the deploy layer holds exactly the simulated layer's folded constants
        delta, bias = folded[3].epilogue(folded[3].quant_params())
        assert torch.equal(deploy[3].delta, delta) and torch.equal(deploy[3].bias, bias)
        # kernels and simulation round the epilogue alike (a product, then a sum): bit for bit, layer by layer
        assert torch.equal(deploy[3](h), folded[3](h))
        h2 = folded[5](folded[4](folded[3](h)))
        assert torch.equal(deploy[6](h2), folded[6](h2))
        torch.testing.assert_close(deploy(x), folded(x), rtol=1e-5, atol=1e-5)
    # a folded, calibrated model round-trips through its state dict
    again = quantkit.prepare(model, "adder_ptq4")
    quantkit.calibrate(again, data, progress=False)
    again.load_state_dict(folded.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))


def test_state_dict_round_trip_of_a_calibrated_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), _spread_weights(AdderConv2d(8, 8, 3)))
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, "adder_ptq4", data, progress=False)
    fresh = quantkit.prepare(model, "adder_ptq4")
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    prepared = quantkit.prepare(model, "adder_ptq4")
    prepared.load_state_dict(model.state_dict())  # a float checkpoint loads into a prepared model


def test_quantize_adder_resnet18_report():
    model = adder_resnet18().eval()
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(1, 3, 64, 64, generator=gen) for _ in range(2)]
    q = quantkit.quantize(model, "adder_ptq4", calib_data=data, progress=False)
    rep = quantkit.report(q)
    adders = [n for n, m in model.named_modules() if isinstance(m, AdderConv2d)]
    assert len(adders) == 19
    for name in adders:
        rec = rep[name]
        assert rec.quantized and rec.new_type == "QuantAdderConv2d"
        assert rec.bits_w == 4 and rec.bits_a == 4
        assert rec.info["groups"] == 4 and len(rec.info["scales"]) == 4
    assert {r.name for r in rep.quantized} == set(adders)
    table = rep.table()
    assert "groups=4" in table and "adder_ptq4" in table
    assert isinstance(q.layer1[0].conv1, QuantAdderConv2d)


def test_convert_small_adder_cnn_matches_simulated():
    from quantkit.models import adder_cnn_digits

    torch.manual_seed(0)
    model = adder_cnn_digits(width=16)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    model.eval()
    data = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, "adder_ptq4", data, progress=False)
    d = quantkit.convert(q)
    assert isinstance(d.features[0], AdderDeployConv2d) and d.features[0].weight_int.dtype == torch.int8
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        y_sim, y_dep = q(x), d(x)
    torch.testing.assert_close(y_dep, y_sim, rtol=1e-4, atol=1e-4 * y_sim.abs().max().item())
