"""Wrappers of three external registration tools (the optional extra ``pip install -e ".[classical]"``).

* :func:`sitk_demons` -- SimpleITK demons (Thirion 1998; symmetric / fast-symmetric forces, Vercauteren's
  diffeomorphic demons) in a Gaussian image pyramid, the field of each level initialising the next.
* :func:`ants_syn` -- ANTsPy's ``ants.registration`` (Avants et al. 2008): affine + symmetric normalisation (SyN).
* :func:`elastix_bspline` -- itk-elastix (Klein et al. 2010): multi-resolution B-spline with adaptive stochastic
  gradient descent, elastix's default ``bspline`` parameter map.
* :func:`convexadam` -- ConvexAdam (Siebert et al. 2021, ``convexAdam.convex_adam_MIND.convex_adam_pt``): MIND
  features, coupled convex discrete optimisation then Adam instance optimisation; training-free, torch on CPU.

Each takes ``(moving, fixed)`` float arrays of the same 2D / 3D shape, ``spacing`` in mm in array-axis order and
its parameters (:data:`scripts.classical.DEFAULTS`), and returns the DDF (ndim, *spatial) in voxels, channel i
along array axis i, with ``Warp()(moving, ddf) ~ fixed`` (``I_hat_f(x) = I_m(x + z(x))``). All three tools give a
displacement ``u`` on the fixed grid with ``T(x) = x + u(x)`` mapping fixed points to moving points, in mm, so
only order and units change:

* SimpleITK and elastix index a numpy array ``a[i0, i1(, i2)]`` as ``(x, y[, z]) = (i_last, ..., i0)``: the vector
  components are in reversed array-axis order, ``z[i] = u[..., ndim - 1 - i] / spacing[i]``;
* ANTsPy keeps the numpy axis order (``ants.from_numpy(a)``: axis 0 is x), ``z[i] = u[..., i] / spacing[i]``.

Both were checked with a known translation (tests/test_classical.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

INSTALL = 'pip install -e ".[classical]"'
ANTS_INSTALL = (
    "pip install antspyx (not in the extra: antspyx 0.6.3 pins numpy<2.4 and scipy<1.16, which would downgrade "
    "the bundle's numpy / scipy; install it in its own environment, or next to the bundle with "
    "`pip install --no-deps --target DIR antspyx==0.6.3 statsmodels patsy formulaic interface-meta webcolors` "
    "and PYTHONPATH=DIR, docs/classical.md)"
)

#: method -> (module to import, distribution name, install hint)
PACKAGES = {
    "sitk_demons": ("SimpleITK", "SimpleITK", INSTALL),
    "ants_syn": ("ants", "antspyx", ANTS_INSTALL),
    "elastix_bspline": ("itk", "itk-elastix", INSTALL),
    "convexadam": ("convexAdam.convex_adam_MIND", "convexAdam", INSTALL),
}


def tool_version(method: str) -> str | None:
    """Installed version of the package behind ``method`` (``None``: not installed)."""
    if method not in PACKAGES:
        return None
    try:
        return importlib.metadata.version(PACKAGES[method][1])
    except importlib.metadata.PackageNotFoundError:
        return None


def available(method: str) -> bool:
    """Whether the optional package of ``method`` is installed (without importing it)."""
    return tool_version(method) is not None


def require(method: str):
    """Import the package of ``method`` or raise an ImportError that says how to install it."""
    module, dist, hint = PACKAGES[method]
    if not available(method):
        raise ImportError(f"classical method {method!r} needs the optional package {dist}: {hint}.")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"classical method {method!r}: {dist} is installed but does not import ({e}); {hint}.") from e


def prepare(method: str, ndim: int) -> None:
    """Import / load the tool now so that its one-off loading stays out of the per-pair timing."""
    mod = require(method)
    if method == "elastix_bspline":
        mod.ElastixRegistrationMethod, mod.TransformixFilter, mod.Image[mod.F, ndim]  # lazy ITK modules


# ---------------------------------------------------------------- SimpleITK demons


def _sitk_image(sitk, array: np.ndarray, spacing: Sequence[float]):
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing([float(s) for s in reversed(spacing)])
    return img


def _sitk_level(sitk, img, shrink: int, sigma: float):
    """Smooth by ``sigma`` voxels (of the full grid), then shrink by ``shrink``."""
    if sigma > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [sigma * s for s in img.GetSpacing()])
    if shrink > 1:
        img = sitk.Shrink(img, [shrink] * img.GetDimension())
    return img


def _sitk_resample_field(sitk, field, reference):
    """A displacement field (mm, physical) on another grid: linear, nearest-neighbour extrapolation at the edges."""
    f = sitk.ResampleImageFilter()
    f.SetReferenceImage(reference)
    f.SetInterpolator(sitk.sitkLinear)
    f.SetUseNearestNeighborExtrapolator(True)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    return f.Execute(field)


def sitk_demons(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float], **p) -> np.ndarray:
    """SimpleITK demons in an image pyramid. Parameters (:data:`scripts.classical.DEFAULTS` ``["sitk_demons"]``):
    ``variant`` (fast_symmetric | diffeomorphic | symmetric | demons), ``iterations`` / ``shrink_factors`` /
    ``smoothing_sigmas`` per level coarse to fine, ``field_sigma`` / ``update_sigma`` (voxels of each level, 0: no
    smoothing), ``max_step`` (voxels; not for ``demons``), ``histogram_matching``, ``num_threads``."""
    sitk = require("sitk_demons")
    variants = {
        "fast_symmetric": sitk.FastSymmetricForcesDemonsRegistrationFilter,
        "diffeomorphic": sitk.DiffeomorphicDemonsRegistrationFilter,
        "symmetric": sitk.SymmetricForcesDemonsRegistrationFilter,
        "demons": sitk.DemonsRegistrationFilter,
    }
    if p["variant"] not in variants:
        raise ValueError(f"sitk_demons variant must be one of {sorted(variants)}, got {p['variant']!r}.")
    iterations = [int(i) for i in np.atleast_1d(p["iterations"])]
    shrink = [int(s) for s in np.atleast_1d(p["shrink_factors"])]
    sigmas = [float(s) for s in np.atleast_1d(p["smoothing_sigmas"])]
    if not len(iterations) == len(shrink) == len(sigmas):
        raise ValueError(
            f"sitk_demons: iterations {iterations}, shrink_factors {shrink} and smoothing_sigmas "
            f"{sigmas} need the same length (one entry per level)."
        )
    if p["num_threads"]:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(p["num_threads"]))
    fix, mov = _sitk_image(sitk, fixed, spacing), _sitk_image(sitk, moving, spacing)
    if p["histogram_matching"]:
        mov = sitk.HistogramMatching(mov, fix, 256, 15, True)
    field = None
    for n_iter, s, sigma in zip(iterations, shrink, sigmas):
        f_l, m_l = _sitk_level(sitk, fix, s, sigma), _sitk_level(sitk, mov, s, sigma)
        if field is None:
            init = sitk.Image(f_l.GetSize(), sitk.sitkVectorFloat64, f_l.GetDimension())
            init.CopyInformation(f_l)
        else:
            init = _sitk_resample_field(sitk, field, f_l)
        demons = variants[p["variant"]]()
        demons.SetNumberOfIterations(n_iter)
        demons.SetStandardDeviations(max(float(p["field_sigma"]), 1e-3))
        demons.SetSmoothDisplacementField(float(p["field_sigma"]) > 0)
        demons.SetUpdateFieldStandardDeviations(max(float(p["update_sigma"]), 1e-3))
        demons.SetSmoothUpdateField(float(p["update_sigma"]) > 0)
        if p["variant"] != "demons":
            demons.SetMaximumUpdateStepLength(float(p["max_step"]))
        field = demons.Execute(f_l, m_l, init)
        logger.debug(
            "sitk_demons level shrink %d: %d iterations, metric %.4g",
            s,
            demons.GetElapsedIterations(),
            demons.GetMetric(),
        )
    if field.GetSize() != fix.GetSize():
        field = _sitk_resample_field(sitk, field, fix)
    u = sitk.GetArrayFromImage(field)
    return _reversed_field_to_ddf(u, spacing)


def _reversed_field_to_ddf(u: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    ndim = u.shape[-1]
    return np.stack([u[..., ndim - 1 - i] / float(spacing[i]) for i in range(ndim)]).astype(np.float32)


# ---------------------------------------------------------------- ANTsPy SyN

_ANTS_THREADS: list[str] = []  # the thread count the first ANTs call of this process ran with


def ants_syn(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float], **p) -> np.ndarray:
    """ANTsPy ``ants.registration(fixed, moving, type_of_transform, ...)``, its forward transforms composed into
    one displacement field on the fixed grid (``ants.apply_transforms(..., compose=...)``). Parameters
    (:data:`scripts.classical.DEFAULTS` ``["ants_syn"]``) are ``ants.registration``'s own (ANTsPy's defaults);
    ``random_seed`` goes to ANTs as ``ANTS_RANDOM_SEED`` (the affine stage samples the metric at random);
    ``num_threads`` sets ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, which ANTs reads once per process."""
    threads = str(int(p["num_threads"])) if p["num_threads"] else None
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
        if _ANTS_THREADS and _ANTS_THREADS[0] != threads:
            logger.warning(
                "ants_syn: ANTs already ran with %s threads in this process; num_threads=%s is ignored.",
                _ANTS_THREADS[0],
                threads,
            )
    if p["random_seed"] is not None:
        os.environ["ANTS_RANDOM_SEED"] = str(int(p["random_seed"]))
    ants = require("ants_syn")
    _ANTS_THREADS[:] = _ANTS_THREADS or [os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "default")]
    spacing = tuple(float(s) for s in spacing)
    fix = ants.from_numpy(np.ascontiguousarray(fixed, dtype=np.float32), spacing=spacing)
    mov = ants.from_numpy(np.ascontiguousarray(moving, dtype=np.float32), spacing=spacing)
    with tempfile.TemporaryDirectory(prefix="ants_syn_") as tmp:
        reg = ants.registration(
            fix,
            mov,
            type_of_transform=p["type_of_transform"],
            outprefix=os.path.join(tmp, "tx_"),
            grad_step=float(p["grad_step"]),
            flow_sigma=float(p["flow_sigma"]),
            total_sigma=float(p["total_sigma"]),
            syn_metric=p["syn_metric"],
            syn_sampling=int(p["syn_sampling"]),
            reg_iterations=tuple(int(i) for i in p["reg_iterations"]),
            verbose=False,
        )
        composed = ants.apply_transforms(fix, mov, reg["fwdtransforms"], compose=os.path.join(tmp, "composed_"))
        u = ants.image_read(composed).numpy()
    if u.shape != fixed.shape + (fixed.ndim,):
        raise RuntimeError(f"ants_syn: composed field of shape {u.shape}, expected {fixed.shape + (fixed.ndim,)}.")
    return np.stack([u[..., i] / spacing[i] for i in range(fixed.ndim)]).astype(np.float32)


# ---------------------------------------------------------------- itk-elastix B-spline


def elastix_parameter_map(ndim: int, **p):
    """The elastix parameter object of :func:`elastix_bspline`: elastix's default ``bspline`` map with
    ``levels`` resolutions, a final control-point spacing of ``grid_spacing`` voxels, ``metric`` (+ the bending
    energy penalty with weight ``bending_weight``, none when 0), ``iterations`` per level and ``spatial_samples``
    random samples per iteration; no result image is written."""
    itk = require("elastix_bspline")
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("bspline", int(p["levels"]), float(p["grid_spacing"]))
    del pm["FinalGridSpacingInPhysicalUnits"]
    pm["FinalGridSpacingInVoxels"] = [str(float(p["grid_spacing"]))] * ndim
    bending = float(p["bending_weight"])
    pm["Metric"] = [str(p["metric"])] + (["TransformBendingEnergyPenalty"] if bending > 0 else [])
    pm["Metric0Weight"] = ["1.0"]
    if bending > 0:
        pm["Metric1Weight"] = [str(bending)]
    elif "Metric1Weight" in pm:
        del pm["Metric1Weight"]
    pm["MaximumNumberOfIterations"] = [str(int(p["iterations"]))]
    pm["NumberOfSpatialSamples"] = [str(int(p["spatial_samples"]))]
    pm["WriteResultImage"] = ["false"]
    po.AddParameterMap(pm)
    return po


def elastix_bspline(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float], **p) -> np.ndarray:
    """itk-elastix B-spline registration (:func:`elastix_parameter_map`), the field from transformix
    (``ComputeDeformationField``). ``num_threads`` goes to both filters."""
    itk = require("elastix_bspline")
    po = elastix_parameter_map(fixed.ndim, **p)
    fix, mov = (itk.image_from_array(np.ascontiguousarray(a, dtype=np.float32)) for a in (fixed, moving))
    for img in (fix, mov):
        img.SetSpacing([float(s) for s in reversed(spacing)])
    elx = itk.ElastixRegistrationMethod.New(fix, mov)
    elx.SetParameterObject(po)
    elx.SetLogToConsole(False)
    if p["num_threads"]:
        elx.SetNumberOfThreads(int(p["num_threads"]))
    elx.Update()
    import tempfile

    # transformix also writes deformationField.nii into its output directory (default: the current one)
    with tempfile.TemporaryDirectory(prefix="transformix_") as tmp:
        tfx = itk.TransformixFilter.New(mov)
        tfx.SetTransformParameterObject(elx.GetTransformParameterObject())
        tfx.SetComputeDeformationField(True)
        tfx.SetLogToConsole(False)
        tfx.SetOutputDirectory(tmp)
        if p["num_threads"]:
            tfx.SetNumberOfWorkUnits(int(p["num_threads"]))
        tfx.Update()
        field = itk.array_from_image(tfx.GetOutputDeformationField())
    return _reversed_field_to_ddf(field, spacing)


# ---------------------------------------------------------------- ConvexAdam


def convexadam(moving: np.ndarray, fixed: np.ndarray, spacing: Sequence[float], **p) -> np.ndarray:
    """ConvexAdam (``convex_adam_pt`` with its defaults), 3D only: a 2D pair is repeated into a thin volume of
    ``slices`` (≥ 18) slices along a third axis and the middle slice's in-plane displacement taken. Its result
    (*spatial, 3) is in voxels, array-axis order, channels last, with ``warped(x) = moving(x + disp(x))``
    (checked with a known shift, tests/test_classical.py): the channels are moved first. ``spacing`` is not used
    (ConvexAdam works in voxels). ``num_threads``: torch's CPU threads during the call (restored)."""
    import torch

    mod = require("convexadam")
    p = dict(p)
    slices, threads = int(p.pop("slices")), p.pop("num_threads")
    if fixed.ndim == 2 and slices < 18:
        raise ValueError(f"convexadam: slices must be >= 18 for a 2D pair, got {slices}.")
    two_d = fixed.ndim == 2
    m = np.repeat(moving[..., None], slices, -1) if two_d else moving
    f = np.repeat(fixed[..., None], slices, -1) if two_d else fixed
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        disp = mod.convex_adam_pt(
            torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)),
            device=torch.device("cpu"),
            dtype=torch.float32,
            **p,
        )
    finally:
        torch.set_num_threads(before)
    disp = np.asarray(disp, dtype=np.float32)
    if two_d:
        disp = disp[:, :, slices // 2, :2]
    return np.ascontiguousarray(np.moveaxis(disp, -1, 0))
