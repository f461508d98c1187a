"""Prepacked binary conv (binary_conv_prepack + binary_conv2d_prepacked) on every CPU ISA level: the same values as
the unfused ops it replaces (binary_conv2d, + residual, maxout, pack_bits), bit for bit; the reference agrees; the
fused residual blocks of a converted AdaBin ResNet equal the unfused deploy blocks and the simulated model; on CPUs
with AMX-INT8, the AMX path equals the VPOPCNTD path bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import quantkit
from quantkit import ops
from quantkit.errors import KernelError
from quantkit.ops import _dispatch
from quantkit.ops.binary import binary_conv2d_prepacked_reference, binary_conv_prepack_reference
from quantkit.ops.packing import pack_bits_reference

from conftest import hypothesis_examples, use_isa_level

HAVE = _dispatch.has_op("binary_conv2d_prepacked")
TERMS = ["scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias"]


def _maxout_slopes(kind: str, c_out: int, g: torch.Generator) -> tuple:
    """Maxout slopes for the fused epilogue: ``(None, None)`` for "none", random ones, or with a NaN slope."""
    if kind == "none":
        return None, None
    pos, neg = torch.randn(c_out, generator=g), torch.randn(c_out, generator=g)
    if kind == "nan":
        pos[0] = float("nan")
    return pos, neg


@pytest.fixture(params=["portable", "avx2", "avx512"])
def isa(request, monkeypatch):
    return use_isa_level(request.param, monkeypatch, HAVE)


def test_prepack_matches_reference_and_round_trips():
    g = torch.Generator().manual_seed(0)
    w = ops.pack_conv_weight(torch.randn(37, 45, 3, 2, generator=g))
    w_dirty = w.clone()
    w_dirty[..., -1] |= torch.tensor(-(1 << 20), dtype=torch.int32)  # tail bits past c_in = 45 are ignored
    ref = binary_conv_prepack_reference(w, 45)
    got = ops.binary_conv_prepack(w_dirty, 45)
    for a, b in zip(got, ref):
        assert a.dtype == torch.int32 and torch.equal(a, b)
    assert got[0].shape == (3, 6 * 2, 16) and got[1].shape == (3, 7, 16)
    assert torch.equal(ops.binary.unprepack_conv_weight(got[0], 37, (3, 2)), w)


def test_prepacked_equals_unfused_ops_every_isa(isa):
    @settings(max_examples=hypothesis_examples(25), deadline=None)
    @given(data=st.data(), present=st.lists(st.booleans(), min_size=5, max_size=5), residual=st.booleans(),
           maxout=st.sampled_from(["none", "finite", "nan"]), seed=st.integers(0, 2**31 - 1))
    def check(data, present, residual, maxout, seed):
        batch = data.draw(st.integers(1, 2))
        c_in, c_out = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 50))
        k = data.draw(st.integers(1, 3))
        stride, pad = data.draw(st.integers(1, 2)), data.draw(st.integers(0, 2))
        h = data.draw(st.integers(max(1, k - 2 * pad), 9))
        g = torch.Generator().manual_seed(seed)
        x = ops.pack_activation_nhwc(torch.randn(batch, c_in, h, h, generator=g))
        w = ops.pack_conv_weight(torch.randn(c_out, c_in, k, k, generator=g))
        terms = {t: (torch.randn(c_out, generator=g) if on else None) for t, on in zip(TERMS, present)}
        panels, wpop = ops.binary_conv_prepack(w, c_in)
        y0 = ops.binary_conv2d(x, w, c_in, stride, pad, 1, **terms)  # the unfused path, step by step
        r = torch.randn(y0.shape, generator=g).contiguous(memory_format=torch.channels_last) if residual else None
        pos, neg = _maxout_slopes(maxout, c_out, g)
        th = torch.randn(c_out, generator=g)
        y1 = y0 + r if residual else y0
        if pos is not None:
            y1 = ops.maxout(y1, pos, neg)
        yf, bits = ops.binary_conv2d_prepacked(x, panels, wpop, c_in, c_out, k, stride, pad, 1, **terms,
                                               residual=r, maxout_pos=pos, maxout_neg=neg, threshold=th)
        assert yf.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(yf, y1) or torch.equal(yf.isnan(), y1.isnan()) and torch.equal(
            yf.nan_to_num(), y1.nan_to_num())
        assert torch.equal(bits, pack_bits_reference(y1.permute(0, 2, 3, 1), th))
        yf2, bits2 = ops.binary_conv2d_prepacked(x, panels, wpop, c_in, c_out, k, stride, pad, 1, **terms,
                                                 residual=r, maxout_pos=pos, maxout_neg=neg, threshold=th,
                                                 float_out=False)
        assert yf2.numel() == 0 and torch.equal(bits2, bits)
        # the float64 reference, within float32 rounding of the epilogue
        ref, ref_bits = binary_conv2d_prepacked_reference(x, panels, wpop, c_in, c_out, (k, k), stride, pad, 1,
                                                          *terms.values(), r, pos, neg, None)
        assert ref_bits.numel() == 0
        torch.testing.assert_close(yf, ref, rtol=1e-5, atol=1e-5 * c_in * k * k + 1e-5, equal_nan=True)

    check()


def test_prepacked_errors():
    w = ops.pack_conv_weight(torch.randn(8, 16, 3, 3))
    panels, wpop = ops.binary_conv_prepack(w, 16)
    x = ops.pack_activation_nhwc(torch.randn(1, 16, 5, 5))
    with pytest.raises(KernelError, match="nothing to compute"):
        ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1, float_out=False)
    with pytest.raises(KernelError, match="residual must be float32"):
        ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1, residual=torch.zeros(1, 8, 4, 4))
    with pytest.raises(KernelError, match="maxout_pos and maxout_neg"):
        ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1, maxout_pos=torch.ones(8))
    if HAVE:
        with pytest.raises(RuntimeError, match="panels must be int32"):
            ops.binary_conv2d_prepacked(x, panels[:, :-1], wpop, 16, 8, 3, 1, 1)


def assert_matches_unfused(fused: torch.Tensor, unfused: torch.Tensor) -> None:
    """Fused deploy blocks give the unfused deploy blocks' values; the 1x1 projection shortcuts (a matrix product
    in the fused block, torch's conv in the unfused one) may round their sums differently, nothing else."""
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6 * unfused.abs().max().item())


