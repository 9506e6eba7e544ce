"""Classical (optimisation-based) registration baselines with ITK, returning DDFs in the project's convention.

Methods (``register_pair(..., method=...)``):

* ``"bspline"`` -- free-form deformation (Rueckert et al. 1999): cubic ``itk.BSplineTransform`` with a control-point
  mesh of ``mesh_size`` (8) cells per dimension over the fixed image, mean-squares metric
  (``MeanSquaresImageToImageMetricv4``), unbounded L-BFGS-B (``LBFGSBOptimizerv4``), ``ImageRegistrationMethodv4``
  with a 3-level image pyramid (shrink 4, 2, 1; Gaussian smoothing sigma 2, 1, 0 voxels).
* ``"demons"`` -- diffeomorphic demons (Vercauteren et al. 2009): ``DiffeomorphicDemonsRegistrationFilter``
  (symmetric gradient forces, field smoothing sigma 1.5, maximum update step 2) inside
  ``MultiResolutionPDEDeformableRegistration`` (3 levels, 100/50/30 iterations coarse to fine).

Axis-order and unit conversion (docs/transmorph_classical.md):
ITK images built from a numpy array ``a[i0, i1(, i2)]`` index it as ``(x, y[, z]) = (i_last, ..., i0)``, so ITK
spacings and vector components are in *reversed* array-axis order and in mm. Both methods produce a field ``u`` on
the fixed grid with ``T(x) = x + u(x)`` mapping fixed points to moving points (the moving image is sampled at
``T(x)``), which is the project's convention ``I_hat_f(x) = I_m(x + z(x))`` up to units/order:
``z[i] = u[..., ndim - 1 - i] / spacing[i]`` (``spacing`` in array-axis order).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["register_pair", "register_datalist", "itk_field_to_ddf", "ddf_to_itk_field", "warp", "METHODS", "DEFAULTS"]

METHODS = ("bspline", "demons")

#: default parameters of each method (override with ``register_pair(..., **params)``).
DEFAULTS: dict[str, dict] = {
    "bspline": dict(
        mesh_size=8,  # control-point mesh cells per dimension
        spline_order=3,
        shrink_factors=(4, 2, 1),
        smoothing_sigmas=(2.0, 1.0, 0.0),  # voxels
        iterations=200,  # L-BFGS-B iterations per level
        max_evaluations=1000,
        max_corrections=5,
        convergence_factor=1e7,  # L-BFGS-B factr (x machine eps)
        gradient_tolerance=1e-8,
        num_threads=None,
    ),
    "demons": dict(
        iterations=(100, 50, 30),  # per level, coarse to fine (its length = number of levels)
        field_sigma=1.5,  # Gaussian smoothing of the field (voxels of each level)
        update_sigma=0.0,  # > 0 smooths the update field too (fluid-like regularisation)
        max_step=2.0,  # maximum update step length (voxels)
        histogram_matching=False,
        num_threads=None,
    ),
}


# ---------------------------------------------------------------- conversions


def itk_field_to_ddf(field: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """ITK displacement field array (``itk.array_from_image``: (*spatial, ndim), components (x, y[, z]) in mm)
    -> project DDF (ndim, *spatial), array-axis order, voxels."""
    field = np.asarray(field)
    ndim = field.ndim - 1
    if field.shape[-1] != ndim or len(spacing) != ndim:
        raise ValueError(f"field of shape {field.shape} does not match {ndim} spatial dims / spacing {spacing}.")
    return np.stack([field[..., ndim - 1 - i] / float(spacing[i]) for i in range(ndim)]).astype(np.float32)


def ddf_to_itk_field(ddf: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Inverse of :func:`itk_field_to_ddf`: project DDF (ndim, *spatial) -> (*spatial, ndim) in mm, (x, y[, z])."""
    ddf = np.asarray(ddf)
    ndim = ddf.shape[0]
    return np.stack([ddf[ndim - 1 - c] * float(spacing[ndim - 1 - c]) for c in range(ndim)], -1).astype(np.float32)


