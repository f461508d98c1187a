"""Hostile inputs for every torch.ops.quantkit.* op, called directly and through the wrappers, on every CPU ISA level:
int64-overflowing conv geometry, kernels larger than the input, dirty tail bits, arguments on meta or mixed
devices, empty tensors, extreme integer ranges, NaN/Inf in every float argument, bad dtypes and ranks. Each op
either raises cleanly or returns its reference's answer; the deploy layers reject what their simulated model
rejects. Also run under AddressSanitizer (tests/test_kernels_asan.py)."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import quantkit
import quantkit.ops as O
from quantkit.errors import KernelError
from quantkit.ops import _dispatch
from quantkit.ops import adder as A
from quantkit.ops.binary import (binary_bmm_01_reference, binary_bmm_reference, binary_conv2d_reference,
                                 binary_linear_reference)
from quantkit.ops.elementwise import maxout_reference, quantize_groups_reference
from quantkit.ops.layout import conv2d_output_hw

from conftest import hypothesis_examples, use_isa_level

HAVE_KERNELS = _dispatch.has_op("binary_conv2d")
Q = torch.ops.quantkit
I32 = torch.int32
G0 = torch.zeros(1, dtype=torch.long)
# RuntimeError: the C++ TORCH_CHECKs; KernelError (a ValueError): the Python wrappers and fake implementations
CLEAN_ERRORS = (RuntimeError, ValueError)
D_WRAP = (2 + 2**64) // 3  # 3 * D_WRAP wraps to 2 in int64
HYP = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])


@pytest.fixture(params=["portable", "avx2", "avx512"])
def isa(request, monkeypatch):
    """Once per CPU instruction-set level this machine supports (QUANTKIT_CPU_ISA)."""
    return use_isa_level(request.param, monkeypatch, HAVE_KERNELS)


def _same(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal values, NaN where the reference has NaN (the sign of a zero aside)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype, ref.dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=0, equal_nan=True)


def _words(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Random int32 words, every bit (tails included) random."""
    return torch.randint(-(2**31), 2**31, shape, generator=g, dtype=torch.int64).to(I32)


# ---------------------------------------------------------------------------------------------------------- 1, 3
def test_wrapping_dilation_is_rejected_not_a_wild_read(isa):
    x, w = torch.zeros(1, 6, 7, 1, dtype=I32), torch.zeros(4, 4, 4, 1, dtype=I32)
    with pytest.raises(RuntimeError, match="overflows int64"):
        Q.binary_conv2d(x, w, 32, [1, 1], [0, 0], [D_WRAP, 1])
    xq, wq = torch.zeros(1, 1, 1, 6, 7, dtype=torch.int8), torch.zeros(4, 1, 4, 4, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="overflows int64"):
        Q.adder_l1_conv2d(xq, wq, torch.zeros(4, dtype=torch.long), [1, 1], [0, 0], [D_WRAP, 1])
    with pytest.raises(KernelError, match="overflows int64"):
        O.binary_conv2d(x, w, 32, 1, 0, (D_WRAP, 1))
    with pytest.raises(KernelError, match="overflows int64"):
        A.adder_l1_conv2d(xq, wq, torch.zeros(4, dtype=torch.long), 1, 0, (D_WRAP, 1))


def test_kernel_larger_than_input_with_large_stride_is_rejected(isa):
    # floor((1 - 3) / 3) + 1 = 0 rows; C++ truncation used to give 1
    x, w = torch.zeros(1, 1, 1, 1, dtype=I32), torch.zeros(4, 3, 3, 1, dtype=I32)
    with pytest.raises(RuntimeError, match="too small"):
        Q.binary_conv2d(x, w, 32, [3, 3], [0, 0], [1, 1])
    with pytest.raises(KernelError, match="too small"):
        Q.binary_conv2d(x.to("meta"), w.to("meta"), 32, [3, 3], [0, 0], [1, 1])  # the fake agrees
    xq, wq, gi = torch.zeros(1, 1, 1, 1, 1, dtype=torch.int8), torch.zeros(4, 1, 3, 3, dtype=torch.int8), torch.zeros(4, dtype=torch.long)
    for op in (lambda: Q.adder_l1_conv2d(xq, wq, gi, [3, 3], [0, 0], [1, 1]),
               lambda: Q.adder_conv2d(xq, wq, gi, torch.ones(4), None, [3, 3], [0, 0], [1, 1])):
        with pytest.raises(RuntimeError, match="too small"):
            op()
    with pytest.raises(KernelError, match="too small"):
        Q.adder_l1_conv2d(xq.to("meta"), wq.to("meta"), gi.to("meta"), [3, 3], [0, 0], [1, 1])


