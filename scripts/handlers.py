"""Ignite handlers of the evaluation.

- :class:`AUSEHandler`, :class:`JacobianFoldingHandler`, :class:`EndPointErrorHandler`: ``IgniteMetricHandler``
  subclasses usable as ``key_val_metric`` / ``additional_metrics`` of any evaluator whose ``engine.state.output``
  follows docs/CONTRACTS.md (dict with ``log_var``, ``warped``, ``fixed``, ``ddf`` ...).
- :class:`RegistrationResultsWriter`: per-case metrics of the registration AND of the identity baseline
  (moving label vs fixed label) -> ``metrics.csv``; at the end ``summary.json``, ``summary.md``,
  ``sparsification.png`` and qualitative panels (``panels/<id>.png``).
- :func:`load_weights`: load a checkpoint written by CheckpointSaver with a clear error when it is missing.
- :class:`PrecomputedDDF`: a "network" that returns DDFs read from a folder (classical baselines), fed by the
  evaluator's batch ids.
- :class:`VarianceCalibrationHandler`: calibration of σ̂² (against the residual, and the phantom's
  ``residual_std``) as a validation metric; :class:`VarianceLevelInit`: the data-driven initialisation of the
  variance network's output level before training (docs/uncertainty.md).

Definitions of the metrics: docs/evaluation.md.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.utils import min_version, optional_import

from scripts import metrics as M
from scripts.data import FAILED_KEY
from scripts.trainer import load_weights  # noqa: F401  (re-exported: evaluate.yaml's loader)

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

logger = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"  # per-case table read by `python -m bundle compare`
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
SPARSIFICATION_PNG = "sparsification.png"
RELIABILITY_PNG = "reliability.png"
RELIABILITY_NPZ = "reliability.npz"
PANEL_DIR = "panels"
IDENTITY_PREFIX = "identity_"
GT_DDF_KEYS = ("ddf_gt", "ddf")  # where the ground-truth DDF is looked for in the batch (evaluate.yaml: ddf_gt)

__all__ = [
    "CSV_NAME",
    "AUSEHandler",
    "JacobianFoldingHandler",
    "EndPointErrorHandler",
    "RegistrationResultsWriter",
    "PrecomputedDDF",
    "VarianceCalibrationHandler",
    "VarianceLevelInit",
    "load_weights",
    "squared_residual",
    "summarize",
]


# ------------------------------------------------------------------------------------------------------ helpers
def _get(output: Any, key: str) -> Any:
    """``output[key]`` for the batched dict of the contract, or stacked from a list of per-item dicts."""
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        vals = [o.get(key) for o in output]
        if any(v is None for v in vals):
            return None
        if isinstance(vals[0], torch.Tensor):
            return torch.stack([torch.as_tensor(v) for v in vals])
        return vals
    return None


def _plain(x: Any) -> Any:
    return x.as_tensor() if hasattr(x, "as_tensor") else x


def squared_residual(output: Any) -> torch.Tensor:
    """``(I_f - I_hat_f)^2`` from an engine output."""
    return (_plain(_get(output, "fixed")).float() - _plain(_get(output, "warped")).float()) ** 2


def _ause_transform(output: Any):
    return _get(output, "log_var"), squared_residual(output)


class _SkipNoneMixin:
    """Skip updates whose ``y_pred`` is None (e.g. no variance network) and give NaN when nothing was seen."""

    def update(self, output):  # type: ignore[override]
        if output[0] is None:
            return
        super().update(output)

    def compute(self):  # type: ignore[override]
        if len(self.metric_fn) == 0:  # nothing seen (no variance network / no ground truth)
            return float("nan")
        return super().compute()


class AUSEHandler(_SkipNoneMixin, IgniteMetricHandler):
    """Mean AUSE (or AURG) of sigma_hat^2 against the squared residual, one value per image, averaged.

    Usable in train.yaml as ``validate#additional_metrics: {val_ause: {_target_: scripts.handlers.AUSEHandler}}``;
    the default ``output_transform`` takes ``log_var``, ``warped`` and ``fixed`` from ``engine.state.output``.
    Gives NaN when the model has no variance network (``log_var`` is None).
    """

    def __init__(
        self,
        steps: int = 50,
        normalize: bool = False,
        output: str = "ause",
        output_transform: Callable = _ause_transform,
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            metric_fn=M.AUSEMetric(steps=steps, normalize=normalize, output=output, reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


class JacobianFoldingHandler(_SkipNoneMixin, IgniteMetricHandler):
    """Fraction of voxels with det J <= 0 (``output="fold_frac"``) or std of log|J| (``"std_log_jac"``) of the
    predicted DDF (``engine.state.output["ddf"]``), averaged over images."""

    def __init__(
        self,
        output: str = "fold_frac",
        output_transform: Callable = lambda o: (_get(o, "ddf"), None),
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(
            metric_fn=M.JacobianMetric(output=output, reduction=reduction),
            output_transform=output_transform,
            save_details=save_details,
        )


def _gt_ddf(output: Any, batch: Any, pred: torch.Tensor | None) -> torch.Tensor | None:
    """The ground-truth DDF: ``output['ddf_gt']``, else ``batch['ddf_gt']``, else ``batch['ddf']`` when it is not
    the prediction itself."""
    gt, source = _get(output, "ddf_gt"), "ddf_gt"
    if gt is None and isinstance(batch, Mapping):
        for k in GT_DDF_KEYS:
            if batch.get(k) is not None:
                gt, source = batch[k], k
                break
    if gt is None:
        return None
    gt = _plain(gt)
    if pred is not None:
        gt = gt.to(pred.device)
        same = gt is pred or (gt.shape == pred.shape and torch.equal(gt.float(), pred.float()))
        if source == "ddf" and same:
            warnings.warn(
                "the engine output's 'ddf' equals the batch's ground-truth 'ddf': the prediction was overwritten "
                "by the batch (rename the ground truth to 'ddf_gt', as configs/evaluate.yaml does); EPE skipped."
            )
            return None
    return gt


class EndPointErrorHandler(_SkipNoneMixin, IgniteMetricHandler):
    """Mean end-point error of ``engine.state.output['ddf']`` against the ground truth (``ddf_gt`` of the output
    or of ``engine.state.batch``, else the batch's ``ddf``), in voxels, or mm with ``spacing``; ``region="heart"``
    averages inside ``fixed_label > 0`` only. NaN when there is no ground truth (real data)."""

    def __init__(
        self,
        region: str = "all",
        spacing: Sequence[float] | None = None,
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        if region not in ("all", "heart"):
            raise ValueError(f"region must be 'all' or 'heart', got {region!r}.")
        self.region = region
        super().__init__(
            metric_fn=M.EndPointErrorMetric(spacing=spacing, reduction=reduction), save_details=save_details
        )

    def iteration_completed(self, engine) -> None:  # type: ignore[override]
        out = engine.state.output
        pred = _get(out, "ddf")
        if pred is None:
            return
        pred = _plain(pred)
        gt = _gt_ddf(out, getattr(engine.state, "batch", None), pred)
        if gt is None:
            return
        mask = None
        if self.region == "heart":
            fl = _get(out, "fixed_label")
            if fl is None:
                return
            mask = _plain(fl) > 0
        self.metric_fn(pred, gt, mask=mask)


class PrecomputedDDF(torch.nn.Module):
    """Stands in for the displacement network when evaluating DDFs computed elsewhere (classical baselines).

    ``ddf_dir`` holds one file per case named ``<id>_ddf.nii.gz`` (as ``scripts.classical.register_datalist``
    writes them) or ``<id>.nii.gz`` (or ``.nii``, ``.npy``), channel-last
    ``spatial + (ndim,)`` in voxels (the file convention of docs/CONTRACTS.md), on the network grid. ``attach``
    it to the evaluator: at each ITERATION_STARTED it reads the DDFs of the batch's ``id`` s; ``forward`` returns
    them (its input is only used for the device and the shape check).
    """

    def __init__(self, ddf_dir: str | os.PathLike) -> None:
        super().__init__()
        self.ddf_dir = Path(ddf_dir)
        if not self.ddf_dir.is_dir():
            raise FileNotFoundError(f"ddf_dir {self.ddf_dir} does not exist.")
        self._current: torch.Tensor | None = None
        self.register_buffer("_dummy", torch.zeros(()), persistent=False)

    def _file(self, case_id: str) -> Path:
        for stem in (f"{case_id}_ddf", case_id):
            for ext in (".nii.gz", ".nii", ".npy"):
                p = self.ddf_dir / f"{stem}{ext}"
                if p.is_file():
                    return p
        raise FileNotFoundError(
            f"no precomputed DDF for case '{case_id}' in {self.ddf_dir} (<id>_ddf.nii.gz or <id>.nii.gz/.nii/.npy)."
        )

    def load(self, case_id: str) -> torch.Tensor:
        p = self._file(case_id)
        if p.suffix == ".npy":
            a = np.load(p)
        else:
            from monai.transforms import LoadImage

            a = np.asarray(LoadImage(image_only=True)(str(p)))
        a = torch.as_tensor(np.asarray(a, dtype=np.float32))
        return torch.movedim(a, -1, 0)

    def set_ids(self, ids: Sequence[str]) -> None:
        self._current = torch.stack([self.load(str(i)) for i in ids])

    def attach(self, engine) -> None:
        def _started(e):
            if isinstance(e.state.batch, Mapping) and "moving" not in e.state.batch and FAILED_KEY in e.state.batch:
                return  # only pairs that failed to load: nothing to read
            ids = e.state.batch.get("id") if isinstance(e.state.batch, Mapping) else None
            if ids is None:
                raise KeyError("PrecomputedDDF needs the batch's 'id' (the datalist items' case names).")
            self.set_ids([ids] if isinstance(ids, str) else list(ids))

        engine.add_event_handler(Events.ITERATION_STARTED, _started)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._current is None:
            raise RuntimeError("PrecomputedDDF: no DDFs loaded (attach it to the evaluator).")
        ddf = self._current.to(x.device)
        if ddf.shape[0] != x.shape[0] or tuple(ddf.shape[2:]) != tuple(x.shape[2:]) or ddf.shape[1] != x.ndim - 2:
            raise ValueError(
                f"precomputed DDF shape {tuple(ddf.shape)} does not match the images {tuple(x.shape)} "
                "(needs (B, ndim, *spatial) on the network grid)."
            )
        return ddf


# ------------------------------------------------------------------------------------------------ results writer
def _ids(output: Any, batch: Any, n: int, start: int) -> list[str]:
    ids = None
    meta = _get(output, "meta")
    if isinstance(meta, Mapping):
        ids = meta.get("id")
    if ids is None and isinstance(batch, Mapping):
        ids = batch.get("id")
    if ids is None:
        return [f"case{start + i:04d}" for i in range(n)]
    ids = [ids] if isinstance(ids, str) else list(ids)
    return [str(i) for i in ids]


def _per_case(x: Any, n: int, nd: int) -> np.ndarray | None:
    """A collated per-case vector (list of (B,) tensors, (B, nd) tensor/array, or one (nd,) vector) -> (n, nd)."""
    if x is None:
        return None
    try:
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor) and x[0].ndim == 1 and len(x) == nd:
            a = torch.stack([t.double().cpu() for t in x], dim=1).numpy()
        else:
            a = np.asarray(torch.as_tensor(x).double().cpu().numpy() if isinstance(x, torch.Tensor) else x, float)
    except (TypeError, ValueError):
        return None
    if a.size == n * nd:
        return a.reshape(n, nd)
    if a.size == nd:
        return np.broadcast_to(a.reshape(1, nd), (n, nd))
    return None


def _spacings(output: Any, batch: Any, n: int, spatial: Sequence[int]) -> list[list[float] | None]:
    """Per-case voxel spacing (mm) on the network grid: the datalist's ``spacing`` scaled by the resize factor
    (original ``spatial_shape`` of the image meta data / network size), else the pixdim of the (resized) image's
    affine, else None (mm metrics are then not reported)."""
    nd = len(spatial)
    meta = _get(output, "meta")
    sp = meta.get("spacing") if isinstance(meta, Mapping) else None
    if sp is None and isinstance(batch, Mapping):
        sp = batch.get("spacing")
    fixed = batch.get("fixed") if isinstance(batch, Mapping) else None
    fmeta = getattr(fixed, "meta", None) or {}
    arr = _per_case(sp, n, nd)
    if arr is not None:
        orig = _per_case(fmeta.get("spatial_shape"), n, nd)
        if orig is not None:
            arr = arr * orig / np.asarray(spatial, dtype=np.float64)
        return [[float(v) for v in arr[b]] for b in range(n)]
    pd = _per_case(getattr(fixed, "pixdim", None), n, nd)
    if pd is not None:
        return [[float(v) for v in pd[b]] for b in range(n)]
    return [None] * n


def _isnum(v: Any) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """mean, std (population, ddof=0), median over the finite values, n (finite values) and n_failed (NaN/inf
    values) of every numeric column."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if _isnum(v) and k not in keys and k not in ("n_failed",)]
    out = {}
    for k in keys:
        vals = np.array([float(r[k]) if _isnum(r.get(k)) else np.nan for r in rows], dtype=np.float64)
        ok = vals[np.isfinite(vals)]
        out[k] = {
            "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan,
            "median": float(np.median(ok)) if ok.size else math.nan,
            "n": int(ok.size),
            "n_failed": int(vals.size - ok.size),
        }
    return out


class RegistrationResultsWriter:
    """Per-case evaluation of registration and identity baseline, written under ``output_dir``.

    At every ITERATION_COMPLETED, for each case of the batch (``engine.state.output`` of docs/CONTRACTS.md):

    - contour metrics on the myocardium (``label``): dice, hd, hd95, asd, asd_rev, assd (px, and ``*_mm`` when the
      spacing is known) for the warped label, and the same prefixed ``identity_`` for the moving label;
    - image MSE of the registration (``mse``) and of the identity (``identity_mse``);
    - Jacobian of the DDF: ``fold_frac`` (det <= 0), ``std_log_jac``;
    - with a ground-truth DDF (phantom): ``epe``, ``epe_heart`` (inside fixed_label > 0), ``*_mm``, and the
      identity's ``identity_epe``, ``identity_epe_heart``;
    - with log sigma^2: ``ause``, ``aurg`` (unnormalised, reported), ``ause_norm``, ``aurg_norm``, ``nll``,
      ``var_ratio_residual`` (mean sigma^2 / mean squared residual); with the true noise std (phantom)
      ``spearman_noise`` (sigma_hat vs true std); with the phantom's ``residual_std`` the calibration columns
      ``var_ratio_residual_std``, ``spearman_residual_std``, ``nll_residual_std``, ``ause_residual_std``
      (:func:`scripts.metrics.variance_calibration`);
    - ``n_failed`` and ``failed`` (names of the metrics that could not be computed; their value is NaN).

    Rows are (re)written to ``metrics.csv`` after each iteration. At COMPLETED: ``summary.json`` (mean, std,
    median, n, n_failed per metric; ``calibration``: the pooled ratios of the reliability diagram), ``summary.md``,
    ``sparsification.png`` (+ ``.npz``: mean curves of sigma^2, of the true residual_std when known, and the error
    oracle), ``reliability.png`` (+ ``.npz``, :class:`scripts.metrics.ReliabilityDiagram`) and ``panels/<id>.png``
    for ``panel_ids`` (or the first ``n_panels`` cases).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        label: int = M.MYOCARDIUM,
        spacing: Sequence[float] | None = None,
        steps: int = 50,
        n_panels: int = 4,
        panel_ids: Sequence[str] | None = None,
        name: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label = int(label)
        self.spacing = None if spacing is None else [float(s) for s in spacing]
        self.steps = int(steps)
        self.n_panels = int(n_panels)
        self.panel_ids = None if panel_ids is None else [str(i) for i in panel_ids]
        self.name = name or self.output_dir.name
        self.reset()

    def reset(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.curves: list[np.ndarray] = []
        self.oracles: list[np.ndarray] = []
        self.curves_std: list[np.ndarray] = []
        self.reliability = M.ReliabilityDiagram()
        self.panels_written: list[str] = []

    # ------------------------------------------------------------------------------------------------- ignite
    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine) -> None:
        self.iteration_completed(engine)

    def iteration_completed(self, engine) -> None:
        self.process(engine.state.output, getattr(engine.state, "batch", None))
        self.write_csv()

    def completed(self, engine=None) -> dict:
        return self.finalize()

    # ------------------------------------------------------------------------------------------------ compute
    def process(self, output: Mapping[str, Any], batch: Mapping[str, Any] | None = None) -> list[dict]:
        """Compute and store the rows of one batch; returns them. Pairs that failed to load (``failed_items``,
        scripts.data.TolerantDataset) get a row ``status: failed`` with the error; the others ``status: done``."""
        failed_rows = [{"id": str(i), "status": "failed", "error": str(m)} for i, m in (_get(output, FAILED_KEY) or [])]
        self.rows += failed_rows
        if _get(output, "fixed") is None:
            return failed_rows
        t = {
            k: (_plain(_get(output, k)) if isinstance(_get(output, k), torch.Tensor) else _get(output, k))
            for k in (
                "moving",
                "fixed",
                "warped",
                "ddf",
                "log_var",
                "weight",
                "moving_label",
                "fixed_label",
                "warped_label",
                "noise_std",
                "residual_std",
            )
        }
        fixed, warped, moving = t["fixed"].float(), t["warped"].float(), t["moving"].float()
        ddf = t["ddf"].float() if t["ddf"] is not None else None
        n, spatial = fixed.shape[0], tuple(fixed.shape[2:])
        ids = _ids(output, batch, n, len(self.rows))
        spacings = [self.spacing] * n if self.spacing is not None else _spacings(output, batch, n, spatial)
        gt = _gt_ddf(output, batch, ddf)
        gt = gt.float() if gt is not None else None
        heart = (t["fixed_label"] > 0) if t["fixed_label"] is not None else None
        sq = (fixed - warped) ** 2
        jac = M.jacobian_stats(ddf) if ddf is not None else None
        rows = []
        for b in range(n):
            sp = spacings[b]
            row: dict[str, Any] = {"id": ids[b] if b < len(ids) else f"case{len(self.rows) + b:04d}", "status": "done"}
            failed: list[str] = []
            row["spacing"] = "" if sp is None else " ".join(f"{v:g}" for v in sp)
            if t["fixed_label"] is not None:
                for prefix, pred in (("", t["warped_label"]), (IDENTITY_PREFIX, t["moving_label"])):
                    if pred is None:
                        continue
                    r = M.myocardium_metrics(pred[b], t["fixed_label"][b], spacing=sp, label=self.label)
                    for k, v in r.items():
                        if k not in ("failed", "n_failed"):
                            row[prefix + k] = v
                    failed += [prefix + k for k in r["failed"]]
            row["mse"] = float(sq[b].mean())
            row[IDENTITY_PREFIX + "mse"] = float(((fixed[b] - moving[b]) ** 2).mean())
            if jac is not None:
                row["fold_frac"] = float(jac["fold_frac"][b])
                row["std_log_jac"] = float(jac["std_log_jac"][b])
            if gt is not None and ddf is not None:
                for prefix, pred in (("", ddf[b : b + 1]), (IDENTITY_PREFIX, torch.zeros_like(ddf[b : b + 1]))):
                    g = gt[b : b + 1]
                    m = heart[b : b + 1] if heart is not None else None
                    row[prefix + "epe"] = float(M.end_point_error(pred, g)[0])
                    if m is not None:
                        row[prefix + "epe_heart"] = float(M.end_point_error(pred, g, mask=m)[0])
                    if sp is not None:
                        row[prefix + "epe_mm"] = float(M.end_point_error(pred, g, spacing=sp)[0])
                        if m is not None:
                            row[prefix + "epe_heart_mm"] = float(M.end_point_error(pred, g, m, sp)[0])
            if t["log_var"] is not None:
                lv = t["log_var"][b].float()
                x, c, o = M.sparsification_curves(lv, sq[b], self.steps)
                self.curves.append(c)
                self.oracles.append(o)
                a_curve, a_oracle = float(np.trapezoid(c, x)), float(np.trapezoid(o, x))
                mse = float(c[0])
                row["ause"] = a_curve - a_oracle
                row["aurg"] = mse - a_curve
                row["ause_norm"] = row["ause"] / mse if mse > 0 else math.nan
                row["aurg_norm"] = row["aurg"] / mse if mse > 0 else math.nan
                row["nll"] = float(M.gaussian_nll(lv[None], (fixed[b] - warped[b])[None])[0])
                if t["noise_std"] is not None:
                    row["spearman_noise"] = float(M.spearman_corr((0.5 * lv)[None], t["noise_std"][b : b + 1])[0])
                rs = t["residual_std"][b].float() if t["residual_std"] is not None else None
                cal = M.variance_calibration(lv[None], (fixed[b] - warped[b])[None], None if rs is None else rs[None])
                row["var_ratio_residual"] = float(cal["var_ratio_residual"][0])
                if rs is not None:
                    for k in M.CALIBRATION_KEYS[1:]:
                        row[k] = float(cal[k][0])
                    self.curves_std.append(M.sparsification_curves(rs, sq[b], self.steps)[1])
                self.reliability.update(lv, sq[b], None if rs is None else rs**2)
            for k, v in row.items():
                if _isnum(v) and not math.isfinite(float(v)) and k not in failed:
                    failed.append(k)
            row["n_failed"] = len(failed)
            row["failed"] = ";".join(failed)
            rows.append(row)
            if self._want_panel(row["id"]):
                self._panel({k: (v[b] if isinstance(v, torch.Tensor) else None) for k, v in t.items()}, row)
        self.rows += rows
        return failed_rows + rows

    def _want_panel(self, case_id: str) -> bool:
        if self.panel_ids is not None:
            return case_id in self.panel_ids
        return len(self.panels_written) < self.n_panels

    def _panel(self, case: Mapping[str, Any], row: Mapping[str, Any]) -> None:
        from scripts.plots import plot_panel

        d = self.output_dir / PANEL_DIR
        d.mkdir(parents=True, exist_ok=True)
        title = f"{row['id']}"
        if "dice" in row:
            title += f"  Dice {row['dice']:.3f} (identity {row.get(IDENTITY_PREFIX + 'dice', math.nan):.3f})"
        path = d / f"{_safe(row['id'])}.png"
        plot_panel(case, path, title=title, label=self.label)
        self.panels_written.append(str(path))

    # ------------------------------------------------------------------------------------------------- output
    def columns(self) -> list[str]:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        # failure bookkeeping last
        tail = ("n_failed", "failed", "status", "error")
        return [c for c in cols if c not in tail] + [c for c in tail if c in cols or c in ("n_failed", "failed")]

    def write_csv(self) -> Path:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / CSV_NAME
        cols = self.columns()
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="nan")
            w.writeheader()
            for r in self.rows:
                w.writerow({k: (_fmt(v) if _isnum(v) else v) for k, v in r.items()})
        os.replace(tmp, path)
        return path

    def finalize(self) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.write_csv()
        done = [r for r in self.rows if r.get("status") != "failed"]
        failed = [r for r in self.rows if r.get("status") == "failed"]
        summary = summarize(done)
        rel = self.reliability.result() if self.curves else None
        calibration = {k: rel[k] for k in ("pooled_var_ratio_residual", "pooled_var_ratio_residual_std")} if rel else {}
        with open(self.output_dir / SUMMARY_JSON, "w") as f:
            json.dump(
                {
                    "n_cases": len(done),
                    "failed_pairs": {r["id"]: r["error"] for r in failed},
                    "metrics": summary,
                    "calibration": calibration,
                },
                f,
                indent=2,
                allow_nan=True,
            )
        md = summary_markdown(summary, len(done), self.name)
        if failed:
            md += f"\n**{len(failed)} pair(s) failed** and are not in the statistics (metrics.csv, column error):\n"
            md += "".join(f"- {r['id']}: {r['error']}\n" for r in failed)
        if calibration:
            md += (
                f"\nPooled over all pixels: mean sigma^2 / mean squared residual = "
                f"{calibration['pooled_var_ratio_residual']:.4g}, / mean residual_std^2 = "
                f"{calibration['pooled_var_ratio_residual_std']:.4g} (reliability diagram: {RELIABILITY_PNG}).\n"
            )
        (self.output_dir / SUMMARY_MD).write_text(md)
        if self.curves:
            from scripts.plots import plot_reliability, plot_sparsification

            x = np.array([t / self.steps for t in range(self.steps + 1)])
            c, o = np.nanmean(np.stack(self.curves), 0), np.nanmean(np.stack(self.oracles), 0)
            curves, extra = {r"$\hat\sigma^2$": c}, {}
            title = f"Sparsification ({self.name}, n={len(self.curves)}, AUSE {summary['ause']['mean']:.2e}"
            if self.curves_std:  # the oracle estimator sigma = residual_std (phantom)
                extra["curve_residual_std"] = curves["true residual_std"] = np.nanmean(np.stack(self.curves_std), 0)
                title += f"; residual_std {summary['ause_residual_std']['mean']:.2e}"
            plot_sparsification(x, curves, o, self.output_dir / SPARSIFICATION_PNG, title=title + ")")
            np.savez(self.output_dir / "sparsification.npz", fractions=x, curve=c, oracle=o, **extra)
            np.savez(self.output_dir / RELIABILITY_NPZ, **{k: np.asarray(v) for k, v in rel.items()})
            plot_reliability(
                rel,
                self.output_dir / RELIABILITY_PNG,
                title=f"Reliability of $\\hat\\sigma^2$ ({self.name}); pooled mean ratio "
                f"{rel['pooled_var_ratio_residual']:.3g} (residual), {rel['pooled_var_ratio_residual_std']:.3g} "
                "(residual_std)",
            )
        logger.info("evaluation of %d cases written to %s", len(done), self.output_dir)
        if failed:
            raise EvaluationFailures(
                f"{len(failed)} of {len(self.rows)} pairs failed (the other {len(done)} are evaluated in "
                f"{self.output_dir / CSV_NAME} and {SUMMARY_MD}):\n"
                + "\n".join(f"  {r['id']}: {r['error']}" for r in failed)
            )
        return summary


class EvaluationFailures(RuntimeError):
    """Raised after the evaluation of every other pair is written, naming the pairs that could not be loaded."""


def _fmt(v: Any) -> str:
    f = float(v)
    return "nan" if math.isnan(f) else repr(f) if isinstance(v, float) else str(v)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


SUMMARY_ORDER = (
    "dice",
    "hd",
    "hd95",
    "asd",
    "asd_rev",
    "assd",
    "dice_mm",
    "hd_mm",
    "hd95_mm",
    "asd_mm",
    "asd_rev_mm",
    "assd_mm",
    "mse",
    "epe",
    "epe_heart",
    "epe_mm",
    "epe_heart_mm",
    "fold_frac",
    "std_log_jac",
    "ause",
    "aurg",
    "ause_norm",
    "aurg_norm",
    "nll",
    "spearman_noise",
    "var_ratio_residual",
    "var_ratio_residual_std",
    "spearman_residual_std",
    "nll_residual_std",
    "ause_residual_std",
)


def summary_markdown(summary: Mapping[str, Mapping[str, float]], n_cases: int, name: str = "") -> str:
    """Markdown table: one row per metric, registration vs identity (mean ± std, median, n, failed)."""
    lines = [
        f"# Evaluation {name}".rstrip(),
        "",
        f"{n_cases} cases; mean ± std (population) over the cases where "
        "the metric could be computed; 'failed' counts the others.",
        "",
        "| metric | registration | identity | median | n | failed |",
        "|---|---|---|---|---|---|",
    ]
    keys = [k for k in SUMMARY_ORDER if k in summary] + sorted(
        k for k in summary if k not in SUMMARY_ORDER and not k.startswith(IDENTITY_PREFIX)
    )
    for k in keys:
        s, i = summary[k], summary.get(IDENTITY_PREFIX + k)
        ident = f"{i['mean']:.4g} ± {i['std']:.3g}" if i else ""
        lines.append(
            f"| {k} | {s['mean']:.4g} ± {s['std']:.3g} | {ident} | {s['median']:.4g} | {s['n']} | " f"{s['n_failed']} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ variance calibration
def _calibration_transform(output: Any):
    lv = _get(output, "log_var")
    residual = _plain(_get(output, "fixed")).float() - _plain(_get(output, "warped")).float()
    rs = _get(output, "residual_std")
    return lv, residual, (_plain(rs) if rs is not None else None)


class VarianceCalibrationHandler(IgniteMetricHandler):
    """A calibration value of σ̂² (:func:`scripts.metrics.variance_calibration`) averaged over images, e.g.
    ``val_var_ratio: {_target_: scripts.handlers.VarianceCalibrationHandler, output: var_ratio_residual}`` in
    train.yaml's ``validate#additional_metrics``. NaN when the model has no variance network, and for the
    ``*_residual_std`` outputs when the data have no ``residual_std`` (real data, phantom version 1)."""

    def __init__(self, output: str = "var_ratio_residual", save_details: bool = True, reduction: str = "mean"):
        super().__init__(
            metric_fn=M.VarianceCalibrationMetric(output=output, reduction=reduction),
            output_transform=_calibration_transform,
            save_details=save_details,
        )
        self.output = output

    def update(self, output) -> None:  # type: ignore[override]
        lv, residual, rs = output
        if lv is None or (rs is None and self.output != "var_ratio_residual"):
            return
        self.metric_fn(lv, residual, residual_std=rs)

    def compute(self):  # type: ignore[override]
        if len(self.metric_fn) == 0:
            return float("nan")
        return super().compute()


# -------------------------------------------------------------------------------------- variance level init
class VarianceLevelInit:
    """Data-driven initialisation of the variance network's output level before training.

    On a fresh run it sets the level of h_φ so that the mean σ̂² over the first ``n_batches`` batches of the
    training set equals their mean squared residual (I_f − I_m∘z)², z from the current (initial) displacement
    network: the head's bias b (:func:`scripts.networks.level_bias`) becomes

    .. math:: b \\leftarrow b + \\log\\overline{(I_f - I_m\\circ z)^2} - \\log\\overline{\\hat\\sigma^2}

    (for :class:`scripts.networks.VarianceUNet` at its default initialisation, b ≈ log of the mean squared residual).
    Why: σ̂² should learn the residual's variance, ~0.02 on the phantom, while a fresh network starts at σ̂² ≈ 1; at
    Adam 1e-4 the level alone would take thousands of iterations to get there (docs/uncertainty.md).

    It consumes no random number: the items ``0 .. n_batches * batch_size - 1`` of ``dataset`` are read by index
    (never through a shuffling DataLoader), both networks run in eval mode under ``no_grad`` (the displacement
    network's sampling, if any, is off) and their modes are restored, so seeded runs stay reproducible.
    Each process of a multi-GPU run reads the same items and sets the same value.

    Attached to the trainer (train.yaml's ``train#handlers``), it runs at the first ITERATION_STARTED of a fresh
    run (``engine.state.iteration == 1``, i.e. no iteration done before); a resumed run keeps its checkpoint.
    Networks and warp are taken from the engine (``engine.network``, ``engine.variance_network``,
    ``engine.warp``) unless given; without a variance network (vanilla mode) it does nothing.

    Args:
        dataset: the training dataset (indexable, items with ``moving`` and ``fixed``).
        n_batches: number of batches to average over; 0 disables the handler.
        batch_size: items per batch (train.yaml: ``@batch_size``).
    """

    def __init__(
        self,
        dataset: Sequence,
        n_batches: int = 8,
        batch_size: int = 1,
        network: torch.nn.Module | None = None,
        variance_network: torch.nn.Module | None = None,
        warp: Callable | None = None,
    ) -> None:
        if int(n_batches) < 0 or int(batch_size) < 1:
            raise ValueError(
                f"VarianceLevelInit: need n_batches >= 0 and batch_size >= 1, got {n_batches}, {batch_size}."
            )
        self.dataset = dataset
        self.n_batches, self.batch_size = int(n_batches), int(batch_size)
        self.network, self.variance_network, self.warp = network, variance_network, warp
        self.mean_sq_residual: float | None = None  # measured value (after the handler ran)
        self.level: float | None = None  # log of it: the level set

    def attach(self, engine) -> None:
        if self.n_batches > 0:
            engine.add_event_handler(Events.ITERATION_STARTED(once=1), self)

    def __call__(self, engine) -> None:
        if engine.state.iteration != 1:
            return
        var_net = self.variance_network
        if var_net is None:
            var_net = getattr(engine, "variance_network", None)
        if var_net is None:
            return
        self.apply(
            self.network if self.network is not None else engine.network,
            var_net,
            self.warp if self.warp is not None else getattr(engine, "warp", None),
        )

    def apply(self, network: torch.nn.Module, variance_network: torch.nn.Module, warp: Callable | None = None) -> float:
        """Measure and set the level; returns the level set (log of the mean squared residual)."""
        from monai.networks.blocks import Warp

        from scripts.networks import level_bias

        net, var_net = getattr(network, "module", network), getattr(variance_network, "module", variance_network)
        warp = warp if warp is not None else Warp(mode="bilinear", padding_mode="border")
        bias = level_bias(var_net)
        device = bias.device
        n_items = min(len(self.dataset), self.n_batches * self.batch_size)
        if n_items == 0:
            raise ValueError("VarianceLevelInit: the training dataset is empty.")
        modes = (net.training, var_net.training)
        sum_sq = sum_var = 0.0
        count = 0
        try:
            net.eval()
            var_net.eval()
            with torch.no_grad():
                for start in range(0, n_items, self.batch_size):
                    items = [self.dataset[i] for i in range(start, min(start + self.batch_size, n_items))]
                    moving, fixed = (
                        torch.stack([_plain(torch.as_tensor(it[k])) for it in items]).float().to(device)
                        for k in ("moving", "fixed")
                    )
                    warped = warp(moving, net(torch.cat([moving, fixed], dim=1)))
                    log_var = var_net(torch.cat([warped, fixed], dim=1))
                    sum_sq += float(((fixed - warped) ** 2).sum())
                    sum_var += float(torch.exp(log_var.float().clamp(-15.0, 15.0)).sum())
                    count += fixed.numel()
        finally:
            net.train(modes[0])
            var_net.train(modes[1])
        msr, mean_var = sum_sq / count, sum_var / count
        if not msr > 0:
            logger.warning("VarianceLevelInit: the mean squared residual is %g; level left unchanged.", msr)
            return math.nan
        with torch.no_grad():
            bias.add_(math.log(msr) - math.log(mean_var))
        self.mean_sq_residual, self.level = msr, math.log(msr)
        logger.info(
            "variance level initialised from %d pairs: mean squared residual %.4g (log %.3f); mean sigma^2 was %.4g",
            n_items,
            msr,
            self.level,
            mean_var,
        )
        return self.level
