"""Full-precision AdderNet layers: forward and the AdderNet backward against an explicit float64 unfold reference,
chunking, the adaptive learning-rate scaling, the conversion pass and the model builders."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quantkit.errors import ConfigError, UnsupportedModelError
from quantkit.models import adder_resnet18, adder_resnet20
from quantkit.graph import adderize
from quantkit.nn.adder import AdderConv2d, AdderLinear, adder_conv2d_fp, adder_input_grad, set_chunk_elements


def reference_conv(x, w, stride, padding, dilation):
    """float64 unfold reference of the adder conv and of its AdderNet gradients (docs/algorithms.md#addernet)."""
    n, c, h, wd = x.shape
    cout, _, kh, kw = w.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, K, L)
    wc = w.reshape(cout, -1)
    diff = cols[:, None, :, :] - wc[None, :, :, None]  # (N, O, K, L) -- fine for tiny shapes
    y = -diff.abs().sum(2)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    return y.reshape(n, cout, ho, wo), cols, wc, diff


def reference_grads(x, w, g, stride, padding, dilation):
    _, cols, wc, diff = reference_conv(x, w, stride, padding, dilation)
    gl = g.reshape(g.shape[0], g.shape[1], -1)  # (N, O, L)
    grad_w = (diff * gl[:, :, None, :]).sum((0, 3)).reshape(w.shape)  # sum (X - W) g
    grad_cols = (torch.clamp(-diff, -1, 1) * gl[:, :, None, :]).sum(1)  # sum HT(W - X) g
    grad_x = F.fold(grad_cols, x.shape[2:], w.shape[2:], dilation=dilation, padding=padding, stride=stride)
    return grad_x, grad_w


conv_cases = st.tuples(
    st.integers(1, 3),  # batch
    st.integers(1, 5),  # in channels
    st.integers(1, 6),  # out channels
    st.integers(3, 9),  # height
    st.integers(3, 9),  # width
    st.integers(1, 3),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
)


@settings(max_examples=40, deadline=None)
@given(conv_cases, st.integers(0, 10_000))
def test_conv_forward_backward_match_unfold_reference(case, seed):
    n, c, cout, h, wd, k, s, p, d = case
    if (h + 2 * p - d * (k - 1) - 1) < 0 or (wd + 2 * p - d * (k - 1) - 1) < 0:
        return
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, wd, generator=gen, dtype=torch.float64)
    w = torch.randn(cout, c, k, k, generator=gen, dtype=torch.float64) * 0.7
    y_ref, *_ = reference_conv(x, w, s, p, d)
    g = torch.randn(y_ref.shape, generator=gen, dtype=torch.float64)
    gx_ref, gw_ref = reference_grads(x, w, g, s, p, d)

    xf = x.float().requires_grad_()
    wf = w.float().requires_grad_()
    y = adder_conv2d_fp(xf, wf, None, s, p, d, eta=None)
    y.backward(g.float())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xf.grad.double(), gx_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(wf.grad.double(), gw_ref, rtol=1e-5, atol=1e-4)

    # float64 through the same path agrees to float64 precision
    x64, w64 = x.clone().requires_grad_(), w.clone().requires_grad_()
    adder_conv2d_fp(x64, w64, None, s, p, d, eta=None).backward(g)
    torch.testing.assert_close(x64.grad, gx_ref)
    torch.testing.assert_close(w64.grad, gw_ref)


def test_linear_forward_backward_and_bias():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    layer = AdderLinear(7, 3, bias=True, eta=None).double()
    y = layer(x)
    diff = x[:, None, :] - layer.weight[None]
    torch.testing.assert_close(y, -diff.abs().sum(-1) + layer.bias)
    g = torch.randn(5, 3, dtype=torch.float64, generator=gen)
    y.backward(g)
    d = diff.detach()
    torch.testing.assert_close(layer.weight.grad, (d * g[:, :, None]).sum(0))
    torch.testing.assert_close(x.grad, (torch.clamp(-d, -1, 1) * g[:, :, None]).sum(1))
    torch.testing.assert_close(layer.bias.grad, g.sum(0))


