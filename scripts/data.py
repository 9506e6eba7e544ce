"""Datalists and the paired transforms shared by every data source.

The data contract (docs/CONTRACTS.md): a dataset folder holds ``datalist.json`` with ``training`` / ``validation`` /
``test`` lists of items ``{"moving", "fixed"[, "moving_label", "fixed_label", "ddf", "noise_std", "moving_noise_std",
"residual_std", ...]}``; paths are
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
from monai.data import Dataset, list_data_collate
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
# phantom ground truth maps (version 2 adds the moving frame's noise std and the residual's RMS / mean over noise
# draws of both frames at the true displacement: docs/phantom.md)
PHANTOM_IMAGE_KEYS = ("noise_std", "moving_clean", "fixed_clean", "moving_noise_std", "residual_std", "residual_mean")
FIELD_KEYS = ("ddf",)
PATH_KEYS = IMAGE_KEYS + LABEL_KEYS + PHANTOM_IMAGE_KEYS + FIELD_KEYS
# what a registration pair carries through transforms and engines (the engines' BATCH_KEYS, docs/CONTRACTS.md)
PAIR_KEYS = ("moving", "fixed", "moving_label", "fixed_label", "ddf", "noise_std", "moving_noise_std", "residual_std")
SPLITS = ("training", "validation", "test")
DATALIST_NAME = "datalist.json"


class DataError(ValueError):
    """Bad input data: the message names the file and the problem."""


# ------------------------------------------------------------------------------------- one bad pair, not the run
FAILED_KEY = "failed_items"


def _root_cause(e: BaseException) -> BaseException:
    """The innermost exception of MONAI's "applying transform ..." chain: the one that names the file."""
    while e.__cause__ is not None:
        e = e.__cause__
    return e


class TolerantDataset(Dataset):
    """A MONAI ``Dataset`` whose bad items do not stop the run (evaluation over many pairs).

    An item whose transform raises becomes ``{"id": <case>, "failed": "<Error>: <message naming the file>"}`` (the
    error is logged); :func:`tolerant_collate` moves those into the batch's ``failed_items`` list of
    ``(id, message)``, the evaluator skips them, the results writer records them as failed rows and the run ends with
    an error that lists them, after every other pair has been evaluated. ``fail_fast=True`` re-raises at once.
    """

    def __init__(self, data: Sequence, transform=None, fail_fast: bool = False) -> None:
        super().__init__(data=data, transform=transform)
        self.fail_fast = bool(fail_fast)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except Exception as e:
            item = self.data[index]
            case = str(item.get("id", f"case{index:04d}")) if isinstance(item, Mapping) else f"case{index:04d}"
            cause = _root_cause(e)
            msg = f"{type(cause).__name__}: {cause}"
            if self.fail_fast:
                raise DataError(f"pair {case}: {msg}") from e
            logger.error("pair %s failed and is skipped: %s", case, msg)
            return {"id": case, "failed": msg}


