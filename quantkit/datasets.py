"""Small real data bundled with scikit-learn: the 8x8 handwritten digits (1797 images, 10 classes).

Used by the demo, the examples, the accuracy benchmarks and ``quantkit quantize --calib digits``. (The accuracy of
an exported ONNX file in onnxruntime: :func:`quantkit.export.onnx_accuracy`.)
"""
from __future__ import annotations

import torch
from torch import Tensor


def digits(split: str = "train", *, seed: int = 0, test_fraction: float = 0.25, upsample: int = 1,
           standardize: bool = True) -> tuple[Tensor, Tensor]:
    """Digits images as float32 ``(N, 1, 8*upsample, 8*upsample)`` scaled to [0, 1] then (``standardize=True``)
    standardized with the training split's mean/std, and int64 labels. The train/test split is stratified and fixed
    by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=data.target)
    if standardize:
        mean, std = x[tr].mean(), x[tr].std()
        x = (x - mean) / std
    if upsample > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=upsample, mode="nearest")
    pick = {"train": tr, "test": te, "all": idx}[split]
    pick = torch.as_tensor(pick)
    return x[pick], y[pick]


def digits_loader(split: str = "train", *, batch_size: int = 64, shuffle: bool = False, seed: int = 0, **kw):
    """A ``DataLoader`` of ``(image, label)`` batches over :func:`digits`."""
    x, y = digits(split, seed=seed, **kw)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                       shuffle=shuffle, generator=gen)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent (model put in eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(dim=-1) == y[i:i + batch_size]).sum().item()
    return 100.0 * correct / len(y)
