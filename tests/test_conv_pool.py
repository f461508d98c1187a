"""The deploy-time stem tiling (quantkit/graph/conv_pool.py, quantkit/nn/conv_pool.py): which chains it takes, that
the tiled stem computes what the layers compute one after the other, for every batch size and tile size, and that
exporters and state dicts see the layers as before; the one-kernel stem (quantkit.ops.conv_max_pool2d_nhwc) against
its reference on every ISA level, and its prepacked weight following the conv's."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import quantkit
from quantkit.graph.conv_pool import match_conv_pools, tile_conv_pools
from quantkit.nn import conv_pool
from quantkit.nn.conv_pool import TiledConvPool, tile_images, untile_conv_pools

from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import ops
from quantkit.ops import _dispatch
from quantkit.ops.packing import pack_bits_reference

from conftest import cpu_isa, hypothesis_examples, settle_bn, use_isa_level

HAVE_STEM = _dispatch.has_op("conv_max_pool2d_nhwc")


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """The stem kernel's conv sums in its own order: float32 rounding apart from torch's conv."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.fixture(params=["stem kernel", "tiled layers"])
def stem_path(request, monkeypatch):
    """Both ways a float stem runs: the one-kernel stem, and (forced) the conv a tile at a time, then the pool."""
    if request.param == "tiled layers":
        monkeypatch.setattr(TiledConvPool, "stem_kernel_fits", lambda self: False)
    return request.param


class Stem(nn.Module):
    """conv -> bn -> relu -> maxpool -> conv, a ResNet stem in miniature."""

    def __init__(self, relu_twice: bool = False, ceil_mode: bool = False, with_relu: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 5, 2, 2)
        self.bn1 = nn.Identity()
        self.relu = nn.ReLU(inplace=True) if with_relu else None
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
        self.head = nn.Conv2d(8, 4, 1)
        self.relu_twice = relu_twice

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        if self.relu is not None:
            y = self.relu(y)
        y = self.head(self.maxpool(y))
        return self.relu(y) if self.relu_twice else y


def _tiled(model: nn.Module) -> nn.Module:
    work = copy.deepcopy(model).eval()
    tile_conv_pools(work)
    return work


def test_stem_chain_is_tiled_and_its_layers_become_identities():
    work = _tiled(Stem())
    assert isinstance(work.conv1, TiledConvPool)
    assert isinstance(work.relu, nn.Identity) and isinstance(work.maxpool, nn.Identity)
    assert work.conv1.places == ("conv1", "relu", "maxpool")
    assert "tiled: conv1 -> relu -> maxpool" in repr(work.conv1)


@pytest.mark.parametrize("kwargs", [{"relu_twice": True}, {"ceil_mode": True}])
def test_chains_it_must_not_take(kwargs):
    # a ReLU called twice shares its module with a later call; a ceil-mode pool is not the kernel's pool
    assert match_conv_pools(Stem(**kwargs)) == []


def test_pool_straight_after_the_conv_is_tiled_without_relu(stem_path):
    model = Stem(with_relu=False).eval()
    work = _tiled(model)
    assert work.conv1.places == ("conv1", None, "maxpool")
    x = torch.randn(3, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if stem_path == "tiled layers":
            assert torch.equal(work(x), model(x))
        else:
            assert_rounding_close(work(x), model(x))


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("tile_bytes", [1, 2 * 8 * 10 * 10 * 4, 1 << 30])
def test_tiled_equals_the_layers_one_by_one(batch, tile_bytes, monkeypatch):
    # tile_bytes: one image per tile, two per tile (a remainder at batch 5), the whole batch at once; the tiled path
    # (the one a float stem takes when the stem kernel does not apply, and an int8 stem always)
    monkeypatch.setattr(conv_pool, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(TiledConvPool, "stem_kernel_fits", lambda self: False)
    model = Stem().eval()
    work = _tiled(model)
    x = torch.randn(batch, 3, 19, 20)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x_cl.clone())
        # the tiled conv runs channels_last whatever the input's layout: the layers' values on a channels_last input
        for got in (work(x_cl), work(x)):
            assert torch.equal(got, want)
            assert got.is_contiguous(memory_format=torch.channels_last)
        # on an NCHW input the one-by-one layers sum in another order: float32 rounding apart
        torch.testing.assert_close(work(x), model(x), rtol=1e-5, atol=1e-5)


def test_tile_images_gives_each_thread_an_image_within_the_byte_budget():
    assert tile_images(3 << 20, 1) == 1
    assert tile_images(3 << 20, 2) == 2
    assert tile_images(3 << 20, 16) == conv_pool.TILE_BYTES // (3 << 20)
    assert tile_images(conv_pool.TILE_BYTES * 4, 8) == 1


def test_gradient_path_runs_the_layers_one_by_one():
    model = Stem().eval()
    work = _tiled(model)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    work(x).sum().backward()
    g_tiled = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    assert torch.equal(g_tiled, x.grad)


def test_untile_restores_the_layers_and_the_values(stem_path):
    model = Stem().eval()
    work = _tiled(model)
    back = untile_conv_pools(copy.deepcopy(work))
    assert isinstance(back.conv1, nn.Conv2d) and isinstance(back.relu, nn.ReLU)
    assert isinstance(back.maxpool, nn.MaxPool2d)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        if stem_path == "tiled layers":
            assert torch.equal(back(x), work(x))
        else:
            assert_rounding_close(work(x), back(x))


@pytest.fixture(scope="module")
def adabin_resnet():
    return quantkit.QAT(torchvision.models.resnet18(num_classes=10), "adabin").convert().eval()


def test_convert_tiles_the_resnet_stem_and_reports_it(adabin_resnet):
    assert isinstance(adabin_resnet.conv1, TiledConvPool)
    notes = " ".join(quantkit.report(adabin_resnet).notes)
    assert "'conv1' -> 'relu' -> 'maxpool' run as one stem kernel" in notes


def test_deploy_resnet_tiled_equals_untiled_and_state_dict_round_trips(adabin_resnet, monkeypatch, stem_path):
    monkeypatch.setattr(conv_pool, "TILE_BYTES", 1)  # one image per tile
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    plain = untile_conv_pools(copy.deepcopy(adabin_resnet))
    with torch.no_grad():
        if stem_path == "tiled layers":
            assert torch.equal(adabin_resnet(x), plain(x))
        else:  # the stem's rounding can move a later binarization: the simulated model's tolerance
            y, ref = adabin_resnet(x), plain(x)
            torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # a second conversion has the same structure, so the deploy state dict loads into it
    other = quantkit.QAT(torchvision.models.resnet18(num_classes=10), "adabin").convert().eval()
    other.load_state_dict(adabin_resnet.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), adabin_resnet(x))