def tolerant_collate(batch: Sequence[Mapping]) -> dict:
    """``list_data_collate`` of the good items, plus ``failed_items``: ``(id, message)`` of the failed ones."""
    failed = [(b["id"], b["failed"]) for b in batch if "failed" in b]
    ok = [b for b in batch if "failed" not in b]
    out = dict(list_data_collate(ok)) if ok else {}
    out[FAILED_KEY] = failed
    return out


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
        raise DataError(
            f"{path}: no datalist found and phantom generation is disabled (phantom: null; on the command line "
            "`--phantom null`)."
        )
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
    from scripts.contracts import safe_id

    path = datalist_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: datalist not found.") from None
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON ({e}); an interrupted write? rebuild it with "
            "`python -m bundle datalist` or `python -m bundle phantom`."
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text JSON file ({e}).") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the datalist ({type(e).__name__}: {e.strerror or e}).") from None
    if not isinstance(content, dict):
        raise DataError(
            f"{path}: a datalist is a JSON object with the splits {list(SPLITS)}, got a " f"{type(content).__name__}."
        )
    if split not in content:
        raise DataError(f"{path}: no '{split}' split (has: {sorted(content)}).")
    items = content[split]
    if not isinstance(items, list):
        raise DataError(f"{path}: split '{split}' must be a list of items, got a {type(items).__name__}.")
    if not items:
        raise DataError(f"{path}: split '{split}' is empty.")
    base = path.parent
    out, ids = [], {}
    for i, item in enumerate(items):
        where = f"{path} ('{split}' item {i})"
        if not isinstance(item, dict):
            raise DataError(
                f'{where}: an item is an object {{"moving": ..., "fixed": ...}}, got '
                f"{type(item).__name__} {str(item)[:60]!r}."
            )
        missing = [k for k in IMAGE_KEYS if not item.get(k)]
        if missing:
            raise DataError(f"{path}: item {i} of '{split}' has no {missing}.")
        item = dict(item)
        for k in PATH_KEYS:
            if k in item and item[k] is not None:
                if not isinstance(item[k], str) or not item[k].strip():
                    raise DataError(f"{where}: key '{k}' must be a file path (a string), got {item[k]!r}.")
                p = Path(item[k])
                p = p if p.is_absolute() else base / p
                if check_files and not p.is_file():
                    what = "is not a file" if p.exists() else "does not exist"
                    raise DataError(f"{p}: file listed in {path} ('{split}' item {i}, key '{k}') {what}.")
                item[k] = str(p)
        if item.get("id") not in (None, ""):  # ids become file names (results, panels): never a path
            item["id"] = safe_id(item["id"], what=f"{where}: id")
            if item["id"] in ids:
                raise DataError(f"{where}: duplicate id {item['id']!r} (also item {ids[item['id']]}).")
        else:
            stem = safe_id(Path(item["fixed"]).name.split(".")[0], what=f"{where}: id")
            item["id"] = stem if stem not in ids else f"{i:04d}_{stem}"
        ids[item["id"]] = i
        out.append(item)
    return out


class LoadPaird(MapTransform):
    """:class:`monai.transforms.LoadImaged` key by key; a file that cannot be read (truncated ``.nii.gz``, zero-byte
    or corrupt file) is a :class:`DataError` naming the file, the key and a one-line diagnosis instead of a bare
    ``EOFError``."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = True, **load_kwargs):
        super().__init__(keys, allow_missing_keys)
        load_kwargs.setdefault("image_only", True)
        self.loaders = {k: LoadImaged(k, **load_kwargs) for k in self.keys}

    def __call__(self, data: Mapping) -> dict:
        from scripts.contracts import read_error

        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None:  # an optional file given as null: same as absent
                d.pop(key)
                continue
            try:
                d = self.loaders[key](d)
            except Exception as e:  # nibabel / gzip / ITK: name the file
                raise read_error(d[key], self._gzip_cause(d[key], e), f"'{key}' file") from None
        return d

    @staticmethod
    def _gzip_cause(path, exc: BaseException) -> BaseException:
        """For a ``.gz`` file that failed to load, the gzip error (e.g. ``EOFError`` of a truncated file) if any: the
        readers' own message ("cannot work out file type") hides it."""
        import gzip
        import zlib

        if not str(path).endswith(".gz"):
            return exc
        try:
            with gzip.open(path, "rb") as f:
                while f.read(1 << 20):
                    pass
        except (EOFError, OSError, zlib.error) as e:
            return e
        return exc


