"""AdderNet PTQ quantizer math: the paper's Fig. 3 worked vector, the lossless weight clamp, and hypothesis tests of
the percentile clamp, the k-means grouping, the group scales and the code quantizers."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import ConfigError
from quantkit.quantizers.adder import (abs_percentile, grid_range, group_scales, group_step, kmeans_groups,
                                       lossless_weight_clamp, quantize_act_codes, quantize_weight_codes, round_half,
                                       round_ste)

# ---------------------------------------------------------------------------------------------------- Fig. 3
FIG3_X = torch.tensor([[-1.4, 1.2, 1.1], [-4.5, 0.0, 0.6], [-0.4, 0.8, 1.6]], dtype=torch.float64)
# a filter of the clamped group: every |w| > 1.6 and sum |w| = 140.6 (the figure's bias is -(140.6 - 9 * 1.6))
FIG3_W3 = torch.tensor([[20.0, 15.3, -18.1], [12.4, 9.9, -16.7], [-14.2, 17.5, 16.5]], dtype=torch.float64)


def test_fig3_activation_codes_clamped_group():
    q = quantize_act_codes(FIG3_X, torch.tensor(1.6, dtype=torch.float64), 4, signed=True)
    assert q.tolist() == [[-7, 6, 5], [-8, 0, 3], [-2, 4, 7]]
    q_away = quantize_act_codes(FIG3_X, torch.tensor(1.6, dtype=torch.float64), 4, True, "half_away")
    assert torch.equal(q, q_away)  # the figure rounds identically either way


def test_fig3_activation_codes_unclamped_group():
    # the unclamped group's codes imply s_1 in (8.25 / 6.5, 4.5 / 3.5] = (1.2692, 1.2857]
    fig = [[-8, 7, 6], [-8, 0, 4], [-2, 5, 7]]
    for s in (1.27, 1.28, 1.285):
        assert quantize_act_codes(FIG3_X, torch.tensor(s, dtype=torch.float64), 4, signed=True).tolist() == fig, s
    for s in (1.26, 1.29):
        assert quantize_act_codes(FIG3_X, torch.tensor(s, dtype=torch.float64), 4, signed=True).tolist() != fig, s


def _official_weight_codes(w: torch.Tensor, s: torch.Tensor, bits: int) -> torch.Tensor:
    """The official ``construct``, in its order: round(w * (2^b - 1) / s / 2) (half-even), clipped to the signed range."""
    q = torch.round(w * (2.0**bits - 1) / s / 2)
    return q.clamp(-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)


def test_weight_codes_follow_the_official_order_at_minus_s():
    """float32 s = 0.3, 4 bits: (-0.3 * 15) / 0.3 / 2 = -7.4999995 -> -7 (official), where (-0.3 / 0.3) * 7.5 = -7.5
    would round to -8; s = 1.3 lands below the tie (-7.5000005 -> -8) and 1.6 on it (-7.5 -> -8, half-even)."""
    for s, expected in ((0.3, -7), (1.3, -8), (1.6, -8)):
        scale = torch.tensor(s, dtype=torch.float32)
        w = torch.tensor([-s, s, -s / 3, 0.0], dtype=torch.float32)
        w[0], w[1] = -scale, scale
        q = quantize_weight_codes(w, scale, 4, order="official")
        assert q[0].item() == expected and q[1].item() == 7, s
        assert torch.equal(q, _official_weight_codes(w, scale, 4)), s
        paper = quantize_weight_codes(w, scale, 4)  # default: -s is the tie for every scale (Fig. 3)
        assert paper[0].item() == -8 and paper[1].item() == 7, s


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(2, 8), st.floats(0.015625, 10.0, width=32), st.integers(0, 10_000))
def test_weight_codes_equal_official_formula_float32(bits, s, seed):
    """Clamped float32 groups (weights on +-s and inside) against the official expression on identical tensors."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor(s, dtype=torch.float32)
    w = ((torch.rand(64, generator=gen) * 2 - 1) * scale).clamp(-scale, scale)
    w[:8] = -scale
    w[8:16] = scale
    assert torch.equal(quantize_weight_codes(w, scale, bits, order="official"), _official_weight_codes(w, scale, bits))
    paper = quantize_weight_codes(w, scale, bits)
    assert (paper[:8] == -(2 ** (bits - 1))).all() and (paper[8:16] == 2 ** (bits - 1) - 1).all()


def test_fig3_weight_codes_and_bias():
    clip = torch.tensor([1.6], dtype=torch.float64)
    clamped, bias = lossless_weight_clamp(FIG3_W3[None], clip)
    assert torch.equal(clamped.abs(), torch.full_like(clamped, 1.6))
    assert bias.item() == pytest.approx(-126.2, abs=1e-9)
    q = quantize_weight_codes(clamped[0], torch.tensor(1.6, dtype=torch.float64), 4)
    assert q.tolist() == [[7, 7, -8], [7, 7, -8], [-8, 7, 7]]
    # the group's output in integer form equals the float output of the clamped weights (lossless), to quantization
    qx = quantize_act_codes(FIG3_X, torch.tensor(1.6, dtype=torch.float64), 4, signed=True)
    delta = group_step(torch.tensor(1.6, dtype=torch.float64), 4, signed=True)
    y_int = -delta * (qx - q).abs().sum() + bias
    x_clip = FIG3_X.clamp(-1.6, 1.6)
    y_float = -(x_clip - FIG3_W3).abs().sum()
    assert y_int.item() == pytest.approx(y_float.item(), abs=9 * delta.item())


