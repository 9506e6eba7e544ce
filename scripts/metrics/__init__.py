"""Evaluation metrics: uncertainty quality (sparsification / AUSE, NLL, rank correlation, calibration of σ̂²),
deformation quality (Jacobian determinant, folding, end-point error) and contour metrics on the myocardium.

Conventions (docs/CONTRACTS.md): tensors are batch-first and channel-first, ``(B, C, *spatial)``; a DDF ``z`` is in
voxel units with channel ``i`` = displacement along array axis ``i`` and maps ``phi(x) = x + z(x)``
(``I_hat_f(x) = I_m(x + z(x))`` as ``monai.networks.blocks.Warp`` applies it).

Plain functions work on one batch and return one value per image; the ``CumulativeIterationMetric`` subclasses
buffer those values across iterations and reduce them with ``aggregate()`` (MONAI ``reduction``: ``mean``,
``sum``, ``mean_batch``, ``none`` ...); the handlers of :mod:`scripts.handlers` wrap them for the engines.
Modules: :mod:`.uncertainty`, :mod:`.deformation`, :mod:`.contours`, :mod:`.calibration`, :mod:`.quality`.
Definitions are in docs/evaluation.md.
"""

from scripts.metrics.calibration import (
    CALIBRATION_KEYS,
    ENCE_BINS,
    REF_KEYS,
    SIGMA_KEYS,
    Z90,
    Z95,
    ReliabilityDiagram,
    SigmaCalibrationMetric,
    VarianceCalibrationMetric,
    sigma_calibration,
    sigma_scale_value,
    variance_calibration,
)
from scripts.metrics.contours import MYOCARDIUM, SURFACE_KEYS, ContourMetric, contour_metric, myocardium_metrics
from scripts.metrics.deformation import (
    EndPointErrorMetric,
    JacobianMetric,
    end_point_error,
    jacobian_determinant,
    jacobian_stats,
)
from scripts.metrics.quality import (
    QC_CANDIDATES,
    QC_DEFINITION,
    QualityScoreMetric,
    image_fov,
    inverse_consistency_error,
    qc_score,
    quality_candidates,
)
from scripts.metrics.uncertainty import (
    AUSEMetric,
    GaussianNLLMetric,
    SparsificationMetric,
    SpearmanMetric,
    ause,
    gaussian_nll,
    sparsification_curves,
    spearman_corr,
)

__all__ = [
    "MYOCARDIUM",
    "SURFACE_KEYS",
    "CALIBRATION_KEYS",
    "sparsification_curves",
    "ause",
    "SparsificationMetric",
    "AUSEMetric",
    "gaussian_nll",
    "GaussianNLLMetric",
    "spearman_corr",
    "SpearmanMetric",
    "jacobian_determinant",
    "jacobian_stats",
    "JacobianMetric",
    "end_point_error",
    "EndPointErrorMetric",
    "myocardium_metrics",
    "contour_metric",
    "ContourMetric",
    "variance_calibration",
    "ReliabilityDiagram",
    "VarianceCalibrationMetric",
    "ENCE_BINS",
    "SIGMA_KEYS",
    "REF_KEYS",
    "Z90",
    "Z95",
    "sigma_calibration",
    "SigmaCalibrationMetric",
    "sigma_scale_value",
    "QC_CANDIDATES",
    "QC_DEFINITION",
    "QualityScoreMetric",
    "image_fov",
    "inverse_consistency_error",
    "qc_score",
    "quality_candidates",
]
