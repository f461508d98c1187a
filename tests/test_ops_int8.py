"""Integer u8 x s8 linear / conv2d kernels of the uniform deploy layers: bit-identical to their exact references on
every ISA level, opcheck, bad input, and the deploy layers on them (== simulated, torch.export, torch.compile)."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import quantkit
from quantkit.ops import int8 as I
from quantkit.ops._dispatch import has_op, supported_cpu_isas
from quantkit.quantizers.uniform import round_to_output_grid

from conftest import cpu_isa

pytestmark = pytest.mark.skipif(not has_op("int8_linear"), reason="quantkit._C not built")
ISAS = supported_cpu_isas() or ["portable"]


def _examples(default: int) -> int:
    """Hypothesis examples per test; QUANTKIT_HYPOTHESIS_EXAMPLES lowers it (the ASan run uses fewer)."""
    return min(default, int(os.environ.get("QUANTKIT_HYPOTHESIS_EXAMPLES", default)))




def _operands(g, n_out, k, bits_w, bits_a):
    qw = 2 ** (bits_w - 1) - 1
    w = torch.randint(-qw, qw + 1, (n_out, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n_out, generator=g) * 0.1 + 1e-3
    qmax = 2**bits_a - 1
    act_scale = torch.tensor(float(torch.rand((), generator=g)) * 0.2 + 0.01)
    act_zp = torch.tensor(float(torch.randint(0, qmax + 1, (), generator=g)))
    bias = torch.randn(n_out, generator=g)
    return w, w_scale, qmax, act_scale, act_zp, bias


@settings(max_examples=_examples(40), deadline=None, derandomize=True)
@given(rows=st.integers(0, 20), k=st.integers(1, 150), n_out=st.integers(1, 80), bits=st.sampled_from([(8, 8), (4, 4), (2, 3)]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_linear_equals_reference_on_every_isa(rows, k, n_out, bits, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    w, w_scale, qmax, s, z, bias = _operands(g, n_out, k, *bits)
    bias = bias if with_bias else None
    x = torch.randn(rows, k, generator=g) * 3  # beyond the grid on both sides: clamping is exercised
    ref = I.int8_linear_reference(x, s, z, qmax, w, w_scale, bias)
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            got = I.int8_linear(x, s, z, qmax, w, I.pack_weight(w), I.weight_sum(w), w_scale, bias)
        assert got.shape == (rows, n_out)
        assert torch.equal(got, ref), isa


@settings(max_examples=_examples(30), deadline=None, derandomize=True)
@given(n=st.integers(0, 2), c=st.integers(1, 20), hw=st.integers(1, 9), n_out=st.integers(1, 40),
       kernel=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2), padding=st.integers(0, 2),
       dilation=st.integers(1, 2), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_conv2d_equals_reference_on_every_isa(n, c, hw, n_out, kernel, stride, padding, dilation,
                                                   channels_last, seed):
    if hw + 2 * padding < dilation * (kernel - 1) + 1:
        return
    g = torch.Generator().manual_seed(seed)
    w, w_scale, qmax, s, z, bias = _operands(g, n_out, c * kernel * kernel, 8, 8)
    w4 = w.view(n_out, kernel, kernel, c).permute(0, 3, 1, 2).contiguous()  # (O, C, kh, kw)
    x = torch.randn(n, c, hw, hw + 1, generator=g) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = I.int8_conv2d_reference(x, s, z, qmax, w4, w_scale, bias, (stride,) * 2, (padding,) * 2, (dilation,) * 2)
    packed = I.pack_weight(I.flatten_conv_weight(w4))
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            got = I.int8_conv2d(x, s, z, qmax, w4, packed, I.weight_sum(w4), w_scale, bias, (stride,) * 2,
                                (padding,) * 2, (dilation,) * 2)
        assert got.shape == ref.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, ref), isa


@pytest.mark.parametrize("shape", [(2, 3, 37, 41), (1, 1, 64, 65), (3, 5, 29, 31)])
def test_int8_conv2d_few_channel_input_on_every_isa(shape):
    """Inputs with few channels (a stem: 3) are quantized as one long row in chunks (many pixels, a partial last
    chunk, out-of-range values): the same codes as row by row."""
    g = torch.Generator().manual_seed(7)
    c = shape[1]
    w, w_scale, qmax, s, z, bias = _operands(g, 16, c * 49, 8, 8)
    w4 = w.view(16, 7, 7, c).permute(0, 3, 1, 2).contiguous()
    x = torch.randn(*shape, generator=g) * 3
    x.view(-1)[5::1009] = 1e6
    x.view(-1)[11::1013] = -1e6
    ref = I.int8_conv2d_reference(x, s, z, qmax, w4, w_scale, bias, (2, 2), (3, 3), (1, 1))
    packed = I.pack_weight(I.flatten_conv_weight(w4))
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            got = I.int8_conv2d(x, s, z, qmax, w4, packed, I.weight_sum(w4), w_scale, bias, (2, 2), (3, 3), (1, 1))
        assert torch.equal(got, ref), isa


def test_reference_matches_float_math_of_the_simulated_layer():
    """The integer formula is the simulated layer's float math: conv((q - z) s_x, q_w s_w) + b."""
    g = torch.Generator().manual_seed(1)
    w, w_scale, qmax, s, z, bias = _operands(g, 8, 27, 8, 8)
    w4 = w.view(8, 3, 3, 3)
    x = torch.randn(2, 3, 7, 7, generator=g)
    q = torch.clamp(torch.round(x / s) + z, 0, qmax)
    sim = torch.nn.functional.conv2d((q - z) * s, w4.float() * w_scale.view(-1, 1, 1, 1), bias, 1, 1)
    ref = I.int8_conv2d_reference(x, s, z, qmax, w4, w_scale, bias, (1, 1), (1, 1), (1, 1))
    torch.testing.assert_close(ref, sim, rtol=1e-5, atol=1e-5)