def test_empty_kernel_message_names_the_kernel(isa):
    x, w = torch.zeros(1, 5, 5, 1, dtype=I32), torch.zeros(4, 0, 3, 1, dtype=I32)
    with pytest.raises(RuntimeError, match="0 taps along height; it needs at least 1"):
        Q.binary_conv2d(x, w, 32, [1, 1], [2, 0], [1, 1])
    with pytest.raises(KernelError, match="0 taps along height"):
        O.binary_conv2d(x, w, 32, 1, (2, 0), 1)


_GEOM = st.sampled_from([0, 1, 2, 3, 5, 2**31, 2**62, D_WRAP, 2**63 - 1, -1])


@settings(max_examples=hypothesis_examples(150), **HYP)
@given(h=st.integers(0, 4), w=st.integers(0, 4), kh=st.integers(0, 3), kw=st.integers(0, 3),
       s=st.tuples(_GEOM, _GEOM), p=st.tuples(_GEOM, _GEOM), d=st.tuples(_GEOM, _GEOM))
def test_conv_geometry_accepted_exactly_when_python_accepts(isa, h, w, kh, kw, s, p, d):
    """The C++ size rule (kernels/conv_shape.h) and the Python one (layout.conv2d_output_hw, used by the wrappers
    and the fakes) accept the same geometries and give the same output shapes; accepted ones match the reference."""
    try:
        ho, wo = conv2d_output_hw("t", (h, w), (kh, kw), s, p, d)
    except KernelError:
        ho = None
    x, wt = torch.zeros(1, h, w, 1, dtype=I32), torch.ones(3, kh, kw, 1, dtype=I32)
    xq, wq, gi = torch.ones(1, 1, 1, h, w, dtype=torch.int8), torch.zeros(3, 1, kh, kw, dtype=torch.int8), torch.zeros(3, dtype=torch.long)
    small = ho is not None and ho * wo <= 4096
    for run in (lambda: Q.binary_conv2d(x, wt, 5, list(s), list(p), list(d)),
                lambda: Q.adder_l1_conv2d(xq, wq, gi, list(s), list(p), list(d))):
        if ho is None:
            with pytest.raises(RuntimeError):
                run()
        elif small:
            assert run().shape[2:] == (ho, wo)
    if small and h and w:  # (F.conv2d, under the reference, refuses an empty input plane)
        _same(Q.binary_conv2d(x, wt, 5, list(s), list(p), list(d)),
              binary_conv2d_reference(x, wt, 5, s, p, d))
    elif small:  # every tap is padding: the dot products are 0
        assert not Q.binary_conv2d(x, wt, 5, list(s), list(p), list(d)).any()
    if small:
        _same(Q.adder_l1_conv2d(xq, wq, gi, list(s), list(p), list(d)),
              A.adder_l1_conv2d_reference(xq, wq, gi, s, p, d).contiguous(memory_format=torch.channels_last))
        fake = Q.binary_conv2d(x.to("meta"), wt.to("meta"), 5, list(s), list(p), list(d))
        assert fake.shape == (1, 3, ho, wo)


# ---------------------------------------------------------------------------------------------------------- 2
def test_tail_bits_are_ignored_like_the_reference(isa):
    x, w = torch.full((1, 2), -1, dtype=I32), torch.zeros(1, 2, dtype=I32)
    assert O.binary_linear(x, w, 33).item() == -33
    _same(Q.binary_linear(x, w, 33, None, None, None, None), binary_linear_reference(x, w, 33))


@settings(max_examples=hypothesis_examples(40), **HYP)
@given(k=st.integers(1, 100), m=st.integers(0, 10), n=st.integers(0, 20), seed=st.integers(0, 2**16),
       kh=st.integers(1, 3), pad=st.integers(0, 1))