# ---------------------------------------------------------------------------------------------------- lossless
@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0.05, 3.0), st.integers(0, 10_000))
def test_lossless_clamp_property(cout, k, a, seed):
    """With |x| <= A, clamping the weights to +-A and adding the bias changes outputs only by float rounding."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, k, generator=gen, dtype=torch.float64) * 2 * a
    x = (torch.rand(9, k, generator=gen, dtype=torch.float64) * 2 - 1) * a
    clip = torch.full((cout,), a, dtype=torch.float64)
    clamped, bias = lossless_weight_clamp(w, clip)
    y = -(x[:, None] - w[None]).abs().sum(-1)
    y_clamped = -(x[:, None] - clamped[None]).abs().sum(-1) + bias
    torch.testing.assert_close(y, y_clamped, rtol=1e-12, atol=1e-9)
    assert clamped.abs().max() <= a
    torch.testing.assert_close(bias, -(w.abs() - a).clamp_min(0).sum(1))


def test_clamp_is_lossy_for_activations_outside_the_range():
    w = torch.tensor([[3.0]], dtype=torch.float64)
    clamped, bias = lossless_weight_clamp(w, torch.tensor([1.0], dtype=torch.float64))
    x = torch.tensor([[2.0]], dtype=torch.float64)  # |x| > A
    assert (-(x - w).abs()).item() != (-(x - clamped).abs() + bias).item()


# ---------------------------------------------------------------------------------------------------- quantizers
@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.floats(0.01, 10.0), st.integers(0, 10_000))
def test_weight_codes_error_bound(bits, s, seed):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(200, generator=gen, dtype=torch.float64) * 2 - 1) * s
    w[0], w[1] = s, -s
    q = quantize_weight_codes(w, torch.tensor(s, dtype=torch.float64), bits)
    assert torch.equal(q, q.round())
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1
    step = group_step(torch.tensor(s, dtype=torch.float64), bits, signed=True)
    assert ((w - step * q).abs() <= step / 2 + 1e-12).all()
    assert q[0] == 2 ** (bits - 1) - 1 and q[1] == -(2 ** (bits - 1))  # paper order: -s is the tie for every s


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 8), st.floats(0.01, 10.0), st.booleans(), st.integers(0, 10_000))
def test_act_codes_error_bound_and_clip(bits, s, signed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(300, generator=gen, dtype=torch.float64) * s
    sc = torch.tensor(s, dtype=torch.float64)
    q = quantize_act_codes(x, sc, bits, signed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert torch.equal(q, q.round()) and q.min() >= lo and q.max() <= hi
    step = group_step(sc, bits, signed)
    inside = (x >= lo * step) & (x <= hi * step)
    assert ((x - step * q).abs()[inside] <= step / 2 + 1e-12).all()
    assert (q[x > hi * step] == hi).all() and (q[x < lo * step] == lo).all()
    if not signed:  # unsigned activations sit on half the weight step: |x - w| = Delta_x |q_x - 2 q_w|
        assert torch.allclose(2 * step, group_step(sc, bits, signed=True))


def test_round_modes_and_ste():
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49, -0.51])
    assert round_half(v, "half_even").tolist() == [-2, -2, -0, 0, 2, 2, 0, -1]
    assert round_half(v, "half_away").tolist() == [-3, -2, -1, 1, 2, 3, 0, -1]
    with pytest.raises(ConfigError):
        round_half(v, "up")
    x = v.clone().requires_grad_()
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(v))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3000), st.floats(50.0, 100.0), st.integers(0, 10_000))
def test_abs_percentile_matches_numpy_lower(m, p, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, generator=gen) * 3
    got = abs_percentile(x.view(1, -1), p)
    expected = np.percentile(x.abs().numpy(), p, method="lower")
    assert got.item() == pytest.approx(float(expected), rel=0, abs=0)


def test_abs_percentile_close_to_the_official_index():
    """Official: sorted |x| at floor((round(M r) - 1) r) with r = 0.9997 (r applied twice)."""
    x = torch.randn(64, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    flat = np.sort(x.abs().flatten().numpy())
    m, r = flat.size, 0.9997
    official = flat[int(np.floor((round(m * r) - 1) * r))]
    ours = abs_percentile(x, 99.94).item()
    rank = lambda v: np.searchsorted(flat, v)
    assert abs(rank(ours) - rank(official)) <= max(2, m // 10_000)


# ---------------------------------------------------------------------------------------------------- grouping
@settings(max_examples=15, deadline=None)
@given(st.integers(1, 80), st.integers(1, 6), st.integers(0, 10_000))
def test_kmeans_groups_properties(n, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.rand(n, generator=gen) * 5
    if seed % 3 == 0:
        feat = torch.round(feat)  # many ties
    groups = min(groups, n)
    gi, g = kmeans_groups(feat, groups, seed=0)
    assert gi.shape == (n,) and gi.dtype == torch.int64
    assert 1 <= g <= groups and g <= torch.unique(feat).numel()
    assert sorted(torch.unique(gi).tolist()) == list(range(g))  # no empty group
    for a in range(g - 1):  # groups are intervals, numbered by increasing feature
        assert feat[gi == a].max() < feat[gi == a + 1].min()
    gi2, g2 = kmeans_groups(feat, groups, seed=0)
    assert g2 == g and torch.equal(gi, gi2)  # deterministic


def test_kmeans_groups_bad_inputs():
    with pytest.raises(ConfigError, match="larger than the number of channels"):
        kmeans_groups(torch.rand(3), 4)
    with pytest.raises(ConfigError, match="positive"):
        kmeans_groups(torch.rand(3), 0)
    with pytest.raises(ConfigError, match="NaN"):
        kmeans_groups(torch.tensor([1.0, float("nan"), 2.0]), 2)
    gi, g = kmeans_groups(torch.full((6,), 0.7), 4)  # all equal: one group
    assert g == 1 and gi.tolist() == [0] * 6


def test_group_scales():
    absmax = torch.tensor([0.5, 0.7, 3.0, 2.0, 0.0, 0.0])
    gi = torch.tensor([0, 0, 1, 1, 2, 2])
    s = group_scales(absmax, gi, 3, 1.5)
    assert s.tolist() == pytest.approx([0.7, 1.5, 1.5])  # own range / clamped to A / all-zero group takes A


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 30), st.floats(0.05, 3.0), st.floats(0.05, 3.0), st.integers(0, 10_000))
def test_lossless_clamp_asymmetric_bounds(cout, k, lo, hi, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, k, generator=gen, dtype=torch.float64) * 3 * max(lo, hi)
    x = torch.rand(7, k, generator=gen, dtype=torch.float64) * (lo + hi) - lo  # x in [-lo, hi]
    clamped, bias = lossless_weight_clamp(w, torch.full((cout,), hi, dtype=torch.float64),
                                          torch.full((cout,), -lo, dtype=torch.float64))
    assert clamped.min() >= -lo and clamped.max() <= hi
    y = -(x[:, None] - w[None]).abs().sum(-1)
    torch.testing.assert_close(y, -(x[:, None] - clamped[None]).abs().sum(-1) + bias, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grid_clamp_is_lossless_after_quantization(bits):
    """Weights beyond the range, activations on the grid: clamping to the extreme codes ("grid") keeps the integer
    form equal to the float output; clamping to +-s (the paper) leaves an offset of s/(2^b-1) per clamped tap."""
    s = torch.tensor(1.3, dtype=torch.float64)
    step = group_step(s, bits, signed=True)
    lo_code, hi_code = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w = torch.tensor([[5.0, -4.0, 2.0, -7.5, 3.3]], dtype=torch.float64)
    qx = torch.tensor([[lo_code, hi_code, 0, 1, -1]], dtype=torch.float64)
    x = qx * step
    y_fp = -(x - w).abs().sum()
    lo, hi = grid_range(s.view(1), bits)
    clamped, bias = lossless_weight_clamp(w, hi, lo)
    qw = quantize_weight_codes(clamped, s, bits)
    assert qw.tolist() == [[hi_code, lo_code, hi_code, lo_code, hi_code]]
    y_grid = -step * (qx - qw).abs().sum() + bias
    assert y_grid.item() == pytest.approx(y_fp.item(), abs=1e-9)
    clamped_s, bias_s = lossless_weight_clamp(w, s.view(1))
    y_scale = -step * (qx - quantize_weight_codes(clamped_s, s, bits)).abs().sum() + bias_s
    assert abs(y_scale.item() - y_fp.item()) > 0.5 * s.item() / (2**bits - 1)


def test_scheme_weight_code_order_option():
    """The scheme field reaches the layer: s = 0.3 (float32) at 4 bits, a filter clamped onto -s: code -8 by default
    (the paper's tie), -7 with the official order; unknown values are a ConfigError naming both choices."""
    import quantkit
    from quantkit.errors import ConfigError
    from torch import nn

    from quantkit.nn import AdderConv2d

    def codes(**over):
        torch.manual_seed(0)
        model = nn.Sequential(AdderConv2d(1, 2, 1, bias=False))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[[[-0.3]]], [[[0.3]]]]))
        q = quantkit.quantize(model, "adder_ptq4", [torch.full((2, 1, 3, 3), 0.3)], groups=1, weight_clamp="scale",
                              percentile=100.0, **over)
        return q[0]._compute_quant_params()["w_codes"].flatten().tolist()

    assert codes() == [-8.0, 7.0]
    assert codes(weight_code_order="official") == [-7.0, 7.0]
    with pytest.raises(ConfigError, match="weight_code_order='x'.*'paper'.*'official'"):
        codes(weight_code_order="x")