def test_pack_roundtrip():
    w = torch.randint(-128, 128, (37, 13), dtype=torch.int8)
    p = I.pack_weight(w)
    assert p.shape == (3, 4, 64)
    assert torch.equal(I.unpack_weight(p, 37, 13), w)


def test_int8_opcheck():
    g = torch.Generator().manual_seed(2)
    w, w_scale, qmax, s, z, bias = _operands(g, 20, 18, 8, 8)
    torch.library.opcheck(torch.ops.quantkit.int8_linear.default,
                          (torch.randn(3, 5, 18), s, z, qmax, I.pack_weight(w), I.weight_sum(w), w_scale, bias, 20))
    w4 = w.view(20, 2, 3, 3)
    torch.library.opcheck(torch.ops.quantkit.int8_conv2d.default,
                          (torch.randn(2, 2, 6, 5), s, z, qmax, I.pack_weight(I.flatten_conv_weight(w4)),
                           I.weight_sum(w4), w_scale, None, 20, [3, 3], [2, 1], [1, 0], [1, 1]))
    torch.library.opcheck(torch.ops.quantkit.int8_conv2d.default,
                          (torch.randn(2, 2, 6, 5), s, z, qmax, I.pack_weight(I.flatten_conv_weight(w4)),
                           I.weight_sum(w4), w_scale, bias, 20, [3, 3], [1, 1], [1, 1], [1, 1], 0.05, 20.0, 3, 3,
                           255))
    torch.library.opcheck(torch.ops.quantkit.int8_linear.default,
                          (torch.randn(3, 18), s, z, qmax, I.pack_weight(w), I.weight_sum(w), w_scale, None, 20,
                           0.25, 4.0, 1, 0, 15))


