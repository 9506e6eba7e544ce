"""Inference outputs: the NIfTI files of a pair (through ``monai.transforms.SaveImage``), its PNG overlay, and the
run's index ``inference.json``.

File names are ``<id><suffix>`` (:data:`OUTPUT_SUFFIXES`), on the fixed image's grid with its affine
(docs/inference.md): the DDF channel-last (``spatial + (ndim,)``, float32), the warped image, σ̂² and the weight map
as float32, the warped label as uint8.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.transforms import SaveImage

from scripts.data import DataError
from scripts.data.contracts import affine4, read_marker, safe_id, safe_label_cast

__all__ = ["OUTPUT_SUFFIXES", "INDEX_NAME", "save_nifti", "write_outputs", "index_summary", "previous_records"]

INDEX_NAME = "inference.json"
OUTPUT_SUFFIXES = {
    "ddf": "_ddf.nii.gz",
    "warped": "_warped.nii.gz",
    "warped_label": "_warped_label.nii.gz",
    "sigma2": "_sigma2.nii.gz",
    "weight": "_weight.nii.gz",
    "overlay": "_overlay.png",
}
_EXT = ".nii.gz"


def _saver(dtype) -> SaveImage:
    """``SaveImage`` writing an array exactly in the layout it is given (spatial axes first, vector components last):
    ``channel_dim=-1`` (the last axis stays last), no squeezing of trailing singleton axes, no padding to 3 spatial
    dims; the affine comes from the metadata. ``resample=True`` onto the array's own affine and size is a no-op (the
    data and the affine are kept exactly); MONAI 1.6's writer cannot take a 2D array with a 4x4 affine with
    ``resample=False``."""
    saver = SaveImage(
        output_ext=_EXT,
        output_dtype=dtype,
        resample=True,
        squeeze_end_dims=False,
        channel_dim=-1,
        separate_folder=False,
        writer="NibabelWriter",
        print_log=False,
    )
    saver.set_options(data_kwargs={"spatial_ndim": None})
    return saver


def save_nifti(array: np.ndarray, affine: Any, path: str | os.PathLike, dtype=np.float32) -> str:
    """Write ``array`` (spatial dims first, channels last) as NIfTI (``path`` ends with ``.nii.gz``) with ``affine``
    (4x4, world mm; spatial units mm) through :class:`monai.transforms.SaveImage`."""
    path = str(path)
    if not path.endswith(_EXT):
        raise ValueError(f"{path}: NIfTI outputs end with {_EXT}.")
    aff = affine4(affine)
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm")
    header.set_data_dtype(dtype)  # nibabel writes in the header's dtype
    saver = _saver(dtype)
    saver.set_options(write_kwargs={"header": header})
    saver(
        np.asarray(array),
        meta_data={"affine": aff, "original_affine": aff, "spatial_shape": -1},
        filename=path[: -len(_EXT)],
    )
    return path


def write_outputs(result: Mapping[str, Any], output_dir: str | os.PathLike, overlay: bool = False) -> dict:
    """Write one pair's results (from :meth:`scripts.inference.RegistrationInferer.finish`) into ``output_dir``;
    return the paths. ``id`` must be a plain name (no path parts)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cid, affine, shape = str(result["id"]), result["affine"], tuple(result["output_shape"])
    if cid != safe_id(cid):
        raise DataError(f"pair id {cid!r}: not a plain file name (use make_pairs, which sanitises ids).")
    files: dict[str, str] = {}

    def arr(x: torch.Tensor, channel_last: bool = False) -> np.ndarray:
        a = x.detach().cpu().float().numpy()  # (C, *spatial) on the (squeezed) fixed grid
        if channel_last:
            return np.moveaxis(a, 0, -1).reshape(shape + (a.shape[0],))
        return a[0].reshape(shape)

    files["ddf"] = save_nifti(arr(result["ddf"], True), affine, out / f"{cid}{OUTPUT_SUFFIXES['ddf']}")
    files["warped"] = save_nifti(arr(result["warped"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['warped']}")
    if result.get("warped_label") is not None:
        path = out / f"{cid}{OUTPUT_SUFFIXES['warped_label']}"
        lab = safe_label_cast(arr(result["warped_label"]), path, np.uint8, allowed=None)
        files["warped_label"] = save_nifti(lab, affine, path, np.uint8)
    for k in ("sigma2", "weight"):
        if result.get(k) is not None:
            files[k] = save_nifti(arr(result[k]), affine, out / f"{cid}{OUTPUT_SUFFIXES[k]}")
    if overlay:
        files["overlay"] = write_overlay(result, out / f"{cid}{OUTPUT_SUFFIXES['overlay']}")
    return files


def write_overlay(result: Mapping[str, Any], path: str | os.PathLike) -> str:
    """One PNG panel of the pair (moving, fixed, warped, DDF, σ̂², weight, labels): ``scripts.plots.plot_panel``.
    The inference config names no label, so the contours and the Dice (when both labels are given) cover every
    foreground label (> 0); the grid spacing is given in mm from the fixed image's affine."""
    from scripts.plots import plot_panel

    case = {
        "moving": result["moving_display"],
        "fixed": result["fixed_display"],
        "warped": result["warped_display"],
        "ddf": result["ddf"],
        "log_var": None if result.get("sigma2") is None else torch.log(result["sigma2"]),
        "weight": result.get("weight"),
        "warped_label": result.get("warped_label"),
        "fixed_label": result.get("fixed_label"),
    }
    aff = affine4(result["affine"])
    nd = int(result["ddf"].shape[0])
    spacing = [float(v) for v in np.linalg.norm(aff[:3, :3], axis=0)[:nd]] if nd <= 3 else None
    return plot_panel(case, path, title=str(result["id"]), label=None, spacing=spacing)


# ---------------------------------------------------------------------------------------------------- the index
def index_summary(records: list[dict]) -> dict:
    """The content of ``inference.json``: what the outputs are, and one record per pair."""
    return {
        "ddf": "channel-last, voxel units of the fixed grid, channel i = displacement along array axis i, "
        "warped(x) = moving(x + ddf(x)) (monai.networks.blocks.Warp)",
        "sigma2": "exp(log variance) of the variance network, intensity^2 of images scaled to [0, 1]",
        "weight": "Eq. 4 weight map, sigmoid of the normalised SNR",
        "sigma_scale": "per pair: the validation sigma scale s applied (sigma2 = s^2 x the network's), null: none",
        "qc_score": "per pair: mean inverse-consistency error |z_fw(x) + z_bw(x + z_fw(x))|, pixels of the network "
        "grid, over the image field of view; larger = less trustworthy (review the largest first)",
        "status": "per pair: 'done' (outputs written) or 'failed' (error; no outputs of that pair)",
        "pairs": records,
    }


def previous_records(out: Path, ids: set[str]) -> list[dict]:
    """The records of ``out/inference.json`` written by an earlier run, except those of ``ids`` (rerun now)."""
    index = out / INDEX_NAME
    if not index.exists():
        return []
    if INDEX_NAME not in read_marker(out)["files"]:
        raise DataError(
            f"--output_dir {out}: holds an {INDEX_NAME} the bundle did not write; choose another "
            "output folder (it is never deleted or rewritten)."
        )
    try:
        old = json.loads(index.read_text())["pairs"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DataError(f"{index}: unreadable index of an earlier run ({e}); rerun with --overwrite true.") from None
    return [r for r in old if isinstance(r, dict) and r.get("id") not in ids]