def _resnet_pair():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    qat = quantkit.QAT(model, "adabin")
    qat.model.train()
    with torch.no_grad():  # BatchNorm statistics from data, so activations are not degenerate
        for _ in range(2):
            qat.model(torch.randn(4, 3, 32, 32))
    return qat.model.eval(), qat.convert().eval()


@pytest.mark.skipif(not HAVE, reason="compiled quantkit kernels not built")
def test_converted_resnet_fuses_blocks_and_matches_unfused_and_simulated():
    from quantkit.nn.binary_fused import FusedBinaryBlock
    from quantkit.nn.fused_block import unfuse_blocks

    sim, dep = _resnet_pair()
    blocks = [m for m in dep.modules() if isinstance(m, FusedBinaryBlock)]
    assert len(blocks) == 4 and isinstance(dep.bn1, nn.Identity)  # stem BatchNorm folded into the stem conv
    assert isinstance(dep.layer2[0].conv1, quantkit.nn.binary_deploy.BinaryDeployConv2d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = dep(x)
        y_unfused = unfuse_blocks(__import__("copy").deepcopy(dep))(x)
        ref = sim(x)
    assert_matches_unfused(y, y_unfused)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # the state dict is the unfused model's: it loads into it, and prepacked panels follow a loaded weight
    plain = unfuse_blocks(__import__("copy").deepcopy(dep))
    assert set(plain.state_dict()) == set(dep.state_dict())
    conv = dep.layer1[0].conv1
    before = conv.weight_panels.clone()
    sd = dep.state_dict()
    sd["layer1.0.conv1.weight_packed"] = ~sd["layer1.0.conv1.weight_packed"]
    dep.load_state_dict(sd)
    assert not torch.equal(conv.weight_panels, before)
    assert torch.equal(conv.weight_panels, binary_conv_prepack_reference(conv.weight_packed, conv.in_channels)[0])


def _negate_in_place(module, inputs, output):
    return output.neg_()  # the same tensor, modified in place


def _count_packs(monkeypatch) -> list:
    """Count the input packs the fused binary blocks do themselves (the real packing op underneath)."""
    import quantkit.nn.binary_fused as fused_mod

    calls = []
    real = fused_mod.ops.pack_activation_nhwc

    class _Ops:  # the module's ``ops`` with pack_activation_nhwc counted
        def __getattr__(self, name):
            return getattr(ops, name)

        @staticmethod
        def pack_activation_nhwc(x, threshold=None):
            calls.append(tuple(x.shape))
            return real(x, threshold)

    monkeypatch.setattr(fused_mod, "ops", _Ops())
    return calls


@pytest.mark.skipif(not HAVE, reason="compiled quantkit kernels not built")
def test_fused_blocks_hand_packed_output_to_the_next_block(monkeypatch):
    import copy
    import io

    from quantkit.nn.binary_fused import FusedBinaryBlock
    from quantkit.nn.fused_block import unfuse_blocks

    sim, dep = _resnet_pair()
    chain = [(a, b.consumer) for a, b in [(n, m) for n, m in dep.named_modules() if isinstance(m, FusedBinaryBlock)]]
    # layer1.0 -> layer2.0 -> layer3.0 -> layer4.0; the last block has no consumer
    assert [b is not None for _, b in chain] == [True, True, True, False]
    assert dep.layer1[0].consumer is dep.layer2[0] and dep.layer3[0].consumer is dep.layer4[0]
    assert dep.conv1.consumer is dep.layer1[0]  # the stem (through the Identity left of bn1, relu, maxpool)
    assert any("pack their output for the next fused binary block" in n for n in quantkit.report(dep).notes)
    plain = unfuse_blocks(copy.deepcopy(dep))
    x = torch.randn(2, 3, 32, 32)
    packs = _count_packs(monkeypatch)
    with torch.no_grad():
        y = dep(x)
        assert len(packs) == 0  # each block takes the bits of the stem or block before it
        assert_matches_unfused(y, plain(x))
        dep.conv1.use_stem_kernel = False  # the stem through torch's conv: the first block packs its input
        dep(x)
        assert packs == [(2, 64, 8, 8)]
        dep.conv1.use_stem_kernel = True
        # a consumer called on another tensor packs it itself (the handed bits are for the producer's output)
        feats = dep.layer1(dep.maxpool(dep.relu(dep.bn1(dep.conv1(x)))))
        other = torch.randn_like(feats)
        packs.clear()
        assert_matches_unfused(dep.layer2[0](other), plain.layer2[0](other))
        assert len(packs) == 1
        # a hook that changes the producer's output in place: the consumer sees the changed values and packs them
        for model in (dep, plain):
            model.layer2[0].register_forward_hook(_negate_in_place)
        packs.clear()
        assert_matches_unfused(dep(x), plain(x))
        assert packs == [(2, 128, 4, 4)]  # only layer3.0, whose input the hook changed, packs
    # after a call, the model still pickles and deep-copies (the hand-over slot is not state)
    torch.save(dep, io.BytesIO())
    twin = copy.deepcopy(dep)
    assert twin.layer1[0].consumer is twin.layer2[0]
    with torch.no_grad():
        assert torch.equal(twin(x), dep(x))


@settings(max_examples=hypothesis_examples(25), deadline=None)
@given(n=st.integers(1, 3), c_in=st.integers(1, 40), c_out=st.integers(1, 40), hw=st.integers(1, 9),
       stride=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_pointwise_conv_equals_the_conv(n, c_in, c_out, hw, stride, bias, seed):
    from quantkit.nn.fused_block import is_pointwise_conv, pointwise_conv

    torch.manual_seed(seed)
    conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias).eval()
    assert is_pointwise_conv(conv)
    x = torch.randn(n, c_in, hw, hw).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = pointwise_conv(conv, x)
        ref = conv(x)
    assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_pointwise_conv_scope():
    from quantkit.nn.fused_block import is_pointwise_conv, pointwise_conv

    assert not is_pointwise_conv(nn.Conv2d(4, 4, 3))
    assert not is_pointwise_conv(nn.Conv2d(4, 4, 1, padding=1))
    assert not is_pointwise_conv(nn.Conv2d(4, 4, 1, groups=2))
    conv = nn.Conv2d(4, 6, 1, stride=2)
    x = torch.randn(2, 4, 5, 5)
    # an NCHW input, or one autograd must see, runs the module itself: same values, gradients flow
    torch.testing.assert_close(pointwise_conv(conv, x), conv(x))
    xg = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    pointwise_conv(conv, xg).sum().backward()
    assert xg.grad is not None and conv.weight.grad is not None


# ---------------------------------------------------------------------------------------------- AMX-INT8 path
AMX = HAVE and ops.cpu_amx_supported()


def test_prepack_amx_matches_reference():
    from quantkit.ops.binary import binary_conv_prepack_amx_reference

    g = torch.Generator().manual_seed(1)
    for c_out, c_in, kh, kw in [(37, 45, 3, 2), (16, 64, 3, 3), (5, 130, 1, 1), (33, 200, 3, 3)]:
        w = ops.pack_conv_weight(torch.randn(c_out, c_in, kh, kw, generator=g))
        w_dirty = w.clone()
        if c_in % 32:
            w_dirty[..., -1] |= torch.tensor(-(1 << 31), dtype=torch.int32)  # a tail bit past c_in: ignored
        nb = -(-c_out // 16)
        want = (nb + nb % 2, -(-c_in // 64) * kh * kw, 16)
        ref = binary_conv_prepack_amx_reference(w, c_in)
        got = ops.binary_conv_prepack_amx(w_dirty, c_in)
        assert got.dtype == torch.int64 and tuple(got.shape) == want and torch.equal(got, ref)
        # spot-check the layout: sign of input channel 64 g + 4 r + j of output channel 16 b + n at bit 4 n + j
        bits = ops.unpack_bits(w, c_in, torch.bool).reshape(c_out, kh * kw, c_in)
        o, t, c = c_out - 1, kh * kw - 1, c_in - 1
        gidx, r, j = c // 64, (c % 64) // 4, c % 4
        word = int(got[o // 16, gidx * kh * kw + t, r])
        assert bool((word >> (4 * (o % 16) + j)) & 1) == bool(bits[o, t, c])


@pytest.mark.skipif(not AMX, reason="this CPU/OS has no AMX-INT8 tiles")
def test_amx_path_equals_vpopcnt_path(monkeypatch):
    """QUANTKIT_CPU_ISA=amx forces the AMX path on every shape (the default takes it where it pays): the same
    floats and bits as the AVX-512 VPOPCNTD path, including borders, strides, dilation, odd channel counts past 64,
    residual, Maxout and the thresholded output."""

    @settings(max_examples=hypothesis_examples(30), deadline=None)
    @given(data=st.data(), present=st.lists(st.booleans(), min_size=5, max_size=5), residual=st.booleans(),
           maxout=st.sampled_from(["none", "finite", "nan"]), seed=st.integers(0, 2**31 - 1))
    def check(data, present, residual, maxout, seed):
        batch = data.draw(st.integers(1, 3))
        c_in, c_out = data.draw(st.integers(1, 140)), data.draw(st.integers(1, 70))
        k = data.draw(st.sampled_from([1, 2, 3, 5]))
        stride, pad, dil = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 2)), data.draw(st.integers(1, 2))
        h = data.draw(st.integers(max(1, dil * (k - 1) + 1 - 2 * pad), 20))
        wdt = data.draw(st.integers(max(1, dil * (k - 1) + 1 - 2 * pad), 20))
        g = torch.Generator().manual_seed(seed)
        x = ops.pack_activation_nhwc(torch.randn(batch, c_in, h, wdt, generator=g), torch.randn(c_in, generator=g))
        w = ops.pack_conv_weight(torch.randn(c_out, c_in, k, k, generator=g))
        terms = {t: (torch.randn(c_out, generator=g) if on else None) for t, on in zip(TERMS, present)}
        panels, wpop = ops.binary_conv_prepack(w, c_in)
        masks = ops.binary_conv_prepack_amx(w, c_in)
        ho, wo = (ops.conv2d_output_size(n, k, stride, pad, dil) for n in (h, wdt))
        r = (torch.randn(batch, c_out, ho, wo, generator=g).contiguous(memory_format=torch.channels_last)
             if residual else None)
        pos, neg = _maxout_slopes(maxout, c_out, g)
        th = torch.randn(c_out, generator=g)
        args = (x, panels, wpop, c_in, c_out, k, stride, pad, dil)
        kw = dict(**terms, residual=r, maxout_pos=pos, maxout_neg=neg, threshold=th)
        monkeypatch.setenv("QUANTKIT_CPU_ISA", "avx512")
        y0, b0 = ops.binary_conv2d_prepacked(*args, **kw)
        monkeypatch.setenv("QUANTKIT_CPU_ISA", "amx")
        assert ops.cpu_amx()
        y1, b1 = ops.binary_conv2d_prepacked(*args, **kw, amx_weights=masks)
        assert torch.equal(y0.isnan(), y1.isnan()) and torch.equal(y0.nan_to_num(), y1.nan_to_num())
        assert torch.equal(b0, b1)
        _, b2 = ops.binary_conv2d_prepacked(*args, **kw, amx_weights=masks, float_out=False)
        assert torch.equal(b2, b0)

    check()


@pytest.mark.skipif(not AMX, reason="this CPU/OS has no AMX-INT8 tiles")
@pytest.mark.parametrize("c_out", [64, 72])
def test_amx_path_with_an_output_past_the_caches(monkeypatch, c_out):
    """An output of 8 MiB or more goes out as non-temporal stores on the AMX path (72 channels: the 8-channel tail
    block and the rows not 64-byte aligned keep plain masked stores), and the residual rows of the next block are
    prefetched (an output of 2 MiB or more): the floats and bits equal the VPOPCNTD path's, residual and Maxout
    included."""
    g = torch.Generator().manual_seed(7)
    n, c_in, h = 3, 64, 110  # 36300 positions: x 64 channels x 4 bytes = 9.3 MB, x 72 = 10.5 MB
    x = ops.pack_activation_nhwc(torch.randn(n, c_in, h, h, generator=g))
    w = ops.pack_conv_weight(torch.randn(c_out, c_in, 3, 3, generator=g))
    panels, wpop = ops.binary_conv_prepack(w, c_in)
    masks = ops.binary_conv_prepack_amx(w, c_in)
    terms = {t: torch.randn(c_out, generator=g) for t in TERMS}
    r = torch.randn(n, c_out, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    pos, neg = _maxout_slopes("finite", c_out, g)
    kw = dict(**terms, residual=r, maxout_pos=pos, maxout_neg=neg, threshold=torch.randn(c_out, generator=g))
    args = (x, panels, wpop, c_in, c_out, 3, 1, 1, 1)
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "avx512")
    y0, b0 = ops.binary_conv2d_prepacked(*args, **kw)
    monkeypatch.delenv("QUANTKIT_CPU_ISA")
    assert ops.cpu_amx()
    y1, b1 = ops.binary_conv2d_prepacked(*args, **kw, amx_weights=masks)
    assert torch.equal(y0, y1) and torch.equal(b0, b1)


@pytest.mark.skipif(not HAVE, reason="compiled quantkit kernels not built")
def test_amx_weights_checked_and_ignored_without_amx(monkeypatch):
    w = ops.pack_conv_weight(torch.randn(8, 16, 3, 3))
    panels, wpop = ops.binary_conv_prepack(w, 16)
    masks = ops.binary_conv_prepack_amx(w, 16)
    x = ops.pack_activation_nhwc(torch.randn(1, 16, 20, 20))
    with pytest.raises(KernelError, match="amx_weights must be int64"):
        ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1, amx_weights=masks[:, :-1])
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "avx2")  # a lower level: no AMX, the masks are ignored
    assert not ops.cpu_amx()
    y2, _ = ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1, amx_weights=masks)
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "portable")
    y0, _ = ops.binary_conv2d_prepacked(x, panels, wpop, 16, 8, 3, 1, 1)
    assert torch.equal(y0, y2)


