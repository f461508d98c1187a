"""Integer l1 (adder) ops: compiled CPU kernels against the int64 references, on every ISA level this CPU runs.

Integer sums must be equal exactly; float outputs within float32 tolerance of the float64 reference epilogue.
"""
from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.errors import KernelError
from quantkit.ops import adder as A
from quantkit.ops._dispatch import has_op, supported_cpu_isas
from quantkit.ops.elementwise import quantize_groups_reference

from conftest import cpu_isa, hypothesis_examples

HAVE_KERNELS = has_op("adder_l1") and has_op("adder_conv2d")
needs_kernels = pytest.mark.skipif(not HAVE_KERNELS, reason="compiled quantkit._C adder kernels are not built")
ISAS = supported_cpu_isas() or ["portable"]
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])




def _operands(gen: torch.Generator, bits: int, code_form: bool, x_shape, w_shape, dtype):
    """Quantized operands of a b-bit adder layer: signed form x, w in [-2^(b-1), 2^(b-1) - 1]; code form x in
    [0, 2^b - 1] and w signed b-bit (the kernel doubles it: w_mult=2)."""
    half = 2 ** (bits - 1)
    if code_form:
        x = torch.randint(0, 2**bits, x_shape, generator=gen)
    else:
        x = torch.randint(-half, half, x_shape, generator=gen)
    w = torch.randint(-half, half, w_shape, generator=gen)
    if dtype == torch.uint8 and not code_form:
        dtype = torch.int16  # signed values need a signed dtype
    if dtype == torch.int8 and code_form and bits == 8:
        dtype = torch.int16  # 0..255 does not fit int8
    return x.to(dtype), w.to(torch.int8), (2 if code_form else 1)


def _noncontiguous(t: torch.Tensor, how: int) -> torch.Tensor:
    """The same values with other strides: 0 contiguous, 1 a strided slice of a larger buffer, 2 transposed storage."""
    if how == 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    if how == 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return t


def _assert_float(y: torch.Tensor, ref: torch.Tensor, s: torch.Tensor, delta: torch.Tensor, bias) -> None:
    scale = (delta.abs().max() * s.abs().max().double() + (0 if bias is None else bias.abs().max())).item()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


# ------------------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------------------
def test_fig3_worked_vector():
    """docs/algorithms.md#adder-ptq-fig-3-vector (b = 4, signed): the clamped group's q_x, q_w give sum |q_x - q_w| = 70."""
    qx = torch.tensor([-7, 6, 5, -8, 0, 3, -2, 4, 7], dtype=torch.int8).view(1, 1, 9)
    qw = torch.tensor([7, 7, -8, 7, 7, -8, -8, 7, 7], dtype=torch.int8).view(1, 9)
    gi = torch.zeros(1, dtype=torch.long)
    assert A.adder_l1_reference(qx, qw, gi).item() == 70
    assert A.adder_l1(qx, qw, gi).item() == 70
    # As a 3x3 conv over the 3x3 patch, no padding: the same single output.
    assert A.adder_l1_conv2d(qx.view(1, 1, 1, 3, 3), qw.view(1, 1, 3, 3), gi).item() == 70
    y = A.adder_linear(qx, qw, gi, torch.tensor([0.2]), torch.tensor([-126.2]))
    torch.testing.assert_close(y, torch.tensor([[-0.2 * 70 - 126.2]]))


