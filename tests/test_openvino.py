"""OpenVINO IR export: every scheme family exports, runs in OpenVINO's CPU plugin and matches the PyTorch deploy model
on fresh inputs; binary layers execute as BinaryConvolution with u1 weights; errors name the layer and leave no file
behind."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import quantkit
from quantkit.errors import ExportError
from quantkit.nn.base import QuantModule
from quantkit.sysinfo import x86_without_vnni

ov = pytest.importorskip("openvino")

from quantkit.export.openvino import (compile_openvino, export_openvino, inspect_openvino,  # noqa: E402
                                      run_openvino, runtime_layer_types)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import TinyResNet  # noqa: E402

from conftest import settle_bn  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention




def _resnet(widths=(8, 16, 24)) -> nn.Module:
    torch.manual_seed(0)
    return settle_bn(TinyResNet(widths, (1, 1, 1), 10, 3), (3, 12, 12))


def _check_ir(path: Path, deploy: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> dict:
    """The IR, compiled at x's batch, matches the deploy model on a fresh input; returns the executed layer types."""
    compiled = compile_openvino(path, x.shape[0], threads=1)
    with torch.no_grad():
        ref = deploy(x)
    out = run_openvino(compiled, [x])[0]
    err = float(np.abs(out - ref.numpy()).max())
    assert err <= 1e-4 + rtol * float(ref.abs().max()), err
    return runtime_layer_types(compiled)


def _binconv_weights(path: Path) -> list:
    model = ov.Core().read_model(str(path))
    return [op.input_value(1).get_node() for op in model.get_ordered_ops()
            if op.get_type_name() == "BinaryConvolution" and op.get_friendly_name().endswith("/binary_conv")]


# ---------------------------------------------------------------------------------------------- binary
def test_xnor_runs_as_binary_convolution(tmp_path):
    q = quantkit.prepare(_resnet(), "xnor")
    path = tmp_path / "xnor.xml"
    res = export_openvino(q, (torch.randn(2, 3, 12, 12),), path, quiet=True)
    binary = [layer for layer in res.layers if layer.kind == "binary"]
    assert len(binary) == 8 and all(layer.form == "binconv" for layer in binary)
    assert res.runtime_layers["BinaryConvolution"] == 8
    assert res.agreement.deploy_vs_openvino <= 1e-5 and res.agreement.simulated_vs_deploy is not None
    layers = _check_ir(path, quantkit.convert(q), torch.randn(3, 3, 12, 12))
    assert layers["BinaryConvolution"] == 8
    weights = _binconv_weights(path)
    assert len(weights) == 8
    for w in weights:  # 1-bit weights in the .bin: ceil(elements / 8) bytes
        assert w.get_output_element_type(0) == ov.Type.u1
        assert w.get_byte_size() == (int(np.prod(tuple(w.get_output_shape(0)))) + 7) // 8
    assert (tmp_path / "xnor.bin").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xnor.bin", "xnor.xml"]


def test_adabin_affine_terms_exact_at_borders(tmp_path):
    """A non-zero activation center: the weight-sum and count terms depend on the valid taps at the border, where
    BinaryConvolution pads with +1."""
    q = quantkit.prepare(_resnet(), "adabin")
    with torch.no_grad():
        for m in q.modules():
            if hasattr(m, "alpha_a") and m.alpha_a is not None:
                m.alpha_a.fill_(0.7)
                m.beta_a.fill_(0.3)
    deploy = quantkit.convert(q)
    assert any(getattr(m, "count_scale", None) is not None and float(m.count_scale.abs().sum()) > 0
               for m in deploy.modules())
    path = tmp_path / "adabin.xml"
    res = export_openvino(q, (torch.randn(2, 3, 12, 12),), path, quiet=True)
    assert res.runtime_layers["BinaryConvolution"] >= 6
    _check_ir(path, deploy, torch.randn(1, 3, 12, 12))


