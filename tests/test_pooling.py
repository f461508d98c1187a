"""The channels_last max-pool kernel equals torch's max_pool2d (then relu) bit for bit on every CPU ISA level: NaN
payloads, infinities and signed zeros included; out= writes only its slice; bad input raises a clear error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.errors import KernelError
from quantkit.ops._dispatch import has_op

from conftest import hypothesis_examples, use_isa_level

HAVE_KERNELS = has_op("max_pool2d_nhwc")
HYP = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
CL = torch.channels_last
# special values, as int32 bit patterns: quiet NaNs of both signs with payloads, a signalling NaN, +-inf, +-0
_SPECIAL_BITS = [0x7FC00000, -0x00400000, 0x7FC12345, -0x003EDCBB, 0x7F800001, 0x7F800000, -0x00800000, 0,
                 -0x80000000]


@pytest.fixture(params=["portable", "avx2", "avx512"])
def isa(request, monkeypatch):
    """Once per CPU instruction-set level this machine supports (QUANTKIT_CPU_ISA)."""
    return use_isa_level(request.param, monkeypatch, HAVE_KERNELS)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 values as int32 bit patterns in logical (N, C, H, W) order: equal bits, NaN payloads included."""
    return t.contiguous().view(torch.int32)


def _torch_pool(x: torch.Tensor, k: int, s: int, p: int, relu: bool) -> torch.Tensor:
    y = F.max_pool2d(x, k, s, p)
    return y.relu() if relu else y


def _input(g: torch.Generator, n: int, c: int, h: int, w: int, special: float) -> torch.Tensor:
    """Random values with a share `special` of NaNs/infinities/signed zeros and many ties of +-0.0."""
    x = torch.randn(n, c, h, w, generator=g)
    x[x.abs() < 0.2] = 0.0
    x[torch.rand(x.shape, generator=g) < 0.3] *= -1  # -0.0 where a zero is negated
    bits = torch.tensor(_SPECIAL_BITS, dtype=torch.int32).view(torch.float32)
    pick = torch.rand(x.shape, generator=g) < special
    x[pick] = bits[torch.randint(len(_SPECIAL_BITS), (int(pick.sum()),), generator=g)]
    return x.contiguous(memory_format=CL)


@settings(max_examples=hypothesis_examples(60), **HYP)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 3, 8, 15, 16, 17, 33, 64, 70]), h=st.integers(1, 12),
       w=st.integers(1, 12), k=st.sampled_from([1, 2, 3, 5]), s=st.integers(1, 3), pad_frac=st.integers(0, 2),
       relu=st.booleans(), special=st.sampled_from([0.0, 0.05, 0.3]), seed=st.integers(0, 2**16))
def test_kernel_equals_torch_max_pool2d_bit_for_bit(isa, n, c, h, w, k, s, pad_frac, relu, special, seed):
    p = (k // 2) * pad_frac // 2  # 0 .. k // 2
    if h + 2 * p < k or w + 2 * p < k:
        return
    x = _input(torch.Generator().manual_seed(seed), n, c, h, w, special)
    ref = _torch_pool(x, k, s, p, relu)
    with torch.no_grad():
        y = ops.max_pool2d_nhwc(x, k, s, p, relu=relu)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL)
    assert torch.equal(_bits(y), _bits(ref))
    assert torch.equal(_bits(ops.max_pool2d_nhwc_reference(x, k, s, p, relu)), _bits(ref))