def test_reference_matches_unfold_float_adder():
    """The conv reference equals a float64 AdderNet forward built from F.unfold with zero padding."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (2, 2, 3, 9, 8), generator=gen)
    w = torch.randint(-8, 8, (5, 3, 3, 2), generator=gen)
    gi = torch.tensor([0, 1, 1, 0, 1])
    for stride, padding, dilation in [(1, 1, 1), (2, (1, 2), (2, 1)), ((1, 2), 0, 1)]:
        s = A.adder_l1_conv2d_reference(x, w, gi, stride, padding, dilation, w_mult=2)
        ho, wo = A.adder_conv2d_output_size(9, 8, (3, 2), stride, padding, dilation)
        cols = []
        for o in range(5):
            xu = torch.nn.functional.unfold(x[gi[o]].double(), (3, 2), dilation=dilation, padding=padding, stride=stride)
            cols.append((xu - 2 * w[o].double().reshape(-1, 1)).abs().sum(1))
        assert torch.equal(s.double(), torch.stack(cols, 1).reshape(2, 5, ho, wo))


# ------------------------------------------------------------------------------------------------------------
# kernels == references
# ------------------------------------------------------------------------------------------------------------
@needs_kernels
@settings(max_examples=60, **SETTINGS)
@given(
    groups=st.integers(1, 4),
    m=st.integers(1, 21),
    k=st.integers(1, 75),
    n=st.integers(1, 40),
    bits=st.integers(2, 8),
    code_form=st.booleans(),
    dtype=st.sampled_from([torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64]),
    layout=st.integers(0, 2),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_kernel_equals_reference(groups, m, k, n, bits, code_form, dtype, layout, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, w_mult = _operands(gen, bits, code_form, (groups, m, k), (n, k), dtype)
    x, w = _noncontiguous(x, layout), _noncontiguous(w, layout)
    gi = torch.randint(0, groups, (n,), generator=gen)
    delta = torch.rand(n, generator=gen) + 0.01
    bias = torch.randn(n, generator=gen) * 10 if with_bias else None
    s_ref = A.adder_l1_reference(x, w, gi, w_mult)
    y_ref = A.adder_linear_reference(x, w, gi, delta, bias, w_mult)
    for isa in ISAS:
        with cpu_isa(isa):
            s = A.adder_l1(x, w, gi, w_mult)
            y = A.adder_linear(x, w, gi, delta, bias, w_mult)
        assert s.dtype == torch.int32 and s.shape == (m, n)
        assert torch.equal(s, s_ref), isa
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _assert_float(y, y_ref, s_ref, delta, bias)


@needs_kernels
@settings(max_examples=60, **SETTINGS)
@given(
    groups=st.integers(1, 3),
    batch=st.integers(1, 2),
    c=st.integers(1, 19),
    h=st.integers(1, 9),
    w_=st.integers(1, 9),
    cout=st.integers(1, 20),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bits=st.integers(2, 8),
    code_form=st.booleans(),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_conv2d_kernel_equals_reference(
    groups, batch, c, h, w_, cout, kh, kw, stride, padding, dilation, bits, code_form, channels_last, seed
):
    ho, wo = A.adder_conv2d_output_size(h, w_, (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    x, w, w_mult = _operands(gen, bits, code_form, (groups, batch, c, h, w_), (cout, c, kh, kw), torch.int16)
    if channels_last:  # NHWC storage per group, as a quantized channels-last activation would be
        x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    delta = torch.rand(cout, generator=gen) + 0.01
    bias = torch.randn(cout, generator=gen)
    s_ref = A.adder_l1_conv2d_reference(x, w, gi, stride, padding, dilation, w_mult)
    y_ref = A.adder_conv2d_reference(x, w, gi, delta, bias, stride, padding, dilation, w_mult)
    for isa in ISAS:
        with cpu_isa(isa):
            s = A.adder_l1_conv2d(x, w, gi, stride, padding, dilation, w_mult)
            y = A.adder_conv2d(x, w, gi, delta, bias, stride, padding, dilation, w_mult)
        assert s.shape == (batch, cout, ho, wo) and s.dtype == torch.int32
        assert torch.equal(s, s_ref), isa
        _assert_float(y, y_ref, s_ref, delta, bias)


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
def test_wide_activation_range_and_clamped_weights(isa):
    """Activations spanning > 256 values take the u16 path; weights far outside the activation range are clamped
    with the exact per-channel correction. Both stay exact."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-300, 301, (2, 7, 37), generator=gen, dtype=torch.int64).to(torch.int32)
    w = torch.randint(-1000, 1001, (19, 37), generator=gen).to(torch.int16)
    gi = torch.randint(0, 2, (19,), generator=gen)
    x_small = torch.randint(0, 4, (2, 7, 37), generator=gen).to(torch.uint8)  # 2-bit activations, 16-bit weights
    with cpu_isa(isa):
        for xx in (x, x_small):
            for w_mult in (1, 2):
                assert torch.equal(A.adder_l1(xx, w, gi, w_mult), A.adder_l1_reference(xx, w, gi, w_mult))
        xc = torch.randint(-200, 200, (1, 1, 3, 5, 6), generator=gen).to(torch.int16)
        wc = torch.randint(-500, 500, (4, 3, 3, 3), generator=gen).to(torch.int16)
        g1 = torch.zeros(4, dtype=torch.long)
        assert torch.equal(A.adder_l1_conv2d(xc, wc, g1, 1, 2, 1), A.adder_l1_conv2d_reference(xc, wc, g1, 1, 2, 1))


@needs_kernels
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    "group_index",
    [
        [0] * 40,  # one group
        [i % 3 for i in range(40)],  # interleaved: every 16-channel block sees three groups
        [0] * 5 + [1] * 3 + [2] * 30 + [3] * 2,  # group boundaries inside blocks; small groups
        [3] * 17 + [1] * 23,  # unused groups 0 and 2
    ],
)
def test_group_layouts(isa, group_index):
    gen = torch.Generator().manual_seed(4)
    gi = torch.tensor(group_index)
    x = torch.randint(0, 256, (4, 13, 70), generator=gen).to(torch.uint8)
    w = torch.randint(-128, 128, (40, 70), generator=gen).to(torch.int8)
    delta = torch.rand(40, generator=gen)
    with cpu_isa(isa):
        for w_mult in (1, 2):
            s = A.adder_l1(x, w, gi, w_mult)
            assert torch.equal(s, A.adder_l1_reference(x, w, gi, w_mult))
            _assert_float(A.adder_linear(x, w, gi, delta, None, w_mult),
                          A.adder_linear_reference(x, w, gi, delta, None, w_mult), s, delta, None)


