"""Shared plumbing of the op wrappers: pick the compiled kernel or the pure-PyTorch reference, and register fake
(meta) implementations only for ops the loaded extension defines."""
from __future__ import annotations

import functools

from typing import Callable

import torch

from quantkit.ops import _load

_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def has_op(name: str) -> bool:
    """Whether ``torch.ops.quantkit.<name>`` exists (the extension loaded and defines it)."""
    return _load.have_kernels() and hasattr(torch.ops.quantkit, name)


def use_kernel(name: str, device: torch.device) -> bool:
    """Whether the wrapper should call the compiled kernel ``name`` for tensors on ``device``; otherwise the caller
    runs the reference (and the user is warned once that the kernels are missing)."""
    if not has_op(name):
        _load.warn_missing_once()
        return False
    if torch.compiler.is_compiling():  # the dispatcher query below is not traceable; the op itself is
        return True
    key = _DISPATCH_KEY.get(device.type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkit::{name}", key)


def register_fake(name: str) -> Callable:
    """Decorator: ``torch.library.register_fake("quantkit::<name>")`` when that op exists, else a no-op."""

    def deco(fn: Callable) -> Callable:
        if has_op(name):
            torch.library.register_fake(f"quantkit::{name}")(fn)
        return fn

    return deco


def check_devices(name: str, **tensors) -> None:
    """Raise KernelError unless every given tensor (``None`` skipped) is on one device. The fake (meta)
    implementations call it: the dispatcher runs them for any call with a meta tensor among its arguments, and
    without the check a mix of meta and CPU tensors would return an uninitialized CPU tensor."""
    from quantkit.errors import KernelError

    present = {k: t for k, t in tensors.items() if isinstance(t, torch.Tensor)}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {t.device}" for k, t in present.items())
        raise KernelError(f"{name}: all tensor arguments must be on one device, got {where}; move them with .to()")


_ISA_LEVELS = ("portable", "avx2", "avx512", "amx")


def cpu_isa() -> str:
    """Instruction-set level the CPU kernels use now: ``"avx512"``, ``"avx2"``, ``"portable"`` (the best the CPU
    has, lowered by the environment variable ``QUANTKIT_CPU_ISA``), ``"amx"`` (AVX-512 + the opt-in AMX-INT8 path of
    the binary kernels, only with ``QUANTKIT_CPU_ISA=amx``), or ``"reference"`` when the kernels are missing."""
    if not has_op("cpu_isa"):
        return "reference"
    return torch.ops.quantkit.cpu_isa()


def cpu_amx() -> bool:
    """Whether :func:`quantkit.ops.binary_conv2d_prepacked` runs on AMX-INT8 tiles now (given ``amx_weights``):
    the CPU and OS provide AMX and ``QUANTKIT_CPU_ISA`` is unset, ``"auto"`` or ``"amx"``."""
    return has_op("cpu_amx") and bool(torch.ops.quantkit.cpu_amx())


@functools.lru_cache(maxsize=None)
def cpu_amx_supported() -> bool:
    """Whether this CPU and OS can run AMX-INT8 tiles at all (whatever ``QUANTKIT_CPU_ISA`` says now; asked once,
    the CPU does not change in a process)."""
    return "amx" in supported_cpu_isas()


def supported_cpu_isas() -> list[str]:
    """Every level this CPU can run (for ``QUANTKIT_CPU_ISA``), lowest first; empty without compiled kernels."""
    import os

    if not has_op("cpu_isa"):
        return []
    saved = os.environ.get("QUANTKIT_CPU_ISA")
    try:
        os.environ.pop("QUANTKIT_CPU_ISA", None)
        best = torch.ops.quantkit.cpu_isa()
        levels = list(_ISA_LEVELS[: _ISA_LEVELS.index(best) + 1])
        if best == "avx512":
            os.environ["QUANTKIT_CPU_ISA"] = "amx"
            try:
                torch.ops.quantkit.cpu_isa()
                levels.append("amx")
            except RuntimeError:  # no AMX tiles on this CPU/OS
                pass
    finally:
        if saved is None:
            os.environ.pop("QUANTKIT_CPU_ISA", None)
        else:
            os.environ["QUANTKIT_CPU_ISA"] = saved
    return levels