def test_adaptive_learning_rate_scaling():
    """grad_W <- eta * sqrt(numel W) * grad_W / ||grad_W|| (official code: eta = 0.2)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    plain = AdderConv2d(3, 4, 3, padding=1, eta=None)
    scaled = AdderConv2d(3, 4, 3, padding=1)
    assert scaled.eta == 0.2
    scaled.load_state_dict(plain.state_dict())
    g = torch.randn(2, 4, 6, 6)
    plain(x).backward(g)
    scaled(x).backward(g)
    expected = plain.weight.grad * (0.2 * plain.weight.numel() ** 0.5 / plain.weight.grad.norm())
    torch.testing.assert_close(scaled.weight.grad, expected)
    torch.testing.assert_close(scaled.weight.grad.norm(), torch.tensor(0.2 * 108 ** 0.5))


def test_chunk_size_does_not_change_the_input_gradient():
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(37, 19, generator=gen)
    w = torch.randn(11, 19, generator=gen)
    g = torch.randn(37, 11, generator=gen)
    full = adder_input_grad(p, w, g, chunk_elements=1 << 30)
    for budget in (1, 19, 50, 19 * 11 + 1, 500):
        torch.testing.assert_close(adder_input_grad(p, w, g, chunk_elements=budget), full)
    old = set_chunk_elements(64)
    try:
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        wt = torch.randn(4, 3, 3, 3, requires_grad=True)
        adder_conv2d_fp(x, wt, padding=1, eta=None).sum().backward()
        gx_small = x.grad.clone()
    finally:
        set_chunk_elements(old)
    x.grad = None
    adder_conv2d_fp(x, wt, padding=1, eta=None).sum().backward()
    torch.testing.assert_close(gx_small, x.grad)
    with pytest.raises(ConfigError):
        set_chunk_elements(0)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from quantkit.nn.adder import adder_conv2d_fp
    torch.set_num_threads(2)
    n, c, cout, hw = 4, 128, 128, 28
    x = torch.randn(n, c, hw, hw, requires_grad=True)
    w = torch.randn(cout, c, 3, 3, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y = adder_conv2d_fp(x, w, padding=1)
    y.sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    full = n * cout * (c * 9) * hw * hw * 4
    print(json.dumps({"peak_increase": (peak - base) * 1024, "full_tensor": full}))
""")


def test_memory_stays_far_below_the_full_difference_tensor():
    """fwd + bwd of a 128->128 3x3 adder conv on 4x128x28x28: the N x Cout x K x L tensor would be 1.85 GB."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["full_tensor"] > 1.8e9
    assert res["peak_increase"] < 0.25 * res["full_tensor"], res


def test_layer_validation():
    with pytest.raises(ConfigError, match="groups"):
        AdderConv2d(4, 4, 3, groups=2)
    layer = AdderConv2d(3, 4, 3)
    with pytest.raises(UnsupportedModelError, match="channels"):
        layer(torch.randn(1, 5, 8, 8))
    assert torch.allclose(layer.weight.std(), torch.tensor(1.0), atol=0.3)  # N(0, 1) init as the official code


def test_adderize_keeps_stem_and_classifier():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=2),  # grouped: not supported, stays
        nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 10, 1),  # convolutional classifier: stays
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    out = adderize(model)
    kinds = [type(m).__name__ for m in out if isinstance(m, (nn.Conv2d, AdderConv2d))]
    assert kinds == ["Conv2d", "Conv2d", "AdderConv2d", "Conv2d"]
    assert isinstance(model[3], nn.Conv2d)  # the input model is untouched
    adder = out[3]
    assert adder.stride == (2, 2) and adder.dilation == (2, 2) and adder.padding == (2, 2)
    assert out(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(UnsupportedModelError):
        adderize(nn.Sequential(nn.Linear(3, 3)))


def test_builders():
    r20 = adder_resnet20()
    adders = [m for m in r20.modules() if isinstance(m, AdderConv2d)]
    assert len(adders) == 18 + 2  # 18 block convs + 2 downsample adders
    assert isinstance(r20.conv1, nn.Conv2d) and isinstance(r20.fc, nn.Conv2d)
    assert r20(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    r18 = adder_resnet18(num_classes=7)
    assert sum(isinstance(m, AdderConv2d) for m in r18.modules()) == 16 + 3
    assert isinstance(r18.conv1, nn.Conv2d) and isinstance(r18.fc, nn.Linear)
    assert [m.stride for m in r18.modules() if isinstance(m, AdderConv2d) and m.kernel_size == (1, 1)] == [(2, 2)] * 3


def test_adderize_skip_names_must_exist():
    import torchvision

    from quantkit.errors import ConfigError
    from quantkit.graph import adderize

    model = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(ConfigError, match=r"skip entry 'layer1.0.conv3' names no layer of ResNet.*'layer1.0.conv1'"):
        adderize(model, skip=["layer1.0.conv3"])
    kept = adderize(model, skip="layer1.0.conv1")  # one name, not its characters
    assert type(kept.layer1[0].conv1) is torch.nn.Conv2d and type(kept.layer1[0].conv2).__name__ == "AdderConv2d"


def test_init_matches_official_adder2d():
    """Official ``adder2d``: filters ``normal_`` (N(0, 1)), bias ``uniform_`` with default bounds (U(0, 1)). Same seed,
    same draws in the same order -> identical tensors."""
    torch.manual_seed(7)
    conv = AdderConv2d(3, 32, 3, bias=True)
    torch.manual_seed(7)
    w_ref = nn.init.normal_(torch.empty(32, 3, 3, 3))
    b_ref = nn.init.uniform_(torch.zeros(32))
    assert torch.equal(conv.weight, w_ref) and torch.equal(conv.bias, b_ref)
    assert conv.bias.min() >= 0 and conv.bias.max() < 1 and conv.bias.mean() > 0.25  # U(0, 1), not centred at 0
    lin = AdderLinear(5, 64, bias=True)
    assert lin.bias.min() >= 0 and lin.bias.max() < 1
