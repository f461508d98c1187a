"""ONNX export: every scheme family exports to a file that passes onnx.checker (full_check) and runs in stock
onnxruntime, matching the PyTorch deploy model on fresh inputs; binary weights are packed 8 a byte; errors name the
layer and leave no file behind."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from onnx import TensorProto
from torch import nn

import quantkit
from quantkit.errors import ExportError
from quantkit.export import export_onnx, run_onnxruntime
from quantkit.export.inspect import inspect_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_models import TinyResNet  # noqa: E402

from conftest import settle_bn  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention




def _resnet(in_channels: int = 3) -> nn.Module:
    return settle_bn(TinyResNet((8, 16, 24), (1, 1, 1), 10, in_channels), (in_channels, 12, 12))


def _check_file(path: Path, deploy: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """The file passes the full checker and onnxruntime matches the deploy model on a fresh input."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        ref = deploy(x)
    out = run_onnxruntime(str(path), ["input"], [x])[0]
    err = float(np.abs(out - ref.numpy()).max())
    assert err <= 1e-4 + rtol * float(ref.abs().max()), err
    return err


def _inits(path: Path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


# ---------------------------------------------------------------------------------------------- uniform
@pytest.mark.parametrize("scheme,opset,form", [("w8a8", 21, "int8"), ("w4a4", 21, "int8"), ("w4a4", 21, "int4"),
                                               ("w4a4", 18, "int4")])
def test_uniform_qdq_torchvision_resnet(tmp_path, scheme, opset, form):
    model = _resnet()
    calib = [torch.randn(4, 3, 12, 12) for _ in range(2)]
    q = quantkit.quantize(model, scheme, calib, progress=False)
    path = tmp_path / "m.onnx"
    res = export_onnx(q, (torch.randn(2, 3, 12, 12),), path, opset=opset, quiet=True, uniform_form=form)
    assert res.agreement.simulated_vs_deploy is not None and res.agreement.deploy_vs_onnxruntime is not None
    _check_file(path, quantkit.convert(q), torch.randn(3, 3, 12, 12))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert "BatchNormalization" not in ops  # folded into the convs before quantization
    dq_axes = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "DequantizeLinear"
               for a in n.attribute if a.name == "axis"]
    assert dq_axes and all(a == 0 for a in dq_axes)  # per-output-channel weights and int32 biases
    weight_types = {t.data_type for name, t in _inits(path).items() if "weight_int" in name or "weight_uint" in name}
    bias_types = {t.data_type for name, t in _inits(path).items() if "bias_int32" in name}
    assert bias_types == {TensorProto.INT32}
    if scheme == "w4a4" and opset >= 21 and form == "int4":
        assert weight_types == {TensorProto.INT4}
        assert res.quantized_weight_bytes * 8 == res.fp32_weight_bytes  # 4 of 32 bits
    elif scheme == "w8a8":
        assert weight_types == {TensorProto.UINT8}  # full-range 8-bit codes: stored unsigned (exact everywhere)
    else:
        assert weight_types == {TensorProto.INT8}
    if scheme == "w4a4" and (opset < 21 or form == "int8"):
        assert "Clip" in ops  # 4-bit activation range on a uint8 QuantizeLinear


def test_saturation_bound_of_signed_weights():
    from quantkit.export.emit.uniform import signed_weights_can_saturate

    w = np.array([[3, -64], [64, 0]], np.int8)
    assert not signed_weights_can_saturate(255, w)  # 255 * (64 + 64) = 32640 fits an int16
    assert signed_weights_can_saturate(255, np.append(w, -65).astype(np.int8))
    assert not signed_weights_can_saturate(15, np.array([-128, 127], np.int8))  # 4-bit activations: any int8
    assert not signed_weights_can_saturate(255, np.zeros(0, np.int8))


