"""AdaBin quantizers and layers against the formulas of the official code (docs/algorithms.md#adabin)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantkit.nn.adabin import AdaBinConv2d, AdaBinLinear, AdaBinOptions, Maxout
from quantkit.nn.binary_deploy import BinaryDeployConv2d, BinaryDeployLinear
from quantkit.nn.base import NotQuantizable
from quantkit.quantizers.adabin import (adabin_activation, adabin_weight, adabin_weight_params, approx_sign,
                                        approx_sign_grad, ede_schedule, ede_sign)


@pytest.fixture(autouse=True)
def _one_thread():
    """These small models run fastest single-threaded (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_approx_sign_derivative(x: torch.Tensor) -> torch.Tensor:
    """docs/algorithms.md#adabin-activation-binarizer: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere."""
    zero = torch.zeros_like(x)
    return torch.where((x >= -1) & (x < 0), 2 + 2 * x, torch.where((x >= 0) & (x < 1), 2 - 2 * x, zero))


def official_activation_autograd(a, alpha, beta):
    """The official BinaryActivation.forward (detach trick over the Bi-Real polynomial), for autograd comparison."""
    x = (a - beta) / alpha
    poly = torch.where(x < -1, -torch.ones_like(x), torch.where(x < 0, x * x + 2 * x,
                                                                torch.where(x < 1, -x * x + 2 * x, torch.ones_like(x))))
    sign = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
    b = sign.detach() - poly.detach() + poly
    return alpha * (b + beta)


def _act_inputs(n=4000, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(n, generator=g, dtype=dtype) * 1.5
    alpha = torch.tensor(0.7, dtype=dtype)
    beta = torch.tensor(0.3, dtype=dtype)
    grad_out = torch.randn(n, generator=g, dtype=dtype)
    return a, alpha, beta, grad_out


# ---------------------------------------------------------------------------------------------- activations
def test_activation_code_form_levels_and_threshold_worked_example():
    # docs/algorithms.md#adabin-activation-binarizer: alpha = 2, beta = 0.5 gives levels {-1, 3} and threshold 0.5
    a = torch.tensor([-3.0, 0.0, 0.49, 0.5, 0.51, 7.0])
    out = adabin_activation(a, torch.tensor(2.0), torch.tensor(0.5))
    assert out.tolist() == [-1.0, -1.0, -1.0, 3.0, 3.0, 3.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activation_code_form_levels_exact(dtype):
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        a = torch.randn(500, generator=g, dtype=dtype)
        alpha = torch.rand((), generator=g, dtype=dtype) + 0.2
        beta = torch.randn((), generator=g, dtype=dtype)
        out = adabin_activation(a, alpha, beta, "code")
        a_hat = (a - beta) / alpha
        expect = torch.where(a_hat >= 0, alpha * (1 + beta), alpha * (-1 + beta))
        assert torch.equal(out, expect)
        assert set(out.unique().tolist()) <= {float(alpha * (beta - 1)), float(alpha * (beta + 1))}
        # the threshold is beta (alpha > 0): sign(0) = +1 at a == beta
        at_beta = adabin_activation(beta.reshape(1), alpha, beta, "code")
        assert at_beta.item() == (alpha * (beta + 1)).item()


def test_activation_code_form_three_gradients_exact():
    a, alpha, beta, g = _act_inputs()
    a.requires_grad_(True)
    al, be = alpha.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    adabin_activation(a, al, be, "code").backward(g)
    a_hat = (a.detach() - beta) / alpha
    s = official_approx_sign_derivative(a_hat)
    b = torch.where(a_hat >= 0, 1.0, -1.0).to(a.dtype)
    assert torch.equal(a.grad, g * s)  # d a_b / d a = s'(a_hat)
    assert torch.equal(be.grad, (g * (alpha - s)).sum())  # d a_b / d beta = alpha - s'(a_hat)
    assert torch.equal(al.grad, (g * (b + beta - a_hat * s)).sum())  # d a_b / d alpha = b + beta - a_hat s'


def test_activation_code_form_matches_autograd_of_official_forward():
    a, alpha, beta, g = _act_inputs()
    ours = [t.clone().requires_grad_(True) for t in (a, alpha, beta)]
    ref = [t.clone().requires_grad_(True) for t in (a, alpha, beta)]
    y = adabin_activation(*ours, form="code")
    y_ref = official_activation_autograd(*ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)  # the detach trick rounds the forward slightly
    y.backward(g)
    y_ref.backward(g)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.grad, r.grad, rtol=1e-12, atol=1e-12)


def test_activation_paper_form_levels_and_gradients():
    a, alpha, beta, g = _act_inputs()
    a.requires_grad_(True)
    al, be = alpha.clone().requires_grad_(True), beta.clone().requires_grad_(True)
    out = adabin_activation(a, al, be, "paper")
    a_hat = (a.detach() - beta) / alpha
    b = torch.where(a_hat >= 0, 1.0, -1.0).to(a.dtype)
    assert torch.equal(out.detach(), alpha * b + beta)  # levels {beta - alpha, beta + alpha}
    out.backward(g)
    s = official_approx_sign_derivative(a_hat)
    assert torch.equal(a.grad, g * s)
    assert torch.equal(be.grad, (g * (1 - s)).sum())
    assert torch.equal(al.grad, (g * (b - a_hat * s)).sum())


def test_activation_bad_form_raises():
    with pytest.raises(ValueError, match="form"):
        adabin_activation(torch.zeros(2), torch.tensor(1.0), torch.tensor(0.0), "both")


def test_activation_parameter_grads_accumulate_in_parameter_precision_under_bf16():
    a = torch.randn(64).bfloat16().requires_grad_(True)
    alpha = torch.tensor(1.0, requires_grad=True)
    beta = torch.tensor(0.1, requires_grad=True)
    out = adabin_activation(a, alpha, beta)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert alpha.grad.dtype == torch.float32 and beta.grad.dtype == torch.float32 and a.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------- surrogates
def test_approx_sign_forward_and_derivative():
    x = torch.tensor([-1.5, -1.0, -0.75, -0.5, 0.0, 0.25, 0.5, 0.999, 1.0, 2.0], dtype=torch.float64,
                     requires_grad=True)
    y = approx_sign(x)
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1, 1]  # sign(0) = +1
    y.sum().backward()
    assert torch.equal(x.grad, official_approx_sign_derivative(x.detach()))
    assert x.grad.tolist()[:9] == [0.0, 0.0, 0.5, 1.0, 2.0, 1.5, 1.0, 2 - 2 * 0.999, 0.0]
    assert torch.equal(approx_sign_grad(x.detach()), official_approx_sign_derivative(x.detach()))


def test_ede_sign_gradient_formula():
    u = torch.randn(300, dtype=torch.float64, requires_grad=True)
    g = torch.randn(300, dtype=torch.float64)
    k, t = torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    y = ede_sign(u, k, t)
    assert torch.equal(y.detach(), torch.where(u.detach() >= 0, 1.0, -1.0).double())
    y.backward(g)
    assert torch.equal(u.grad, k * t * (1 - torch.pow(torch.tanh(u.detach() * t), 2)) * g)


@pytest.mark.parametrize("total", [1, 4, 10, 120])
def test_ede_schedule_formula(total):
    for e in range(total):
        k, t = ede_schedule(e, total)
        assert t == pytest.approx(10 ** (-3 + 4 * e / total), rel=1e-12)
        assert k == pytest.approx(1 / t if t < 1 else 1.0, rel=1e-12)
    assert ede_schedule(0, total) == pytest.approx((1000.0, 1e-3))


def test_ede_schedule_landmarks_and_bad_input():
    assert ede_schedule(30, 120) == pytest.approx((100.0, 0.01))
    assert ede_schedule(90, 120) == pytest.approx((1.0, 1.0))
    assert ede_schedule(5, 10, t_min=0.1, t_max=10.0) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError):
        ede_schedule(0, 0)
    with pytest.raises(ValueError):
        ede_schedule(0, 10, t_min=1.0, t_max=0.5)