def warp(image: np.ndarray, ddf: np.ndarray, mode: str = "bilinear", padding_mode: str = "border") -> np.ndarray:
    """Warp a (*spatial) image with a project DDF (ndim, *spatial) by ``monai.networks.blocks.Warp`` (its default
    border padding, as the networks' warps); ``mode="nearest"`` for labels. Channel-first front end of
    :func:`scripts.phantom.warp`."""
    from scripts.phantom import warp as warp_channel_last

    return warp_channel_last(image, np.moveaxis(np.asarray(ddf), 0, -1), mode, padding_mode)


# ---------------------------------------------------------------- ITK


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


def register_pair(
    moving: np.ndarray,
    fixed: np.ndarray,
    method: str = "bspline",
    spacing: Sequence[float] | None = None,
    **params,
) -> tuple[np.ndarray, float]:
    """Register ``moving`` onto ``fixed`` with ITK.

    Args:
        moving, fixed: (*spatial) arrays of the same 2D or 3D shape (a leading channel of 1 is dropped).
        method: ``"bspline"`` or ``"demons"``.
        spacing: voxel size in mm in **array-axis order** (default 1). It sets the physical geometry ITK works in;
            the returned DDF is in voxels whatever the spacing.
        params: overrides of :data:`DEFAULTS` ``[method]``.

    Returns:
        ``(ddf, seconds)``: ddf (ndim, *spatial) float32 in voxels, channel i along array axis i, such that
        ``monai.networks.blocks.Warp()(moving, ddf)`` ~ fixed; seconds = wall time of the registration (ITK's one-off
        module loading excluded).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    unknown = set(params) - set(DEFAULTS[method])
    if unknown:
        raise TypeError(f"unknown {method} parameters {sorted(unknown)}; known: {sorted(DEFAULTS[method])}.")
    p = {**DEFAULTS[method], **params}
    moving, fixed = np.asarray(moving, dtype=np.float32), np.asarray(fixed, dtype=np.float32)
    if moving.ndim == fixed.ndim and moving.ndim in (3, 4) and moving.shape[0] == 1 and fixed.shape[0] == 1:
        moving, fixed = moving[0], fixed[0]
    if moving.shape != fixed.shape:
        raise ValueError(f"moving {moving.shape} and fixed {fixed.shape} differ in shape.")
    ndim = fixed.ndim
    if ndim not in (2, 3):
        raise ValueError(f"images must be 2D or 3D, got shape {fixed.shape}.")
    if not (np.isfinite(moving).all() and np.isfinite(fixed).all()):
        raise ValueError("images contain NaN or Inf.")
    spacing = (1.0,) * ndim if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(f"spacing {spacing} must have {ndim} positive entries.")

    types = _itk_types(ndim)
    _set_threads(types, p["num_threads"])
    start = time.perf_counter()
    mov, fix = _to_itk(types, moving, spacing), _to_itk(types, fixed, spacing)
    field = (_bspline if method == "bspline" else _demons)(types, mov, fix, ndim, p)
    ddf = itk_field_to_ddf(field, spacing)
    seconds = time.perf_counter() - start
    return ddf, seconds


# ---------------------------------------------------------------- datalist


def _affine_4x4(affine) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    out = np.eye(4)
    n = a.shape[0] - 1  # (n+1, n+1) homogeneous affine of n spatial dims
    out[:n, :n], out[:n, 3] = a[:n, :n], a[:n, n]
    return out


def _save(path: Path, array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))


def register_datalist(
    datalist_path: str | os.PathLike,
    split: str = "test",
    out_dir: str | os.PathLike = "classical",
    method: str = "bspline",
    spatial_size: Sequence[int] | None = None,
    intensity: str = "none",
    save_warped: bool = True,
    progress: bool = True,
    **params,
) -> list[dict]:
    """Register every pair of a datalist split and write the results like a network's predictions.

    Each pair is loaded with :func:`scripts.data.paired_transforms` (same ``spatial_size`` / ``intensity`` as the
    network so that DDFs live on the same grid). Per case ``<id>`` the folder gets ``<id>_ddf.nii.gz`` (channel-last
    (*spatial, ndim), voxels, array-axis order: docs/CONTRACTS.md), ``<id>_warped.nii.gz`` and, where the item has
    a moving label, ``<id>_warped_label.nii.gz`` (nearest-neighbour warp), all with the fixed image's affine, plus
    ``classical_<method>.json`` (method, parameters, per-case seconds).

    The spacing given to ITK is the item's ``spacing`` if present, else the voxel size of the (resized) fixed image.
    ``progress`` shows a tqdm bar over the pairs (with the seconds of the last one).

    Returns:
        ``[{"id", "seconds", "ddf", ...}, ...]`` in datalist order.
    """
    from scripts.data import load_datalist, paired_transforms

    items = load_datalist(datalist_path, split)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = ("moving", "fixed", "moving_label", "fixed_label")
    xform = paired_transforms(spatial_size=spatial_size, keys=keys, intensity=intensity)
    results = []
    from tqdm.auto import tqdm

    bar = tqdm(items, desc=f"classical {method}", unit="pair", disable=not progress)
    for item in bar:
        d = xform({k: item[k] for k in keys if item.get(k) is not None})
        fixed_t, moving_t = d["fixed"], d["moving"]
        ndim = fixed_t.ndim - 1
        affine = _affine_4x4(fixed_t.affine.cpu().numpy()) if hasattr(fixed_t, "affine") else np.eye(4)
        if item.get("spacing") is not None and spatial_size is None:
            spacing = [float(s) for s in item["spacing"]][:ndim]
        else:
            spacing = [float(s) for s in np.linalg.norm(affine[:ndim, :ndim], axis=0)]
        ddf, seconds = register_pair(
            moving_t[0].cpu().numpy(), fixed_t[0].cpu().numpy(), method=method, spacing=spacing, **params
        )
        case = str(item["id"])
        rec = {"id": case, "seconds": float(seconds), "ddf": str(out / f"{case}_ddf.nii.gz")}
        _save(out / f"{case}_ddf.nii.gz", np.moveaxis(ddf, 0, -1), affine)
        if save_warped:
            rec["warped"] = str(out / f"{case}_warped.nii.gz")
            _save(out / f"{case}_warped.nii.gz", warp(moving_t[0].cpu().numpy(), ddf), affine)
            if "moving_label" in d:
                rec["warped_label"] = str(out / f"{case}_warped_label.nii.gz")
                lab = warp(d["moving_label"][0].cpu().numpy(), ddf, mode="nearest")
                _save(out / f"{case}_warped_label.nii.gz", np.rint(lab), affine, dtype=np.uint8)
        logger.debug("%s: %s registered in %.2f s", case, method, seconds)
        bar.set_postfix(case=case, seconds=f"{seconds:.2f}")
        results.append(rec)
    summary = {
        "method": method,
        "parameters": {**DEFAULTS[method], **params},
        "split": split,
        "spatial_size": list(spatial_size) if spatial_size else None,
        "mean_seconds": float(np.mean([r["seconds"] for r in results])),
        "cases": results,
    }
    with open(out / f"classical_{method}.json", "w") as f:
        json.dump(summary, f, indent=2, default=list)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m scripts.classical DATALIST OUT_DIR [--method demons] [--split test] [--spatial-size 128 128]``"""
    ap = argparse.ArgumentParser(description="Classical ITK registration of a datalist split.")
    ap.add_argument("datalist")
    ap.add_argument("out_dir")
    ap.add_argument("--method", default="bspline", choices=METHODS)
    ap.add_argument("--split", default="test")
    ap.add_argument("--spatial-size", type=int, nargs="+", default=None)
    ap.add_argument("--intensity", default="none", choices=("none", "percentile"))
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    res = register_datalist(
        args.datalist, args.split, args.out_dir, method=args.method, spatial_size=args.spatial_size,
        intensity=args.intensity, progress=not args.no_progress,
    )
    print(f"{len(res)} pairs, mean {np.mean([r['seconds'] for r in res]):.2f} s per pair -> {args.out_dir}")


if __name__ == "__main__":
    main()
