"""The metric handlers of the evaluation and of the validation: one ``IgniteMetricHandler`` per per-pair metric.

Each handler reads the engine output of docs/CONTRACTS.md (``log_var``, ``warped``, ``fixed``, ``ddf``, labels ...)
and the batch, buffers ONE row per evaluated pair (NaN where its inputs are missing, e.g. no variance network, no
ground-truth DDF, no spacing: such rows are marked unavailable) and, with ``save_details=True``, leaves the rows in
``engine.state.metric_details[name]`` and their availability in ``engine.state.metric_available[name]`` at the end
of the epoch (``monai.handlers.MetricsSaver`` and :class:`scripts.handlers.RegistrationResultsWriter` read them).
``engine.state.metrics[name]`` is the mean over the pairs with a finite value, NaN when no pair had the inputs.

:func:`evaluation_metrics` builds the set configs/evaluate.yaml attaches (the columns of ``metrics.csv``).
Definitions of the metrics: docs/evaluation.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import MSEMetric

from scripts import metrics as M
from scripts.handlers._output import _get, _gt_ddf, _plain, case_spacings, n_pairs, squared_residual

IDENTITY_PREFIX = "identity_"

__all__ = [
    "IDENTITY_PREFIX",
    "PairMetricHandler",
    "AUSEHandler",
    "SparsificationHandler",
    "JacobianFoldingHandler",
    "EndPointErrorHandler",
    "VarianceCalibrationHandler",
    "SigmaCalibrationHandler",
    "QualityScoreHandler",
    "fov_mask",
    "ContourHandler",
    "ImageMSEHandler",
    "GaussianNLLHandler",
    "SpearmanHandler",
    "evaluation_metrics",
]


def _residual(output: Any) -> torch.Tensor:
    return _plain(_get(output, "fixed")).float() - _plain(_get(output, "warped")).float()


def fov_mask(output: Any) -> torch.Tensor:
    """The field of view of a pair: ``residual_std > 0`` when the data have it (phantom version 2, as
    ``spearman_residual_std_fov``), else the pixels where I_f or Î_f is non-zero (:func:`scripts.metrics.image_fov`):
    an echo sector's zero background left out."""
    rs = _get(output, "residual_std")
    if rs is not None:
        return _plain(rs) > 0
    return M.image_fov(_plain(_get(output, "fixed")), _plain(_get(output, "warped")))