def test_dirty_tail_words_match_the_reference(isa, k, m, n, seed, kh, pad):
    g = torch.Generator().manual_seed(seed)
    nw = O.num_words(k)
    a, b = _words(g, m, nw), _words(g, n, nw)
    sc, asc = torch.randn(n, generator=g), torch.randn(n, generator=g)
    torch.testing.assert_close(O.binary_linear(a, b, k, scale=sc, act_sum_scale=asc),
                               binary_linear_reference(a, b, k, sc, asc), rtol=1e-5, atol=1e-4)
    assert torch.equal(O.binary_linear(a, b, k, threshold=sc), binary_linear_reference(a, b, k, threshold=sc))
    assert torch.equal(O.binary_bmm(a[None], b[None], k), binary_bmm_reference(a[None], b[None], k))
    assert torch.equal(O.binary_bmm_01(a[None], b[None], k), binary_bmm_01_reference(a[None], b[None], k))
    n = max(n, 1)  # (F.conv2d, under the reference, refuses 0 output channels)
    x, wt = _words(g, 1, 3, 4, nw), _words(g, n, kh, kh, nw)
    asc = torch.randn(n, generator=g)
    y = O.binary_conv2d(x, wt, k, 1, pad, 1, act_sum_scale=asc, weight_sum_scale=asc, count_scale=asc)
    ref = binary_conv2d_reference(x, wt, k, 1, pad, 1, None, asc, asc, asc)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def _xnor_deploy(cin=3, linear=False):
    torch.manual_seed(0)
    layer = nn.Linear(cin, 8) if linear else nn.Conv2d(cin, 8, 3)
    return quantkit.QAT(nn.Sequential(layer), "xnor", keep_first=False, keep_last=False).convert()