def test_binary_input_exact_zeros_and_thresholds(tmp_path):
    """quantkit binarizes with x >= t; inputs exactly at the threshold (ReLU zeros, -0.0) must give +1."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 3)).eval()
    q = quantkit.prepare(model, "xnor")
    x = torch.randn(2, 3, 8, 8)
    x[0, :, :2] = 0.0
    path = tmp_path / "zeros.xml"
    export_openvino(q, (x,), path, quiet=True)
    deploy = quantkit.convert(q)
    z = torch.zeros(2, 3, 8, 8)
    z[1] = -0.0
    _check_ir(path, deploy, z)
    _check_ir(path, deploy, x)


def test_unaligned_channels_use_pm1_convolution(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.Conv2d(12, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 3))
    model = settle_bn(model, (3, 6, 6))
    q = quantkit.prepare(model, "xnor")
    path = tmp_path / "unaligned.xml"
    res = export_openvino(q, (torch.randn(2, 3, 6, 6),), path, quiet=True)
    forms = {layer.name: layer.form for layer in res.layers}
    assert forms == {"2": "pm1-conv", "4": "binconv"}
    assert res.layers[0].notes and "multiple of 8" in res.layers[0].notes[0]
    assert res.runtime_layers["BinaryConvolution"] == 1
    _check_ir(path, quantkit.convert(q), torch.randn(3, 3, 6, 6))


def test_adabin_weight_only_float_input(tmp_path):
    q = quantkit.prepare(_resnet(), "adabin", weight_only=True)
    path = tmp_path / "adabin_w.xml"
    res = export_openvino(q, (torch.randn(2, 3, 12, 12),), path, quiet=True)
    assert all(layer.bits_a is None and layer.form == "float-input" for layer in res.layers)
    consts = inspect_openvino(path, compile_model=False).constants_by_type
    assert "u1" in consts  # the weights stay 1-bit in the .bin, unpacked when OpenVINO compiles
    _check_ir(path, quantkit.convert(q), torch.randn(1, 3, 12, 12))


@pytest.mark.parametrize("scheme", ["bivit", "bibert"])
def test_bivit_linears_and_attention(tmp_path, scheme):
    from quantkit.models.vit import vit_digits

    torch.manual_seed(1)
    model = vit_digits(embed_dim=32, depth=1, num_heads=4).eval()
    q = quantkit.prepare(model, scheme)
    path = tmp_path / f"{scheme}.xml"
    res = export_openvino(q, (torch.randn(2, 1, 8, 8),), path, quiet=True)
    assert {layer.kind for layer in res.layers} == {"binary"}
    assert res.runtime_layers["BinaryConvolution"] >= 2  # the PWS projections
    ops = {op.get_type_name() for op in ov.Core().read_model(str(path)).get_ordered_ops()}
    assert "BinaryConvolution" in ops and ("Softmax" in ops or scheme == "bibert")
    _check_ir(path, quantkit.convert(q), torch.randn(3, 1, 8, 8))


# ---------------------------------------------------------------------------------------------- uniform, adder
@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_uniform_fake_quantize_int8_kernels(tmp_path, scheme):
    model = _resnet()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    # the residual convs' 8-bit output grid: one more FakeQuantize (levels 256) after each of them
    rounded = quantkit.quantize(model, scheme, calib, progress=False)
    export_openvino(rounded, (torch.randn(2, 3, 12, 12),), tmp_path / "rounded.xml", quiet=True)
    rounded_levels = [op.get_attributes()["levels"]
                      for op in ov.Core().read_model(str(tmp_path / "rounded.xml")).get_ordered_ops()
                      if op.get_type_name() == "FakeQuantize"]
    residual = [m for m in rounded.modules() if isinstance(m, QuantModule) and m.output_bits is not None]
    # OpenVINO requantizes those outputs with its own rounding, which flips codes on thresholds; the integer path
    # and its agreement with the deploy model are checked on the model without them
    q = quantkit.quantize(model, scheme, calib, progress=False, quantize_residual=False)
    path = tmp_path / f"{scheme}.xml"
    res = export_openvino(q, (torch.randn(2, 3, 12, 12),), path, quiet=True)
    assert all(layer.form == "fake-quantize" for layer in res.layers)
    model_ir = ov.Core().read_model(str(path))
    levels = {op.get_attributes()["levels"] for op in model_ir.get_ordered_ops()
              if op.get_type_name() == "FakeQuantize"}
    assert levels == {256 if scheme == "w8a8" else 16}
    plain = [op.get_attributes()["levels"] for op in model_ir.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert residual and len(rounded_levels) == len(plain) + len(residual)
    assert rounded_levels.count(256) == plain.count(256) + len(residual)
    constants = inspect_openvino(path, compile_model=False).constants_by_type
    if scheme == "w4a4":
        assert "i8" in constants and not any(layer.notes for layer in res.layers)
        assert _conv_precisions(path) & {"u8", "i8"}  # OpenVINO runs the convolutions with integer kernels
    else:
        # full-range 8-bit weights with 8-bit activations: stored as u8 - 128, exact on CPUs without VNNI too
        assert "i8" not in constants and "u8" in constants and all(layer.notes for layer in res.layers)
    _check_ir(path, quantkit.convert(q), torch.randn(3, 3, 12, 12))
    # int8_signed: i8 weights and integer kernels in every layer; exact where the CPU has VNNI, and where it has not
    # the export refuses, naming the cause
    signed = tmp_path / f"{scheme}_signed.xml"
    if scheme == "w8a8" and x86_without_vnni():
        with pytest.raises(ExportError, match="without VNNI.*uniform_form='int8'"):
            export_openvino(q, (torch.randn(2, 3, 12, 12),), signed, quiet=True, uniform_form="int8_signed")
        assert not signed.exists()
    else:
        export_openvino(q, (torch.randn(2, 3, 12, 12),), signed, quiet=True, uniform_form="int8_signed")
        assert "i8" in inspect_openvino(signed, compile_model=False).constants_by_type
        assert _conv_precisions(signed) & {"u8", "i8"}
        _check_ir(signed, quantkit.convert(q), torch.randn(3, 3, 12, 12))


def _conv_precisions(path: Path) -> set:
    compiled = compile_openvino(path, 1)
    return {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
            if op.get_rt_info()["layerType"].astype(str) == "Convolution"}


@pytest.mark.parametrize("scheme", ["adder_ptq4", "adder_ptq8"])
def test_adder_standard_ops(tmp_path, scheme):
    from quantkit.models.adder_resnet import adder_cnn_digits

    torch.manual_seed(3)
    model = settle_bn(adder_cnn_digits(width=8), (1, 8, 8))
    calib = [torch.rand(8, 1, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, scheme, calib, progress=False)
    path = tmp_path / f"{scheme}.xml"
    res = export_openvino(q, (calib[0][:2],), path, quiet=True)
    assert [layer.kind for layer in res.layers] and {layer.kind for layer in res.layers} == {"adder"}
    assert res.agreement.deploy_vs_openvino <= 1e-4 + 1e-4 * res.agreement.output_absmax
    _check_ir(path, quantkit.convert(q), torch.rand(3, 1, 8, 8))


def test_float_model_reference_ir(tmp_path):
    model = _resnet()
    res = export_openvino(model, (torch.randn(1, 3, 12, 12),), tmp_path / "fp32.xml", quiet=True)
    assert res.layers == [] and "no simulated model" in res.agreement.notes[0]
    _check_ir(tmp_path / "fp32.xml", model, torch.randn(2, 3, 12, 12), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- the IR, checks
def test_dynamic_batch_and_static_option(tmp_path):
    q = quantkit.prepare(_resnet(), "xnor")
    x = torch.randn(1, 3, 12, 12)
    export_openvino(q, (x,), tmp_path / "dyn.xml", quiet=True, input_names=["images"], output_names=["logits"])
    model = ov.Core().read_model(str(tmp_path / "dyn.xml"))
    assert model.inputs[0].get_any_name() == "images" and model.outputs[0].get_any_name() == "logits"
    assert model.inputs[0].get_partial_shape()[0].is_dynamic
    _check_ir(tmp_path / "dyn.xml", quantkit.convert(q), torch.randn(5, 3, 12, 12))
    export_openvino(q, (x,), tmp_path / "static.xml", dynamic_batch=False, quiet=True)
    static = ov.Core().read_model(str(tmp_path / "static.xml"))
    assert static.inputs[0].get_partial_shape().is_static
    ov.Core().compile_model(static, "CPU")  # compiles as it is


def test_binary_weights_in_bin_are_one_bit(tmp_path):
    """The binary layers' weights take 1/32 of their FP32 bytes; the .bin of a binary body is far below FP32."""
    torch.manual_seed(0)
    model = settle_bn(TinyResNet((64, 128, 256), (1, 1, 1), 10, 3), (3, 8, 8))
    q = quantkit.prepare(model, "xnor")
    x = torch.randn(1, 3, 8, 8)
    fp = export_openvino(model, (x,), tmp_path / "fp32.xml", quiet=True)
    qb = export_openvino(q, (x,), tmp_path / "xnor.xml", quiet=True)
    assert qb.fp32_weight_bytes == 32 * qb.quantized_weight_bytes
    summary = inspect_openvino(tmp_path / "xnor.xml")
    body_u1 = sum(nb for name, _, nb, _ in summary.binary_layers if name.endswith("/binary_conv"))
    assert body_u1 == qb.quantized_weight_bytes
    assert qb.bin_bytes * 10 < fp.bin_bytes  # FP stem/head and per-channel constants included
    table = summary.table()
    assert "BinaryConvolution" in table and "u1 vs" in table and f"{summary.bin_bytes} B" in table


