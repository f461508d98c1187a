"""BiViT's binary signs against a small re-implementation of the official code's formulas on identical tensors.

The official ``BinaryQuantizer`` (``binary_modules/utils_quant.py``) computes ``torch.sign(x)`` (so 0 -> 0) and passes
the incoming gradient except where ``x >= 1`` or ``x <= -1``. ``BinaryLinear_adapscaling`` binarizes its input with it
and its weight as ``s * BinaryQuantizer(W - mean_row(W))``; ``BiAttention_SAB`` signs q, k, v with it, binarizes
``softmax(q k^T * d^-1/2)`` with threshold ``0.25 * row max`` (straight through to the softmax output) and projects
``A_b V_b``. The re-implementations below follow that description (docs/algorithms.md#bivit-official-code-numerics).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import quantkit
from quantkit.errors import ConfigError
from quantkit.nn.bivit import BinaryLinearPWS, BinaryQKVAttention, binary_attention
from quantkit.quantizers.softmax import bivit_sign, pws_sign
from quantkit.schemes.bivit import BiViTConfig


# ------------------------------------------------------------------------------------------------ official formulas
class _OfficialSign(torch.autograd.Function):
    """forward torch.sign(x); backward: the gradient, zeroed where x >= 1 or x <= -1."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.masked_fill((x >= 1) | (x <= -1), 0.0)


def official_sign(x):
    return _OfficialSign.apply(x)


def official_pws_linear(x, weight, scale, bias, binary_input=True):
    centred = weight - weight.mean(dim=-1, keepdim=True)
    w_b = scale * official_sign(centred)
    x_in = official_sign(x) if binary_input else x
    return F.linear(x_in, w_b) + bias


def official_sab_attention(x, qkv_w, qkv_s, qkv_b, proj_w, proj_s, proj_b, heads):
    """Returns the output and the projection's input (the counts A_b V_b, merged over heads)."""
    b, n, c = x.shape
    qkv = official_pws_linear(x, qkv_w, qkv_s, qkv_b).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = official_sign(qkv).unbind(0)
    z = (q @ k.transpose(-2, -1)) * (c // heads) ** -0.5
    p = z.softmax(-1)
    hard = torch.where(p < 0.25 * p.amax(-1, keepdim=True), 0.0, 1.0).to(p.dtype)
    a = hard.detach() - p.detach() + p
    counts = (a @ v).transpose(1, 2).reshape(b, n, c)
    return official_pws_linear(counts, proj_w, proj_s, proj_b), counts


# ------------------------------------------------------------------------------------------------ the sign
EDGES = torch.tensor([-2.0, -1.0, -0.9999, -0.5, -0.0, 0.0, 0.25, 0.9999, 1.0, 1.5], dtype=torch.float64)


@pytest.mark.parametrize("sign_of_zero", [0, 1])
def test_bivit_sign_against_official_binary_quantizer(sign_of_zero):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([EDGES, torch.randn(200, generator=gen, dtype=torch.float64) * 1.5])
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    b_ours, b_ref = bivit_sign(ours, sign_of_zero), official_sign(ref)
    (b_ours * g).sum().backward()
    (b_ref * g).sum().backward()
    zero = x == 0
    if sign_of_zero == 0:
        assert torch.equal(b_ours, b_ref)                 # {-1, 0, +1}, as torch.sign
    else:
        assert torch.equal(b_ours[~zero], b_ref[~zero])
        assert (b_ours[zero] == 1).all()                  # the packable convention
    # the gradient window is open, |x| < 1, whatever sign(0) is: at x = +-1 exactly nothing passes
    assert torch.equal(ours.grad, ref.grad)
    assert (ours.grad[x.abs() == 1] == 0).all() and (ours.grad[x.abs() == 0.9999] != 0).all()


def test_bivit_sign_rejects_other_zero_values():
    with pytest.raises(ConfigError, match="sign_of_zero"):
        bivit_sign(torch.zeros(3), 2)
    with pytest.raises(ConfigError, match="sign_of_zero"):
        BiViTConfig(sign_of_zero=-1).validate()
    with pytest.raises(ConfigError, match="sign_of_zero"):
        quantkit.get_scheme("bivit", sign_of_zero=True)


# ------------------------------------------------------------------------------------------------ PWS linear
@pytest.mark.parametrize("binary_input", [True, False])
def test_pws_linear_with_official_sign_equals_official_adapscaling(binary_input):
    gen = torch.Generator().manual_seed(1)
    lin = nn.Linear(6, 4).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.8)
        lin.weight[0] = torch.tensor([1.0, 0.0, -1.0, 2.0, -2.0, 0.0])  # centred: exact 0 and exact +-1 taps
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    x[0, :3] = torch.tensor([0.0, 1.0, -1.0])                         # exact 0 and +-1 inputs
    layer = BinaryLinearPWS.from_float(lin, BiViTConfig(sign_of_zero=0), binary_input=binary_input)
    g = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    xo = x.clone().requires_grad_()
    y = layer(xo)
    (y * g).sum().backward()

    w = lin.weight.detach().clone().requires_grad_()
    s = lin.weight.detach().abs().mean(1, keepdim=True).requires_grad_()  # the official first-forward init
    bias = lin.bias.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y_ref = official_pws_linear(xr, w, s, bias, binary_input)
    (y_ref * g).sum().backward()

    assert (pws_sign(lin.weight.detach(), 0)[0] == torch.tensor([1.0, 0.0, -1.0, 1.0, -1.0, 0.0])).all()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.scale.grad, s.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------ whole attention