@settings(max_examples=hypothesis_examples(20), **HYP)
@given(kh=st.integers(1, 4), kw=st.integers(1, 4), sh=st.integers(1, 3), sw=st.integers(1, 3), seed=st.integers(0, 99))
def test_rectangular_geometry(isa, kh, kw, sh, sw, seed):
    x = _input(torch.Generator().manual_seed(seed), 2, 19, 9, 7, 0.05)
    k, s, p = (kh, kw), (sh, sw), (kh // 2, kw // 2)
    ref = F.max_pool2d(x, k, s, p)
    assert torch.equal(_bits(torch.ops.quantkit.max_pool2d_nhwc(x, k, s, p)), _bits(ref))


def test_window_rules_match_torch(isa):
    """The last NaN of a window wins (its payload), else the first of equal maxima (-0.0 before +0.0 stays -0.0);
    padded taps never win, even over -inf."""
    nan_a, nan_b = torch.tensor([0x7FC00001, -0x003FFFFE], dtype=torch.int32).view(torch.float32).tolist()
    rows = [[nan_a, 1.0, nan_b], [nan_b, 2.0, nan_a], [-0.0, 0.0, -0.0], [0.0, -0.0, 0.0],
            [-float("inf")] * 3, [1.0, nan_a, 3.0]]
    for c in (1, 16, 21):  # scalar, whole vectors, vector + tail
        x = torch.tensor(rows).view(len(rows), 1, 1, 3).repeat(1, c, 1, 1).contiguous(memory_format=CL)
        for k, p in (((1, 3), (0, 0)), ((1, 3), (0, 1))):
            y = torch.ops.quantkit.max_pool2d_nhwc(x, list(k), [1, 1], list(p))
            assert torch.equal(_bits(y), _bits(F.max_pool2d(x, k, 1, p)))
        y = torch.ops.quantkit.max_pool2d_nhwc(x, [1, 3], [1, 1], [0, 0])
        assert _bits(y)[:, 0].flatten().tolist() == [-0x003FFFFE, 0x7FC00001, -0x80000000, 0, -0x00800000,
                                                     0x7FC00001]


def test_relu_fusion_equals_relu_then_pool_up_to_zero_signs(isa):
    x = _input(torch.Generator().manual_seed(3), 2, 24, 10, 10, 0.0)
    y = ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True)
    after = F.max_pool2d(F.relu(x), 3, 2, 1)
    assert torch.equal(y, after)  # == treats -0.0 and +0.0 as equal: only a zero's sign may differ
    assert torch.equal(_bits(y), _bits(F.max_pool2d(x, 3, 2, 1).relu()))


def test_resnet_stem_shape_and_nchw_input(isa):
    x = torch.randn(2, 64, 112, 112).relu()
    ref = F.max_pool2d(x, 3, 2, 1)
    for xin in (x.contiguous(memory_format=CL), x):  # a contiguous NCHW x is copied to channels_last first
        y = ops.max_pool2d_nhwc(xin, 3, 2, 1, relu=True)
        assert y.shape == (2, 64, 56, 56) and y.is_contiguous(memory_format=CL)
        assert torch.equal(_bits(y), _bits(ref))


def test_out_writes_only_its_batch_slice(isa):
    x = _input(torch.Generator().manual_seed(1), 3, 20, 9, 9, 0.05)
    big = torch.full((5, 20, 5, 5), 7.0).contiguous(memory_format=CL)
    dst = big[1:4]
    got = ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True, out=dst)
    assert got is dst
    assert torch.equal(_bits(big[1:4]), _bits(F.max_pool2d(x, 3, 2, 1).relu()))
    assert bool((big[0] == 7.0).all()) and bool((big[4] == 7.0).all())
    one = big[4:5]
    torch.ops.quantkit.max_pool2d_nhwc_into(x[2:3], [3, 3], [2, 2], [1, 1], False, one)
    assert torch.equal(_bits(big[4:5]), _bits(F.max_pool2d(x[2:3], 3, 2, 1)))
    assert bool((big[0] == 7.0).all())


def test_empty_batch_and_channels(isa):
    for shape, out_shape in (((0, 64, 8, 8), (0, 64, 4, 4)), ((2, 0, 8, 8), (2, 0, 4, 4))):
        x = torch.randn(shape).contiguous(memory_format=CL)
        y = ops.max_pool2d_nhwc(x, 3, 2, 1)
        assert y.shape == out_shape
        assert ops.max_pool2d_nhwc(x, 3, 2, 1, out=torch.empty(out_shape).contiguous(memory_format=CL)).shape == out_shape
        assert ops.max_pool2d_nhwc_reference(x, 3, 2, 1).shape == out_shape


def test_two_threads_give_the_same_bits(isa):
    x = _input(torch.Generator().manual_seed(5), 3, 40, 21, 17, 0.02)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True)
        torch.set_num_threads(2)
        two = ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_bits(one), _bits(two))


def test_gradient_and_other_dtypes_take_the_reference():
    x = torch.randn(1, 5, 6, 6).contiguous(memory_format=CL).requires_grad_()
    y = ops.max_pool2d_nhwc(x, 3, 2, 1, relu=True)
    y.sum().backward()
    ref = x.detach().clone().requires_grad_()
    F.max_pool2d(ref, 3, 2, 1).relu().sum().backward()
    assert torch.equal(x.grad, ref.grad)
    with pytest.raises(KernelError, match="out= does not support autograd"):
        ops.max_pool2d_nhwc(x, 3, 2, 1, out=torch.empty(1, 5, 3, 3).contiguous(memory_format=CL))
    xd = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(ops.max_pool2d_nhwc(xd, 2, 2, 0), F.max_pool2d(xd, 2, 2, 0))


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_inference_calls_the_kernel():
    x = torch.randn(1, 8, 6, 6).contiguous(memory_format=CL)
    with torch.no_grad(), torch.profiler.profile() as prof:
        ops.max_pool2d_nhwc(x, 3, 2, 1)
    assert any("quantkit::max_pool2d_nhwc" in e.name for e in prof.events())


