"""Small reference models used by quantkit's examples, tests and benchmarks."""
from .adder_resnet import AdderResNet, AdderResNetCIFAR, adder_cnn_digits, adder_resnet18, adder_resnet20
from .vit import VisionTransformer, vit_digits

__all__ = ["VisionTransformer", "vit_digits", "AdderResNet", "AdderResNetCIFAR", "adder_resnet18", "adder_resnet20",
           "adder_cnn_digits"]