def test_uniform_stem_is_tiled_and_exact():
    model = settle_bn(Stem(), (3, 20, 20))
    sim = quantkit.quantize(model, "w8a8", [torch.randn(4, 3, 20, 20)], progress=False)
    dep = quantkit.convert(sim).eval()
    assert isinstance(dep.conv1, TiledConvPool)
    assert type(dep.conv1.conv).__name__ == "UniformDeployConv2d"
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(dep(x), untile_conv_pools(copy.deepcopy(dep))(x))


def test_onnx_export_sees_the_untiled_layers(tmp_path):
    from quantkit.export.onnx_export import traceable_copy

    model = settle_bn(Stem(), (3, 20, 20))
    sim = quantkit.quantize(model, "w8a8", [torch.randn(4, 3, 20, 20)], progress=False)
    work = traceable_copy(quantkit.convert(sim))  # what the exporter traces
    assert not any(isinstance(m, TiledConvPool) for m in work.modules())
    assert isinstance(work.relu, nn.ReLU) and isinstance(work.maxpool, nn.MaxPool2d)
    path = tmp_path / "stem.onnx"
    quantkit.export_onnx(sim, (torch.randn(2, 3, 20, 20),), str(path), quiet=True)
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "MaxPool" in ops


# ---------------------------------------------------------------------------------------------- the stem kernel
@pytest.fixture(params=["portable", "avx2", "avx512"])
def isa(request, monkeypatch):
    return use_isa_level(request.param, monkeypatch, HAVE_STEM)


