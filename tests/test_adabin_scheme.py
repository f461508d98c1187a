"""The ``adabin`` scheme: placement, Maxout pass, options, and whole-model deploy equivalence."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import quantkit
from quantkit.errors import ConfigError
from quantkit.nn.adabin import AdaBinConv2d, AdaBinLinear, Maxout
from quantkit.nn.binary_deploy import BinaryDeployConv2d


@pytest.fixture(autouse=True)
def _one_thread():
    """These small models run fastest single-threaded (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SmallCNN(nn.Module):
    def __init__(self, depthwise: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.act1 = nn.ReLU()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32) if depthwise else nn.Identity()
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.block(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class Untraceable(SmallCNN):
    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow: torch.fx cannot trace it
            x = self.act0(self.bn0(self.stem(x)))
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.block(self.dw(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34"])
def test_torchvision_resnet_placement_and_maxout(arch):
    model = getattr(torchvision.models, arch)(num_classes=10)
    q = quantkit.prepare(model, "adabin")
    rep = quantkit.report(q)
    assert rep["conv1"].kept_fp_reason and "first layer" in rep["conv1"].kept_fp_reason
    assert rep["fc"].kept_fp_reason and "last layer" in rep["fc"].kept_fp_reason
    downs = [r for r in rep.records if "downsample" in r.name]
    assert len(downs) == 3 and all("downsample shortcut" in r.kept_fp_reason for r in downs)
    blocks = [r for r in rep.records if ".conv" in r.name]
    assert blocks and all(r.quantized and r.new_type == "AdaBinConv2d" for r in blocks)
    n_blocks = {"resnet18": 8, "resnet34": 16}[arch]
    assert len(blocks) == 2 * n_blocks
    # the stem ReLU follows an FP conv and stays; every block's (shared) ReLU becomes a Maxout
    assert isinstance(q.relu, nn.ReLU)
    maxouts = [n for n, m in q.named_modules() if isinstance(m, Maxout)]
    assert len(maxouts) == n_blocks
    assert any("shared by 2 call sites" in note for note in rep.notes)
    x = torch.randn(2, 3, 32, 32)
    if arch == "resnet18":
        q(x).sum().backward()
        assert q.layer1[0].conv1.alpha_a.grad is not None and q.layer1[0].relu.neg_scale.grad is not None
    else:  # keep the suite fast: the deeper model only runs forward
        with torch.no_grad():
            assert q.eval()(x).shape == (2, 10)


def test_resnet18_deploy_equals_simulated():
    torch.manual_seed(0)
    q = quantkit.prepare(torchvision.models.resnet18(num_classes=10), "adabin").eval()
    dep = quantkit.convert(q)
    assert isinstance(dep.layer2[0].conv1, BinaryDeployConv2d)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = q(x), dep(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_small_cnn_and_fx_maxout_placement():
    q = quantkit.prepare(SmallCNN(), "adabin")
    assert isinstance(q.stem, nn.Conv2d) and not isinstance(q.stem, AdaBinConv2d)
    assert isinstance(q.conv1, AdaBinConv2d) and isinstance(q.block[0], AdaBinConv2d)
    assert isinstance(q.act0, nn.ReLU)  # after the FP stem
    assert isinstance(q.act1, Maxout) and q.act1.channels == 32
    assert isinstance(q.block[2], Maxout)
    assert type(q.fc) is nn.Linear
    assert quantkit.report(q)["conv1"].info["maxout"] == "act1"


def test_options_maxout_off_weight_only_paper_form():
    q = quantkit.prepare(SmallCNN(), "adabin", maxout=False)
    assert not any(isinstance(m, Maxout) for m in q.modules())
    w = quantkit.prepare(SmallCNN(), "adabin", weight_only=True)
    assert w.conv1.weight_only and w.conv1.bits_a is None and quantkit.report(w)["conv1"].bits_a is None
    p = quantkit.prepare(SmallCNN(), "adabin", act_form="paper", keep_first=False, keep_last=False)
    assert p.conv1.act_form == "paper" and isinstance(p.stem, AdaBinConv2d) and isinstance(p.fc, AdaBinLinear)
    with pytest.raises(ConfigError, match="act_form"):
        quantkit.prepare(SmallCNN(), "adabin", act_form="both")
    with pytest.raises(ConfigError, match="t_min"):
        quantkit.prepare(SmallCNN(), "adabin", t_min=0.0)
    with pytest.raises(ConfigError, match="no option"):
        quantkit.prepare(SmallCNN(), "adabin", maxuot=False)


def test_downsample_rule_override():
    model = torchvision.models.resnet18(num_classes=10)
    q = quantkit.prepare(model, "adabin", rules={"layer2.0.downsample.0": {"keep_downsample": False}})
    assert isinstance(q.layer2[0].downsample[0], AdaBinConv2d)
    assert not isinstance(q.layer3[0].downsample[0], AdaBinConv2d)
    q2 = quantkit.prepare(model, "adabin", keep_downsample=False)
    assert all(isinstance(q2.get_submodule(f"layer{i}.0.downsample.0"), AdaBinConv2d) for i in (2, 3, 4))


def test_depthwise_conv_stays_fp_and_report_says_why():
    q = quantkit.prepare(SmallCNN(depthwise=True), "adabin")
    rec = quantkit.report(q)["dw"]
    assert not rec.quantized and "depthwise" in rec.kept_fp_reason
    assert type(q.dw) is nn.Conv2d
    assert "depthwise" in quantkit.report(q).table()
    q(torch.randn(2, 1, 8, 8)).sum().backward()
    dep = quantkit.convert(q)
    assert type(dep.dw) is nn.Conv2d


def test_untraceable_model_maxout_only_inside_sequential():
    q = quantkit.prepare(Untraceable(), "adabin")
    rep = quantkit.report(q)
    assert rep.trace_method != "fx"
    assert isinstance(q.block[2], Maxout)  # a Sequential runs its children in order: safe
    assert isinstance(q.act1, nn.ReLU)  # unknown data flow: left alone, and the report says so
    assert any("act1" in n and "could not be traced" in n for n in rep.notes)
    q(torch.randn(2, 1, 8, 8))


def test_prepared_model_loads_float_checkpoint_strict():
    model = SmallCNN()
    q = quantkit.prepare(SmallCNN(), "adabin", maxout=False)
    q.load_state_dict(model.state_dict())  # strict: AdaBin-only state is optional
    torch.testing.assert_close(q.conv1.weight, model.conv1.weight)
