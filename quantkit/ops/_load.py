"""Loading of the compiled kernels. If ``quantkit._C`` cannot be imported, quantkit says so once, loudly, and
every op in :mod:`quantkit.ops` runs its pure-PyTorch reference instead (DESIGN invariant 3)."""
from __future__ import annotations

import importlib
import os
import warnings

_state: dict = {"loaded": None, "error": None, "sm90a": None, "sm90a_error": None, "warned": False}


def load() -> bool:
    """Import the compiled extension(s) once; return whether ``torch.ops.quantkit`` kernels are available."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    if os.environ.get("QUANTKIT_DISABLE_KERNELS") == "1":
        _state["loaded"], _state["error"] = False, "disabled by QUANTKIT_DISABLE_KERNELS=1"
        return False
    try:
        importlib.import_module("quantkit._C")
        _state["loaded"] = True
    except Exception as exc:  # ImportError, or an undefined symbol from a stale build
        _state["loaded"], _state["error"] = False, f"{type(exc).__name__}: {exc}"
    try:
        importlib.import_module("quantkit._C_sm90a")
        _state["sm90a"] = True
    except Exception as exc:
        _state["sm90a"], _state["sm90a_error"] = False, f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def have_kernels() -> bool:
    return load()


def warn_missing_once() -> None:
    """Called by an op wrapper that falls back to its reference because the compiled kernels are missing."""
    if not _state["warned"] and not load():
        _state["warned"] = True
        warnings.warn(
            "quantkit: compiled kernels are not available (" + str(_state["error"]) + "); deploy models run on the "
            "pure-PyTorch reference path, which is correct but slow. Rebuild with `make build` "
            "(or `pip install --no-build-isolation -e .`).",
            RuntimeWarning,
            stacklevel=3,
        )


def status() -> dict:
    load()
    return dict(_state)
