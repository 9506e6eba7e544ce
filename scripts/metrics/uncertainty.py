"""Uncertainty quality per image: sparsification curves and AUSE/AURG (Poggi et al. 2020, as the authors'
``ause.py``), the Gaussian negative log-likelihood and the Spearman rank correlation with a reference std."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

from scripts.metrics._common import _as_mask, _np, _reduce_columns, _trapezoid


# ----------------------------------------------------------------------------------------------------------------
# Sparsification / AUSE
# ----------------------------------------------------------------------------------------------------------------
def _sparsify(order_key: np.ndarray, sq_error: np.ndarray, steps: int) -> np.ndarray:
    """MSE of the kept pixels after removing the pixels of largest ``order_key``, at the percentile thresholds
    ``0, 100/steps, ..., 100 (steps-1)/steps`` of ``-order_key`` (pixels with ``-key >= threshold`` are kept, as in
    Poggi et al. and the authors' ``ause.py``), plus a final 0 for "everything removed"."""
    neg = -order_key.astype(np.float64)
    idx = np.argsort(neg, kind="stable")
    neg_sorted = neg[idx]
    err_sorted = sq_error.astype(np.float64)[idx]
    # suffix sums: kept set = neg_sorted[start:]
    suffix = np.concatenate([np.cumsum(err_sorted[::-1])[::-1], [0.0]])
    n = neg_sorted.size
    # The linear-interpolation percentile q_t = 100 t / steps of the n sorted values sits at position
    # t (n - 1) / steps; keeping the values >= that threshold keeps exactly the values >= the sorted value at
    # ceil(position) (ties included). Integer arithmetic avoids the off-by-one pixel that the float percentile
    # (np.percentile(x, 100. / steps * t)) gives at some steps.
    ranks = [-(-t * (n - 1) // steps) for t in range(steps)]
    starts = np.searchsorted(neg_sorted, neg_sorted[ranks], side="left")
    curve = np.array([suffix[s] / (n - s) for s in starts] + [0.0])
    return curve


def sparsification_curves(
    uncertainty: Any, sq_error: Any, steps: int = 50, mask: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparsification curve of one image and its oracle.

    Args:
        uncertainty: per-pixel uncertainty (sigma^2, sigma or log sigma^2: only the ranking matters), any shape.
        sq_error: per-pixel squared error ``(I_f - I_hat_f)^2``, same shape.
        steps: number of removal steps (50: fractions 0, 0.02, ..., 0.98, then 1.0 with MSE 0).
        mask: optional boolean mask of the pixels that take part (e.g. the heart); ``None``: all pixels.

    Returns:
        ``(fractions, curve, oracle)``: arrays of length ``steps + 1``; ``fractions`` = fraction of pixels removed,
        ``curve`` = MSE of the pixels kept when removing by ``uncertainty`` (largest first), ``oracle`` = the same
        when removing by the true ``sq_error``. Both end with 0 at fraction 1.
    """
    u, e = _np(uncertainty).ravel(), _np(sq_error).ravel()
    if u.shape != e.shape:
        raise ValueError(f"uncertainty and sq_error must have the same number of elements, got {u.size} and {e.size}.")
    if mask is not None:
        m = _np(mask).ravel() > 0
        u, e = u[m], e[m]
    fractions = np.array([t / steps for t in range(steps + 1)])
    if u.size == 0:
        nan = np.full(steps + 1, np.nan)
        return fractions, nan, nan.copy()
    return fractions, _sparsify(u, e, steps), _sparsify(e, e, steps)


def ause(
    uncertainty: Any, sq_error: Any, steps: int = 50, mask: Any = None, normalize: bool = False
) -> dict[str, float]:
    """Area under the sparsification error (AUSE) and area under the random gain (AURG) of one image.

    ``AUSE = int curve - int oracle`` and ``AURG = int random - int curve`` over fractions [0, 1] (trapezoid rule),
    where ``random`` is the flat line at the MSE of all pixels. ``normalize=True`` divides the curves by that full
    MSE first (so the values are scale free; AUSE_norm = AUSE / MSE). Lower AUSE and higher AURG are better.

    Returns a dict with ``ause``, ``aurg`` and ``mse`` (the full MSE).
    """
    x, curve, oracle = sparsification_curves(uncertainty, sq_error, steps, mask)
    mse = float(curve[0])
    a_curve = _trapezoid(curve, x)
    out = {"ause": a_curve - _trapezoid(oracle, x), "aurg": mse - a_curve, "mse": mse}
    if normalize:  # the integrals are linear: dividing the areas = integrating the divided curves
        out["ause"], out["aurg"] = (out["ause"] / mse, out["aurg"] / mse) if mse > 0 else (math.nan, math.nan)
    return out


class SparsificationMetric(CumulativeIterationMetric):
    """Cumulative sparsification curves: ``metric(y_pred=uncertainty, y=sq_error[, mask=...])`` per batch.

    ``y_pred`` is the uncertainty (``log_var`` is fine: the ranking is what matters), ``y`` the squared residual
    ``(fixed - warped)^2``; both ``(B, 1, *spatial)``. Each image adds one row
    ``[curve (steps+1) | oracle (steps+1)]`` to the buffer. ``aggregate()`` returns the reduced curves
    ``(fractions, curve, oracle)`` (``reduction="mean"``: the mean curves over images, as plotted in the paper).
    """

    def __init__(self, steps: int = 50, normalize: bool = False, reduction: MetricReduction | str = "mean"):
        super().__init__()
        self.steps = int(steps)
        self.normalize = normalize
        self.reduction = reduction

    def _curves(self, y_pred: torch.Tensor, y: torch.Tensor, mask: Any = None) -> torch.Tensor:
        if y is None:
            raise ValueError("SparsificationMetric needs y (the squared error).")
        rows = []
        for b in range(y_pred.shape[0]):
            _, c, o = sparsification_curves(y_pred[b], y[b], self.steps, _as_mask(mask, y_pred.shape[0], b))
            if self.normalize:
                c, o = (c / c[0], o / c[0]) if c[0] > 0 else (c * np.nan, o * np.nan)
            rows.append(np.concatenate([c, o]))
        return torch.as_tensor(np.stack(rows), dtype=torch.float64)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return self._curves(y_pred, y, kwargs.get("mask"))

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f = _reduce_columns(data, reduction or self.reduction)
        n = self.steps + 1
        fractions = torch.tensor([t / self.steps for t in range(n)], dtype=torch.float64)
        return fractions, f[..., :n], f[..., n:]


class AUSEMetric(CumulativeIterationMetric):
    """Cumulative AUSE (or AURG): ``metric(y_pred=uncertainty, y=sq_error[, mask=...])`` per batch.

    Args:
        steps: sparsification steps (50 as in the authors' code).
        normalize: divide the curves by the full MSE of each image before integrating.
        output: ``"ause"`` (default, lower is better) or ``"aurg"`` (higher is better).
        reduction: MONAI reduction over the per-image values (``"mean"``).
    """

    def __init__(
        self,
        steps: int = 50,
        normalize: bool = False,
        output: str = "ause",
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ):
        super().__init__()
        if output not in ("ause", "aurg"):
            raise ValueError(f"output must be 'ause' or 'aurg', got {output!r}.")
        self.steps, self.normalize, self.output = int(steps), normalize, output
        self.reduction, self.get_not_nans = reduction, get_not_nans

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("AUSEMetric needs y (the squared error).")
        mask = kwargs.get("mask")
        vals = [
            ause(y_pred[b], y[b], self.steps, _as_mask(mask, y_pred.shape[0], b), self.normalize)[self.output]
            for b in range(y_pred.shape[0])
        ]
        return torch.tensor(vals, dtype=torch.float64).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


# ----------------------------------------------------------------------------------------------------------------
# Gaussian NLL and rank correlation
# ----------------------------------------------------------------------------------------------------------------
def gaussian_nll(log_var: torch.Tensor, residual: torch.Tensor, mask: Any = None) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood per image of ``residual = I_f - I_hat_f`` under ``N(0, sigma^2)``,
    ``0.5 (log sigma^2 + r^2 / sigma^2 + log 2 pi)`` (nats per pixel). Returns (B,) float64."""
    lv = torch.as_tensor(log_var).double()
    r2 = torch.as_tensor(residual).double().to(lv.device).pow(2)
    nll = 0.5 * (lv + r2 * torch.exp(-lv) + math.log(2 * math.pi))
    out = []
    for b in range(nll.shape[0]):
        v = nll[b].reshape(-1)
        if mask is not None:
            v = v[torch.as_tensor(_as_mask(mask, nll.shape[0], b)).reshape(-1).to(v.device) > 0]
        out.append(v.mean().item() if v.numel() else math.nan)
    return torch.tensor(out, dtype=torch.float64)


class GaussianNLLMetric(CumulativeIterationMetric):
    """Cumulative Gaussian NLL: ``metric(y_pred=log_var, y=residual)``."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__()
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        return gaussian_nll(y_pred, y, kwargs.get("mask")).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        return do_metric_reduction(self.get_buffer(), reduction or self.reduction)[0]


def _spearmanr(x: np.ndarray, y: np.ndarray) -> float:
    """``scipy.stats.spearmanr`` of two flat arrays (average ranks for ties); NaN when either is constant."""
    from scipy.stats import spearmanr

    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


def spearman_corr(a: Any, b: Any, mask: Any = None) -> torch.Tensor:
    """Spearman rank correlation per image between ``a`` and ``b`` (e.g. sigma_hat and the phantom's true noise
    std), ``(B, 1, *spatial)`` each; ties get average ranks. NaN where either is constant. Returns (B,) float64."""
    A, Bv = _np(a), _np(b)
    out = []
    for i in range(A.shape[0]):
        x, y = A[i].ravel(), Bv[i].ravel()
        if mask is not None:
            m = _np(_as_mask(mask, A.shape[0], i)).ravel() > 0
            x, y = x[m], y[m]
        out.append(_spearmanr(x, y))
    return torch.tensor(out, dtype=torch.float64)


class SpearmanMetric(CumulativeIterationMetric):
    """Cumulative Spearman rank correlation per image (:func:`spearman_corr`): ``metric(y_pred=a, y=b[, mask=...])``,
    e.g. σ̂ against the phantom's true noise std; ``aggregate()`` reduces the per-image values (MONAI ``reduction``)."""

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN):
        super().__init__()
        self.reduction = reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError("SpearmanMetric needs y (the reference map).")
        return spearman_corr(y_pred, y, kwargs.get("mask")).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        return do_metric_reduction(self.get_buffer(), reduction or self.reduction)[0]