def test_binary_deploy_layers_check_channels_rank_and_dtype():
    dep = _xnor_deploy()
    assert dep(torch.randn(1, 3, 8, 8)).shape == (1, 8, 6, 6)
    with pytest.raises(KernelError, match="built for 3 input channels"):
        dep(torch.randn(1, 4, 8, 8))
    with pytest.raises(KernelError, match=r"\(N, C, H, W\)"):
        dep(torch.randn(3, 8, 8))
    for dt in (torch.float16, torch.bfloat16, torch.float64, torch.bool):
        with pytest.raises(KernelError, match="expects a float32 input"):
            dep(torch.zeros(1, 3, 8, 8, dtype=dt))
    lin = _xnor_deploy(5, linear=True)
    assert lin(torch.randn(2, 5)).shape == (2, 8)
    with pytest.raises(KernelError, match="built for 5 input channels"):
        lin(torch.randn(2, 6))
    with pytest.raises(KernelError, match="expects a float32 input"):
        lin(torch.randn(2, 5, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------- 4
def _op_calls():
    """(name, args) of a valid CPU call of every op with a tensor argument."""
    x, w = torch.zeros(2, 1, dtype=I32), torch.zeros(3, 1, dtype=I32)
    xc, wc = torch.zeros(1, 3, 3, 1, dtype=I32), torch.zeros(3, 1, 1, 1, dtype=I32)
    v = torch.ones(3)
    xq, wq, gi = torch.zeros(1, 2, 4, dtype=torch.int8), torch.zeros(3, 4, dtype=torch.int8), torch.zeros(3, dtype=torch.long)
    xq5, wq4 = torch.zeros(1, 1, 4, 3, 3, dtype=torch.int8), torch.zeros(3, 4, 1, 1, dtype=torch.int8)
    return [
        ("pack_bits", (torch.randn(4, 8), torch.zeros(8))),
        ("unpack_bits", (x, 20, None)),
        ("binary_linear", (x, w, 20, v, v, v, v)),
        ("binary_conv2d", (xc, wc, 20, [1, 1], [0, 0], [1, 1], v, v, v, v, v, v)),
        ("binary_bmm", (x[None], w[None], 20)),
        ("binary_bmm_01", (x[None], w[None], 20)),
        ("maxout", (torch.randn(2, 3), v, v)),
        ("quantize_groups", (torch.randn(2, 3), torch.ones(2), 4, True, True)),
        ("adder_l1", (xq, wq, gi, 1)),
        ("adder_linear", (xq, wq, gi, v, v, 1)),
        ("adder_l1_conv2d", (xq5, wq4, gi, [1, 1], [0, 0], [1, 1], 1)),
        ("adder_conv2d", (xq5, wq4, gi, v, v, [1, 1], [0, 0], [1, 1], 1)),
        ("max_pool2d_nhwc", (torch.randn(1, 3, 5, 5).contiguous(memory_format=torch.channels_last), [3, 3], [2, 2],
                             [1, 1], True)),
        ("conv_max_pool2d_nhwc", (torch.randn(1, 3, 6, 6), torch.randn(3, 9, 16), torch.ones(16), [1, 1], [1, 1],
                                  [3, 3], [2, 2], [1, 1], True, torch.zeros(16))),
    ]


_MIXED = [(name, i) for name, args in _op_calls() for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
@pytest.mark.parametrize("name,pos", _MIXED, ids=[f"{n}-arg{i}" for n, i in _MIXED])
def test_one_argument_on_meta_raises(name, pos):
    args = dict(_op_calls())[name]
    getattr(Q, name)(*args)  # valid on CPU
    n_tensors = sum(isinstance(a, torch.Tensor) for a in args)
    if n_tensors > 1:  # one on meta, or all but one: a mix
        bad = tuple(a.to("meta") if i == pos else a for i, a in enumerate(args))
        with pytest.raises(CLEAN_ERRORS, match="device|CPU|meta"):
            getattr(Q, name)(*bad)
        rest = tuple(a if i == pos or not isinstance(a, torch.Tensor) else a.to("meta") for i, a in enumerate(args))
        with pytest.raises(CLEAN_ERRORS, match="device|CPU|meta"):
            getattr(Q, name)(*rest)
    # all on meta: a shape-only answer (the fake implementation)
    allmeta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(Q, name)(*allmeta)
    assert (out[0] if isinstance(out, tuple) else out).device.type == "meta"


def test_reproduction_pack_bits_meta_threshold():
    with pytest.raises(KernelError, match="one device"):
        Q.pack_bits(torch.randn(4, 8), torch.zeros(8, device="meta"))


# ---------------------------------------------------------------------------------------------------------- 5
def test_int64_adder_operands_near_the_limits_are_rejected(isa):
    x = torch.tensor([[[-(2**63), 2**63 - 1]]])
    w = torch.tensor([[1, 2]], dtype=torch.int8)
    with pytest.raises(RuntimeError, match="int32"):
        Q.adder_l1(x, w, G0, 1)
    with pytest.raises(RuntimeError, match="int32"):
        A.adder_l1(x, w, G0)
    with pytest.raises(KernelError, match="int32"):
        A.adder_l1_reference(x, w, G0)
    wbig = torch.tensor([[2**62, -(2**63)]])
    with pytest.raises(RuntimeError, match="int32"):
        Q.adder_l1(torch.zeros(1, 1, 2, dtype=torch.int64), wbig, G0, 2)


_EXTREME = st.sampled_from([-(2**63), -(2**63) + 1, -(2**31), -(2**31) + 1, -(2**30), -300, -1, 0, 1, 255, 256,
                            2**15, 2**30, 2**31 - 1, 2**31, 2**63 - 1])


@settings(max_examples=hypothesis_examples(120), **HYP)
@given(xs=st.lists(_EXTREME, min_size=1, max_size=6), ws=st.lists(_EXTREME, min_size=1, max_size=6),
       w_mult=st.sampled_from([1, 2]), pad=st.integers(0, 1))
def test_extreme_integer_ranges_are_exact_or_rejected(isa, xs, ws, w_mult, pad):
    """Either the exact l1 sums (Python integers) or a clean error -- never a wrapped sum."""
    k = min(len(xs), len(ws))
    x = torch.tensor(xs[:k], dtype=torch.int64).view(1, 1, k)
    w = torch.tensor(ws[:k], dtype=torch.int64).view(1, k)
    exact = sum(abs(a - w_mult * b) for a, b in zip(xs[:k], ws[:k]))
    try:
        s = Q.adder_l1(x, w, G0, w_mult)
    except RuntimeError:
        s = None
    if s is not None:
        assert s.item() == exact
    try:
        r = A.adder_l1_reference(x, w, G0, w_mult)
        assert r.item() == exact
    except KernelError:
        pass
    # conv: one 1x1 tap per channel, zero padding adds |0 - w| taps
    xc, wc = x.view(1, 1, k, 1, 1), w.view(1, k, 1, 1)
    try:
        sc = Q.adder_l1_conv2d(xc, wc, G0, [1, 1], [pad, pad], [1, 1])
    except RuntimeError:
        return
    ref = A.adder_l1_conv2d_reference(xc, wc, G0, 1, pad, 1, w_mult) if w_mult == 1 else None
    if ref is not None:
        assert torch.equal(sc, ref.contiguous(memory_format=torch.channels_last))


# ---------------------------------------------------------------------------------------------------------- 6, 8
def _adder_deploy(linear: bool):
    from quantkit.nn.adder import AdderConv2d, AdderLinear
    from quantkit.nn.adder_quant import QuantAdderConv2d, QuantAdderLinear
    from quantkit.schemes import get_scheme

    torch.manual_seed(0)
    fp = AdderLinear(6, 5) if linear else AdderConv2d(3, 5, 3, stride=2, padding=1)
    cls = QuantAdderLinear if linear else QuantAdderConv2d
    q = cls.from_float(fp, get_scheme("adder_ptq4"), "layer")
    q.start_calibration()
    with torch.no_grad():
        q(torch.randn(4, 6) if linear else torch.randn(2, 3, 7, 7))
    q.finish_calibration()
    return q, q.to_deploy()


@pytest.mark.parametrize("linear", [False, True])
def test_adder_deploy_propagates_nan_like_the_simulated_model(isa, linear):
    q, dep = _adder_deploy(linear)
    x = torch.randn(2, 6) if linear else torch.randn(2, 3, 7, 7)
    xs = [x.clone() for _ in range(3)]
    xs[0].fill_(float("nan"))
    xs[1].view(-1)[3] = float("nan")
    xs[2].view(-1)[-1] = float("inf")
    with torch.no_grad():
        for xi in xs:
            y_sim, y_dep = q(xi), dep(xi)
            assert torch.equal(torch.isnan(y_sim), torch.isnan(y_dep))
            torch.testing.assert_close(y_dep, y_sim, rtol=1e-5, atol=1e-4, equal_nan=True)
        assert torch.isnan(dep(xs[0])).all()


def test_adder_deploy_inputs(isa):
    q, dep = _adder_deploy(linear=True)
    with torch.no_grad():
        assert dep(torch.randn(0, 6)).shape == (0, 5)
        assert dep(torch.randn(3, 0, 6)).shape == (3, 0, 5)
        with pytest.raises(KernelError, match="built for 6 input channels"):
            dep(torch.randn(2, 7))
    qc, depc = _adder_deploy(linear=False)
    with torch.no_grad():
        assert depc(torch.randn(0, 3, 7, 7)).shape == (0, 5, 4, 4)
        with pytest.raises(KernelError, match=r"'layer': expects an \(N, C, H, W\) input"):
            depc(torch.randn(3, 7, 7))
        with pytest.raises(KernelError, match="built for 3 input channels"):
            depc(torch.randn(1, 4, 7, 7))
        with pytest.raises(KernelError, match="float input"):
            depc(torch.zeros(1, 3, 7, 7, dtype=torch.int32))


@pytest.mark.parametrize("m,n,k", [(0, 3, 40), (3, 0, 40), (3, 4, 0), (0, 0, 0)])
def test_empty_bmm_wrappers(isa, m, n, k):
    a, b = torch.zeros(2, m, O.num_words(k), dtype=I32), torch.zeros(2, n, O.num_words(k), dtype=I32)
    for op, ref in ((O.binary_bmm, binary_bmm_reference), (O.binary_bmm_01, binary_bmm_01_reference)):
        y = op(a, b, k)
        assert y.shape == (2, m, n)
        assert torch.equal(y, ref(a, b, k))
        assert op(a[None], b, k).shape == (1, 2, m, n)


@settings(max_examples=hypothesis_examples(40), **HYP)
@given(m=st.integers(0, 3), n=st.integers(0, 3), k=st.integers(0, 40), b=st.integers(0, 2), seed=st.integers(0, 99))
def test_empty_dimensions_everywhere(isa, m, n, k, b, seed):
    g = torch.Generator().manual_seed(seed)
    nw = O.num_words(k)
    x, w = _words(g, b, m, nw), _words(g, n, nw)
    torch.testing.assert_close(O.binary_linear(x, w, k), binary_linear_reference(x, w, k))
    assert torch.equal(O.binary_bmm(x, w[None].expand(b, n, nw), k), binary_bmm_reference(x, w[None].expand(b, n, nw), k))
    xc, wc = _words(g, b, m + 1, 2, nw), _words(g, n, 1, 1, nw)
    y = O.binary_conv2d(xc, wc, k)
    assert y.shape == (b, n, m + 1, 2)
    if b and n and k:  # (F.conv2d, under the reference, mishandles 0 channels and 0 batches)
        torch.testing.assert_close(y, binary_conv2d_reference(xc, wc, k))
    elif not k:  # no bits: every dot product is 0
        assert not y.any()
    xf = torch.randn(b, m, k, generator=g)
    assert torch.equal(O.pack_bits(xf), O.pack_bits_reference(xf))
    assert torch.equal(O.unpack_bits(O.pack_bits(xf), k), O.unpack_bits_reference(O.pack_bits(xf), k))
    xq, wq = torch.randint(-8, 8, (1, m, k), generator=g, dtype=torch.int8), torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    gi = torch.zeros(n, dtype=torch.long)
    assert torch.equal(A.adder_l1(xq, wq, gi), A.adder_l1_reference(xq, wq, gi))
    assert O.quantize_groups(xf, torch.ones(2), 4, True).shape == (2, b, m, k)
    assert O.maxout(torch.randn(b, n, m), torch.ones(n), torch.ones(n)).shape == (b, n, m)


# ---------------------------------------------------------------------------------------------------------- 7 + NaN/Inf
_SPECIAL = st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.5, -2.0, 0.25])


@settings(max_examples=hypothesis_examples(80), **HYP)
@given(xv=st.lists(_SPECIAL, min_size=6, max_size=6), pv=st.lists(_SPECIAL, min_size=3, max_size=3),
       nv=st.lists(_SPECIAL, min_size=3, max_size=3), cl=st.booleans())
def test_maxout_kernel_equals_reference_for_every_special_value(isa, xv, pv, nv, cl):
    x = torch.tensor(xv).view(1, 3, 2, 1)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    pos, neg = torch.tensor(pv), torch.tensor(nv)
    _same(O.maxout(x, pos, neg), maxout_reference(x, pos, neg))
    x2 = torch.tensor(xv).view(2, 3)
    _same(Q.maxout(x2, pos, neg), maxout_reference(x2, pos, neg))


def test_maxout_reproduction_and_rank():
    y = O.maxout(torch.tensor([[-1.0, 0.0]]), torch.tensor([math.nan, math.inf]), torch.tensor([2.0, 1.0]))
    assert torch.isnan(y).all()
    with pytest.raises(KernelError, match=r"\(N, C, \.\.\.\)"):
        O.maxout(torch.randn(3), torch.ones(3), torch.ones(3))
    with pytest.raises(KernelError, match="one value per channel"):
        O.maxout(torch.randn(2, 3), torch.ones(4), torch.ones(3))


@settings(max_examples=hypothesis_examples(60), **HYP)
@given(vals=st.lists(_SPECIAL, min_size=5, max_size=5), which=st.integers(0, 3), seed=st.integers(0, 99),
       bits_out=st.booleans())
def test_nan_inf_in_binary_epilogue_arguments(isa, vals, which, seed, bits_out):
    g = torch.Generator().manual_seed(seed)
    n, k = 5, 37
    x, w = _words(g, 3, O.num_words(k)), _words(g, n, O.num_words(k))
    v = torch.tensor(vals)
    names = ["scale", "act_sum_scale", "bias", "threshold"]
    kw = {names[which]: v}
    if bits_out and which != 3:
        kw["threshold"] = torch.zeros(n)
    args = [kw.get(a) for a in names]
    _same(O.binary_linear(x, w, k, **kw), binary_linear_reference(x, w, k, *args))
    xc, wc = _words(g, 1, 3, 3, O.num_words(k)), _words(g, n, 2, 2, O.num_words(k))
    cnames = ["scale", "act_sum_scale", "weight_sum_scale", "count_scale", "bias", "threshold"]
    ckw = {cnames[(which + seed) % 6]: v}
    cargs = [ckw.get(a) for a in cnames]
    _same(O.binary_conv2d(xc, wc, k, 1, 1, 1, **ckw), binary_conv2d_reference(xc, wc, k, 1, 1, 1, *cargs))


@settings(max_examples=hypothesis_examples(60), **HYP)
@given(xv=st.lists(_SPECIAL, min_size=8, max_size=8), signed=st.booleans(), half_even=st.booleans(),
       bits=st.integers(2, 8), four_d=st.booleans())
def test_quantize_groups_special_values(isa, xv, signed, half_even, bits, four_d):
    x = torch.tensor(xv).view(1, 2, 2, 2) if four_d else torch.tensor(xv).view(2, 4)
    scale = torch.tensor([0.5, 3.0])
    mode = "half_even" if half_even else "half_away"
    assert torch.equal(O.quantize_groups(x, scale, bits, signed, mode), quantize_groups_reference(x, scale, bits, signed, mode))
    assert torch.equal(O.quantize_groups(x.double(), scale, bits, signed, mode),
                       quantize_groups_reference(x.double(), scale, bits, signed, mode))
    for bad in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(KernelError, match="finite and > 0"):
            O.quantize_groups(x, torch.tensor([1.0, bad]), bits, signed, mode)
        with pytest.raises(RuntimeError, match="finite and > 0"):
            Q.quantize_groups(x, torch.tensor([1.0, bad]), bits, signed, half_even)


@settings(max_examples=hypothesis_examples(40), **HYP)
@given(dv=st.lists(_SPECIAL, min_size=3, max_size=3), bv=st.lists(_SPECIAL, min_size=3, max_size=3),
       seed=st.integers(0, 99))
def test_nan_inf_in_adder_epilogue_arguments(isa, dv, bv, seed):
    g = torch.Generator().manual_seed(seed)
    xq, wq = torch.randint(-8, 8, (2, 4, 5), generator=g, dtype=torch.int8), torch.randint(-8, 8, (3, 5), generator=g, dtype=torch.int8)
    gi = torch.tensor([0, 1, 1])
    d, b = torch.tensor(dv), torch.tensor(bv)
    _same(A.adder_linear(xq, wq, gi, d, b), A.adder_linear_reference(xq, wq, gi, d, b))
    xc = torch.randint(-8, 8, (2, 1, 5, 3, 3), generator=g, dtype=torch.int8)
    wc = wq.view(3, 5, 1, 1)
    _same(A.adder_conv2d(xc, wc, gi, d, b).contiguous(), A.adder_conv2d_reference(xc, wc, gi, d, b))


# ---------------------------------------------------------------------------------------------------------- 9, 10
def test_quantize_groups_validation():
    x = torch.randn(2, 3)
    for dt in (torch.float32, torch.float64):
        for bits in (1, 9, 0, True):
            with pytest.raises(KernelError, match="bits must be an int in 2..8"):
                O.quantize_groups(x.to(dt), torch.ones(2), bits, True)
    with pytest.raises(KernelError, match=r"1-D \(G,\)"):
        O.quantize_groups(x, torch.tensor(1.0), 4, True)
    with pytest.raises(KernelError, match="float tensor"):
        O.quantize_groups(x.int(), torch.ones(1), 4, True)
    with pytest.raises(KernelError, match="round_mode"):
        O.quantize_groups(x, torch.ones(1), 4, True, "floor")


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_amx_is_refused_at_selection_when_missing(monkeypatch):
    if "amx" in O.supported_cpu_isas():
        pytest.skip("this CPU has AMX")
    monkeypatch.setenv("QUANTKIT_CPU_ISA", "amx")
    small = torch.zeros(4, 1, dtype=I32)
    for call in (lambda: Q.cpu_isa(), lambda: Q.binary_linear(small, small, 20, None, None, None, None),
                 lambda: Q.binary_bmm(small[None], small[None], 20), lambda: Q.pack_bits(torch.randn(2, 3), None)):
        with pytest.raises(RuntimeError, match="AMX"):
            call()


def test_bool_input_to_a_binary_deploy_layer_says_float32():
    dep = _xnor_deploy()
    with pytest.raises(KernelError) as info:
        dep(torch.zeros(1, 3, 8, 8, dtype=torch.bool))
    assert "threshold" not in str(info.value) and "float32" in str(info.value)


def test_import_quantkit_registers_the_ops():
    code = "import quantkit, torch; print(hasattr(torch.ops.quantkit, 'pack_bits'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(HAVE_KERNELS)
    env = dict(os.environ, QUANTKIT_DISABLE_KERNELS="1")
    code = "import quantkit, quantkit.ops as O, torch; print(O.pack_bits(torch.randn(2, 40)).shape)"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.strip() == "torch.Size([2, 2])"


# ---------------------------------------------------------------------------------------------------------- fuzz
_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 31, 32, 33, 2**31, 2**63 - 1])
_DTYPES = st.sampled_from([torch.int32, torch.int64, torch.float32, torch.bool, torch.int8])


