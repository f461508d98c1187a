"""Imports the modules that register the built-in schemes (one line per family)."""
from . import uniform  # noqa: F401  w8a8, w4a4
from . import xnor  # noqa: F401  xnor
from . import adabin  # noqa: F401  adabin
from . import bivit  # noqa: F401  bivit, bivit_full, bibert
from . import adder  # noqa: F401  adder_ptq{2..8}, adder_qssf{2..8}_w/_a, adder_round{2..8}
