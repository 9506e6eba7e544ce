"""Inference: register image pairs of any size with the trained networks and write the results in the input space.

Used by ``configs/inference.yaml`` (``python -m monai.bundle run --config_file configs/inference.yaml --moving M
--fixed F [--moving_label L] [--uncertainty true] --output_dir OUT``, or ``--datalist pairs.json`` for many pairs in
one process) and usable on its own::

    inferer = RegistrationInferer(network, spatial_size=(128, 128))
    records = inferer.run(make_pairs(moving="m.nii.gz", fixed="f.nii.gz"), "out")

Conventions of the outputs (docs/inference.md):

- everything is written on the grid of the **fixed** image, with the fixed image's affine (hence its spacing),
  as NIfTI (``nibabel``), one file per quantity: ``<id>_ddf.nii.gz``, ``<id>_warped.nii.gz``,
  ``<id>_warped_label.nii.gz``, ``<id>_sigma2.nii.gz``, ``<id>_weight.nii.gz`` and (``overlay: true``)
  ``<id>_overlay.png``;
- the DDF is stored channel-last, shape ``spatial + (ndim,)``, in **voxel units of the fixed grid**, channel i =
  displacement along array axis i, applied as ``monai.networks.blocks.Warp`` does: Î_f(x) = I_m(x + z(x));
- when the input size differs from the network size (``spatial_size``) the pair is resized to it (bilinear,
  labels nearest), the network runs there, and the DDF is resized back (bilinear / trilinear,
  ``align_corners=False``) with its values multiplied per axis by ``input_size_i / network_size_i``;
- ``orientation: canonical`` presents the pair to the network in the canonical frame (array axes sorted by world
  axis, pointing to +: RAS for 3D) and writes every result back in the input's frame (DDF axes and signs mapped back);
- the warped image is the moving image **in its original intensities** warped with that DDF (bilinear, border
  padding as in training); the warped label uses nearest interpolation;
- σ̂² = exp(log σ̂²) of the variance network (intensity² units of the network input, i.e. images in [0, 1]) and
  the Eq. 4 weight map (``SNRWeightedMSELoss.weight_map``, per pair) are computed on the network grid and resized back.

Input contracts (:mod:`scripts.data.contracts`; errors are :class:`scripts.data.DataError` naming the file):
unreadable or truncated files, dimensionality, channels, NaN/Inf, constant images, intensities outside [0, 1] with
``intensity: none`` (refused, never normalised silently: use ``--intensity percentile``), labels outside
{0, 1, 2, 3} or not integer, grids (shape, spacing, direction, origin) that differ (``on_grid_mismatch``). Ids are
sanitised (never a path), the output folder may neither be nor contain an input, existing results are never
replaced without ``overwrite`` and ``overwrite`` removes only files the bundle wrote (marker file). ``run`` writes the
index ``inference.json`` after every pair (``done`` / ``failed`` with the error); a failed pair does not stop the
others unless ``fail_fast``; ``run`` raises :class:`InferenceFailures` at the end when some pair failed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.blocks import Warp
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    ResampleToMatch,
    Resize,
    ScaleIntensityRangePercentiles,
)

from scripts.data import DataError, datalist_path, load_datalist
from scripts.data.contracts import (
    GRID_POLICIES,
    INTENSITY_POLICIES,
    LABEL_SET,
    affine4,
    atomic_write_json,
    check_geometry,
    check_intensity,
    check_labels,
    prepare_output_dir,
    prune_marker,
    read_error,
    read_marker,
    record_written,
    safe_id,
    safe_label_cast,
    stored_dtype,
)
from scripts.trainer import as_flag, load_weights

logger = logging.getLogger(__name__)

__all__ = [
    "RegistrationInferer",
    "InferenceFailures",
    "make_pairs",
    "load_weights",
    "pair_preprocessing",
    "write_outputs",
    "save_nifti",
    "OUTPUT_SUFFIXES",
    "INDEX_NAME",
]

IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
PAIR_KEYS = IMAGE_KEYS + LABEL_KEYS
ORIENTATIONS = ("none", "canonical")
INDEX_NAME = "inference.json"
OUTPUT_SUFFIXES = {
    "ddf": "_ddf.nii.gz",
    "warped": "_warped.nii.gz",
    "warped_label": "_warped_label.nii.gz",
    "sigma2": "_sigma2.nii.gz",
    "weight": "_weight.nii.gz",
    "overlay": "_overlay.png",
}


class InferenceFailures(RuntimeError):
    """Raised by :meth:`RegistrationInferer.run` after all pairs ran when some failed; ``records`` is the index."""

    def __init__(self, message: str, records: list[dict]):
        super().__init__(message)
        self.records = records


def _flag(value: Any, option: str) -> bool:
    try:
        return as_flag(value)
    except ValueError:
        raise ValueError(f"--{option}: expected true or false, got {value!r}.") from None


def _positive_int(value: Any, option: str, allow_none: bool = False) -> int | None:
    if allow_none and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", ""))):
        return None
    try:
        v = float(value)
        ok = np.isfinite(v) and v == int(v) and v >= 1
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"--{option}: expected a whole number >= 1{' or null' if allow_none else ''}, got {value!r}.")
    return int(v)


# ---------------------------------------------------------------------------------------------------- datalists
def make_pairs(
    moving: str | None = None,
    fixed: str | None = None,
    moving_label: str | None = None,
    fixed_label: str | None = None,
    datalist: str | None = None,
    split: str = "test",
    pair_id: str | None = None,
) -> list[dict]:
    """The pairs to register: one pair from ``moving``/``fixed`` (+ labels), or every item of ``datalist``.

    ``datalist`` is a JSON file (or a folder holding ``datalist.json``) that is either a list of items
    ``{"moving", "fixed"[, "moving_label", "fixed_label", "id"]}`` or a bundle datalist with splits (``split``
    is used). Relative paths are relative to the JSON file. Ids are sanitised (:func:`scripts.data.contracts.safe_id`:
    ``../x`` becomes ``x``, ``a/b`` becomes ``a_b``; a warning says so) and made unique (``_1``, ``_2``). Each item
    keeps the datalist it came from under ``"datalist"`` (an input the output folder must not contain).
    """
    items: list[dict] = []
    if datalist:
        path = datalist_path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"--datalist {datalist}: datalist not found ({path}).")
        try:
            with open(path) as f:
                content = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: --datalist is not valid JSON ({e}).") from None
        if isinstance(content, list):
            base = path.parent
            for i, it in enumerate(content):
                if not isinstance(it, Mapping) or "moving" not in it or "fixed" not in it:
                    raise DataError(f"{path}: item {i} needs 'moving' and 'fixed'.")
                it = dict(it)
                for k in PAIR_KEYS:
                    if it.get(k):
                        if not isinstance(it[k], str):
                            raise DataError(f"{path}: item {i} '{k}' must be a path (string), got {it[k]!r}.")
                        p = Path(it[k])
                        it[k] = str(p if p.is_absolute() else base / p)
                it["datalist"] = str(path)
                items.append(it)
        elif isinstance(content, Mapping):
            items = [dict(it, datalist=str(path)) for it in load_datalist(path, split, check_files=False)]
        else:
            raise DataError(f"{path}: --datalist must be a JSON list of pairs or a datalist with splits.")
    if moving is not None or fixed is not None:
        if moving is None or fixed is None:
            raise ValueError("give both --moving and --fixed (or --datalist).")
        items.append(
            {
                "moving": str(moving),
                "fixed": str(fixed),
                "moving_label": moving_label,
                "fixed_label": fixed_label,
                "id": pair_id,
            }
        )
    if not items:
        raise ValueError("nothing to register: give --moving M --fixed F or --datalist pairs.json.")
    seen: dict[str, int] = {}
    for it in items:
        raw = it.get("id")
        name = safe_id(raw, "pair id") if raw not in (None, "") else safe_id(Path(str(it["fixed"])).name.split(".")[0])
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        it["id"] = name
    return items


def pair_preprocessing(keys: Sequence[str] = PAIR_KEYS) -> Compose:
    """Loading step of inference (MONAI transforms): read the files, channel first. The remaining steps (checks,
    intensity scaling, resizing) need the per-pair bookkeeping of :class:`RegistrationInferer`."""
    return Compose(
        [
            LoadImaged(list(keys), image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(list(keys), allow_missing_keys=True),
        ]
    )


# ------------------------------------------------------------------------------------------------------- saving
_affine4 = affine4


def save_nifti(array: np.ndarray, affine: Any, path: str | os.PathLike, dtype=np.float32) -> str:
    """Write ``array`` (spatial dims first, channels last) as NIfTI with ``affine`` (4x4, world mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array).astype(dtype), affine4(affine))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return str(path)


