"""Calibration samples from a file, a folder of images, an array, or ``"digits"`` -- one preprocessing for all.

Every source goes through the same three steps, in this order:

1. **Values to float32.** Pixel data is brought to the image scale [0, 1]:

   * image files (a folder, searched recursively; read with Pillow as L or RGB): 8-bit values / 255;
   * ``uint8`` arrays / tensors: / 255 -- the same 8-bit pixels as the image files;
   * other integer dtypes (``int8`` ... ``int64``, ``uint16`` ...) whose values all lie in 0..255 (8-bit pixels
     saved in a wider type, e.g. ``int64`` after NumPy arithmetic): / 255; any other integer data is refused
     (save it as floats in the scale the model expects);
   * ``bool``: 0 / 1;
   * ``"digits"``: scikit-learn's 8x8 digits, 0..16 / 16;
   * floating-point data (``float16``, ``bfloat16``, ``float32``, ``float64``) is taken as it is (cast to float32):
     it is assumed to be in the model's scale already (e.g. [0, 1], or already normalized -- then give no
     mean/std).
2. **Fit to ``input_shape``** ``(C, H, W)`` when given, for 4-D data ``(N, C, H, W)``: channels averaged (to 1)
   or averaged and repeated (to C), bilinear resize to H x W. Image files are resized (bilinear) as they are read.
   Other data must already have the shape ``(N, *input_shape)``.
3. **Normalize**: ``(x - mean) / std`` per channel (dimension 1) when ``mean`` / ``std`` are given, each a single
   value or one per channel; a missing one of the two defaults to 0 (mean) or 1 (std). ``"digits"`` without
   either is normalized with the digits training split's own mean/std -- exactly what
   :func:`quantkit.datasets.digits` returns, which quantkit's digits models are trained on.

Common mean/std: ImageNet models ``mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)`` (on the [0, 1] scale).
``quantkit quantize --calib PATH --mean ... --std ...`` runs exactly this function.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import CalibrationDataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TENSOR_SUFFIXES = (".npy", ".pt", ".pth")


@dataclass
class CalibrationSamples:
    """The samples ``(N, ...)`` float32 and what was done to them, step by step (for a log line)."""

    samples: torch.Tensor
    steps: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.samples.shape[0]} samples of shape {tuple(self.samples.shape[1:])}: " + "; ".join(self.steps)


def calibration_samples(source: Any, input_shape: Sequence[int] | None = None, *, limit: int | None = None,
                        mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
                        ) -> torch.Tensor:
    """Calibration samples ``(N, ...)`` float32 from ``source``, preprocessed as the module docstring documents.

    ``source``: ``"digits"``, a folder of images, a ``.npy`` (``allow_pickle=False``) or ``.pt`` / ``.pth``
    (``weights_only=True``; a tensor, an ``(inputs, targets)`` pair or a dict with ``x`` / ``inputs`` / ``images``
    / ``data``) file, or a tensor / NumPy array. ``input_shape``: one sample's shape ``(C, H, W)`` (images and 4-D
    data are fitted to it; a folder of images needs it). ``limit``: keep the first ``limit`` samples.
    ``mean`` / ``std``: per-channel normalization after scaling (one value or one per channel).
    Raises :class:`~quantkit.errors.CalibrationDataError` naming the source and the fix."""
    return load_samples(source, input_shape, limit=limit, mean=mean, std=std).samples


def load_samples(source: Any, input_shape: Sequence[int] | None = None, *, limit: int | None = None,
                 mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
                 ) -> CalibrationSamples:
    """:func:`calibration_samples` with the list of steps applied."""
    shape = _check_shape(input_shape)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise CalibrationDataError(f"limit={limit!r} must be a positive integer (or None for all samples)")
    label = _label(source)
    steps: list[str] = []
    norm_note = ""
    if isinstance(source, str) and source == "digits":
        from ..datasets import digits

        x = digits("train", standardize=False)[0]  # (N, 1, 8, 8) in [0, 1]
        steps.append("scikit-learn digits (train split), 0..16 / 16")
        if mean is None and std is None:
            mean, std = float(x.mean()), float(x.std())
            norm_note = " (the digits training split's, as quantkit.datasets.digits)"
    elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        x = _read_image_folder(Path(source), shape, limit, steps)
    else:
        raw = _read_tensor(source) if isinstance(source, (str, os.PathLike)) else _as_tensor(source, label)
        x = _to_float(raw, label, steps)
    if x.dim() < 2:
        raise CalibrationDataError(f"calibration data {label}: a tensor of shape {tuple(x.shape)} has no batch "
                                   "dimension; expected (N, C, H, W) or (N, ...)")
    if x.shape[0] == 0:
        raise CalibrationDataError(f"calibration data {label}: no samples")
    if limit is not None:
        x = x[:limit]
    x = _fit(x, shape, label, steps)
    if mean is not None or std is not None:
        x = _normalize(x, mean, std, label, steps)
        steps[-1] += norm_note
    if not torch.isfinite(x).all():
        raise CalibrationDataError(f"calibration data {label}: the samples contain NaN/Inf values; clean or filter "
                                   "them")
    return CalibrationSamples(x.contiguous(), steps)


# ---------------------------------------------------------------------------------------------- the steps
def _label(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return f"({type(source).__name__})"


def _check_shape(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise CalibrationDataError(f"input_shape={shape!r} must be a sequence of positive integers such as "
                                   "(3, 224, 224) (one sample, no batch)") from None
    if not out or min(out) <= 0 or any(isinstance(v, bool) or int(v) != v for v in shape):
        raise CalibrationDataError(f"input_shape={shape!r} must be a sequence of positive integers such as "
                                   "(3, 224, 224) (one sample, no batch)")
    return out


def _read_image_folder(folder: Path, shape: tuple[int, ...] | None, limit: int | None,
                       steps: list[str]) -> torch.Tensor:
    import numpy as np

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CalibrationDataError(f"calibration data {str(folder)!r}: the folder has no image files "
                                   f"({', '.join(IMAGE_SUFFIXES)})")
    if shape is None or len(shape) != 3:
        raise CalibrationDataError(f"calibration data {str(folder)!r}: a folder of images needs an input shape "
                                   "C,H,W (e.g. 3,224,224) to resize the images to")
    from PIL import Image

    c, h, w = shape
    arrays = []
    for f in files[:limit]:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as exc:
            raise CalibrationDataError(f"calibration data: cannot read image {str(f)!r}: {exc}") from exc
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        arrays.append(a)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).float() / 255.0
    if c not in (1, 3):  # read as RGB: average, then repeat to C channels
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1)
    steps.append(f"{len(arrays)} image file(s) read as {'L' if c == 1 else 'RGB'} and resized (bilinear) to "
                 f"{h}x{w}, 8-bit / 255")
    return x


def _read_tensor(path: str | os.PathLike) -> Any:
    import numpy as np

    p = os.fspath(path)
    if not os.path.exists(p):
        raise CalibrationDataError(f"calibration data {p!r}: no such file (give 'digits', a folder of images or a "
                                   f"{'/'.join(TENSOR_SUFFIXES)} file)")
    if not p.lower().endswith(TENSOR_SUFFIXES):
        raise CalibrationDataError(f"calibration data {p!r}: not 'digits', a folder of images, or a "
                                   f"{'/'.join(TENSOR_SUFFIXES)} file")
    try:
        if p.lower().endswith(".npy"):
            data: Any = torch.from_numpy(np.load(p, allow_pickle=False))
        else:
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CalibrationDataError(f"calibration data {p!r} cannot be loaded safely as a tensor file: "
                                   f"{_plain(first)}") from exc
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        data = data[0]  # (inputs, targets)
    if isinstance(data, dict):
        data = next((data[k] for k in ("x", "inputs", "images", "data") if k in data), data)
    if not isinstance(data, torch.Tensor):
        raise CalibrationDataError(f"calibration data {p!r}: expected a tensor of samples (N, ...), an (inputs, "
                                   "targets) pair or a dict with 'x'/'inputs'/'images'/'data', got "
                                   f"{type(data).__name__}")
    return data


def _plain(text: str) -> str:
    """Drop terminal colour codes (torch's unpickling errors carry some)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def _as_tensor(data: Any, label: str) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data.detach()
    try:
        import numpy as np

        if isinstance(data, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(data))
    except ImportError:  # pragma: no cover
        pass
    raise CalibrationDataError(f"calibration data {label}: expected 'digits', a folder, a tensor file path, a "
                               "tensor or a NumPy array")


def _to_float(x: torch.Tensor, label: str, steps: list[str]) -> torch.Tensor:
    if x.device.type == "meta":
        raise CalibrationDataError(f"calibration data {label} is on the meta device (shapes only, no values); "
                                   "load real data")
    if x.is_complex():
        raise CalibrationDataError(f"calibration data {label} is complex ({x.dtype}); give real-valued samples")
    x = x.cpu()
    if x.dtype == torch.bool:
        steps.append("bool -> 0/1")
        return x.float()
    if x.dtype == torch.uint8:
        steps.append("uint8 / 255 (8-bit pixels, like image files)")
        return x.float() / 255.0
    if x.is_floating_point():
        steps.append(f"{str(x.dtype).replace('torch.', '')} values used as they are (float data is taken to be in "
                     "the model's scale)")
        return x.float()
    # another integer type: 8-bit pixels saved wider are scaled like uint8; anything else has no known scale
    dtype = x.dtype
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        x = x.to(torch.int64)  # torch's wide unsigned types have few kernels (no min/max)
    lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
    if lo < 0 or hi > 255:
        raise CalibrationDataError(
            f"calibration data {label}: {str(dtype).replace('torch.', '')} values span {lo}..{hi}, not 8-bit "
            "pixels (0..255); integer data is scaled like images (/ 255), so save these samples as floats in the "
            "scale the model expects")
    steps.append(f"{str(dtype).replace('torch.', '')} values in 0..255 / 255 (8-bit pixels, like image files)")
    return x.double().div(255.0).float()


def _fit(x: torch.Tensor, shape: tuple[int, ...] | None, label: str, steps: list[str]) -> torch.Tensor:
    import torch.nn.functional as F

    if shape is None or tuple(x.shape[1:]) == shape:
        return x
    if len(shape) != 3 or x.dim() != 4:
        raise CalibrationDataError(f"calibration data {label}: samples have shape {tuple(x.shape[1:])} but the "
                                   f"input shape is {shape}; only (N, C, H, W) data is resized (to a C,H,W shape)")
    c, h, w = shape
    if x.shape[1] != c:
        steps.append(f"channels {x.shape[1]} -> {c} (mean{', repeated' if c != 1 else ''})")
        x = x.mean(1, keepdim=True)
        if c != 1:
            x = x.expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        steps.append(f"resized (bilinear) {x.shape[2]}x{x.shape[3]} -> {h}x{w}")
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.contiguous()


def _channel_values(values: float | Sequence[float], what: str, channels: int, label: str) -> torch.Tensor:
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    try:
        t = torch.tensor([float(v) for v in values], dtype=torch.float32)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise CalibrationDataError(f"{what}={values!r} must be a number or one number per channel") from None
    if t.numel() not in (1, channels):
        raise CalibrationDataError(f"calibration data {label}: {what} has {t.numel()} values but the samples have "
                                   f"{channels} channel(s) (dimension 1); give one value or {channels}")
    if not torch.isfinite(t).all():
        raise CalibrationDataError(f"{what}={values!r} must be finite")
    return t


def _normalize(x: torch.Tensor, mean: Any, std: Any, label: str, steps: list[str]) -> torch.Tensor:
    channels = x.shape[1]
    m = _channel_values(0.0 if mean is None else mean, "mean", channels, label)
    s = _channel_values(1.0 if std is None else std, "std", channels, label)
    if (s <= 0).any():
        raise CalibrationDataError(f"std={std!r} must be positive")
    view = (1, -1) + (1,) * (x.dim() - 2)
    steps.append(f"normalize (x - mean) / std with mean={_fmt(m)}, std={_fmt(s)}")
    return (x - m.view(view)) / s.view(view)


def _fmt(t: torch.Tensor) -> str:
    vals = [f"{v:.4g}" for v in t.tolist()]
    return vals[0] if len(vals) == 1 else "(" + ", ".join(vals) + ")"


__all__ = ["calibration_samples", "load_samples", "CalibrationSamples", "IMAGE_SUFFIXES"]
