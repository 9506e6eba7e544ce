"""Classical (optimisation-based) registration baselines, returning DDFs in the project's convention.

Methods (``register_pair(..., method=...)``; parameters in :data:`DEFAULTS`, docs/classical.md):

* ``"bspline"`` -- the bundle's free-form deformation (Rueckert et al. 1999) with ITK Python: cubic
  ``itk.BSplineTransform`` (mesh of 8 cells per dimension), mean squares, L-BFGS-B, 3-level pyramid.
* ``"demons"`` -- the bundle's diffeomorphic demons (Vercauteren et al. 2009) with ITK Python:
  ``DiffeomorphicDemonsRegistrationFilter`` inside ``MultiResolutionPDEDeformableRegistration``.
* ``"sitk_demons"`` -- SimpleITK's fast-symmetric-forces demons in an image pyramid (optional extra).
* ``"ants_syn"`` -- ANTsPy SyN, affine + symmetric normalisation (optional: ``antspyx``).
* ``"elastix_bspline"`` -- itk-elastix B-spline, elastix's default ``bspline`` map (optional extra).
* ``"convexadam"`` -- ConvexAdam (MIND + convex optimisation + Adam), its defaults; 2D pairs as a thin volume
  (optional extra: ``convexadam``).

The optional packages: ``pip install -e ".[classical]"`` (:mod:`scripts.classical.external`).

Every method returns the DDF (ndim, *spatial) float32 in **voxels**, channel i along array axis i, on the fixed
grid, with ``monai.networks.blocks.Warp()(moving, ddf) ~ fixed``, i.e. ``I_hat_f(x) = I_m(x + z(x))``.
ITK images built from a numpy array ``a[i0, i1(, i2)]`` index it as ``(x, y[, z]) = (i_last, ..., i0)``, so ITK
spacings and vector components are in *reversed* array-axis order and in mm, and ``T(x) = x + u(x)`` maps fixed
to moving points: ``z[i] = u[..., ndim - 1 - i] / spacing[i]`` (:func:`itk_field_to_ddf`).

``python -m scripts.classical --method M --datalist D --split test --out DIR`` registers a split
(:func:`scripts.classical.datalist.register_datalist`) for ``python -m monai.bundle run evaluating ... --ddf_dir DIR``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from scripts.classical import external
from scripts.classical.external import available, tool_version

__all__ = [
    "register_pair",
    "register_datalist",
    "itk_field_to_ddf",
    "ddf_to_itk_field",
    "warp",
    "available",
    "tool_version",
    "METHODS",
    "BUNDLE_METHODS",
    "OPTIONAL_METHODS",
    "DEFAULTS",
]

BUNDLE_METHODS = ("bspline", "demons")  # ITK Python, a core dependency
OPTIONAL_METHODS = ("sitk_demons", "ants_syn", "elastix_bspline", "convexadam")  # pip install -e ".[classical]"
METHODS = BUNDLE_METHODS + OPTIONAL_METHODS

#: default parameters of each method (override with ``register_pair(..., **params)``); ``num_threads=None`` leaves
#: the tool's own default (all cores), 1 runs single-threaded (fair per-pair timing).
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
    "sitk_demons": dict(
        variant="fast_symmetric",  # fast_symmetric | diffeomorphic | symmetric | demons (Thirion)
        iterations=(100, 50, 30),  # per level, coarse to fine
        shrink_factors=(4, 2, 1),
        smoothing_sigmas=(2.0, 1.0, 0.0),  # image smoothing before shrinking, voxels of the full grid
        field_sigma=1.5,  # Gaussian smoothing of the field (voxels of each level)
        update_sigma=0.0,  # > 0 smooths the update field too
        max_step=2.0,  # maximum update step length (voxels); not used by "demons"
        histogram_matching=False,
        num_threads=None,
    ),
    "ants_syn": dict(  # ants.registration's own defaults
        type_of_transform="SyN",  # affine + SyN; "SyNOnly": no affine stage
        syn_metric="mattes",
        syn_sampling=32,
        grad_step=0.2,
        flow_sigma=3.0,
        total_sigma=0.0,
        reg_iterations=(40, 20, 0),  # SyN iterations per level, coarse to fine
        random_seed=0,
        num_threads=None,
    ),
    "elastix_bspline": dict(  # elastix's default "bspline" parameter map, but for the grid spacing unit
        levels=3,
        grid_spacing=8.0,  # final control-point spacing, voxels
        metric="AdvancedMattesMutualInformation",
        bending_weight=1.0,  # TransformBendingEnergyPenalty weight (0: none)
        iterations=256,  # per level
        spatial_samples=2048,
        num_threads=None,
    ),
    "convexadam": dict(  # convex_adam_pt's own defaults
        mind_r=1,
        mind_d=2,
        lambda_weight=1.25,
        grid_sp=6,
        disp_hw=4,
        selected_niter=80,
        selected_smooth=0,
        grid_sp_adam=2,
        ic=True,
        slices=18,  # 2D pairs: repeated into a volume of this many slices (the middle one is taken)
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
    :func:`scripts.data.phantom.warp`."""
    from scripts.data.phantom import warp as warp_channel_last

    return warp_channel_last(image, np.moveaxis(np.asarray(ddf), 0, -1), mode, padding_mode)