@pytest.mark.skipif(not HAVE, reason="compiled quantkit kernels not built")
def test_deploy_conv_builds_amx_weights_where_the_cpu_has_amx():
    from quantkit.nn.binary_deploy import BinaryDeployConv2d
    from quantkit.ops.binary import binary_conv_prepack_amx_reference

    signs = torch.randn(24, 70, 3, 3).sign()
    conv = BinaryDeployConv2d.from_signs(signs, {"scale": torch.ones(24)}, stride=(1, 1), padding=(1, 1),
                                         dilation=(1, 1))
    assert "weight_amx" not in conv.state_dict()  # derived, like the panels
    if not ops.cpu_amx_supported():
        assert conv.weight_amx is None
        return
    assert torch.equal(conv.weight_amx, binary_conv_prepack_amx_reference(conv.weight_packed, 70))
    sd = conv.state_dict()
    sd["weight_packed"] = ~sd["weight_packed"]
    conv.load_state_dict(sd)  # a loaded weight rebuilds the AMX masks too
    assert torch.equal(conv.weight_amx, binary_conv_prepack_amx_reference(conv.weight_packed, 70))


@pytest.mark.skipif(not AMX, reason="this CPU/OS has no AMX-INT8 tiles")
@pytest.mark.parametrize("k, stride, pad, dil", [(9, 1, 4, 1), (9, 2, 3, 1), (3, 1, 2, 2)])
def test_amx_path_equals_vpopcnt_path_large_kernels(monkeypatch, k, stride, pad, dil):
    """More than 64 taps (9x9) takes the AMX path's per-row set-up with tap pointers; dilation 2 the flat rows."""
    g = torch.Generator().manual_seed(k + stride)
    c_in, c_out = 90, 40
    x = ops.pack_activation_nhwc(torch.randn(2, c_in, 13, 11, generator=g))
    w = ops.pack_conv_weight(torch.randn(c_out, c_in, k, k, generator=g))
    panels, wpop = ops.binary_conv_prepack(w, c_in)
    terms = {t: torch.randn(c_out, generator=g) for t in TERMS}
    th = torch.randn(c_out, generator=g)
    args = (x, panels, wpop, c_in, c_out, k, stride, pad, dil)
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "avx512")
    y0, b0 = ops.binary_conv2d_prepacked(*args, **terms, threshold=th)
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "amx")
    y1, b1 = ops.binary_conv2d_prepacked(*args, **terms, threshold=th,
                                         amx_weights=ops.binary_conv_prepack_amx(w, c_in))
    assert torch.equal(y0, y1) and torch.equal(b0, b1)
