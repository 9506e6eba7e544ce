"""Calibration of sigma_hat^2 against the residual and the phantom's residual_std (docs/uncertainty.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from scripts.metrics._common import _as_mask, _np
from scripts.metrics.uncertainty import _spearmanr, ause

CALIBRATION_KEYS = (
    "var_ratio_residual",
    "var_ratio_residual_std",
    "spearman_residual_std",
    "nll_residual_std",
    "ause_residual_std",
    "spearman_residual_std_fov",
)


def variance_calibration(
    log_var: Any,
    residual: Any,
    residual_std: Any = None,
    mask: Any = None,
    steps: int = 50,
    keys: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Calibration of σ̂² = exp(log_var) per image; ``(B, 1, *spatial)`` inputs, ``residual = I_f − Î_f``,
    ``residual_std`` the phantom's std of the residual over noise draws at the true displacement (or ``None``).

    Per image (means over the pixels of ``mask``, all pixels when ``None``):

    - ``var_ratio_residual`` = mean σ̂² / mean (I_f − Î_f)² (1 = the level matches the actual residual);
    - ``var_ratio_residual_std`` = mean σ̂² / mean residual_std² (1 = the level matches what σ̂² should converge to);
    - ``spearman_residual_std`` = Spearman(σ̂, residual_std) (``scipy.stats.spearmanr``, average ranks for ties);
    - ``nll_residual_std`` = the Gaussian NLL averaged over the noise draws,
      E[½(log σ̂² + r²/σ̂² + log 2π)] = ½(log σ̂² + residual_std²/σ̂² + log 2π), nats per pixel (minimal, at
      ½(log residual_std² + 1 + log 2π), where σ̂ = residual_std);
    - ``ause_residual_std``: the AUSE (:func:`ause`, unnormalised) of the oracle variance estimator σ = residual_std
      on the actual squared residual, the bound to compare σ̂'s ``ause`` with;
    - ``spearman_residual_std_fov`` = Spearman(σ̂, residual_std) over the field of view only, the pixels (of
      ``mask``) where residual_std > 0: outside an echo sector both frames are 0 by construction, σ̂ and
      residual_std are both minimal there, and those pixels would raise the all-pixel figure without ranking anything
      (docs/results/sigma_target.md). Equal to ``spearman_residual_std`` where every pixel has residual_std > 0.

    The ``*_residual_std`` entries are NaN where ``residual_std`` is None (e.g. real data, phantom version 1) or the
    mask is empty. Returns a dict of (B,) float64 tensors with the keys :data:`CALIBRATION_KEYS` (or only ``keys``:
    the others are not computed).
    """
    keys = CALIBRATION_KEYS if keys is None else tuple(keys)
    unknown = [k for k in keys if k not in CALIBRATION_KEYS]
    if unknown:
        raise ValueError(f"unknown calibration keys {unknown}; available: {CALIBRATION_KEYS}.")
    lv = _np(log_var)
    r2 = _np(residual) ** 2
    rs = _np(residual_std) if residual_std is not None else None
    if r2.shape != lv.shape or (rs is not None and rs.shape != lv.shape):
        raise ValueError(
            f"log_var {lv.shape}, residual {r2.shape} and residual_std {None if rs is None else rs.shape} "
            "must have the same shape."
        )
    out: dict[str, list[float]] = {k: [] for k in CALIBRATION_KEYS}
    for b in range(lv.shape[0]):
        s, e = lv[b].ravel(), r2[b].ravel()
        t = rs[b].ravel() if rs is not None else None
        if mask is not None:
            m = _np(_as_mask(mask, lv.shape[0], b)).ravel() > 0
            s, e, t = s[m], e[m], (t[m] if t is not None else None)
        if s.size == 0:
            for k in CALIBRATION_KEYS:
                out[k].append(math.nan)
            continue
        var = np.exp(s)
        mean_var, mean_e = float(var.mean()), float(e.mean())
        out["var_ratio_residual"].append(mean_var / mean_e if mean_e > 0 else math.nan)
        if t is None:
            for k in CALIBRATION_KEYS[1:]:
                out[k].append(math.nan)
            continue
        t2 = float((t**2).mean())
        out["var_ratio_residual_std"].append(mean_var / t2 if t2 > 0 else math.nan)
        if "spearman_residual_std" in keys:
            out["spearman_residual_std"].append(_spearmanr(s, t))
        out["nll_residual_std"].append(float(np.mean(0.5 * (s + t**2 * np.exp(-s) + math.log(2 * math.pi)))))
        if "ause_residual_std" in keys:
            out["ause_residual_std"].append(ause(t, e, steps)["ause"])
        if "spearman_residual_std_fov" in keys:
            fov = t > 0
            out["spearman_residual_std_fov"].append(_spearmanr(s[fov], t[fov]) if fov.sum() > 1 else math.nan)
    return {k: torch.tensor(out[k], dtype=torch.float64) for k in keys}