@needs_kernels
def test_long_reduction_8bit_code_form():
    """K = 4608 (512 channels x 3x3): the largest 8-bit code-form sums stay exact."""
    x = torch.full((1, 3, 4608), 255, dtype=torch.int16)
    w = torch.full((17, 4608), -128, dtype=torch.int8)
    w[1:] = torch.randint(-128, 128, (16, 4608), dtype=torch.int8)
    gi = torch.zeros(17, dtype=torch.long)
    s = A.adder_l1(x, w, gi, 2)
    assert s[0, 0].item() == 4608 * (255 + 256)
    assert torch.equal(s, A.adder_l1_reference(x, w, gi, 2))


@needs_kernels
def test_batch_one_and_empty_batch():
    x = torch.randint(-8, 8, (2, 1, 1, 3, 3), dtype=torch.int8)
    w = torch.randint(-8, 8, (3, 1, 3, 3), dtype=torch.int8)
    gi = torch.tensor([1, 0, 1])
    assert torch.equal(A.adder_l1_conv2d(x, w, gi, 1, 1), A.adder_l1_conv2d_reference(x, w, gi, 1, 1))
    empty = A.adder_linear(torch.zeros(1, 0, 5, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8),
                           torch.zeros(4, dtype=torch.long), torch.ones(4))
    assert empty.shape == (0, 4)


@needs_kernels
def test_conv_output_is_channels_last():
    x = torch.randint(0, 16, (1, 2, 8, 5, 5), dtype=torch.uint8)
    w = torch.randint(-8, 8, (16, 8, 3, 3), dtype=torch.int8)
    y = A.adder_conv2d(x, w, torch.zeros(16, dtype=torch.long), torch.ones(16), None, 1, 1, 1, 2)
    assert y.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------------------------
# registration: opcheck, fake impls, compile
# ------------------------------------------------------------------------------------------------------------
@needs_kernels
def test_opcheck():
    x = torch.randint(0, 16, (2, 3, 5, 6, 7), dtype=torch.int8)
    w = torch.randint(-8, 8, (9, 5, 3, 3), dtype=torch.int8)
    gi = torch.randint(0, 2, (9,))
    torch.library.opcheck(torch.ops.quantkit.adder_conv2d.default, (x, w, gi, torch.rand(9), torch.rand(9), [2, 1], [1, 1], [1, 2], 2))
    torch.library.opcheck(torch.ops.quantkit.adder_l1_conv2d.default, (x, w, gi, [1, 1], [0, 1], [1, 1], 1))
    xl = torch.randint(0, 16, (2, 4, 13), dtype=torch.int8)
    wl = torch.randint(-8, 8, (6, 13), dtype=torch.int8)
    gl = torch.randint(0, 2, (6,))
    torch.library.opcheck(torch.ops.quantkit.adder_l1.default, (xl, wl, gl, 2))
    torch.library.opcheck(torch.ops.quantkit.adder_linear.default, (xl, wl, gl, torch.rand(6), None, 1))