def write_outputs(result: Mapping[str, Any], output_dir: str | os.PathLike, overlay: bool = False) -> dict:
    """Write one pair's results (from :meth:`RegistrationInferer.infer`) into ``output_dir``; return the paths.

    The file names are ``<id><suffix>`` (:data:`OUTPUT_SUFFIXES`); ``id`` must be a plain name (no path parts)."""
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
    if result.get("sigma2") is not None:
        files["sigma2"] = save_nifti(arr(result["sigma2"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['sigma2']}")
    if result.get("weight") is not None:
        files["weight"] = save_nifti(arr(result["weight"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['weight']}")
    if overlay:
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
        files["overlay"] = plot_panel(case, out / f"{cid}{OUTPUT_SUFFIXES['overlay']}", title=str(cid))
    return files


# ------------------------------------------------------------------------------------------------- orientation
class _Frame:
    """The permutation and flips that bring a (C, *spatial) array of a grid to the canonical frame and back.

    Canonical: array axes sorted by the world axis they point along, each pointing to + (nibabel's
    ``io_orientation``; RAS for a 3D image). Canonical axis j is input axis ``order[j]``."""

    def __init__(self, affine: Any, nd: int):
        from nibabel.orientations import io_orientation

        a = affine4(affine)
        sub = np.zeros((4, nd + 1))
        sub[:3, :nd], sub[:3, nd], sub[3, nd] = a[:3, :nd], a[:3, 3], 1.0
        ornt = io_orientation(sub)
        if not np.isfinite(ornt).all():
            raise DataError("orientation: the fixed image's affine is degenerate; use --orientation none.")
        self.order = [int(i) for i in np.argsort(ornt[:, 0], kind="stable")]
        self.inverse = [int(i) for i in np.argsort(self.order)]
        self.flips = [i for i in range(nd) if ornt[i, 1] < 0]
        self.signs = torch.tensor([-1.0 if i in self.flips else 1.0 for i in range(nd)])
        self.identity = self.order == list(range(nd)) and not self.flips

    def to_canonical(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if self.flips:
            x = x.flip([1 + i for i in self.flips])
        return x.permute(0, *[1 + i for i in self.order]).contiguous()

    def from_canonical(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        x = x.permute(0, *[1 + i for i in self.inverse])
        if self.flips:
            x = x.flip([1 + i for i in self.flips])
        return x.contiguous()

    def ddf_from_canonical(self, ddf: torch.Tensor) -> torch.Tensor:
        """Spatial axes back to the input frame, channel j (canonical axis j) to input axis ``order[j]``, signed."""
        if self.identity:
            return ddf
        d = self.from_canonical(ddf)[self.inverse]
        return d * self.signs.to(d).view(-1, *([1] * (d.ndim - 1)))


# ----------------------------------------------------------------------------------------------------- inferer
class RegistrationInferer:
    """Register pairs of images with the displacement network (and, on request, the variance network).

    Args:
        network: displacement network, ``network(cat([moving, fixed], 1)) -> DDF`` (voxel units of its grid).
        spatial_size: the network input size; pairs of another size are resized to it and the results resized
            back (DDF values rescaled per axis).
        variance_network: the variance estimator (``cat([warped, fixed], 1) -> log σ̂²``), or ``None``.
        weight_fn: ``(fixed, log_var) -> weight`` (the Eq. 4 weight map), e.g. ``SNRWeightedMSELoss.weight_map``;
            applied per pair (its normalisation is over the whole tensor it gets).
        uncertainty: compute σ̂² and the weight map (needs ``variance_network``).
        intensity: ``"none"`` (images must already be in [0, 1]: anything else is refused) or ``"percentile"``
            (0.5-99.5 percentiles -> [0, 1], any finite range).
        on_grid_mismatch: ``"error"`` (default) or ``"resample"`` when moving and fixed differ in shape, spacing,
            direction or origin (full affines, tolerance ``geometry_tol``).
        device: torch device.
        preprocessing: the loading transform (default :func:`pair_preprocessing`).
        padding_mode: padding of the image warp (``"border"`` as in training).
        overlay: write a PNG panel per pair (≈ 1 s of CPU per pair; off by default).
        spacing_rtol: deprecated alias of ``geometry_tol``.
        geometry_tol: relative tolerance on spacing, absolute on direction cosines, fraction of a voxel on origin.
        orientation: ``"none"`` (the network sees the arrays as stored, as in training) or ``"canonical"``.
        batch_size: pairs per forward pass in :meth:`run`.
        threads: ``torch.set_num_threads`` (``None``: leave torch's default).
        overwrite: let :meth:`run` replace what the bundle wrote earlier in the output folder.
        fail_fast: stop :meth:`run` at the first failed pair (default: record it and go on).
        progress: a tqdm progress bar in :meth:`run`.
        label_set: the allowed label values.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        spatial_size: Sequence[int],
        variance_network: torch.nn.Module | None = None,
        weight_fn: Callable | None = None,
        uncertainty: bool | str = False,
        intensity: str = "none",
        on_grid_mismatch: str = "error",
        device: str | torch.device = "cpu",
        preprocessing: Callable | None = None,
        padding_mode: str = "border",
        overlay: bool | str = False,
        spacing_rtol: float | None = None,
        geometry_tol: float = 1e-3,
        orientation: str = "none",
        batch_size: int | str = 1,
        threads: int | str | None = None,
        overwrite: bool | str = False,
        fail_fast: bool | str = False,
        progress: bool | str = True,
        label_set: Sequence[int] = LABEL_SET,
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.nd = len(self.spatial_size)
        if self.nd not in (2, 3):
            raise ValueError(f"--spatial_size must have 2 or 3 entries, got {spatial_size}.")
        if intensity not in INTENSITY_POLICIES:
            raise ValueError(f"--intensity must be one of {list(INTENSITY_POLICIES)}, got {intensity!r}.")
        if on_grid_mismatch not in GRID_POLICIES:
            raise ValueError(f"--on_grid_mismatch must be one of {list(GRID_POLICIES)}, got {on_grid_mismatch!r}.")
        if orientation in (None, "null"):
            orientation = "none"
        if orientation not in ORIENTATIONS:
            raise ValueError(f"--orientation must be one of {list(ORIENTATIONS)}, got {orientation!r}.")
        self.geometry_tol = float(spacing_rtol if spacing_rtol is not None else geometry_tol)
        if not (np.isfinite(self.geometry_tol) and 0 < self.geometry_tol < 0.5):
            raise ValueError(f"--geometry_tol must be in (0, 0.5), got {geometry_tol!r}.")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.threads = _positive_int(threads, "threads", allow_none=True)
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.uncertainty = _flag(uncertainty, "uncertainty")
        if self.uncertainty and variance_network is None:
            raise ValueError("uncertainty=true needs the variance network (this config has variance_def: null).")
        self.variance_network = variance_network.to(self.device).eval() if variance_network is not None else None
        self.weight_fn = weight_fn
        self.intensity = intensity
        self.on_grid_mismatch = on_grid_mismatch
        self.orientation = orientation
        self.preprocessing = preprocessing if preprocessing is not None else pair_preprocessing()
        self.overlay = _flag(overlay, "overlay")
        self.overwrite = _flag(overwrite, "overwrite")
        self.fail_fast = _flag(fail_fast, "fail_fast")
        self.progress = _flag(progress, "progress")
        self.label_set = tuple(int(v) for v in label_set)
        self.warp = Warp(mode="bilinear", padding_mode=padding_mode)
        self.label_warp = Warp(mode="nearest", padding_mode="border")
        self.linear = "bilinear" if self.nd == 2 else "trilinear"

    # ------------------------------------------------------------------------------------------------ loading
    def _read(self, key: str, path: str):
        try:
            return self.preprocessing({key: path})[key]
        except Exception as e:  # noqa: BLE001 - every reader error becomes one message naming the file
            raise read_error(path, e, f"'{key}' image") from e

    def load(self, item: Mapping[str, Any]) -> dict:
        """Load and check one pair; return channel-first MetaTensors on the fixed grid (squeezed to the network's
        dimensionality) and ``output_shape``, the fixed image's own spatial shape."""
        for k in IMAGE_KEYS:
            if not item.get(k):
                raise ValueError(f"pair {item.get('id')}: '{k}' is required.")
        for k in PAIR_KEYS:
            v = item.get(k)
            if v is None:
                continue
            if not Path(str(v)).is_file():
                raise FileNotFoundError(f"{v}: '{k}' file does not exist.")
        data = {k: self._read(k, str(item[k])) for k in PAIR_KEYS if item.get(k) is not None}
        output_shape = tuple(int(s) for s in data["fixed"].shape[1:])
        for k in [k for k in PAIR_KEYS if k in data]:
            data[k] = self._check_dims(data[k], str(item[k]), k)
            if k in IMAGE_KEYS:
                check_intensity(data[k], item[k], self.intensity, key=k, stored_dtype=stored_dtype(data[k]))
            else:
                check_labels(data[k], item[k], self.label_set, key=k)
        self._check_grid(data, item)
        return {"data": data, "output_shape": output_shape}

    def _check_dims(self, x, name: str, key: str):
        if x.shape[0] != 1:
            raise DataError(f"{name}: '{key}' has {x.shape[0]} channels (shape {tuple(x.shape)}); expected one.")
        spatial = tuple(x.shape[1:])
        if len(spatial) == self.nd:
            return x
        if len(spatial) == self.nd + 1 and spatial[-1] == 1:  # 2D image stored as (H, W, 1)
            y = x[..., 0]
            if hasattr(x, "affine"):
                y.affine = x.affine  # the 4x4 affine is kept for writing
            return y
        raise DataError(
            f"{name}: '{key}' has {len(spatial)} spatial dims (shape {spatial}), the network is {self.nd}D "
            f"(spatial_dims={self.nd}, spatial_size={list(self.spatial_size)}): use the "
            f"{'3D' if len(spatial) == 3 else '2D'} configuration (--spatial_dims {len(spatial)} --spatial_size ...) "
            f"with matching weights."
        )

    def _check_grid(self, data: dict, item: Mapping) -> None:
        fixed = data["fixed"]
        for k in ("moving", "moving_label", "fixed_label"):
            if k not in data:
                continue
            x = data[k]
            same = check_geometry(
                x.affine,
                fixed.affine,
                (item[k], item["fixed"]),
                tol=self.geometry_tol,
                on_mismatch=self.on_grid_mismatch,
                moving_shape=x.shape[1:],
                fixed_shape=fixed.shape[1:],
                keys=(k, "fixed"),
                resample_allowed=k != "fixed_label",
            )
            if not same:
                mode = "nearest" if k in LABEL_KEYS else "bilinear"
                data[k] = ResampleToMatch(mode=mode, padding_mode="border")(x, img_dst=fixed)

    # -------------------------------------------------------------------------------------------------- infer
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.intensity == "percentile":
            return ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(x)
        return x

    def _resize(self, x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
        if tuple(x.shape[1:]) == tuple(size):
            return x
        return self._plain(Resize(tuple(size), mode=mode, anti_aliasing=False)(x))

    @staticmethod
    def _plain(x) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.float()

    def prepare(self, item: Mapping[str, Any]) -> dict:
        """Load and check one pair and make the network inputs (``m_net``, ``f_net``: (1, 1, *spatial_size))."""
        loaded = self.load(item)
        data = loaded["data"]
        moving_s = self._plain(self._scale(data["moving"]))
        fixed_s = self._plain(self._scale(data["fixed"]))
        frame = _Frame(data["fixed"].affine, self.nd) if self.orientation == "canonical" else None
        m_c = frame.to_canonical(moving_s) if frame else moving_s
        f_c = frame.to_canonical(fixed_s) if frame else fixed_s
        can_size = tuple(m_c.shape[1:])
        return {
            "item": item,
            "data": data,
            "output_shape": loaded["output_shape"],
            "moving_s": moving_s,
            "fixed_s": fixed_s,
            "frame": frame,
            "can_size": can_size,
            "m_net": self._resize(m_c, self.spatial_size, self.linear)[None],
            "f_net": self._resize(f_c, self.spatial_size, self.linear)[None],
        }

    @torch.no_grad()
    def forward(self, preps: Sequence[Mapping[str, Any]]) -> list[dict]:
        """One forward pass of the networks on a batch of prepared pairs; per pair ``ddf``/``log_var``/``weight``
        on the network grid ((C, *spatial_size), CPU)."""
        m = torch.cat([p["m_net"] for p in preps], 0).to(self.device)
        f = torch.cat([p["f_net"] for p in preps], 0).to(self.device)
        ddf = self.network(torch.cat([m, f], dim=1)).float()
        log_var = None
        if self.uncertainty:
            log_var = self.variance_network(torch.cat([self.warp(m, ddf), f], dim=1)).float()
        outs = []
        for i in range(len(preps)):
            o = {"ddf": ddf[i].cpu(), "log_var": None, "weight": None}
            if log_var is not None:
                o["log_var"] = log_var[i].cpu()
                if self.weight_fn is not None:  # per pair: the weight's normalisation spans the tensor it is given
                    one = slice(i, i + 1)
                    o["weight"] = self.weight_fn(f[one], log_var[one]).float()[0].cpu()
            outs.append(o)
        return outs

    @torch.no_grad()
    def finish(self, prep: Mapping[str, Any], out: Mapping[str, Any]) -> dict:
        """Bring one pair's network outputs back to the input grid and warp; the result :func:`write_outputs` takes."""
        data, frame, can_size = prep["data"], prep["frame"], prep["can_size"]
        resized = can_size != self.spatial_size
        ddf = out["ddf"]
        if resized:
            ddf = self._resize(ddf, can_size, self.linear)
            scale = torch.tensor([i / n for i, n in zip(can_size, self.spatial_size)], dtype=ddf.dtype)
            ddf = ddf * scale.view(-1, *([1] * self.nd))
        if frame is not None:
            ddf = frame.ddf_from_canonical(ddf)

        def back(x):
            if x is None:
                return None
            x = self._resize(x, can_size, self.linear) if resized else x
            return frame.from_canonical(x) if frame is not None else x

        moving_raw = self._plain(data["moving"])
        warped = self.warp(moving_raw[None], ddf[None])[0]
        log_var = back(out["log_var"])
        result = {
            "id": prep["item"]["id"],
            "ddf": ddf,
            "warped": warped,
            "sigma2": None if log_var is None else torch.exp(log_var),
            "weight": back(out["weight"]),
            "affine": affine4(data["fixed"].affine),
            "output_shape": prep["output_shape"],
            "input_size": list(moving_raw.shape[1:]),
            "network_size": list(self.spatial_size),
            "resized": resized,
            "reoriented": frame is not None and not frame.identity,
            "moving_display": prep["moving_s"],
            "fixed_display": prep["fixed_s"],
            "warped_display": self.warp(prep["moving_s"][None], ddf[None])[0] if self.overlay else None,
            "fixed_label": self._plain(data["fixed_label"]) if "fixed_label" in data else None,
            "warped_label": None,
        }
        if "moving_label" in data:
            result["warped_label"] = self.label_warp(self._plain(data["moving_label"])[None], ddf[None])[0]
        return result

    @torch.no_grad()
    def infer(self, item: Mapping[str, Any]) -> dict:
        """Register one pair; return tensors (C, *spatial) on the fixed grid and the bookkeeping to write them."""
        prep = self.prepare(item)
        return self.finish(prep, self.forward([prep])[0])

    def __call__(self, item: Mapping[str, Any]) -> dict:
        return self.infer(item)

    # ---------------------------------------------------------------------------------------------------- run
    @staticmethod
    def _summary(records: list[dict]) -> dict:
        return {
            "ddf": "channel-last, voxel units of the fixed grid, channel i = displacement along array axis i, "
            "warped(x) = moving(x + ddf(x)) (monai.networks.blocks.Warp)",
            "sigma2": "exp(log variance) of the variance network, intensity^2 of images scaled to [0, 1]",
            "weight": "Eq. 4 weight map, sigmoid of the normalised SNR",
            "status": "per pair: 'done' (outputs written) or 'failed' (error; no outputs of that pair)",
            "pairs": records,
        }

    def _previous_records(self, out: Path, ids: set[str]) -> list[dict]:
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
            raise DataError(
                f"{index}: unreadable index of an earlier run ({e}); rerun with --overwrite true."
            ) from None
        return [r for r in old if isinstance(r, dict) and r.get("id") not in ids]

    def run(
        self, pairs: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, overwrite: bool | None = None
    ) -> list[dict]:
        """Register every pair (``batch_size`` per forward) and write its outputs into ``output_dir``.

        Before anything is written: ids must be unique plain names, the folder may neither be nor contain an input,
        and files of these ids already there are refused unless ``overwrite`` (which first removes every file the
        bundle wrote there earlier, listed in its marker). The index ``inference.json`` is rewritten (atomically)
        after every pair, with ``status`` ``done`` or ``failed`` (and the error); records of other ids from earlier
        runs into the same folder are kept. A failed pair leaves no files; the others go on unless ``fail_fast``.
        Returns this run's records; raises :class:`InferenceFailures` at the end if a pair failed (or the pair's own
        error when it is the only pair or ``fail_fast`` is set).
        """
        overwrite = self.overwrite if overwrite is None else _flag(overwrite, "overwrite")
        pairs = list(pairs)
        ids = [str(p.get("id")) for p in pairs]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise DataError(f"duplicate pair ids {dup}: make them unique (make_pairs does).")
        for i in ids:
            if i != safe_id(i):
                raise DataError(f"pair id {i!r}: not a plain file name (make_pairs sanitises ids).")
        inputs = [p.get(k) for p in pairs for k in PAIR_KEYS + ("datalist",)]
        planned = [f"{i}{s}" for i in ids for s in OUTPUT_SUFFIXES.values()]
        out = prepare_output_dir(output_dir, inputs, overwrite, planned, tool="inference")
        index_path = out / INDEX_NAME
        previous = self._previous_records(out, set(ids))
        records: list[dict] = []

        # every name this run may write is in the marker before it is written (a crash leaves nothing unlisted);
        # names never written are dropped from it at the end. A pair counts as done once the index says so.
        record_written(out, planned + [INDEX_NAME], tool="inference")

        def save_index():
            atomic_write_json(index_path, self._summary(previous + records))

        def fail(item: Mapping, err: BaseException) -> None:
            cid = str(item.get("id"))
            for s in OUTPUT_SUFFIXES.values():  # they did not exist before this run (checked above)
                p = out / f"{cid}{s}"
                if p.is_file():
                    p.unlink()
            msg = f"{type(err).__name__}: {err}"
            records.append(
                {
                    "id": cid,
                    "status": "failed",
                    "inputs": {k: item.get(k) for k in PAIR_KEYS if item.get(k)},
                    "error": msg,
                }
            )
            logger.error("pair %s failed: %s", cid, msg)
            save_index()
            if self.fail_fast or len(pairs) == 1:
                raise err

        bar = None
        if self.progress and len(pairs) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pairs), desc="inference", unit="pair")
        t0 = time.perf_counter()
        try:
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[slice(start, start + self.batch_size)]
                preps = []
                for item in chunk:
                    try:
                        preps.append(self.prepare(item))
                    except Exception as e:  # noqa: BLE001 - recorded per pair
                        fail(item, e)
                        if bar is not None:
                            bar.update(1)
                if not preps:
                    continue
                try:
                    outs = self.forward(preps)
                except Exception as e:  # noqa: BLE001
                    for p in preps:
                        fail(p["item"], e)
                    continue
                for prep, o in zip(preps, outs):
                    item = prep["item"]
                    try:
                        result = self.finish(prep, o)
                        files = write_outputs(result, out, overlay=self.overlay)
                    except Exception as e:  # noqa: BLE001
                        fail(item, e)
                    else:
                        records.append(
                            {
                                "id": result["id"],
                                "status": "done",
                                "inputs": {k: item.get(k) for k in PAIR_KEYS if item.get(k)},
                                "outputs": files,
                                "input_size": result["input_size"],
                                "network_size": result["network_size"],
                                "resized": result["resized"],
                                "reoriented": result["reoriented"],
                            }
                        )
                        save_index()
                        logger.debug("registered %s -> %s", result["id"], out)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            prune_marker(out)
        failed = [r for r in records if r["status"] == "failed"]
        logger.info(
            "inference: %d pair(s) done, %d failed in %.1f s -> %s",
            len(records) - len(failed),
            len(failed),
            time.perf_counter() - t0,
            index_path,
        )
        if failed:
            first = failed[0]
            raise InferenceFailures(
                f"{len(failed)} of {len(pairs)} pairs failed ({', '.join(r['id'] for r in failed[:10])}); the other "
                f"pairs' results are written; errors per pair in {index_path}. First: {first['id']}: {first['error']}",
                records,
            )
        return records


# ------------------------------------------------------------------------------------------------------- bench
def _bare_pair(network, warp, label_warp, item: Mapping, out: Path, device) -> None:
    """The floor of one pair: read the files, one ``no_grad`` forward, warp, write the same NIfTI files."""
    import nibabel as nib

    imgs = {k: nib.load(item[k]) for k in ("moving", "fixed", "moving_label") if item.get(k)}
    arrs = {k: torch.from_numpy(np.asarray(v.dataobj, dtype=np.float32))[None, None] for k, v in imgs.items()}
    with torch.no_grad():
        ddf = network(torch.cat([arrs["moving"], arrs["fixed"]], 1).to(device)).float().cpu()
        warped = warp(arrs["moving"], ddf)
        lab = label_warp(arrs["moving_label"], ddf) if "moving_label" in arrs else None
    aff = imgs["fixed"].affine
    cid = item["id"]
    save_nifti(np.moveaxis(ddf[0].numpy(), 0, -1), aff, out / f"{cid}_ddf.nii.gz")
    save_nifti(warped[0, 0].numpy(), aff, out / f"{cid}_warped.nii.gz")
    if lab is not None:
        save_nifti(np.rint(lab[0, 0].numpy()), aff, out / f"{cid}_warped_label.nii.gz", np.uint8)


def benchmark(
    datalist: str,
    ckpt_path: str | None = None,
    split: str = "test",
    n_pairs: int = 20,
    repeats: int = 5,
    batch_sizes: Sequence[int] = (1, 4),
    demons_pairs: int = 4,
    threads: int = 1,
    config_file: str | None = None,
    work_dir: str | None = None,
) -> dict:
    """Per-pair marginal cost of ``RegistrationInferer.run`` against the bare forward + I/O, interleaved.

    Each repeat runs the cases in turn (bare, bundle b=1, bundle b=4, ...: A B C A B C ...) on the same ``n_pairs``
    pairs (moving, fixed, moving label), each into a fresh folder, in this process (imports and network construction
    excluded: the marginal cost). Reports the median seconds per pair of each case and the ratios to the bare case;
    then the bundle's ITK demons (``scripts.classical``, ``num_threads=threads``) on ``demons_pairs`` pairs.
    """
    import shutil
    import tempfile

    from monai.bundle import ConfigParser

    torch.set_num_threads(int(threads))
    root = Path(__file__).resolve().parents[1]
    parser = ConfigParser()
    parser.read_config(config_file or str(root / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(root)
    parser["device"] = "$torch.device('cpu')"
    if ckpt_path:
        parser["ckpt_path"] = ckpt_path
    network = parser.get_parsed_content("network")
    spatial_size = parser.get_parsed_content("spatial_size")
    pairs = make_pairs(datalist=datalist, split=split)[: int(n_pairs)]
    pairs = [{k: p[k] for k in ("moving", "fixed", "moving_label", "id") if p.get(k)} for p in pairs]
    tmp = Path(work_dir or tempfile.mkdtemp(prefix="inference_bench_"))
    warp, label_warp = Warp("bilinear", "border"), Warp("nearest", "border")
    inferers = {b: RegistrationInferer(network, spatial_size, batch_size=b, progress=False) for b in batch_sizes}
    cases = ["bare"] + [f"bundle_b{b}" for b in batch_sizes]
    wall: dict[str, list[float]] = {c: [] for c in cases}
    cpu: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(int(repeats) + 1):  # repeat 0 warms up (allocator, lazy imports) and is not counted
        for c in cases:
            out = tmp / f"{c}_{r}"
            out.mkdir(parents=True)
            t, tc = time.perf_counter(), time.process_time()
            if c == "bare":
                for item in pairs:
                    _bare_pair(network, warp, label_warp, item, out, "cpu")
            else:
                inferers[int(c.split("_b")[1])].run(pairs, out)
            if r:
                wall[c].append((time.perf_counter() - t) / len(pairs))
                cpu[c].append((time.process_time() - tc) / len(pairs))
            shutil.rmtree(out)
    med = {c: float(np.median(v)) for c, v in wall.items()}
    med_cpu = {c: float(np.median(v)) for c, v in cpu.items()}
    report = {
        "pairs": len(pairs),
        "repeats": int(repeats),
        "threads": int(threads),
        "seconds_per_pair": med,
        "cpu_seconds_per_pair": med_cpu,
        "wall": wall,
        "cpu": cpu,
        "ratio_to_bare": {c: med[c] / med["bare"] for c in cases if c != "bare"},
        "cpu_ratio_to_bare": {c: med_cpu[c] / med_cpu["bare"] for c in cases if c != "bare"},
    }
    if demons_pairs:
        import nibabel as nib

        from scripts.classical import register_pair

        secs, csecs = [], []
        for n, item in enumerate([pairs[0]] + pairs[: int(demons_pairs)]):  # the first call loads ITK: not counted
            m, f = (np.asarray(nib.load(item[k]).dataobj, dtype=np.float32) for k in ("moving", "fixed"))
            spacing = nib.load(item["fixed"]).header.get_zooms()[: m.ndim]
            t, tc = time.perf_counter(), time.process_time()
            register_pair(m, f, "demons", spacing=spacing, num_threads=int(threads))
            if n:
                secs.append(time.perf_counter() - t)
                csecs.append(time.process_time() - tc)
        report["demons_seconds_per_pair"] = float(np.median(secs))
        report["demons_cpu_seconds_per_pair"] = float(np.median(csecs))
        report["demons_over_bundle"] = report["demons_seconds_per_pair"] / min(med[c] for c in cases if c != "bare")
        report["demons_cpu_over_bundle"] = report["demons_cpu_seconds_per_pair"] / min(
            med_cpu[c] for c in cases if c != "bare"
        )
    if not work_dir:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m scripts.inference bench --datalist DIR [--n_pairs 20 --repeats 5 --batch_sizes 1,4 ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m scripts.inference", description=main.__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="per-pair cost of inference vs the bare forward + I/O, and ITK demons")
    b.add_argument("--datalist", required=True)
    b.add_argument("--split", default="test")
    b.add_argument("--ckpt_path", default=None)
    b.add_argument("--n_pairs", type=int, default=20)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--batch_sizes", default="1,4")
    b.add_argument("--demons_pairs", type=int, default=4)
    b.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rep = benchmark(
        a.datalist,
        a.ckpt_path,
        a.split,
        a.n_pairs,
        a.repeats,
        [int(x) for x in a.batch_sizes.split(",") if x],
        a.demons_pairs,
        a.threads,
    )
    print(f"{rep['pairs']} pairs, {rep['repeats']} interleaved repeats, {rep['threads']} thread(s); medians per pair:")
    for c, s in rep["seconds_per_pair"].items():
        cs = rep["cpu_seconds_per_pair"][c]
        ratio = (
            f"   x{rep['ratio_to_bare'][c]:.2f} wall, x{rep['cpu_ratio_to_bare'][c]:.2f} CPU of bare"
            if c != "bare"
            else ""
        )
        print(f"  {c:12s} {s * 1e3:8.1f} ms wall {cs * 1e3:8.1f} ms CPU{ratio}")
    if "demons_seconds_per_pair" in rep:
        print(
            f"  ITK demons   {rep['demons_seconds_per_pair'] * 1e3:8.1f} ms wall "
            f"{rep['demons_cpu_seconds_per_pair'] * 1e3:8.1f} ms CPU   = x{rep['demons_over_bundle']:.1f} wall, "
            f"x{rep['demons_cpu_over_bundle']:.1f} CPU of the best bundle case"
        )


if __name__ == "__main__":
    main()
