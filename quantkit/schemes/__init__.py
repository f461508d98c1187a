"""Named recipes: small dataclass configs in a registry (``quantkit.schemes()`` lists them)."""
from .base import SchemeConfig, check_bits, get_scheme, list_schemes, register_scheme, scheme

__all__ = ["SchemeConfig", "get_scheme", "list_schemes", "register_scheme", "scheme", "check_bits"]
