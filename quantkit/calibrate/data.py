"""Calibration data: any iterable of batches, or a callable that runs the model.

A batch may be a tensor (the model's single input), a tuple/list (its first element is the input, as from a
``DataLoader`` of ``(x, y)`` pairs), or a dict (passed as keyword arguments). ``transform_fn(batch)`` overrides this
and returns the positional inputs (a tensor or a tuple). Every input tensor is checked for NaN/Inf, and a batch that
does not fit the model raises :class:`~quantkit.errors.CalibrationDataError` naming the batch and the expected input.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import CalibrationDataError, QuantkitError

CalibData = "Iterable[Any] | Callable[[nn.Module], Any]"


def batch_to_args(batch: Any, transform_fn: Callable | None = None) -> tuple[tuple, dict]:
    """Turn one calibration batch into the model's (args, kwargs)."""
    if transform_fn is not None:
        batch = transform_fn(batch)
        if isinstance(batch, dict):
            return (), batch
        return (batch if isinstance(batch, tuple) else (batch,)), {}
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationDataError("calibration batch is an empty tuple/list; yield tensors or (input, target) pairs")
        return (batch[0],), {}
    raise CalibrationDataError(
        f"calibration batch of type {type(batch).__name__} is not understood; yield tensors, (input, target) tuples "
        "or dicts, or pass transform_fn=lambda batch: model_inputs"
    )


def _check_finite(index: int, args: tuple, kwargs: dict) -> None:
    items = [(f"input {i}", a) for i, a in enumerate(args)] + [(f"input {k!r}", v) for k, v in kwargs.items()]
    for label, t in items:
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise CalibrationDataError(
                f"calibration batch {index}, {label} is on the meta device (a shape without values); calibration "
                "needs real data on the model's device"
            )
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CalibrationDataError(
                f"calibration batch {index}, {label}: {bad} NaN/Inf value(s); clean or filter the calibration data"
            )


def _shape_str(args: tuple) -> str:
    return ", ".join(tuple(a.shape).__str__() if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def run_calibration(model: nn.Module, calib_data: Any, *, transform_fn: Callable | None = None,
                    max_batches: int | None = None, progress: bool = True, desc: str = "calibrating",
                    example_inputs: tuple | None = None) -> int:
    """Run calibration batches through ``model`` (no grad, the model's current mode). Returns the number of batches."""
    if callable(calib_data) and not isinstance(calib_data, (torch.Tensor, nn.Module)) and not hasattr(calib_data, "__iter__"):
        with torch.no_grad():
            calib_data(model)
        return 1
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    try:
        iterator = iter(calib_data)
    except TypeError:
        raise CalibrationDataError(
            f"calib_data of type {type(calib_data).__name__} is neither iterable nor callable; pass a DataLoader, a "
            "list of batches, a tensor, or a function that runs the model"
        ) from None
    try:
        total = len(calib_data)  # type: ignore[arg-type]
        if max_batches is not None:
            total = min(total, max_batches)
    except TypeError:
        total = max_batches
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch", disable=not progress or None, leave=False)
    count = 0
    try:
        with torch.no_grad():
            for batch in iterator:
                if max_batches is not None and count >= max_batches:
                    break
                args, kwargs = batch_to_args(batch, transform_fn)
                _check_finite(count, args, kwargs)
                try:
                    model(*args, **kwargs)
                except QuantkitError:
                    raise
                except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                    expected = f"; example_inputs had shape(s) {_shape_str(example_inputs)}" if example_inputs else ""
                    raise CalibrationDataError(
                        f"calibration batch {count} with input shape(s) {_shape_str(args)} does not fit the model"
                        f"{expected}: {str(exc).splitlines()[0]}"
                    ) from exc
                count += 1
                bar.update(1)
    finally:
        bar.close()
    if count == 0:
        raise CalibrationDataError("calibration data is empty: it yielded no batch; pass at least one batch")
    return count
