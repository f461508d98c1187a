"""Adder ResNets as in the AdderNet papers: every convolution inside the residual blocks (3x3 and the 1x1
downsample) is an :class:`~quantkit.nn.adder.AdderConv2d` followed by BatchNorm; the stem convolution and the
classifier stay multiplicative (official ``resnet20.py`` / ``resnet50.py``).

* :func:`adder_resnet20` -- CIFAR-style ResNet-20 (16/32/64 channels, 3x3 stem, 1x1 conv classifier + BatchNorm,
  as the official code).
* :func:`adder_resnet18` -- ImageNet ResNet-18 layout (7x7 stride-2 stem + max pool, 64..512 channels, FC head).
* :func:`adder_cnn_digits` -- a small adder CNN for 8x8 images (scikit-learn digits), used by the benchmark.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..nn.adder import AdderConv2d


class AdderBasicBlock(nn.Module):
    """adder3x3 -> BN -> ReLU -> adder3x3 -> BN, plus the shortcut (adder1x1 -> BN when the shape changes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, eta: float | None = 0.2) -> None:
        super().__init__()
        self.conv1 = AdderConv2d(inplanes, planes, 3, stride=stride, padding=1, eta=eta)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = AdderConv2d(planes, planes, 3, stride=1, padding=1, eta=eta)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(AdderConv2d(inplanes, planes, 1, stride=stride, eta=eta),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _stage(inplanes: int, planes: int, blocks: int, stride: int, eta: float | None) -> nn.Sequential:
    layers = [AdderBasicBlock(inplanes, planes, stride, eta)]
    layers += [AdderBasicBlock(planes, planes, 1, eta) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class AdderResNetCIFAR(nn.Module):
    """CIFAR ResNet (6n+2 layers) with adder blocks; FP 3x3 stem and FP 1x1-conv classifier + BatchNorm."""

    def __init__(self, blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10, in_channels: int = 3,
                 eta: float | None = 0.2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(16, 16, blocks[0], 1, eta)
        self.layer2 = _stage(16, 32, blocks[1], 2, eta)
        self.layer3 = _stage(32, 64, blocks[2], 2, eta)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(64, num_classes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.bn2(self.fc(self.avgpool(x)))
        return x.flatten(1)


class AdderResNet(nn.Module):
    """ImageNet ResNet with adder basic blocks; FP 7x7 stem and FP linear classifier."""

    def __init__(self, blocks: tuple[int, int, int, int] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_channels: int = 3, eta: float | None = 0.2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _stage(64, 64, blocks[0], 1, eta)
        self.layer2 = _stage(64, 128, blocks[1], 2, eta)
        self.layer3 = _stage(128, 256, blocks[2], 2, eta)
        self.layer4 = _stage(256, 512, blocks[3], 2, eta)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class AdderCNNDigits(nn.Module):
    """Small adder CNN for 1x8x8 inputs: FP 3x3 stem (16) -> adder 3x3 (32) -> adder 3x3 s2 (32) -> adder 3x3 s2
    (64), each adder followed by BN + ReLU -> global average pool -> FP linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 32, eta: float | None = 0.2) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w // 2, 3, padding=1, bias=False), nn.BatchNorm2d(w // 2), nn.ReLU())
        self.features = nn.Sequential(
            AdderConv2d(w // 2, w, 3, padding=1, eta=eta), nn.BatchNorm2d(w), nn.ReLU(),
            AdderConv2d(w, w, 3, stride=2, padding=1, eta=eta), nn.BatchNorm2d(w), nn.ReLU(),
            AdderConv2d(w, 2 * w, 3, stride=2, padding=1, eta=eta), nn.BatchNorm2d(2 * w), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(self.stem(x))).flatten(1))


def adder_resnet20(num_classes: int = 10, eta: float | None = 0.2) -> AdderResNetCIFAR:
    """Adder ResNet-20 for 32x32 inputs (CIFAR), as the official AdderNet code."""
    return AdderResNetCIFAR((3, 3, 3), num_classes, eta=eta)


def adder_resnet18(num_classes: int = 1000, eta: float | None = 0.2) -> AdderResNet:
    """Adder ResNet-18 (ImageNet layout): 16 adder 3x3 convolutions and 3 adder 1x1 downsamples."""
    return AdderResNet((2, 2, 2, 2), num_classes, eta=eta)


def adder_cnn_digits(num_classes: int = 10, width: int = 32, eta: float | None = 0.2) -> AdderCNNDigits:
    """Small adder CNN for scikit-learn's 8x8 digits (see :class:`AdderCNNDigits`)."""
    return AdderCNNDigits(num_classes, width, eta)


__all__ = ["AdderBasicBlock", "AdderResNetCIFAR", "AdderResNet", "AdderCNNDigits", "adder_resnet20", "adder_resnet18",
           "adder_cnn_digits"]