# ---------------------------------------------------------------- one pair


def check_params(method: str, params: dict) -> dict:
    """``DEFAULTS[method]`` updated by ``params``; unknown methods / parameters are errors naming the known ones."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    unknown = set(params) - set(DEFAULTS[method])
    if unknown:
        raise TypeError(f"unknown {method} parameters {sorted(unknown)}; known: {sorted(DEFAULTS[method])}.")
    return {**DEFAULTS[method], **params}


def prepare(method: str, ndim: int) -> None:
    """Load the tool of ``method`` (ITK's templates, ANTsPy, elastix) so its one-off cost stays out of timings;
    raises the ImportError with the install command when an optional package is missing."""
    if method in BUNDLE_METHODS:
        from scripts.classical.itk_methods import prepare_itk

        prepare_itk(ndim)
    else:
        external.prepare(method, ndim)


def _check_images(moving, fixed, spacing) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
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
    return moving, fixed, spacing


def register_pair_timed(
    moving: np.ndarray, fixed: np.ndarray, method: str = "bspline", spacing: Sequence[float] | None = None, **params
) -> tuple[np.ndarray, dict]:
    """:func:`register_pair` with both clocks: returns ``(ddf, {"wall_s", "cpu_s"})``, ``cpu_s`` the process CPU
    time (all threads of this process; every tool here runs in-process)."""
    p = check_params(method, params)
    moving, fixed, spacing = _check_images(moving, fixed, spacing)
    prepare(method, fixed.ndim)
    wall, cpu = time.perf_counter(), time.process_time()
    if method in BUNDLE_METHODS:
        from scripts.classical.itk_methods import run_itk

        ddf = itk_field_to_ddf(run_itk(method, moving, fixed, spacing, p), spacing)
    else:
        ddf = getattr(external, method)(moving, fixed, spacing, **p)
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    if ddf.shape != (fixed.ndim,) + fixed.shape or not np.isfinite(ddf).all():
        raise RuntimeError(
            f"{method} returned a DDF of shape {ddf.shape} (finite: {np.isfinite(ddf).all()}), "
            f"expected {(fixed.ndim,) + fixed.shape}."
        )
    return ddf, timing


def register_pair(
    moving: np.ndarray,
    fixed: np.ndarray,
    method: str = "bspline",
    spacing: Sequence[float] | None = None,
    **params,
) -> tuple[np.ndarray, float]:
    """Register ``moving`` onto ``fixed``.

    Args:
        moving, fixed: (*spatial) arrays of the same 2D or 3D shape, intensities in [0, 1] (a leading channel of 1
            is dropped).
        method: one of :data:`METHODS`.
        spacing: voxel size in mm in **array-axis order** (default 1). It sets the physical geometry the tool works
            in; the returned DDF is in voxels whatever the spacing.
        params: overrides of :data:`DEFAULTS` ``[method]``.

    Returns:
        ``(ddf, seconds)``: ddf (ndim, *spatial) float32 in voxels, channel i along array axis i, such that
        ``monai.networks.blocks.Warp()(moving, ddf)`` ~ fixed; seconds = wall time of the registration (the tool's
        one-off module loading excluded). :func:`register_pair_timed` also gives the CPU time.
    """
    ddf, timing = register_pair_timed(moving, fixed, method, spacing, **params)
    return ddf, timing["wall_s"]


from scripts.classical.datalist import register_datalist  # noqa: E402  (needs the names above)
