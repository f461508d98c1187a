"""Small models for the examples, the CLI and the tests (factories usable as ``--model examples/tiny_models.py:NAME``).

``tiny_resnet`` is torchvision's own ResNet/BasicBlock code with CIFAR-sized widths, so it goes through exactly the
module structure real torchvision ResNets have (downsample Sequentials, the twice-called ReLU, the fc head).
"""
from __future__ import annotations

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class TinyResNet(ResNet):
    """torchvision ResNet with BasicBlocks and small widths: 3x3 stem (no max pool), three stages."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), layers: tuple[int, int, int] = (1, 1, 1),
                 num_classes: int = 10, in_channels: int = 3) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = widths[0], 1, 1, 64
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = nn.Identity()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)


def tiny_resnet(num_classes: int = 10, in_channels: int = 3) -> TinyResNet:
    """ResNet-8-like (16/32/64 channels) for 32x32 inputs."""
    return TinyResNet((16, 32, 64), (1, 1, 1), num_classes, in_channels)


def resnet_bench(num_classes: int = 10) -> TinyResNet:
    """Wider ResNet (64/128/256 channels, two blocks a stage) for latency measurements at 32x32."""
    return TinyResNet((64, 128, 256), (2, 2, 2), num_classes)


def tiny_resnet_digits() -> TinyResNet:
    """tiny_resnet for scikit-learn's 8x8 grey digits."""
    return TinyResNet((16, 32, 64), (1, 1, 1), 10, 1)


__all__ = ["TinyResNet", "tiny_resnet", "resnet_bench", "tiny_resnet_digits"]
