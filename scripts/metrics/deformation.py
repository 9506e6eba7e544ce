"""Deformation quality per image: Jacobian determinant of phi(x) = x + z(x), folding, end-point error."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from scripts.metrics._common import _as_mask, _reduce_columns


# ----------------------------------------------------------------------------------------------------------------
# Jacobian determinant
# ----------------------------------------------------------------------------------------------------------------
def _batched_ddf(ddf: Any) -> tuple[torch.Tensor, bool]:
    """(B, ndim, *spatial) as is; (ndim, *spatial) gets a batch axis (returns the flag)."""
    ddf = torch.as_tensor(ddf)
    if ddf.ndim >= 2 and ddf.shape[1] == ddf.ndim - 2:
        return ddf, False
    if ddf.ndim >= 1 and ddf.shape[0] == ddf.ndim - 1:
        return ddf[None], True
    raise ValueError(f"ddf must be (B, ndim, *spatial) or (ndim, *spatial), got shape {tuple(ddf.shape)}.")


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``phi(x) = x + z(x)`` for a DDF ``z`` of shape ``(B, ndim, *spatial)`` (or
    ``(ndim, *spatial)``), voxel units, channel i = displacement along array axis i.

    Derivatives are finite differences (``torch.gradient``: central inside, one-sided at the border), so a field
    that is linear in x gives exactly ``det(I + A)`` everywhere. The determinant does not depend on the voxel
    spacing (``J_mm = S J_vox S^-1``). Returns ``(B, *spatial)`` (or ``spatial`` for unbatched input).
    """
    ddf, unbatched = _batched_ddf(ddf)
    nd = ddf.shape[1]
    if ddf.ndim != nd + 2 or nd not in (2, 3):
        raise ValueError(f"ddf must be (B, ndim, *spatial) with ndim 2 or 3, got shape {tuple(ddf.shape)}.")
    z = ddf.double()
    dims = tuple(range(2, 2 + nd))
    # grads[i][j] = d z_i / d x_j
    jac = torch.empty(*z.shape[:1], *z.shape[2:], nd, nd, dtype=z.dtype, device=z.device)
    for i in range(nd):
        g = torch.gradient(z[:, i], dim=tuple(d - 1 for d in dims))
        for j in range(nd):
            jac[..., i, j] = g[j] + (1.0 if i == j else 0.0)
    det = torch.linalg.det(jac)
    return det[0] if unbatched else det


def jacobian_stats(ddf: torch.Tensor, mask: Any = None) -> dict[str, torch.Tensor]:
    """Per image: ``fold_frac`` = fraction of voxels with det J <= 0, ``std_log_jac`` = std of log|J| over the
    voxels with det J > 0 (folded voxels excluded), ``n_fold`` the count. ``mask`` (B, 1, *spatial) restricts the
    voxels. Returns a dict of (B,) float64 tensors."""
    det = jacobian_determinant(_batched_ddf(ddf)[0])
    B = det.shape[0]
    out = {"fold_frac": [], "n_fold": [], "std_log_jac": []}
    for b in range(B):
        d = det[b].reshape(-1)
        if mask is not None:
            d = d[torch.as_tensor(_as_mask(mask, B, b)).reshape(-1).to(d.device) > 0]
        if d.numel() == 0:
            out["fold_frac"].append(math.nan), out["n_fold"].append(math.nan), out["std_log_jac"].append(math.nan)
            continue
        fold = (d <= 0).sum().item()
        pos = d[d > 0]
        out["fold_frac"].append(fold / d.numel())
        out["n_fold"].append(float(fold))
        out["std_log_jac"].append(pos.log().std(unbiased=False).item() if pos.numel() > 0 else math.nan)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class JacobianMetric(CumulativeIterationMetric):
    """Cumulative Jacobian statistics: ``metric(y_pred=ddf[, y=mask])``.

    Each image adds ``[fold_frac, std_log_jac]``; ``aggregate()`` returns the reduced value of ``output``
    (``"fold_frac"``: fraction of voxels with det J <= 0; ``"std_log_jac"``: std of log|J| over det J > 0);
    ``aggregate_all()`` returns both.
    """

    OUTPUTS = ("fold_frac", "std_log_jac")

    def __init__(self, output: str = "fold_frac", reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}.")
        self.output, self.reduction = output, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        s = jacobian_stats(y_pred, mask=y)
        return torch.stack([s[k] for k in self.OUTPUTS], dim=1)

    def aggregate_all(self, reduction: MetricReduction | str | None = None) -> dict[str, torch.Tensor]:
        f = _reduce_columns(self.get_buffer(), reduction or self.reduction)
        return {k: f[..., i] for i, k in enumerate(self.OUTPUTS)}

    def aggregate(self, reduction: MetricReduction | str | None = None):
        return self.aggregate_all(reduction)[self.output]


# ----------------------------------------------------------------------------------------------------------------
# End-point error
# ----------------------------------------------------------------------------------------------------------------
def end_point_error(ddf: torch.Tensor, gt: torch.Tensor, mask: Any = None, spacing: Sequence[float] | None = None):
    """Mean Euclidean norm of ``ddf - gt`` per image (``(B, ndim, *spatial)`` each, voxel units).

    ``spacing`` (mm per voxel along each array axis) scales each component to mm first; ``mask`` (B or 1, 1,
    *spatial) restricts the mean (an empty mask gives NaN). Returns (B,) float64.
    """
    d = torch.as_tensor(ddf).double() - torch.as_tensor(gt).double().to(torch.as_tensor(ddf).device)
    if spacing is not None:
        s = torch.as_tensor([float(v) for v in spacing], dtype=d.dtype, device=d.device)
        d = d * s.reshape(1, -1, *([1] * (d.ndim - 2)))
    norm = d.pow(2).sum(1).sqrt()  # (B, *spatial)
    out = []
    for b in range(norm.shape[0]):
        v = norm[b].reshape(-1)
        if mask is not None:
            v = v[torch.as_tensor(_as_mask(mask, norm.shape[0], b)).reshape(-1).to(v.device) > 0]
        out.append(v.mean().item() if v.numel() else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def _one(mask: Any, batch: int, index: int) -> Any:
    return None if mask is None else torch.as_tensor(_as_mask(mask, batch, index))[None]


class EndPointErrorMetric(CumulativeIterationMetric):
    """Cumulative end-point error: ``metric(y_pred=ddf, y=gt_ddf[, mask=heart_mask])``.

    Args:
        spacing: mm per voxel (array-axis order) to report mm; ``None``: voxels.
        reduction: MONAI reduction over images.
    A ``mask`` keyword (e.g. ``fixed_label > 0``, the heart) restricts the mean to the mask; a ``spacing`` keyword
    (one for all images, or a list with one per image, ``None``: NaN) overrides ``spacing``.
    """

    def __init__(
        self,
        spacing: Sequence[float] | None = None,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ):
        super().__init__()
        self.spacing, self.reduction, self.get_not_nans = spacing, reduction, get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("EndPointErrorMetric needs y (the ground-truth DDF).")
        mask, spacing = kwargs.get("mask"), kwargs.get("spacing", self.spacing)
        if spacing is None or isinstance(spacing[0], (int, float)):
            return end_point_error(y_pred, y, mask, spacing).reshape(-1, 1)
        # one spacing per image (None: unknown, NaN)
        n = y_pred.shape[0]
        vals = [
            math.nan if sp is None else float(end_point_error(y_pred[b : b + 1], y[b : b + 1], _one(mask, n, b), sp)[0])
            for b, sp in enumerate(spacing)
        ]
        return torch.tensor(vals, dtype=torch.float64).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        f, not_nans = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f