# ---------------------------------------------------------------------------------------------- weights
def test_weight_levels_per_channel_population_std():
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    wb = adabin_weight(w)
    flat = w.flatten(1)
    beta = flat.mean(1)
    alpha = flat.std(1, unbiased=False)
    alpha_q, beta_q = adabin_weight_params(w)
    torch.testing.assert_close(alpha_q.flatten(), alpha, rtol=1e-14, atol=0)
    torch.testing.assert_close(beta_q.flatten(), beta, rtol=1e-14, atol=1e-16)
    w_hat = (w - beta_q) / alpha_q
    expect = torch.where(w_hat >= 0, alpha_q * 1 + beta_q, alpha_q * -1 + beta_q)
    assert torch.equal(wb, expect)
    for o in range(6):
        levels = sorted(wb[o].unique().tolist())
        assert levels == pytest.approx([(beta[o] - alpha[o]).item(), (beta[o] + alpha[o]).item()], rel=1e-12)


def test_weight_gradient_flows_through_alpha_and_beta():
    """Autograd of W_b = alpha_w * EDE-sign(W_hat) + beta_w equals autograd of an independent rewrite whose sign
    surrogate is the detach trick sign + k*tanh(t*u) - stop_grad(k*tanh(t*u)) (derivative k t (1 - tanh^2))."""
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    g = torch.randn_like(w)
    k, t = 2.5, 0.3
    w1 = w.clone().requires_grad_(True)
    adabin_weight(w1, k, t).backward(g)
    w2 = w.clone().requires_grad_(True)
    beta = w2.mean((1, 2, 3), keepdim=True)
    alpha = torch.sqrt(((w2 - beta) ** 2).sum((1, 2, 3), keepdim=True) / 27)  # official: sum / filter_size
    u = (w2 - beta) / alpha
    smooth = k * torch.tanh(t * u)
    sign = torch.where(u >= 0, 1.0, -1.0).double()
    (alpha * (sign.detach() + smooth - smooth.detach()) + beta).backward(g)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    # the alpha/beta paths matter: detaching them gives a different gradient
    w3 = w.clone().requires_grad_(True)
    a3, b3 = alpha.detach(), beta.detach()
    u3 = (w3 - b3) / a3
    s3 = k * torch.tanh(t * u3)
    (a3 * (torch.where(u3 >= 0, 1.0, -1.0).double().detach() + s3 - s3.detach()) + b3).backward(g)
    assert not torch.allclose(w3.grad, w1.grad)