@settings(max_examples=hypothesis_examples(200), **HYP)
@given(op=st.sampled_from(sorted({n for n, _ in _op_calls()})), pos=st.integers(0, 11), kind=st.integers(0, 5),
       val=_INTS, dt=_DTYPES)
def test_direct_calls_with_one_bad_argument_raise_or_answer(isa, op, pos, kind, val, dt):
    """One argument of a valid call replaced by something hostile: a wrong dtype, an empty or 0-d tensor, a
    transposed view, an extreme int. The op raises cleanly or returns a tensor (ASan checks the accesses)."""
    args = list(dict(_op_calls())[op])
    i = pos % len(args)
    a = args[i]
    if isinstance(a, torch.Tensor) and kind == 5 and a.dtype in (torch.int32, torch.int64):
        if not -(2**31) <= val < 2**31 and a.dtype == torch.int32:
            val = -(2**31) if val < 0 else 2**31 - 1
    if isinstance(a, torch.Tensor):
        args[i] = [lambda: a.to(dt), lambda: a.reshape(-1)[:0], lambda: a.reshape(-1)[:1].reshape(()),
                   lambda: a.t() if a.dim() == 2 else a.flip(0), lambda: a.unsqueeze(0),
                   lambda: torch.full_like(a, val) if a.dtype in (torch.int32, torch.int64) else a * math.nan][kind]()
    elif isinstance(a, list):
        args[i] = [[val, 1], [1], [val, val, val], [], [0, 0], [1, val]][kind]
    elif isinstance(a, bool):
        args[i] = not a
    elif isinstance(a, int):
        args[i] = val
    try:
        out = getattr(Q, op)(*args)
    except CLEAN_ERRORS:
        return
    assert all(isinstance(t, torch.Tensor) for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_benchmark_probes_refuse_unbounded_loops():
    for call in (lambda n: Q.binary_popcount_peak(n), lambda n: Q.adder_isa_peak(n, "sad")):
        for n in (0, -1, 2**62):
            with pytest.raises(RuntimeError, match="iters must be in"):
                call(n)
    with pytest.raises(RuntimeError, match="loop must be"):
        Q.adder_isa_peak(10, "nope")


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (1, 1, 1, 1), (2, 17, 3, 5), (1, 33, 2, 2)])
@pytest.mark.parametrize("cout", [0, 1, 18])
def test_packed_adder_ops_on_edge_shapes(isa, shape, cout):
    """Prepacked adder ops on empty batches, no output channels, channel tails and NaN/Inf inputs: the shapes the
    ASan build checks for out-of-bounds reads of the fused quantization and the packed weights."""
    gen = torch.Generator().manual_seed(cout)
    c = shape[1]
    x = torch.randn(*shape, generator=gen) * 3
    if x.numel():
        x.view(-1)[0] = float("nan")
        x.view(-1)[-1] = float("inf")
    w = torch.randint(-8, 8, (cout, c, 3, 3), generator=gen).to(torch.int8)
    gi = torch.randint(0, 2, (cout,), generator=gen)
    scale, d = torch.tensor([0.7, 1.3]), torch.rand(cout) + 0.1
    for signed in (False, True):
        packed = A.adder_prepack(w, gi, 1 if signed else 2, 4, signed)
        y = A.adder_conv2d_packed(x, scale, *packed, d, None, 3, 1, 1, 1, 4, signed)
        ref = A.adder_conv2d(quantize_groups_reference(x, scale, 4, signed), w, gi, d, None, 1, 1, 1,
                             1 if signed else 2)
        assert y.shape == ref.shape
        finite = ~torch.isnan(y)
        assert torch.equal(y[finite], ref[finite])
        xl = x.flatten(1)[:, :c].contiguous()
        pl = A.adder_prepack(w[:, :, 0, 0].contiguous(), gi, 1 if signed else 2, 4, signed)
        yl = A.adder_linear_packed(xl, scale, *pl, d, None, 4, signed)
        assert yl.shape == (shape[0], cout)
        assert torch.equal(torch.isnan(yl), torch.isnan(xl).any(1, keepdim=True).expand_as(yl))