def test_full_range_w8a8_weights_are_exact_in_onnxruntime_on_every_cpu(tmp_path):
    """onnxruntime's u8 x s8 kernels on x86 without VNNI add product pairs in saturating int16 lanes, which full-range
    8-bit weights with 8-bit activations overflow. The default form stores those weights as uint8 (zero point 128):
    the fused graph (QLinearConv, QGemm) matches the deploy model on any CPU. ``int8_signed`` keeps int8: where this
    CPU saturates, the export refuses with the cause; elsewhere it is exact too."""
    from demo import DigitsCNN
    from quantkit.sysinfo import x86_without_vnni

    torch.manual_seed(0)
    model = settle_bn(DigitsCNN(), (1, 8, 8))
    q = quantkit.quantize(model, "w8a8", [torch.randn(16, 1, 8, 8) for _ in range(2)], progress=False)
    x = torch.randn(2, 1, 8, 8)
    res = export_onnx(q, (x,), tmp_path / "m.onnx", quiet=True)
    inits = _inits(tmp_path / "m.onnx")
    zero_point_of = {n.input[0]: n.input[2] for n in onnx.load(str(tmp_path / "m.onnx")).graph.node
                     if n.op_type == "DequantizeLinear"}
    stored = {n: t for n, t in inits.items() if "/weight_uint8" in n or "/weight_int8" in n}
    layers = [layer for layer in res.layers if layer.kind == "uniform"]
    assert len(stored) == len(layers) > 0
    for name, t in stored.items():
        assert t.data_type == TensorProto.UINT8, name
        zp = onnx.numpy_helper.to_array(inits[zero_point_of[name]])
        assert zp.dtype == np.uint8 and (zp == 128).all()
        codes = onnx.numpy_helper.to_array(t).astype(np.int16) - 128
        assert codes.min() >= -127 and np.abs(codes).max() > 64  # the int8 codes, a range that needs it
    assert all(layer.notes for layer in layers)
    ops = _optimized_op_types(tmp_path / "m.onnx", tmp_path)
    assert "QLinearConv" in ops and "QGemm" in ops and "Conv" not in ops, ops
    _check_file(tmp_path / "m.onnx", quantkit.convert(q), torch.randn(5, 1, 8, 8))
    if x86_without_vnni():
        with pytest.raises(ExportError, match="without VNNI.*uniform_form='int8'"):
            export_onnx(q, (x,), tmp_path / "s.onnx", quiet=True, uniform_form="int8_signed")
        assert not (tmp_path / "s.onnx").exists()
    else:
        export_onnx(q, (x,), tmp_path / "s.onnx", quiet=True, uniform_form="int8_signed")
        signed = {t.data_type for n, t in _inits(tmp_path / "s.onnx").items() if "/weight_" in n and "int8" in n}
        assert signed == {TensorProto.INT8}
        _check_file(tmp_path / "s.onnx", quantkit.convert(q), torch.randn(5, 1, 8, 8))


