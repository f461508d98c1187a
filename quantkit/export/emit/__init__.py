"""Per-family ONNX emitters (uniform QDQ, binary, BiViT attention, adder); importing this package registers them."""
from .base import (BINARY_FORMS, UNIFORM_FORMS, CUSTOM_DOMAIN, EmitContext, LayerExport, emit_custom, emitter_for, register_emitter,
                   supported_types)
from . import uniform  # noqa: F401,E402
from . import binary  # noqa: F401,E402
from . import attention  # noqa: F401,E402
from . import adder  # noqa: F401,E402

__all__ = ["BINARY_FORMS", "UNIFORM_FORMS", "CUSTOM_DOMAIN", "EmitContext", "LayerExport", "emit_custom", "emitter_for",
           "register_emitter", "supported_types"]
