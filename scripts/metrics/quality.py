"""A per-pair quality score from what the bundle predicts without any ground truth (docs/uncertainty.md, "Which
registrations to distrust"): the candidates compared on the phantom validation split and the chosen ``qc_score``."""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric

from scripts.metrics._common import reduce_nan_when_empty
from scripts.metrics.deformation import jacobian_determinant

QC_CANDIDATES = ("mse", "rel_mse", "identity_mse", "var", "snr_res", "disp", "std_log_jac", "zms", "ic")
# the candidate reported as qc_score, picked on the phantom validation splits (the only one with Spearman >= 0.5
# with the per-pair EPE on both, docs/uncertainty.md): the mean inverse-consistency error, pixels
QC_DEFINITION = "ic"


def image_fov(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """The field of view from the images alone (inference has no ``residual_std``): the pixels where I_f or Î_f is
    non-zero (an echo sector's zero background left out; every pixel of an MR image)."""
    return (fixed != 0) | (warped != 0)


def inverse_consistency_error(ddf: torch.Tensor, ddf_backward: torch.Tensor) -> torch.Tensor:
    """‖z_fw(x) + z_bw(x + z_fw(x))‖₂ per voxel (voxels), ``(B, 1, *spatial)``: 0 when the backward registration
    undoes the forward one (z_bw resampled at x + z_fw(x) with ``monai.networks.blocks.Warp``, bilinear, border)."""
    from monai.networks.blocks import Warp

    composed = ddf + Warp("bilinear", "border")(ddf_backward.float(), ddf.float()).to(ddf.dtype)
    return composed.pow(2).sum(1, keepdim=True).sqrt()


def quality_candidates(
    fixed: Any,
    warped: Any,
    moving: Any,
    ddf: Any,
    log_var: Any = None,
    weight: Any = None,
    ddf_backward: Any = None,
) -> dict[str, torch.Tensor]:
    """The candidate per-pair scores (larger = less trustworthy), ``(B, C, *spatial)`` inputs, means over the
    image field of view (:func:`image_fov`), r = I_f − Î_f:

    - ``mse`` = mean r²; ``rel_mse`` = mean r² / mean (I_f − I_m)² (the share of the frame difference left);
      ``identity_mse`` = mean (I_f − I_m)² (how different the frames are);
    - ``var`` = mean σ̂²; ``snr_res`` = mean w r² (the SNR-weighted residual of the loss, ``weight`` w);
      ``zms`` = mean r² / σ̂²;
    - ``disp`` = mean ‖z‖₂ (voxels), the predicted motion; ``std_log_jac`` = std of log det J (det J > 0);
    - ``ic`` = mean :func:`inverse_consistency_error` (needs ``ddf_backward``, the fixed → moving registration).

    Returns a dict of (B,) float64 tensors (NaN where the input is missing)."""
    f, w_, m = (torch.as_tensor(x).double() for x in (fixed, warped, moving))
    z = torch.as_tensor(ddf).double()
    fov = image_fov(f, w_)
    out: dict[str, list[float]] = {k: [] for k in QC_CANDIDATES}
    jac = jacobian_determinant(z)
    ic = None if ddf_backward is None else inverse_consistency_error(z, torch.as_tensor(ddf_backward).double())
    for b in range(f.shape[0]):
        k = fov[b].reshape(-1)
        if not bool(k.any()):
            k = torch.ones_like(k)
        r2 = ((f[b] - w_[b]) ** 2).reshape(-1)[k]
        d2 = ((f[b] - m[b]) ** 2).reshape(-1)[k]
        out["mse"].append(float(r2.mean()))
        out["identity_mse"].append(float(d2.mean()))
        out["rel_mse"].append(float(r2.mean() / d2.mean()) if float(d2.mean()) > 0 else math.nan)
        out["disp"].append(float(z[b].pow(2).sum(0).sqrt().reshape(-1)[k].mean()))
        j = jac[b].reshape(-1)[k]
        j = j[j > 0]
        out["std_log_jac"].append(float(j.log().std(correction=0)) if j.numel() > 1 else math.nan)
        if log_var is None:
            out["var"].append(math.nan)
            out["zms"].append(math.nan)
        else:
            v = torch.as_tensor(log_var).double()[b].exp().reshape(-1)[k]
            out["var"].append(float(v.mean()))
            out["zms"].append(float((r2 / v).mean()))
        wt = None if weight is None else torch.as_tensor(weight).double()[b].reshape(-1)
        out["snr_res"].append(math.nan if wt is None else float((wt[k] * r2).mean()))
        out["ic"].append(math.nan if ic is None else float(ic[b].reshape(-1)[k].mean()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def qc_score(
    fixed: Any, warped: Any, moving: Any, ddf: Any, log_var: Any = None, weight: Any = None, ddf_backward: Any = None
) -> torch.Tensor:
    """``qc_score`` per pair: the candidate :data:`QC_DEFINITION` of :func:`quality_candidates`. (B,) float64."""
    return quality_candidates(fixed, warped, moving, ddf, log_var, weight, ddf_backward)[QC_DEFINITION]


class QualityScoreMetric(CumulativeIterationMetric):
    """Cumulative :func:`quality_candidates` value ``output`` (default the ``qc_score``):
    ``metric(y_pred=ddf, y=fixed, warped=..., moving=...[, log_var=..., weight=...])``."""

    def __init__(self, output: str = QC_DEFINITION, reduction: str = "mean") -> None:
        super().__init__()
        if output not in QC_CANDIDATES:
            raise ValueError(f"output must be one of {QC_CANDIDATES}, got {output!r}.")
        self.output, self.reduction = output, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        c = quality_candidates(
            y,
            kwargs["warped"],
            kwargs["moving"],
            y_pred,
            kwargs.get("log_var"),
            kwargs.get("weight"),
            kwargs.get("ddf_backward"),
        )
        return c[self.output].reshape(-1, 1)

    def aggregate(self, reduction: str | None = None):
        return reduce_nan_when_empty(self.get_buffer(), reduction or self.reduction)