class _TimmAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop, self.proj_drop = nn.Dropout(0.0), nn.Dropout(0.0)


def _attention_pair(sign_of_zero, seed=2, dim=16, heads=2, tokens=9):
    gen = torch.Generator().manual_seed(seed)
    float_attn = _TimmAttention(dim, heads).double()
    with torch.no_grad():
        for p in float_attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    binary = BinaryQKVAttention.from_float(float_attn, BiViTConfig(sign_of_zero=sign_of_zero))
    x = torch.randn(2, tokens, dim, generator=gen, dtype=torch.float64)
    return float_attn, binary, x


def _official_leaves(float_attn):
    qw = float_attn.qkv.weight.detach().clone().requires_grad_()
    pw = float_attn.proj.weight.detach().clone().requires_grad_()
    qs = qw.detach().abs().mean(1, keepdim=True).requires_grad_()
    ps = pw.detach().abs().mean(1, keepdim=True).requires_grad_()
    qb = float_attn.qkv.bias.detach().clone().requires_grad_()
    pb = float_attn.proj.bias.detach().clone().requires_grad_()
    return qw, qs, qb, pw, ps, pb


def test_attention_with_official_sign_equals_official_sab_attention():
    float_attn, binary, x = _attention_pair(sign_of_zero=0)
    binary.train()
    leaves = _official_leaves(float_attn)
    y_ref, counts = official_sab_attention(x, *leaves, heads=2)
    assert (counts == 0).any()  # the projection's input is an integer count: exact zeros are common there
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (y_ref * g).sum().backward()
    y = binary(x)
    (y * g).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    qw, qs, qb, pw, ps, pb = leaves
    for ours, ref in ((binary.qkv.weight, qw), (binary.qkv.scale, qs), (binary.qkv.bias, qb),
                      (binary.proj.weight, pw), (binary.proj.scale, ps), (binary.proj.bias, pb)):
        torch.testing.assert_close(ours.grad, ref.grad, rtol=0, atol=1e-9)


def test_default_sign_of_zero_differs_from_official_only_through_zeros():
    """sign(0) = +1 (the default) changes the projection's input wherever A_b V_b = 0, hence the outputs."""
    float_attn, official_like, x = _attention_pair(sign_of_zero=0)
    _, default, _ = _attention_pair(sign_of_zero=1)
    with torch.no_grad():
        y0, y1 = official_like(x), default(x)
        q, k, v = torch.randn(3, 1, 2, 7, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        same0, _ = binary_attention(q, k, v, sign_of_zero=0)
        same1, _ = binary_attention(q, k, v, sign_of_zero=1)
    assert (y0 - y1).abs().max() > 1e-3
    # q, k, v without exact zeros: the core gives the same counts either way
    assert torch.equal(same0, same1)


def test_sign_of_zero_0_is_simulation_only():
    float_attn, binary, _ = _attention_pair(sign_of_zero=0)
    with pytest.raises(ConfigError, match="packed bit has no 0"):
        binary.to_deploy()
    binary.qkv.sign_of_zero = binary.proj.sign_of_zero = binary.sign_of_zero = 1
    assert binary.to_deploy() is not None  # the documented way out: back to sign(0) = +1, then convert


def test_scheme_option_reaches_every_binary_sign():
    from quantkit.models.vit import vit_digits

    torch.manual_seed(0)
    prepared = quantkit.prepare(vit_digits(depth=1, embed_dim=16, num_heads=2), "bivit", sign_of_zero=0)
    signs = [m.sign_of_zero for m in prepared.modules() if isinstance(m, (BinaryLinearPWS, BinaryQKVAttention))]
    assert len(signs) == 5 and set(signs) == {0}  # qkv, proj, fc1, fc2 and the attention core
    with pytest.raises(ConfigError, match="sign_of_zero"):
        quantkit.convert(prepared)
