"""Contour metrics on the myocardium (Dice, Hausdorff, surface distances) with MONAI's metrics."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from monai.metrics import CumulativeIterationMetric, DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction

MYOCARDIUM = 2  # label value of the LV myocardium (docs/CONTRACTS.md)
SURFACE_KEYS = ("dice", "hd", "hd95", "asd", "asd_rev", "assd")


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
    p, g = _one_image(warped_label, fixed_label, spacing, label)
    keys = list(SURFACE_KEYS) + ([k + "_mm" for k in SURFACE_KEYS[1:]] if spacing is not None else [])
    res: dict[str, Any] = {k: contour_metric(p, g, k, spacing) for k in keys}
    failed = [k for k, v in res.items() if not math.isfinite(v)]
    res["failed"] = failed
    res["n_failed"] = len(failed)
    return res


def _one_image(warped_label: Any, fixed_label: Any, spacing: Sequence[float] | None, label: int | None):
    """The two binary masks of ONE image as ``(1, 1, *spatial)`` float tensors."""
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
    return p.reshape(1, 1, *p.shape[-nd:]), g.reshape(1, 1, *g.shape[-nd:])


def contour_metric(p: torch.Tensor, g: torch.Tensor, key: str, spacing: Sequence[float] | None = None) -> float:
    """One contour metric ``key`` (:data:`SURFACE_KEYS`, or ``<key>_mm`` with ``spacing``) of the binary masks
    ``p`` (prediction) and ``g`` (reference), ``(1, 1, *spatial)``; NaN when it cannot be computed (empty
    reference: every metric; empty prediction: the distances)."""
    name = key.removesuffix("_mm")
    if name not in SURFACE_KEYS or (key.endswith("_mm") and (spacing is None or name == "dice")):
        raise ValueError(f"unknown contour metric {key!r} (spacing {spacing}); available: {SURFACE_KEYS}, *_mm.")
    if bool(g.sum() == 0) or (name != "dice" and bool(p.sum() == 0)):
        return math.nan
    kw = {"spacing": [float(s) for s in spacing]} if key.endswith("_mm") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "dice":
            v = float(DiceMetric(include_background=True)(p, g).item())
        elif name in ("hd", "hd95"):
            pct = 95 if name == "hd95" else None
            v = HausdorffDistanceMetric(include_background=True, percentile=pct)(p, g, **kw)
        else:
            a, b = (g, p) if name == "asd_rev" else (p, g)
            v = SurfaceDistanceMetric(include_background=True, symmetric=name == "assd")(a, b, **kw)
    v = float(v.item()) if isinstance(v, torch.Tensor) else float(v)
    return v if math.isfinite(v) else math.nan


class ContourMetric(CumulativeIterationMetric):
    """Cumulative contour metric ``output`` (:func:`contour_metric`) of ``y_pred == label`` (prediction, e.g. the
    warped moving label) against ``y == label`` (reference, the fixed label): ``metric(y_pred, y[, spacing=...])``
    with integer label maps ``(B, 1, *spatial)``; ``spacing`` (one for all, or one per image, ``None`` allowed)
    for the ``*_mm`` outputs. One value per image, NaN where it cannot be computed; ``aggregate()`` reduces them (MONAI
    ``reduction``, NaNs excluded)."""

    def __init__(
        self, output: str = "dice", label: int | None = MYOCARDIUM, reduction: MetricReduction | str = "mean"
    ) -> None:
        super().__init__()
        if output.removesuffix("_mm") not in SURFACE_KEYS or output == "dice_mm":
            raise ValueError(f"output must be one of {SURFACE_KEYS} or their *_mm, got {output!r}.")
        self.output, self.label, self.reduction = output, label, reduction

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        spacing = kwargs.get("spacing")
        vals = []
        for b in range(y_pred.shape[0]):
            sp = spacing if spacing is None or isinstance(spacing[0], (int, float)) else spacing[b]
            p, g = _one_image(y_pred[b], y[b], sp, self.label)
            mm_unknown = sp is None and self.output.endswith("_mm")
            vals.append(math.nan if mm_unknown else contour_metric(p, g, self.output, sp))
        return torch.tensor(vals, dtype=torch.float64).reshape(-1, 1)

    def aggregate(self, reduction: MetricReduction | str | None = None):
        return do_metric_reduction(self.get_buffer(), reduction or self.reduction)[0]
