"""The bundle's own classical registrations with ITK Python (``itk``, a core dependency): B-spline FFD and
diffeomorphic demons. Each returns ITK's displacement field array (``itk.array_from_image``: (*spatial, ndim),
components (x, y[, z]) in mm, on the fixed grid, ``T(x) = x + u(x)`` mapping fixed to moving points); the
conversion to the bundle's DDF is :func:`scripts.classical.itk_field_to_ddf`. Parameters: docs/classical.md.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _itk_types(ndim: int) -> dict:
    """Instantiate (and cache) the ITK templates once: the first lookup loads ITK's wrapped modules (~10 s)."""
    import itk

    image = itk.Image[itk.F, ndim]
    field = itk.Image[itk.Vector[itk.F, ndim], ndim]
    bspline = itk.BSplineTransform[itk.D, ndim, 3]
    return dict(
        itk=itk,
        image=image,
        field=field,
        bspline=bspline,
        bspline_init=itk.BSplineTransformInitializer[bspline, image],
        metric=itk.MeanSquaresImageToImageMetricv4[image, image],
        registration=itk.ImageRegistrationMethodv4[image, image],
        to_field=itk.TransformToDisplacementFieldFilter[field, itk.D],
        demons=itk.DiffeomorphicDemonsRegistrationFilter[image, image, field],
        multires=itk.MultiResolutionPDEDeformableRegistration[image, image, field, itk.F],
        histogram=itk.HistogramMatchingImageFilter[image, image],
    )


def _to_itk(types: dict, array: np.ndarray, spacing: Sequence[float]):
    img = types["itk"].image_from_array(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing([float(s) for s in reversed(spacing)])  # ITK (x, y[, z]) = reversed array axes
    return img


def _set_threads(types: dict, num_threads: int | None) -> None:
    if num_threads:
        types["itk"].MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(num_threads))


def _bspline(types: dict, moving, fixed, ndim: int, p: dict) -> np.ndarray:
    itk = types["itk"]
    if int(p["spline_order"]) != 3:
        raise ValueError("only cubic B-splines (spline_order=3) are wrapped in ITK Python.")
    transform = types["bspline"].New()
    init = types["bspline_init"].New()
    init.SetTransform(transform)
    init.SetImage(fixed)
    init.SetTransformDomainMeshSize([int(p["mesh_size"])] * ndim)
    init.InitializeTransform()
    transform.SetIdentity()
    n = transform.GetNumberOfParameters()

    optimizer = itk.LBFGSBOptimizerv4.New()
    bounds = itk.Array[itk.SL](n)
    bounds.Fill(0)  # 0 = unbounded
    low, up = itk.Array[itk.D](n), itk.Array[itk.D](n)
    low.Fill(0.0)
    up.Fill(0.0)
    optimizer.SetBoundSelection(bounds)
    optimizer.SetLowerBound(low)
    optimizer.SetUpperBound(up)
    optimizer.SetNumberOfIterations(int(p["iterations"]))
    optimizer.SetMaximumNumberOfFunctionEvaluations(int(p["max_evaluations"]))
    optimizer.SetMaximumNumberOfCorrections(int(p["max_corrections"]))
    optimizer.SetCostFunctionConvergenceFactor(float(p["convergence_factor"]))
    optimizer.SetGradientConvergenceTolerance(float(p["gradient_tolerance"]))

    shrink = [int(s) for s in p["shrink_factors"]]
    sigmas = [float(s) for s in p["smoothing_sigmas"]]
    if len(shrink) != len(sigmas):
        raise ValueError(f"shrink_factors {shrink} and smoothing_sigmas {sigmas} need the same length.")
    reg = types["registration"].New()
    reg.SetFixedImage(fixed)
    reg.SetMovingImage(moving)
    reg.SetMetric(types["metric"].New())
    reg.SetOptimizer(optimizer)
    reg.SetInitialTransform(transform)
    reg.InPlaceOn()
    reg.SetNumberOfLevels(len(shrink))
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.Update()
    logger.debug("bspline: %s (metric %.3g)", optimizer.GetStopConditionDescription(), optimizer.GetValue())

    to_field = types["to_field"].New()
    to_field.SetTransform(transform)
    to_field.SetReferenceImage(fixed)
    to_field.UseReferenceImageOn()
    to_field.Update()
    return itk.array_from_image(to_field.GetOutput())


def _demons(types: dict, moving, fixed, ndim: int, p: dict) -> np.ndarray:
    itk = types["itk"]
    if p["histogram_matching"]:
        hm = types["histogram"].New()
        hm.SetInput(moving)
        hm.SetReferenceImage(fixed)
        hm.SetNumberOfHistogramLevels(256)
        hm.SetNumberOfMatchPoints(15)
        hm.ThresholdAtMeanIntensityOn()
        hm.Update()
        moving = hm.GetOutput()
    demons = types["demons"].New()
    demons.SetStandardDeviations(float(p["field_sigma"]))
    demons.SetSmoothDisplacementField(float(p["field_sigma"]) > 0)
    demons.SetUpdateFieldStandardDeviations(max(float(p["update_sigma"]), 1e-3))
    demons.SetSmoothUpdateField(float(p["update_sigma"]) > 0)
    demons.SetMaximumUpdateStepLength(float(p["max_step"]))
    # gradient type: ITK's default, symmetric forces (the enum setter is not wrapped in ITK Python)
    iterations = [int(i) for i in np.atleast_1d(p["iterations"])]
    multires = types["multires"].New()
    multires.SetRegistrationFilter(demons)
    multires.SetNumberOfLevels(len(iterations))
    multires.SetNumberOfIterations(iterations)
    multires.SetFixedImage(fixed)
    multires.SetMovingImage(moving)
    multires.Update()
    return itk.array_from_image(multires.GetOutput())


def run_itk(method: str, moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float], p: dict) -> np.ndarray:
    """Run ``method`` (``"bspline"`` or ``"demons"``) with parameters ``p``; returns ITK's field array."""
    types = _itk_types(fixed.ndim)
    _set_threads(types, p["num_threads"])
    mov, fix = _to_itk(types, moving, spacing), _to_itk(types, fixed, spacing)
    return (_bspline if method == "bspline" else _demons)(types, mov, fix, fixed.ndim, p)


def prepare_itk(ndim: int) -> None:
    """Load ITK's templates now (about 10 s in 2D, once per process), outside any timing."""
    _itk_types(ndim)