def test_weight_constant_channel_is_finite():
    w = torch.zeros(2, 8, requires_grad=True)
    wb = adabin_weight(w)
    (wb * torch.randn(2, 8)).sum().backward()
    assert torch.isfinite(wb).all() and torch.isfinite(w.grad).all()
    assert wb.abs().max() < 1e-15


# ---------------------------------------------------------------------------------------------- Maxout
def test_maxout_formula_init_and_grads():
    m = Maxout(3)
    assert m.pos_scale.tolist() == [1.0] * 3 and m.neg_scale.tolist() == [0.25] * 3
    with torch.no_grad():
        m.pos_scale.copy_(torch.tensor([1.0, 2.0, 0.5]))
        m.neg_scale.copy_(torch.tensor([0.25, -0.1, 0.0]))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = m(x)
    pos = m.pos_scale.view(1, 3, 1, 1)
    neg = m.neg_scale.view(1, 3, 1, 1)
    torch.testing.assert_close(y, torch.where(x > 0, pos * x, neg * x))
    y.sum().backward()
    torch.testing.assert_close(m.pos_scale.grad, x.detach().clamp_min(0).sum((0, 2, 3)))
    torch.testing.assert_close(m.neg_scale.grad, -(-x.detach()).clamp_min(0).sum((0, 2, 3)))
    assert Maxout(5)(torch.randn(7, 5)).shape == (7, 5)  # also after linear layers


# ---------------------------------------------------------------------------------------------- layers
def test_conv_layer_matches_functional_formulas_and_loads_float_checkpoint():
    conv = nn.Conv2d(5, 7, 3, padding=1, bias=True)
    layer = AdaBinConv2d.from_float(conv)
    # the activation quantizer owns alpha_a/beta_a; the state_dict keeps the layer's flat names
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "input_quantizer.alpha_a", "input_quantizer.beta_a"}
    assert set(layer.state_dict()) == {"weight", "bias", "alpha_a", "beta_a", "ede_k", "ede_t"}
    layer.load_state_dict(conv.state_dict())  # float checkpoint: no alpha_a/beta_a/ede_* keys, still strict
    with torch.no_grad():
        layer.alpha_a.fill_(1.3)
        layer.beta_a.fill_(-0.2)
    x = torch.randn(2, 5, 6, 6)
    a_b = adabin_activation(x, layer.alpha_a, layer.beta_a)
    w_b = adabin_weight(conv.weight, 10.0, 0.1)
    torch.testing.assert_close(layer(x), F.conv2d(a_b, w_b, conv.bias, padding=1))
    sd = layer.state_dict()
    assert {"ede_k", "ede_t", "alpha_a", "beta_a"} <= set(sd)


def test_epoch_start_sets_ede_schedule_and_progressive_off():
    layer = AdaBinConv2d.from_float(nn.Conv2d(4, 4, 3))
    assert (layer.ede_k.item(), layer.ede_t.item()) == pytest.approx((10.0, 0.1))
    layer.epoch_start(3, 4)
    assert (layer.ede_k.item(), layer.ede_t.item()) == pytest.approx((1.0, 1.0), rel=1e-6)

    fixed = AdaBinConv2d.from_float(nn.Conv2d(4, 4, 3), AdaBinOptions(progressive=False))
    fixed.epoch_start(3, 4)
    assert fixed.ede_t.item() == pytest.approx(0.1)


