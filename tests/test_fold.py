"""convert() folds a BatchNorm that directly follows a deploy layer into the layer's epilogue."""
import torch
from torch import nn

import quantkit
from quantkit.models import adder_cnn_digits


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(-2, 2)  # negative gains flip the epilogue's sign
            m.bias.data.uniform_(-1, 1)


class SharedBN(nn.Module):
    """The same BatchNorm module applied after two convs: not foldable into either."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.stem(x)
        x = self.bn(self.a(x)) + self.bn(self.b(x))
        return self.head(x.mean((2, 3)))


def test_binary_conv_bn_folded_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardtanh(),
                          nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.Hardtanh(),
                          nn.Flatten(), nn.Linear(32 * 4 * 4, 10))
    _randomize_bn(model)
    sim = quantkit.prepare(model, "xnor").eval()
    dep = quantkit.convert(sim)
    assert isinstance(dep[1], nn.Identity)  # after the FP stem: folded into the stem conv's weight and bias
    assert isinstance(dep[4], nn.Identity) and isinstance(dep[7], nn.Identity)
    notes = quantkit.report(dep).notes
    assert any("'4'" in n and "'3'" in n for n in notes) and any("'7'" in n and "'6'" in n for n in notes)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), sim(x), rtol=1e-4, atol=1e-4)


def test_shared_batchnorm_is_not_folded():
    sim = quantkit.prepare(SharedBN(), "xnor", keep_last=True).eval()
    dep = quantkit.convert(sim)
    assert isinstance(dep.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), sim(x), rtol=1e-4, atol=1e-4)


def test_adder_bn_folded():
    torch.manual_seed(0)
    model = adder_cnn_digits().eval()
    _randomize_bn(model)
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    sim = quantkit.quantize(model, "adder_ptq6", calib, progress=False)
    dep = quantkit.convert(sim)
    folded = [n for n in quantkit.report(dep).notes if "after calibration" in n]
    # each adder conv is followed by its own BatchNorm, and so is the FP stem conv: all folded in simulation already
    assert len(folded) == 4 and not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    assert quantkit.report(sim).folded == quantkit.report(dep).folded
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        a, b = dep(x), sim(x)
    assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-4
    # unfolded in simulation, convert folds them
    dep2 = quantkit.convert(quantkit.quantize(model, "adder_ptq6", calib, fold_bn=False, progress=False))
    assert len([n for n in quantkit.report(dep2).notes if "folded" in n]) == 3


def test_adabin_resnet_folds_every_block_batchnorm():
    import torchvision

    torch.manual_seed(0)
    dep = quantkit.QAT(torchvision.models.resnet18(), "adabin").convert()
    folded = [n for n in quantkit.report(dep).notes if "folded into the epilogue" in n]
    assert len(folded) == 16  # bn1/bn2 after each of the 16 binary 3x3 convs (fx traces through Maxout)
