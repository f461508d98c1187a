"""BiViT on torchvision's ViT (nn.MultiheadAttention) and Swin (ShiftedWindowAttention): rewrite, report every
attention block, output shape, one training step, rewiring check and deploy == simulated. Small configurations of
the same classes keep it fast; one forward/backward each through the real ``vit_b_16`` / ``swin_t`` builders."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_t, vit_b_16
from torchvision.models.swin_transformer import (ShiftedWindowAttention, ShiftedWindowAttentionV2, SwinTransformer,
                                                 SwinTransformerBlockV2, PatchMergingV2)
from torchvision.models.vision_transformer import VisionTransformer

import quantkit
from quantkit.nn.bivit import (BinaryAttentionDeploy, BinaryLinearPWS, BinaryMultiheadAttention,
                               BinaryShiftedWindowAttention)


def _small_vit() -> nn.Module:
    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=10)
    nn.init.normal_(m.heads.head.weight, std=0.5)  # torchvision zero-initialises the head
    return m


def _small_swin(**kw) -> nn.Module:
    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10, **kw)


def _set_binarize(model: nn.Module, value: bool) -> None:
    for m in model.modules():
        if hasattr(m, "binarize"):
            m.binarize = value


CASES = [("vit", _small_vit, nn.MultiheadAttention, BinaryMultiheadAttention),
         ("swin", _small_swin, ShiftedWindowAttention, BinaryShiftedWindowAttention)]


@pytest.mark.parametrize("scheme", ["bivit", "bivit_full", "bibert"])
@pytest.mark.parametrize("label,build,fp_type,bin_type", CASES, ids=[c[0] for c in CASES])
def test_torchvision_rewrite_train_deploy(label, build, fp_type, bin_type, scheme):
    torch.manual_seed(0)
    model = build().eval()
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    ref = model(x)
    attention_names = {n for n, m in model.named_modules() if isinstance(m, fp_type)}
    qat = quantkit.QAT(model, scheme)
    m, rep = qat.model, qat.report()
    # every attention block is rewritten and listed
    assert {r.name for r in rep.records if r.new_type == bin_type.__name__} == attention_names
    assert all(isinstance(m.get_submodule(n), bin_type) for n in attention_names)
    # patch embedding and head stay FP and are reported; every MLP linear is binary
    kept = {r.name: r.kept_fp_reason for r in rep.kept_fp}
    head = "heads.head" if label == "vit" else "head"
    assert head in kept and type(m.get_submodule(head)) is nn.Linear
    assert any(isinstance(mod, nn.Conv2d) for mod in m.modules())
    mlps = [mod for mod in m.modules() if isinstance(mod, BinaryLinearPWS) and mod.role == "mlp"]
    assert len(mlps) == 2 * len(attention_names)
    if label == "swin":
        assert "features.2.reduction" in kept  # patch merging stays FP
        assert isinstance(m.features[1][0].attn.relative_position_bias_table, nn.Parameter)
    # rewiring: with binarization off, the rewritten model computes the float model
    _set_binarize(m, False)
    assert torch.allclose(m.eval()(x), ref, atol=1e-4)
    _set_binarize(m, True)
    # one training step under the QAT schedule (stage 1 of CLB for bivit: MLPs FP)
    qat.epoch_start(0, 2)
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    out = m(x)
    assert out.shape == (3, 10)
    loss = F.cross_entropy(out, y) + qat.distillation_loss(out, ref, 2.0)
    loss.backward()
    first = m.get_submodule(sorted(attention_names)[0])
    lin = first.in_proj if label == "vit" else first.qkv
    assert torch.isfinite(loss) and lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
    opt.step()
    # stage 2, then deploy == simulated (integer parts exact; the float epilogues agree to rounding)
    qat.epoch_start(1, 2)
    assert all(mod.binarize for mod in mlps)
    d = qat.convert()
    assert all(isinstance(d.get_submodule(n), BinaryAttentionDeploy) for n in attention_names)
    m.eval()
    with torch.no_grad():
        assert torch.allclose(d(x), m(x), atol=1e-4, rtol=1e-4)


def test_swin_v2_attention_is_left_fp_and_reported():
    model = _small_swin(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2)
    p = quantkit.prepare(model, "bivit")
    rep = quantkit.report(p)
    names = [n for n, m in model.named_modules() if isinstance(m, ShiftedWindowAttentionV2)]
    assert names and all("not supported" in rep[n].kept_fp_reason for n in names)
    assert all(type(p.get_submodule(n)) is ShiftedWindowAttentionV2 for n in names)
    assert p(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_multihead_attention_masks_and_layouts():
    torch.manual_seed(5)
    fp = nn.MultiheadAttention(16, 2, batch_first=False)
    b = BinaryMultiheadAttention.from_float(fp, quantkit.get_scheme("bivit"), "mha")
    q, kv = torch.randn(5, 2, 16), torch.randn(7, 2, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[:, 5:] = True
    b.binarize = False  # float path equals torch's module, masks and (L, N, E) layout included
    b.in_proj.binarize = b.out_proj.binarize = False
    ref, ref_w = fp(q, kv, kv, key_padding_mask=pad)
    out, w = b(q, kv, kv, key_padding_mask=pad)
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(w, ref_w, atol=1e-6)
    b.binarize = b.in_proj.binarize = b.out_proj.binarize = True
    out, w = b(q, kv, kv, key_padding_mask=pad)
    assert out.shape == (5, 2, 16) and not w[..., 5:].any()  # padded keys never selected by SAB
    d = b.eval().to_deploy()
    assert torch.allclose(d(q, kv, kv, key_padding_mask=pad)[0], b(q, kv, kv, key_padding_mask=pad)[0], atol=1e-5)
    # a float checkpoint of nn.MultiheadAttention loads into the binary module
    b2 = BinaryMultiheadAttention.from_float(nn.MultiheadAttention(16, 2), quantkit.get_scheme("bivit"), "mha")
    b2.load_state_dict(fp.state_dict())
    assert torch.equal(b2.in_proj.weight, fp.in_proj_weight)


@pytest.mark.parametrize("build,size", [(lambda: vit_b_16(image_size=32), 32), (swin_t, 32)], ids=["vit_b_16", "swin_t"])
def test_real_torchvision_builders_forward_backward(build, size):
    torch.manual_seed(0)
    model = build()
    fp_type = nn.MultiheadAttention if isinstance(model, VisionTransformer) else ShiftedWindowAttention
    names = {n for n, m in model.named_modules() if isinstance(m, fp_type)}
    p = quantkit.prepare(model, "bivit")
    rep = quantkit.report(p)
    assert len(names) == 12 and {r.name for r in rep.quantized if r.name in names} == names
    out = p(torch.randn(1, 3, size, size))
    assert out.shape == (1, 1000)
    out.square().mean().backward()
    assert all(p.get_submodule(n).out_proj.weight.grad is not None if fp_type is nn.MultiheadAttention
               else p.get_submodule(n).proj.weight.grad is not None for n in names)