def test_stem_kernel_equals_its_reference_every_isa(isa):
    @settings(max_examples=hypothesis_examples(25), deadline=None)
    @given(data=st.data(), seed=st.integers(0, 2**31 - 1))
    def check(data, seed):
        n, c_in = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
        c_out = data.draw(st.sampled_from([1, 8, 16, 48, 64, 80, 128]))
        kh, kw = data.draw(st.integers(1, 7)), data.draw(st.integers(1, 7))
        sh, sw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
        ph, pw = data.draw(st.integers(0, kh - 1)), data.draw(st.integers(0, kw - 1))
        h, w = data.draw(st.integers(max(1, kh - 2 * ph), 24)), data.draw(st.integers(max(1, kw - 2 * pw), 24))
        hc, wc = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        pk = (data.draw(st.integers(1, min(3, hc))), data.draw(st.integers(1, min(3, wc))))
        ps = (data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)))
        pp = (data.draw(st.integers(0, pk[0] // 2)), data.draw(st.integers(0, pk[1] // 2)))
        relu, bias_on, nchw = data.draw(st.booleans()), data.draw(st.booleans()), data.draw(st.booleans())
        threads = data.draw(st.sampled_from([1, 2]))
        thr_on = data.draw(st.booleans())
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c_in, h, w, generator=g)
        if not nchw:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c_out, c_in, kh, kw, generator=g)
        bias = torch.randn(c_out, generator=g) if bias_on else None
        before = torch.get_num_threads()
        torch.set_num_threads(threads)  # 2: the batch split into bands of pool rows when images are few
        threshold = torch.randn(c_out, generator=g) if thr_on else None
        try:
            got = ops.conv_max_pool2d_nhwc(x, ops.pack_stem_weight(weight), bias, (sh, sw), (ph, pw), pk, ps, pp,
                                           relu, threshold=threshold)
        finally:
            torch.set_num_threads(before)
        if thr_on:  # the bits of a following binary conv's input, made from the very values returned
            got, bits = got
            assert torch.equal(bits, pack_bits_reference(got.permute(0, 2, 3, 1), threshold))
        want = ops.conv_max_pool2d_nhwc_reference(x, weight, bias, (sh, sw), (ph, pw), pk, ps, pp, relu)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert_rounding_close(got, want)

    check()


@pytest.mark.skipif(not HAVE_STEM, reason="compiled quantkit kernels not built")
@pytest.mark.parametrize("c_out", [8, 24, 64, 72])
def test_stem_kernel_levels_compute_the_same_floats(c_out):
    """Every ISA level runs one FMA per tap in the same (kh, kw, c_in) order, so they agree to the bit (8 and 24
    channels: the AVX2 loop's 8-channel tail; 72: AVX2 where AVX-512 needs 16-channel blocks)."""
    g = torch.Generator().manual_seed(c_out)
    x = torch.randn(2, 3, 29, 31, generator=g)
    weight, bias = torch.randn(c_out, 3, 7, 7, generator=g), torch.randn(c_out, generator=g)
    packed = ops.pack_stem_weight(weight)
    outs = {}
    for level in ops.supported_cpu_isas():
        with cpu_isa(level):
            outs[level] = ops.conv_max_pool2d_nhwc(x, packed, bias, 2, 3, 3, 2, 1, True)
    assert len(outs) >= 2 or ops.supported_cpu_isas() == ["portable"]
    for level, y in outs.items():
        assert torch.equal(y, outs["portable"]), level


@pytest.mark.skipif(not HAVE_STEM, reason="compiled quantkit kernels not built")
def test_stem_kernel_nan_and_inf_reach_the_pool_as_torch_does():
    # the pool of the kernel is max_pool2d_nhwc's: a NaN or an infinity of the conv output propagates as in torch
    x = torch.randn(1, 3, 16, 16)
    x[0, 1, 5, 5] = float("nan")
    x[0, 0, 10, 3] = float("inf")
    weight, bias = torch.randn(16, 3, 3, 3), torch.randn(16)
    got = ops.conv_max_pool2d_nhwc(x, ops.pack_stem_weight(weight), bias, 1, 1, 3, 2, 1, True)
    want = ops.conv_max_pool2d_nhwc_reference(x, weight, bias, 1, 1, 3, 2, 1, True)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    finite = want.isfinite()
    assert_rounding_close(got[finite], want[finite])


@pytest.mark.skipif(not HAVE_STEM, reason="compiled quantkit kernels not built")
def test_stem_kernel_errors_name_the_problem():
    from quantkit.errors import KernelError

    x = torch.randn(1, 3, 8, 8)
    wp = ops.pack_stem_weight(torch.randn(16, 3, 3, 3))
    with pytest.raises(KernelError, match="float32"):
        ops.conv_max_pool2d_nhwc(x.double(), wp, None, 1, 1, 3, 2, 1)
    with pytest.raises(KernelError, match="pack_stem_weight"):
        ops.conv_max_pool2d_nhwc(torch.randn(1, 4, 8, 8), wp, None, 1, 1, 3, 2, 1)  # 9 taps a row: not 4 channels
    with pytest.raises(RuntimeError, match="bias must be float32 with 16"):
        ops.conv_max_pool2d_nhwc(x, wp, torch.randn(15), 1, 1, 3, 2, 1)
    with pytest.raises(RuntimeError, match="padding must be at most half"):
        ops.conv_max_pool2d_nhwc(x, wp, None, 1, 1, 3, 2, 2)


@pytest.mark.skipif(not HAVE_STEM, reason="compiled quantkit kernels not built")
def test_stem_kernel_weight_is_prepacked_once_and_follows_the_conv():
    model = Stem().eval()
    work = _tiled(model)
    stem = work.conv1
    assert stem.stem_kernel_fits() and stem._stem_weight is not None  # packed at convert
    packed = stem._stem_weight[0]
    x = torch.randn(2, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    saved = copy.deepcopy(work.state_dict())
    with torch.no_grad():
        work(x)
        assert stem._stem_weight[0] is packed  # no per-call packing
        stem.conv.weight.mul_(-1.0)  # an in-place edit: the kernel must not read the old packing
        assert_rounding_close(work(x), untile_conv_pools(copy.deepcopy(work))(x))
        work.load_state_dict(saved)  # a loaded state dict (copied into the weight in place), the same
        assert_rounding_close(work(x), model(x))
