"""Binary linear / conv2d / bmm kernels (every CPU ISA level) against their float64 references, the AdaBin
bitwise decomposition against a float convolution, packed-bit epilogues, opcheck, and the errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.errors import KernelError
from quantkit.ops import _dispatch
from quantkit.ops.binary import (
    binary_bmm_01_reference,
    binary_bmm_reference,
    binary_conv2d_reference,
    binary_linear_reference,
)
from quantkit.ops.packing import pack_bits_reference

from conftest import hypothesis_examples, use_isa_level


HAVE_KERNELS = _dispatch.has_op("binary_conv2d")
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")


@pytest.fixture(params=["portable", "avx2", "avx512", "amx"])
def isa(request, monkeypatch):
    """Run the test once per CPU instruction-set level this machine supports (QUANTKIT_CPU_ISA)."""
    return use_isa_level(request.param, monkeypatch, HAVE_KERNELS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _vecs(g: torch.Generator, n: int, names: list[str], present: list[bool]) -> dict:
    return {name: (torch.randn(n, generator=g) if on else None) for name, on in zip(names, present)}


def _assert_float_close(y: torch.Tensor, ref: torch.Tensor, scale_bound: float) -> None:
    """float32 kernel epilogue against the float64 reference rounded to float32: a few ulps of the largest term."""
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * scale_bound + 1e-6)


# ---------------------------------------------------------------------------------------------- linear
def test_linear_every_isa(isa):
    @settings(max_examples=hypothesis_examples(30), deadline=None)
    @given(
        lead=st.lists(st.integers(1, 3), max_size=2),
        m=st.integers(1, 20),
        n=st.integers(1, 40),
        k=st.integers(1, 300),
        present=st.lists(st.booleans(), min_size=3, max_size=3),
        bits_out=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(lead, m, n, k, present, bits_out, seed):
        g = _gen(seed)
        x = ops.pack_bits(torch.randn(*lead, m, k, generator=g))
        w = ops.pack_bits(torch.randn(n, k, generator=g))
        kw = _vecs(g, n, ["scale", "act_sum_scale", "bias"], present)
        y = ops.binary_linear(x, w, k, **kw)
        ref = binary_linear_reference(x, w, k, kw["scale"], kw["act_sum_scale"], kw["bias"])
        if not any(present):
            assert torch.equal(y, ref)  # plain dot products are exact integers
        else:
            _assert_float_close(y, ref, 4.0 * k)
        if bits_out:
            th = torch.randn(n, generator=g)
            yb = ops.binary_linear(x, w, k, **kw, threshold=th)
            assert yb.shape == (*lead, m, ops.num_words(n)) and yb.dtype == torch.int32
            assert torch.equal(yb, pack_bits_reference(y, th))  # same epilogue, then y >= threshold

    check()


# ---------------------------------------------------------------------------------------------- conv2d
_CONV_TERMS = ["scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias"]


def _conv_case(data):
    batch = data.draw(st.integers(1, 2), label="batch")
    c_in = data.draw(st.integers(1, 100), label="c_in")
    c_out = data.draw(st.integers(1, 40), label="c_out")
    kh, kw = data.draw(st.integers(1, 3), label="kh"), data.draw(st.integers(1, 3), label="kw")
    stride = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    dilation = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
    padding = (data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3)))
    min_h = max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1])
    h = data.draw(st.integers(min_h, min_h + 7), label="h")
    w = data.draw(st.integers(min_w, min_w + 7), label="w")
    return batch, c_in, c_out, kh, kw, stride, padding, dilation, h, w


@pytest.mark.parametrize("pixels", [49, 9, 15, 8])  # 6 blocks of 8 and 1 row; 1 and 1; 1 and 7; one full block
def test_conv2d_partial_pixel_blocks_every_isa(isa, pixels):
    # the last pixel block of a conv has pixels % 8 valid rows; 64 channels are two channel-block pairs
    g = _gen(pixels)
    a = torch.randn(1, 96, 1, pixels, generator=g)
    x = ops.pack_activation_nhwc(a)
    wt = ops.pack_conv_weight(torch.randn(64, 96, 1, 3, generator=g))
    y = ops.binary_conv2d(x, wt, 96, 1, (0, 1), 1)
    assert torch.equal(y, binary_conv2d_reference(x, wt, 96, 1, (0, 1), 1, None, None, None, None, None))


def test_conv2d_every_isa(isa):
    @settings(max_examples=hypothesis_examples(30), deadline=None)
    @given(
        data=st.data(),
        present=st.lists(st.booleans(), min_size=5, max_size=5),
        channels_last=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(data, present, channels_last, seed):
        batch, c_in, c_out, kh, kw, stride, padding, dilation, h, w = _conv_case(data)
        g = _gen(seed)
        a = torch.randn(batch, c_in, h, w, generator=g)
        if channels_last:
            a = a.contiguous(memory_format=torch.channels_last)
        x = ops.pack_activation_nhwc(a)
        wt = ops.pack_conv_weight(torch.randn(c_out, c_in, kh, kw, generator=g))
        terms = _vecs(g, c_out, _CONV_TERMS, present)
        y = ops.binary_conv2d(x, wt, c_in, stride, padding, dilation, **terms)
        ref = binary_conv2d_reference(x, wt, c_in, stride, padding, dilation, *[terms[t] for t in _CONV_TERMS])
        assert y.is_contiguous(memory_format=torch.channels_last)
        if not any(present):
            assert torch.equal(y, ref)
        else:
            _assert_float_close(y, ref, 8.0 * c_in * kh * kw)
        th = torch.randn(c_out, generator=g)
        yb = ops.binary_conv2d(x, wt, c_in, stride, padding, dilation, **terms, threshold=th)
        assert yb.shape == (batch, y.shape[2], y.shape[3], ops.num_words(c_out))
        assert torch.equal(yb, pack_bits_reference(y.permute(0, 2, 3, 1), th))

    check()


def test_conv2d_noncontiguous_packed_operands():
    g = _gen(3)
    x_big = ops.pack_activation_nhwc(torch.randn(2, 70, 9, 9, generator=g))  # 3 words
    wt = ops.pack_conv_weight(torch.randn(6, 70, 3, 3, generator=g))
    x_view = x_big[:, 1:, ::2]  # strided spatial view
    y = ops.binary_conv2d(x_view, wt, 70, 1, 1)
    assert torch.equal(y, binary_conv2d_reference(x_view.contiguous(), wt, 70, 1, 1))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2))])
def test_adabin_bitwise_form_equals_float_conv(stride, padding, dilation):
    """docs/algorithms.md#adabin-bitwise-form: y = a_w a_a sum(BwBa) + a_w c_a sum(Bw) + b_w a_a sum(Ba) + n b_w c_a over the valid
    taps equals F.conv2d(a_b, w_b) with zero padding, borders included (AdaBin official-code activation form)."""
    g = _gen(7)
    c_in, c_out = 37, 19
    a = torch.randn(2, c_in, 8, 7, generator=g)
    wf = torch.randn(c_out, c_in, 3, 3, generator=g)
    alpha_a, beta_a = 1.3, 0.4
    c_a = alpha_a * beta_a
    beta_w = wf.mean(dim=(1, 2, 3))
    alpha_w = wf.std(dim=(1, 2, 3), unbiased=False)
    s_a = torch.where(a >= beta_a, 1.0, -1.0)  # threshold beta_a of the official-code form
    s_w = torch.where(wf - beta_w.view(-1, 1, 1, 1) >= 0, 1.0, -1.0)
    a_b = alpha_a * (s_a + beta_a)
    w_b = alpha_w.view(-1, 1, 1, 1) * s_w + beta_w.view(-1, 1, 1, 1)
    expected = F.conv2d(a_b.double(), w_b.double(), None, stride, padding, dilation)
    x = ops.pack_activation_nhwc(a, threshold=torch.full((c_in,), beta_a))
    wt = ops.pack_conv_weight(wf - beta_w.view(-1, 1, 1, 1))
    y = ops.binary_conv2d(
        x, wt, c_in, stride, padding, dilation,
        scale=alpha_w * alpha_a, act_sum_scale=beta_w * alpha_a, weight_sum_scale=alpha_w * c_a,
        count_scale=beta_w * c_a,
    )
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------- many rows
# The AMX path runs only from 128 output rows up (it expands the weights once per call); these shapes reach it,
# with K tails, odd word counts (a half-used 64-element chunk), borders and every epilogue term.
@pytest.mark.parametrize("m,n,k", [(257, 40, 333), (130, 16, 64), (300, 33, 96)])
def test_linear_many_rows_every_isa(isa, m, n, k):
    g = _gen(m + n + k)
    x = ops.pack_bits(torch.randn(m, k, generator=g))
    w = ops.pack_bits(torch.randn(n, k, generator=g))
    assert torch.equal(ops.binary_linear(x, w, k), binary_linear_reference(x, w, k))
    kw = _vecs(g, n, ["scale", "act_sum_scale", "bias"], [True, True, True])
    y = ops.binary_linear(x, w, k, **kw)
    _assert_float_close(y, binary_linear_reference(x, w, k, kw["scale"], kw["act_sum_scale"], kw["bias"]), 4.0 * k)
    th = torch.randn(n, generator=g)
    assert torch.equal(ops.binary_linear(x, w, k, **kw, threshold=th), pack_bits_reference(y, th))
    q = ops.pack_bits(torch.randn(2, m, k, generator=g))
    kk = ops.pack_bits(torch.randn(2, n, k, generator=g))
    assert torch.equal(ops.binary_bmm(q, kk, k), binary_bmm_reference(q, kk, k))
    a01 = ops.pack_bits(torch.rand(2, m, k, generator=g) > 0.5)
    assert torch.equal(ops.binary_bmm_01(a01, kk, k), binary_bmm_01_reference(a01, kk, k))


@pytest.mark.parametrize(
    "batch,c_in,c_out,hw,ksize,stride,padding,dilation",
    [(2, 100, 37, (13, 11), 3, 1, 1, 1), (1, 64, 64, (12, 12), 3, 1, 1, 1), (2, 96, 20, (15, 14), 3, 2, 2, 2),
     (3, 33, 17, (9, 9), 1, 1, 0, 1)],
)
def test_conv2d_many_rows_every_isa(isa, batch, c_in, c_out, hw, ksize, stride, padding, dilation):
    g = _gen(c_in + c_out)
    x = ops.pack_activation_nhwc(torch.randn(batch, c_in, *hw, generator=g))
    wt = ops.pack_conv_weight(torch.randn(c_out, c_in, ksize, ksize, generator=g))
    assert torch.equal(ops.binary_conv2d(x, wt, c_in, stride, padding, dilation),
                       binary_conv2d_reference(x, wt, c_in, stride, padding, dilation))
    terms = _vecs(g, c_out, _CONV_TERMS, [True] * 5)
    y = ops.binary_conv2d(x, wt, c_in, stride, padding, dilation, **terms)
    ref = binary_conv2d_reference(x, wt, c_in, stride, padding, dilation, *[terms[t] for t in _CONV_TERMS])
    _assert_float_close(y, ref, 8.0 * c_in * ksize * ksize)
    th = torch.randn(c_out, generator=g)
    yb = ops.binary_conv2d(x, wt, c_in, stride, padding, dilation, **terms, threshold=th)
    assert torch.equal(yb, pack_bits_reference(y.permute(0, 2, 3, 1), th))


# ---------------------------------------------------------------------------------------------- attention products
def test_bmm_every_isa(isa):
    @settings(max_examples=hypothesis_examples(30), deadline=None)
    @given(
        batch_a=st.lists(st.integers(1, 3), max_size=2),
        broadcast=st.booleans(),
        m=st.integers(1, 20),
        n=st.integers(1, 40),
        k=st.integers(1, 200),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(batch_a, broadcast, m, n, k, seed):
        g = _gen(seed)
        batch_b = [1] * len(batch_a) if broadcast else batch_a
        q = ops.pack_bits(torch.randn(*batch_a, m, k, generator=g))
        kk = ops.pack_bits(torch.randn(*batch_b, n, k, generator=g))
        out = ops.binary_bmm(q, kk, k)
        assert out.dtype == torch.int32 and out.shape == (*batch_a, m, n)
        assert torch.equal(out, binary_bmm_reference(q, kk, k))
        attn = ops.pack_bits(torch.rand(*batch_a, m, k, generator=g) > 0.7)  # {0,1} along tokens
        v_t = ops.pack_bits(torch.randn(*batch_b, n, k, generator=g))  # V^T packed along tokens
        out01 = ops.binary_bmm_01(attn, v_t, k)
        assert torch.equal(out01, binary_bmm_01_reference(attn, v_t, k))

    check()


def test_bivit_products_against_float_attention():
    g = _gen(11)
    q, k_, v = (torch.randn(2, 3, 9, 24, generator=g) for _ in range(3))
    sq, sk, sv = (torch.where(t >= 0, 1.0, -1.0) for t in (q, k_, v))
    logits = ops.binary_bmm(ops.pack_bits(q), ops.pack_bits(k_), 24)
    assert torch.equal(logits.float(), sq @ sk.transpose(-1, -2))
    a01 = torch.rand(2, 3, 9, 9, generator=g) > 0.5
    out = ops.binary_bmm_01(ops.pack_bits(a01), ops.pack_bits(v.transpose(-1, -2)), 9)
    assert torch.equal(out.float(), a01.float() @ sv)


# ---------------------------------------------------------------------------------------------- opcheck
@needs_kernels
def test_opcheck_binary_ops():
    g = _gen(5)
    x = ops.pack_bits(torch.randn(2, 5, 70, generator=g))
    w = ops.pack_bits(torch.randn(20, 70, generator=g))
    v = [torch.randn(20, generator=g) for _ in range(6)]
    lin = torch.ops.quantkit.binary_linear.default
    torch.library.opcheck(lin, (x, w, 70))
    torch.library.opcheck(lin, (x, w, 70, v[0], v[1], v[2], None))
    torch.library.opcheck(lin, (x, w, 70, v[0], None, v[2], v[3]))
    xc = ops.pack_activation_nhwc(torch.randn(2, 70, 6, 5, generator=g))
    wc = ops.pack_conv_weight(torch.randn(20, 70, 3, 3, generator=g))
    conv = torch.ops.quantkit.binary_conv2d.default
    torch.library.opcheck(conv, (xc, wc, 70, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(conv, (xc, wc, 70, [2, 1], [1, 0], [1, 2], *v[:5], None))
    torch.library.opcheck(conv, (xc, wc, 70, [1, 1], [1, 1], [1, 1], v[0], None, None, None, v[4], v[5]))
    a = ops.pack_bits(torch.randn(3, 7, 40, generator=g))
    b = ops.pack_bits(torch.randn(3, 9, 40, generator=g))
    torch.library.opcheck(torch.ops.quantkit.binary_bmm.default, (a, b, 40))
    torch.library.opcheck(torch.ops.quantkit.binary_bmm_01.default, (a, b, 40))


# ---------------------------------------------------------------------------------------------- errors
def test_wrapper_errors():
    x = ops.pack_bits(torch.randn(4, 70))
    w = ops.pack_bits(torch.randn(5, 70))
    with pytest.raises(KernelError, match="num_words"):
        ops.binary_linear(x, w, 30)
    with pytest.raises(KernelError, match="int32"):
        ops.binary_linear(x.long(), w, 70)
    with pytest.raises(KernelError, match="scale.*output channel"):
        ops.binary_linear(x, w, 70, scale=torch.ones(4))
    xc = ops.pack_activation_nhwc(torch.randn(1, 70, 2, 2))
    wc = ops.pack_conv_weight(torch.randn(5, 70, 3, 3))
    with pytest.raises(KernelError, match="too small"):
        ops.binary_conv2d(xc, wc, 70)
    with pytest.raises(KernelError, match="stride"):
        ops.binary_conv2d(xc, wc, 70, stride=0, padding=1)
    with pytest.raises(KernelError, match="words"):
        ops.binary_conv2d(xc, wc, 20, padding=1)
    with pytest.raises(KernelError, match="broadcast"):
        ops.binary_bmm(ops.pack_bits(torch.randn(2, 3, 8)), ops.pack_bits(torch.randn(3, 3, 8)), 8)


@needs_kernels
def test_raw_op_errors():
    x = ops.pack_bits(torch.randn(4, 70))
    w = ops.pack_bits(torch.randn(5, 70))
    with pytest.raises(RuntimeError, match="num_words"):
        torch.ops.quantkit.binary_linear(x, w, 100)
    with pytest.raises(RuntimeError, match="one value per output channel"):
        torch.ops.quantkit.binary_linear(x, w, 70, torch.ones(3), None, None, None)
    xc = ops.pack_activation_nhwc(torch.randn(1, 70, 2, 2))
    wc = ops.pack_conv_weight(torch.randn(5, 70, 3, 3))
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.quantkit.binary_conv2d(xc, wc, 70, [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="same B"):
        torch.ops.quantkit.binary_bmm(x[None], ops.pack_bits(torch.randn(2, 5, 70)), 70)