def test_mismatch_names_the_layer_and_writes_nothing(tmp_path, monkeypatch):
    from quantkit.export.ov import binary as ov_binary

    original = ov_binary._epilogue

    def wrong(ops, name, dot, asum, scale, act_sum_scale, const_map, n):
        return original(ops, name, dot, asum, -scale, act_sum_scale, const_map, n)

    monkeypatch.setattr(ov_binary, "_epilogue", wrong)
    q = quantkit.prepare(_resnet(), "xnor")
    with pytest.raises(ExportError, match=r"layer 'layer1.0.conv1' \(BinaryDeployConv2d\): OpenVINO's output "
                                          "differs from the deploy layer"):
        export_openvino(q, (torch.randn(2, 3, 12, 12),), tmp_path / "bad.xml", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_nan_is_a_failure(tmp_path, monkeypatch):
    from quantkit.export.ov import binary as ov_binary

    original = ov_binary._epilogue

    def nan(ops, name, dot, asum, scale, act_sum_scale, const_map, n):
        y = original(ops, name, dot, asum, scale, act_sum_scale, const_map, n)
        return ops.multiply(y, np.full((1, n, 1, 1), np.nan, np.float32)) if name == "layer3.0.conv2" else y

    monkeypatch.setattr(ov_binary, "_epilogue", nan)
    q = quantkit.prepare(_resnet(), "xnor")
    with pytest.raises(ExportError, match="NaN"):
        export_openvino(q, (torch.randn(2, 3, 12, 12),), tmp_path / "nan.xml", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_overwrite_is_atomic_and_errors_leave_old_files(tmp_path):
    xml, binf = tmp_path / "m.xml", tmp_path / "m.bin"
    xml.write_bytes(b"old xml")
    binf.write_bytes(b"old bin")
    q = quantkit.prepare(_resnet(), "xnor")
    with pytest.raises(ExportError):
        export_openvino(q, (torch.randn(1, 7, 12, 12),), xml, quiet=True)
    assert xml.read_bytes() == b"old xml" and binf.read_bytes() == b"old bin"
    export_openvino(q, (torch.randn(1, 3, 12, 12),), xml, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    assert ov.Core().read_model(str(xml)).get_ordered_ops()
    with pytest.raises(ExportError, match=r"\.xml"):
        export_openvino(q, (torch.randn(1, 3, 12, 12),), tmp_path / "m.onnx", quiet=True)


def test_summary_printed(tmp_path, capsys):
    q = quantkit.prepare(_resnet(), "xnor")
    export_openvino(q, (torch.randn(1, 3, 12, 12),), tmp_path / "s.xml")
    out = capsys.readouterr().out
    assert "deploy vs OpenVINO" in out and "BinaryConvolution" in out and "compile_openvino" in out


def test_cli_quantize_xml_and_inspect(tmp_path, capsys):
    from quantkit.cli import main

    out = tmp_path / "adabin.xml"
    tiny = str(Path(__file__).resolve().parents[1] / "examples" / "tiny_models.py")
    rc = main(["quantize", "--model", f"{tiny}:tiny_resnet_digits", "--scheme", "adabin", "--calib", "digits",
               "--num-calib", "16", "--out", str(out)])
    assert rc == 0 and out.is_file() and out.with_suffix(".bin").is_file()
    printed = capsys.readouterr().out
    assert "OpenVINO vs PyTorch deploy" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ".bin" in printed and "u1 vs" in printed and "BinaryConvolution" in printed