def test_int8_bad_input_is_a_clear_error():
    w = torch.ones(4, 8, dtype=torch.int8)
    p, ws, sc = I.pack_weight(w), I.weight_sum(w), torch.ones(4)
    s, z = torch.tensor(0.1), torch.tensor(3.0)
    lin = torch.ops.quantkit.int8_linear
    with pytest.raises(RuntimeError, match="w_packed must be"):
        lin(torch.randn(2, 9), s, z, 255, p, ws, sc, None, 4)  # K mismatch
    with pytest.raises(RuntimeError, match="act_qmax"):
        lin(torch.randn(2, 8), s, z, 256, p, ws, sc, None, 4)
    with pytest.raises(RuntimeError, match="act_zero_point"):
        lin(torch.randn(2, 8), s, torch.tensor(2.5), 255, p, ws, sc, None, 4)
    with pytest.raises(RuntimeError, match="act_scale"):
        lin(torch.randn(2, 8), torch.tensor(0.0), z, 255, p, ws, sc, None, 4)
    with pytest.raises(RuntimeError, match="float32"):
        lin(torch.randn(2, 8).double(), s, z, 255, p, ws, sc, None, 4)
    with pytest.raises(RuntimeError, match="bias"):
        lin(torch.randn(2, 8), s, z, 255, p, ws, sc, torch.ones(3), 4)
    with pytest.raises(RuntimeError, match="w_sum"):
        lin(torch.randn(2, 8), s, z, 255, p, ws.float(), sc, None, 4)
    conv = torch.ops.quantkit.int8_conv2d
    w4 = torch.ones(4, 2, 2, 2, dtype=torch.int8)
    p4 = I.pack_weight(I.flatten_conv_weight(w4))
    with pytest.raises(RuntimeError, match="smaller than the dilated kernel"):
        conv(torch.randn(1, 2, 1, 1), s, z, 255, p4, I.weight_sum(w4), sc, None, 4, [2, 2], [1, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="stride"):
        conv(torch.randn(1, 2, 4, 4), s, z, 255, p4, I.weight_sum(w4), sc, None, 4, [2, 2], [0, 1], [0, 0], [1, 1])
    with pytest.raises(RuntimeError, match=r"at most 2\^30"):
        conv(torch.randn(1, 2, 4, 4), s, z, 255, p4, I.weight_sum(w4), sc, None, 4, [2, 2], [1, 1], [0, 0],
             [2**40, 1])
    empty = conv(torch.randn(0, 2, 4, 4), s, z, 255, p4, I.weight_sum(w4), sc, None, 4, [2, 2], [1, 1], [0, 0],
                 [1, 1])
    assert empty.shape == (0, 4, 3, 3)


def _digits_cnn():
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 16, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4"])
def test_deploy_runs_integer_kernels_equals_simulated_and_exports(scheme):
    model = _digits_cnn()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    sim = quantkit.quantize(model, scheme, calib, progress=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in sim.modules())  # folded before quantization
    dep = quantkit.convert(sim)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        prof = torch.profiler.profile()
        with prof:
            y = dep(x)
        torch.testing.assert_close(y, sim(x), rtol=1e-5, atol=1e-5)
    names = {e.name for e in prof.events()}
    assert "quantkit::int8_conv2d" in names and "quantkit::int8_linear" in names
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(dep, (x,), dynamic_shapes=({0: batch},))
    x2 = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), dep(x2))
        compiled = torch.compile(dep, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x2), dep(x2))


def test_int8_quantization_ties_and_clamps_match_the_simulated_grid():
    """Exact half-way points round to even and out-of-range values clamp, on every ISA (vector and scalar tails)."""
    s, z = torch.tensor(0.125), torch.tensor(7.0)
    x = torch.cat([(torch.arange(-12, 12) + 0.5) * 0.125, torch.tensor([-1e6, 1e6, 0.0, -0.0])]).repeat(3, 1)
    k = x.shape[1]
    eye = torch.eye(k, dtype=torch.int8)  # y = the codes themselves (minus z, times s)
    ref = I.int8_linear_reference(x, s, z, 15, eye, torch.ones(k), None)
    codes = torch.clamp(torch.round(x / s) + z, 0, 15)
    torch.testing.assert_close(ref, (codes - z) * s, rtol=0, atol=0)
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            got = I.int8_linear(x, s, z, 15, eye, I.pack_weight(eye), I.weight_sum(eye), torch.ones(k), None)
        assert torch.equal(got, ref), isa


