"""The deploy-time stem tiling (quantkit/graph/conv_pool.py, quantkit/nn/conv_pool.py): which chains it takes, that
the tiled stem computes what the layers compute one after the other, for every batch size and tile size, and that
exporters and state dicts see the layers as before."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import quantkit
from quantkit.graph.conv_pool import match_conv_pools, tile_conv_pools
from quantkit.nn import conv_pool
from quantkit.nn.conv_pool import TiledConvPool, tile_images, untile_conv_pools

from conftest import settle_bn


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


def test_pool_straight_after_the_conv_is_tiled_without_relu():
    model = Stem(with_relu=False).eval()
    work = _tiled(model)
    assert work.conv1.places == ("conv1", None, "maxpool")
    x = torch.randn(3, 3, 20, 20).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(work(x), model(x))


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("tile_bytes", [1, 2 * 8 * 10 * 10 * 4, 1 << 30])
def test_tiled_equals_the_layers_one_by_one(batch, tile_bytes, monkeypatch):
    # tile_bytes: one image per tile, two per tile (a remainder at batch 5), the whole batch at once
    monkeypatch.setattr(conv_pool, "TILE_BYTES", tile_bytes)
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


def test_untile_restores_the_layers_and_the_values():
    model = Stem().eval()
    work = _tiled(model)
    back = untile_conv_pools(copy.deepcopy(work))
    assert isinstance(back.conv1, nn.Conv2d) and isinstance(back.relu, nn.ReLU)
    assert isinstance(back.maxpool, nn.MaxPool2d)
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(back(x), work(x))


@pytest.fixture(scope="module")
def adabin_resnet():
    return quantkit.QAT(torchvision.models.resnet18(num_classes=10), "adabin").convert().eval()


def test_convert_tiles_the_resnet_stem_and_reports_it(adabin_resnet):
    assert isinstance(adabin_resnet.conv1, TiledConvPool)
    notes = " ".join(quantkit.report(adabin_resnet).notes)
    assert "'conv1' -> 'relu' -> 'maxpool' run as one tiled stem" in notes


def test_deploy_resnet_tiled_equals_untiled_and_state_dict_round_trips(adabin_resnet, monkeypatch):
    monkeypatch.setattr(conv_pool, "TILE_BYTES", 1)  # one image per tile
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    plain = untile_conv_pools(copy.deepcopy(adabin_resnet))
    with torch.no_grad():
        assert torch.equal(adabin_resnet(x), plain(x))
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