class ReliabilityDiagram:
    """Reliability diagram of σ̂², pooled over all pixels of all images: pixels are binned by predicted σ̂² on
    fixed log-spaced bins (``edges``, σ̂² values; values outside go to the first / last bin) and each bin reports
    the mean predicted σ̂², the observed mean squared residual (I_f − Î_f)² and, when given, the mean
    residual_std². A calibrated estimator lies on the diagonal.

    ``update(log_var, sq_error, residual_var=None)`` per batch (same shapes); :meth:`result` returns the per-bin
    ``count``, ``pred`` (mean σ̂²), ``observed`` (mean squared residual), ``target`` (mean residual_std², NaN
    without it) for the non-empty bins, and the pooled ratios ``pooled_var_ratio_residual`` = Σσ̂² / Σ r² and
    ``pooled_var_ratio_residual_std`` = Σσ̂² / Σ residual_std².
    """

    def __init__(self, edges: Sequence[float] | None = None) -> None:
        self.edges = np.asarray(edges if edges is not None else np.logspace(-6, 1, 29), dtype=np.float64)
        if self.edges.ndim != 1 or self.edges.size < 2 or np.any(np.diff(self.edges) <= 0):
            raise ValueError("edges must be an increasing sequence of at least 2 values.")
        self.reset()

    def reset(self) -> None:
        nb = self.edges.size - 1
        self.count = np.zeros(nb)
        self.sum_pred = np.zeros(nb)
        self.sum_obs = np.zeros(nb)
        self.sum_target = np.zeros(nb)
        self.n_target = np.zeros(nb)

    def update(self, log_var: Any, sq_error: Any, residual_var: Any = None) -> None:
        var = np.exp(_np(log_var)).ravel()
        e = _np(sq_error).ravel()
        if e.shape != var.shape:
            raise ValueError(f"log_var and sq_error must have the same number of elements, got {var.size}, {e.size}.")
        idx = np.clip(np.searchsorted(self.edges, var, side="right") - 1, 0, self.edges.size - 2)
        nb = self.edges.size - 1
        self.count += np.bincount(idx, minlength=nb)
        self.sum_pred += np.bincount(idx, weights=var, minlength=nb)
        self.sum_obs += np.bincount(idx, weights=e, minlength=nb)
        if residual_var is not None:
            t = _np(residual_var).ravel()
            if t.shape != var.shape:
                raise ValueError("residual_var must have the same number of elements as log_var.")
            self.sum_target += np.bincount(idx, weights=t, minlength=nb)
            self.n_target += np.bincount(idx, minlength=nb)

    def result(self) -> dict[str, Any]:
        ok = self.count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            target = np.where(self.n_target > 0, self.sum_target / np.maximum(self.n_target, 1), np.nan)
            tot_obs, tot_t = self.sum_obs.sum(), self.sum_target.sum()
            pred_t = self.sum_pred[self.n_target > 0].sum()
            return {
                "edges": self.edges,
                "count": self.count[ok],
                "pred": self.sum_pred[ok] / self.count[ok],
                "observed": self.sum_obs[ok] / self.count[ok],
                "target": target[ok],
                "pooled_var_ratio_residual": float(self.sum_pred.sum() / tot_obs) if tot_obs > 0 else math.nan,
                "pooled_var_ratio_residual_std": float(pred_t / tot_t) if tot_t > 0 else math.nan,
            }


class VarianceCalibrationMetric(CumulativeIterationMetric):
    """Cumulative :func:`variance_calibration`: ``metric(y_pred=log_var, y=residual[, residual_std=...,
    mask=...])``; ``aggregate()`` reduces the per-image values of ``output`` (one of :data:`CALIBRATION_KEYS`)."""

    def __init__(self, output: str = "var_ratio_residual", reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__()
        if output not in CALIBRATION_KEYS:
            raise ValueError(f"output must be one of {CALIBRATION_KEYS}, got {output!r}.")
        self.output, self.reduction = output, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("VarianceCalibrationMetric needs y (the residual I_f - I_hat_f).")
        c = variance_calibration(y_pred, y, kwargs.get("residual_std"), kwargs.get("mask"), keys=(self.output,))
        return c[self.output].reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """The reduced value; NaN (not MONAI's 0) when no image gave a finite value."""
        f, not_nans = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
        return torch.where(not_nans > 0, f, torch.full_like(f, math.nan))
