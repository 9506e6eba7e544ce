"""Inference: register image pairs of any size with the trained networks and write the results in the input space.

Used by ``configs/inference.yaml`` (``python -m monai.bundle run --config_file configs/inference.yaml --moving M
--fixed F [--moving_label L] [--uncertainty true] --output_dir OUT``) and usable on its own::

    inferer = RegistrationInferer(network, spatial_size=(128, 128))
    records = inferer.run(make_pairs(moving="m.nii.gz", fixed="f.nii.gz"), "out")

Conventions of the outputs (docs/inference.md):

- everything is written on the grid of the **fixed** image, with the fixed image's affine (hence its spacing),
  as NIfTI (``nibabel``), one file per quantity: ``<id>_ddf.nii.gz``, ``<id>_warped.nii.gz``,
  ``<id>_warped_label.nii.gz``, ``<id>_sigma2.nii.gz``, ``<id>_weight.nii.gz`` and ``<id>_overlay.png``;
- the DDF is stored channel-last, shape ``spatial + (ndim,)``, in **voxel units of the fixed grid**, channel i =
  displacement along array axis i, applied as ``monai.networks.blocks.Warp`` does: Î_f(x) = I_m(x + z(x));
- when the input size differs from the network size (``spatial_size``) the pair is resized to it (bilinear,
  labels nearest), the network runs there, and the DDF is resized back (bilinear / trilinear,
  ``align_corners=False``) with its values multiplied per axis by ``input_size_i / network_size_i``: voxel i of
  the network grid covers ``input_size_i / network_size_i`` input voxels;
- the warped image is the moving image **in its original intensities** warped with that DDF (bilinear, border
  padding as in training); the warped label uses nearest interpolation;
- σ̂² = exp(log σ̂²) of the variance network (intensity² units of the network input, i.e. images in [0, 1]) and
  the Eq. 4 weight map (``SNRWeightedMSELoss.weight_map``) are computed on the network grid and resized back
  (log σ̂² is interpolated, then exponentiated).

Input checks raise :class:`scripts.data.DataError` (a ``ValueError``) or ``FileNotFoundError`` naming the file:
missing file, dimensionality different from the network's, NaN/Inf voxels, constant image, and moving/fixed
with different shapes or spacings (``on_grid_mismatch="error"``, the default; ``"resample"`` resamples the moving
image and label onto the fixed grid with their affines, ``monai.transforms.ResampleToMatch``).
"""

from __future__ import annotations

import json
import logging
import os
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
from scripts.trainer import as_flag, load_weights

logger = logging.getLogger(__name__)

__all__ = [
    "RegistrationInferer",
    "make_pairs",
    "load_weights",
    "pair_preprocessing",
    "write_outputs",
    "save_nifti",
    "OUTPUT_SUFFIXES",
]

IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
PAIR_KEYS = IMAGE_KEYS + LABEL_KEYS
OUTPUT_SUFFIXES = {
    "ddf": "_ddf.nii.gz",
    "warped": "_warped.nii.gz",
    "warped_label": "_warped_label.nii.gz",
    "sigma2": "_sigma2.nii.gz",
    "weight": "_weight.nii.gz",
    "overlay": "_overlay.png",
}


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
    is used). Relative paths are relative to the JSON file. Ids are made unique.
    """
    items: list[dict] = []
    if datalist:
        path = datalist_path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist not found: {path}")
        with open(path) as f:
            content = json.load(f)
        if isinstance(content, list):
            base = path.parent
            for i, it in enumerate(content):
                if not isinstance(it, Mapping) or "moving" not in it or "fixed" not in it:
                    raise DataError(f"{path}: item {i} needs 'moving' and 'fixed'.")
                it = {k: v for k, v in it.items()}
                for k in PAIR_KEYS:
                    if it.get(k):
                        p = Path(it[k])
                        it[k] = str(p if p.is_absolute() else base / p)
                items.append(it)
        else:
            items = load_datalist(path, split, check_files=False)
    if moving is not None or fixed is not None:
        if moving is None or fixed is None:
            raise ValueError("give both --moving and --fixed (or --datalist).")
        items.append({"moving": str(moving), "fixed": str(fixed), "moving_label": moving_label,
                      "fixed_label": fixed_label, "id": pair_id})
    if not items:
        raise ValueError("nothing to register: give --moving M --fixed F or --datalist pairs.json.")
    seen: dict[str, int] = {}
    for it in items:
        name = it.get("id") or Path(str(it["fixed"])).name.split(".")[0]
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        it["id"] = str(name)
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
def _affine4(affine: Any) -> np.ndarray:
    a = np.asarray(affine.cpu() if hasattr(affine, "cpu") else affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    r = a.shape[0] - 1
    out = np.eye(4)
    out[:r, :r] = a[:r, :r]
    out[:r, 3] = a[:r, r]
    return out


def save_nifti(array: np.ndarray, affine: Any, path: str | os.PathLike, dtype=np.float32) -> str:
    """Write ``array`` (spatial dims first, channels last) as NIfTI with ``affine`` (4x4, world mm)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array).astype(dtype), _affine4(affine))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return str(path)