def test_grouped_and_depthwise_conv_not_quantizable():
    with pytest.raises(NotQuantizable, match="depthwise"):
        AdaBinConv2d.from_float(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(NotQuantizable, match="padding_mode"):
        AdaBinConv2d.from_float(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))


def test_string_padding():
    same = AdaBinConv2d.from_float(nn.Conv2d(3, 4, 3, padding="same"))
    assert same.padding == (1, 1)
    with pytest.raises(NotQuantizable, match="asymmetric"):
        AdaBinConv2d.from_float(nn.Conv2d(3, 4, 2, padding="same"))


# ---------------------------------------------------------------------------------------------- bitwise form
def _Cfg(**options):  # the layers' options (scheme configs inherit them); every conv binarized
    return AdaBinOptions(keep_downsample=False, **options)


def _randomize_act(layer, alpha, beta):
    with torch.no_grad():
        layer.alpha_a.fill_(alpha)
        layer.beta_a.fill_(beta)


@settings(max_examples=30, deadline=None)
@given(
    c_in=st.integers(1, 70), c_out=st.integers(1, 9), k=st.sampled_from([1, 2, 3, 5]), stride=st.integers(1, 2),
    padding=st.integers(0, 2), dilation=st.integers(1, 2), hw=st.integers(5, 9), bias=st.booleans(),
    form=st.sampled_from(["code", "paper"]), alpha=st.floats(0.3, 2.0), beta=st.floats(-0.9, 0.9),
    batch=st.integers(1, 2), seed=st.integers(0, 2**16),
)
def test_deploy_conv_equals_simulated(c_in, c_out, k, stride, padding, dilation, hw, bias, form, alpha, beta, batch,
                                      seed):
    if (hw + 2 * padding - dilation * (k - 1) - 1) < 0:
        return
    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, bias=bias)
    sim = AdaBinConv2d.from_float(conv, _Cfg(act_form=form)).eval()
    _randomize_act(sim, alpha, beta)
    dep = sim.to_deploy()
    assert isinstance(dep, BinaryDeployConv2d)
    # the deploy layer holds packed weights and per-channel constants, no float weight
    assert dep.weight_packed.dtype == torch.int32 and not any(True for _ in dep.parameters())
    x = torch.randn(batch, c_in, hw, hw) + beta
    with torch.no_grad():
        ref = sim(x)
        out = dep(x)
    assert out.shape == ref.shape
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * scale * math.sqrt(c_in * k * k))


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 100), n=st.integers(1, 9), bias=st.booleans(), form=st.sampled_from(["code", "paper"]),
       alpha=st.floats(0.3, 2.0), beta=st.floats(-0.9, 0.9), seed=st.integers(0, 2**16))
def test_deploy_linear_equals_simulated(k, n, bias, form, alpha, beta, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    sim = AdaBinLinear.from_float(lin, _Cfg(act_form=form)).eval()
    _randomize_act(sim, alpha, beta)
    dep = sim.to_deploy()
    assert isinstance(dep, BinaryDeployLinear)
    x = torch.randn(3, 2, k)
    with torch.no_grad():
        ref, out = sim(x), dep(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() + 1) * math.sqrt(k))


def test_deploy_weight_only_layers():
    conv = nn.Conv2d(6, 4, 3, padding=1)
    sim = AdaBinConv2d.from_float(conv, _Cfg(weight_only=True)).eval()
    assert sim.bits_a is None and sim.alpha_a is None
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(sim.to_deploy()(x), sim(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sim(x), F.conv2d(x, adabin_weight(conv.weight), conv.bias, padding=1))
    lin = AdaBinLinear.from_float(nn.Linear(40, 3), _Cfg(weight_only=True)).eval()
    x = torch.randn(4, 40)
    with torch.no_grad():
        torch.testing.assert_close(lin.to_deploy()(x), lin(x), rtol=1e-5, atol=1e-5)


def test_deploy_negative_alpha_keeps_simulated_signs():
    """alpha_a is unconstrained: with alpha_a < 0 the comparison flips; deploy uses the same a_hat."""
    sim = AdaBinConv2d.from_float(nn.Conv2d(3, 2, 3, padding=1)).eval()
    _randomize_act(sim, -0.8, 0.2)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(sim.to_deploy()(x), sim(x), rtol=1e-5, atol=1e-5)
