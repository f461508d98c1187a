"""Small reference models used by quantkit's examples, tests and benchmarks."""
from .vit import VisionTransformer, vit_digits

__all__ = ["VisionTransformer", "vit_digits"]
