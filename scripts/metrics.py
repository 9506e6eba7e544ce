"""Evaluation metrics: uncertainty quality (sparsification / AUSE, NLL, rank correlation), deformation quality
(Jacobian determinant, folding, end-point error) and contour metrics on the myocardium.

Conventions (docs/CONTRACTS.md): tensors are batch-first and channel-first, ``(B, C, *spatial)``; a DDF ``z`` is in
voxel units with channel ``i`` = displacement along array axis ``i`` and maps ``phi(x) = x + z(x)``
(``I_hat_f(x) = I_m(x + z(x))`` as ``monai.networks.blocks.Warp`` applies it).

Plain functions work on one batch and return one value per image; the ``CumulativeIterationMetric`` subclasses
buffer those values across iterations and reduce them with ``aggregate()`` (MONAI ``reduction``: ``mean``,
``sum``, ``mean_batch``, ``none`` ...). NaN per-image values (e.g. an image without foreground) are excluded by the
``*_nans`` reductions of MONAI only when asked; the results writer counts them as failures instead.

Definitions are in docs/evaluation.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric, DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

__all__ = [
    "MYOCARDIUM",
    "sparsification_curves",
    "ause",
    "SparsificationMetric",
    "AUSEMetric",
    "jacobian_determinant",
    "jacobian_stats",
    "JacobianMetric",
    "end_point_error",
    "EndPointErrorMetric",
    "gaussian_nll",
    "GaussianNLLMetric",
    "spearman_corr",
    "myocardium_metrics",
    "SURFACE_KEYS",
]

MYOCARDIUM = 2  # label value of the LV myocardium (docs/CONTRACTS.md)
SURFACE_KEYS = ("dice", "hd", "hd95", "asd", "asd_rev", "assd")


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.trapezoid(y, x=x))


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
    if normalize:
        curve, oracle = (curve / mse, oracle / mse) if mse > 0 else (curve * np.nan, oracle * np.nan)
        mse_line = 1.0 if mse > 0 else np.nan
    else:
        mse_line = mse
    a_curve = _trapezoid(curve, x)
    return {"ause": a_curve - _trapezoid(oracle, x), "aurg": mse_line - a_curve, "mse": mse}


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


class EndPointErrorMetric(CumulativeIterationMetric):
    """Cumulative end-point error: ``metric(y_pred=ddf, y=gt_ddf[, mask=heart_mask])``.

    Args:
        spacing: mm per voxel (array-axis order) to report mm; ``None``: voxels.
        reduction: MONAI reduction over images.
    A ``mask`` keyword (e.g. ``fixed_label > 0``, the heart) restricts the mean to the mask.
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
        return end_point_error(y_pred, y, kwargs.get("mask"), kwargs.get("spacing", self.spacing)).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        f, not_nans = do_metric_reduction(self.get_buffer(), reduction or self.reduction)
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


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x)


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
        if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
            out.append(math.nan)
            continue
        rx, ry = _rank(x), _rank(y)
        out.append(float(np.corrcoef(rx, ry)[0, 1]))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Contour metrics on the myocardium
# ----------------------------------------------------------------------------------------------------------------
def _binary(label: Any, value: int | None) -> torch.Tensor:
    t = torch.as_tensor(label)
    t = t.round() == value if value is not None else t > 0
    return t.float()


def myocardium_metrics(
    warped_label: Any, fixed_label: Any, spacing: Sequence[float] | None = None, label: int | None = MYOCARDIUM
) -> dict[str, Any]:
    """Dice and surface distances between ``warped_label == label`` (prediction) and ``fixed_label == label``
    (reference) for ONE image, ``(1, *spatial)`` or ``(*spatial)`` integer labels (``label=None``: any foreground).

    Uses MONAI ``DiceMetric``, ``HausdorffDistanceMetric`` (max and percentile 95, symmetric as medpy ``hd`` /
    ``hd95``), ``SurfaceDistanceMetric(symmetric=False)`` (``asd``: prediction surface -> reference surface, medpy
    ``asd(pred, ref)``), the reverse one-sided distance (``asd_rev``: reference -> prediction, which is the argument
    order of the authors' evaluation script) and ``SurfaceDistanceMetric(symmetric=True)`` (``assd``: mean over the
    pooled distances of both directions). Distances are in pixels; with ``spacing`` the ``*_mm`` versions are added.

    A value that cannot be computed (empty reference: every metric; empty prediction: distances) is NaN, and the
    returned ``failed`` entry lists the names of the failed metrics (``n_failed`` counts them), so that callers
    count them rather than silently dropping them.
    """
    p = _binary(warped_label, label)
    g = _binary(fixed_label, label)
    if p.shape != g.shape:
        raise ValueError(f"label shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}.")
    if spacing is not None:
        nd = len(spacing)
    elif p.ndim == 3 and p.shape[0] == 1:
        nd = 2  # (1, H, W): a channel-first 2D label
    else:
        nd = p.ndim if p.ndim in (2, 3) else p.ndim - 1
    if nd not in (2, 3) or p.ndim not in (nd, nd + 1) or (p.ndim == nd + 1 and p.shape[0] != 1):
        raise ValueError(f"expected ONE 2D/3D label ((1,) + spatial or spatial), got shape {tuple(p.shape)}.")
    p, g = p.reshape(1, 1, *p.shape[-nd:]), g.reshape(1, 1, *g.shape[-nd:])
    res: dict[str, Any] = {}
    empty_ref, empty_pred = bool(g.sum() == 0), bool(p.sum() == 0)
    spacings = [("", None)] + ([("_mm", [float(s) for s in spacing])] if spacing is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res["dice"] = math.nan if empty_ref else float(DiceMetric(include_background=True)(p, g).item())
        for suffix, sp in spacings:
            kw = {"spacing": sp} if sp is not None else {}
            if empty_ref or empty_pred:
                for k in ("hd", "hd95", "asd", "asd_rev", "assd"):
                    res[k + suffix] = math.nan
                continue
            res["hd" + suffix] = HausdorffDistanceMetric(include_background=True)(p, g, **kw).item()
            res["hd95" + suffix] = HausdorffDistanceMetric(include_background=True, percentile=95)(p, g, **kw).item()
            res["asd" + suffix] = SurfaceDistanceMetric(include_background=True, symmetric=False)(p, g, **kw).item()
            res["asd_rev" + suffix] = SurfaceDistanceMetric(include_background=True, symmetric=False)(g, p, **kw).item()
            res["assd" + suffix] = SurfaceDistanceMetric(include_background=True, symmetric=True)(p, g, **kw).item()
    failed = [k for k, v in res.items() if not (isinstance(v, float) and math.isfinite(v))]
    for k in failed:
        res[k] = math.nan
    res["failed"] = failed
    res["n_failed"] = len(failed)
    return res


# ----------------------------------------------------------------------------------------------------------------
# Calibration of sigma_hat^2 against the residual and against the phantom's residual_std (docs/uncertainty.md)
# ----------------------------------------------------------------------------------------------------------------
__all__ += ["CALIBRATION_KEYS", "variance_calibration", "ReliabilityDiagram"]

CALIBRATION_KEYS = (
    "var_ratio_residual",
    "var_ratio_residual_std",
    "spearman_residual_std",
    "nll_residual_std",
    "ause_residual_std",
)


def _spearmanr(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    return float(spearmanr(x, y).statistic)


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
      on the actual squared residual, the bound to compare σ̂'s ``ause`` with.

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


__all__ += ["VarianceCalibrationMetric"]