def write_outputs(result: Mapping[str, Any], output_dir: str | os.PathLike, overlay: bool = True) -> dict:
    """Write one pair's results (from :meth:`RegistrationInferer.infer`) into ``output_dir``; return the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cid, affine, shape = result["id"], result["affine"], tuple(result["output_shape"])
    files: dict[str, str] = {}

    def arr(x: torch.Tensor, channel_last: bool = False) -> np.ndarray:
        a = x.detach().cpu().float().numpy()  # (C, *spatial) on the (squeezed) fixed grid
        if channel_last:
            return np.moveaxis(a, 0, -1).reshape(shape + (a.shape[0],))
        return a[0].reshape(shape)

    files["ddf"] = save_nifti(arr(result["ddf"], True), affine, out / f"{cid}{OUTPUT_SUFFIXES['ddf']}")
    files["warped"] = save_nifti(arr(result["warped"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['warped']}")
    if result.get("warped_label") is not None:
        files["warped_label"] = save_nifti(
            np.rint(arr(result["warped_label"])), affine, out / f"{cid}{OUTPUT_SUFFIXES['warped_label']}", np.uint8
        )
    if result.get("sigma2") is not None:
        files["sigma2"] = save_nifti(arr(result["sigma2"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['sigma2']}")
    if result.get("weight") is not None:
        files["weight"] = save_nifti(arr(result["weight"]), affine, out / f"{cid}{OUTPUT_SUFFIXES['weight']}")
    if overlay:
        from scripts.plots import plot_panel

        case = {
            "moving": result["moving_display"], "fixed": result["fixed_display"],
            "warped": result["warped_display"], "ddf": result["ddf"],
            "log_var": None if result.get("sigma2") is None else torch.log(result["sigma2"]),
            "weight": result.get("weight"), "warped_label": result.get("warped_label"),
            "fixed_label": result.get("fixed_label"),
        }
        files["overlay"] = plot_panel(case, out / f"{cid}{OUTPUT_SUFFIXES['overlay']}", title=str(cid))
    return files


# ----------------------------------------------------------------------------------------------------- inferer
class RegistrationInferer:
    """Register pairs of images with the displacement network (and, on request, the variance network).

    Args:
        network: displacement network, ``network(cat([moving, fixed], 1)) -> DDF`` (voxel units of its grid).
        spatial_size: the network input size; pairs of another size are resized to it and the results resized
            back (DDF values rescaled per axis).
        variance_network: the variance estimator (``cat([warped, fixed], 1) -> log σ̂²``), or ``None``.
        weight_fn: ``(fixed, log_var) -> weight`` (the Eq. 4 weight map), e.g. ``SNRWeightedMSELoss.weight_map``.
        uncertainty: compute σ̂² and the weight map (needs ``variance_network``).
        intensity: ``"none"`` (images already in [0, 1]) or ``"percentile"`` (0.5-99.5 percentiles -> [0, 1]).
        on_grid_mismatch: ``"error"`` (default) or ``"resample"`` when moving and fixed have different shapes or
            spacings.
        device: torch device.
        preprocessing: the loading transform (default :func:`pair_preprocessing`).
        padding_mode: padding of the image warp (``"border"`` as in training).
        overlay: write a PNG panel per pair.
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
        overlay: bool | str = True,
        spacing_rtol: float = 1e-3,
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.nd = len(self.spatial_size)
        if self.nd not in (2, 3):
            raise ValueError(f"spatial_size must have 2 or 3 entries, got {spatial_size}.")
        if intensity not in ("none", "percentile"):
            raise ValueError(f"intensity must be 'none' or 'percentile', got {intensity!r}.")
        if on_grid_mismatch not in ("error", "resample"):
            raise ValueError(f"on_grid_mismatch must be 'error' or 'resample', got {on_grid_mismatch!r}.")
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.uncertainty = as_flag(uncertainty)
        if self.uncertainty and variance_network is None:
            raise ValueError("uncertainty=true needs the variance network (this config has variance_def: null).")
        self.variance_network = variance_network.to(self.device).eval() if variance_network is not None else None
        self.weight_fn = weight_fn
        self.intensity = intensity
        self.on_grid_mismatch = on_grid_mismatch
        self.preprocessing = preprocessing if preprocessing is not None else pair_preprocessing()
        self.overlay = as_flag(overlay)
        self.spacing_rtol = float(spacing_rtol)
        self.warp = Warp(mode="bilinear", padding_mode=padding_mode)
        self.label_warp = Warp(mode="nearest", padding_mode="border")
        self.linear = "bilinear" if self.nd == 2 else "trilinear"

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, item: Mapping[str, Any]) -> dict:
        """Load and check one pair; return channel-first MetaTensors on the fixed grid (squeezed to the network's
        dimensionality) and ``output_shape``, the fixed image's own spatial shape."""
        for k in PAIR_KEYS:
            v = item.get(k)
            if v is None:
                continue
            if not Path(str(v)).is_file():
                raise FileNotFoundError(f"{v}: '{k}' file does not exist.")
        for k in IMAGE_KEYS:
            if item.get(k) is None:
                raise ValueError(f"pair {item.get('id')}: '{k}' is required.")
        data = self.preprocessing({k: str(item[k]) for k in PAIR_KEYS if item.get(k) is not None})
        output_shape = tuple(int(s) for s in data["fixed"].shape[1:])
        for k in [k for k in PAIR_KEYS if k in data]:
            data[k] = self._check_dims(data[k], str(item[k]), k)
            t = torch.as_tensor(data[k])
            if not torch.isfinite(t).all():
                raise DataError(f"{item[k]}: '{k}' contains NaN or Inf voxels.")
            if k in IMAGE_KEYS and float(t.max() - t.min()) == 0.0:
                raise DataError(f"{item[k]}: '{k}' is a constant image.")
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

    def _spacing(self, x) -> np.ndarray:
        a = _affine4(x.affine)[: self.nd, : self.nd]
        return np.sqrt((a**2).sum(0))

    def _check_grid(self, data: dict, item: Mapping) -> None:
        fixed = data["fixed"]
        for k in ("moving", "moving_label", "fixed_label"):
            if k not in data:
                continue
            x = data[k]
            same_shape = tuple(x.shape[1:]) == tuple(fixed.shape[1:])
            same_spacing = np.allclose(self._spacing(x), self._spacing(fixed), rtol=self.spacing_rtol, atol=1e-6)
            if same_shape and same_spacing:
                continue
            what = (f"shape {tuple(x.shape[1:])} vs {tuple(fixed.shape[1:])}" if not same_shape else
                    f"spacing {np.round(self._spacing(x), 4).tolist()} vs {np.round(self._spacing(fixed), 4).tolist()}")
            if k == "fixed_label" or self.on_grid_mismatch == "error":
                raise DataError(
                    f"{item[k]}: '{k}' is not on the grid of the fixed image {item['fixed']} ({what}). "
                    "Resample it first " + ("" if k == "fixed_label" else "or run with --on_grid_mismatch resample (the moving image and "
                       "label are then resampled onto the fixed grid with their affines).")
                )
            logger.warning("%s: %s (%s): resampling onto the fixed grid", item[k], k, what)
            mode = "nearest" if k in LABEL_KEYS else "bilinear"
            data[k] = ResampleToMatch(mode=mode, padding_mode="border")(x, img_dst=fixed)

    # -------------------------------------------------------------------------------------------------- infer
    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.intensity == "percentile":
            return ScaleIntensityRangePercentiles(0.5, 99.5, 0.0, 1.0, clip=True)(x)
        return x

    def _to_net(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if tuple(x.shape[1:]) == self.spatial_size:
            return x
        return Resize(self.spatial_size, mode=mode, anti_aliasing=False)(x)

    @staticmethod
    def _plain(x) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
        return x.float()

    @torch.no_grad()
    def infer(self, item: Mapping[str, Any]) -> dict:
        """Register one pair; return tensors (C, *spatial) on the fixed grid and the bookkeeping to write them."""
        loaded = self.load(item)
        data = loaded["data"]
        moving_raw = self._plain(data["moving"])
        moving_s = self._plain(self._scale(data["moving"]))
        fixed_s = self._plain(self._scale(data["fixed"]))
        in_size = tuple(moving_raw.shape[1:])
        resized = in_size != self.spatial_size
        dev = self.device
        m_net = self._plain(self._to_net(moving_s, self.linear)).to(dev)[None]
        f_net = self._plain(self._to_net(fixed_s, self.linear)).to(dev)[None]
        ddf_net = self.network(torch.cat([m_net, f_net], dim=1)).float()
        log_var_net = weight_net = None
        if self.uncertainty:
            warped_net = self.warp(m_net, ddf_net)
            log_var_net = self.variance_network(torch.cat([warped_net, f_net], dim=1)).float()
            if self.weight_fn is not None:
                weight_net = self.weight_fn(f_net, log_var_net).float()
        ddf = ddf_net[0].cpu()
        if resized:
            ddf = self._plain(Resize(in_size, mode=self.linear, anti_aliasing=False)(ddf))
            scale = torch.tensor([i / n for i, n in zip(in_size, self.spatial_size)], dtype=ddf.dtype)
            ddf = ddf * scale.view(-1, *([1] * self.nd))

        def back(x):
            if x is None:
                return None
            x = x[0].cpu()
            return self._plain(Resize(in_size, mode=self.linear, anti_aliasing=False)(x)) if resized else x

        warped = self.warp(moving_raw[None], ddf[None])[0]
        result = {
            "id": item["id"],
            "ddf": ddf,
            "warped": warped,
            "sigma2": None if log_var_net is None else torch.exp(back(log_var_net)),
            "weight": back(weight_net),
            "affine": _affine4(data["fixed"].affine),
            "output_shape": loaded["output_shape"],
            "input_size": list(in_size),
            "network_size": list(self.spatial_size),
            "resized": resized,
            "moving_display": moving_s,
            "fixed_display": fixed_s,
            "warped_display": self.warp(moving_s[None], ddf[None])[0],
            "fixed_label": self._plain(data["fixed_label"]) if "fixed_label" in data else None,
            "warped_label": None,
        }
        if "moving_label" in data:
            result["warped_label"] = self.label_warp(self._plain(data["moving_label"])[None], ddf[None])[0]
        return result

    def __call__(self, item: Mapping[str, Any]) -> dict:
        return self.infer(item)

    def run(self, pairs: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> list[dict]:
        """Register every pair and write its outputs into ``output_dir``; also writes ``inference.json``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        records = []
        for item in pairs:
            result = self.infer(item)
            files = write_outputs(result, out, overlay=self.overlay)
            records.append({
                "id": result["id"],
                "inputs": {k: item.get(k) for k in PAIR_KEYS if item.get(k)},
                "outputs": files,
                "input_size": result["input_size"],
                "network_size": result["network_size"],
                "resized": result["resized"],
            })
            logger.info("registered %s -> %s", result["id"], out)
        summary = {
            "ddf": "channel-last, voxel units of the fixed grid, channel i = displacement along array axis i, "
                   "warped(x) = moving(x + ddf(x)) (monai.networks.blocks.Warp)",
            "sigma2": "exp(log variance) of the variance network, intensity^2 of images scaled to [0, 1]",
            "weight": "Eq. 4 weight map, sigmoid of the normalised SNR",
            "pairs": records,
        }
        with open(out / "inference.json", "w") as f:
            json.dump(summary, f, indent=2)
        return records
