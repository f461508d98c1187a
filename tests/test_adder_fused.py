"""The adder block epilogue (``adder_conv2d_packed(..., residual, relu)``) and the fused adder residual blocks that
``quantkit.convert`` builds from it: bit-equal to the unfused ops and layers on every ISA level."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.errors import KernelError
from quantkit.models import adder_resnet18
from quantkit.nn.adder_fused import FusedAdderBlock
from quantkit.nn.fused_block import unfuse_blocks
from quantkit.ops import adder as A
from quantkit.ops._dispatch import has_op, supported_cpu_isas

from conftest import cpu_isa

needs_kernels = pytest.mark.skipif(not has_op("adder_conv2d_packed"), reason="compiled adder kernels are not built")
ISAS = supported_cpu_isas() or ["portable"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as float32 bit patterns (NaN payloads aside): the sign of zeros counts."""
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a].view(torch.int32), b[~nan_b].view(torch.int32))


@needs_kernels
@settings(max_examples=40, **SETTINGS)
@given(
    groups=st.integers(1, 3),
    batch=st.integers(1, 2),
    c=st.integers(1, 20),
    hw=st.integers(1, 7),
    cout=st.integers(1, 40),
    k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    relu=st.booleans(),
    with_residual=st.booleans(),
    residual_nchw=st.booleans(),
    specials=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_epilogue_equals_add_then_relu(groups, batch, c, hw, cout, k, stride, relu, with_residual,
                                             residual_nchw, specials, seed):
    """relu(conv(x) + r) from the kernel == the conv, then ``y += r`` and ``torch.relu``, bit for bit (NaN, -0.0 and
    channel blocks scattered over groups included)."""
    gen = torch.Generator().manual_seed(seed)
    pad = k // 2
    x = torch.randn(batch, c, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-8, 8, (cout, c, k, k), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    scale = torch.rand(groups, generator=gen) + 0.25
    delta, bias = torch.rand(cout, generator=gen) * 0.1, torch.randn(cout, generator=gen)
    packed = A.adder_prepack(w, gi, 1, 4, True)
    args = (x, scale, *packed, delta, bias, (k, k), (stride, stride), (pad, pad), (1, 1), 4, True)
    plain = A.adder_conv2d_packed(*args)
    residual = None
    if with_residual:
        r = torch.randn(plain.shape, generator=gen).permute(0, 2, 3, 1).contiguous()  # NHWC memory
        flat, y_flat = r.view(-1), plain.permute(0, 2, 3, 1).reshape(-1)
        if specials:  # NaN, signed zeros, and values that cancel the conv output exactly (y + r = +0.0)
            n = min(3, flat.numel())
            flat[:n] = torch.tensor([float("nan"), -0.0, 0.0])[:n]
            flat[n:2 * n] = -y_flat[n:2 * n]
        residual = r.permute(0, 3, 1, 2)  # channels_last memory
        if residual_nchw:
            residual = residual.contiguous()
    for isa in ISAS:
        with cpu_isa(isa):
            got = A.adder_conv2d_packed(*args, residual=residual, relu=relu)
        want = plain.clone()
        if residual is not None:
            want += residual
        if relu:
            want = torch.relu(want)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert _same_bits(got, want), isa


@needs_kernels
def test_block_epilogue_rejects_a_residual_of_another_shape():
    x = torch.randn(1, 4, 5, 5)
    packed = A.adder_prepack(torch.randint(-8, 8, (6, 4, 3, 3)).to(torch.int8), torch.zeros(6, dtype=torch.long), 1, 4,
                             True)
    args = (x, torch.ones(1), *packed, torch.rand(6), None, (3, 3), (1, 1), (1, 1), (1, 1), 4, True)
    with pytest.raises((KernelError, RuntimeError), match="residual must have the output's shape"):
        A.adder_conv2d_packed(*args, residual=torch.randn(1, 6, 4, 4))
    with pytest.raises((KernelError, RuntimeError), match="residual must be a float32"):
        A.adder_conv2d_packed(*args, residual=torch.randn(1, 6, 5, 5).double())


@pytest.fixture(scope="module")
def adder_deploy():
    torch.manual_seed(0)
    model = adder_resnet18(num_classes=10).eval()
    sim = quantkit.quantize(model, "adder_ptq4", calib_data=[torch.randn(4, 3, 32, 32)], progress=False)
    return sim, quantkit.convert(sim).eval()


@needs_kernels
def test_convert_fuses_every_adder_basic_block(adder_deploy):
    _, dep = adder_deploy
    blocks = [name for name, m in dep.named_modules() if isinstance(m, FusedAdderBlock)]
    assert len(blocks) == 8
    assert "fused: conv1 -> relu -> y -> conv2 + downsample.0 -> downsample.1 -> relu" in repr(dep.layer2[0])
    assert any("8 adder residual block(s) fused" in n for n in quantkit.report(dep).notes)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_fused_adder_model_equals_unfused_bit_for_bit(adder_deploy, isa):
    sim, dep = adder_deploy
    plain = unfuse_blocks(copy.deepcopy(dep))
    assert not any(isinstance(m, FusedAdderBlock) for m in plain.modules())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), cpu_isa(isa):
        assert _same_bits(dep(x), plain(x))
        torch.testing.assert_close(dep(x), sim(x), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_fused_adder_model_exports_layer_by_layer(adder_deploy, tmp_path):
    from quantkit.export.onnx_export import traceable_copy

    sim, dep = adder_deploy
    work = traceable_copy(dep)  # what the exporter traces: the blocks split back into their layers
    assert not any(isinstance(m, FusedAdderBlock) for m in work.modules())
    assert type(work.layer1[0]).__name__ == "AdderBasicBlock"
    path = tmp_path / "adder.onnx"
    quantkit.export_onnx(sim, (torch.randn(1, 3, 32, 32),), str(path), quiet=True)
    assert path.stat().st_size > 0
