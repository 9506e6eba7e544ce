"""Helpers shared by the metric modules: array conversion, per-image masks, column-wise MONAI reductions."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.trapezoid(y, x=x))


def _reduce_columns(data: torch.Tensor, reduction: MetricReduction | str) -> torch.Tensor:
    """Apply a MONAI reduction over the batch to each column of a (B, K) buffer separately -> (K,) (or (B, K)
    for ``none``)."""
    if not isinstance(data, torch.Tensor):
        raise ValueError("the data to aggregate must be a PyTorch Tensor.")
    if str(reduction).lower() in ("none", str(MetricReduction.NONE).lower()):
        return data
    cols = [do_metric_reduction(data[:, k : k + 1], reduction)[0] for k in range(data.shape[1])]
    return torch.stack([c.reshape(-1) if c.numel() > 1 else c.reshape(()) for c in cols], dim=-1)


def _as_mask(mask: Any, batch: int, index: int) -> Any:
    if mask is None:
        return None
    m = mask[index] if len(mask) == batch else mask
    return m


def reduce_nan_when_empty(buffer, reduction):
    """MONAI's ``do_metric_reduction`` of a cumulative metric's buffer, NaN (not MONAI's 0) when no image gave a
    finite value: the ``aggregate`` of the bundle's per-image metrics."""
    f, not_nans = do_metric_reduction(buffer, reduction)
    return torch.where(not_nans > 0, f, torch.full_like(f, math.nan))
