"""Datalists and the paired transforms shared by every data source.

The data contract (docs/CONTRACTS.md): a dataset folder holds ``datalist.json`` with ``training`` / ``validation`` /
``test`` lists of items ``{"moving", "fixed"[, "moving_label", "fixed_label", "ddf", "noise_std", ...]}``; paths are
relative to the JSON file. Registration warps ``moving`` (ED) onto ``fixed`` (ES).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Resized,
    ScaleIntensityRangePercentilesd,
)

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("moving", "fixed")
LABEL_KEYS = ("moving_label", "fixed_label")
PHANTOM_IMAGE_KEYS = ("noise_std", "moving_clean", "fixed_clean")
FIELD_KEYS = ("ddf",)
PATH_KEYS = IMAGE_KEYS + LABEL_KEYS + PHANTOM_IMAGE_KEYS + FIELD_KEYS
SPLITS = ("training", "validation", "test")
DATALIST_NAME = "datalist.json"


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


def datalist_path(dataset: str | os.PathLike) -> Path:
    """``dataset`` is a datalist JSON or a folder that holds ``datalist.json``."""
    p = Path(dataset)
    return p if p.suffix == ".json" else p / DATALIST_NAME


def prepare_dataset(dataset_dir: str | os.PathLike, phantom: Mapping | None = None) -> str:
    """Return the datalist of ``dataset_dir``; write the built-in phantom there first if the folder is empty.

    Args:
        dataset_dir: a folder holding ``datalist.json`` (or the JSON file itself).
        phantom: keyword arguments of :func:`scripts.phantom.write_dataset`; ``None`` means "never generate".
    """
    path = datalist_path(dataset_dir)
    if path.is_file():
        return str(path)
    folder = path.parent
    if isinstance(phantom, str) and phantom.strip().lower() in ("none", "null", "false", ""):
        phantom = None  # from the command line: --phantom None
    if phantom is None:
        raise DataError(f"{path}: no datalist found and phantom generation is disabled (phantom: null; on the command line `--phantom null`).")
    if folder.is_dir() and any(folder.iterdir()):
        raise DataError(
            f"{folder}: folder is not empty but has no {DATALIST_NAME}; refusing to write the phantom over it. "
            "Point dataset_dir at an empty folder or at a folder made by `python -m bundle phantom/datalist`."
        )
    from scripts.phantom import write_dataset

    logger.info("dataset_dir %s is empty: writing the built-in phantom (%s)", folder, dict(phantom))
    return str(write_dataset(str(folder), **dict(phantom)))


def load_datalist(path: str | os.PathLike, split: str, check_files: bool = True) -> list[dict]:
    """Read one split of a datalist JSON, with paths made absolute (relative paths are relative to the JSON).

    Raises :class:`DataError` naming the file for an unreadable JSON, a missing or empty split, items without
    ``moving``/``fixed`` and files that do not exist.
    """
    path = datalist_path(path)
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: datalist not found.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}).") from None
    if split not in content:
        raise DataError(f"{path}: no '{split}' split (has: {sorted(content)}).")
    items = content[split]
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: split '{split}' is empty.")
    base = path.parent
    out = []
    for i, item in enumerate(items):
        missing = [k for k in IMAGE_KEYS if k not in item]
        if missing:
            raise DataError(f"{path}: item {i} of '{split}' has no {missing}.")
        item = dict(item)
        for k in PATH_KEYS:
            if k in item and item[k] is not None:
                p = Path(item[k])
                p = p if p.is_absolute() else base / p
                if check_files and not p.exists():
                    raise DataError(f"{p}: file listed in {path} ('{split}' item {i}, key '{k}') does not exist.")
                item[k] = str(p)
        item.setdefault("id", Path(item["fixed"]).name.split(".")[0])
        out.append(item)
    return out


class CheckPaird(MapTransform):
    """Check a loaded pair: matching spatial shapes and dimensionality, finite values, non-constant images.

    Errors name the offending file (from the image meta data) and the problem.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int | None = None, allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    @staticmethod
    def _name(d: Mapping, key: str) -> str:
        meta = getattr(d[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        ref_key, ref_shape = None, None
        for key in self.key_iterator(d):
            x = d[key]
            name = self._name(d, key)
            spatial = tuple(x.shape[1:])
            if self.spatial_dims is not None and len(spatial) != self.spatial_dims:
                raise DataError(
                    f"{name}: '{key}' has {len(spatial)} spatial dims (shape {tuple(x.shape)}), expected "
                    f"{self.spatial_dims} (spatial_dims of the config)."
                )
            if ref_shape is None:
                ref_key, ref_shape = key, spatial
            elif spatial != ref_shape:
                raise DataError(
                    f"{name}: '{key}' has spatial shape {spatial} but '{ref_key}' ({self._name(d, ref_key)}) "
                    f"has {ref_shape}."
                )
            t = torch.as_tensor(x)
            if not torch.isfinite(t).all():
                raise DataError(f"{name}: '{key}' contains NaN or Inf voxels.")
            if key in IMAGE_KEYS and float(t.max() - t.min()) == 0.0:
                raise DataError(f"{name}: '{key}' is a constant image.")
        return d


def paired_transforms(
    spatial_size: Sequence[int] | None = None,
    keys: Sequence[str] = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std"),
    intensity: str = "none",
) -> Compose:
    """Load and prepare a registration pair as the networks expect it (channel-first float32 tensors).

    Args:
        spatial_size: resize images and labels to this size when they differ (``None``: keep). Ground-truth DDFs
            are never resized: a size mismatch there is an error.
        keys: the keys to load; keys absent from an item are skipped.
        intensity: ``"none"`` (images are already in [0, 1], as the phantom and the datalist builders write them)
            or ``"percentile"`` (clip to the 0.5-99.5 percentiles and scale to [0, 1], for raw data).
    """
    keys = tuple(keys)
    images = [k for k in keys if k in IMAGE_KEYS + PHANTOM_IMAGE_KEYS]
    labels = [k for k in keys if k in LABEL_KEYS]
    fields = [k for k in keys if k in FIELD_KEYS]
    xforms = [
        LoadImaged(keys, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(images + labels, allow_missing_keys=True),
    ]
    if fields:
        xforms.append(EnsureChannelFirstd(fields, channel_dim=-1, allow_missing_keys=True))
    xforms.append(CheckPaird(keys, spatial_dims=len(spatial_size) if spatial_size else None))
    if intensity == "percentile":
        xforms.append(
            ScaleIntensityRangePercentilesd(
                [k for k in IMAGE_KEYS if k in keys], 0.5, 99.5, 0.0, 1.0, clip=True, allow_missing_keys=True
            )
        )
    elif intensity != "none":
        raise ValueError(f"intensity must be 'none' or 'percentile', got {intensity!r}.")
    if spatial_size is not None:
        xforms += [
            ResizeIfNeededd(images, spatial_size, mode="bilinear"),
            ResizeIfNeededd(labels, spatial_size, mode="nearest"),
            ResizeIfNeededd(fields, spatial_size, mode=None),
        ]
    xforms += [
        CastToTyped(images + fields + labels, dtype=np.float32, allow_missing_keys=True),
        EnsureTyped(keys, track_meta=True, allow_missing_keys=True),
    ]
    return Compose(xforms)


class ResizeIfNeededd(MapTransform):
    """Resize to ``spatial_size`` only where the shape differs; ``mode=None`` forbids resizing (raises instead)."""

    def __init__(self, keys: KeysCollection, spatial_size: Sequence[int], mode: str | None):
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.mode = mode
        self.resize = None if mode is None else Resized(keys, self.spatial_size, mode=mode, allow_missing_keys=True)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) == self.spatial_size:
                continue
            if self.resize is None:
                raise DataError(
                    f"{CheckPaird._name(d, key)}: '{key}' has shape {tuple(d[key].shape[1:])}, the network size is "
                    f"{self.spatial_size}; ground-truth fields are not resized."
                )
            d = self.resize(d)
            break
        return d


# Datalist builders for real data live in scripts/datasets.py (they import ITK / nibabel); re-exported here lazily so
# that ``from scripts.data import build_acdc`` works without importing them for every use of this module.
_DATASET_EXPORTS = (
    "build_acdc",
    "build_camus",
    "build_pairs",
    "build_datalist",
    "read_image",
    "DataWarning",
    "ACDC_LABEL_MAP",
    "CAMUS_LABEL_MAP",
)


def __getattr__(name: str):
    if name in _DATASET_EXPORTS:
        from scripts import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
