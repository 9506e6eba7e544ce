"""Ignite handlers of the evaluation and of the training (docs/evaluation.md).

- :mod:`.metric_handlers`: one ``IgniteMetricHandler`` per per-pair metric (contours, image MSE, Jacobian,
  end-point error, AUSE, NLL, rank correlation, calibration of σ̂², sparsification curves), usable as
  ``key_val_metric`` / ``additional_metrics`` of any evaluator whose ``engine.state.output`` follows
  docs/CONTRACTS.md; :func:`evaluation_metrics` is the set configs/evaluate.yaml attaches.
- :mod:`.results`: :class:`RegistrationResultsWriter`: ``metrics.csv`` (one row per pair, failed pairs with
  their error), ``summary.json`` / ``summary.md`` assembled from the handlers' ``engine.state.metric_details``;
  the sparsification and reliability figures and the qualitative panels.
- :class:`WeightsLoader`: ``monai.handlers.CheckpointLoader`` with the bundle's file checks, tolerant of a missing
  variance net (one class for evaluation and inference, defined in :mod:`scripts.inference_weights`).
- :mod:`.precomputed`: :class:`PrecomputedDDF`, DDFs read from a folder in place of the network (classical
  baselines, ``--ddf_dir``).
- :mod:`.variance_init`: :class:`VarianceLevelInit`, the data-driven initialisation of the variance network's
  output level before training (docs/uncertainty.md).
"""

from scripts.checkpoint import load_weights
from scripts.handlers._output import pair_names, squared_residual
from scripts.handlers.metric_handlers import (
    IDENTITY_PREFIX,
    AUSEHandler,
    ContourHandler,
    EndPointErrorHandler,
    GaussianNLLHandler,
    ImageMSEHandler,
    JacobianFoldingHandler,
    PairMetricHandler,
    QualityScoreHandler,
    SigmaCalibrationHandler,
    SparsificationHandler,
    SpearmanHandler,
    VarianceCalibrationHandler,
    evaluation_metrics,
    fov_mask,
)
from scripts.handlers.precomputed import PrecomputedDDF
from scripts.handlers.results import (
    CSV_NAME,
    EvaluationFailures,
    RegistrationResultsWriter,
    evaluate_outputs,
    summarize,
    summary_markdown,
)
from scripts.handlers.variance_init import VarianceLevelInit
from scripts.inference_weights import WeightsLoader

__all__ = [
    "CSV_NAME",
    "IDENTITY_PREFIX",
    "AUSEHandler",
    "ContourHandler",
    "EndPointErrorHandler",
    "EvaluationFailures",
    "GaussianNLLHandler",
    "ImageMSEHandler",
    "JacobianFoldingHandler",
    "PairMetricHandler",
    "PrecomputedDDF",
    "RegistrationResultsWriter",
    "QualityScoreHandler",
    "SigmaCalibrationHandler",
    "SparsificationHandler",
    "SpearmanHandler",
    "VarianceCalibrationHandler",
    "VarianceLevelInit",
    "WeightsLoader",
    "evaluate_outputs",
    "evaluation_metrics",
    "fov_mask",
    "load_weights",
    "pair_names",
    "squared_residual",
    "summarize",
    "summary_markdown",
]
