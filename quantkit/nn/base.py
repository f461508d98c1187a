"""The contract every simulated quantized layer follows.

A *simulated* layer (``QuantModule``) replaces a float layer during ``prepare``: it keeps the float (latent)
parameters under the same names as the layer it replaced, so a float checkpoint loads into it, and adds its
quantizer state (scales, learnable thresholds, observer statistics) as plain tensor buffers/parameters. It runs in
float arithmetic. ``to_deploy()`` freezes it into a *deploy* layer that holds only packed / integer tensors and runs
on :mod:`quantkit.ops` kernels.

Most simulated layers are the generic :class:`~quantkit.nn.layers.QuantConv2d` / ``QuantLinear`` with registered
quantizer objects (:mod:`quantkit.quantizers.base`); attention wrappers and the adder layers implement the same
contract themselves.

Life cycle driven by :mod:`quantkit.api` and :class:`quantkit.QAT`:

- ``from_float(module, config, name)`` -- build from the float layer (raise :class:`NotQuantizable` to keep it FP).
- ``start_calibration()`` / ``finish_calibration()`` -- PTQ observers on / off (finish computes the parameters).
- ``epoch_start(epoch, total_epochs)`` -- QAT schedules (e.g. the EDE temperature of AdaBin).
- ``to_deploy()`` -- the frozen deploy layer.
- ``describe()`` -- extra per-layer facts for the report (groups, clamps, ...).
"""
from __future__ import annotations

from typing import Any

from torch import nn


class NotQuantizable(Exception):
    """Raised by ``from_float`` when a layer cannot be quantized by a scheme; the layer stays full precision and the
    report records ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QuantModule(nn.Module):
    """Base class of simulated quantized layers (see the module docstring for the life cycle)."""

    #: bit widths shown in the report (None = full precision for that operand)
    bits_w: int | None = None
    bits_a: int | None = None
    #: names of buffers/parameters that a float checkpoint does not carry; loading a state_dict without them keeps
    #: their current (initial) values instead of failing
    optional_state: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # cooperative: a subclass such as ``class X(QuantModule, nn.Conv2d)`` passes the layer's arguments on
        super().__init__(*args, **kwargs)
        self.calibrating = False

    # ---- life cycle -------------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, module: nn.Module, config: Any, name: str) -> "QuantModule":
        raise NotImplementedError

    def start_calibration(self) -> None:
        self.calibrating = True

    def finish_calibration(self) -> None:
        self.calibrating = False

    def epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Hook for per-epoch schedules; default: nothing."""

    def to_deploy(self) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no deploy form yet")

    def describe(self) -> dict[str, Any]:
        return {}

    def weight_nbytes(self) -> int:
        """Bytes the layer's parameters take once deployed at its bit widths (for the report)."""
        total = 0.0
        for pname, p in self.named_parameters(recurse=False):
            if pname == "weight" and self.bits_w is not None:
                total += p.numel() * self.bits_w / 8
            else:
                total += p.numel() * p.element_size()
        return int(round(total))

    # ---- state_dict: float checkpoints load into prepared models ----------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        optional = {prefix + n for n in self.optional_state}
        if optional:
            kept = [k for k in missing_keys[before:] if k not in optional]
            del missing_keys[before:]
            missing_keys.extend(kept)


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (non-recursive), as stored."""
    total = 0
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        total += t.numel() * t.element_size()
    return total


def deploy_nbytes(module: nn.Module) -> int:
    """Bytes of a deploy module's tensors (recursive), as stored."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


__all__ = ["QuantModule", "NotQuantizable", "module_nbytes", "deploy_nbytes"]