def _optimized_op_types(path: Path, tmp_path: Path) -> list[str]:
    """Op types of the graph onnxruntime actually runs (its optimizer's output, saved by the session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_uniform_export_runs_fused_integer_kernels_in_onnxruntime(tmp_path, scheme):
    """The demo's digits CNN (conv-BN-ReLU stack + linear head): onnxruntime fuses every conv into QLinearConv (the
    last one through the QuantizeLinear placed before the Flatten) and the head into QGemm; no float Conv is left.
    The INT4 form is not fused."""
    from demo import DigitsCNN

    torch.manual_seed(0)
    model = settle_bn(DigitsCNN(), (1, 8, 8))
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, scheme, calib, progress=False)
    path = tmp_path / "m.onnx"
    export_onnx(q, (torch.randn(2, 1, 8, 8),), path, quiet=True)
    ops = _optimized_op_types(path, tmp_path)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert ops.count("QLinearConv") == convs and "Conv" not in ops and "FusedConv" not in ops, ops
    assert "QGemm" in ops and "Gemm" not in ops and "BatchNormalization" not in ops, ops
    if scheme == "w4a4":
        export_onnx(q, (torch.randn(2, 1, 8, 8),), tmp_path / "m4.onnx", quiet=True, uniform_form="int4")
        ops4 = _optimized_op_types(tmp_path / "m4.onnx", tmp_path)
        assert "QLinearConv" not in ops4 and "Conv" in ops4


# ---------------------------------------------------------------------------------------------- binary
@pytest.mark.parametrize("form", ["unpack", "xor"])
def test_xnor_packed_bits_and_forms(tmp_path, form):
    model = _resnet()
    q = quantkit.prepare(model, "xnor")
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / f"xnor_{form}.onnx"
    res = export_onnx(q, (x,), path, binary_form=form, quiet=True)
    deploy = quantkit.convert(q)
    _check_file(path, deploy, torch.randn(3, 3, 12, 12))
    packed = {n: t for n, t in _inits(path).items() if "weight_bits" in n}
    binary_layers = [layer for layer in res.layers if layer.kind == "binary"]
    assert binary_layers and len(packed) == len(binary_layers)
    for t in packed.values():
        assert t.data_type == TensorProto.UINT8
    for layer in binary_layers:
        assert layer.form == form and layer.bits_w == 1
        assert layer.weight_bytes * 32 == layer.fp32_weight_bytes  # every C_in here is a multiple of 8
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if form == "unpack":
        assert {"BitShift", "BitwiseAnd"} <= ops
    else:
        assert {"BitwiseXor", "Gather", "ReduceSum"} <= ops and "BitShift" not in ops


def test_binary_file_much_smaller_than_fp32(tmp_path):
    model = settle_bn(TinyResNet((32, 64, 128), (1, 1, 1), 10, 3), (3, 8, 8))
    q = quantkit.prepare(model, "xnor")
    x = torch.randn(1, 3, 8, 8)
    fp = export_onnx(model, (x,), tmp_path / "fp32.onnx", quiet=True)
    qb = export_onnx(q, (x,), tmp_path / "xnor.onnx", quiet=True)
    ratio = qb.fp32_weight_bytes / qb.quantized_weight_bytes
    assert ratio == pytest.approx(32.0)
    # the FP stem and head stay float; the file as a whole still shrinks several times
    print(f"FP32 file {fp.file_bytes} B, xnor file {qb.file_bytes} B ({fp.file_bytes / qb.file_bytes:.1f}x)")
    assert qb.file_bytes * 4 < fp.file_bytes
    summary = inspect_onnx(tmp_path / "xnor.onnx")
    assert summary.packed_binary and "packed 1-bit weights" in summary.table()


@pytest.mark.parametrize("form", ["unpack", "xor"])
def test_adabin_affine_terms_exact_at_borders(tmp_path, form):
    """AdaBin with a non-zero activation center: the weight-sum and count terms of the epilogue depend on the number
    of valid (unpadded) taps, so the image border checks them."""
    model = _resnet()
    q = quantkit.prepare(model, "adabin")
    with torch.no_grad():
        for m in q.modules():
            if hasattr(m, "alpha_a") and m.alpha_a is not None:
                m.alpha_a.fill_(0.7)
                m.beta_a.fill_(0.3)
    path = tmp_path / "adabin.onnx"
    x = torch.randn(2, 3, 12, 12)
    res = export_onnx(q, (x,), path, binary_form=form, quiet=True)
    assert any(layer.kind == "binary" for layer in res.layers)
    deploy = quantkit.convert(q)
    assert any(getattr(m, "count_scale", None) is not None and float(m.count_scale.abs().sum()) > 0
               for m in deploy.modules())
    _check_file(path, deploy, torch.randn(3, 3, 12, 12))
    with torch.no_grad():
        sim = q.eval()(x)
        dep = deploy(x)
    assert float((sim - dep).abs().max()) < 1e-3 * float(sim.abs().max()) + 1e-4


def test_adabin_weight_only(tmp_path):
    q = quantkit.prepare(_resnet(), "adabin", weight_only=True)
    path = tmp_path / "adabin_w.onnx"
    res = export_onnx(q, (torch.randn(2, 3, 12, 12),), path, quiet=True)
    assert all(layer.bits_a is None for layer in res.layers)
    _check_file(path, quantkit.convert(q), torch.randn(1, 3, 12, 12))


# ---------------------------------------------------------------------------------------------- BiViT
@pytest.mark.parametrize("scheme", ["bivit", "bivit_full", "bibert"])
def test_bivit_example_vit(tmp_path, scheme):
    from quantkit.models.vit import vit_digits

    torch.manual_seed(1)
    model = vit_digits(embed_dim=32, depth=2, num_heads=4).eval()
    q = quantkit.prepare(model, scheme)
    path = tmp_path / f"{scheme}.onnx"
    res = export_onnx(q, (torch.randn(2, 1, 8, 8),), path, quiet=True)
    kinds = {layer.kind for layer in res.layers}
    assert kinds == {"binary"}  # the packed projections; the attention cores are checked through the ops below
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Softmax" if scheme != "bibert" else "Greater", "MatMul", "BitShift"} <= ops
    _check_file(path, quantkit.convert(q), torch.randn(3, 1, 8, 8))


def test_bivit_torchvision_vit_multihead_attention(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(2)
    model = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    q = quantkit.prepare(model, "bivit")
    path = tmp_path / "tv_vit.onnx"
    export_onnx(q, (torch.randn(2, 3, 8, 8),), path, quiet=True)
    _check_file(path, quantkit.convert(q), torch.randn(2, 3, 8, 8))


def test_bivit_torchvision_swin_shifted_windows(tmp_path):
    """Swin: relative position bias and shift masks stay FP; its zero-initialised projection biases give exact zeros
    before the next sign, which only an exact integer dot reproduces."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    model = SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2], window_size=[2, 2],
                            num_classes=5).eval()
    q = quantkit.prepare(model, "bivit")
    path = tmp_path / "swin.onnx"
    res = export_onnx(q, (torch.randn(2, 3, 8, 8),), path, quiet=True)
    assert res.agreement.deploy_vs_onnxruntime <= 1e-6
    _check_file(path, quantkit.convert(q), torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------------------------- adder
def test_adder_ptq_example_cnn_int4(tmp_path):
    from quantkit.models.adder_resnet import adder_cnn_digits

    torch.manual_seed(3)
    model = settle_bn(adder_cnn_digits(width=8), (1, 8, 8))
    calib = [torch.rand(8, 1, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, "adder_ptq4", calib, progress=False)
    path = tmp_path / "adder4.onnx"
    res = export_onnx(q, (calib[0][:2],), path, quiet=True)
    assert res.agreement.deploy_vs_onnxruntime <= 1e-4 + 1e-4 * res.agreement.output_absmax
    adder_layers = [layer for layer in res.layers if layer.kind == "adder"]
    assert adder_layers and all(layer.bits_w == 4 for layer in adder_layers)
    types = {t.data_type for n, t in _inits(path).items() if "weight_int" in n}
    assert types == {TensorProto.INT4}
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Sub", "Abs", "ReduceSum", "Round", "Clip"} <= ops
    _check_file(path, quantkit.convert(q), torch.rand(3, 1, 8, 8))


def test_adder_ptq_torchvision_resnet_adderized(tmp_path):
    from quantkit.graph import adderize

    torch.manual_seed(4)
    model = settle_bn(adderize(TinyResNet((8, 8, 16), (1, 1, 1), 10, 3)), (3, 8, 8))
    calib = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    q = quantkit.quantize(model, "adder_ptq8", calib, progress=False)
    path = tmp_path / "adder8.onnx"
    res = export_onnx(q, (calib[0][:2],), path, opset=18, quiet=True)
    types = {t.data_type for n, t in _inits(path).items() if "weight_int" in n}
    assert types == {TensorProto.INT8}  # 8-bit codes (and opset 18 has no INT4)
    assert res.agreement.simulated_vs_deploy is not None


@pytest.mark.parametrize("bits,signed", [(3, True), (6, False)])
def test_adder_linear_and_conv_signed_unsigned(tmp_path, bits, signed):
    """Both integer forms (signed |q_x - q_w|, unsigned |q_x - 2 q_w|), conv with stride and padding, adder linear."""
    from quantkit.nn.adder import AdderConv2d, AdderLinear

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = AdderConv2d(4, 6, 3, stride=2, padding=1)
            self.fc = AdderLinear(6 * 3 * 3, 5, bias=True)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1) / 50)

    torch.manual_seed(5)
    calib = [torch.randn(6, 4, 6, 6) for _ in range(2)]
    if not signed:
        calib = [c.abs() for c in calib]
    q = quantkit.quantize(Net().eval(), f"adder_ptq{bits}", calib, progress=False, keep_first=False, keep_last=False)
    path = tmp_path / "adder_lin.onnx"
    res = export_onnx(q, (calib[0][:2],), path, quiet=True)
    assert [layer.type_name for layer in res.layers] == ["AdderDeployConv2d", "AdderDeployLinear"]
    assert res.agreement.deploy_vs_onnxruntime <= 1e-4 + 1e-4 * res.agreement.output_absmax
    x = torch.randn(3, 4, 6, 6)
    _check_file(path, quantkit.convert(q), x.abs() if not signed else x)