class PairMetricHandler(IgniteMetricHandler):
    """Base of the handlers below: ``metric_fn`` gets the keyword arguments :meth:`inputs` builds from
    ``engine.state.output`` and ``engine.state.batch``; a batch without the inputs adds NaN rows marked
    unavailable (so that the rows of every handler line up with the evaluated pairs)."""

    width = 1  # columns of one row of ``metric_fn``'s buffer

    def __init__(self, metric_fn, save_details: bool = True) -> None:
        self.available: list[bool] = []
        super().__init__(metric_fn=metric_fn, save_details=save_details)

    def inputs(self, output: Any, batch: Any) -> tuple[dict | None, list[bool] | None]:
        """``(kwargs of metric_fn or None when the batch lacks the inputs, per-pair availability or None: all)``."""
        raise NotImplementedError

    def reset(self) -> None:
        super().reset()
        self.available = []

    def iteration_completed(self, engine) -> None:  # type: ignore[override]
        out = engine.state.output
        n = n_pairs(out)
        if n == 0:  # only pairs that failed to load: no row (the writer records them)
            return
        kwargs, avail = self.inputs(out, getattr(engine.state, "batch", None))
        avail = [True] * n if avail is None else list(avail)
        if kwargs is None or not any(avail):
            self.metric_fn.extend(torch.full((n, self.width), math.nan, dtype=torch.float64))
            self.available += [False] * n
            return
        self.metric_fn(**kwargs)
        self.available += avail

    def _details(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer

    def _aggregate(self) -> Any:
        return self.metric_fn.aggregate()

    def compute(self) -> Any:
        if self.save_details:
            if self._engine is None or self._name is None:
                raise RuntimeError("please call the attach() function to connect expected engine first.")
            state = self._engine.state
            buffer = self.metric_fn.get_buffer() if len(self.metric_fn) else torch.zeros(0, self.width)
            state.metric_details[self._name] = self._details(buffer)
            if not hasattr(state, "metric_available"):
                state.metric_available = {}
            state.metric_available[self._name] = list(self.available)
        if not any(self.available):
            return math.nan
        result = self._aggregate()
        if isinstance(result, (tuple, list)):
            result = result[0]
        if isinstance(result, torch.Tensor):
            result = result.squeeze()
            result = result.item() if result.ndim == 0 else result
        return result


# ------------------------------------------------------------------------------------------------ uncertainty
class AUSEHandler(PairMetricHandler):
    """AUSE (or AURG) of σ̂² against the squared residual per pair (:class:`scripts.metrics.AUSEMetric`), e.g.
    ``validate#additional_metrics: {val_ause: {_target_: scripts.handlers.AUSEHandler}}`` in train.yaml; NaN when
    the model has no variance network (``log_var`` is None)."""

    def __init__(
        self,
        steps: int = 50,
        normalize: bool = False,
        output: str = "ause",
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__(M.AUSEMetric(steps, normalize, output, reduction=reduction), save_details)

    def inputs(self, output, batch):
        lv = _get(output, "log_var")
        return (None, None) if lv is None else ({"y_pred": lv, "y": squared_residual(output)}, None)


class SparsificationHandler(PairMetricHandler):
    """Sparsification curves per pair (:class:`scripts.metrics.SparsificationMetric`), rows ``[curve | oracle]``,
    of σ̂² (``estimator="log_var"``) or of the phantom's true ``residual_std`` (the oracle estimator); the writer
    plots their mean. ``engine.state.metrics``: the AUSE of the mean curves (= the mean AUSE)."""

    def __init__(self, steps: int = 50, estimator: str = "log_var", save_details: bool = True) -> None:
        if estimator not in ("log_var", "residual_std"):
            raise ValueError(f"estimator must be 'log_var' or 'residual_std', got {estimator!r}.")
        self.width, self.estimator = 2 * (int(steps) + 1), estimator
        super().__init__(M.SparsificationMetric(steps), save_details)

    def inputs(self, output, batch):
        lv, u = _get(output, "log_var"), _get(output, self.estimator)
        if lv is None or u is None:
            return None, None
        return {"y_pred": _plain(u).float(), "y": squared_residual(output)}, None

    def _aggregate(self):
        x, c, o = (t.numpy() for t in self.metric_fn.aggregate())
        return float(np.trapezoid(c, x) - np.trapezoid(o, x))


class GaussianNLLHandler(PairMetricHandler):
    """Gaussian NLL of the residual under N(0, σ̂²) per pair (:class:`scripts.metrics.GaussianNLLMetric`)."""

    def __init__(self, save_details: bool = True) -> None:
        super().__init__(M.GaussianNLLMetric(), save_details)

    def inputs(self, output, batch):
        lv = _get(output, "log_var")
        return (None, None) if lv is None else ({"y_pred": _plain(lv).float(), "y": _residual(output)}, None)


class SpearmanHandler(PairMetricHandler):
    """Spearman correlation of σ̂ with the phantom's true noise std ``reference`` per pair (``spearman_noise``);
    ``fov=True``: over the field of view only, the pixels where the reference is > 0 (``spearman_noise_fov``:
    outside an echo sector both σ̂ and the noise are minimal and would raise the all-pixel figure)."""

    def __init__(self, reference: str = "noise_std", save_details: bool = True, fov: bool = False) -> None:
        self.reference, self.fov = reference, bool(fov)
        super().__init__(M.SpearmanMetric(), save_details)

    def inputs(self, output, batch):
        lv, ref = _get(output, "log_var"), _get(output, self.reference)
        if lv is None or ref is None:
            return None, None
        ref = _plain(ref)
        kwargs = {"y_pred": 0.5 * _plain(lv).float(), "y": ref}
        return (dict(kwargs, mask=ref > 0) if self.fov else kwargs), None


class VarianceCalibrationHandler(PairMetricHandler):
    """A calibration value of σ̂² per pair (:func:`scripts.metrics.variance_calibration`), e.g.
    ``val_var_ratio: {_target_: scripts.handlers.VarianceCalibrationHandler, output: var_ratio_residual}`` in
    train.yaml's ``validate#additional_metrics``. NaN when the model has no variance network, and for the
    ``*_residual_std`` outputs when the data have no ``residual_std`` (real data, phantom version 1)."""

    def __init__(self, output: str = "var_ratio_residual", save_details: bool = True, reduction: str = "mean"):
        self.output = output
        super().__init__(M.VarianceCalibrationMetric(output=output, reduction=reduction), save_details)

    def inputs(self, output, batch):
        lv, rs = _get(output, "log_var"), _get(output, "residual_std")
        if lv is None or (rs is None and self.output != "var_ratio_residual"):
            return None, None
        return {"y_pred": lv, "y": _residual(output), "residual_std": None if rs is None else _plain(rs)}, None


class SigmaCalibrationHandler(PairMetricHandler):
    """A calibration measure of σ̂² per pair (:func:`scripts.metrics.sigma_calibration`: ``zms``, ``zve``, ``ence``,
    ``nll``, ``picp90``, ``picp95``, ``mpiw90``, ``mpiw95`` against the realised residual; ``*_ref`` against the
    phantom's residual_std², NaN without it); ``fov=True``: over :func:`fov_mask` only."""

    def __init__(self, output: str = "zms", fov: bool = False, n_bins: int = M.ENCE_BINS, save_details: bool = True):
        self.output, self.fov = output, bool(fov)
        super().__init__(M.SigmaCalibrationMetric(output, n_bins), save_details)

    def inputs(self, output, batch):
        lv, rs = _get(output, "log_var"), _get(output, "residual_std")
        if lv is None or (rs is None and self.output in M.REF_KEYS):
            return None, None
        kwargs = {"y_pred": _plain(lv).float(), "y": _residual(output)}
        if self.output in M.REF_KEYS:
            kwargs["target_var"] = _plain(rs).float() ** 2
        return (dict(kwargs, mask=fov_mask(output)) if self.fov else kwargs), None


class QualityScoreHandler(PairMetricHandler):
    """The per-pair quality score ``qc_score`` (``output`` = :data:`scripts.metrics.QC_DEFINITION`) or another
    candidate of :func:`scripts.metrics.quality_candidates`; needs only what inference has (no ground truth)."""

    def __init__(self, output: str = M.QC_DEFINITION, save_details: bool = True) -> None:
        self.output = output
        super().__init__(M.QualityScoreMetric(output), save_details)

    def inputs(self, output, batch):
        ddf = _get(output, "ddf")
        needs = {"ic": "ddf_backward", "var": "log_var", "zms": "log_var", "snr_res": "weight"}.get(self.output)
        if ddf is None or (needs is not None and _get(output, needs) is None):
            return None, None
        kwargs = {
            "y_pred": _plain(ddf).float(),
            "y": _plain(_get(output, "fixed")).float(),
            "warped": _plain(_get(output, "warped")).float(),
            "moving": _plain(_get(output, "moving")).float(),
        }
        for k in ("log_var", "weight", "ddf_backward"):
            if _get(output, k) is not None:
                kwargs[k] = _plain(_get(output, k)).float()
        return kwargs, None


# ------------------------------------------------------------------------------------------------ deformation
class JacobianFoldingHandler(PairMetricHandler):
    """Fraction of voxels with det J <= 0 (``output="fold_frac"``) or std of log|J| (``"std_log_jac"``) of the
    predicted DDF (``engine.state.output["ddf"]``) per pair."""

    width = 2

    def __init__(self, output: str = "fold_frac", save_details: bool = True, reduction: str = "mean") -> None:
        super().__init__(M.JacobianMetric(output=output, reduction=reduction), save_details)
        self._column = M.JacobianMetric.OUTPUTS.index(output)

    def inputs(self, output, batch):
        ddf = _get(output, "ddf")
        return (None, None) if ddf is None else ({"y_pred": _plain(ddf).float()}, None)

    def _details(self, buffer):
        return buffer[:, self._column : self._column + 1]


class EndPointErrorHandler(PairMetricHandler):
    """End-point error of ``engine.state.output['ddf']`` (``identity=True``: of the zero displacement) against the
    ground truth (``ddf_gt`` of the output or of ``engine.state.batch``, else the batch's ``ddf``) per pair, in
    voxels; in mm with ``spacing`` (one for all pairs) or ``mm=True`` (each pair's spacing from the data);
    ``region="heart"`` averages inside ``fixed_label > 0`` only. NaN when there is no ground truth (real data)."""

    def __init__(
        self,
        region: str = "all",
        spacing: Sequence[float] | None = None,
        mm: bool = False,
        identity: bool = False,
        save_details: bool = True,
        reduction: str = "mean",
    ) -> None:
        if region not in ("all", "heart"):
            raise ValueError(f"region must be 'all' or 'heart', got {region!r}.")
        self.region, self.spacing, self.mm, self.identity = region, spacing, bool(mm) or spacing is not None, identity
        super().__init__(M.EndPointErrorMetric(reduction=reduction), save_details)

    def inputs(self, output, batch):
        pred = _get(output, "ddf")
        if pred is None:
            return None, None
        pred = _plain(pred).float()
        gt = _gt_ddf(output, batch, pred)
        if gt is None:
            return None, None
        kwargs = {"y_pred": torch.zeros_like(pred) if self.identity else pred, "y": gt.float()}
        if self.region == "heart":
            fl = _get(output, "fixed_label")
            if fl is None:
                return None, None
            kwargs["mask"] = _plain(fl) > 0
        if not self.mm:
            return kwargs, None
        kwargs["spacing"] = case_spacings(output, batch, self.spacing)
        return kwargs, [s is not None for s in kwargs["spacing"]]


# ------------------------------------------------------------------------------------------- images, contours
class ImageMSEHandler(PairMetricHandler):
    """``mean (I_f - I_hat_f)^2`` per pair (``monai.metrics.MSEMetric``); ``identity=True``: ``(I_f - I_m)^2``."""

    def __init__(self, identity: bool = False, save_details: bool = True) -> None:
        self.identity = identity
        super().__init__(MSEMetric(), save_details)

    def inputs(self, output, batch):
        pred = _get(output, "moving" if self.identity else "warped")
        return {"y_pred": _plain(pred).float(), "y": _plain(_get(output, "fixed")).float()}, None


class ContourHandler(PairMetricHandler):
    """A contour metric on the structure ``label`` (:class:`scripts.metrics.ContourMetric`: ``dice``, ``hd``,
    ``hd95``, ``asd``, ``asd_rev``, ``assd``, or ``*_mm`` with each pair's spacing, or ``spacing`` for all) of the
    warped moving label (``identity=True``: the moving label itself) against the fixed label, per pair."""

    def __init__(
        self,
        output: str = "dice",
        identity: bool = False,
        label: int = M.MYOCARDIUM,
        spacing: Sequence[float] | None = None,
        save_details: bool = True,
    ) -> None:
        self.output, self.identity, self.spacing = output, identity, spacing
        super().__init__(M.ContourMetric(output, label=label), save_details)

    def inputs(self, output, batch):
        pred = _get(output, "moving_label" if self.identity else "warped_label")
        ref = _get(output, "fixed_label")
        if pred is None or ref is None:
            return None, None
        kwargs = {"y_pred": _plain(pred), "y": _plain(ref)}
        if not self.output.endswith("_mm"):
            return kwargs, None
        kwargs["spacing"] = case_spacings(output, batch, self.spacing)
        return kwargs, [s is not None for s in kwargs["spacing"]]


def evaluation_metrics(
    label: int = M.MYOCARDIUM,
    spacing: Sequence[float] | None = None,
    steps: int = 50,
    n_bins: int = M.ENCE_BINS,
    qc_candidates: bool = False,
) -> dict[str, PairMetricHandler]:
    """The metric handlers of configs/evaluate.yaml, by name (= the columns of ``metrics.csv``, in their order):
    contour metrics of the registration and of the identity baseline (``identity_*``), image MSE, Jacobian,
    end-point errors (phantom), uncertainty quality and calibration of σ̂² (``zms``, ``picp90`` ... over the image
    and ``*_fov`` over the field of view, ENCE with ``n_bins`` equal-count bins), the quality score ``qc_score``
    (``qc_candidates=True``: also every candidate as ``qc_<name>``), and the sparsification curves of σ̂² and of the
    true ``residual_std`` (figure data). ``spacing``: mm per voxel for all pairs (None: from the data)."""
    m: dict[str, PairMetricHandler] = {}
    for prefix, identity in (("", False), (IDENTITY_PREFIX, True)):
        for k in M.SURFACE_KEYS + tuple(k + "_mm" for k in M.SURFACE_KEYS[1:]):
            m[prefix + k] = ContourHandler(k, identity=identity, label=label, spacing=spacing)
    m["mse"], m[IDENTITY_PREFIX + "mse"] = ImageMSEHandler(), ImageMSEHandler(identity=True)
    m["fold_frac"], m["std_log_jac"] = JacobianFoldingHandler("fold_frac"), JacobianFoldingHandler("std_log_jac")
    for prefix, identity in (("", False), (IDENTITY_PREFIX, True)):
        for suffix, mm in (("", False), ("_mm", True)):
            for region, name in (("all", "epe"), ("heart", "epe_heart")):
                m[prefix + name + suffix] = EndPointErrorHandler(region, spacing if mm else None, mm, identity)
    for name, normalize, output in (
        ("ause", False, "ause"),
        ("aurg", False, "aurg"),
        ("ause_norm", True, "ause"),
        ("aurg_norm", True, "aurg"),
    ):
        m[name] = AUSEHandler(steps, normalize, output)
    m["nll"], m["spearman_noise"] = GaussianNLLHandler(), SpearmanHandler("noise_std")
    m["spearman_noise_fov"] = SpearmanHandler("noise_std", fov=True)
    for k in M.CALIBRATION_KEYS:
        m[k] = VarianceCalibrationHandler(k)
    for k in M.SIGMA_KEYS + M.REF_KEYS:
        for fov in (False, True):
            name = k + ("_fov" if fov else "")
            if name not in ("nll", "nll_ref"):  # = the columns nll and nll_residual_std
                m[name] = SigmaCalibrationHandler(k, fov, n_bins)
    m["qc_score"] = QualityScoreHandler()
    if qc_candidates:
        for k in M.QC_CANDIDATES:
            m["qc_" + k] = QualityScoreHandler(k)
    m["sparsification"] = SparsificationHandler(steps, "log_var")
    m["sparsification_residual_std"] = SparsificationHandler(steps, "residual_std")
    return m


def metric_rows(details: Mapping[str, torch.Tensor], available: Mapping[str, Sequence[bool]]) -> list[dict]:
    """Per-pair rows ``{name: value}`` of the one-column details (only the available values)."""
    rows: list[dict] = []
    for name, d in details.items():
        if name not in available or d.ndim != 2 or d.shape[1] != 1:
            continue
        vals = d[:, 0].tolist()
        rows += [{} for _ in range(len(vals) - len(rows))]
        for i, (v, ok) in enumerate(zip(vals, available[name])):
            if ok:
                rows[i][name] = float(v)
    return rows
