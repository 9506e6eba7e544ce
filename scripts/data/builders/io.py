"""Reading the providers' files (NIfTI, MetaImage, NRRD) into :class:`Volume` s, with the label and intensity checks
the builders share, and the provider-to-project label maps."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts.data.contracts import LABEL_SET, DataError, check_geometry, check_labels, not_a_file

logger = logging.getLogger(__name__)


# provider label -> project label (0 bg, 1 LV blood pool, 2 LV myocardium, 3 RV; CAMUS: 3 = left atrium)

ACDC_LABEL_MAP = {0: 0, 1: 3, 2: 2, 3: 1}  # ACDC: 1 RV, 2 myocardium, 3 LV cavity
CAMUS_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3}  # CAMUS: 1 LV endocardium, 2 myocardium, 3 left atrium
NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")


class DataWarning(UserWarning):
    """Something in the input was skipped (the message says what)."""


def _warn(msg: str) -> None:
    logger.warning(msg)
    warnings.warn(msg, DataWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Volume:
    """An image read from disk: ``array`` in the file's index order (as MONAI's readers give it), RAS ``affine``."""

    array: np.ndarray
    affine: np.ndarray
    spacing: tuple
    path: Path


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES + ITK_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _read_nifti(path: Path):
    import nibabel as nib

    img = nib.load(str(path))
    arr = np.asarray(img.dataobj)  # reads (and decompresses) everything: truncation shows here
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = tuple(float(z) for z in img.header.get_zooms()[: arr.ndim])
    return arr, affine, zooms


def _read_itk(path: Path):
    import itk

    img = itk.imread(str(path))
    arr = np.asarray(itk.array_from_image(img)).T  # ITK index order (x, y[, z]), as MONAI's ITKReader gives it
    ndim = img.GetImageDimension()
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    affine = np.eye(4)
    d = min(ndim, 3)
    affine[:d, :d] = direction[:d, :d] * spacing[:d]
    affine[:d, 3] = origin[:d]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK is LPS, NIfTI / MONAI are RAS
    if arr.ndim > ndim:  # vector pixels: the component axis is first after the transpose, move it last
        arr = np.moveaxis(arr, 0, -1)
    return arr, affine, tuple(float(s) for s in spacing[: arr.ndim])


def read_image(path: str | os.PathLike, ndim: int | Sequence[int] | None = None, what: str = "image") -> Volume:
    """Read a NIfTI (nibabel) or MHD/MHA/NRRD (ITK) file; check it is readable, finite and of the expected rank.

    Args:
        path: the file.
        ndim: allowed number of spatial dimensions (trailing singleton dimensions are dropped first). ``None``: 2 or 3.
        what: word used in error messages ("image", "label").

    Raises:
        DataError: missing, unreadable or truncated file, wrong rank (e.g. 4D where 3D expected), NaN/Inf voxels.
    """
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise DataError(
            f"{path}: {what} file does not exist." if problem == "does not exist" else f"{path}: {problem}."
        )
    suffix = _suffix(path)
    try:
        if suffix in NIFTI_SUFFIXES:
            arr, affine, spacing = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            arr, affine, spacing = _read_itk(path)
        else:
            raise DataError(f"{path}: unsupported file type {suffix!r} (use NIfTI .nii/.nii.gz, MHD/MHA or NRRD).")
    except DataError:
        raise
    except Exception as e:  # nibabel / zlib / ITK errors: unreadable or truncated
        raise DataError(f"{path}: unreadable or truncated {what} file ({type(e).__name__}: {e}).") from None
    allowed = (2, 3) if ndim is None else ((ndim,) if isinstance(ndim, int) else tuple(ndim))
    shape = arr.shape
    while arr.ndim > min(allowed) and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in allowed:
        names = {2: "2D", 3: "3D", 4: "4D"}
        raise DataError(
            f"{path}: {what} has shape {shape} ({names.get(arr.ndim, f'{arr.ndim}D')}) where a "
            f"{' or '.join(names.get(a, str(a)) for a in allowed)} {what} was expected."
        )
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has unsupported voxel type {arr.dtype}.")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(f"{path}: {what} contains NaN or Inf voxels.")
    return Volume(arr, affine, tuple(spacing[: arr.ndim]), path)


def _check_image(vol: Volume) -> None:
    if float(vol.array.max()) == float(vol.array.min()):
        raise DataError(f"{vol.path}: constant image (every voxel is {float(vol.array.min())}).")


def _check_label(
    lab: Volume, img: Volume, allowed: Sequence[int] | Mapping[int, int] = LABEL_SET, key: str = "label"
) -> None:
    """Shape and grid of ``lab`` equal to ``img``'s; every value an integer of ``allowed`` (the provider's label set
    for ACDC / CAMUS, the project's for pair lists). Errors name the label file (and the values found)."""
    if lab.array.shape != img.array.shape:
        raise DataError(
            f"{lab.path}: label shape {lab.array.shape} differs from image shape {img.array.shape} "
            f"({img.path.name})."
        )
    check_geometry(
        lab.affine,
        img.affine,
        [lab.path, img.path],
        moving_shape=lab.array.shape,
        fixed_shape=img.array.shape,
        keys=(key, "image"),
        resample_allowed=False,
    )
    check_labels(lab.array, lab.path, sorted(allowed), key=key)


def _map_labels(a: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    lut = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        lut[k] = v
    return lut[np.asarray(a).astype(np.int64)]


def _normalise(arrays: Sequence[np.ndarray], percentiles: Sequence[float]) -> list[np.ndarray]:
    """Clip to the given percentiles of all ``arrays`` together and scale to [0, 1] (float32)."""
    lo, hi = np.percentile(np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64), list(percentiles))
    if hi <= lo:  # e.g. a sparse image whose percentiles coincide: fall back to min-max
        lo = min(float(np.min(a)) for a in arrays)
        hi = max(float(np.max(a)) for a in arrays)
    return [np.clip((np.asarray(a, np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32) for a in arrays]


# ----------------------------------------------------------------------------------------------------------------------
# writing (all or nothing)
# ----------------------------------------------------------------------------------------------------------------------
