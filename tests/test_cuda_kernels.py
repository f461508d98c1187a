"""CUDA kernels (kernels/cuda) against the pure-PyTorch references, on every kernel path the device has.

Binary products run on three GEMM paths (QUANTKIT_CUDA_BGEMM): the CUDA-core popcount kernel, mma.sync
m16n8k256 b1 AND (sm_80+) and the sm_90a wgmma kernel of quantkit._C_sm90a (sm_90 only); the adder runs on
three (QUANTKIT_CUDA_ADDER): thermometer codes on the b1 AND tensor cores, vabsdiff4 bytes, int32 words. Every
test compares with the references on random shapes (odd sizes, K not a multiple of the 32-bit word or of the
256/512-bit tile, batch 1, several output tiles, non-contiguous inputs) and poisons the CUDA caching allocator
first so that an output element the kernel never writes cannot pass by luck.

Without a GPU every CUDA test skips (the registration check at the end still runs where the CUDA build exists).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.ops import _dispatch
from quantkit.ops.adder import adder_conv2d_reference, adder_l1_conv2d_reference, adder_l1_reference, adder_linear_reference
from quantkit.ops.binary import (
    binary_bmm_01_reference,
    binary_bmm_reference,
    binary_conv2d_reference,
    binary_linear_reference,
)
from quantkit.ops.packing import pack_bits_reference, unpack_bits_reference

HAVE_CUDA = torch.cuda.is_available()
HAVE_CUDA_KERNELS = _dispatch.has_op("cuda_backend_info")
needs_gpu = pytest.mark.skipif(
    not (HAVE_CUDA and HAVE_CUDA_KERNELS),
    reason="no CUDA GPU visible to torch (torch.cuda.is_available() is False) or quantkit._C built without CUDA",
)
EXAMPLES = int(os.environ.get("QUANTKIT_CUDA_TEST_EXAMPLES", "40"))
DEV = torch.device("cuda") if HAVE_CUDA else None

_CONV_TERMS = ["scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias"]


def _cc() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _sm90a_available() -> bool:
    from quantkit.ops import _load

    _load.load()
    return "sm90a_library=loaded" in torch.ops.quantkit.cuda_backend_info()


@pytest.fixture(params=["simt", "mma", "wgmma"])
def gemm_path(request, monkeypatch):
    """Run once per binary GEMM path the device supports (QUANTKIT_CUDA_BGEMM)."""
    if not (HAVE_CUDA and HAVE_CUDA_KERNELS):
        pytest.skip("no CUDA GPU visible to torch, or quantkit._C built without CUDA")
    if request.param == "mma" and _cc() < 80:
        pytest.skip("mma.sync b1 AND needs sm_80+")
    if request.param == "wgmma":
        if _cc() != 90:
            pytest.skip("wgmma b1 needs sm_90")
        if not _sm90a_available():
            pytest.skip("quantkit._C_sm90a not built/loaded: " + torch.ops.quantkit.cuda_backend_info())
        monkeypatch.setenv("QUANTKIT_SM90A_VARIANT", os.environ.get("QUANTKIT_SM90A_VARIANT", "0"))
    monkeypatch.setenv("QUANTKIT_CUDA_BGEMM", request.param)
    return request.param


@pytest.fixture(params=["thermo", "vabs", "abs32"])
def adder_path(request, monkeypatch):
    """Run once per adder path (QUANTKIT_CUDA_ADDER); thermo uses the best binary GEMM of the device."""
    if not (HAVE_CUDA and HAVE_CUDA_KERNELS):
        pytest.skip("no CUDA GPU visible to torch, or quantkit._C built without CUDA")
    monkeypatch.setenv("QUANTKIT_CUDA_ADDER", request.param)
    return request.param


def _poison() -> None:
    """Fill and free a block of device memory so that unwritten output elements hold garbage, not zeros."""
    # both pools of the caching allocator: large blocks (>= 1 MiB) and the 2 MiB segments of small blocks
    junk = [torch.full((n,), -123456789, dtype=torch.int32, device=DEV)
            for n in [1 << 22] + [1 << 16] * 8 + [1 << 13] * 16 + [1 << 10] * 32 + [64] * 32]
    del junk


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vecs(g: torch.Generator, n: int, names: list[str], present: list[bool]) -> dict:
    return {name: (torch.randn(n, generator=g) if on else None) for name, on in zip(names, present)}


def _cuda(d: dict) -> dict:
    return {k: (v.to(DEV) if v is not None else None) for k, v in d.items()}


def _assert_float_close(y: torch.Tensor, ref: torch.Tensor, scale_bound: float) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.cpu(), ref.cpu(), rtol=1e-5, atol=1e-6 * scale_bound + 1e-6)


# ---------------------------------------------------------------------------------------------- packing
@needs_gpu
def test_pack_unpack_matches_reference():
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(
        rows=st.integers(1, 5),
        k=st.integers(1, 200),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool]),
        with_threshold=st.booleans(),
        transposed=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(rows, k, dtype, with_threshold, transposed, seed):
        g = _gen(seed)
        x = torch.randn(k, rows, generator=g).T if transposed else torch.randn(rows, k, generator=g)
        x[0, 0] = 0.0
        if k > 1:
            x[0, 1] = -0.0
        if dtype == torch.bool:
            x = x > 0
            th = None
        else:
            x = x.to(dtype)
            th = torch.randn(k, generator=g).to(dtype) if with_threshold else None
        _poison()
        words = ops.pack_bits(x.to(DEV), None if th is None else th.to(DEV))
        assert torch.equal(words.cpu(), pack_bits_reference(x, th))
        for out_dtype in (torch.float32, torch.int8, torch.bool, torch.float16):
            assert torch.equal(ops.unpack_bits(words, k, out_dtype).cpu(), unpack_bits_reference(words.cpu(), k, out_dtype))

    check()


@needs_gpu
def test_pack_nan_and_large_rows():
    x = torch.tensor([[float("nan"), 1.0, -1.0, 0.0, -0.0]], device=DEV)
    assert torch.equal(ops.pack_bits(x).cpu(), pack_bits_reference(x.cpu()))
    big = torch.randn(3, 70_001, device=DEV)
    assert torch.equal(ops.pack_bits(big).cpu(), pack_bits_reference(big.cpu()))


# ---------------------------------------------------------------------------------------------- linear
@needs_gpu
def test_binary_linear(gemm_path):
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(
        lead=st.lists(st.integers(1, 3), max_size=2),
        m=st.integers(1, 150),
        n=st.integers(1, 300),
        k=st.one_of(st.integers(1, 700), st.sampled_from([32, 128, 256, 512, 1024])),
        present=st.lists(st.booleans(), min_size=3, max_size=3),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(lead, m, n, k, present, seed):
        g = _gen(seed)
        x = ops.pack_bits(torch.randn(*lead, m, k, generator=g))
        w = ops.pack_bits(torch.randn(n, k, generator=g))
        kw = _vecs(g, n, ["scale", "act_sum_scale", "bias"], present)
        ref = binary_linear_reference(x, w, k, kw["scale"], kw["act_sum_scale"], kw["bias"])
        _poison()
        y = ops.binary_linear(x.to(DEV), w.to(DEV), k, **_cuda(kw))
        if not any(present):
            assert torch.equal(y.cpu(), ref)  # plain dot products are exact integers
        else:
            _assert_float_close(y, ref, 4.0 * k)
        th = torch.randn(n, generator=g)
        _poison()
        yb = ops.binary_linear(x.to(DEV), w.to(DEV), k, **_cuda(kw), threshold=th.to(DEV))
        assert yb.shape == (*lead, m, ops.num_words(n)) and yb.dtype == torch.int32
        assert torch.equal(yb.cpu(), pack_bits_reference(y.cpu(), th))  # same epilogue, then y >= threshold

    check()


@needs_gpu
def test_binary_linear_noncontiguous_and_batch1(gemm_path):
    g = _gen(1)
    k, n = 300, 70
    xw = ops.pack_bits(torch.randn(5, k, generator=g))
    x = xw.to(DEV).repeat(1, 2)[:, : xw.shape[1]]  # a strided (non-contiguous) view
    assert not x.is_contiguous()
    w = ops.pack_bits(torch.randn(n, k, generator=g)).to(DEV)
    assert torch.equal(ops.binary_linear(x, w, k).cpu(), binary_linear_reference(xw, w.cpu(), k))
    x1 = x[:1]
    assert torch.equal(ops.binary_linear(x1, w, k).cpu(), binary_linear_reference(xw[:1], w.cpu(), k))


# ---------------------------------------------------------------------------------------------- conv2d
def _conv_case(data):
    batch = data.draw(st.integers(1, 2), label="batch")
    c_in = data.draw(st.one_of(st.integers(1, 100), st.sampled_from([64, 128, 256])), label="c_in")
    c_out = data.draw(st.one_of(st.integers(1, 40), st.integers(100, 260)), label="c_out")
    kh, kw = data.draw(st.integers(1, 3), label="kh"), data.draw(st.integers(1, 3), label="kw")
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    padding = (data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)))
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = data.draw(st.integers(min_h, min_h + 12), label="h")
    w = data.draw(st.integers(min_w, min_w + 12), label="w")
    return batch, c_in, c_out, kh, kw, stride, padding, dilation, h, w


@needs_gpu
def test_binary_conv2d(gemm_path):
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(
        data=st.data(),
        present=st.lists(st.booleans(), min_size=5, max_size=5),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(data, present, seed):
        batch, c_in, c_out, kh, kw, stride, padding, dilation, h, w = _conv_case(data)
        g = _gen(seed)
        a = torch.randn(batch, c_in, h, w, generator=g)
        x = ops.pack_activation_nhwc(a)
        wt = ops.pack_conv_weight(torch.randn(c_out, c_in, kh, kw, generator=g))
        terms = _vecs(g, c_out, _CONV_TERMS, present)
        ref = binary_conv2d_reference(x, wt, c_in, stride, padding, dilation, *[terms[t] for t in _CONV_TERMS])
        _poison()
        y = ops.binary_conv2d(x.to(DEV), wt.to(DEV), c_in, stride, padding, dilation, **_cuda(terms))
        assert y.is_contiguous(memory_format=torch.channels_last)
        if not any(present):
            assert torch.equal(y.cpu(), ref)
        else:
            _assert_float_close(y, ref, 8.0 * c_in * kh * kw)
        th = torch.randn(c_out, generator=g)
        _poison()
        yb = ops.binary_conv2d(x.to(DEV), wt.to(DEV), c_in, stride, padding, dilation, **_cuda(terms),
                               threshold=th.to(DEV))
        assert yb.shape == (batch, y.shape[2], y.shape[3], ops.num_words(c_out))
        assert torch.equal(yb.cpu(), pack_bits_reference(y.cpu().permute(0, 2, 3, 1), th))

    check()


@needs_gpu
def test_binary_conv2d_resnet_layer_and_channels_last_input(gemm_path):
    """A ResNet-18 3x3 layer (C=64, 56x56 at batch 1, 16-byte load path) from a channels_last float input."""
    g = _gen(7)
    a = torch.randn(1, 64, 56, 56, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    x = ops.pack_activation_nhwc(a)
    wt = ops.pack_conv_weight(torch.randn(64, 64, 3, 3, generator=g)).to(DEV)
    y = ops.binary_conv2d(x, wt, 64, 1, 1, 1)
    assert torch.equal(y.cpu(), binary_conv2d_reference(x.cpu(), wt.cpu(), 64, 1, 1, 1))
    y2 = ops.binary_conv2d(x, wt, 64, 2, 1, 1)
    assert torch.equal(y2.cpu(), binary_conv2d_reference(x.cpu(), wt.cpu(), 64, 2, 1, 1))


# ---------------------------------------------------------------------------------------------- bmm
@needs_gpu
def test_binary_bmm_and_01(gemm_path):
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(
        batch=st.lists(st.integers(1, 3), min_size=1, max_size=2),
        m=st.integers(1, 200),
        n=st.integers(1, 200),
        k=st.integers(1, 600),
        broadcast=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(batch, m, n, k, broadcast, seed):
        g = _gen(seed)
        a = ops.pack_bits(torch.randn(*batch, m, k, generator=g))
        bshape = [1] * len(batch) if broadcast else batch
        b = ops.pack_bits(torch.randn(*bshape, n, k, generator=g))
        _poison()
        out = ops.binary_bmm(a.to(DEV), b.to(DEV), k)
        assert torch.equal(out.cpu(), binary_bmm_reference(a, b, k))
        _poison()
        out01 = ops.binary_bmm_01(a.to(DEV), b.to(DEV), k)
        assert torch.equal(out01.cpu(), binary_bmm_01_reference(a, b, k))

    check()


# ---------------------------------------------------------------------------------------------- adder
def _adder_operands(g: torch.Generator, bits: int, w_mult: int, shape_x, shape_w):
    if w_mult == 1:  # signed form: both on the signed b-bit grid
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        xq = torch.randint(lo, hi + 1, shape_x, generator=g)
    else:  # code form: unsigned activations, signed weights doubled in the kernel
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        xq = torch.randint(0, 2**bits, shape_x, generator=g)
    wq = torch.randint(lo, hi + 1, shape_w, generator=g)
    dtype = torch.int8 if bits <= 7 else torch.int16
    return xq.to(dtype), wq.to(torch.int8)


@needs_gpu
def test_adder_linear(adder_path):
    @settings(max_examples=EXAMPLES, deadline=None)
    @given(
        bits=st.integers(2, 8),
        w_mult=st.sampled_from([1, 2]),
        groups=st.integers(1, 3),
        m=st.integers(1, 150),
        n=st.integers(1, 200),
        k=st.integers(1, 300),
        with_bias=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(bits, w_mult, groups, m, n, k, with_bias, seed):
        g = _gen(seed)
        xq, wq = _adder_operands(g, bits, w_mult, (groups, m, k), (n, k))
        rng = int(xq.max()) - int(xq.min())
        if adder_path == "thermo" and rng > 64:
            return  # thermometer codes are for <= 6-bit ranges (the wrapper's auto path never sends more)
        if adder_path == "vabs" and rng > 255:
            return
        gi = torch.randint(0, groups, (n,), generator=g)
        delta = torch.rand(n, generator=g) + 0.01
        bias = torch.randn(n, generator=g) if with_bias else None
        _poison()
        s = ops.adder_l1(xq.to(DEV), wq.to(DEV), gi.to(DEV), w_mult)
        assert torch.equal(s.cpu(), adder_l1_reference(xq, wq, gi, w_mult))
        _poison()
        y = ops.adder_linear(xq.to(DEV), wq.to(DEV), gi.to(DEV), delta.to(DEV),
                             None if bias is None else bias.to(DEV), w_mult)
        ref = adder_linear_reference(xq, wq, gi, delta, bias, w_mult)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)

    check()


@needs_gpu
def test_adder_conv2d(adder_path):
    @settings(max_examples=max(10, EXAMPLES // 2), deadline=None)
    @given(
        data=st.data(),
        bits=st.sampled_from([2, 3, 4, 6, 8]),
        w_mult=st.sampled_from([1, 2]),
        groups=st.integers(1, 2),
        channels_last=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(data, bits, w_mult, groups, channels_last, seed):
        batch, c_in, c_out, kh, kw, stride, padding, dilation, h, w = _conv_case(data)
        c_in = min(c_in, 70)
        g = _gen(seed)
        xq, wq = _adder_operands(g, bits, w_mult, (groups, batch, c_in, h, w), (c_out, c_in, kh, kw))
        lo, hi = min(int(xq.min()), 0), max(int(xq.max()), 0)
        if adder_path == "thermo" and hi - lo > 64:
            return
        if adder_path == "vabs" and hi - lo > 255:
            return
        xd = xq.to(DEV)
        if channels_last:
            xd = xd.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # non-contiguous NHWC memory
        gi = torch.randint(0, groups, (c_out,), generator=g)
        delta = torch.rand(c_out, generator=g) + 0.01
        bias = torch.randn(c_out, generator=g)
        _poison()
        s = ops.adder_l1_conv2d(xd, wq.to(DEV), gi.to(DEV), stride, padding, dilation, w_mult)
        assert torch.equal(s.cpu(), adder_l1_conv2d_reference(xq, wq, gi, stride, padding, dilation, w_mult))
        _poison()
        y = ops.adder_conv2d(xd, wq.to(DEV), gi.to(DEV), delta.to(DEV), bias.to(DEV), stride, padding, dilation,
                             w_mult)
        ref = adder_conv2d_reference(xq, wq, gi, delta, bias, stride, padding, dilation, w_mult)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)

    check()


@needs_gpu
def test_adder_uint8_and_wide_values(adder_path):
    g = _gen(5)
    xq = torch.randint(0, 256, (1, 33, 77), generator=g, dtype=torch.int64).to(torch.uint8)
    wq = torch.randint(-128, 128, (45, 77), generator=g).to(torch.int8)
    gi = torch.zeros(45, dtype=torch.int64)
    if adder_path == "thermo":
        pytest.skip("8-bit range: not a thermometer-code case")
    assert torch.equal(ops.adder_l1(xq.to(DEV), wq.to(DEV), gi.to(DEV)).cpu(), adder_l1_reference(xq, wq, gi))
    if adder_path == "abs32":  # 16-bit values: only the int32-word path takes them
        xw = torch.randint(-3000, 3000, (2, 9, 50), generator=g).to(torch.int16)
        ww = torch.randint(-3000, 3000, (20, 50), generator=g).to(torch.int16)
        gw = torch.randint(0, 2, (20,), generator=g)
        assert torch.equal(ops.adder_l1(xw.to(DEV), ww.to(DEV), gw.to(DEV)).cpu(), adder_l1_reference(xw, ww, gw))


# ---------------------------------------------------------------------------------------------- misc
@needs_gpu
def test_default_paths_and_sm90a_self_check():
    """The auto ladder; on an H100 the sm_90a library must load and pass its self-check against mma.sync."""
    info = torch.ops.quantkit.cuda_backend_info()
    print(info)
    if _cc() >= 80:
        assert "large_gemm_path=mma" in info or "large_gemm_path=wgmma" in info
    if _cc() == 90 and os.environ.get("QUANTKIT_EXPECT_SM90A") == "1":
        assert "sm90a_self_check=passed" in info, info
        assert "large_gemm_path=wgmma" in info, info


@needs_gpu
def test_opcheck_cuda():
    g = _gen(9)
    x = ops.pack_bits(torch.randn(6, 70, generator=g)).to(DEV)
    w = ops.pack_bits(torch.randn(40, 70, generator=g)).to(DEV)
    sc = torch.randn(40, generator=g).to(DEV)
    torch.library.opcheck(torch.ops.quantkit.binary_linear.default, (x, w, 70, sc, None, None, None))
    torch.library.opcheck(torch.ops.quantkit.binary_linear.default, (x, w, 70, None, None, None, sc))
    xc = ops.pack_bits(torch.randn(1, 5, 6, 40, generator=g)).to(DEV)
    wc = ops.pack_bits(torch.randn(9, 3, 3, 40, generator=g)).to(DEV)
    torch.library.opcheck(torch.ops.quantkit.binary_conv2d.default, (xc, wc, 40, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(torch.ops.quantkit.binary_bmm.default, (x[None], w[None], 70))
    torch.library.opcheck(torch.ops.quantkit.pack_bits.default, (torch.randn(3, 50, device=DEV), None))
    xq = torch.randint(-8, 8, (1, 5, 30), dtype=torch.int8, device=DEV)
    wq = torch.randint(-8, 8, (7, 30), dtype=torch.int8, device=DEV)
    gi = torch.zeros(7, dtype=torch.int64, device=DEV)
    torch.library.opcheck(torch.ops.quantkit.adder_l1.default, (xq, wq, gi, 1))


@pytest.mark.skipif(not HAVE_CUDA_KERNELS, reason="quantkit._C built without CUDA (or not built)")
def test_every_op_has_a_cuda_kernel():
    """Runs without a GPU: a CUDA build must register a CUDA kernel for every tensor op of the schema file."""
    for name in ["pack_bits", "unpack_bits", "binary_linear", "binary_conv2d", "binary_bmm", "binary_bmm_01",
                 "adder_l1", "adder_linear", "adder_l1_conv2d", "adder_conv2d"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkit::{name}", "CUDA"), name


# ---------------------------------------------------------------------------------------------- deploy on GPU
def _scheme_case(scheme: str):
    """(simulated model, input) for a scheme, small enough for a test; built and calibrated on the CPU."""
    import torchvision

    import quantkit
    from quantkit.models import adder_cnn_digits, vit_digits

    torch.manual_seed(0)
    if scheme in ("xnor", "adabin"):
        q = quantkit.prepare(torchvision.models.resnet18(num_classes=10), scheme).eval()
        return q, torch.randn(2, 3, 32, 32)
    if scheme == "bivit":
        q = quantkit.prepare(vit_digits(depth=2, embed_dim=32, num_heads=2), scheme).eval()
        return q, torch.randn(4, 1, 8, 8)
    model = adder_cnn_digits(width=16)
    with torch.no_grad():
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8))
    model.eval()
    q = quantkit.quantize(model, scheme, [torch.randn(32, 1, 8, 8) for _ in range(2)], progress=False)
    return q, torch.randn(8, 1, 8, 8)


@needs_gpu
@pytest.mark.parametrize("scheme", ["xnor", "adabin", "bivit", "adder_ptq4", "adder_ptq8"])
def test_deploy_on_gpu_equals_simulated_and_runs_quantkit_kernels(scheme, monkeypatch):
    import quantkit
    from torch.profiler import ProfilerActivity, profile

    # the simulated model's float convs/matmuls must be true fp32 (TF32 would round the scaled +-1 operands)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    sim, x = _scheme_case(scheme)
    dep = quantkit.convert(sim).to(DEV).eval()
    sim = sim.to(DEV).eval()
    xd = x.to(DEV)
    with torch.no_grad():
        ref = sim(xd)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = dep(xd)
            torch.cuda.synchronize()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    names = [e.key for e in prof.key_averages()]
    assert any("bgemm" in n for n in names), f"no quantkit GEMM kernel ran for {scheme}: {names[:20]}"