X = torch.randn(1, 4, 6, 6).contiguous(memory_format=CL)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.max_pool2d_nhwc(X.to(torch.int32), 3, 2, 1), "float tensor"),
    (lambda: ops.max_pool2d_nhwc(X[0], 3, 2, 1), "4-D"),
    (lambda: ops.max_pool2d_nhwc(X.transpose(2, 3), 3, 2, 1), "channels_last"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 2, 2), "half the kernel"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 0, 1), "stride must be >= 1"),
    (lambda: ops.max_pool2d_nhwc(X, (3, 3, 3), 2, 1), "pair of ints"),
    (lambda: ops.max_pool2d_nhwc(X, 9, 2, 1), "larger than the padded input"),
    (lambda: ops.max_pool2d_nhwc(X[:, :, :0], 3, 2, 1), "non-empty height"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 2, 1, out=torch.empty(1, 4, 3, 3)), "channels_last"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 2, 1, out=torch.empty(1, 4, 4, 3).contiguous(memory_format=CL)),
     r"shape \(1, 4, 3, 3\)"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 2, 1, out=torch.empty(1, 4, 3, 3, dtype=torch.float64)), "dtype"),
    (lambda: ops.max_pool2d_nhwc(X, 3, 2, 1, out=torch.empty(1, 4, 3, 3, device="meta").contiguous(memory_format=CL)),
     "one device"),
])
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises(KernelError, match=match):
        call()


def test_out_sharing_memory_with_x_is_refused():
    buf = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    with pytest.raises(KernelError, match="share memory"):
        ops.max_pool2d_nhwc(buf, 1, 1, 0, out=buf)


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_direct_calls_check_their_arguments():
    Q = torch.ops.quantkit
    with pytest.raises(RuntimeError, match="max_pool2d_nhwc: x must be channels_last.*memory_format"):
        Q.max_pool2d_nhwc(X.transpose(2, 3), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="x must be float32"):
        Q.max_pool2d_nhwc(X.double(), [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match="at most half"):
        Q.max_pool2d_nhwc(X, [3, 3], [2, 2], [2, 1])
    with pytest.raises(RuntimeError, match="overflows int64"):
        Q.max_pool2d_nhwc(X, [2**63 - 1, 3], [1, 1], [2**62 - 1, 1])
    with pytest.raises(RuntimeError, match="out must have the output's shape"):
        Q.max_pool2d_nhwc_into(X, [3, 3], [2, 2], [1, 1], False, torch.empty(1, 4, 2, 2).contiguous(memory_format=CL))
    with pytest.raises(RuntimeError, match="out must not share memory"):
        Q.max_pool2d_nhwc_into(X, [1, 1], [1, 1], [0, 0], False, X)
    # a huge kernel with matching padding is a valid geometry: every window holds the whole plane
    y = Q.max_pool2d_nhwc(X, [2**62 + 1, 1], [1, 1], [2**61, 0])
    assert torch.equal(y, X.amax(2, keepdim=True).expand_as(y))


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_opcheck_and_meta():
    x = torch.randn(2, 5, 7, 7).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.quantkit.max_pool2d_nhwc.default, (x, [3, 3], [2, 2], [1, 1], True))
    out = torch.empty(2, 5, 4, 4).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.quantkit.max_pool2d_nhwc_into.default, (x, [3, 3], [2, 2], [1, 1], False, out))
    meta = torch.ops.quantkit.max_pool2d_nhwc(x.to("meta"), [3, 3], [2, 2], [1, 1])
    assert meta.shape == (2, 5, 4, 4) and meta.is_contiguous(memory_format=CL)


@pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit kernels not built")
def test_compiled_caller_tiling_the_batch_into_out():
    """torch.compile functionalizes the out= op (it returns nothing, so the write is its only effect)."""
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=CL)

    def tiles(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(4, 8, 5, 5).contiguous(memory_format=CL)
        ops.max_pool2d_nhwc(x, 3, 2, 1, out=out[:2])
        ops.max_pool2d_nhwc(-x, 3, 2, 1, relu=True, out=out[2:])
        return out

    with torch.no_grad():
        got = torch.compile(tiles, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, torch.cat([F.max_pool2d(x, 3, 2, 1), F.max_pool2d(-x, 3, 2, 1).relu()]))