@needs_kernels
def test_torch_compile_fullgraph():
    x = torch.randint(0, 16, (2, 1, 4, 6, 6), dtype=torch.uint8)
    w = torch.randint(-8, 8, (5, 4, 3, 3), dtype=torch.int8)
    gi, delta, bias = torch.tensor([0, 1, 0, 1, 1]), torch.rand(5), torch.rand(5)
    f = torch.compile(lambda t: A.adder_conv2d(t, w, gi, delta, bias, 1, 1, 1, 2), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), A.adder_conv2d_reference(x, w, gi, delta, bias, 1, 1, 1, 2))


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_kernel_error():
    x = torch.zeros(2, 3, 5, dtype=torch.int8)
    w = torch.zeros(4, 5, dtype=torch.int8)
    gi = torch.zeros(4, dtype=torch.long)
    d = torch.ones(4)
    with pytest.raises(KernelError, match="integer tensor"):
        A.adder_l1(x.float(), w, gi)
    with pytest.raises(KernelError, match=r"\(G, M, K\)"):
        A.adder_l1(x[0], w, gi)
    with pytest.raises(KernelError, match="reduction lengths differ"):
        A.adder_l1(x, w[:, :4], gi)
    with pytest.raises(KernelError, match=r"group_index values must lie in \[0, 2\)"):
        A.adder_l1(x, w, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(KernelError, match="group_index has 3 entries"):
        A.adder_l1(x, w, gi[:3])
    with pytest.raises(KernelError, match="w_mult"):
        A.adder_l1(x, w, gi, w_mult=3)
    with pytest.raises(KernelError, match="delta"):
        A.adder_linear(x, w, gi, torch.ones(3))
    with pytest.raises(KernelError, match="bias"):
        A.adder_linear(x, w, gi, d, torch.ones(4, dtype=torch.int32))
    xc = torch.zeros(1, 1, 3, 4, 4, dtype=torch.int8)
    wc = torch.zeros(2, 3, 5, 5, dtype=torch.int8)
    g2 = torch.zeros(2, dtype=torch.long)
    with pytest.raises(KernelError, match="too small for kernel 5x5"):
        A.adder_conv2d(xc, wc, g2, torch.ones(2))
    with pytest.raises(KernelError, match="input channels differ"):
        A.adder_l1_conv2d(xc, wc[:, :2], g2)
    with pytest.raises(KernelError, match="stride must be >= 1"):
        A.adder_l1_conv2d(xc, wc, g2, stride=0, padding=2)
    with pytest.raises(KernelError, match=r"\(G, N, C, H, W\)"):
        A.adder_l1_conv2d(xc[0], wc, g2, padding=2)


@needs_kernels
def test_cpp_checks_raise_runtime_error():
    """Called directly (no Python validation), the C++ kernels reject bad input with clear RuntimeErrors."""
    x = torch.zeros(2, 3, 5, dtype=torch.int8)
    w = torch.zeros(4, 5, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="group_index values must lie"):
        torch.ops.quantkit.adder_l1(x, w, torch.tensor([0, 5, 0, 0]), 1)
    with pytest.raises(RuntimeError, match="xq must be an integer tensor"):
        torch.ops.quantkit.adder_l1(x.float(), w, torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match="at most 65536"):
        torch.ops.quantkit.adder_l1(torch.tensor([[[0, 70000]]]), torch.zeros(1, 2, dtype=torch.long),
                                    torch.zeros(1, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match="QUANTKIT_CPU_ISA"):
        with cpu_isa("sse9"):
            torch.ops.quantkit.adder_l1(x, w, torch.zeros(4, dtype=torch.long), 1)


@needs_kernels
def test_integer_ops_see_inplace_writes_and_new_tensors():
    """No hidden weight cache: every call of the integer-input ops packs the weights it is given."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(0, 16, (2, 6, 40), generator=gen).to(torch.uint8)
    w = torch.randint(-8, 8, (20, 40), generator=gen).to(torch.int8)
    gi = torch.randint(0, 2, (20,), generator=gen)
    assert torch.equal(A.adder_l1(x, w, gi, 2), A.adder_l1_reference(x, w, gi, 2))
    w.add_(1)
    assert torch.equal(A.adder_l1(x, w, gi, 2), A.adder_l1_reference(x, w, gi, 2))
    gi[:5] = 1 - gi[:5]
    assert torch.equal(A.adder_l1(x, w, gi, 2), A.adder_l1_reference(x, w, gi, 2))
    w.data.fill_(3)  # bypasses the version counter: seen all the same
    assert torch.equal(A.adder_l1(x, w, gi, 2), A.adder_l1_reference(x, w, gi, 2))


# ---- prepacked weights, activation re-quantization fused into the kernel (the deploy path) ---------------------
def _nan_windows(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """Outputs whose window (any channel) reads a NaN input: where the float adder gives NaN."""
    hits = torch.isnan(x).any(1, keepdim=True).float()
    return torch.nn.functional.conv2d(hits, torch.ones(1, 1, *kernel), None, stride, padding, dilation) > 0


@needs_kernels
@settings(max_examples=50, **SETTINGS)
@given(
    groups=st.integers(1, 4),
    batch=st.integers(1, 2),
    c=st.integers(1, 37),
    h=st.integers(1, 8),
    w_=st.integers(1, 8),
    cout=st.integers(1, 35),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    round_mode=st.sampled_from(["half_even", "half_away"]),
    channels_last=st.booleans(),
    n_nan=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_conv2d_equals_quantize_then_conv(groups, batch, c, h, w_, cout, kh, kw, stride, padding, dilation,
                                                 bits, signed, round_mode, channels_last, n_nan, seed):
    """adder_conv2d_packed(x) == adder_conv2d(quantize_groups_reference(x)) bit for bit on every ISA, with NaN exactly
    in the outputs whose window reads a NaN (ties of the rounding included: x is drawn on a half-step grid)."""
    ho, wo = A.adder_conv2d_output_size(h, w_, (kh, kw), stride, padding, dilation)
    if ho < 1 or wo < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=gen) + 0.25
    x = torch.randint(-40, 41, (batch, c, h, w_), generator=gen).float() / 16  # many exact rounding ties
    x.view(-1)[torch.randint(0, x.numel(), (n_nan,), generator=gen)] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (cout, c, kh, kw), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
    w_mult = 1 if signed else 2
    codes = quantize_groups_reference(x, scale, bits, signed, round_mode).to(torch.int16)
    nan = _nan_windows(x, (kh, kw), stride, padding, dilation).expand(batch, cout, ho, wo)
    packed = A.adder_prepack(w, gi, w_mult, bits, signed)
    for isa in ISAS:
        with cpu_isa(isa):
            y = A.adder_conv2d_packed(x, scale, *packed, delta, bias, (kh, kw), stride, padding, dilation, bits, signed,
                                      round_mode)
            ref = A.adder_conv2d(codes, w, gi, delta, bias, stride, padding, dilation, w_mult)
        assert y.shape == (batch, cout, ho, wo) and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.isnan(y), nan), isa
        assert torch.equal(y[~nan], ref[~nan]), isa


@needs_kernels
@pytest.mark.parametrize("stride", [(2, 2), (2, 1), (1, 3), (3, 2)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_packed_strided_pointwise_conv_reads_only_its_pixels(stride, channels_last):
    """A strided 1x1 conv without padding (the downsample shortcut) quantizes only the pixels it reads: the outputs
    equal quantize-then-conv on every ISA, a NaN on a skipped pixel reaches no output and one on a read pixel
    reaches exactly that output pixel."""
    gen = torch.Generator().manual_seed(11)
    n, c, h, w_, cout, groups = 2, 24, 11, 9, 20, 3  # odd sizes: the last input row / column is not always read
    scale = torch.rand(groups, generator=gen) + 0.25
    x = torch.randint(-40, 41, (n, c, h, w_), generator=gen).float() / 16
    x[0, 3, 1, 1] = float("nan")  # pixel (1, 1): skipped by every stride here (its row or its column)
    x[1, 5, 0, 0] = float("nan")  # always read
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-8, 8, (cout, c, 1, 1), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
    codes = quantize_groups_reference(x, scale, 4, True, "half_even").to(torch.int16)
    packed = A.adder_prepack(w, gi, 1, 4, True)
    nan = _nan_windows(x, (1, 1), stride, (0, 0), (1, 1)).expand(n, cout, -1, -1)
    assert nan.any()
    for isa in ISAS:
        with cpu_isa(isa):
            y = A.adder_conv2d_packed(x, scale, *packed, delta, bias, (1, 1), stride, (0, 0), (1, 1), 4, True,
                                      "half_even")
            ref = A.adder_conv2d(codes, w, gi, delta, bias, stride, (0, 0), (1, 1), 1)
        assert y.shape == ref.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.isnan(y), nan), isa
        assert torch.equal(y[~nan], ref[~nan]), isa


@needs_kernels
@settings(max_examples=40, **SETTINGS)
@given(
    groups=st.integers(1, 4),
    m=st.integers(0, 20),
    k=st.integers(1, 70),
    n=st.integers(1, 40),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    round_mode=st.sampled_from(["half_even", "half_away"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_linear_equals_quantize_then_linear(groups, m, k, n, bits, signed, round_mode, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=gen) + 0.25
    x = torch.randn(m, k, generator=gen) * 2
    if m:
        x[m // 2, k // 2] = float("nan")
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (n,), generator=gen)
    delta, bias = torch.rand(n, generator=gen) + 0.01, torch.randn(n, generator=gen)
    w_mult = 1 if signed else 2
    codes = quantize_groups_reference(x, scale, bits, signed, round_mode).to(torch.int16)
    nan = torch.isnan(x).any(1, keepdim=True).expand(m, n)
    packed = A.adder_prepack(w, gi, w_mult, bits, signed)
    for isa in ISAS:
        with cpu_isa(isa):
            y = A.adder_linear_packed(x, scale, *packed, delta, bias, bits, signed, round_mode)
            ref = A.adder_linear(codes, w, gi, delta, bias, w_mult)
        assert y.shape == (m, n)
        assert torch.equal(torch.isnan(y), nan), isa
        assert torch.equal(y[~nan], ref[~nan]), isa


@needs_kernels
@settings(max_examples=hypothesis_examples(40), **SETTINGS)
@given(
    groups=st.integers(1, 4),
    batch=st.integers(1, 2),
    c=st.integers(1, 140),
    hw=st.integers(1, 7),
    cout=st.integers(1, 40),
    k=st.sampled_from([1, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    signed=st.booleans(),
    fused_block=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_thermometer_form_equals_bytes_form(groups, batch, c, hw, cout, k, stride, padding, signed, fused_block, seed):
    """2-bit grids: the thermometer packing (popcount of xor) gives the byte packing's outputs bit for bit on every ISA
    level, across the 5-codes-per-lane layout's edges (C = 1 .. 140: partial lanes, partial words, partial fields),
    zero padding, groups straddling channel blocks, NaN inputs and the fused residual + relu epilogue."""
    ho = (hw + 2 * padding - k) // stride + 1
    if ho < 1:
        return
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=gen) + 0.25
    x = torch.randint(-40, 41, (batch, c, hw, hw), generator=gen).float() / 16
    x.view(-1)[seed % x.numel()] = float("nan") if seed % 3 == 0 else x.view(-1)[seed % x.numel()]
    w = torch.randint(-2, 2, (cout, c, k, k), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
    res = torch.randn(batch, cout, ho, ho, generator=gen) if fused_block else None
    w_mult = 1 if signed else 2
    bytes_form = A.adder_prepack(w, gi, w_mult, 2, signed, "bytes")
    thermo_form = A.adder_prepack(w, gi, w_mult, 2, signed, "thermometer")
    lanes = -(-c // 5)
    assert thermo_form[0].numel() == -(-cout // 16) * k * k * -(-lanes // 4) * 128  # 20 codes per 8 bytes
    for isa in ISAS:
        with cpu_isa(isa):
            want = A.adder_conv2d_packed(x, scale, *bytes_form, delta, bias, k, stride, padding, 1, 2, signed,
                                         residual=res, relu=fused_block)
            got = A.adder_conv2d_packed(x, scale, *thermo_form, delta, bias, k, stride, padding, 1, 2, signed,
                                        residual=res, relu=fused_block)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), isa
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), isa


@needs_kernels
@settings(max_examples=hypothesis_examples(30), **SETTINGS)
@given(
    groups=st.integers(1, 4),
    batch=st.integers(1, 2),
    c=st.integers(1, 70),
    vectors=st.integers(2, 4),
    h=st.integers(1, 6),
    cout=st.integers(1, 40),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    stride_h=st.integers(1, 2),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    fused_block=st.booleans(),
    n_nan=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_conv2d_pixel_vector_kernel(groups, batch, c, vectors, h, cout, kh, kw, stride_h, padding, dilation,
                                           bits, signed, fused_block, n_nan, seed):
    """Output rows of 16, 24 or 32 pixels with stride 1 along them: the AVX-512 path runs the pixel-vector kernel on
    the planar layout (image by image, padding ring, both tap-row forms, groups split anywhere inside a channel
    block). It must equal the integer op on the quantized input bit for bit, NaN windows included, on every ISA."""
    wo = 8 * vectors
    w_ = wo - 2 * padding[1] + dilation[1] * (kw - 1)  # so that the output row is exactly wo pixels
    if w_ < 1:
        return
    ho, wo_ = A.adder_conv2d_output_size(h, w_, (kh, kw), (stride_h, 1), padding, dilation)
    if ho < 1:
        return
    assert wo_ == wo
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(groups, generator=gen) + 0.25
    x = torch.randint(-40, 41, (batch, c, h, w_), generator=gen).float() / 16
    x.view(-1)[torch.randint(0, x.numel(), (n_nan,), generator=gen)] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (cout, c, kh, kw), generator=gen).to(torch.int8)
    gi = torch.randint(0, groups, (cout,), generator=gen)
    delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
    res = torch.randn(batch, cout, ho, wo, generator=gen) if fused_block else None
    w_mult = 1 if signed else 2
    codes = quantize_groups_reference(x, scale, bits, signed, "half_even").to(torch.int16)
    nan = _nan_windows(x, (kh, kw), (stride_h, 1), padding, dilation).expand(batch, cout, ho, wo)
    want = A.adder_conv2d(codes, w, gi, delta, bias, (stride_h, 1), padding, dilation, w_mult)
    if fused_block:
        want = torch.relu(want + res)
    packed = A.adder_prepack(w, gi, w_mult, bits, signed)
    for isa in ISAS:
        with cpu_isa(isa):
            y = A.adder_conv2d_packed(x, scale, *packed, delta, bias, (kh, kw), (stride_h, 1), padding, dilation,
                                      bits, signed, residual=res, relu=fused_block)
        assert torch.equal(torch.isnan(y), nan), isa
        torch.testing.assert_close(y[~nan], want[~nan], rtol=0, atol=0, msg=isa)


def _near_rounding_boundaries(scale: torch.Tensor, bits: int, signed: bool, shape, gen: torch.Generator) -> torch.Tensor:
    """float32 inputs at and within 4 ulps of x = (k + 1/2) s_g / c, the points where some group's code changes
    (k over the grid and one past each end, g random per element)."""
    c = (2**bits - 1) / 2 if signed else 2**bits - 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    n = int(torch.tensor(shape).prod())
    k = torch.randint(lo - 1, hi + 1, (n,), generator=gen).double()
    g = torch.randint(0, scale.numel(), (n,), generator=gen)
    x = ((k + 0.5) * scale.double()[g] / c).float()
    ulps = torch.randint(-4, 5, (n,), generator=gen)
    for step in range(4):
        x = torch.where(ulps > step, torch.nextafter(x, torch.tensor(float("inf"))), x)
        x = torch.where(ulps < -step, torch.nextafter(x, torch.tensor(float("-inf"))), x)
    return x.reshape(shape)


@needs_kernels
@pytest.mark.parametrize("bits,signed,round_mode", [(2, False, "half_even"), (4, False, "half_even"),
                                                    (4, True, "half_away"), (8, False, "half_even"),
                                                    (8, True, "half_even"), (3, False, "half_away")])
@pytest.mark.parametrize("w_", [16, 5])  # 16: pixel-vector kernel (planar, 8 pixels at a time); 5: row kernel
def test_fused_quantizer_exact_at_rounding_boundaries(bits, signed, round_mode, w_):
    """The fused quantizer multiplies by c / s_g instead of dividing by s_g; inputs within ulps of every code change
    (where x * (c / s) and (x / s) * c round differently) still get the reference's codes, on every ISA. Scales
    include awkward ones (1/3, 0.1, 1e-3) and one so small that c / s overflows float (the division is kept)."""
    gen = torch.Generator().manual_seed(bits * 10 + w_ + signed)
    for scale in (torch.tensor([1 / 3, 0.1, 1e-3, 7.77]), torch.rand(3, generator=gen) + 0.05,
                  torch.tensor([1e-38, 0.5])):
        x = _near_rounding_boundaries(scale, bits, signed, (2, 40, 3, w_), gen).contiguous(
            memory_format=torch.channels_last)
        cout = 20
        w = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (cout, 40, 1, 1), generator=gen).to(torch.int8)
        gi = torch.randint(0, scale.numel(), (cout,), generator=gen)
        delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
        w_mult = 1 if signed else 2
        codes = quantize_groups_reference(x, scale, bits, signed, round_mode).to(torch.int16)
        want = A.adder_conv2d(codes, w, gi, delta, bias, 1, 0, 1, w_mult)
        packed = A.adder_prepack(w, gi, w_mult, bits, signed, "bytes")
        for isa in ISAS:
            with cpu_isa(isa):
                y = A.adder_conv2d_packed(x, scale, *packed, delta, bias, 1, 1, 0, 1, bits, signed, round_mode)
            assert torch.equal(y, want), (isa, scale)


@needs_kernels
@pytest.mark.parametrize("batch,hw", [(1, 7), (2, 5), (3, 6)])
def test_packed_conv2d_with_weights_past_l2(batch, hw):
    """512 -> 208 channels, 3x3 (1.2 MB of packed weights): the row kernel then prefetches each next channel block's
    weights over a panel's micro-tiles; the outputs stay those of the integer op on the quantized input."""
    gen = torch.Generator().manual_seed(batch * 100 + hw)
    c, cout, bits = 512, 208, 4
    scale = torch.rand(4, generator=gen) + 0.25
    x = (torch.randint(-40, 41, (batch, c, hw, hw), generator=gen).float() / 16).contiguous(
        memory_format=torch.channels_last)
    w = torch.randint(-8, 8, (cout, c, 3, 3), generator=gen).to(torch.int8)
    gi = torch.sort(torch.randint(0, 4, (cout,), generator=gen)).values
    delta, bias = torch.rand(cout, generator=gen) + 0.01, torch.randn(cout, generator=gen)
    codes = quantize_groups_reference(x, scale, bits, False).to(torch.int16)
    want = A.adder_conv2d(codes, w, gi, delta, bias, 1, 1, 1, 2)
    packed = A.adder_prepack(w, gi, 2, bits, False, "bytes")
    assert packed[0].numel() > 768 * 1024
    for isa in ISAS:
        with cpu_isa(isa):
            y = A.adder_conv2d_packed(x, scale, *packed, delta, bias, 3, 1, 1, 1, bits, False)
        assert torch.equal(y, want), isa


@needs_kernels
def test_prepack_form_choice_and_errors():
    w = torch.randint(-2, 2, (20, 128, 3, 3), dtype=torch.int8)
    gi = torch.zeros(20, dtype=torch.long)
    thermo = A.adder_prepack(w, gi, 2, 2, False, "thermometer")[0]
    bytes_ = A.adder_prepack(w, gi, 2, 2, False, "bytes")[0]
    assert thermo.numel() * 16 == bytes_.numel() * 7  # 128 channels: 7 words of 20 codes against 16 of 8 bytes
    auto = A.adder_prepack(w, gi, 2, 2, False)[0]
    assert auto.numel() == (thermo.numel() if "avx512" in ISAS else bytes_.numel())
    # 4-bit codes and 64 channels or fewer stay in bytes under "auto"
    assert A.adder_prepack(w, gi, 2, 4, False)[0].numel() == bytes_.numel()
    w64 = w[:, :64].contiguous()
    assert A.adder_prepack(w64, gi, 2, 2, False)[0].numel() == A.adder_prepack(w64, gi, 2, 2, False, "bytes")[0].numel()
    with pytest.raises(KernelError, match="2-bit codes only"):
        A.adder_prepack(w, gi, 2, 3, False, "thermometer")
    with pytest.raises(KernelError, match="form must be one of"):
        A.adder_prepack(w, gi, 2, 2, False, "nibbles")
    with pytest.raises(RuntimeError, match="at most 4 values"):
        torch.ops.quantkit.adder_prepack(w, gi, 2, 0, 7, "thermometer")
    # a thermometer packing whose header claims a wider grid is rejected, not misread
    pw, pm = A.adder_prepack(w, gi, 2, 2, False, "thermometer")
    bad = pm.clone()
    bad[3, 1] = 7  # grid hi
    with pytest.raises(RuntimeError, match="invalid header"):
        A.adder_conv2d_packed(torch.randn(1, 128, 4, 4), torch.ones(1), pw, bad, torch.ones(20), None, 3, 1, 1, 1, 2,
                              False)


@needs_kernels
def test_packed_ops_reject_mismatched_packings():
    w = torch.randint(-8, 8, (5, 3, 3, 3), dtype=torch.int8)
    gi = torch.tensor([0, 1, 1, 0, 1])
    pw, pm = A.adder_prepack(w, gi, 2, 4, False)
    x, s, d = torch.randn(1, 3, 6, 6), torch.ones(2), torch.ones(5)
    with pytest.raises(RuntimeError, match="made for C=3"):
        A.adder_conv2d_packed(torch.randn(1, 4, 6, 6), s, pw, pm, d, None, 3, 1, 1, 1, 4, False)
    with pytest.raises(RuntimeError, match="kernel_size"):
        A.adder_conv2d_packed(x, s, pw, pm, d, None, 1, 1, 1, 1, 4, False)
    with pytest.raises(RuntimeError, match="packed for the grid"):  # 8-bit codes on a 4-bit packing
        A.adder_conv2d_packed(x, s, pw, pm, d, None, 3, 1, 1, 1, 8, False)
    with pytest.raises(RuntimeError, match="one scale per group"):
        A.adder_conv2d_packed(x, torch.ones(1), pw, pm, d, None, 3, 1, 1, 1, 4, False)
    with pytest.raises(RuntimeError, match="finite and > 0"):
        A.adder_conv2d_packed(x, torch.tensor([1.0, 0.0]), pw, pm, d, None, 3, 1, 1, 1, 4, False)
    with pytest.raises(RuntimeError, match="does not match packed_meta"):
        A.adder_conv2d_packed(x, s, pw[:-1], pm, d, None, 3, 1, 1, 1, 4, False)
    bad = pm.clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="corrupt"):
        A.adder_conv2d_packed(x, s, pw, bad, d, None, 3, 1, 1, 1, 4, False)
    with pytest.raises(RuntimeError, match="invalid header"):
        A.adder_conv2d_packed(x, s, pw, torch.zeros_like(pm), d, None, 3, 1, 1, 1, 4, False)
    with pytest.raises(KernelError, match="w_mult"):
        A.adder_prepack(w, gi, 3, 4, False)


@needs_kernels
def test_deploy_layer_prepacks_once_and_after_load_state_dict():
    from quantkit.nn.adder import AdderConv2d
    from quantkit.nn.adder_quant import QuantAdderConv2d
    from quantkit.schemes import get_scheme

    torch.manual_seed(0)
    q = QuantAdderConv2d.from_float(AdderConv2d(4, 6, 3, padding=1), get_scheme("adder_ptq4"), "layer")
    q.start_calibration()
    with torch.no_grad():
        q(torch.randn(2, 4, 8, 8))
    q.finish_calibration()
    dep = q.to_deploy()
    assert dep.packed_weight is not None and "packed_weight" not in dep.state_dict()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), q(x), rtol=1e-5, atol=1e-4)
        dep.to(memory_format=torch.channels_last)  # packed buffers are flat: left alone
        other = q.to_deploy()
        other.weight_int.zero_()
        other.prepack()
        before = other(x)
        other.load_state_dict(dep.state_dict())  # repacks the loaded codes
        torch.testing.assert_close(other(x), dep(x))
        assert not torch.equal(before, other(x))
