"""The fused Maxout kernel equals its reference bit for bit (and the official two-ReLU form)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.nn.adabin import Maxout
from quantkit.ops._dispatch import has_op

pytestmark = pytest.mark.skipif(not has_op("maxout"), reason="quantkit._C not built")


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 9), w=st.integers(1, 9),
       layout=st.sampled_from(["nchw", "channels_last", "2d", "noncontig"]), seed=st.integers(0, 2**16))
def test_maxout_kernel_equals_reference(n, c, h, w, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    x[x.abs() < 0.1] = 0.0  # exact zeros take the "x <= 0" branch in both
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "2d":
        x = x.flatten(2).mean(-1)
    elif layout == "noncontig":
        x = x.transpose(2, 3)
    pos, neg = torch.randn(c, generator=g), torch.randn(c, generator=g)
    with torch.no_grad():
        y = ops.maxout(x, pos, neg)
    ref = ops.maxout_reference(x, pos, neg)
    assert torch.equal(y, ref)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    official = pos.view(shape) * F.relu(x) - neg.view(shape) * F.relu(-x)
    assert torch.equal(y, official)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_maxout_module_trains_through_the_reference_and_infers_through_the_kernel():
    m = Maxout(4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None and m.pos_scale.grad is not None and m.neg_scale.grad is not None
    with torch.no_grad():
        prof = torch.profiler.profile()
        with prof:
            m(x)
    assert any("quantkit::maxout" in e.name for e in prof.events())


def test_maxout_bad_input():
    with pytest.raises(RuntimeError, match="one per channel"):
        torch.ops.quantkit.maxout(torch.randn(2, 3, 4), torch.ones(2), torch.ones(2))


def test_maxout_opcheck():
    x = torch.randn(2, 5, 3, 3)
    torch.library.opcheck(torch.ops.quantkit.maxout.default, (x, torch.randn(5), torch.randn(5)))
    xc = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.quantkit.maxout.default, (xc, torch.randn(5), torch.randn(5)))


@settings(max_examples=60, deadline=None)
@given(shape=st.sampled_from([(2, 3, 5, 4), (1, 40, 3, 3), (7, 33), (5,)]), groups=st.integers(1, 4),
       bits=st.integers(2, 8), signed=st.booleans(), round_mode=st.sampled_from(["half_even", "half_away"]),
       channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_groups_kernel_equals_reference(shape, groups, bits, signed, round_mode, channels_last, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    scale = torch.rand(groups, generator=g) * 3 + 0.1
    flat = x.view(-1)
    # exact ties and clamp edges: +-s, and points that land on k + 1/2 of a grid
    flat[: groups] = scale * torch.where(torch.arange(groups) % 2 == 0, 1.0, -1.0)
    c = (2**bits - 1) / (2.0 if signed else 1.0)
    if flat.numel() > groups + 1:
        flat[groups] = 2.5 * scale[0] / c
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    got = ops.quantize_groups(x, scale, bits, signed, round_mode)
    ref = ops.quantize_groups_reference(x, scale, bits, signed, round_mode)
    assert got.dtype == ref.dtype == (torch.int8 if signed else torch.uint8)
    assert got.shape == ref.shape and torch.equal(got, ref)


def test_quantize_groups_opcheck():
    for x in (torch.randn(2, 6, 4, 3), torch.randn(5, 9)):
        torch.library.opcheck(torch.ops.quantkit.quantize_groups.default, (x, torch.tensor([0.5, 1.5]), 4, True, True))
        torch.library.opcheck(torch.ops.quantkit.quantize_groups.default, (x, torch.tensor([2.0]), 8, False, False))
