"""Bit packing / unpacking: the compiled kernels (every CPU ISA level) against the pure-PyTorch reference, the
layout itself on hand-written cases, opcheck, and the errors."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.errors import KernelError
from quantkit.ops import _dispatch
from quantkit.ops.packing import pack_bits_reference, unpack_bits_reference


def _examples(default: int) -> int:
    """Hypothesis examples per test; QUANTKIT_HYPOTHESIS_EXAMPLES lowers it (the ASan run uses fewer)."""
    return min(default, int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", default)))


HAVE_KERNELS = _dispatch.has_op("pack_bits")
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
ISAS = ["portable", "avx2", "avx512", "amx"]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Run the test once per CPU instruction-set level this machine supports (QUANTKIT_CPU_ISA)."""
    if not HAVE_KERNELS:
        pytest.skip("compiled quantkit kernels not built")
    if request.param not in ops.supported_cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    monkeypatch.setenv("QUANTKIT_CPU_ISA", request.param)
    assert ops.cpu_isa() == request.param
    return request.param


def _random_input(data, dtype: torch.dtype) -> torch.Tensor:
    lead = data.draw(st.lists(st.integers(0 if dtype != torch.bool else 1, 4), min_size=0, max_size=3), label="lead")
    k = data.draw(st.integers(1, 200), label="k")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g)
    if dtype == torch.bool:
        return x > 0
    # sprinkle the edge values of the sign convention: +0, -0, inf, -inf, NaN
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    mask = torch.rand(x.shape, generator=g) < 0.1
    idx = torch.randint(0, len(special), x.shape, generator=g)
    x = torch.where(mask, special[idx], x)
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------- layout facts
def test_layout_single_bits():
    """Element k sits in bit k % 32 of word k // 32; bit 1 = +1 (x >= 0); the last word's tail is zero."""
    k = 70
    for i in [0, 1, 31, 32, 33, 63, 64, 69]:
        x = -torch.ones(k)
        x[i] = 0.5
        words = ops.pack_bits(x)
        assert words.shape == (3,) and words.dtype == torch.int32
        expected = [0, 0, 0]
        expected[i // 32] = 1 << (i % 32)
        expected = [e - 2**32 if e >= 2**31 else e for e in expected]
        assert words.tolist() == expected
    assert ops.pack_bits(torch.ones(k)).tolist() == [-1, -1, (1 << 6) - 1]  # tail of word 2 stays 0
    assert ops.num_words(0) == 0 and ops.num_words(32) == 1 and ops.num_words(33) == 2


def test_sign_convention_zero_and_nan():
    x = torch.tensor([0.0, -0.0, float("nan"), -1e-30, 1e-30, float("inf"), float("-inf")])
    bits = ops.unpack_bits(ops.pack_bits(x), x.numel()).tolist()
    assert bits == [1, 1, -1, -1, 1, 1, -1]


# ---------------------------------------------------------------------------------------------- kernels vs reference
@settings(max_examples=_examples(25), deadline=None)
@given(data=st.data(), dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool]))
def test_pack_matches_reference_default_isa(data, dtype):
    x = _random_input(data, dtype)
    torch.testing.assert_close(ops.pack_bits(x), pack_bits_reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.float64])
def test_pack_unpack_every_isa(isa, dtype):
    @settings(max_examples=_examples(25), deadline=None)
    @given(data=st.data(), use_threshold=st.booleans(), layout=st.sampled_from(["contig", "transposed", "sliced"]))
    def check(data, use_threshold, layout):
        x = _random_input(data, dtype)
        if layout == "transposed" and x.dim() >= 2:
            x = x.transpose(0, -1).contiguous().transpose(0, -1)  # same values, last dim strided
        elif layout == "sliced" and x.shape[-1] > 2:
            x = x[..., 1:]
        threshold = None
        if use_threshold and dtype != torch.bool:
            threshold = torch.randn(x.shape[-1]).to(dtype)
        words = ops.pack_bits(x, threshold)
        torch.testing.assert_close(words, pack_bits_reference(x, threshold), rtol=0, atol=0)
        k = x.shape[-1]
        torch.testing.assert_close(ops.unpack_bits(words, k), unpack_bits_reference(words, k), rtol=0, atol=0)
        torch.testing.assert_close(
            ops.unpack_bits(words, k, torch.bool), unpack_bits_reference(words, k, torch.bool), rtol=0, atol=0
        )

    check()


def test_unpack_dtypes_and_roundtrip():
    x = torch.randn(3, 5, 45)
    words = ops.pack_bits(x)
    for dtype in [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int32]:
        out = ops.unpack_bits(words, 45, dtype)
        assert out.dtype == dtype
        assert torch.equal(out.float(), torch.where(x >= 0, 1.0, -1.0))


def test_pack_activation_nhwc_channels_last_and_weights():
    x = torch.randn(2, 40, 5, 3)
    expected = pack_bits_reference(x.permute(0, 2, 3, 1).contiguous())
    assert torch.equal(ops.pack_activation_nhwc(x), expected)
    assert torch.equal(ops.pack_activation_nhwc(x.contiguous(memory_format=torch.channels_last)), expected)
    w = torch.randn(7, 40, 3, 3)
    assert torch.equal(ops.pack_conv_weight(w), pack_bits_reference(w.permute(0, 2, 3, 1).contiguous()))
    wl = torch.randn(7, 33)
    assert torch.equal(ops.pack_linear_weight(wl), pack_bits_reference(wl))


# ---------------------------------------------------------------------------------------------- opcheck, errors
@needs_kernels
def test_opcheck_pack_unpack():
    x = torch.randn(3, 4, 77)
    torch.library.opcheck(torch.ops.quantkit.pack_bits.default, (x, None))
    torch.library.opcheck(torch.ops.quantkit.pack_bits.default, (x, torch.randn(77)))
    torch.library.opcheck(torch.ops.quantkit.pack_bits.default, (x > 0, None))
    words = ops.pack_bits(x)
    torch.library.opcheck(torch.ops.quantkit.unpack_bits.default, (words, 77, None))
    torch.library.opcheck(torch.ops.quantkit.unpack_bits.default, (words, 77, torch.float16))


def test_pack_errors():
    with pytest.raises(KernelError, match="dtype"):
        ops.pack_bits(torch.arange(5))
    with pytest.raises(KernelError, match="threshold"):
        ops.pack_bits(torch.randn(4, 5), torch.zeros(4))
    with pytest.raises(KernelError, match="threshold"):
        ops.pack_bits(torch.randn(4, 5) > 0, torch.zeros(5))
    with pytest.raises(KernelError, match="num_words"):
        ops.unpack_bits(torch.zeros(3, 2, dtype=torch.int32), 70)
    with pytest.raises(KernelError, match="int32"):
        ops.unpack_bits(torch.zeros(3, 3, dtype=torch.int64), 70)


@needs_kernels
def test_raw_op_checks(monkeypatch):
    with pytest.raises(RuntimeError, match="float or bool"):
        torch.ops.quantkit.pack_bits(torch.arange(5), None)
    with pytest.raises(RuntimeError, match="words"):
        torch.ops.quantkit.unpack_bits(torch.zeros(3, 2, dtype=torch.int32), 70, None)
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="QUANTKIT_CPU_ISA"):
        torch.ops.quantkit.pack_bits(torch.randn(3), None)