def _grid(scale: float, zero_point: int, bits: int, relu: bool) -> I.OutputGrid:
    inv = float(1.0 / torch.tensor(scale, dtype=torch.float32))  # output_grid_params' float32 reciprocal
    return I.OutputGrid(float(torch.tensor(scale, dtype=torch.float32)), inv, zero_point, zero_point if relu else 0,
                        bits)


@settings(max_examples=_examples(40), deadline=None, derandomize=True)
@given(rows=st.integers(1, 13), n_out=st.integers(1, 70), bits=st.sampled_from([2, 4, 8]), relu=st.booleans(),
       grid_exp=st.integers(0, 5), zp_frac=st.floats(0, 1), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_linear_output_grid_equals_unfused_rounding_on_every_isa(rows, n_out, bits, relu, grid_exp, zp_frac,
                                                                       ties, seed):
    """The epilogue's output grid gives the floats of the kernel's output rounded by round_to_output_grid (the six
    in-place ops), incl. values exactly on .5 code boundaries (half to even) and the ReLU grid (qmin = z)."""
    g = torch.Generator().manual_seed(seed)
    qmax_out = 2**bits - 1
    zp = round(zp_frac * qmax_out)
    if ties:  # y = (q - 7) / 16 exactly and a power-of-two grid: y / s_out lands on k + 0.5 for many codes
        w = torch.eye(n_out, dtype=torch.int8)
        w_scale, s, z, bias = torch.ones(n_out), torch.tensor(1 / 16), torch.tensor(7.0), None
        x = torch.randint(-30, 40, (rows, n_out), generator=g).float() / 16
        x[0, 0], x[-1, -1] = 2.0**grid_exp / 16, -3 * 2.0**grid_exp / 16  # y / s_out = 0.5 and -1.5
        grid = _grid(2.0**grid_exp / 8, zp, bits, relu)
    else:
        w, w_scale, _, s, z, bias = _operands(g, n_out, 37, 8, 8)
        x = torch.randn(rows, 37, generator=g) * 3
        grid = _grid(float(torch.rand((), generator=g)) * 2.0**-grid_exp + 1e-3, zp, bits, relu)
    ref = I.int8_linear_reference(x, s, z, 255, w, w_scale, bias, grid)
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            args = (x, s, z, 255, w, I.pack_weight(w), I.weight_sum(w), w_scale, bias)
            unfused = I.int8_linear(*args)
            if ties:
                assert ((unfused * grid.inv_scale).frac().abs() == 0.5).any()
            expect = round_to_output_grid(unfused.clone(), grid.scale, grid.inv_scale, grid.zero_point, bits,
                                          grid.qmin, in_place=True)
            got = I.int8_linear(*args, out_grid=grid)
        assert torch.equal(got, expect), isa
        assert torch.equal(got, ref), isa


@settings(max_examples=_examples(20), deadline=None, derandomize=True)
@given(n=st.integers(1, 2), c=st.integers(1, 9), hw=st.integers(3, 9), n_out=st.integers(1, 70),
       kernel=st.sampled_from([1, 3]), stride=st.integers(1, 2), relu=st.booleans(), bits=st.sampled_from([4, 8]),
       seed=st.integers(0, 2**16))
def test_int8_conv2d_output_grid_equals_unfused_rounding_on_every_isa(n, c, hw, n_out, kernel, stride, relu, bits,
                                                                       seed):
    g = torch.Generator().manual_seed(seed)
    w, w_scale, qmax, s, z, bias = _operands(g, n_out, c * kernel * kernel, 8, 8)
    w4 = w.view(n_out, kernel, kernel, c).permute(0, 3, 1, 2).contiguous()
    x = torch.randn(n, c, hw, hw + 2, generator=g) * 3
    grid = _grid(float(torch.rand((), generator=g)) * 0.2 + 1e-3, int(torch.randint(0, 2**bits, (), generator=g)),
                 bits, relu)
    conv = ((stride,) * 2, (kernel // 2,) * 2, (1, 1))
    ref = I.int8_conv2d_reference(x, s, z, qmax, w4, w_scale, bias, *conv, grid)
    packed = I.pack_weight(I.flatten_conv_weight(w4))
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            args = (x, s, z, qmax, w4, packed, I.weight_sum(w4), w_scale, bias, *conv)
            expect = round_to_output_grid(I.int8_conv2d(*args), grid.scale, grid.inv_scale, grid.zero_point, bits,
                                          grid.qmin, in_place=True)
            got = I.int8_conv2d(*args, out_grid=grid)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, expect), isa
        assert torch.equal(got, ref), isa


def test_int8_output_grid_keeps_nan_and_clamps_inf_like_torch_clamp():
    """A NaN / infinite bias gives NaN / the end codes after the fused grid, as the unfused in-place ops do."""
    w = torch.eye(4, dtype=torch.int8)
    bias = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3])
    grid = _grid(0.1, 3, 4, False)
    args = (torch.full((2, 4), 0.25), torch.tensor(0.125), torch.tensor(2.0), 255, w, I.pack_weight(w),
            I.weight_sum(w), torch.ones(4), bias)
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            expect = round_to_output_grid(I.int8_linear(*args), grid.scale, grid.inv_scale, 3, 4, 0, in_place=True)
            got = I.int8_linear(*args, out_grid=grid)
        torch.testing.assert_close(got, expect, rtol=0, atol=0, equal_nan=True)
        assert got[:, 0].isnan().all() and torch.equal(got[:, 1:3], expect[:, 1:3])


