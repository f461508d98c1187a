"""Range observers for activations, accumulated over calibration batches."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class MinMaxObserver(nn.Module):
    """Running min / max over all calibration batches (per tensor).

    Observer statistics are optional state: a float checkpoint (which has none) loads without them."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        del missing_keys[before:]

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def observe(self, x: Tensor) -> None:
        x = x.detach().float()
        self.lo.copy_(torch.minimum(self.lo, x.min()))
        self.hi.copy_(torch.maximum(self.hi, x.max()))

    def range(self) -> tuple[Tensor, Tensor]:
        return self.lo.clone(), self.hi.clone()

    @property
    def observed(self) -> bool:
        return bool(torch.isfinite(self.lo))


class PercentileObserver(MinMaxObserver):
    """Per batch the ``percentile``-th and (100 - percentile)-th percentiles; across batches their mean.
    Averaging per-batch percentiles keeps the memory bounded and is robust to one outlier batch."""

    def __init__(self, percentile: float = 99.99) -> None:
        super().__init__()
        self.percentile = percentile
        self.register_buffer("lo_sum", torch.tensor(0.0))
        self.register_buffer("hi_sum", torch.tensor(0.0))
        self.register_buffer("count", torch.tensor(0))

    def observe(self, x: Tensor) -> None:
        super().observe(x)
        flat = x.detach().float().flatten()
        if flat.numel() > 2_000_000:  # quantile() has an input size limit; a strided sample is plenty
            flat = flat[:: flat.numel() // 1_000_000 + 1]
        q = torch.quantile(flat, torch.tensor([1 - self.percentile / 100, self.percentile / 100]))
        self.lo_sum += q[0]
        self.hi_sum += q[1]
        self.count += 1

    def range(self) -> tuple[Tensor, Tensor]:
        n = max(int(self.count), 1)
        return self.lo_sum / n, self.hi_sum / n


def make_observer(kind: str, percentile: float) -> MinMaxObserver:
    if kind == "minmax":
        return MinMaxObserver()
    if kind == "percentile":
        return PercentileObserver(percentile)
    raise ValueError(kind)
