"""convert and export refuse what they cannot check: NaN/Inf, uncalibrated PTQ models, data-dependent branches baked
into a trace, simulated-vs-deploy differences beyond tolerance; a layer called twice exports; timm attention with
its full forward signature; CLB stage 1 converts what was trained; the report covers every parameter."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import quantkit
from quantkit.errors import ExportError, UnsupportedModelError
from quantkit.export import export_onnx, run_onnxruntime


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread, immune to contention


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def _calib(shape=(3, 6, 6)):
    return [torch.randn(8, *shape) for _ in range(2)]


# ---------------------------------------------------------------------------------------------- item 1
def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=2,
                             num_classes=5).eval()


def test_bivit_runs_stock_timm_vit_and_exports(tmp_path):
    model = _timm_vit()
    x = torch.randn(2, 3, 16, 16)
    qat = quantkit.QAT(model, "bivit")
    assert quantkit.report(qat.model)["blocks.0.attn"].quantized
    qat.model(x).sum().backward()  # timm's Block calls attn(x, attn_mask=..., is_causal=...)
    res = export_onnx(qat.model, (x,), tmp_path / "deit.onnx", quiet=True)
    assert res.agreement.simulated_vs_deploy <= 1e-4 and res.agreement.deploy_vs_onnxruntime <= 1e-4


def test_bivit_qkv_attention_is_causal_matches_timm_float():
    model = _timm_vit()
    attn = model.blocks[0].attn
    qat = quantkit.QAT(model, "bivit")
    wrapped = qat.model.blocks[0].attn
    wrapped.binarize = False
    for lin in (wrapped.qkv, wrapped.proj):
        lin.binarize = False
    x = torch.randn(2, 5, attn.qkv.in_features)
    mask = torch.zeros(5, 5).masked_fill(torch.rand(5, 5) > 0.7, float("-inf")).fill_diagonal_(0)
    with torch.no_grad():
        for kwargs in ({"is_causal": True}, {"attn_mask": mask}):
            torch.testing.assert_close(wrapped(x, **kwargs), attn(x, **kwargs), rtol=1e-5, atol=1e-5)


class _AttentionWithExtraArg(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.num_heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x, attn_mask=None, rope=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


def test_attention_with_unsupported_forward_argument_is_left_fp_with_reason():
    model = nn.Sequential(_AttentionWithExtraArg(), nn.Linear(16, 4))
    q = quantkit.prepare(model, "bivit", rules={"1": {}})
    rec = quantkit.report(q)["0"]
    assert not rec.quantized and "rope" in rec.kept_fp_reason


# ---------------------------------------------------------------------------------------------- item 2
def test_nan_weight_is_refused_naming_the_layer(tmp_path):
    model = _cnn()
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    q = quantkit.prepare(model, "xnor")
    with pytest.raises(UnsupportedModelError, match=r"layer '2'.*weight has 1 NaN/Inf"):
        quantkit.convert(q)
    with pytest.raises(ExportError, match=r"layer '2'"):
        export_onnx(q, (torch.randn(1, 3, 6, 6),), tmp_path / "nan.onnx", quiet=True)
    model[2].weight.data.fill_(1.0)
    model[4] = nn.Flatten()
    with torch.no_grad():
        model[5].bias[0] = float("inf")
    with pytest.raises(ExportError, match=r"layer '5'.*bias"):  # a float model too
        export_onnx(model, (torch.randn(1, 3, 6, 6),), tmp_path / "inf.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []


class _NaNAfterConv(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_nan_output_names_the_first_layer(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), _NaNAfterConv(),
                          nn.Conv2d(8, 4, 3, padding=1)).eval()
    q = quantkit.prepare(model, "xnor")
    with pytest.raises(ExportError, match=r"NaN/Inf.*layer '2' \(_NaNAfterConv\)"):
        export_onnx(q, (torch.randn(1, 3, 6, 6),), tmp_path / "n.onnx", quiet=True)


def test_nan_difference_never_matches():
    from quantkit.export.onnx_export import _max_diff, _nan_max

    a = [torch.tensor([0.0, 1.0, 2.0])]
    b = [torch.tensor([0.0, float("nan"), 2.0])]
    d = _max_diff(a, b)
    assert not d <= 1.0
    assert _nan_max([0.5, float("nan"), 0.1]) != _nan_max([0.5, float("nan"), 0.1])  # NaN wins in any order
    assert _nan_max([float("nan"), 0.5]) != _nan_max([float("nan"), 0.5])


class _DataBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.a(x) if x.mean() > 0 else self.b(x)
        return self.head(y.mean((2, 3)))


def test_traced_data_branch_is_refused_unless_allowed(tmp_path):
    model = _DataBranch().eval()
    x = torch.randn(2, 3, 6, 6).abs()  # takes branch a
    q = quantkit.quantize(model, "w8a8", [torch.randn(4, 3, 6, 6) for _ in range(2)], example_inputs=(x,),
                          progress=False)
    assert quantkit.report(q).trace_method == "hooks"
    with pytest.raises(ExportError, match="branches on tensor values.*allow_traced_branch=True"):
        export_onnx(q, (x,), tmp_path / "b.onnx", quiet=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(RuntimeWarning, match="branches on tensor values"):
        export_onnx(q, (x,), tmp_path / "b.onnx", quiet=True, allow_traced_branch=True)
    # what the refusal protects against: the other branch is not in the file
    other = -x
    out = run_onnxruntime(str(tmp_path / "b.onnx"), ["input"], [other])[0]
    with torch.no_grad():
        assert abs(out - quantkit.convert(q)(other).numpy()).max() > 1e-3


def test_simulated_vs_deploy_beyond_tolerance_fails_with_per_layer_diagnosis(tmp_path, monkeypatch):
    from quantkit.nn import binary_deploy

    q = quantkit.prepare(_cnn(), "xnor")
    x = (torch.randn(2, 3, 6, 6),)
    original = binary_deploy.BinaryDeployConv2d.forward

    def shifted(self, inp):  # a deploy layer that is wrong by 0.5
        return original(self, inp) + 0.5

    monkeypatch.setattr(binary_deploy.BinaryDeployConv2d, "forward", shifted)
    with pytest.raises(ExportError, match=r"simulated vs deploy differs.*1 of 1 quantized layers differ.*'2' "
                                          r"\(BinaryDeployConv2d\): 0\.5"):
        export_onnx(q, x, tmp_path / "m.onnx", quiet=True, verify=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(RuntimeWarning, match="1 of 1 quantized layers differ"):
        res = export_onnx(q, x, tmp_path / "m.onnx", quiet=True, verify=False, allow_mismatch=True)
    assert res.agreement.simulated_vs_deploy > 0.1 and any("allow_mismatch" in n for n in res.agreement.notes)


def test_uncalibrated_ptq_model_is_refused(tmp_path):
    q = quantkit.prepare(_cnn(), "w8a8")
    with pytest.raises(UnsupportedModelError, match=r"layer '0'.*not calibrated.*quantkit.calibrate"):
        quantkit.convert(q)
    with pytest.raises(ExportError, match="not calibrated.*calibrate"):
        export_onnx(q, (torch.randn(1, 3, 6, 6),), tmp_path / "u.onnx", quiet=True)
    quantkit.calibrate(q, _calib(), progress=False)
    quantkit.convert(q)


# ---------------------------------------------------------------------------------------------- item 3
class _SharedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("scheme", ["w8a8", "xnor"])
def test_module_called_twice_exports_and_is_reported(tmp_path, scheme):
    model = _SharedBlock().eval()
    if scheme == "w8a8":
        q = quantkit.quantize(model, scheme, _calib((3, 8, 8)), progress=False)
    else:
        q = quantkit.prepare(model, scheme)
    rep = quantkit.report(q)
    assert rep["block"].info["calls"] == 2 and any("'block' (2 calls)" in n for n in rep.notes)
    res = export_onnx(q, (torch.randn(2, 3, 8, 8),), tmp_path / "t.onnx", quiet=True)
    assert "block/call2" in [layer.name for layer in res.layers]
    assert res.agreement.deploy_vs_onnxruntime <= 1e-4


# ---------------------------------------------------------------------------------------------- item 4
def test_bivit_convert_at_clb_stage1_is_what_was_trained(tmp_path):
    from quantkit.models.vit import vit_digits

    qat = quantkit.QAT(vit_digits(depth=2).eval(), "bivit")
    qat.epoch_start(0, 10)  # stage 1: MLP linears run in FP
    x = torch.randn(3, 1, 8, 8)
    deploy = qat.convert()
    assert isinstance(deploy.blocks[0].mlp.fc1, nn.Linear) and type(deploy.blocks[0].mlp.fc1) is nn.Linear
    qat.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), qat.model(x), rtol=1e-4, atol=1e-4)
    assert quantkit.report(deploy)["blocks.0.mlp.fc1"].bits_w is None
    res = export_onnx(qat.model, (x,), tmp_path / "s1.onnx", quiet=True)
    assert res.agreement.simulated_vs_deploy <= 1e-4
    qat.epoch_start(9, 10)  # stage 2: binary again
    assert type(qat.convert().blocks[0].mlp.fc1).__name__ == "BinaryDeployLinear"


# ---------------------------------------------------------------------------------------------- item 6
def test_uniform_report_covers_multihead_attention_in_proj():
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=3).eval()
    q = quantkit.quantize(model, "w8a8", [torch.randn(4, 3, 8, 8)], progress=False)
    rep = quantkit.report(q)
    mha = rep["encoder.layers.encoder_layer_0.self_attention"]
    assert not mha.quantized and "in_proj_weight" in mha.kept_fp_reason
    assert mha.bytes_before == (3 * 16 * 16 + 3 * 16) * 4
    out = rep["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert "attention pass" not in out.kept_fp_reason
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert rep.size_before() + rep.other_bytes == total
    assert "every parameter of the model" in rep.table()


# ---------------------------------------------------------------------------------------------- item 10 (last)
def test_binary_export_has_no_unused_initializers(tmp_path):
    from quantkit.models.vit import vit_digits

    qat = quantkit.QAT(vit_digits(depth=1).eval(), "bivit")
    export_onnx(qat.model, (torch.randn(2, 1, 8, 8),), tmp_path / "v.onnx", quiet=True)
    graph = onnx.load(str(tmp_path / "v.onnx")).graph
    used = {i for node in graph.node for i in node.input}
    assert [t.name for t in graph.initializer if t.name not in used] == []