class CheckPaird(MapTransform):
    """Check a loaded pair against the input contract (docs/data.md, scripts/contracts.py).

    - matching spatial shapes and dimensionality (``spatial_dims``);
    - finite values everywhere; images (``moving``/``fixed``) not constant and, with ``intensity="none"``, already in
      [0, 1] (:func:`scripts.contracts.check_intensity`: out-of-range images are refused, naming the file and
      ``intensity: percentile``);
    - labels: integers of ``label_values`` (:func:`scripts.contracts.check_labels`; default the project's 0-3);
    - geometry: ``moving``, ``moving_label`` and ``fixed_label`` on the grid of ``fixed`` (spacing, direction and
      origin of the affines, :func:`scripts.contracts.check_geometry`), errors naming both files.

    Errors are :class:`DataError` naming the offending file (from the image meta data) and the problem.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int | None = None,
        allow_missing_keys: bool = True,
        intensity: str = "none",
        label_values: Sequence[int] | None = None,
        check_grid: bool = True,
    ):
        from scripts.contracts import INTENSITY_POLICIES, LABEL_SET

        super().__init__(keys, allow_missing_keys)
        if intensity not in INTENSITY_POLICIES:
            raise ValueError(f"intensity must be one of {list(INTENSITY_POLICIES)}, got {intensity!r}.")
        self.spatial_dims = spatial_dims
        self.intensity = intensity
        self.label_values = tuple(LABEL_SET if label_values is None else (int(v) for v in label_values))
        self.check_grid = check_grid

    @staticmethod
    def _name(d: Mapping, key: str) -> str:
        meta = getattr(d[key], "meta", {}) or {}
        return str(meta.get("filename_or_obj", key))

    def __call__(self, data: Mapping) -> dict:
        from scripts.contracts import check_geometry, check_intensity, check_labels

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
            if key in IMAGE_KEYS:
                check_intensity(t, name, policy=self.intensity, key=key)
            elif key in LABEL_KEYS:
                check_labels(t, name, self.label_values, key=key)
        if self.check_grid and "fixed" in d:
            ref = self._affine(d, "fixed")
            for key in ("moving", "moving_label", "fixed_label"):
                aff = self._affine(d, key) if key in d and key in self.keys else None
                if aff is None or ref is None:
                    continue
                check_geometry(
                    aff,
                    ref,
                    [self._name(d, key), self._name(d, "fixed")],
                    moving_shape=tuple(d[key].shape[1:]),
                    fixed_shape=tuple(d["fixed"].shape[1:]),
                    keys=(key, "fixed"),
                    resample_allowed=False,
                )
        return d

    @staticmethod
    def _affine(d: Mapping, key: str):
        meta = getattr(d[key], "meta", None) or {}
        return meta.get("affine")


def paired_transforms(
    spatial_size: Sequence[int] | None = None,
    keys: Sequence[str] = PAIR_KEYS,
    intensity: str = "none",
    label_values: Sequence[int] | None = None,
) -> Compose:
    """Load and prepare a registration pair as the networks expect it (channel-first float32 tensors).

    Args:
        spatial_size: resize images and labels to this size when they differ (``None``: keep). Ground-truth DDFs
            are never resized: a size mismatch there is an error.
        keys: the keys to load; keys absent from an item are skipped.
        intensity: ``"none"`` (images are already in [0, 1], as the phantom and the datalist builders write them;
            images outside [0, 1] are refused, naming the file) or ``"percentile"`` (clip to the 0.5-99.5
            percentiles and scale to [0, 1], for raw data).
        label_values: the allowed label values (default the project's 0, 1, 2, 3); other values are an error.

    Every file is checked when loaded (:class:`LoadPaird`, :class:`CheckPaird`): unreadable or truncated files, NaN,
    constant images, labels outside ``label_values``, moving / fixed on different grids are :class:`DataError`
    naming the file.
    """
    keys = tuple(keys)
    images = [k for k in keys if k in IMAGE_KEYS + PHANTOM_IMAGE_KEYS]
    labels = [k for k in keys if k in LABEL_KEYS]
    fields = [k for k in keys if k in FIELD_KEYS]
    xforms = [
        LoadPaird(keys, image_only=True, allow_missing_keys=True),
        EnsureChannelFirstd(images + labels, allow_missing_keys=True),
    ]
    if fields:
        xforms.append(EnsureChannelFirstd(fields, channel_dim=-1, allow_missing_keys=True))
    xforms.append(
        CheckPaird(
            keys,
            spatial_dims=len(spatial_size) if spatial_size else None,
            intensity=intensity,
            label_values=label_values,
        )
    )
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