def test_int8_output_grid_bad_input_is_a_clear_error():
    w = torch.ones(4, 8, dtype=torch.int8)
    args = (torch.randn(2, 8), torch.tensor(0.1), torch.tensor(3.0), 255, I.pack_weight(w), I.weight_sum(w),
            torch.ones(4), None, 4)
    with pytest.raises(RuntimeError, match="out_scale and out_inv_scale must be positive"):
        torch.ops.quantkit.int8_linear(*args, 0.0, 1.0, 0, 0, 255)
    with pytest.raises(RuntimeError, match="out_qmin <= out_qmax"):
        torch.ops.quantkit.int8_linear(*args, 0.1, 10.0, 0, 9, 3)


@settings(max_examples=_examples(40), deadline=None, derandomize=True)
@given(n=st.integers(1, 2), c=st.sampled_from([1, 2, 3, 4]), h=st.integers(1, 13), w=st.integers(1, 13),
       kh=st.integers(3, 7), kw=st.integers(3, 7), stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 3), st.integers(0, 3)), dilation_h=st.integers(1, 2),
       channels_last=st.booleans(), n_out=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_int8_conv2d_few_channel_runs_equal_reference_on_every_isa(n, c, h, w, kh, kw, stride, padding, dilation_h,
                                                                   channels_last, n_out, seed):
    """Few-channel convs (kw * C <= 64 bytes a kernel row: the stem, a one-channel input) copy whole kernel rows
    from a z_x-padded code image: the same integers as the reference at the borders, for odd sizes, strides,
    paddings and row dilation, from NCHW and channels-last inputs."""
    dilation = (dilation_h, 1)
    if h + 2 * padding[0] < dilation_h * (kh - 1) + 1 or w + 2 * padding[1] < kw:
        return
    g = torch.Generator().manual_seed(seed)
    wq, w_scale, qmax, s, z, bias = _operands(g, n_out, c * kh * kw, 8, 8)
    w4 = wq.view(n_out, kh, kw, c).permute(0, 3, 1, 2).contiguous()
    x = torch.randn(n, c, h, w, generator=g) * 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = I.int8_conv2d_reference(x, s, z, qmax, w4, w_scale, bias, stride, padding, dilation)
    packed = I.pack_weight(I.flatten_conv_weight(w4))
    for isa in ISAS:
        with cpu_isa(isa), torch.no_grad():
            got = I.int8_conv2d(x, s, z, qmax, w4, packed, I.weight_sum(w4), w_scale, bias, stride, padding, dilation)
        assert torch.equal(got, ref), isa
