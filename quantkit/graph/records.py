"""The one place a pass builds and fills a report line (:class:`~quantkit.report.LayerRecord`)."""
from __future__ import annotations

from torch import nn

from ..nn.base import deploy_nbytes, module_nbytes
from ..report import LayerRecord


def new_record(name: str, module: nn.Module, rule: str = "", kept_fp_reason: str | None = None, *,
               recursive: bool = False) -> LayerRecord:
    """A report line for ``module`` as it is now (full precision: bytes after = bytes before).

    ``recursive`` counts the tensors of the module's children too (a whole attention block replaced as one unit);
    otherwise only the module's own tensors (a layer whose children, if any, have report lines of their own)."""
    nbytes = deploy_nbytes(module) if recursive else module_nbytes(module)
    return LayerRecord(name=name, original_type=type(module).__name__, new_type=type(module).__name__, rule=rule,
                       kept_fp_reason=kept_fp_reason, bytes_before=nbytes, bytes_after=nbytes)


def fill_record(record: LayerRecord, layer: nn.Module) -> LayerRecord:
    """Copy what the quantized ``layer`` (a :class:`~quantkit.nn.base.QuantModule`) says about itself into
    ``record``: its type, bit widths, stored weight bytes and details. The call count prepare added is kept."""
    calls = record.info.get("calls")
    record.new_type = type(layer).__name__
    record.bits_w, record.bits_a = layer.bits_w, layer.bits_a
    record.bytes_after = layer.weight_nbytes()
    record.info = layer.describe()
    if calls:
        record.info["calls"] = calls
    return record


def fill_deployed_record(record: LayerRecord, deployed: nn.Module, kept_float: bool = False) -> LayerRecord:
    """Update ``record`` for the deploy layer ``convert`` put in its place (``kept_float``: a float module, e.g. a
    layer that runs in full precision at the current training stage, so no bit widths)."""
    record.new_type = type(deployed).__name__
    record.bytes_after = deploy_nbytes(deployed)
    if kept_float:
        record.bits_w = record.bits_a = None
    return record


__all__ = ["new_record", "fill_record", "fill_deployed_record"]
