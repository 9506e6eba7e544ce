"""Calibration of sigma_hat^2 against the residual and the phantom's residual_std (docs/uncertainty.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.utils import MetricReduction

from scripts.metrics._common import _as_mask, _np, reduce_nan_when_empty
from scripts.metrics.uncertainty import _spearmanr, ause

Z90, Z95 = 1.6448536269514722, 1.959963984540054  # two-sided standard-normal quantiles of the 90 % / 95 % intervals
ENCE_BINS = 20  # equal-count bins of ENCE per image (16,384 pixels of a 128² image: 819 per bin)
SIGMA_KEYS = ("zms", "zve", "ence", "nll", "picp90", "picp95", "mpiw90", "mpiw95")
REF_KEYS = ("zms_ref", "ence_ref", "nll_ref", "picp90_ref", "picp95_ref")

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


def sigma_calibration(
    log_var: Any, residual: Any, target_var: Any = None, mask: Any = None, n_bins: int = ENCE_BINS
) -> dict[str, torch.Tensor]:
    """Average and conditional calibration of σ̂² = exp(log_var) per image, ``(B, 1, *spatial)`` inputs, over the
    pixels of ``mask`` (all pixels when ``None``); z = r / σ̂ with ``residual`` r = I_f − Î_f:

    - ``zms`` = mean(z²) = mean(r² / σ̂²): 1 when the level is calibrated (Pernot's average-calibration test);
    - ``zve`` = var(z) (population variance of r / σ̂): 1 for calibrated, zero-mean Gaussian residuals;
    - ``ence``: pixels sorted by σ̂ into ``n_bins`` equal-count bins B_k (:data:`ENCE_BINS`);
      ENCE = 1/K Σ_k |RMV_k − RMSE_k| / RMV_k, RMV_k = sqrt(mean_{B_k} σ̂²), RMSE_k = sqrt(mean_{B_k} r²)
      (Levi et al. 2022); 0 when calibrated in every bin;
    - ``nll`` = mean ½(log σ̂² + r²/σ̂² + log 2π), nats per pixel;
    - ``picp90`` / ``picp95`` = the share of pixels with |r| ≤ z_q σ̂ (z_q = :data:`Z90`, :data:`Z95`): the
      coverage of the central 90 % / 95 % Gaussian interval, ideally 0.90 / 0.95;
    - ``mpiw90`` / ``mpiw95`` = mean 2 z_q σ̂, the mean width of those intervals (intensity units).

    With ``target_var`` (the phantom's exact E[r²] at the true displacement, residual_std²), the same against the
    expected, not the realised, squared residual: ``zms_ref`` = mean(residual_std² / σ̂²), ``ence_ref`` (RMSE_k from
    residual_std²), ``nll_ref`` = mean ½(log σ̂² + residual_std²/σ̂² + log 2π), and ``picp*_ref`` = the expected
    coverage over noise draws for r ~ N(0, residual_std²), mean erf(z_q σ̂ / (√2 residual_std)) (1 where
    residual_std = 0). ``residual`` may be None when only the ``*_ref`` values are wanted.

    Returns a dict of (B,) float64 tensors, keys :data:`SIGMA_KEYS` (NaN without ``residual``) and, with
    ``target_var``, :data:`REF_KEYS`; NaN for an empty mask.
    """
    lv = torch.as_tensor(_np(log_var))
    r = None if residual is None else torch.as_tensor(_np(residual))
    t = None if target_var is None else torch.as_tensor(_np(target_var))
    for name, x in (("residual", r), ("target_var", t)):
        if x is not None and x.shape != lv.shape:
            raise ValueError(f"log_var {tuple(lv.shape)} and {name} {tuple(x.shape)} must have the same shape.")
    keys = SIGMA_KEYS + (REF_KEYS if t is not None else ())
    out: dict[str, list[float]] = {k: [] for k in keys}
    log2pi = math.log(2 * math.pi)
    for b in range(lv.shape[0]):
        s = lv[b].reshape(-1)
        m = None if mask is None else torch.as_tensor(_np(_as_mask(mask, lv.shape[0], b))).reshape(-1) > 0
        s = s if m is None else s[m]
        if s.numel() == 0:
            for k in keys:
                out[k].append(math.nan)
            continue
        var = s.exp()
        std = var.sqrt()
        order = torch.argsort(var)
        bins = torch.tensor_split(order, min(int(n_bins), s.numel()))
        rmv = torch.stack([var[i].mean().sqrt() for i in bins])

        def ence(e2: torch.Tensor) -> float:
            rmse = torch.stack([e2[i].mean().sqrt() for i in bins])
            return float(((rmv - rmse).abs() / rmv).mean())

        for q, zq in (("90", Z90), ("95", Z95)):
            out["mpiw" + q].append(float((2 * zq * std).mean()))
        if r is not None:
            rr = r[b].reshape(-1) if m is None else r[b].reshape(-1)[m]
            z = rr / std
            out["zms"].append(float((z**2).mean()))
            out["zve"].append(float(z.var(correction=0)))
            out["ence"].append(ence(rr**2))
            out["nll"].append(float((0.5 * (s + z**2 + log2pi)).mean()))
            for q, zq in (("90", Z90), ("95", Z95)):
                out["picp" + q].append(float((z.abs() <= zq).double().mean()))
        else:
            for k in ("zms", "zve", "ence", "nll", "picp90", "picp95"):
                out[k].append(math.nan)
        if t is not None:
            tt = t[b].reshape(-1) if m is None else t[b].reshape(-1)[m]
            out["zms_ref"].append(float((tt / var).mean()))
            out["ence_ref"].append(ence(tt))
            out["nll_ref"].append(float((0.5 * (s + tt / var + log2pi)).mean()))
            for q, zq in (("90", Z90), ("95", Z95)):
                cover = torch.where(tt > 0, torch.erf(zq * std / (math.sqrt(2) * tt.clamp_min(1e-30).sqrt())), 1.0)
                out["picp" + q + "_ref"].append(float(cover.mean()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


class SigmaCalibrationMetric(CumulativeIterationMetric):
    """Cumulative :func:`sigma_calibration`: ``metric(y_pred=log_var, y=residual[, target_var=..., mask=...])``;
    ``aggregate()`` reduces the per-image values of ``output`` (one of :data:`SIGMA_KEYS` or :data:`REF_KEYS`)."""

    def __init__(self, output: str = "zms", n_bins: int = ENCE_BINS, reduction: MetricReduction | str = "mean"):
        super().__init__()
        if output not in SIGMA_KEYS + REF_KEYS:
            raise ValueError(f"output must be one of {SIGMA_KEYS + REF_KEYS}, got {output!r}.")
        self.output, self.n_bins, self.reduction = output, int(n_bins), reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        c = sigma_calibration(y_pred, y, kwargs.get("target_var"), kwargs.get("mask"), self.n_bins)
        return c[self.output].reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """The reduced value; NaN (not MONAI's 0) when no image gave a finite value."""
        return reduce_nan_when_empty(self.get_buffer(), reduction or self.reduction)


def sigma_scale_value(sigma_scale: Any) -> float | None:
    """The σ scale s of an evaluation / inference option: ``None`` → None (no scaling), a number → that number, a
    path to the JSON written by ``python -m bundle calibrate`` → its ``"sigma_scale"``. σ̂ is multiplied by s, i.e.
    σ̂² by s² (log σ̂² + 2 log s), once, where the variance network's output enters the engine output."""
    if sigma_scale is None or (isinstance(sigma_scale, str) and sigma_scale.lower() in ("", "none", "null")):
        return None
    if isinstance(sigma_scale, (int, float)) and not isinstance(sigma_scale, bool):
        s = float(sigma_scale)
    else:
        import json

        with open(sigma_scale) as f:
            s = float(json.load(f)["sigma_scale"])
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"the sigma scale must be a positive number, got {s}.")
    return s


class ReliabilityDiagram:
    """Reliability diagram of σ̂², pooled over all pixels of all images: pixels are binned by predicted σ̂² on
    fixed log-spaced bins (``edges``, σ̂² values; values outside go to the first / last bin) and each bin reports
    the mean predicted σ̂², the observed mean squared residual (I_f − Î_f)² and, when given, the mean
    residual_std². A calibrated estimator lies on the diagonal.

    ``update(log_var, sq_error, residual_var=None, mask=None)`` per batch (same shapes); :meth:`result` returns the
    per-bin ``count``, ``pred`` (mean σ̂²), ``observed`` (mean squared residual), ``target`` (mean residual_std²,
    NaN without it) for the non-empty bins, the pooled ratios ``pooled_var_ratio_residual`` = Σσ̂² / Σ r² and
    ``pooled_var_ratio_residual_std`` = Σσ̂² / Σ residual_std², and the pooled ZMS ``pooled_zms`` = mean r²/σ̂²
    and ``pooled_zms_ref`` = mean residual_std²/σ̂² over the pixels (``python -m bundle calibrate`` fits s² to the
    former over the field of view).
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
        self.sum_z2 = self.sum_z2_target = 0.0  # Σ r²/σ̂², Σ residual_std²/σ̂² (pooled ZMS)

    def update(self, log_var: Any, sq_error: Any, residual_var: Any = None, mask: Any = None) -> None:
        """Add the pixels of one or more images (``mask``: only those where it is > 0)."""
        var = np.exp(_np(log_var)).ravel()
        e = _np(sq_error).ravel()
        if e.shape != var.shape:
            raise ValueError(f"log_var and sq_error must have the same number of elements, got {var.size}, {e.size}.")
        m = None if mask is None else _np(mask).ravel() > 0
        if m is not None:
            var, e = var[m], e[m]
            residual_var = None if residual_var is None else _np(residual_var).ravel()[m]
        self.sum_z2 += float((e / var).sum())
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
            self.sum_z2_target += float((t / var).sum())

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
                "pooled_zms": float(self.sum_z2 / n) if (n := self.count.sum()) > 0 else math.nan,
                "pooled_zms_ref": float(self.sum_z2_target / nt) if (nt := self.n_target.sum()) > 0 else math.nan,
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
        return reduce_nan_when_empty(self.get_buffer(), reduction or self.reduction)