def test_fp_adder_model_exports(tmp_path):
    from quantkit.models.adder_resnet import adder_cnn_digits

    model = settle_bn(adder_cnn_digits(width=8), (1, 8, 8))
    path = tmp_path / "adder_fp.onnx"
    res = export_onnx(model, (torch.rand(2, 1, 8, 8),), path, quiet=True)
    assert {layer.kind for layer in res.layers} == {"adder-fp"}
    _check_file(path, model, torch.rand(2, 1, 8, 8), rtol=1e-3)


# ---------------------------------------------------------------------------------------------- options
def test_custom_ops_option(tmp_path):
    q = quantkit.prepare(_resnet(), "xnor")
    path = tmp_path / "custom.onnx"
    res = export_onnx(q, (torch.randn(1, 3, 12, 12),), path, custom_ops=True, quiet=True)
    model = onnx.load(str(path))
    custom = [n for n in model.graph.node if n.domain == "quantkit"]
    assert custom and {n.op_type for n in custom} == {"BinaryDeployConv2d"}
    assert any(o.domain == "quantkit" for o in model.opset_import)
    onnx.checker.check_model(model)
    assert res.agreement.deploy_vs_onnxruntime is None and any("custom" in n for n in res.agreement.notes)


def test_dynamic_batch_names_and_summary(tmp_path, capsys):
    q = quantkit.prepare(_resnet(), "xnor")
    path = tmp_path / "named.onnx"
    export_onnx(q, (torch.randn(2, 3, 12, 12),), path, input_names=["images"], output_names=["logits"])
    printed = capsys.readouterr().out
    assert "three-way agreement" in printed and "deploy vs onnxruntime" in printed
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    out = run_onnxruntime(str(path), ["images"], [torch.randn(5, 3, 12, 12)])[0]
    assert out.shape == (5, 10)

    static = tmp_path / "static.onnx"
    export_onnx(q, (torch.randn(2, 3, 12, 12),), static, dynamic_batch=False, quiet=True)
    assert onnx.load(str(static)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


# ---------------------------------------------------------------------------------------------- errors
def test_errors_leave_no_file(tmp_path):
    q = quantkit.prepare(_resnet(), "xnor")
    x = (torch.randn(1, 3, 12, 12),)
    with pytest.raises(ExportError, match="opset"):
        export_onnx(q, x, tmp_path / "a.onnx", opset=13, quiet=True)
    with pytest.raises(ExportError, match="does not exist"):
        export_onnx(q, x, tmp_path / "missing" / "a.onnx", quiet=True)
    with pytest.raises(ExportError, match="binary_form"):
        export_onnx(q, x, tmp_path / "a.onnx", binary_form="popcnt", quiet=True)
    with pytest.raises(ExportError, match="does not run on example_inputs"):
        export_onnx(q, (torch.randn(1, 5, 12, 12),), tmp_path / "a.onnx", quiet=True)
    with pytest.raises(ExportError, match="example_inputs"):
        export_onnx(q, None, tmp_path / "a.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder(tmp_path):
    # /proc refuses new files even for root; a chmod-ed folder would not stop root
    with pytest.raises(ExportError, match="not writable"):
        export_onnx(quantkit.prepare(_resnet(), "xnor"), (torch.randn(1, 3, 12, 12),), "/proc/quantkit_test.onnx",
                    quiet=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="is a file, not a folder"):
        export_onnx(quantkit.prepare(_resnet(), "xnor"), (torch.randn(1, 3, 12, 12),), blocker / "m.onnx",
                    quiet=True)


class _UnknownDeploy(nn.Module):
    def forward(self, x):
        return x * 2


_UnknownDeploy.__module__ = "quantkit.nn.future_family"


def test_layer_without_emitter_is_named(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _UnknownDeploy())
    with pytest.raises(ExportError, match=r"layer '1' \(_UnknownDeploy\): no ONNX emitter"):
        export_onnx(model, (torch.randn(1, 3, 8, 8),), tmp_path / "u.onnx", quiet=True)
    assert not (tmp_path / "u.onnx").exists()


def test_simulated_layer_inside_deploy_model_is_named(tmp_path):
    q = quantkit.prepare(_resnet(), "xnor")
    deploy = quantkit.convert(q)
    sim_layer = next(m for m in q.modules() if isinstance(m, quantkit.nn.base.QuantModule))
    deploy.layer1[0].conv1 = sim_layer
    deploy.__dict__.pop("_quantkit_config", None)
    with pytest.raises(ExportError, match="layer1.0.conv1"):
        export_onnx(deploy, (torch.randn(1, 3, 12, 12),), tmp_path / "s.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_mismatch_raises_and_writes_nothing(tmp_path, monkeypatch):
    """A wrong emitter (here: a sign flipped on purpose) is caught by the onnxruntime check."""
    from quantkit.export.emit import binary as binary_emit

    original = binary_emit._epilogue

    def wrong(b, s, dot, asum, const_terms, nchw):
        return original(b, dataclasses.replace(s, scale=-s.scale), dot, asum, const_terms, nchw)

    monkeypatch.setattr(binary_emit, "_epilogue", wrong)
    q = quantkit.prepare(_resnet(), "xnor")
    with pytest.raises(ExportError, match=r"layer 'layer1.0.conv1' \(BinaryDeployConv2d\): onnxruntime's output "
                                          "differs from the deploy layer"):
        export_onnx(q, (torch.randn(2, 3, 12, 12),), tmp_path / "bad.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []


class _ShiftInOnnx(nn.Module):
    """Adds 0.05 only in the exported graph: a stand-in for full-precision layers that round differently."""

    def forward(self, x):
        return x + 0.05 if torch.onnx.is_in_onnx_export() else x


def test_threshold_flips_pass_when_every_layer_matches(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _ShiftInOnnx(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.Conv2d(16, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    q = quantkit.prepare(model, "xnor")
    x = (torch.randn(2, 3, 6, 6),)
    with pytest.raises(ExportError, match="each of the 2 quantized layers matches.*allow_mismatch=True"):
        export_onnx(q, x, tmp_path / "flip.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(RuntimeWarning, match="each of the 2 quantized layers matches"):
        res = export_onnx(q, x, tmp_path / "flip.onnx", allow_mismatch=True)
    a = res.agreement
    assert a.deploy_vs_onnxruntime > 1e-3 and a.layerwise_max is not None and a.layerwise_max < 1e-4


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    q = quantkit.prepare(_resnet(), "xnor")
    with pytest.raises(ExportError):
        export_onnx(q, (torch.randn(1, 7, 12, 12),), path, quiet=True)
    assert path.read_bytes() == b"old"
    export_onnx(q, (torch.randn(1, 3, 12, 12),), path, quiet=True)
    assert onnx.load(str(path)).graph.node
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---------------------------------------------------------------------------------------------- the exporter object
def test_two_exporters_interleaved_keep_their_own_state(tmp_path):
    """The trace's placeholder calls live on each exporter (no module state): a whole second export between the
    trace and the expansion of the first changes neither file."""
    from quantkit.export import OnnxExporter

    x = torch.randn(2, 3, 12, 12)
    first = OnnxExporter(quantkit.prepare(_resnet(), "xnor"), (x,), tmp_path / "a.onnx")
    for step in (first.validate, first.convert, first.reference_run, first.trace):
        step()
    digits_cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    calib = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    second = OnnxExporter(quantkit.quantize(digits_cnn, "w8a8", calib, progress=False),
                          (torch.randn(1, 1, 8, 8),), tmp_path / "b.onnx", dynamic_batch=False).run()
    for step in (first.expand, first.check, first.verify, first.rerun_dynamic_batch):
        step()
    result = first.write()
    assert result.agreement.deploy_vs_onnxruntime <= 1e-4 and second.agreement.deploy_vs_onnxruntime <= 1e-4
    a, b = onnx.load(str(tmp_path / "a.onnx")), onnx.load(str(tmp_path / "b.onnx"))
    assert a.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # dynamic, as asked
    assert b.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # static, as asked
    assert {layer.type_name for layer in result.layers} == {"BinaryDeployConv2d"}
    assert {layer.type_name for layer in second.layers} == {"UniformDeployConv2d", "UniformDeployLinear"}
    assert run_onnxruntime(str(tmp_path / "a.onnx"), ["input"], [torch.randn(5, 3, 12, 12)])[0].shape == (5, 10)


def test_exporter_object_prints_nothing_and_export_onnx_logs(tmp_path, capsys, caplog):
    from quantkit.export import OnnxExporter

    q = quantkit.prepare(_resnet(), "xnor")
    x = (torch.randn(1, 3, 12, 12),)
    OnnxExporter(q, x, tmp_path / "quiet.onnx").run()
    assert capsys.readouterr().out == ""
    logger = __import__("logging").getLogger("quantkit")
    logger.propagate = True  # let pytest's caplog see the record as well
    try:
        with caplog.at_level("INFO", logger="quantkit.export"):
            export_onnx(q, x, tmp_path / "logged.onnx")
    finally:
        logger.propagate = False
    assert any(r.name == "quantkit.export" and "three-way agreement" in r.getMessage() for r in caplog.records)
    assert "three-way agreement" in capsys.readouterr().out  # the default handler still shows it on stdout


def test_export_docs_name_only_existing_deploy_layers():
    """Every deploy-layer class named in the export package's documentation exists."""
    import re

    import quantkit.export as export_pkg
    from quantkit.nn import adder_quant, binary_deploy, bivit, uniform

    named = set(re.findall(r"\b[A-Z]\w*Deploy\w*\b", export_pkg.__doc__))
    existing = {n for m in (adder_quant, binary_deploy, bivit, uniform) for n in vars(m)}
    assert named and named <= existing, named - existing
